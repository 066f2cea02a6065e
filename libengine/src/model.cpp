#include "lmd/engine/model.h"

#include <cstring>

#include "lmd/core/error.h"

namespace lmd {
namespace {

// Concatenates 2-D tensors along dim `axis` (0: rows, 1: columns) into an owned tensor.
HostTensor concat(const std::vector<const HostTensor*>& parts, int axis) {
  const HostTensor& first = *parts[0];
  const int64_t rows = first.dim(0);
  int64_t total = 0;
  for (const HostTensor* p : parts) {
    if (p->dtype() != first.dtype())
      fail("cannot fuse tensors of dtypes ", dtype_name(first.dtype()), " and ", dtype_name(p->dtype()));
    total += p->dim(axis);
  }
  const size_t esize = dtype_size(first.dtype());
  if (first.ndim() == 1) {
    HostTensor out(first.dtype(), {total});
    size_t off = 0;
    for (const HostTensor* p : parts) {
      std::memcpy(static_cast<uint8_t*>(out.mutable_data()) + off, p->data(), p->nbytes());
      off += p->nbytes();
    }
    return out;
  }
  Shape shape = axis == 0 ? Shape{total, first.dim(1)} : Shape{rows, total};
  HostTensor out(first.dtype(), shape);
  auto* dst = static_cast<uint8_t*>(out.mutable_data());
  if (axis == 0) {
    for (const HostTensor* p : parts) {
      std::memcpy(dst, p->data(), p->nbytes());
      dst += p->nbytes();
    }
  } else {
    const size_t out_row = total * esize;
    size_t col = 0;
    for (const HostTensor* p : parts) {
      const size_t part_row = p->dim(1) * esize;
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(dst + r * out_row + col, static_cast<const uint8_t*>(p->data()) + r * part_row, part_row);
      col += part_row;
    }
  }
  return out;
}

// One linear whose output is the concatenation of the parts' outputs (q|k|v, gate|up).
LinearWeight fuse_linears(const std::vector<const LinearWeight*>& parts) {
  LinearWeight fused;
  auto gather = [&](auto member) {
    std::vector<const HostTensor*> v;
    for (const LinearWeight* p : parts) v.push_back(&(p->*member));
    return v;
  };
  if (parts[0]->is_awq()) {
    // AWQ tensors keep the output dimension in their columns.
    fused.qweight = concat(gather(&LinearWeight::qweight), 1);
    fused.qzeros = concat(gather(&LinearWeight::qzeros), 1);
    fused.scales = concat(gather(&LinearWeight::scales), 1);
  } else {
    fused.weight = concat(gather(&LinearWeight::weight), 0);
  }
  bool any_bias = false;
  for (const LinearWeight* p : parts) any_bias |= !p->bias.empty();
  if (any_bias) {
    std::vector<HostTensor> biases;
    for (const LinearWeight* p : parts)
      biases.push_back(p->bias.empty() ? HostTensor(DType::F32, {p->out_features()})
                                       : p->bias.to(DType::F32));
    std::vector<const HostTensor*> ptrs;
    for (const HostTensor& b : biases) ptrs.push_back(&b);
    fused.bias = concat(ptrs, 0);
  }
  return fused;
}

size_t linear_bytes(const DeviceLinear& l) {
  return l.weight.nbytes() + l.qweight.nbytes() + l.qzeros.nbytes() + l.scales.nbytes() + l.bias.nbytes();
}

}  // namespace

Model::Model(const ModelSpec& spec, const CheckpointWeights& w, Backend& backend,
             const std::function<void(int, int)>& progress)
    : spec_(spec), backend_(backend), act_(backend.activation_dtype(spec.dtype)) {
  embed_ = backend_.upload(w.embed, backend_.kind() == DeviceKind::CPU ? w.embed.dtype() : act_);
  final_norm_ = backend_.upload(w.final_norm, act_);
  LinearWeight head;
  head.weight = w.lm_head;
  lm_head_ = backend_.prepare_linear(head, act_);
  weight_bytes_ = embed_.nbytes() + final_norm_.nbytes() + (spec.tie_embeddings ? 0 : linear_bytes(lm_head_));
  for (int l = 0; l < spec.layers; ++l) {
    const LayerWeights& src = w.layers[l];
    ModelLayer layer;
    layer.attn_norm = backend_.upload(src.attn_norm, act_);
    layer.ffn_norm = backend_.upload(src.ffn_norm, act_);
    layer.qkv = backend_.prepare_linear(fuse_linears({&src.q, &src.k, &src.v}), act_);
    layer.o = backend_.prepare_linear(src.o, act_);
    layer.gate_up = backend_.prepare_linear(fuse_linears({&src.gate, &src.up}), act_);
    layer.down = backend_.prepare_linear(src.down, act_);
    weight_bytes_ += layer.attn_norm.nbytes() + layer.ffn_norm.nbytes() + linear_bytes(layer.qkv) +
                     linear_bytes(layer.o) + linear_bytes(layer.gate_up) + linear_bytes(layer.down);
    layers_.push_back(std::move(layer));
    if (progress) progress(l + 1, spec.layers);
  }
}

std::unique_ptr<Model> Model::load(const std::filesystem::path& dir, Backend& backend,
                                   const std::function<void(int, int)>& progress) {
  const ModelSpec spec = load_model_spec(dir);
  const CheckpointWeights weights = load_checkpoint(dir, spec);
  return std::make_unique<Model>(spec, weights, backend, progress);
}

KvCacheLayout Model::kv_layout(int num_blocks, int block_len, int quant_bits) const {
  KvCacheLayout L;
  L.layers = spec_.layers;
  L.kv_heads = spec_.kv_heads;
  L.head_dim = spec_.head_dim;
  L.block_len = block_len;
  L.num_blocks = num_blocks;
  L.quant_bits = quant_bits;
  return L;
}

std::vector<float> Model::forward(const std::vector<int>& ids, const BatchLayout& batch,
                                  KvCacheStorage& cache, bool all_logits) {
  return backend_.download(run_step(ids, batch, cache, all_logits, false)).to_f32();
}

namespace {

// (token, logprob) pairs from the fp32 [rows, 2] output of Backend::greedy and Backend::sample.
std::vector<std::pair<int, float>> token_pairs(const std::vector<float>& rows) {
  std::vector<std::pair<int, float>> out;
  for (size_t i = 0; i + 1 < rows.size(); i += 2) out.emplace_back(int(rows[i]), rows[i + 1]);
  return out;
}

}  // namespace

std::vector<std::pair<int, float>> Model::forward_greedy(const std::vector<int>& ids,
                                                         const BatchLayout& batch, KvCacheStorage& cache) {
  return token_pairs(backend_.download(run_step(ids, batch, cache, false, true)).to_f32());
}

std::vector<std::pair<int, float>> Model::forward_sample(const std::vector<int>& ids,
                                                         const BatchLayout& batch, KvCacheStorage& cache,
                                                         const std::vector<SampleRow>& rows) {
  if (rows.size() != batch.seqs.size())
    fail("forward_sample: ", rows.size(), " sampling rows for ", batch.seqs.size(), " sequences");
  return token_pairs(backend_.download(run_step(ids, batch, cache, false, false, &rows)).to_f32());
}

DeviceTensor Model::run_step(const std::vector<int>& ids, const BatchLayout& batch, KvCacheStorage& cache,
                             bool all_logits, bool greedy, const std::vector<SampleRow>* sample) {
  const int64_t T = static_cast<int64_t>(ids.size());
  if (T != batch.num_tokens()) fail("forward: ", T, " token ids for a batch of ", batch.num_tokens());
  Backend& be = backend_;
  // Observers read activations between ops, which a replayed graph does not run one by one.
  bool decode = !all_logits && !observer_ && T > 0;
  for (const SeqSlice& s : batch.seqs) decode &= s.num_new == 1;
  // Abandons the graph step when an op throws, so that the backend's stream is usable again.
  struct GraphStep {
    Backend& be;
    bool active;
    ~GraphStep() {
      if (active) be.end_graph_step(false);
    }
  } graph{be, decode && be.begin_graph_step(batch)};
  const int H = spec_.hidden, heads = spec_.heads;
  const int qkv_cols = spec_.q_size() + 2 * spec_.kv_size();
  DeviceTensor residual = be.alloc(act_, {T, H});
  DeviceTensor normed = be.alloc(act_, {T, H});
  DeviceTensor qkv = be.alloc(act_, {T, qkv_cols});
  DeviceTensor attn = be.alloc(act_, {T, spec_.q_size()});
  DeviceTensor proj = be.alloc(act_, {T, H});
  DeviceTensor gate_up = be.alloc(act_, {T, 2 * int64_t(spec_.intermediate)});
  DeviceTensor act = be.alloc(act_, {T, spec_.intermediate});
  const RopeConfig rope = RopeConfig::from_spec(spec_);

  auto observe = [&](int layer, const char* point, const DeviceTensor& t) {
    if (observer_) observer_(layer, point, t);
  };
  be.embedding(embed_, ids, residual);
  // Observers read the norms', the rotation's and the activation's outputs, which the fused ops need not
  // write.
  const bool fused = !observer_;
  for (int l = 0; l < spec_.layers; ++l) {
    const ModelLayer& layer = layers_[l];
    if (l == 0) {
      be.rmsnorm(residual, layer.attn_norm, spec_.norm_eps, normed);
      observe(l, "attention_norm", normed);
      be.linear(normed, layer.qkv, qkv);
    } else if (fused) {
      be.add_rmsnorm_linear(residual, proj, layer.attn_norm, spec_.norm_eps, layer.qkv, normed, qkv);
    } else {
      be.add_rmsnorm(residual, proj, layer.attn_norm, spec_.norm_eps, normed);
      observe(l, "attention_norm", normed);
      be.linear(normed, layer.qkv, qkv);
    }
    observe(l, "qkv", qkv);
    if (fused) {
      be.rope_kv_attention(qkv, batch, l, heads, rope, cache, attn);
    } else {
      be.rope_kv_write(qkv, batch, l, heads, rope, cache);
      observe(l, "qkv_rope", qkv);
      be.attention(qkv, batch, l, heads, cache, attn);
    }
    observe(l, "attention", attn);
    be.linear(attn, layer.o, proj);
    observe(l, "o", proj);
    if (fused) {
      be.add_rmsnorm_linear(residual, proj, layer.ffn_norm, spec_.norm_eps, layer.gate_up, normed, gate_up);
      be.silu_mul_linear(gate_up, layer.down, act, proj);
      continue;
    }
    be.add_rmsnorm(residual, proj, layer.ffn_norm, spec_.norm_eps, normed);
    observe(l, "ffn_norm", normed);
    be.linear(normed, layer.gate_up, gate_up);
    observe(l, "gate_up", gate_up);
    be.silu_mul(gate_up, act);
    observe(l, "act", act);
    be.linear(act, layer.down, proj);
    observe(l, "down", proj);
  }
  be.add_rmsnorm(residual, proj, final_norm_, spec_.norm_eps, normed);
  observe(-1, "norm", normed);

  std::vector<int> rows;
  if (all_logits) {
    for (int t = 0; t < T; ++t) rows.push_back(t);
  } else {
    for (const SeqSlice& s : batch.seqs) rows.push_back(s.token_offset + s.num_new - 1);
  }
  bool every_row = int64_t(rows.size()) == T;  // all logits, or a decode step
  for (size_t i = 0; i < rows.size() && every_row; ++i) every_row = rows[i] == int(i);
  DeviceTensor last = normed;
  if (!every_row) {
    last = be.alloc(act_, {int64_t(rows.size()), H});
    be.gather_rows(normed, rows, last);
  }
  // fp32 logits: in 16 bits the top two often round to one value and greedy choices flip.
  DeviceTensor result = be.alloc(DType::F32, {int64_t(rows.size()), spec_.vocab});
  be.linear(last, lm_head_, result);
  if (greedy) {
    DeviceTensor chosen = be.alloc(DType::F32, {int64_t(rows.size()), 2});
    be.greedy(result, chosen);
    result = chosen;
  }
  if (graph.active) {
    graph.active = false;
    if (!be.end_graph_step(true)) return run_step(ids, batch, cache, all_logits, greedy, sample);
  }
  if (sample) {
    DeviceTensor chosen = be.alloc(DType::F32, {int64_t(rows.size()), 2});
    be.sample(result, *sample, chosen);
    result = chosen;
  }
  return result;
}

}  // namespace lmd
