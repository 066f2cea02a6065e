// The batch-1 decode linears of 16-bit checkpoints. cuBLAS reaches ~82% of the copy bandwidth on a
// Llama-2-7B layer at one row (docs/benchmarks.md); a decode step reads every weight once, so that
// shortfall is most of the gap to the bound. This kernel gives each output row to one warp, which
// streams the row with 16-byte loads, eight per lane in flight, and keeps the few activation rows in L1.
#include <algorithm>
#include <type_traits>

#include "cp_async.cuh"
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

// Streaming version (the default; CudaBackend::set_dense_gemv_stream, LMD_DENSE_STREAM=0 turns it off; K
// a multiple of 256). Above, each warp requests 8 of its row's 16-byte words a lane, waits, multiplies, and
// requests the next 8, and blocks come and go in waves (1.45 of them for Llama-2-7B's q|k|v on an H100),
// so an SM's loads in flight rise and fall. Here a persistent grid (as many blocks as fit on the SMs)
// gives each warp rows n, n + the grid's warps, ..., and the warp keeps its next kStreamRing 512-byte
// chunks of them (a word a lane) in flight through cp.async into a ring in shared memory, across row
// ends; a fused prologue stages the input rows once per block. Each lane reads back only the ring words
// it copied itself.
constexpr unsigned kStreamRing = 16;  // chunks in flight a warp (8 KB); a power of two
constexpr int kStreamRingBytes = kWarps * kStreamRing * 512;

template <class T, class TOut, int MR, GemvPrologueKind P>
__global__ void __launch_bounds__(kWarps * 32, 2)
    dense_stream_kernel(const T* __restrict__ x, const T* __restrict__ w, int K, int N,
                        TOut* __restrict__ out, PrologueArgs<T> pro) {
  extern __shared__ __align__(16) unsigned char smem[];
  chain_release();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned chunks = unsigned(K) / 256, row_step = gridDim.x * kWarps;
  // 0 (N > 0), but not to the compilers: `word & zero` is an instruction that waits for `word`'s load.
  const uint32_t zero = unsigned(N) >> 31;
  // This lane's word of ring slot s is at ring + 512 s.
  const uint32_t ring = smem_addr(smem) + (warp * kStreamRing * 32 + lane) * 16;

  // Requests the warp's next chunk into ring slot `slot` (past the warp's last row: nothing, its
  // bookkeeping runs on unused). Weights are never written during a step: the first round goes before
  // waiting for the kernel that writes x. `dep` (0) is added to the destination so that the request
  // waits for the slot's previous contents to be read.
  unsigned next_row = blockIdx.x * kWarps + warp, next_chunk = 0;
  const T* next_src = w + uint64_t(next_row) * unsigned(K) + lane * 8;
  const uint64_t row_jump = uint64_t(row_step - 1) * unsigned(K);
  auto issue = [&](unsigned slot, uint32_t dep) {
    cp_async16_if(next_row < unsigned(N), ring + slot * 512 + dep, next_src);
    cp_async_commit();  // possibly empty, so that a chunk's group is always the oldest of kStreamRing
    next_src += 256;
    if (++next_chunk == chunks) next_chunk = 0, next_row += row_step, next_src += row_jump;
  };
#pragma unroll
  for (unsigned slot = 0; slot < kStreamRing; ++slot) issue(slot, 0);
  chain_wait();
  if constexpr (P != GemvPrologueKind::None) {
    T* staged = reinterpret_cast<T*>(smem + kStreamRingBytes);
    stage_gemv_input<P>(pro, MR, K, staged);
    x = staged;
  }
  // x's words of chunk c for the MR rows.
  auto load_x = [&](unsigned c, uint4(&xv)[MR]) {
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      const uint4* xr = reinterpret_cast<const uint4*>(x + int64_t(m) * K) + c * 32 + lane;
      if constexpr (P == GemvPrologueKind::None)
        xv[m] = __ldg(xr);
      else
        xv[m] = *xr;
    }
  };

  unsigned slot = 0;
  // x of this chunk and the next, in turn: requested a chunk ahead of its use, the next row's first
  // during a row's last chunk (every row multiplies the same x).
  uint4 xv[2][MR];
  load_x(0, xv[0]);
  for (unsigned n = blockIdx.x * kWarps + warp; n < unsigned(N); n += row_step) {
    float acc[MR] = {};
    auto chunk = [&](unsigned c, const uint4(&cur)[MR], uint4(&next)[MR]) {
      load_x(c + 1 < chunks ? c + 1 : 0, next);
      cp_async_wait<kStreamRing - 1>();
      uint4 wv;
      asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(wv.x), "=r"(wv.y), "=r"(wv.z), "=r"(wv.w)
                   : "r"(ring + slot * 512)
                   : "memory");
#pragma unroll
      for (int m = 0; m < MR; ++m) acc[m] = dot8<T>(wv, cur[m], acc[m]);
      issue(slot, wv.x & zero);
      slot = (slot + 1) & (kStreamRing - 1);
    };
    unsigned c = 0;
    for (; c + 1 < chunks; c += 2) {
      chunk(c, xv[0], xv[1]);
      chunk(c + 1, xv[1], xv[0]);
    }
    if (c < chunks) {
      chunk(c, xv[0], xv[1]);
#pragma unroll
      for (int m = 0; m < MR; ++m) xv[0][m] = xv[1][m];  // the next row's first chunk
    }
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      const float sum = warp_sum(acc[m]);
      if (lane == 0) out[int64_t(m) * N + n] = from_f32<TOut>(sum);
    }
  }
}

}  // namespace

