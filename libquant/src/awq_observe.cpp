// Running one decoder layer over the calibration activations and observing its linears' inputs.
#include <algorithm>
#include <bit>
#include <cmath>

#include "awq_internal.h"
#include "lmd/core/error.h"
#include "lmd/engine/block_pool.h"
#include "lmd/engine/rope.h"
#include "lmd/quant/awq.h"

namespace lmd {
namespace {

FloatLinear float_linear(const LinearWeight& w, const char* what, ThreadPool* pool) {
  if (w.is_awq())
    fail("the model is already AWQ-quantized (", what, " is int4); auto_awq needs 16-bit weights");
  FloatLinear f;
  f.out = w.out_features();
  f.in = w.in_features();
  f.weight = awq_detail::to_f32(w.weight, pool);
  if (!w.bias.empty()) f.bias = w.bias.to_f32();
  return f;
}

// `t` [tokens, channels] in the activation dtype, token 0 being calibration row `first_row`.
void record(const HostTensor& t, int64_t first_row, int64_t stride, InputRecord& rec, ThreadPool* pool) {
  const int64_t channels = t.dim(-1), n = t.numel() / channels;
  rec.channels = channels;
  rec.stats.add(t, pool);
  if (stride <= 0) return;
  for (int64_t r = (stride - first_row % stride) % stride; r < n; r += stride) {
    rec.rows.resize(rec.rows.size() + channels);
    awq_detail::copy_as_f32(t, r * channels, channels, rec.rows.data() + rec.rows.size() - channels);
  }
}

}  // namespace

namespace awq_detail {

void copy_as_f32(const HostTensor& t, int64_t begin, int64_t count, float* out) {
  switch (t.dtype()) {
    case DType::F32:
      std::copy_n(t.data_as<float>() + begin, count, out);
      break;
    case DType::F16:
      for (int64_t i = 0; i < count; ++i) out[i] = f16_to_f32(t.data_as<uint16_t>()[begin + i]);
      break;
    case DType::BF16:
      // Inline (bf16 is the top half of an fp32), so that the loop vectorises; equals bf16_to_f32.
      for (int64_t i = 0; i < count; ++i)
        out[i] = std::bit_cast<float>(uint32_t(t.data_as<uint16_t>()[begin + i]) << 16);
      break;
    default:
      fail("expected a float tensor, got ", dtype_name(t.dtype()));
  }
}

std::vector<float> to_f32(const HostTensor& t, ThreadPool* pool) {
  std::vector<float> out(t.numel());
  // Chunks of whole 4 KiB pages of output keep the threads off each other's cache lines.
  constexpr int64_t kChunk = 1024;
  const int64_t n = t.numel(), chunks = (n + kChunk - 1) / kChunk;
  for_chunks(pool, chunks, [&](int64_t first, int64_t last) {
    const int64_t begin = first * kChunk, end = std::min(n, last * kChunk);
    copy_as_f32(t, begin, end - begin, out.data() + begin);
  });
  return out;
}

LinearWeight fused_dense(const std::vector<const FloatLinear*>& parts) {
  std::vector<float> weight, bias;
  int64_t out = 0;
  bool any_bias = false;
  for (const FloatLinear* p : parts) any_bias |= !p->bias.empty();
  for (const FloatLinear* p : parts) {
    weight.insert(weight.end(), p->weight.begin(), p->weight.end());
    if (any_bias) {
      if (p->bias.empty()) {
        bias.resize(bias.size() + p->out, 0.f);
      } else {
        bias.insert(bias.end(), p->bias.begin(), p->bias.end());
      }
    }
    out += p->out;
  }
  LinearWeight w;
  w.weight = HostTensor::from_f32(weight, {out, parts[0]->in});
  if (any_bias) w.bias = HostTensor::from_f32(bias, {out});
  return w;
}

}  // namespace awq_detail

FloatLayer to_float_layer(const LayerWeights& w, ThreadPool* pool) {
  FloatLayer f;
  f.attn_norm = w.attn_norm.to_f32();
  f.ffn_norm = w.ffn_norm.to_f32();
  f.q = float_linear(w.q, "q", pool);
  f.k = float_linear(w.k, "k", pool);
  f.v = float_linear(w.v, "v", pool);
  f.o = float_linear(w.o, "o", pool);
  f.gate = float_linear(w.gate, "gate", pool);
  f.up = float_linear(w.up, "up", pool);
  f.down = float_linear(w.down, "down", pool);
  return f;
}

void CalibActivations::add_step(HostTensor x) {
  rows_ += x.dim(0);
  step_rows_.push_back(x.dim(0));
  if (on_device_) {
    device_.push_back(backend_->upload(x, dtype_));
    // An upload in the same dtype may still be reading x when it returns, and x is freed below.
    backend_->synchronize();
  } else {
    host_.push_back(x.dtype() == dtype_ ? std::move(x) : x.to(dtype_));
  }
}

DeviceTensor CalibActivations::load(int step) {
  return on_device_ ? device_.at(step) : backend_->upload(host_.at(step), dtype_);
}

void CalibActivations::store(int step, const DeviceTensor& x) {
  if (on_device_) {
    if (x.data != device_.at(step).data) device_[step] = x;
  } else {
    host_.at(step) = backend_->download(x);
  }
}

std::vector<float> CalibActivations::to_f32() {
  std::vector<float> all;
  for (int i = 0; i < steps(); ++i) {
    const std::vector<float> step = backend_->download(load(i)).to_f32();
    all.insert(all.end(), step.begin(), step.end());
  }
  return all;
}

void run_float_layer(Backend& be, const ModelSpec& spec, const FloatLayer& layer, int seqlen,
                     CalibActivations& hidden, LayerInputs* inputs, int64_t row_stride, ThreadPool* pool) {
  const int64_t H = spec.hidden;
  if (seqlen <= 0) fail("run_float_layer: window length ", seqlen, " is not positive");
  const DType act = be.activation_dtype(spec.dtype);
  const DeviceTensor attn_norm = be.upload(HostTensor::from_f32(layer.attn_norm, {H}), act);
  const DeviceTensor ffn_norm = be.upload(HostTensor::from_f32(layer.ffn_norm, {H}), act);
  const DeviceLinear qkv = be.prepare_linear(awq_detail::fused_dense({&layer.q, &layer.k, &layer.v}), act);
  const DeviceLinear o = be.prepare_linear(awq_detail::fused_dense({&layer.o}), act);
  const DeviceLinear gate_up = be.prepare_linear(awq_detail::fused_dense({&layer.gate, &layer.up}), act);
  const DeviceLinear down = be.prepare_linear(awq_detail::fused_dense({&layer.down}), act);

  int max_windows = 0;
  for (int i = 0; i < hidden.steps(); ++i)
    max_windows = std::max(max_windows, int(hidden.step_rows(i) / seqlen));
  // A one-layer KV cache for the largest step's windows; every step starts each window from position 0.
  KvCacheLayout layout;
  layout.layers = 1;
  layout.kv_heads = spec.kv_heads;
  layout.head_dim = spec.head_dim;
  const int blocks_per_window = blocks_for(seqlen, layout.block_len);
  layout.num_blocks = max_windows * blocks_per_window;
  KvCacheStorage cache = be.alloc_kv_cache(layout, act);
  const RopeConfig rope = RopeConfig::from_spec(spec);

  // Host copies of the observed inputs, one per observation point, reused by every step.
  HostTensor staged[4];
  auto observe = [&](const DeviceTensor& t, HostTensor& host, InputRecord& rec, int64_t row0) {
    be.download_into(t, host);
    record(host, row0, row_stride, rec, pool);
  };
  int64_t row0 = 0;
  for (int step = 0; step < hidden.steps(); ++step) {
    const int64_t T = hidden.step_rows(step);
    if (T % seqlen != 0) fail("run_float_layer: a step of ", T, " rows is not whole windows of ", seqlen);
    DeviceTensor x = hidden.load(step);
    const int nw = int(T / seqlen);
    BatchLayout layout_b;
    for (int b = 0; b < nw; ++b) {
      SeqSlice s{b * seqlen, seqlen, 0, {}};
      for (int i = 0; i < blocks_per_window; ++i) s.blocks.push_back(b * blocks_per_window + i);
      layout_b.seqs.push_back(std::move(s));
    }
    DeviceTensor normed = be.alloc(act, {T, H});
    DeviceTensor qkv_out = be.alloc(act, {T, qkv.out_features});
    DeviceTensor attn = be.alloc(act, {T, spec.q_size()});
    DeviceTensor proj = be.alloc(act, {T, H});
    DeviceTensor gu = be.alloc(act, {T, gate_up.out_features});
    DeviceTensor mlp = be.alloc(act, {T, spec.intermediate});

    be.rmsnorm(x, attn_norm, spec.norm_eps, normed);
    if (inputs) observe(normed, staged[0], inputs->qkv, row0);
    be.linear(normed, qkv, qkv_out);
    be.rope_kv_write(qkv_out, layout_b, 0, spec.heads, rope, cache);
    be.attention(qkv_out, layout_b, 0, spec.heads, cache, attn);
    if (inputs) observe(attn, staged[1], inputs->o, row0);
    be.linear(attn, o, proj);
    be.add_rmsnorm(x, proj, ffn_norm, spec.norm_eps, normed);  // x is now the residual after attention
    if (inputs) observe(normed, staged[2], inputs->gate_up, row0);
    be.linear(normed, gate_up, gu);
    be.silu_mul(gu, mlp);
    if (inputs) observe(mlp, staged[3], inputs->down, row0);
    be.linear(mlp, down, proj);
    // The backend has no plain add: the fused add + norm adds the MLP output into x (rounded once to
    // the activation dtype, as the next layer's input would be) and its norm output is not used.
    be.add_rmsnorm(x, proj, ffn_norm, spec.norm_eps, normed);
    hidden.store(step, x);
    row0 += T;
  }
}

}  // namespace lmd
