// Element types of host and device tensors, and exact conversions between the 16-bit floats and fp32.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace lmd {

enum class DType : uint8_t { F32, F16, BF16, I32, I8, U8 };

size_t dtype_size(DType t);
// The safetensors spelling: "F32", "F16", "BF16", "I32", "I8", "U8".
std::string_view dtype_name(DType t);
std::optional<DType> dtype_from_name(std::string_view name);
// Human spelling used in configs and CLI: float32/float16/bfloat16 (also fp32/fp16/bf16).
std::optional<DType> dtype_from_torch_name(std::string_view name);
bool is_float(DType t);

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);  // round to nearest even, overflow to inf
float bf16_to_f32(uint16_t b);
uint16_t f32_to_bf16(float f);  // round to nearest even, NaN stays NaN

}  // namespace lmd
