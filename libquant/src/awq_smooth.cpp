// AWQ smoothing (BRIEF §5): which pairs exist per architecture, the per-channel scales (default ratio or
// the grid search on the quantized block output), and folding them into producer and consumers.
#include <algorithm>
#include <cmath>
#include <limits>

#include "awq_internal.h"
#include "lmd/core/error.h"
#include "lmd/quant/awq.h"

namespace lmd {
namespace {

constexpr int kGridPoints = 20;

std::vector<const FloatLinear*> const_ptrs(const std::vector<FloatLinear*>& v) {
  return {v.begin(), v.end()};
}

// The block the search judges: the consumers' concatenated output, or the whole MLP for gate, up.
std::vector<float> block_output(Backend& be, const SmoothPair& pair,
                                const std::vector<const FloatLinear*>& consumers,
                                const std::vector<float>& rows) {
  const DType act = be.activation_dtype(DType::F16);
  const int64_t in = consumers[0]->in, n = int64_t(rows.size()) / in;
  const DeviceTensor x = be.upload(HostTensor::view(DType::F32, {n, in}, rows.data(), nullptr), act);
  const DeviceLinear lin = be.prepare_linear(awq_detail::fused_dense(consumers), act);
  DeviceTensor y = be.alloc(act, {n, lin.out_features});
  be.linear(x, lin, y);
  if (!pair.mlp_down) return be.download(y).to_f32();
  DeviceTensor h = be.alloc(act, {n, lin.out_features / 2});
  be.silu_mul(y, h);
  const DeviceLinear down = be.prepare_linear(awq_detail::fused_dense({pair.mlp_down}), act);
  DeviceTensor z = be.alloc(act, {n, down.out_features});
  be.linear(h, down, z);
  return be.download(z).to_f32();
}

// Multiplies (or divides) every row of `m` [rows, s.size()] by s, element-wise, on `pool`'s threads.
void scale_columns(std::vector<float>& m, const std::vector<float>& s, bool divide, ThreadPool* pool) {
  const int64_t cols = int64_t(s.size()), rows = int64_t(m.size()) / cols;
  awq_detail::for_chunks(pool, rows, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      float* row = m.data() + r * cols;
      if (divide) {
        for (int64_t i = 0; i < cols; ++i) row[i] /= s[i];
      } else {
        for (int64_t i = 0; i < cols; ++i) row[i] *= s[i];
      }
    }
  });
}

double block_error(Backend& be, const SmoothPair& pair, const std::vector<float>& s, int group,
                   const std::vector<float>& reference, ThreadPool* pool) {
  // quantize(W * s) applied to x / s: the smoothed layer as the quantized checkpoint will compute it.
  std::vector<FloatLinear> quantized;
  for (const FloatLinear* c : pair.consumers) {
    FloatLinear q = *c;
    scale_columns(q.weight, s, /*divide=*/false, pool);
    q.weight = fake_quantize_int4(q, group, pool);
    quantized.push_back(std::move(q));
  }
  std::vector<float> x = pair.input->rows;
  scale_columns(x, s, /*divide=*/true, pool);
  std::vector<const FloatLinear*> ptrs;
  for (const FloatLinear& q : quantized) ptrs.push_back(&q);
  const std::vector<float> y = block_output(be, pair, ptrs, x);
  double sum = 0;
  for (size_t j = 0; j < y.size(); ++j) sum += (double(y[j]) - reference[j]) * (double(y[j]) - reference[j]);
  return sum / double(std::max<size_t>(y.size(), 1));
}

void require_rows(const SmoothPair& pair) {
  if (!pair.input || pair.input->row_count() == 0)
    fail("AWQ pair ", pair.name, ": no calibration rows were recorded for its input");
}

}  // namespace

std::vector<SmoothPair> smooth_pairs(const ModelSpec& spec, FloatLayer& L, const LayerInputs& in) {
  std::vector<SmoothPair> pairs;
  pairs.push_back({"input norm -> q,k,v", &L.attn_norm, nullptr, {&L.q, &L.k, &L.v}, nullptr, &in.qkv});
  // With GQA a value channel feeds several heads' o columns, so no single scale per channel exists;
  // InternLM2's v rows live inside the fused wqkv, which LMDeploy leaves to the input norm pair.
  if (spec.arch != Arch::InternLM2 && spec.kv_heads == spec.heads)
    pairs.push_back({"v -> o", nullptr, &L.v, {&L.o}, nullptr, &in.o});
  pairs.push_back(
      {"post-attention norm -> gate,up", &L.ffn_norm, nullptr, {&L.gate, &L.up}, &L.down, &in.gate_up});
  pairs.push_back({"up -> down", nullptr, &L.up, {&L.down}, nullptr, &in.down});
  return pairs;
}

