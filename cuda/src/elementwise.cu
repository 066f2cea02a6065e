// Row gathers, RMSNorm (plain and fused with the residual add), SiLU*mul and bias: memory-bound
// kernels, one pass over their inputs each.
#include <algorithm>

#include "cuda_check.h"
#include "device_types.cuh"
#include "kernels.h"
#include "launch.cuh"

namespace lmd::cuda {
namespace {

template <class V>
__global__ void gather_rows_kernel(const V* src, const int* rows, int64_t row_vecs, V* out) {
  const V* from = src + int64_t(rows[blockIdx.x]) * row_vecs;
  V* to = out + int64_t(blockIdx.x) * row_vecs;
  for (int64_t i = threadIdx.x; i < row_vecs; i += blockDim.x) to[i] = from[i];
}

// V consecutive elements, loaded and stored as one access (16 bytes when V = 16 / sizeof(T)).
template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// One block per row. The residual sum is rounded to T before it is squared, so the norm sees exactly
// the residual later layers read. Version 1 loaded one element per access: with it the non-GEMM ops took
// 2.4 of the 6.25 ms of a Llama-2-7B-shaped decode step on an H200 (docs/benchmarks.md); rows are now
// read in 16-byte packs.
template <class T, int V>
__global__ void rmsnorm_kernel(const T* x, T* residual, const T* w, float eps, int n, T* out) {
  chain_release();
  chain_wait();
  using P = Pack<T, V>;
  const int packs = n / V;
  const int64_t base = int64_t(blockIdx.x) * packs;
  const P* xp = reinterpret_cast<const P*>(x) + base;
  P* rp = residual != nullptr ? reinterpret_cast<P*>(residual) + base : nullptr;
  float ss = 0.f;
  for (int i = threadIdx.x; i < packs; i += blockDim.x) {
    P a = xp[i];
    if (rp != nullptr) {
      P r = rp[i];
#pragma unroll
      for (int k = 0; k < V; ++k) r.v[k] = from_f32<T>(to_f32(r.v[k]) + to_f32(a.v[k]));
      rp[i] = r;
      a = r;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) ss += to_f32(a.v[k]) * to_f32(a.v[k]);
  }
  __shared__ float partial[kRmsNormThreads / 32];
  ss = warp_sum(ss);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < kRmsNormThreads / 32; ++i) total += partial[i];
  const float inv = rsqrtf(total / n + eps);
  // Each thread rereads only the packs it wrote above, so no barrier is needed for residual.
  const P* src = rp != nullptr ? rp : xp;
  const P* wp = reinterpret_cast<const P*>(w);
  P* op = reinterpret_cast<P*>(out) + base;
  for (int i = threadIdx.x; i < packs; i += blockDim.x) {
    const P a = src[i], wv = wp[i];
    P o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = from_f32<T>(to_f32(a.v[k]) * inv * to_f32(wv.v[k]));
    op[i] = o;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class T>
__global__ void silu_mul_kernel(const T* gu, int64_t rows, int inter, T* out) {
  chain_release();
  chain_wait();
  const int64_t total = rows * inter;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = k / inter, i = k % inter;
    const float g = to_f32(gu[r * 2 * inter + i]), u = to_f32(gu[r * 2 * inter + inter + i]);
    out[k] = from_f32<T>(g / (1.f + expf(-g)) * u);
  }
}

template <class T>
__global__ void add_bias_kernel(T* y, const T* bias, int64_t rows, int cols) {
  const int64_t total = rows * cols;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total;
       k += int64_t(gridDim.x) * blockDim.x)
    y[k] = from_f32<T>(to_f32(y[k]) + to_f32(bias[k % cols]));
}

int elementwise_blocks(int64_t total, int threads) {
  return int(std::min<int64_t>((total + threads - 1) / threads, 132 * 16));
}

}  // namespace

void gather_rows(const void* src, const int* rows, int n, int64_t row_bytes, void* out, cudaStream_t stream) {
  if (n == 0) return;
  const int threads = 128;
  if (row_bytes % 16 == 0) {
    gather_rows_kernel<<<n, threads, 0, stream>>>(static_cast<const uint4*>(src), rows, row_bytes / 16,
                                                  static_cast<uint4*>(out));
  } else if (row_bytes % 4 == 0) {
    gather_rows_kernel<<<n, threads, 0, stream>>>(static_cast<const uint32_t*>(src), rows, row_bytes / 4,
                                                  static_cast<uint32_t*>(out));
  } else {
    gather_rows_kernel<<<n, threads, 0, stream>>>(static_cast<const uint8_t*>(src), rows, row_bytes,
                                                  static_cast<uint8_t*>(out));
  }
  LMD_CUDA_LAUNCHED();
}

void rmsnorm(DType dtype, const void* x, void* residual, const void* w, float eps, int64_t rows, int n,
             void* out, cudaStream_t stream) {
  if (rows == 0) return;
  dispatch_float(dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kV = 16 / sizeof(T);
    const bool packed = n % kV == 0 && aligned16(x) && aligned16(w) && aligned16(out) &&
                        (residual == nullptr || aligned16(residual));
    auto kernel = packed ? &rmsnorm_kernel<T, kV> : &rmsnorm_kernel<T, 1>;
    launch_chained(kernel, unsigned(rows), kRmsNormThreads, 0, stream, x, residual, w, eps, n, out);
  });
  LMD_CUDA_LAUNCHED();
}

void silu_mul(DType dtype, const void* gate_up, int64_t rows, int inter, void* out, cudaStream_t stream) {
  if (rows == 0) return;
  dispatch_float(dtype, [&](auto t) {
    using T = decltype(t);
    launch_chained(silu_mul_kernel<T>, elementwise_blocks(rows * inter, 256), 256, 0, stream, gate_up, rows,
                   inter, out);
  });
  LMD_CUDA_LAUNCHED();
}

void add_bias(DType dtype, void* y, const void* bias, int64_t rows, int cols, cudaStream_t stream) {
  if (rows == 0) return;
  dispatch_float(dtype, [&](auto t) {
    using T = decltype(t);
    add_bias_kernel<T><<<elementwise_blocks(rows * cols, 256), 256, 0, stream>>>(
        static_cast<T*>(y), static_cast<const T*>(bias), rows, cols);
  });
  LMD_CUDA_LAUNCHED();
}

}  // namespace lmd::cuda
