#include "lmd/core/dtype.h"

#include <bit>
#include <cmath>

#include "lmd/core/error.h"

namespace lmd {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32:
    case DType::I32:
      return 4;
    case DType::F16:
    case DType::BF16:
      return 2;
    case DType::I8:
    case DType::U8:
      return 1;
  }
  fail("unknown dtype code ", static_cast<int>(t));
}

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F32:
      return "F32";
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    case DType::I32:
      return "I32";
    case DType::I8:
      return "I8";
    case DType::U8:
      return "U8";
  }
  fail("unknown dtype code ", static_cast<int>(t));
}

std::optional<DType> dtype_from_name(std::string_view name) {
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::I32, DType::I8, DType::U8}) {
    if (dtype_name(t) == name) return t;
  }
  return std::nullopt;
}

std::optional<DType> dtype_from_torch_name(std::string_view name) {
  // Configs spell it "torch.float16" as often as "float16".
  if (name.starts_with("torch.")) name.remove_prefix(6);
  if (name == "float32" || name == "fp32" || name == "float") return DType::F32;
  if (name == "float16" || name == "fp16" || name == "half") return DType::F16;
  if (name == "bfloat16" || name == "bf16") return DType::BF16;
  return std::nullopt;
}

bool is_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1f;
  const uint32_t mantissa = h & 0x3ff;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, which fp32 represents exactly.
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  return std::bit_cast<float>(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
}

uint16_t f32_to_f16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  const auto sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
  const uint32_t magnitude = bits & 0x7fffffff;
  if (magnitude > 0x7f800000) {
    // NaN: keep it quiet and keep the top payload bits.
    return sign | 0x7e00 | static_cast<uint16_t>((magnitude >> 13) & 0x3ff);
  }
  // 65520 is the midpoint between 65504 (odd mantissa) and 65536; ties-to-even and everything above
  // go to infinity.
  if (magnitude >= 0x477ff000) return sign | 0x7c00;
  if (magnitude >= 0x38800000) {
    // Normal in fp16 (>= 2^-14): re-bias the exponent, round away 13 mantissa bits to nearest even.
    // A carry out of the mantissa correctly bumps the exponent.
    uint32_t half = ((((magnitude >> 23) - 127 + 15) << 10) | ((magnitude >> 13) & 0x3ff));
    const uint32_t dropped = magnitude & 0x1fff;
    if (dropped > 0x1000 || (dropped == 0x1000 && (half & 1))) ++half;
    return sign | static_cast<uint16_t>(half);
  }
  // Subnormal in fp16: the result counts units of 2^-24. The fp32 value is m * 2^(e-150) with the
  // implicit bit in m, so the count is m >> (126 - e), rounded to nearest even.
  const uint32_t exponent = magnitude >> 23;
  const uint32_t shift = 126 - exponent;  // >= 14 here
  if (shift > 24) return sign;            // below half of the smallest subnormal (or fp32 subnormal)
  const uint32_t mantissa = (magnitude & 0x7fffff) | 0x800000;
  uint32_t units = mantissa >> shift;
  const uint32_t dropped = mantissa & ((1u << shift) - 1);
  const uint32_t halfway = 1u << (shift - 1);
  if (dropped > halfway || (dropped == halfway && (units & 1))) ++units;  // may become the smallest normal
  return sign | static_cast<uint16_t>(units);
}

float bf16_to_f32(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

uint16_t f32_to_bf16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  // Truncating a NaN could clear every payload bit and leave infinity; set the quiet bit instead.
  if ((bits & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((bits >> 16) | 0x40);
  // Round to nearest even; overflow carries into the exponent and ends at infinity.
  const uint32_t rounded = bits + 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>(rounded >> 16);
}

}  // namespace lmd