std::vector<float> weight_channel_scale(const std::vector<FloatLinear*>& consumers, int group) {
  const int64_t in = consumers.at(0)->in;
  std::vector<double> sum(in, 0.0);
  int64_t rows = 0;
  for (const FloatLinear* c : consumers) {
    for (int64_t o = 0; o < c->out; ++o) {
      const float* row = c->weight.data() + o * in;
      for (int64_t g = 0; g < in; g += group) {
        float gmax = 0;
        for (int64_t i = g; i < g + group; ++i) gmax = std::max(gmax, std::fabs(row[i]));
        if (gmax > 0)
          for (int64_t i = g; i < g + group; ++i) sum[i] += std::fabs(row[i]) / gmax;
      }
    }
    rows += c->out;
  }
  std::vector<float> w(in);
  for (int64_t i = 0; i < in; ++i) w[i] = float(sum[i] / double(rows));
  return w;
}

std::vector<float> smooth_scales(const std::vector<float>& act, const std::vector<float>& weight,
                                 double ratio) {
  std::vector<float> s(act.size());
  float lo = std::numeric_limits<float>::max(), hi = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const double v = std::pow(double(act[i]), ratio) / (std::pow(double(weight[i]), 1.0 - ratio) + 1e-4);
    s[i] = float(std::max(v, 1e-4));
    lo = std::min(lo, s[i]);
    hi = std::max(hi, s[i]);
  }
  // Centring the scales around 1 keeps the folded norm weights and the activations in 16-bit range.
  const float norm = std::sqrt(lo * hi);
  for (float& v : s) v /= norm;
  return s;
}

std::vector<float> default_scales(const SmoothPair& pair, int group) {
  return smooth_scales(pair.input->stats.absmax, weight_channel_scale(pair.consumers, group), 0.5);
}

double quantized_block_error(Backend& be, const SmoothPair& pair, const std::vector<float>& s, int group,
                             ThreadPool* pool) {
  require_rows(pair);
  const std::vector<float> reference = block_output(be, pair, const_ptrs(pair.consumers), pair.input->rows);
  return block_error(be, pair, s, group, reference, pool);
}

ScaleSearch search_scales(Backend& be, const SmoothPair& pair, int group, ThreadPool* pool) {
  require_rows(pair);
  const std::vector<float> reference = block_output(be, pair, const_ptrs(pair.consumers), pair.input->rows);
  const std::vector<float> act = pair.input->stats.absmean();
  const std::vector<float> weight = weight_channel_scale(pair.consumers, group);
  ScaleSearch best;
  double best_error = std::numeric_limits<double>::infinity();
  for (int i = 0; i < kGridPoints; ++i) {
    const double ratio = double(i) / kGridPoints;
    std::vector<float> s = smooth_scales(act, weight, ratio);
    const double err = block_error(be, pair, s, group, reference, pool);
    best.errors.push_back(err);
    if (err < best_error) {
      best_error = err;
      best.ratio = ratio;
      best.scales = std::move(s);
    }
  }
  if (best.scales.empty())
    fail("AWQ pair ", pair.name, ": every ratio of the scale search gave a non-finite error");
  return best;
}

void apply_smoothing(const SmoothPair& pair, const std::vector<float>& s, ThreadPool* pool) {
  const int64_t n = int64_t(s.size());
  for (const FloatLinear* c : pair.consumers)
    if (c->in != n) fail("AWQ pair ", pair.name, ": ", n, " scales for a consumer with ", c->in, " inputs");
  if (pair.norm) {
    if (int64_t(pair.norm->size()) != n) fail("AWQ pair ", pair.name, ": norm size differs from the scales");
    for (int64_t i = 0; i < n; ++i) (*pair.norm)[i] /= s[i];
  } else {
    FloatLinear& p = *pair.linear;
    if (p.out != n) fail("AWQ pair ", pair.name, ": producer has ", p.out, " outputs for ", n, " scales");
    for (int64_t o = 0; o < n; ++o) {
      for (int64_t i = 0; i < p.in; ++i) p.weight[o * p.in + i] /= s[o];
      if (!p.bias.empty()) p.bias[o] /= s[o];
    }
  }
  for (FloatLinear* c : pair.consumers) scale_columns(c->weight, s, /*divide=*/false, pool);
}

}  // namespace lmd
