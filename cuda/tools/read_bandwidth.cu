// The kernel behind bench_util.h's read_bandwidth: every 16-byte word of a buffer read once. Kept free of
// the project's (C++20) headers, as the kernels are built as C++17.
#include <cuda_runtime.h>

#include <cstdint>

namespace lmd::bench {
namespace {

constexpr int kThreads = 256, kInFlight = 8;

// kInFlight loads per thread are issued before any is used; the words are folded by XOR into `out` so
// that the loads cannot be dropped.
__global__ void __launch_bounds__(kThreads)
    read_kernel(const uint4* __restrict__ words, int64_t n, unsigned* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  unsigned fold = 0;
  for (int64_t base = blockIdx.x * int64_t(kThreads) + threadIdx.x; base < n; base += stride * kInFlight) {
    uint4 v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int64_t i = base + u * stride;
      v[u] = i < n ? __ldcs(words + i) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) fold ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (int o = 16; o > 0; o >>= 1) fold ^= __shfl_xor_sync(0xffffffffu, fold, o);
  if (threadIdx.x % 32 == 0) atomicXor(out, fold);
}

}  // namespace

cudaError_t read_all(const void* data, int64_t bytes, unsigned* out, cudaStream_t stream) {
  int device = 0, sms = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  if (const cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
      e != cudaSuccess)
    return e;
  read_kernel<<<sms * 8, kThreads, 0, stream>>>(static_cast<const uint4*>(data), bytes / 16, out);
  return cudaGetLastError();
}

}  // namespace lmd::bench
