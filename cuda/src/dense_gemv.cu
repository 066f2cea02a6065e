// The batch-1 decode linears of 16-bit checkpoints. cuBLAS reaches ~82% of the copy bandwidth on a
// Llama-2-7B layer at one row (docs/benchmarks.md); a decode step reads every weight once, so that
// shortfall is most of the gap to the bound. This kernel gives each output row to one warp, which
// streams the row with 16-byte loads, eight per lane in flight, and keeps the few activation rows in L1.
#include <type_traits>

#include "cuda_check.h"
#include "device_types.cuh"
#include "gemv_input.cuh"
#include "kernels.h"
#include "launch.cuh"

namespace lmd::cuda {
namespace {

constexpr int kWarps = 8;     // output rows per block
constexpr int kInFlight = 8;  // 16-byte weight loads per lane issued before the first is used

__device__ __forceinline__ float2 to_float2(uint32_t v, __half) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}
__device__ __forceinline__ float2 to_float2(uint32_t v, __nv_bfloat16) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

// Dot product of eight weights and eight activations, both packed in a uint4, in fp32.
template <class T>
__device__ __forceinline__ float dot8(const uint4& w, const uint4& x, float acc) {
  const uint32_t wv[4] = {w.x, w.y, w.z, w.w}, xv[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = to_float2(wv[i], T{}), b = to_float2(xv[i], T{});
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
  return acc;
}

// out[m, n] = sum_k x[m, k] w[n, k] for m < MR; one warp per n. K % 8 == 0. With a prologue P the block
// first stages the input rows in shared memory (gemv_input.cuh) and reads x there.
template <class T, class TOut, int MR, GemvPrologueKind P>
__global__ void __launch_bounds__(kWarps * 32)
    dense_gemv_kernel(const T* __restrict__ x, const T* __restrict__ w, int K, int N, TOut* __restrict__ out,
                      PrologueArgs<T> pro) {
  extern __shared__ uint4 staged[];
  chain_release();
  const int lane = threadIdx.x % 32, n = blockIdx.x * kWarps + threadIdx.x / 32;
  const int vecs = K / 8;
  const uint4* row = reinterpret_cast<const uint4*>(w + int64_t(min(n, N - 1)) * K);
  uint4 wv[kInFlight];
  // Streaming: each weight is read once per step, so it should not push the activations out of L1.
  auto load = [&](int base) {
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int i = base + 32 * u;
      wv[u] = i < vecs ? __ldcs(row + i) : make_uint4(0, 0, 0, 0);
    }
  };
  // The first weights are requested before waiting for the kernel that writes x.
  load(lane);
  chain_wait();
  if constexpr (P != GemvPrologueKind::None) {
    stage_gemv_input<P>(pro, MR, K, reinterpret_cast<T*>(staged));
    x = reinterpret_cast<const T*>(staged);
  }
  if (n >= N) return;
  auto x_vec = [&](int m, int i) {
    const uint4* xr = reinterpret_cast<const uint4*>(x + int64_t(m) * K) + i;
    if constexpr (P == GemvPrologueKind::None)
      return __ldg(xr);
    else
      return *xr;
  };
  float acc[MR] = {};
  for (int base = lane; base < vecs; base += 32 * kInFlight) {
    if (base != lane) load(base);
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int i = base + 32 * u;
      if (i >= vecs) break;
#pragma unroll
      for (int m = 0; m < MR; ++m) acc[m] = dot8<T>(wv[u], x_vec(m, i), acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    const float sum = warp_sum(acc[m]);
    if (lane == 0) out[int64_t(m) * N + n] = from_f32<TOut>(sum);
  }
}

}  // namespace

bool dense_gemv_supported(DType dtype, DType out_dtype, int rows, int K, GemvPrologueKind pro) {
  return (dtype == DType::F16 || dtype == DType::BF16) && (out_dtype == dtype || out_dtype == DType::F32) &&
         rows >= 1 && rows <= kDenseGemvMaxRows && K % 8 == 0 &&
         (pro == GemvPrologueKind::None || int64_t(rows) * K * 2 <= kGemvPrologueMaxBytes);
}

void dense_gemv(DType dtype, DType out_dtype, const void* x, const void* w, int rows, int K, int N, void* out,
                cudaStream_t stream, const GemvPrologue& pro) {
  if (!dense_gemv_supported(dtype, out_dtype, rows, K, pro.kind))
    fail("dense GEMV: unsupported case (", dtype_name(dtype), " -> ", dtype_name(out_dtype), ", ", rows,
         " rows, ", K, " inputs)");
  const int blocks = (N + kWarps - 1) / kWarps;
  const size_t smem = pro.kind == GemvPrologueKind::None ? 0 : size_t(rows) * K * dtype_size(dtype);
  auto run = [&](auto tag, auto out_tag) {
    using T = decltype(tag);
    using TOut = decltype(out_tag);
    auto launch = [&](auto rows_tag) {
      constexpr int MR = decltype(rows_tag)::value;
      auto go = [&](auto kernel) {
        launch_chained(kernel, blocks, kWarps * 32, smem, stream, static_cast<const T*>(x),
                       static_cast<const T*>(w), K, N, static_cast<TOut*>(out), prologue_args<T>(pro));
      };
      switch (pro.kind) {
        case GemvPrologueKind::None:
          go(dense_gemv_kernel<T, TOut, MR, GemvPrologueKind::None>);
          break;
        case GemvPrologueKind::AddNorm:
          go(dense_gemv_kernel<T, TOut, MR, GemvPrologueKind::AddNorm>);
          break;
        case GemvPrologueKind::SiluMul:
          go(dense_gemv_kernel<T, TOut, MR, GemvPrologueKind::SiluMul>);
          break;
      }
    };
    switch (rows) {
      case 1:
        launch(std::integral_constant<int, 1>{});
        break;
      case 2:
        launch(std::integral_constant<int, 2>{});
        break;
      case 3:
        launch(std::integral_constant<int, 3>{});
        break;
      default:
        launch(std::integral_constant<int, 4>{});
        break;
    }
  };
  if (dtype == DType::F16)
    out_dtype == DType::F32 ? run(__half{}, float{}) : run(__half{}, __half{});
  else
    out_dtype == DType::F32 ? run(__nv_bfloat16{}, float{}) : run(__nv_bfloat16{}, __nv_bfloat16{});
  LMD_CUDA_LAUNCHED();
}

}  // namespace lmd::cuda
