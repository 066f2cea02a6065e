// Sampling on the GPU: greedy argmax with its log-probability, so that a decode step brings back one
// (token, logprob) pair per sequence instead of [sequences, vocab] fp32 logits (32000 x 4 bytes each
// for Llama-2). The CPU Sampler stays the reference (tests/test_cuda_engine.cpp compares the two).
#include <cfloat>
#include <climits>

#include "cuda_check.h"
#include "device_types.cuh"
#include "kernels.h"

namespace lmd::cuda {
namespace {

constexpr int kThreads = 1024;

// (value, index) with the larger value winning and the lower index breaking ties, as std::max_element.
__device__ __forceinline__ void better(float& v, int& i, float ov, int oi) {
  if (ov > v || (ov == v && oi < i)) v = ov, i = oi;
}

// One block per row: pass 1 finds the argmax, pass 2 sums exp(x - max) for the log-softmax.
__global__ void __launch_bounds__(kThreads) greedy_kernel(const float* logits, int vocab, float* out) {
  __shared__ float s_val[kThreads / 32];
  __shared__ int s_idx[kThreads / 32];
  __shared__ float s_sum[kThreads / 32];
  const float* row = logits + int64_t(blockIdx.x) * vocab;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float v = -INFINITY;
  int idx = INT_MAX;
  // Each thread visits increasing indices, so a strict > keeps its lowest index among equal values.
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const float x = row[i];
    if (x > v || idx == INT_MAX) v = x, idx = i;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
    better(v, idx, ov, oi);
  }
  if (lane == 0) s_val[warp] = v, s_idx[warp] = idx;
  __syncthreads();
  v = s_val[0], idx = s_idx[0];
  for (int w = 1; w < kThreads / 32; ++w) better(v, idx, s_val[w], s_idx[w]);

  float sum = 0.f;
  for (int i = threadIdx.x; i < vocab; i += kThreads) sum += __expf(row[i] - v);
  sum = warp_sum(sum);
  if (lane == 0) s_sum[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) total += s_sum[w];
    out[2 * blockIdx.x] = float(idx);
    out[2 * blockIdx.x + 1] = -logf(total);
  }
}

}  // namespace

void greedy(const float* logits, int rows, int vocab, float* out, cudaStream_t stream) {
  greedy_kernel<<<rows, kThreads, 0, stream>>>(logits, vocab, out);
  LMD_CUDA_LAUNCHED();
}

}  // namespace lmd::cuda
