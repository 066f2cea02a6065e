#include "lmd/engine/kv_quant.h"

#include <algorithm>
#include <cmath>

namespace lmd {

void quantize_kv_row(const float* x, int head_dim, int bits, uint8_t* dst, uint16_t* params) {
  const int qmax = (1 << bits) - 1;
  float lo = x[0], hi = x[0];
  for (int d = 1; d < head_dim; ++d) lo = std::min(lo, x[d]), hi = std::max(hi, x[d]);
  params[0] = f32_to_f16((hi - lo) / qmax);
  params[1] = f32_to_f16(lo);
  const float scale = f16_to_f32(params[0]), zero = f16_to_f32(params[1]);
  const float inv = scale > 0 ? 1.f / scale : 0.f;
  auto q = [&](float v) { return uint8_t(std::clamp<int>(int(std::nearbyint((v - zero) * inv)), 0, qmax)); };
  if (bits == 8) {
    for (int d = 0; d < head_dim; ++d) dst[d] = q(x[d]);
  } else {
    for (int d = 0; d < head_dim; d += 2) dst[d / 2] = uint8_t(q(x[d]) | (q(x[d + 1]) << 4));
  }
}

void dequantize_kv_row(const uint8_t* src, const uint16_t* params, int head_dim, int bits, float* out) {
  const float scale = f16_to_f32(params[0]), zero = f16_to_f32(params[1]);
  if (bits == 8) {
    for (int d = 0; d < head_dim; ++d) out[d] = src[d] * scale + zero;
  } else {
    for (int d = 0; d < head_dim; d += 2) {
      out[d] = (src[d / 2] & 15) * scale + zero;
      out[d + 1] = (src[d / 2] >> 4) * scale + zero;
    }
  }
}

void quantize_kv_row_static(const float* x, int head_dim, float scale, float zero, int8_t* dst) {
  const float inv = scale > 0 ? 1.f / scale : 0.f;
  for (int d = 0; d < head_dim; ++d)
    dst[d] = int8_t(std::clamp<int>(int(std::nearbyint((x[d] - zero) * inv)), -128, 127));
}

void dequantize_kv_row_static(const int8_t* src, int head_dim, float scale, float zero, float* out) {
  for (int d = 0; d < head_dim; ++d) out[d] = src[d] * scale + zero;
}

}  // namespace lmd
