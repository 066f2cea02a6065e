// Online KV-cache quantization (BRIEF §5), the reference every backend matches: per token and head,
// asymmetric, scale = (max - min) / (2^bits - 1), zero = min, both stored as fp16 beside the data.
#pragma once
#include <cstdint>

#include "lmd/engine/backend.h"

namespace lmd {

// Bytes one head's row of head_dim values takes in the cache (int4 packs two values per byte).
inline int64_t kv_row_bytes(int head_dim, int bits) { return bits == 4 ? head_dim / 2 : head_dim; }

// Index of the row (one token of one head) for (block, layer, k=0/v=1, kv head, slot in block).
inline int64_t kv_cache_row(const KvCacheLayout& L, int block, int layer, int kv, int head, int slot) {
  return ((((int64_t(block) * L.layers + layer) * 2 + kv) * L.kv_heads + head) * L.block_len) + slot;
}

// Quantizes x[head_dim] into `dst` (int4: element 2i in the low nibble, 2i+1 in the high nibble) and
// writes params[0] = scale, params[1] = zero as fp16 bits. Quantization uses the fp16-rounded scale and
// zero, so dequantization reproduces exactly what was intended.
void quantize_kv_row(const float* x, int head_dim, int bits, uint8_t* dst, uint16_t* params);
void dequantize_kv_row(const uint8_t* src, const uint16_t* params, int head_dim, int bits, float* out);

// Static int8 (offline parameters, one (scale, zero) per layer for K and one for V, BRIEF §5):
// q = round((x - zero) / scale) clamped to [-128, 127], stored signed; x ~ q * scale + zero.
void quantize_kv_row_static(const float* x, int head_dim, float scale, float zero, int8_t* dst);
void dequantize_kv_row_static(const int8_t* src, int head_dim, float scale, float zero, float* out);

}  // namespace lmd
