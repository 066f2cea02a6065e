// Asymmetric int4 quantization per group (BRIEF §5) and packing into the AutoAWQ "gemm" layout.
#include <algorithm>
#include <cmath>

#include "awq_internal.h"
#include "lmd/core/awq_layout.h"
#include "lmd/core/error.h"
#include "lmd/quant/awq.h"

namespace lmd {
namespace {

constexpr int kMaxQ = 15;

void check_quantizable(const FloatLinear& w, int group, const std::string& name) {
  if (group <= 0) fail("--w-group-size must be positive, got ", group);
  if (w.in % group != 0)
    fail("--w-group-size ", group, " does not divide the ", w.in, " input features of ", name,
         " (use a group size that divides every linear's input, e.g. 32, 64 or 128)");
  if (w.out % 8 != 0)
    fail(name, ": ", w.out, " output features are not a multiple of 8, so its int4 values cannot be packed ",
         "eight to an int32 (AWQ gemm layout)");
}

// One group's quantization parameters: the fp16 scale (bits and value) and the zero point.
struct GroupParams {
  uint16_t scale_bits;
  float scale;
  int zero;
};

GroupParams group_params(const float* w, int64_t n) {
  float lo = w[0], hi = w[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, w[i]);
    hi = std::max(hi, w[i]);
  }
  const float exact = std::max(hi - lo, 1e-5f) / kMaxQ;
  // Rounding the scale up (never down) keeps max - min within 15 stored steps, so the top of the range is
  // not clamped by more than half a step.
  uint16_t bits = f32_to_f16(exact);
  if (f16_to_f32(bits) < exact) ++bits;  // positive fp16 values order like their bit patterns
  const float scale = f16_to_f32(bits);
  const int zero = std::clamp(int(-std::nearbyint(lo / scale)), 0, kMaxQ);
  return {bits, scale, zero};
}

int quantize_value(float w, const GroupParams& p) {
  return std::clamp(int(std::nearbyint(w / p.scale)) + p.zero, 0, kMaxQ);
}

}  // namespace

Int4Linear quantize_int4(const FloatLinear& w, int group, const std::string& name, ThreadPool* pool) {
  check_quantizable(w, group, name);
  const int64_t groups = w.in / group;
  // Values laid out as the packed tensors want them: q [in][out], zeros [groups][out].
  std::vector<uint8_t> q(w.in * w.out), zeros(groups * w.out);
  HostTensor scales(DType::F16, {groups, w.out});
  auto* scale_bits = scales.mutable_data_as<uint16_t>();
  // Output rows in blocks: one group of a block's rows fills whole cache lines of the [in][out] q
  // layout, where row by row every value would touch a line of its own.
  constexpr int64_t kRowBlock = 64;
  awq_detail::for_chunks(pool, (w.out + kRowBlock - 1) / kRowBlock, [&](int64_t first, int64_t last) {
    for (int64_t o0 = first * kRowBlock; o0 < std::min(w.out, last * kRowBlock); o0 += kRowBlock) {
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t o = o0; o < std::min(w.out, o0 + kRowBlock); ++o) {
          const float* row = w.weight.data() + o * w.in;
          const GroupParams p = group_params(row + g * group, group);
          scale_bits[g * w.out + o] = p.scale_bits;
          zeros[g * w.out + o] = uint8_t(p.zero);
          for (int64_t i = g * group; i < (g + 1) * group; ++i)
            q[i * w.out + o] = uint8_t(quantize_value(row[i], p));
        }
      }
    }
  });
  return {awq_pack(q, w.in, w.out), awq_pack(zeros, groups, w.out), std::move(scales)};
}

std::vector<float> fake_quantize_int4(const FloatLinear& w, int group, ThreadPool* pool) {
  check_quantizable(w, group, "a linear");
  std::vector<float> out(w.weight.size());
  awq_detail::for_chunks(pool, w.out, [&](int64_t first, int64_t last) {
    for (int64_t start = first * w.in; start < last * w.in; start += group) {
      const GroupParams p = group_params(w.weight.data() + start, group);
      for (int64_t i = start; i < start + group; ++i)
        out[i] = float(quantize_value(w.weight[i], p) - p.zero) * p.scale;
    }
  });
  return out;
}

}  // namespace lmd
