// AWQ building blocks: the gemm packing layout, int4 quantization error, the smoothing identity and the
// scale search on a layer with planted outlier channels.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "expect_error.h"
#include "lmd/core/awq_layout.h"
#include "lmd/core/error.h"
#include "lmd/engine/cpu_backend.h"
#include "lmd/quant/awq.h"
#include "test_support.h"

namespace {

using lmd::FloatLinear;

std::vector<float> normal(size_t n, float stddev, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

FloatLinear random_linear(int64_t out, int64_t in, uint64_t seed, float stddev = 0.05f) {
  FloatLinear l;
  l.out = out;
  l.in = in;
  l.weight = normal(size_t(out * in), stddev, seed);
  return l;
}

// An independent reading of the layout description (BRIEF §5): in the int32 at [r, c], bits 4i..4i+3
// hold the value of column 8c + order[i].
uint8_t nibble_at(const lmd::HostTensor& packed, int64_t r, int64_t col) {
  static const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  const int64_t words = packed.dim(1);
  uint32_t word;
  std::memcpy(&word, packed.data_as<char>() + (r * words + col / 8) * 4, 4);
  const int slot = int(std::find(order, order + 8, int(col % 8)) - order);
  return uint8_t((word >> (4 * slot)) & 15u);
}

// w[o][i] from the three AWQ tensors, decoded with nibble_at.
float decode(const lmd::Int4Linear& q, int64_t o, int64_t i, int group) {
  const int64_t g = i / group;
  uint16_t scale_bits;
  std::memcpy(&scale_bits, q.scales.data_as<char>() + (g * q.scales.dim(1) + o) * 2, 2);
  const float scale = lmd::f16_to_f32(scale_bits);
  return float(int(nibble_at(q.qweight, i, o)) - int(nibble_at(q.qzeros, g, o))) * scale;
}

// `x` [rows, hidden] as calibration activations of `step_rows` rows per step.
lmd::CalibActivations activations(lmd::Backend& be, const std::vector<float>& x, int64_t hidden,
                                  int64_t step_rows, bool on_device) {
  lmd::CalibActivations a(be, lmd::DType::F32, on_device);
  const int64_t rows = int64_t(x.size()) / hidden;
  for (int64_t r = 0; r < rows; r += step_rows) {
    const int64_t n = std::min(step_rows, rows - r);
    a.add_step(
        lmd::HostTensor::from_f32({x.begin() + r * hidden, x.begin() + (r + n) * hidden}, {n, hidden}));
  }
  return a;
}

}  // namespace

TEST_CASE("awq_pack matches an independent decoder of the gemm layout", "[awq]") {
  const int64_t rows = 5, cols = 24;
  std::mt19937 rng(7);
  std::vector<uint8_t> q(rows * cols);
  for (uint8_t& v : q) v = uint8_t(rng() % 16);
  const lmd::HostTensor packed = lmd::awq_pack(q, rows, cols);
  REQUIRE(packed.dtype() == lmd::DType::I32);
  REQUIRE(packed.shape() == lmd::Shape{rows, cols / 8});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) CHECK(nibble_at(packed, r, c) == q[r * cols + c]);
  CHECK(lmd::awq_unpack(packed) == q);
  // One hand-made word: columns 0..7 hold 0..7, so nibbles read 0,2,4,6,1,3,5,7 from the low bits.
  std::vector<uint8_t> ramp = {0, 1, 2, 3, 4, 5, 6, 7};
  uint32_t word;
  std::memcpy(&word, lmd::awq_pack(ramp, 1, 8).data(), 4);
  CHECK(word == 0x75316420u);
}

TEST_CASE("int4 quantization stays within half a step and writes the gemm tensors", "[awq]") {
  for (int group : {32, 64, 128}) {
    FloatLinear w = random_linear(16, 256, 11 + group);
    w.weight[3 * 256 + 17] = 0.9f;  // an outlier widens one group's step
    const lmd::Int4Linear q = lmd::quantize_int4(w, group, "test.linear");
    REQUIRE(q.qweight.shape() == lmd::Shape{256, 2});
    REQUIRE(q.qzeros.shape() == lmd::Shape{256 / group, 2});
    REQUIRE(q.scales.shape() == lmd::Shape{256 / group, 16});
    REQUIRE(q.scales.dtype() == lmd::DType::F16);
    const std::vector<float> fake = lmd::fake_quantize_int4(w, group);
    const std::vector<float> scales = q.scales.to_f32();
    const lmd::HostTensor dense = lmd::dequantize_awq(q.qweight, q.qzeros, q.scales);
    const float* deq = dense.data_as<float>();
    for (int64_t o = 0; o < w.out; ++o) {
      for (int64_t g = 0; g < w.in / group; ++g) {
        const float* grp = w.weight.data() + o * w.in + g * group;
        const auto [lo, hi] = std::minmax_element(grp, grp + group);
        const float exact = std::max(*hi - *lo, 1e-5f) / 15, scale = scales[g * w.out + o];
        CHECK(scale >= exact);  // rounded up to fp16, by less than one fp16 step
        CHECK(scale <= exact * (1 + 1.0f / 1024));
      }
      for (int64_t i = 0; i < w.in; ++i) {
        const float value = decode(q, o, i, group), scale = scales[(i / group) * w.out + o];
        CHECK(std::fabs(value - w.weight[o * w.in + i]) <= scale / 2 * (1 + 1e-5f));
        CHECK(value == fake[o * w.in + i]);
        CHECK(value == deq[o * w.in + i]);
      }
    }
  }
}

