#include "lmd/engine/cpu_backend.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <span>

#include "lmd/core/awq_layout.h"
#include "lmd/core/error.h"
#include "lmd/engine/kv_quant.h"
#include "lmd/engine/sampler.h"

namespace lmd {
namespace {

void require_f32(const DeviceTensor& t, const char* what) {
  if (t.dtype != DType::F32) fail("CPU backend: ", what, " must be float32, got ", dtype_name(t.dtype));
}

// Converts n elements of a float tensor (any float dtype) starting at element `offset` into dst.
void load_f32(const DeviceTensor& t, int64_t offset, int64_t n, float* dst) {
  switch (t.dtype) {
    case DType::F32:
      std::memcpy(dst, t.as<float>() + offset, n * sizeof(float));
      return;
    case DType::F16: {
      const uint16_t* src = t.as<uint16_t>() + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(src[i]);
      return;
    }
    case DType::BF16: {
      const uint16_t* src = t.as<uint16_t>() + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
      return;
    }
    default:
      fail("CPU backend: expected a float tensor, got ", dtype_name(t.dtype));
  }
}

// Eight independent accumulators so the compiler can vectorise without reassociating one sum.
float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void rmsnorm_row(const float* x, const float* w, float eps, int64_t n, float* out) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / n + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv * w[i];
}

}  // namespace

CpuBackend::CpuBackend(int threads) : pool_(threads) {}

std::string CpuBackend::name() const { return "cpu (" + std::to_string(pool_.size()) + " threads)"; }

DeviceTensor CpuBackend::alloc(DType dtype, Shape shape) {
  DeviceTensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  const size_t bytes = std::max<size_t>(t.nbytes(), 1);
  std::shared_ptr<uint8_t[]> mem(new uint8_t[bytes]());
  t.data = mem.get();
  t.storage = std::shared_ptr<void>(mem, mem.get());
  return t;
}

DeviceTensor CpuBackend::upload(const HostTensor& host, DType dtype) {
  // Float weights already in the wanted dtype are used in place (the checkpoint stays memory-mapped).
  if (host.dtype() == dtype) {
    DeviceTensor t;
    t.dtype = dtype;
    t.shape = host.shape();
    HostTensor keep = host;
    t.data = const_cast<void*>(host.data());
    t.storage = std::make_shared<HostTensor>(std::move(keep));
    return t;
  }
  HostTensor converted = host.to(dtype);
  DeviceTensor t = alloc(dtype, host.shape());
  std::memcpy(t.data, converted.data(), t.nbytes());
  return t;
}

HostTensor CpuBackend::download(const DeviceTensor& t) {
  HostTensor h;
  download_into(t, h);
  return h;
}

void CpuBackend::download_into(const DeviceTensor& t, HostTensor& dst) {
  if (!reusable_for(dst, t)) dst = HostTensor(t.dtype, t.shape);
  std::memcpy(dst.mutable_data(), t.data, t.nbytes());
}

DeviceLinear CpuBackend::prepare_linear(const LinearWeight& w, DType compute) {
  DeviceLinear out;
  out.out_features = w.out_features();
  out.in_features = w.in_features();
  if (w.is_awq()) {
    // The reference path: dequantize once to fp32 and run the dense product.
    out.weight = upload(dequantize_awq(w.qweight, w.qzeros, w.scales), DType::F32);
    out.group_size = static_cast<int>(w.in_features() / w.scales.dim(0));
  } else {
    out.weight = upload(w.weight, w.weight.dtype());
  }
  if (!w.bias.empty()) out.bias = upload(w.bias, compute);
  return out;
}

KvCacheStorage CpuBackend::alloc_kv_cache(const KvCacheLayout& layout, DType compute) {
  KvCacheStorage cache;
  cache.layout = layout;
  const int64_t per_block = int64_t(layout.layers) * 2 * layout.kv_heads * layout.block_len;
  if (layout.quant_bits == 0) {
    cache.data = alloc(compute, {layout.num_blocks, per_block * layout.head_dim});
  } else {
    cache.data =
        alloc(DType::U8, {layout.num_blocks, per_block * kv_row_bytes(layout.head_dim, layout.quant_bits)});
    if (!layout.is_static()) cache.params = alloc(DType::F16, {layout.num_blocks, per_block * 2});
  }
  return cache;
}

size_t CpuBackend::free_memory() const {
  const long pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? size_t(pages) * size_t(page) : 0;
}

void CpuBackend::embedding(const DeviceTensor& table, const std::vector<int>& ids, DeviceTensor& out) {
  require_f32(out, "embedding output");
  const int64_t vocab = table.dim(0), hidden = table.dim(1);
  for (size_t t = 0; t < ids.size(); ++t) {
    if (ids[t] < 0 || ids[t] >= vocab) fail("token id ", ids[t], " is outside the vocabulary (", vocab, ")");
    load_f32(table, int64_t(ids[t]) * hidden, hidden, out.as<float>() + t * hidden);
  }
}

