// Addressing and online quantization of the paged KV cache, matching lmd/engine/kv_quant.h exactly:
// data [num_blocks, layers, 2, kv_heads, block_len, head_dim], params (fp16 scale, zero) per row.
#pragma once
#include "device_types.cuh"
#include "kernels.h"

namespace lmd::cuda {

__device__ __forceinline__ int64_t cache_row(const KvGeometry& g, int block, int kv, int head, int slot) {
  return ((((int64_t(block) * g.layers + g.layer) * 2 + kv) * g.kv_heads + head) * g.block_len) + slot;
}

__device__ __forceinline__ int kv_row_bytes(const KvGeometry& g) {
  return g.quant_bits == 4 ? g.head_dim / 2 : g.head_dim;
}

}  // namespace lmd::cuda