TEST_CASE("int4 quantization gives the same bytes with any number of threads", "[awq]") {
  const FloatLinear w = random_linear(200, 256, 12);
  const lmd::Int4Linear serial = lmd::quantize_int4(w, 64, "test.linear");
  const std::vector<float> serial_fake = lmd::fake_quantize_int4(w, 64);
  auto bytes = [](const lmd::HostTensor& t) { return std::string(t.data_as<char>(), t.nbytes()); };
  for (int threads : {2, 3, 7}) {
    lmd::ThreadPool pool(threads);
    const lmd::Int4Linear q = lmd::quantize_int4(w, 64, "test.linear", &pool);
    CHECK(bytes(q.qweight) == bytes(serial.qweight));
    CHECK(bytes(q.qzeros) == bytes(serial.qzeros));
    CHECK(bytes(q.scales) == bytes(serial.scales));
    CHECK(lmd::fake_quantize_int4(w, 64, &pool) == serial_fake);
  }
}

TEST_CASE("int4 quantization names the linear and the flag when the group does not fit", "[awq]") {
  const FloatLinear w = random_linear(16, 96, 3);
  CHECK_ERROR(lmd::Error, lmd::quantize_int4(w, 64, "model.layers.0.mlp.down_proj"), "--w-group-size 64",
              "96 input features", "model.layers.0.mlp.down_proj");
  const FloatLinear odd = random_linear(12, 64, 3);
  CHECK_ERROR(lmd::Error, lmd::quantize_int4(odd, 32, "x.k_proj"), "x.k_proj", "12 output features",
              "multiple of 8");
}

namespace {

// A small multi-head (no GQA) Llama layer, so every smoothing pair, v -> o included, is exercised.
struct TinyLayer {
  lmd::ModelSpec spec;
  lmd::FloatLayer layer;
};

TinyLayer tiny_layer() {
  TinyLayer t;
  lmd::ModelSpec& s = t.spec;
  s.hidden = 128;
  s.heads = s.kv_heads = 2;
  s.head_dim = 64;
  s.intermediate = 256;
  s.layers = 1;
  s.norm_eps = 1e-5f;
  lmd::FloatLayer& L = t.layer;
  L.attn_norm = normal(128, 0.1f, 1);
  L.ffn_norm = normal(128, 0.1f, 2);
  for (float& v : L.attn_norm) v += 1;
  for (float& v : L.ffn_norm) v += 1;
  L.q = random_linear(128, 128, 3);
  L.k = random_linear(128, 128, 4);
  L.v = random_linear(128, 128, 5);
  L.o = random_linear(128, 128, 6);
  L.gate = random_linear(256, 128, 7);
  L.up = random_linear(256, 128, 8);
  L.down = random_linear(128, 256, 9);
  return t;
}

// Hidden states [windows * seqlen, hidden] with a few channels 20x larger, as in real models.
std::vector<float> hidden_with_outliers(int64_t rows, int64_t hidden, uint64_t seed) {
  std::vector<float> x = normal(size_t(rows * hidden), 1.f, seed);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c : {5, 40, 99}) x[r * hidden + c] *= 20;
  return x;
}

}  // namespace

TEST_CASE("smoothing alone leaves the float layer output unchanged", "[awq]") {
  lmd::CpuBackend be(2);
  TinyLayer t = tiny_layer();
  const int seqlen = 32, windows = 3;
  const std::vector<float> x = hidden_with_outliers(windows * seqlen, t.spec.hidden, 21);
  lmd::CalibActivations on_device = activations(be, x, t.spec.hidden, 2 * seqlen, true);
  lmd::LayerInputs inputs;
  lmd::run_float_layer(be, t.spec, t.layer, seqlen, on_device, &inputs, 1);
  const std::vector<float> before = on_device.to_f32();
  CHECK(inputs.qkv.stats.count == windows * seqlen);
  CHECK(inputs.down.channels == t.spec.intermediate);
  CHECK(inputs.o.row_count() == windows * seqlen);

  const std::vector<lmd::SmoothPair> pairs = lmd::smooth_pairs(t.spec, t.layer, inputs);
  REQUIRE(pairs.size() == 4);  // input norm -> qkv, v -> o, post-attention norm -> gate/up, up -> down
  std::vector<std::vector<float>> scales;
  for (const lmd::SmoothPair& p : pairs) {
    scales.push_back(lmd::default_scales(p, 64));
    const auto [lo, hi] = std::minmax_element(scales.back().begin(), scales.back().end());
    INFO(p.name);
    CHECK(*hi / *lo > 1.5f);  // a real rescaling, not the identity
  }
  for (size_t i = 0; i < pairs.size(); ++i) lmd::apply_smoothing(pairs[i], scales[i]);
  lmd::CalibActivations on_host = activations(be, x, t.spec.hidden, 2 * seqlen, false);
  lmd::run_float_layer(be, t.spec, t.layer, seqlen, on_host);
  CHECK(lmd::test::rel_error(on_host.to_f32(), before) < 1e-5);
}