void CpuBackend::rmsnorm(const DeviceTensor& x, const DeviceTensor& weight, float eps, DeviceTensor& out) {
  const int64_t n = x.dim(-1), rows = x.numel() / n;
  std::vector<float> w(n);
  load_f32(weight, 0, n, w.data());
  for (int64_t r = 0; r < rows; ++r)
    rmsnorm_row(x.as<float>() + r * n, w.data(), eps, n, out.as<float>() + r * n);
}

void CpuBackend::add_rmsnorm(DeviceTensor& residual, const DeviceTensor& x, const DeviceTensor& weight,
                             float eps, DeviceTensor& out) {
  const int64_t n = x.dim(-1), rows = x.numel() / n;
  float* res = residual.as<float>();
  const float* xs = x.as<float>();
  for (int64_t i = 0; i < rows * n; ++i) res[i] += xs[i];
  rmsnorm(residual, weight, eps, out);
}

void CpuBackend::linear(const DeviceTensor& x, const DeviceLinear& w, DeviceTensor& out) {
  require_f32(x, "linear input");
  const int64_t in = w.in_features, outf = w.out_features, tokens = x.numel() / in;
  if (x.dim(-1) != in) fail("linear: input has ", x.dim(-1), " features, weight expects ", in);
  const float* xs = x.as<float>();
  float* ys = out.as<float>();
  std::vector<float> bias(w.bias.empty() ? 0 : outf);
  if (!bias.empty()) load_f32(w.bias, 0, outf, bias.data());
  pool_.parallel_for(outf, [&](int64_t begin, int64_t end) {
    std::vector<float> row(in);
    for (int64_t j = begin; j < end; ++j) {
      load_f32(w.weight, j * in, in, row.data());
      const float b = bias.empty() ? 0.f : bias[j];
      for (int64_t t = 0; t < tokens; ++t) ys[t * outf + j] = dot(xs + t * in, row.data(), in) + b;
    }
  });
}

void CpuBackend::rope_kv_write(DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                               const RopeConfig& rope, KvCacheStorage& cache) {
  const KvCacheLayout& L = cache.layout;
  const int hd = L.head_dim, half = hd / 2, kvh = L.kv_heads;
  const int64_t row = int64_t(heads + 2 * kvh) * hd;
  float* base = qkv.as<float>();
  for (const SeqSlice& s : batch.seqs) {
    const std::vector<float> inv_freq = rope_inv_freq(rope, s.context_len + s.num_new);
    for (int i = 0; i < s.num_new; ++i) {
      const int pos = s.context_len + i;
      float* r = base + int64_t(s.token_offset + i) * row;
      for (int f = 0; f < half; ++f) {
        const float angle = float(pos) * inv_freq[f];
        const float c = std::cos(angle), sn = std::sin(angle);
        for (int h = 0; h < heads + kvh; ++h) {  // q heads then k heads
          float* v = r + int64_t(h) * hd;
          const float x1 = v[f], x2 = v[f + half];
          v[f] = x1 * c - x2 * sn;
          v[f + half] = x2 * c + x1 * sn;
        }
      }
      const int block = s.blocks.at(pos / L.block_len), slot = pos % L.block_len;
      for (int kv = 0; kv < 2; ++kv) {
        for (int g = 0; g < kvh; ++g) {
          const float* src = r + int64_t(heads + kv * kvh + g) * hd;
          const int64_t index = kv_cache_row(L, block, layer, kv, g, slot);
          if (L.quant_bits == 0) {
            float* dst = cache.data.as<float>() + index * hd;
            std::memcpy(dst, src, hd * sizeof(float));
          } else if (L.is_static()) {
            const float* p = &L.static_params[4 * layer + 2 * kv];
            quantize_kv_row_static(src, hd, p[0], p[1], cache.data.as<int8_t>() + index * hd);
          } else {
            quantize_kv_row(src, hd, L.quant_bits,
                            cache.data.as<uint8_t>() + index * kv_row_bytes(hd, L.quant_bits),
                            cache.params.as<uint16_t>() + index * 2);
          }
        }
      }
    }
  }
}

