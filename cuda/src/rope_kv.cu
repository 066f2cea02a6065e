// RoPE (HF rotate-half) on q and k in place, and the K/V write into the paged cache, in one kernel:
// one block per new token, one warp per head. Angles are float(pos) * inv_freq[i] with cosf/sinf, the
// CPU reference's float math, so both backends rotate by the same angles.
//
// Grid: (token, group of kRopeWarps heads), one warp per head. Version 1 had one block per token whose
// 4 warps walked all heads, so a batch-1 decode step ran as a single block; with it the non-GEMM ops
// took 2.4 of the 6.25 ms of a Llama-2-7B-shaped step on an H200 (docs/benchmarks.md).
#include "cuda_check.h"
#include "kv_cache.cuh"
#include "launch.cuh"

namespace lmd::cuda {
namespace {

constexpr int kRopeWarps = 4;

template <class T>
__global__ void __launch_bounds__(kRopeWarps * 32)
    rope_kv_kernel(T* qkv, int heads, KvGeometry g, const int* token_seq, const int* token_pos,
                   const int* seq_block_off, const int* blocks, const float* inv_freq, void* cache,
                   uint16_t* params, StaticKvParams fixed) {
  extern __shared__ float stage[];  // [warps][head_dim]: one head's row in fp32, for quantization
  chain_release();
  chain_wait();
  const int t = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y * kRopeWarps + warp;
  const int hd = g.head_dim, half = hd / 2, kvh = g.kv_heads;
  const int seq = token_seq[t], pos = token_pos[t];
  const float* freq = inv_freq + int64_t(seq) * half;
  T* row = qkv + int64_t(t) * (heads + 2 * kvh) * hd;
  const int block = blocks[seq_block_off[seq] + pos / g.block_len], slot = pos % g.block_len;
  float* buf = stage + warp * hd;
  if (h >= heads + 2 * kvh) return;
  T* v = row + int64_t(h) * hd;
  if (h < heads + kvh) {
    for (int f = lane; f < half; f += 32) {
      const float angle = float(pos) * freq[f];
      const float c = cosf(angle), s = sinf(angle);
      const float x1 = to_f32(v[f]), x2 = to_f32(v[f + half]);
      // The roundings are pinned (to what nvcc chose for x1 c - x2 s and x2 c + x1 s before) so that the
      // decode attention's fused rotation (rope_rotate) rounds alike.
      buf[f] = __fmaf_rn(x1, c, -__fmul_rn(x2, s));
      buf[f + half] = __fmaf_rn(x1, s, __fmul_rn(x2, c));
      v[f] = from_f32<T>(buf[f]);
      v[f + half] = from_f32<T>(buf[f + half]);
    }
  } else {
    for (int d = lane; d < hd; d += 32) buf[d] = to_f32(v[d]);
  }
  if (h < heads) return;  // queries stay in qkv only
  const int kv = h < heads + kvh ? 0 : 1, head = h - heads - kv * kvh;
  const int64_t index = cache_row(g, block, kv, head, slot);
  __syncwarp();
  if (g.quant_bits == 0) {
    T* dst = static_cast<T*>(cache) + index * hd;
    for (int d = lane; d < hd; d += 32) dst[d] = from_f32<T>(buf[d]);
  } else if (fixed.enabled) {
    const float scale = kv == 0 ? fixed.k_scale : fixed.v_scale, zero = kv == 0 ? fixed.k_zero : fixed.v_zero;
    const float inv = scale > 0.f ? 1.f / scale : 0.f;
    uint8_t* dst = static_cast<uint8_t*>(cache) + index * kv_row_bytes(g);
    for (int d = lane; d < hd; d += 32)
      dst[d] = uint8_t(min(max(int(rintf((buf[d] - zero) * inv)), -128), 127) + 128);
    if (lane == 0) {
      params[index * 2] = __half_as_ushort(__float2half_rn(scale));
      params[index * 2 + 1] = __half_as_ushort(__float2half_rn(zero - 128.f * scale));
    }
  } else {
    // K is quantized from its unrounded rotated values, like the fp32 reference.
    float lo = INFINITY, hi = -INFINITY;
    for (int d = lane; d < hd; d += 32) lo = fminf(lo, buf[d]), hi = fmaxf(hi, buf[d]);
    lo = warp_min(lo);
    hi = warp_max(hi);
    const int qmax = (1 << g.quant_bits) - 1;
    const __half scale_h = __float2half_rn((hi - lo) / qmax), zero_h = __float2half_rn(lo);
    const float scale = __half2float(scale_h), zero = __half2float(zero_h);
    const float inv = scale > 0.f ? 1.f / scale : 0.f;
    auto quant = [&](float x) { return unsigned(min(max(int(rintf((x - zero) * inv)), 0), qmax)); };
    uint8_t* dst = static_cast<uint8_t*>(cache) + index * kv_row_bytes(g);
    if (g.quant_bits == 8) {
      for (int d = lane; d < hd; d += 32) dst[d] = uint8_t(quant(buf[d]));
    } else {
      for (int d = lane; d < half; d += 32)
        dst[d] = uint8_t(quant(buf[2 * d]) | (quant(buf[2 * d + 1]) << 4));
    }
    if (lane == 0) {
      params[index * 2] = __half_as_ushort(scale_h);
      params[index * 2 + 1] = __half_as_ushort(zero_h);
    }
  }
}

}  // namespace

void rope_kv_write(DType dtype, void* qkv, int tokens, int heads, const KvGeometry& g, const int* token_seq,
                   const int* token_pos, const int* seq_block_off, const int* blocks, const float* inv_freq,
                   void* cache, uint16_t* params, const StaticKvParams& fixed, cudaStream_t stream) {
  if (tokens == 0) return;
  if (fixed.enabled && g.quant_bits != 8) fail("static KV parameters need an int8 cache");
  const size_t smem = size_t(kRopeWarps) * g.head_dim * sizeof(float);
  dispatch_float(dtype, [&](auto t) {
    using T = decltype(t);
    const dim3 grid(tokens, (heads + 2 * g.kv_heads + kRopeWarps - 1) / kRopeWarps);
    launch_chained(rope_kv_kernel<T>, grid, kRopeWarps * 32, smem, stream, qkv, heads, g, token_seq,
                   token_pos, seq_block_off, blocks, inv_freq, cache, params, fixed);
  });
  LMD_CUDA_LAUNCHED();
}

}  // namespace lmd::cuda