TEST_CASE(
    "the layer pass gives the same activations and statistics on the device and on the host, "
    "with any number of threads",
    "[awq]") {
  lmd::CpuBackend be(2);
  TinyLayer t = tiny_layer();
  const int seqlen = 32, windows = 3;
  const std::vector<float> x = hidden_with_outliers(windows * seqlen, t.spec.hidden, 22);
  lmd::CalibActivations on_device = activations(be, x, t.spec.hidden, 2 * seqlen, true);
  lmd::CalibActivations on_host = activations(be, x, t.spec.hidden, seqlen, false);
  lmd::LayerInputs device_inputs, host_inputs;
  lmd::ThreadPool pool(3);
  lmd::run_float_layer(be, t.spec, t.layer, seqlen, on_device, &device_inputs, 5, &pool);
  lmd::run_float_layer(be, t.spec, t.layer, seqlen, on_host, &host_inputs, 5);
  CHECK(on_device.to_f32() == on_host.to_f32());
  for (auto member :
       {&lmd::LayerInputs::qkv, &lmd::LayerInputs::o, &lmd::LayerInputs::gate_up, &lmd::LayerInputs::down}) {
    const lmd::InputRecord &a = device_inputs.*member, &b = host_inputs.*member;
    CHECK(a.rows == b.rows);
    CHECK(a.row_count() == (windows * seqlen + 4) / 5);
    CHECK(a.stats.sum == b.stats.sum);
    CHECK(a.stats.abssum == b.stats.abssum);
    CHECK(a.stats.absmax == b.stats.absmax);
    CHECK(a.stats.min == b.stats.min);
    CHECK(a.stats.max == b.stats.max);
  }
}

TEST_CASE("GQA and InternLM2 layers get no v -> o pair", "[awq]") {
  TinyLayer t = tiny_layer();
  lmd::LayerInputs inputs;
  t.spec.kv_heads = 1;
  CHECK(lmd::smooth_pairs(t.spec, t.layer, inputs).size() == 3);
  t.spec.kv_heads = 2;
  t.spec.arch = lmd::Arch::InternLM2;
  CHECK(lmd::smooth_pairs(t.spec, t.layer, inputs).size() == 3);
}

TEST_CASE("the scale search beats no smoothing and the default ratio on outlier channels", "[awq]") {
  lmd::CpuBackend be(2);
  const int64_t in = 256, rows = 512;
  lmd::InputRecord input;
  input.channels = in;
  input.rows = hidden_with_outliers(rows, in, 31);
  input.stats.add(input.rows.data(), rows, in);
  std::vector<float> norm(in, 1.f);
  FloatLinear gate = random_linear(128, in, 32), up = random_linear(128, in, 33),
              down = random_linear(in, 128, 34);
  FloatLinear single = random_linear(64, in, 35);

  const lmd::SmoothPair linear_pair{"norm -> linear", &norm, nullptr, {&single}, nullptr, &input};
  const lmd::SmoothPair mlp_pair{"norm -> gate,up", &norm, nullptr, {&gate, &up}, &down, &input};
  for (const lmd::SmoothPair* pair : {&linear_pair, &mlp_pair}) {
    INFO(pair->name);
    const double none = lmd::quantized_block_error(be, *pair, std::vector<float>(in, 1.f), 128);
    const double dflt = lmd::quantized_block_error(be, *pair, lmd::default_scales(*pair, 128), 128);
    const lmd::ScaleSearch found = lmd::search_scales(be, *pair, 128);
    REQUIRE(found.errors.size() == 20);
    const double best = *std::min_element(found.errors.begin(), found.errors.end());
    CHECK(best == lmd::quantized_block_error(be, *pair, found.scales, 128));
    CHECK(best < none);
    CHECK(best < dflt);
    CHECK(found.ratio > 0);
    INFO("none " << none << ", default " << dflt << ", search " << best << " at ratio " << found.ratio);
    CHECK(best < 0.8 * none);
  }
}