bool dense_gemv_supported(DType dtype, DType out_dtype, int rows, int K, GemvPrologueKind pro) {
  return (dtype == DType::F16 || dtype == DType::BF16) && (out_dtype == dtype || out_dtype == DType::F32) &&
         rows >= 1 && rows <= kDenseGemvMaxRows && K % 8 == 0 &&
         (pro == GemvPrologueKind::None || int64_t(rows) * K * 2 <= kGemvPrologueMaxBytes);
}

void dense_gemv(DType dtype, DType out_dtype, const void* x, const void* w, int rows, int K, int N, void* out,
                cudaStream_t stream, const GemvPrologue& pro, int stream_sms) {
  if (!dense_gemv_supported(dtype, out_dtype, rows, K, pro.kind))
    fail("dense GEMV: unsupported case (", dtype_name(dtype), " -> ", dtype_name(out_dtype), ", ", rows,
         " rows, ", K, " inputs)");
  const int blocks = (N + kWarps - 1) / kWarps;
  const size_t staged = pro.kind == GemvPrologueKind::None ? 0 : size_t(rows) * K * dtype_size(dtype);
  auto run = [&](auto tag, auto out_tag) {
    using T = decltype(tag);
    using TOut = decltype(out_tag);
    auto launch = [&](auto rows_tag) {
      constexpr int MR = decltype(rows_tag)::value;
      auto go = [&](auto kernel, auto stream_kernel) {
        if (stream_sms > 0 && K >= 256 && K % 256 == 0) {
          const size_t smem = kStreamRingBytes + staged;
          const int grid = std::min(blocks, resident_blocks(stream_kernel, kWarps * 32, smem) * stream_sms);
          launch_chained(stream_kernel, grid, kWarps * 32, smem, stream, static_cast<const T*>(x),
                         static_cast<const T*>(w), K, N, static_cast<TOut*>(out), prologue_args<T>(pro));
        } else {
          launch_chained(kernel, blocks, kWarps * 32, staged, stream, static_cast<const T*>(x),
                         static_cast<const T*>(w), K, N, static_cast<TOut*>(out), prologue_args<T>(pro));
        }
      };
      switch (pro.kind) {
        case GemvPrologueKind::None:
          go(dense_gemv_kernel<T, TOut, MR, GemvPrologueKind::None>,
             dense_stream_kernel<T, TOut, MR, GemvPrologueKind::None>);
          break;
        case GemvPrologueKind::AddNorm:
          go(dense_gemv_kernel<T, TOut, MR, GemvPrologueKind::AddNorm>,
             dense_stream_kernel<T, TOut, MR, GemvPrologueKind::AddNorm>);
          break;
        case GemvPrologueKind::SiluMul:
          go(dense_gemv_kernel<T, TOut, MR, GemvPrologueKind::SiluMul>,
             dense_stream_kernel<T, TOut, MR, GemvPrologueKind::SiluMul>);
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
