// The element-wise op before a small-batch GEMV, done by the GEMV's blocks themselves (the fused
// prologues of add_rmsnorm_linear and silu_mul_linear). In a batch-1 decode step every add_rmsnorm and
// silu_mul is a kernel of its own between two GEMVs: a few microseconds of launch, one memory round trip
// and a grid-wide wait, 95 times a Llama-2-7B step. Here each block computes the GEMV's input rows into
// shared memory instead, after requesting its first weights, so that work overlaps the weight stream.
// The rows are small (per row of K 16-bit inputs a block reads 3 x 2K bytes from L2 for the norm, 2 x 2K
// for SwiGLU: 24 and 44 KB on Llama-2-7B), but every block reads them: only for a few rows.
#pragma once
#include <cuda_runtime.h>

#include "device_types.cuh"
#include "kernels.h"

namespace lmd::cuda {

// The fused op's inputs, converted to element pointers of T.
template <class T>
struct PrologueArgs {
  const T* src;  // AddNorm: the delta [M, K] added to the residual; SiluMul: gate_up [M, 2K]
  T* residual;   // AddNorm: [M, K]
  const T* norm_weight;
  float eps;
  unsigned* arrivals;
};

template <class T>
__host__ __device__ inline PrologueArgs<T> prologue_args(const GemvPrologue& p) {
  return {static_cast<const T*>(p.src), static_cast<T*>(p.residual), static_cast<const T*>(p.norm_weight),
          p.eps, p.arrivals};
}

template <class T>
struct alignas(16) Pack8 {
  T v[8];
};

// Rows [M, K] of the GEMV input into xs (shared memory, element type S: T for the dense GEMV, fp16 for
// the int4 one), rounded as the unfused ops round them. K % 8 == 0, M <= kGemvPrologueMaxRows; all
// threads of the block call it.
//   SiluMul: xs = silu(gate) * up, as silu_mul_kernel computes it.
//   AddNorm: h = residual + delta (rounded to T), xs = h / rms(h) * norm_weight as rmsnorm_kernel computes
//   it (its sum of squares split over that kernel's kRmsNormThreads whatever this block's size, and summed
//   in the same order, so the same bits). The block
//   that is the last to finish reading the residual writes h back to it.
template <GemvPrologueKind P, class T, class S>
__device__ void stage_gemv_input(const PrologueArgs<T>& a, int M, int K, S* xs) {
  const int packs = K / 8;
  if constexpr (P == GemvPrologueKind::SiluMul) {
    for (int e = threadIdx.x; e < M * packs; e += blockDim.x) {
      const int m = e / packs, i = e % packs;
      const Pack8<T> g = reinterpret_cast<const Pack8<T>*>(a.src + int64_t(m) * 2 * K)[i];
      const Pack8<T> u = reinterpret_cast<const Pack8<T>*>(a.src + int64_t(m) * 2 * K + K)[i];
      Pack8<S> o;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float gv = to_f32(g.v[j]);
        o.v[j] = from_f32<S>(to_f32(from_f32<T>(gv / (1.f + expf(-gv)) * to_f32(u.v[j]))));
      }
      reinterpret_cast<Pack8<S>*>(xs + int64_t(m) * K)[i] = o;
    }
    __syncthreads();
  } else {
    // Two passes, each a single round trip to L2: the first reads residual and delta, keeps h in xs (as
    // T bits; S and T are both 16-bit) and sums its squares; the second reads the norm weight and
    // normalises xs in place.
    // The first pass sums as rmsnorm_kernel's kNormWarps warps do whatever the block's size (at most
    // that many warps): warp w plays the parts of warps w, w + warps, ... of that kernel.
    constexpr int kNormWarps = kRmsNormThreads / 32;
    static_assert(sizeof(S) == sizeof(T));
    __shared__ float partial[kNormWarps], row_inv[kGemvPrologueMaxRows];
    __shared__ bool last;
    const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
    for (int m = 0; m < M; ++m) {
      const Pack8<T>* r = reinterpret_cast<const Pack8<T>*>(a.residual + int64_t(m) * K);
      const Pack8<T>* d = reinterpret_cast<const Pack8<T>*>(a.src + int64_t(m) * K);
      Pack8<T>* h = reinterpret_cast<Pack8<T>*>(xs + int64_t(m) * K);
      for (int vw = threadIdx.x / 32; vw < kNormWarps; vw += warps) {
        float ss = 0.f;
        for (int i = vw * 32 + lane; i < packs; i += kNormWarps * 32) {
          const Pack8<T> rv = r[i], dv = d[i];
          Pack8<T> hv;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            hv.v[j] = from_f32<T>(to_f32(rv.v[j]) + to_f32(dv.v[j]));
            ss += to_f32(hv.v[j]) * to_f32(hv.v[j]);
          }
          h[i] = hv;
        }
        ss = warp_sum(ss);
        if (lane == 0) partial[vw] = ss;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        float total = 0.f;
        for (int w = 0; w < kNormWarps; ++w) total += partial[w];
        row_inv[m] = rsqrtf(total / K + a.eps);
      }
      __syncthreads();  // partial is reused by the next row
    }
    // Every block has read the residual once all have arrived here: the last one writes h back.
    if (threadIdx.x == 0) {
      __threadfence();
      last = atomicAdd(a.arrivals, 1u) == gridDim.x - 1;
      if (last) *a.arrivals = 0;  // every block has counted: ready for the next launch
    }
    __syncthreads();
    const Pack8<T>* w = reinterpret_cast<const Pack8<T>*>(a.norm_weight);
    for (int m = 0; m < M; ++m) {
      const float inv = row_inv[m];
      Pack8<T>* residual = reinterpret_cast<Pack8<T>*>(a.residual + int64_t(m) * K);
      for (int i = threadIdx.x; i < packs; i += blockDim.x) {
        const Pack8<T> hv = reinterpret_cast<const Pack8<T>*>(xs + int64_t(m) * K)[i], wv = w[i];
        if (last) residual[i] = hv;
        Pack8<S> o;
#pragma unroll
        for (int j = 0; j < 8; ++j)
          o.v[j] = from_f32<S>(to_f32(from_f32<T>(to_f32(hv.v[j]) * inv * to_f32(wv.v[j]))));
        reinterpret_cast<Pack8<S>*>(xs + int64_t(m) * K)[i] = o;
      }
    }
    __syncthreads();  // the GEMV reads every row of xs
  }
}

}  // namespace lmd::cuda
