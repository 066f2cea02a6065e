// KV-cache quantization: online int8/int4 and static int8 round trips, attention over a quantized cache
// against the float one, perplexity cost on a real model, calibrate statistics against values computed
// here from the weights, and kv_qparams against its formula.
#include <cmath>
#include <random>

#include "expect_error.h"
#include "lmd/core/checkpoint.h"
#include "lmd/core/error.h"
#include "lmd/core/tokenizer.h"
#include "lmd/engine/block_pool.h"
#include "lmd/engine/cpu_backend.h"
#include "lmd/engine/kv_quant.h"
#include "lmd/engine/model.h"
#include "lmd/quant/calib_data.h"
#include "lmd/quant/calibrate.h"
#include "lmd/quant/kv_qparams.h"
#include "lmd/quant/perplexity.h"
#include "test_support.h"

using namespace lmd;

namespace {

std::vector<float> random_values(size_t n, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// One sequence of `num_new` tokens after `context` cached ones, in blocks given out of order.
BatchLayout one_sequence(int context, int num_new, int num_blocks) {
  BatchLayout batch;
  SeqSlice s{0, num_new, context, {}};
  for (int b = num_blocks - 1; b >= 0; --b) s.blocks.push_back(b);
  batch.seqs.push_back(s);
  return batch;
}

}  // namespace

TEST_CASE("kv quant: online int8/int4 round trip is within half a step per element", "[kv]") {
  const int hd = 64;
  for (int bits : {8, 4}) {
    for (uint32_t seed = 0; seed < 20; ++seed) {
      const float lo = -3.f * (seed % 5 + 1), hi = 0.5f + seed;
      const std::vector<float> x = random_values(hd, lo, hi, seed);
      std::vector<uint8_t> q(kv_row_bytes(hd, bits));
      uint16_t params[2];
      quantize_kv_row(x.data(), hd, bits, q.data(), params);
      std::vector<float> y(hd);
      dequantize_kv_row(q.data(), params, hd, bits, y.data());
      const float scale = f16_to_f32(params[0]);
      // Half a quantization step, plus the fp16 rounding of zero (which may clamp the minimum).
      const float bound = scale / 2 + std::fabs(lo) * 1e-3f + 1e-6f;
      for (int d = 0; d < hd; ++d) REQUIRE(std::fabs(y[d] - x[d]) <= bound);
    }
  }
}

TEST_CASE("kv quant: static int8 round trip, signed storage, clamping outside the range", "[kv]") {
  const float lo = -2.f, hi = 6.f, zero = (lo + hi) / 2, scale = (hi - lo) / 255;
  const std::vector<float> x = random_values(256, lo, hi, 7);
  std::vector<int8_t> q(x.size());
  quantize_kv_row_static(x.data(), int(x.size()), scale, zero, q.data());
  std::vector<float> y(x.size());
  dequantize_kv_row_static(q.data(), int(x.size()), scale, zero, y.data());
  for (size_t i = 0; i < x.size(); ++i) REQUIRE(std::fabs(y[i] - x[i]) <= scale / 2 * 1.0001f);
  // The range ends sit at +-127.5 steps: they round to the last codes or clamp to them.
  const float extremes[] = {lo, hi, hi + 10, lo - 10};
  int8_t qe[4];
  quantize_kv_row_static(extremes, 4, scale, zero, qe);
  CHECK(qe[0] <= -127);
  CHECK(qe[1] == 127);
  CHECK(qe[2] == 127);
  CHECK(qe[3] == -128);
}

TEST_CASE("kv quant: attention over int8/int4/static-int8 KV matches the float cache", "[kv]") {
  CpuBackend be(2);
  const int heads = 4, kvh = 2, hd = 64, block_len = 16, prefill = 40, total = prefill + 1;
  const int nblocks = blocks_for(total, block_len);
  ModelSpec spec;
  spec.head_dim = hd;
  const RopeConfig rope = RopeConfig::from_spec(spec);
  KvCacheLayout layout;
  layout.layers = 2;
  layout.kv_heads = kvh;
  layout.head_dim = hd;
  layout.block_len = block_len;
  layout.num_blocks = nblocks;
  const int64_t cols = int64_t(heads + 2 * kvh) * hd;
  // K values around an offset, as real keys have, so that the zero point matters.
  std::vector<float> all = random_values(size_t(total * cols), -2.f, 3.f, 11);

  // Runs prefill then one decode step at layer 1; returns both steps' attention outputs.
  auto run = [&](int bits, std::vector<float> static_params) {
    KvCacheLayout L = layout;
    L.quant_bits = bits;
    L.static_params = std::move(static_params);
    KvCacheStorage cache = be.alloc_kv_cache(L, DType::F32);
    std::vector<float> outs;
    for (auto [context, n] : {std::pair{0, prefill}, {prefill, 1}}) {
      DeviceTensor qkv = be.upload(
          HostTensor::from_f32({all.begin() + context * cols, all.begin() + (context + n) * cols}, {n, cols}),
          DType::F32);
      const BatchLayout batch = one_sequence(context, n, nblocks);
      be.rope_kv_write(qkv, batch, 1, heads, rope, cache);
      DeviceTensor out = be.alloc(DType::F32, {n, int64_t(heads) * hd});
      be.attention(qkv, batch, 1, heads, cache, out);
      const std::vector<float> o = be.download(out).to_f32();
      outs.insert(outs.end(), o.begin(), o.end());
    }
    return outs;
  };
  const std::vector<float> ref = run(0, {});
  const double e8 = test::rel_error(run(8, {}), ref), e4 = test::rel_error(run(4, {}), ref);
  // Static parameters from the range of the rotated keys and the values (|rope(x)| <= sqrt(2) max|x|).
  const float kmax = 3.f * std::sqrt(2.f);
  const float kscale = 2 * kmax / 255, vscale = 5.f / 255;
  std::vector<float> params;
  for (int l = 0; l < layout.layers; ++l) params.insert(params.end(), {kscale, 0.f, vscale, 0.5f});
  const double es = test::rel_error(run(8, params), ref);
  INFO("relative L2 error: int8 " << e8 << ", int4 " << e4 << ", static int8 " << es);
  // Uniform random K/V use the whole range of every row, the hardest case for a per-row int4 grid.
  CHECK(e8 < 1e-2);
  CHECK(e4 < 0.15);
  CHECK(es < 1.5e-2);
  CHECK(e8 < e4);
}

TEST_CASE("kv quant: perplexity cost of int8/int4 KV on wt2-llama-22m", "[kv][ppl]") {
  LMD_REQUIRE_ASSETS();
  const auto dir = test::model_dir("wt2-llama-22m");
  CpuBackend be;
  auto model = Model::load(dir, be);
  const Tokenizer tok = Tokenizer::load(dir);
  const auto text =
      load_dataset_text(dataset_file("wikitext2", "valid", (test::assets_dir() / "datasets").string()));
  // The first windows of the text are enough to see the cost, at ~2 s per window on the CPU backend.
  const std::vector<int> tokens = tok.encode(text.substr(0, 40000), true, false);
  constexpr int kWindows = 4, kSeqlen = 512;
  const double ref = perplexity(*model, tokens, kSeqlen, kWindows, 0).perplexity;
  const double p8 = perplexity(*model, tokens, kSeqlen, kWindows, 8).perplexity;
  const double p4 = perplexity(*model, tokens, kSeqlen, kWindows, 4).perplexity;
  WARN("wt2-llama-22m wikitext2 valid, " << kWindows << " x " << kSeqlen << " tokens: ppl float KV " << ref
                                         << ", int8 KV " << p8 << " (" << 100 * (p8 / ref - 1)
                                         << "%), int4 KV " << p4 << " (" << 100 * (p4 / ref - 1) << "%)");
  CHECK(std::fabs(p8 / ref - 1) < 0.005);
  CHECK(std::fabs(p4 / ref - 1) < 0.03);
}

TEST_CASE("kv quant: calibrate statistics match values computed from the weights", "[kv][calibrate]") {
  LMD_REQUIRE_ASSETS();
  const auto dir = test::model_dir("stories260K");
  CpuBackend be(2);
  auto model = Model::load(dir, be);
  const ModelSpec& spec = model->spec();
  const std::vector<std::vector<int>> windows = {{1, 403, 261, 378, 303, 270, 280, 501, 46},
                                                 {1, 66, 285, 266, 37, 411, 267, 302, 360, 409, 13, 29}};
  int calls = 0;
  const CalibrationStats stats = calibrate(*model, windows, [&](int, int) { ++calls; });
  CHECK(calls == 2);
  CHECK(stats.tokens == 21);

  // Layer 0 by hand: normed = rmsnorm(embed[id]) * w; k = rope(normed Wk^T) per position; v = normed Wv^T.
  const CheckpointWeights w = load_checkpoint(dir, spec);
  const std::vector<float> embed = w.embed.to_f32(), norm = w.layers[0].attn_norm.to_f32();
  const std::vector<float> wk = w.layers[0].k.weight.to_f32(), wv = w.layers[0].v.weight.to_f32();
  const int H = spec.hidden, kv = spec.kv_size(), hd = spec.head_dim;
  ChannelStats normed_stats, k_stats, v_stats;
  for (const auto& ids : windows) {
    for (size_t pos = 0; pos < ids.size(); ++pos) {
      std::vector<float> x(embed.begin() + int64_t(ids[pos]) * H, embed.begin() + int64_t(ids[pos] + 1) * H);
      double ss = 0;
      for (float v : x) ss += double(v) * v;
      const double inv = 1 / std::sqrt(ss / H + spec.norm_eps);
      for (int i = 0; i < H; ++i) x[i] = float(x[i] * inv) * norm[i];
      std::vector<float> k(kv), v(kv);
      for (int o = 0; o < kv; ++o) {
        double sk = 0, sv = 0;
        for (int i = 0; i < H; ++i)
          sk += double(x[i]) * wk[int64_t(o) * H + i], sv += double(x[i]) * wv[int64_t(o) * H + i];
        k[o] = float(sk), v[o] = float(sv);
      }
      for (int g = 0; g < spec.kv_heads; ++g) {
        float* head = k.data() + g * hd;
        for (int f = 0; f < hd / 2; ++f) {
          const double angle = double(pos) * std::pow(spec.rope_theta, -2.0 * f / hd);
          const double a = head[f], b = head[f + hd / 2];
          head[f] = float(a * std::cos(angle) - b * std::sin(angle));
          head[f + hd / 2] = float(b * std::cos(angle) + a * std::sin(angle));
        }
      }
      normed_stats.add(x.data(), 1, H, 0, H);
      k_stats.add(k.data(), 1, kv, 0, kv);
      v_stats.add(v.data(), 1, kv, 0, kv);
    }
  }
  auto close = [](const std::vector<float>& a, const std::vector<float>& b) {
    REQUIRE(a.size() == b.size());
    for (size_t i = 0; i < a.size(); ++i) REQUIRE(std::fabs(a[i] - b[i]) <= 1e-4f * (1 + std::fabs(b[i])));
  };
  const ChannelStats& got = stats.activations.at("layers.0.attention_norm.output");
  close(got.max, normed_stats.max);
  close(got.min, normed_stats.min);
  close(got.absmax, normed_stats.absmax);
  close(got.mean(), normed_stats.mean());
  close(got.absmean(), normed_stats.absmean());
  close(stats.keys[0].max, k_stats.max);
  close(stats.keys[0].min, k_stats.min);
  close(stats.keys[0].absmax, k_stats.absmax);
  close(stats.values[0].max, v_stats.max);
  close(stats.values[0].min, v_stats.min);

  // Every linear's input and output, every norm, every layer.
  for (const auto& [linear, input] : calibration_linear_inputs(spec.layers)) {
    REQUIRE(stats.activations.count(input) == 1);
    REQUIRE(stats.activations.count(linear + ".output") == 1);
  }
  CHECK(stats.activations.at("layers.4.feed_forward.w2.input").max.size() == size_t(spec.intermediate));
  CHECK(stats.activations.count("norm.output") == 1);

  // Saved and read back.
  const auto work = std::filesystem::temp_directory_path() / "lmd_test_calibrate";
  std::filesystem::remove_all(work);
  save_calibration(stats, {dir.string(), "test", 2, 12}, work);
  const KvCalibration back = load_kv_calibration(work);
  CHECK(back.layers == spec.layers);
  CHECK(back.kv_heads == spec.kv_heads);
  CHECK(back.k_max[3] == stats.keys[3].max);
  CHECK(back.v_min[4] == stats.values[4].min);
  CHECK(std::filesystem::exists(work / "calib_stats.json"));

  // Static int8 parameters from these statistics keep the logits close to the float cache's.
  const auto params = compute_kv_qparams(back, 8, false, 1)[0];
  std::vector<float> flat;
  for (const auto& p : params) flat.insert(flat.end(), p.begin(), p.end());
  auto logits = [&](int bits, const std::vector<float>& static_params) {
    KvCacheLayout L = model->kv_layout(1, 64, bits);
    L.static_params = static_params;
    KvCacheStorage cache = be.alloc_kv_cache(L, DType::F32);
    return model->forward(windows[1], one_sequence(0, int(windows[1].size()), 1), cache, true);
  };
  const std::vector<float> ref = logits(0, {});
  const double err = test::rel_error(logits(8, flat), ref), online = test::rel_error(logits(8, {}), ref);
  INFO("logits relative error: static int8 KV " << err << ", online int8 KV " << online);
  // One (scale, zero) per layer must cover every head and channel, so it is coarser than per-row int8.
  CHECK(err < 6e-2);
  CHECK(online < 3e-2);
  std::filesystem::remove_all(work);
}

TEST_CASE("kv quant: kv_qparams follows the formula per layer and TP rank", "[kv]") {
  KvCalibration s;
  s.layers = 2;
  s.kv_heads = 4;
  s.head_dim = 2;
  for (int l = 0; l < 2; ++l) {
    // Channel c of layer l: min -(c+1) - l, max 2(c+1) + l.
    std::vector<float> mn, mx, am;
    for (int c = 0; c < 8; ++c) {
      mn.push_back(-(c + 1.f) - l);
      mx.push_back(2 * (c + 1.f) + l);
      am.push_back(std::max(-mn.back(), mx.back()));
    }
    s.k_min.push_back(mn), s.k_max.push_back(mx), s.k_absmax.push_back(am);
    for (float& v : mx) v *= 3;
    for (float& v : am) v *= 3;
    s.v_min.push_back(mn), s.v_max.push_back(mx), s.v_absmax.push_back(am);
  }
  const auto one = compute_kv_qparams(s, 8, false, 1);
  REQUIRE(one.size() == 1);
  REQUIRE(one[0].size() == 2);
  // Layer 1, one rank: K min -9, max 17; V min -9, max 51.
  CHECK(one[0][1][0] == Approx(26.f / 255));
  CHECK(one[0][1][1] == Approx(4.f));
  CHECK(one[0][1][2] == Approx(60.f / 255));
  CHECK(one[0][1][3] == Approx(21.f));
  // Two ranks: rank 0 holds heads 0-1 (channels 0-3), rank 1 heads 2-3 (channels 4-7). Layer 0:
  // rank 0 K min -4 max 8; rank 1 K min -8 max 16.
  const auto two = compute_kv_qparams(s, 8, false, 2);
  CHECK(two[0][0][0] == Approx(12.f / 255));
  CHECK(two[0][0][1] == Approx(2.f));
  CHECK(two[1][0][0] == Approx(24.f / 255));
  CHECK(two[1][0][1] == Approx(4.f));
  // Symmetric: zero 0, scale absmax / 127.
  const auto sym = compute_kv_qparams(s, 8, true, 1);
  CHECK(sym[0][0][0] == Approx(16.f / 127));
  CHECK(sym[0][0][1] == 0.f);
  CHECK(sym[0][0][2] == Approx(48.f / 127));
  CHECK_ERROR(Error, compute_kv_qparams(s, 4, false, 1), "--kv-bits 4", "only --kv-bits 8");
  CHECK_ERROR(Error, compute_kv_qparams(s, 8, false, 3), "--num-tp 3", "4 KV heads");
  CHECK_ERROR(Error, load_kv_calibration("/nonexistent-work-dir"), "calib_stats.json", "lmd lite calibrate");
}
