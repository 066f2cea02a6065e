// W4A16 linears: int4 weights (AWQ, BRIEF §5) re-laid once at load into tiles that the tensor-core
// GEMV reads with one 16-byte load per lane, and the two ways of running them (docs/formats.md, W4A16).
//
// Tiled layout, for a linear of K inputs and N outputs (K % 64 == 0, N % 32 == 0):
//   qweight int32 [N/16][K/64][32 lanes][4]: tile (nt, kt) covers outputs 16nt..16nt+15 and inputs
//     64kt..64kt+63. Lane L = 4g + t holds one int32 per 16-input step s (0..3) of mma.m16n8k16; nibble i
//     (0..7) of it is the weight of output g + 8 (i & 1) and input 16t + 4s + 2 ((i >> 1) & 1) + (i >> 2),
//     n relative to 16nt and k to 64kt. So ((v >> 4j) & 0x000f000f) | 0x64006400 = (1024 + nib j,
//     1024 + nib j+4) is, after the zero point and scale, register j of the step's A fragment (rows =
//     outputs), whose columns 2t, 2t+1, 2t+8, 2t+9 are inputs 16t + 4s + 0..3: a lane multiplies the 16
//     consecutive inputs 16t..16t+15 of a tile, one 32-byte read of x.
//   meta fp16 [K/group][N/16][8 rows g][4]: (1024 + zero of output g, 1024 + zero of g + 8, scale of g,
//     scale of g + 8): the 8 bytes one lane needs per tile and group.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"
#include "lmd/core/dtype.h"

namespace lmd::cuda {

inline bool w4a16_supported(int64_t in, int64_t out, int group) {
  return in % 64 == 0 && out % 32 == 0 && group >= 32 && (group & (group - 1)) == 0 && in % group == 0;
}

// AWQ qweight int32 [K, N/8], qzeros int32 [K/group, N/8], scales fp16 [K/group, N] (device) -> the
// tiled qweight (K*N/8 int32) and meta (K/group * N * 2 fp16).
void w4a16_relayout(const int32_t* awq_qweight, const int32_t* awq_qzeros, const void* awq_scales, int K,
                    int N, int group, int32_t* qweight, void* meta, cudaStream_t stream);

// Shape of one GEMV launch: up to 32 rows, N / 16 blocks (one 16-output strip each); from 33 rows on
// (wide), N / 32 blocks (two strips each). Each block has `warps` warps, each warp `tiles_per_warp`
// 64-input tiles of the input range; smem_bytes of shared memory for the warps' sums. `stream` (up to 8
// rows): the streaming version instead, a persistent grid of as many such blocks as fit on `sms` SMs
// walking the strips, its tiles in flight in a shared-memory ring (smem_bytes includes it).
struct W4Plan {
  int M = 0, N = 0, warps = 1, tiles_per_warp = 0, smem_bytes = 0;
  bool wide = false, stream = false;
  int sms = 0;
};
// M: rows of x, run kW4GemvChunkRows at a time. stream_sms > 0: the streaming version where it applies,
// on a device of that many SMs.
W4Plan w4a16_plan(int M, int K, int N, int stream_sms = 0);
inline constexpr int kW4GemvChunkRows = 64;

// out[M, N] = x[M, K] W^T in `dtype` (F16, BF16 or F32; weights and x meet in fp16 on the tensor cores,
// accumulation in fp32). x_fragments: device workspace of kW4GemvChunkRows * K fp16 (plan.wide only).
// With a prologue (where w4a16_prologue_supported), x is unused and the input rows come from `pro`.
bool w4a16_prologue_supported(DType dtype, int M, int K);
void w4a16_gemv(DType dtype, const void* x, int K, int group, const int32_t* qweight, const void* meta,
                const W4Plan& plan, void* x_fragments, void* out, cudaStream_t stream,
                const GemvPrologue& pro = {});

// The dense weight [N, K] in `dtype` (for cuBLAS at larger M): (q - zero) * scale, rounded once.
void w4a16_dequantize(DType dtype, int K, int N, int group, const int32_t* qweight, const void* meta,
                      void* dense, cudaStream_t stream);

}  // namespace lmd::cuda