void CpuBackend::attention(const DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                           const KvCacheStorage& cache, DeviceTensor& out) {
  const KvCacheLayout& L = cache.layout;
  const int hd = L.head_dim, kvh = L.kv_heads, group = heads / kvh;
  const int64_t row = int64_t(heads + 2 * kvh) * hd;
  const float scale = 1.0f / std::sqrt(float(hd));
  // One work item per (sequence token, head).
  struct Item {
    const SeqSlice* seq;
    int token;
  };
  std::vector<Item> items;
  for (const SeqSlice& s : batch.seqs)
    for (int i = 0; i < s.num_new; ++i) items.push_back({&s, i});
  pool_.parallel_for(int64_t(items.size()) * heads, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, key(hd), value(hd), acc(hd);
    for (int64_t w = begin; w < end; ++w) {
      const Item& it = items[w / heads];
      const int h = int(w % heads), g = h / group;
      const int t = it.seq->token_offset + it.token;
      const int len = it.seq->context_len + it.token + 1;  // causal: itself and everything before
      const float* q = qkv.as<float>() + int64_t(t) * row + int64_t(h) * hd;
      auto read = [&](int kv, int pos, float* dst) {
        const int block = it.seq->blocks[pos / L.block_len], slot = pos % L.block_len;
        const int64_t index = kv_cache_row(L, block, layer, kv, g, slot);
        if (L.quant_bits == 0) {
          std::memcpy(dst, cache.data.as<float>() + index * hd, hd * sizeof(float));
        } else if (L.is_static()) {
          const float* p = &L.static_params[4 * layer + 2 * kv];
          dequantize_kv_row_static(cache.data.as<int8_t>() + index * hd, hd, p[0], p[1], dst);
        } else {
          dequantize_kv_row(cache.data.as<uint8_t>() + index * kv_row_bytes(hd, L.quant_bits),
                            cache.params.as<uint16_t>() + index * 2, hd, L.quant_bits, dst);
        }
      };
      scores.resize(len);
      float mx = -INFINITY;
      for (int p = 0; p < len; ++p) {
        read(0, p, key.data());
        scores[p] = dot(q, key.data(), hd) * scale;
        mx = std::max(mx, scores[p]);
      }
      double sum = 0;
      for (int p = 0; p < len; ++p) sum += scores[p] = std::exp(scores[p] - mx);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int p = 0; p < len; ++p) {
        read(1, p, value.data());
        const float pw = float(scores[p] / sum);
        for (int d = 0; d < hd; ++d) acc[d] += pw * value[d];
      }
      std::memcpy(out.as<float>() + int64_t(t) * heads * hd + int64_t(h) * hd, acc.data(),
                  hd * sizeof(float));
    }
  });
}

void CpuBackend::silu_mul(const DeviceTensor& gate_up, DeviceTensor& out) {
  const int64_t inter = out.dim(-1), rows = out.numel() / inter;
  const float* gu = gate_up.as<float>();
  float* o = out.as<float>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < inter; ++i) {
      const float g = gu[r * 2 * inter + i], u = gu[r * 2 * inter + inter + i];
      o[r * inter + i] = g / (1.f + std::exp(-g)) * u;
    }
  }
}

void CpuBackend::gather_rows(const DeviceTensor& x, const std::vector<int>& rows, DeviceTensor& out) {
  const int64_t cols = x.dim(-1);
  const size_t bytes = cols * dtype_size(x.dtype);
  for (size_t i = 0; i < rows.size(); ++i)
    std::memcpy(static_cast<uint8_t*>(out.data) + i * bytes,
                static_cast<const uint8_t*>(x.data) + rows[i] * bytes, bytes);
}

void CpuBackend::greedy(const DeviceTensor& logits, DeviceTensor& out) {
  require_f32(logits, "greedy logits");
  require_f32(out, "greedy output");
  const int64_t vocab = logits.dim(-1), rows = logits.numel() / vocab;
  for (int64_t r = 0; r < rows; ++r) {
    const std::span<const float> row(logits.as<float>() + r * vocab, vocab);
    const int64_t best = std::max_element(row.begin(), row.end()) - row.begin();
    out.as<float>()[2 * r] = float(best);
    out.as<float>()[2 * r + 1] = log_softmax(row)[best];
  }
}

void CpuBackend::sample(const DeviceTensor& logits, const std::vector<SampleRow>& rows, DeviceTensor& out) {
  require_f32(logits, "sample logits");
  require_f32(out, "sample output");
  const int64_t vocab = logits.dim(-1);
  if (logits.numel() != int64_t(rows.size()) * vocab || out.numel() != 2 * int64_t(rows.size()))
    fail("sample: ", rows.size(), " rows of parameters for logits ", shape_str(logits.shape), " and output ",
         shape_str(out.shape));
  for (size_t r = 0; r < rows.size(); ++r) {
    const SampledToken t = choose_token({logits.as<float>() + r * vocab, size_t(vocab)}, rows[r]);
    out.as<float>()[2 * r] = float(t.token);
    out.as<float>()[2 * r + 1] = t.logprob;
  }
}

}  // namespace lmd
