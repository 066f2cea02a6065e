// Running one decoder layer over the calibration activations and observing its linears' inputs.
#include <algorithm>
#include <cmath>

#include "awq_internal.h"
#include "lmd/core/error.h"
#include "lmd/engine/block_pool.h"
#include "lmd/engine/rope.h"
#include "lmd/quant/awq.h"

namespace lmd {
namespace {

FloatLinear float_linear(const LinearWeight& w, const char* what) {
  if (w.is_awq())
    fail("the model is already AWQ-quantized (", what, " is int4); auto_awq needs 16-bit weights");
  FloatLinear f;
  f.out = w.out_features();
  f.in = w.in_features();
  f.weight = w.weight.to_f32();
  if (!w.bias.empty()) f.bias = w.bias.to_f32();
  return f;
}

void record(const HostTensor& t, int64_t first_row, int64_t stride, InputRecord& rec) {
  const std::vector<float> x = t.to_f32();
  const int64_t channels = t.dim(-1), n = t.numel() / channels;
  rec.channels = channels;
  rec.stats.add(x.data(), n, channels);
  if (stride <= 0) return;
  for (int64_t r = 0; r < n; ++r) {
    if ((first_row + r) % stride == 0)
      rec.rows.insert(rec.rows.end(), x.begin() + r * channels, x.begin() + (r + 1) * channels);
  }
}

}  // namespace

namespace awq_detail {

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

FloatLayer to_float_layer(const LayerWeights& w) {
  FloatLayer f;
  f.attn_norm = w.attn_norm.to_f32();
  f.ffn_norm = w.ffn_norm.to_f32();
  f.q = float_linear(w.q, "q");
  f.k = float_linear(w.k, "k");
  f.v = float_linear(w.v, "v");
  f.o = float_linear(w.o, "o");
  f.gate = float_linear(w.gate, "gate");
  f.up = float_linear(w.up, "up");
  f.down = float_linear(w.down, "down");
  return f;
}

void run_float_layer(Backend& be, const ModelSpec& spec, const FloatLayer& layer, int seqlen, int batch,
                     std::vector<float>& hidden, LayerInputs* inputs, int64_t row_stride) {
  const int64_t H = spec.hidden, total = int64_t(hidden.size()) / H;
  if (seqlen <= 0 || total % seqlen != 0)
    fail("run_float_layer: ", total, " hidden rows are not whole windows of ", seqlen, " tokens");
  const int windows = int(total / seqlen);
  batch = std::clamp(batch, 1, windows);
  const DType act = be.activation_dtype(spec.dtype);
  const DeviceTensor attn_norm = be.upload(HostTensor::from_f32(layer.attn_norm, {H}), act);
  const DeviceTensor ffn_norm = be.upload(HostTensor::from_f32(layer.ffn_norm, {H}), act);
  const DeviceLinear qkv = be.prepare_linear(awq_detail::fused_dense({&layer.q, &layer.k, &layer.v}), act);
  const DeviceLinear o = be.prepare_linear(awq_detail::fused_dense({&layer.o}), act);
  const DeviceLinear gate_up = be.prepare_linear(awq_detail::fused_dense({&layer.gate, &layer.up}), act);
  const DeviceLinear down = be.prepare_linear(awq_detail::fused_dense({&layer.down}), act);

  // A one-layer KV cache for `batch` windows; every step starts each window from position 0.
  KvCacheLayout layout;
  layout.layers = 1;
  layout.kv_heads = spec.kv_heads;
  layout.head_dim = spec.head_dim;
  const int blocks_per_window = blocks_for(seqlen, layout.block_len);
  layout.num_blocks = batch * blocks_per_window;
  KvCacheStorage cache = be.alloc_kv_cache(layout, act);
  const RopeConfig rope = RopeConfig::from_spec(spec);

  for (int w0 = 0; w0 < windows; w0 += batch) {
    const int nw = std::min(batch, windows - w0);
    const int64_t T = int64_t(nw) * seqlen, row0 = int64_t(w0) * seqlen;
    BatchLayout layout_b;
    for (int b = 0; b < nw; ++b) {
      SeqSlice s{b * seqlen, seqlen, 0, {}};
      for (int i = 0; i < blocks_per_window; ++i) s.blocks.push_back(b * blocks_per_window + i);
      layout_b.seqs.push_back(std::move(s));
    }
    float* x_host = hidden.data() + row0 * H;
    DeviceTensor x = be.upload(HostTensor::view(DType::F32, {T, H}, x_host, nullptr), act);
    DeviceTensor normed = be.alloc(act, {T, H});
    DeviceTensor qkv_out = be.alloc(act, {T, qkv.out_features});
    DeviceTensor attn = be.alloc(act, {T, spec.q_size()});
    DeviceTensor proj = be.alloc(act, {T, H});
    DeviceTensor gu = be.alloc(act, {T, gate_up.out_features});
    DeviceTensor mlp = be.alloc(act, {T, spec.intermediate});

    be.rmsnorm(x, attn_norm, spec.norm_eps, normed);
    if (inputs) record(be.download(normed), row0, row_stride, inputs->qkv);
    be.linear(normed, qkv, qkv_out);
    be.rope_kv_write(qkv_out, layout_b, 0, spec.heads, rope, cache);
    be.attention(qkv_out, layout_b, 0, spec.heads, cache, attn);
    if (inputs) record(be.download(attn), row0, row_stride, inputs->o);
    be.linear(attn, o, proj);
    be.add_rmsnorm(x, proj, ffn_norm, spec.norm_eps, normed);  // x is now the residual after attention
    if (inputs) record(be.download(normed), row0, row_stride, inputs->gate_up);
    be.linear(normed, gate_up, gu);
    be.silu_mul(gu, mlp);
    if (inputs) record(be.download(mlp), row0, row_stride, inputs->down);
    be.linear(mlp, down, proj);

    const std::vector<float> residual = be.download(x).to_f32(), out = be.download(proj).to_f32();
    for (int64_t i = 0; i < T * H; ++i) x_host[i] = residual[i] + out[i];
  }
}

}  // namespace lmd
