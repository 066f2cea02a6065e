#include "lmd/core/awq_layout.h"

#include "lmd/core/error.h"

namespace lmd {

HostTensor awq_pack(const std::vector<uint8_t>& q, int64_t rows, int64_t cols) {
  if (cols % 8 != 0) fail("AWQ packing needs a multiple of 8 columns, got ", cols);
  HostTensor packed(DType::I32, {rows, cols / 8});
  auto* out = packed.mutable_data_as<uint32_t>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols / 8; ++c) {
      uint32_t word = 0;
      for (int i = 0; i < 8; ++i) word |= uint32_t(q[r * cols + c * 8 + kAwqNibbleColumn[i]] & 15) << (4 * i);
      out[r * (cols / 8) + c] = word;
    }
  }
  return packed;
}

std::vector<uint8_t> awq_unpack(const HostTensor& packed) {
  if (packed.dtype() != DType::I32 || packed.ndim() != 2)
    fail("AWQ packed tensor must be int32 [rows, cols/8], got ", dtype_name(packed.dtype()), " ",
         shape_str(packed.shape()));
  const int64_t rows = packed.dim(0), words = packed.dim(1), cols = words * 8;
  std::vector<uint8_t> q(rows * cols);
  const auto* in = packed.data_as<uint32_t>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < words; ++c)
      for (int i = 0; i < 8; ++i)
        q[r * cols + c * 8 + kAwqNibbleColumn[i]] = (in[r * words + c] >> (4 * i)) & 15;
  return q;
}

HostTensor dequantize_awq(const HostTensor& qweight, const HostTensor& qzeros, const HostTensor& scales) {
  const int64_t in = qweight.dim(0), out = qweight.dim(1) * 8, groups = scales.dim(0);
  if (scales.dim(1) != out || qzeros.dim(0) != groups || qzeros.dim(1) * 8 != out || in % groups != 0)
    fail("AWQ tensors disagree: qweight ", shape_str(qweight.shape()), ", qzeros ", shape_str(qzeros.shape()),
         ", scales ", shape_str(scales.shape()));
  const int64_t group = in / groups;
  const std::vector<uint8_t> q = awq_unpack(qweight), z = awq_unpack(qzeros);
  const std::vector<float> s = scales.to_f32();
  HostTensor w(DType::F32, {out, in});
  float* dst = w.mutable_data_as<float>();
  for (int64_t i = 0; i < in; ++i) {
    const int64_t g = i / group;
    for (int64_t o = 0; o < out; ++o)
      dst[o * in + i] = (float(q[i * out + o]) - float(z[g * out + o])) * s[g * out + o];
  }
  return w;
}

}  // namespace lmd
