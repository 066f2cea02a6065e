// The AutoAWQ "gemm" int4 layout (BRIEF §5), read by AutoAWQ, vLLM and transformers:
// qweight int32 [in, out/8], qzeros int32 [in/group, out/8], scales fp16 [in/group, out]; inside an
// int32, nibble i (bits 4i..4i+3) holds output column 8c + kAwqNibbleColumn[i].
#pragma once
#include <cstdint>

#include "lmd/core/tensor.h"

namespace lmd {

inline constexpr int kAwqNibbleColumn[8] = {0, 2, 4, 6, 1, 3, 5, 7};

// Packs 4-bit values q[rows][cols] (row-major, values 0..15) into int32 [rows, cols/8].
HostTensor awq_pack(const std::vector<uint8_t>& q, int64_t rows, int64_t cols);
// The inverse: int32 [rows, cols/8] -> values [rows][cols].
std::vector<uint8_t> awq_unpack(const HostTensor& packed);
// Dense fp32 weight [out, in] (the HF layout) from an AWQ linear: w = (q - zero) * scale.
HostTensor dequantize_awq(const HostTensor& qweight, const HostTensor& qzeros, const HostTensor& scales);

}  // namespace lmd
