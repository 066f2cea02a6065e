// W4A16 kernels (layout in w4a16.h): the AWQ -> tiled re-layout done once at load, the tensor-core GEMV
// for small batches, and the dequantization to a dense weight for cuBLAS at larger batches.
#include <algorithm>

#include "cuda_check.h"
#include "device_types.cuh"
#include "w4a16.h"

namespace lmd::cuda {
namespace {

// Nibble p of an AWQ int32 holds column kAwqNibbleColumn[p] = {0,2,4,6,1,3,5,7}[p]; this is the inverse.
__device__ __forceinline__ int awq_nibble(int column) { return (column & 1) * 4 + (column >> 1); }

__global__ void relayout_kernel(const int32_t* awq, int K, int N, int32_t* tiled) {
  const int64_t total = int64_t(K) * N / 8;
  const int KT = K / 64;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int s = int(idx % 4), lane = int(idx / 4 % 32);
    const int64_t tile = idx / 128;
    const int kt = int(tile % KT), nt = int(tile / KT), g = lane / 4, t = lane % 4;
    uint32_t v = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int n = nt * 16 + g + 8 * (i & 1);
      const int k = kt * 64 + 16 * s + 2 * t + 8 * ((i >> 1) & 1) + (i >> 2);
      const uint32_t word = uint32_t(awq[int64_t(k) * (N / 8) + n / 8]);
      v |= ((word >> (4 * awq_nibble(n % 8))) & 0xFu) << (4 * i);
    }
    tiled[idx] = int32_t(v);
  }
}

__global__ void meta_kernel(const int32_t* qzeros, const __half* scales, int groups, int N, __half* meta) {
  const int64_t total = int64_t(groups) * N;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t grp = idx / N;
    const int n = int(idx % N), nt = n / 16, r = n % 16;
    const uint32_t word = uint32_t(qzeros[grp * (N / 8) + n / 8]);
    const int zero = int((word >> (4 * awq_nibble(n % 8))) & 0xFu);
    __half* dst = meta + ((grp * (N / 16) + nt) * 8 + r % 8) * 4 + r / 8;
    dst[0] = __int2half_rn(1024 + zero);
    dst[2] = scales[idx];
  }
}

int grid_for(int64_t total, int threads) {
  return int(std::min<int64_t>((total + threads - 1) / threads, 65535));
}

constexpr int kWarps = 4;   // warps per block, each taking every 4th 64-input tile of the block's range
constexpr int kTilesN = 2;  // 16-output tiles per block: 32 outputs
constexpr uint32_t kMagic = 0x64006400u;  // fp16 1024.0 in both halves

__device__ __forceinline__ uint32_t as_u32(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 as_h2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

// Two consecutive activations as the fp16 pair of a B fragment.
__device__ __forceinline__ uint32_t load_pair(const __half* p) {
  return __ldg(reinterpret_cast<const uint32_t*>(p));
}
__device__ __forceinline__ uint32_t load_pair(const __nv_bfloat16* p) {
  return as_u32(__float22half2_rn(__bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p))));
}
__device__ __forceinline__ uint32_t load_pair(const float* p) {
  return as_u32(__float22half2_rn(__ldg(reinterpret_cast<const float2*>(p))));
}

// c[16 outputs x 8 rows] += a[16 x 16] b[16 x 8], fp16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One int32 of the tiled layout -> the A fragment, w = (q - zero) * scale. The magic-number decode gives
// 1024 + q exactly; subtracting 1024 + zero (integers below 2048 are exact in fp16) and one multiply
// round w once, as the CPU reference rounded to fp16 would. Folding both into a single fma(1024 + q,
// scale, -(1024 + zero) * scale) would round the constant at ~1030 * scale: an error up to scale / 2 per
// weight, as large as the quantization step itself, so the fold stops at the exact subtraction.
__device__ __forceinline__ void dequant(uint32_t v, __half2 zg, __half2 zg8, __half2 sg, __half2 sg8,
                                        uint32_t (&a)[4]) {
  a[0] = as_u32(__hmul2(__hsub2(as_h2((v & 0x000f000fu) | kMagic), zg), sg));
  a[1] = as_u32(__hmul2(__hsub2(as_h2(((v >> 4) & 0x000f000fu) | kMagic), zg8), sg8));
  a[2] = as_u32(__hmul2(__hsub2(as_h2(((v >> 8) & 0x000f000fu) | kMagic), zg), sg));
  a[3] = as_u32(__hmul2(__hsub2(as_h2(((v >> 12) & 0x000f000fu) | kMagic), zg8), sg8));
}

__device__ __forceinline__ uint32_t component(const uint4& w, int s) {
  return s == 0 ? w.x : s == 1 ? w.y : s == 2 ? w.z : w.w;
}

// Grid (N / 32, splits), kWarps warps. Block (bn, split) computes outputs [32 bn, 32 bn + 32) over the
// input tiles of its split for all M <= 8 * MT rows; its warps reduce through shared memory. With
// splits > 1 each block writes fp32 partials and the last block of a column range to arrive (a counter
// per range) sums them in split order, so results do not depend on arrival order.
template <class T, int MT>
__global__ void __launch_bounds__(kWarps * 32)
    gemv_kernel(const T* __restrict__ x, int M, int K, int N, int group, const uint4* __restrict__ qweight,
                const uint2* __restrict__ meta, int k_tiles, float* partials, int* counters, T* out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int bn = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int KT = K / 64, NT = N / 16;
  const int kt_end = min(KT, (split + 1) * k_tiles);
  float acc[kTilesN][MT][4] = {};

  // A tile's weights and its (zero, scale) meta for both 32-input halves (group 32 changes group mid tile).
  struct Tile {
    uint4 w[kTilesN];
    uint2 meta[2][kTilesN];
  };
  auto load = [&](int kt, Tile& tile) {
#pragma unroll
    for (int j = 0; j < kTilesN; ++j) {
      tile.w[j] = __ldg(qweight + (int64_t(bn * kTilesN + j) * KT + kt) * 32 + lane);
#pragma unroll
      for (int half = 0; half < 2; ++half)
        tile.meta[half][j] =
            __ldg(meta + ((kt * 64 + half * 32) / group * int64_t(NT) + bn * kTilesN + j) * 8 + g);
    }
  };
  int kt = split * k_tiles + warp;
  Tile cur, next;
  if (kt < kt_end) load(kt, cur);
  for (; kt < kt_end; kt += kWarps) {
    // The next tile is requested before this one is used: two tiles in flight per warp. Version 1 loaded
    // the meta here, unprefetched: its first touch waited on DRAM every tile and the GEMV reached 1.33
    // TB/s on an H200 (docs/benchmarks.md).
    if (kt + kWarps < kt_end) load(kt + kWarps, next);
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int k = kt * 64 + s * 16 + 2 * t;
      uint32_t b[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row = mt * 8 + g;
        const T* p = x + int64_t(min(row, M - 1)) * K + k;
        b[mt][0] = row < M ? load_pair(p) : 0u;
        b[mt][1] = row < M ? load_pair(p + 8) : 0u;
      }
#pragma unroll
      for (int j = 0; j < kTilesN; ++j) {
        const __half2 z = as_h2(cur.meta[s / 2][j].x), sc = as_h2(cur.meta[s / 2][j].y);
        uint32_t a[4];
        dequant(component(cur.w[j], s), __low2half2(z), __high2half2(z), __low2half2(sc), __high2half2(sc),
                a);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma(acc[j][mt], a, b[mt][0], b[mt][1]);
      }
    }
    cur = next;
  }

  constexpr int kValues = kTilesN * MT * 4;
  __shared__ float red[kWarps][kValues][32];
#pragma unroll
  for (int j = 0; j < kTilesN; ++j)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 4; ++c) red[warp][(j * MT + mt) * 4 + c][lane] = acc[j][mt][c];
  __syncthreads();

  // Element e = value index * 32 + lane of the accumulator layout -> (row, output column).
  auto position = [&](int e, int& row, int& col) {
    const int v = e / 32, l = e % 32, c = v % 4, mt = v / 4 % MT, j = v / 4 / MT;
    row = mt * 8 + 2 * (l % 4) + (c & 1);
    col = bn * 32 + j * 16 + l / 4 + (c >> 1) * 8;
  };
  for (int e = threadIdx.x; e < kValues * 32; e += kWarps * 32) {
    int row, col;
    position(e, row, col);
    if (row >= M) continue;
    float sum = 0.f;
#pragma unroll
    for (int w2 = 0; w2 < kWarps; ++w2) sum += red[w2][e / 32][e % 32];
    if (splits == 1)
      out[int64_t(row) * N + col] = from_f32<T>(sum);
    else
      partials[(int64_t(split) * M + row) * N + col] = sum;
  }
  if (splits == 1) return;

  __threadfence();
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) last = atomicAdd(&counters[bn], 1) == splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int e = threadIdx.x; e < kValues * 32; e += kWarps * 32) {
    int row, col;
    position(e, row, col);
    if (row >= M) continue;
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) sum += __ldcg(partials + (int64_t(s) * M + row) * N + col);
    out[int64_t(row) * N + col] = from_f32<T>(sum);
  }
  if (threadIdx.x == 0) counters[bn] = 0;
}

// One thread per (output n, 16 inputs): gathers the four lanes' int32 that hold them and writes 16
// consecutive weights of row n (coalesced along the row).
template <class T>
__global__ void dequant_kernel(int K, int N, int group, const uint32_t* qweight, const __half* meta,
                               T* dense) {
  const int64_t total = int64_t(N) * (K / 16);
  const int KT = K / 64;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int n = int(idx / (K / 16)), ks = int(idx % (K / 16)), kt = ks / 4, s = ks % 4;
    const int nt = n / 16, g = n % 8, hi = n % 16 / 8;
    const int64_t grp = (kt * 64 + s * 16) / group;
    const __half* m = meta + ((grp * (N / 16) + nt) * 8 + g) * 4;
    const float zero = __half2float(m[hi]) - 1024.f, scale = __half2float(m[2 + hi]);
    alignas(16) T vals[16];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const uint32_t v = qweight[((int64_t(nt) * KT + kt) * 32 + 4 * g + t) * 4 + s];
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // nibble hi + 2i' (i = 0, 1) and + 4: columns 2t(+8), 2t+1(+8)
        const int nib = hi + 2 * (i >> 1) + 4 * (i & 1);
        const int col = 2 * t + 8 * (i >> 1) + (i & 1);
        vals[col] = from_f32<T>((float((v >> (4 * nib)) & 0xFu) - zero) * scale);
      }
    }
    uint4* dst = reinterpret_cast<uint4*>(dense + int64_t(n) * K + ks * 16);
#pragma unroll
    for (int i = 0; i < int(sizeof(vals) / 16); ++i) dst[i] = reinterpret_cast<const uint4*>(vals)[i];
  }
}

}  // namespace

void w4a16_relayout(const int32_t* awq_qweight, const int32_t* awq_qzeros, const void* awq_scales, int K,
                    int N, int group, int32_t* qweight, void* meta, cudaStream_t stream) {
  relayout_kernel<<<grid_for(int64_t(K) * N / 8, 256), 256, 0, stream>>>(awq_qweight, K, N, qweight);
  LMD_CUDA_LAUNCHED();
  meta_kernel<<<grid_for(int64_t(K / group) * N, 256), 256, 0, stream>>>(
      awq_qzeros, static_cast<const __half*>(awq_scales), K / group, N, static_cast<__half*>(meta));
  LMD_CUDA_LAUNCHED();
}

W4Plan w4a16_plan(int M, int K, int N, int sms) {
  W4Plan p;
  p.M = M;
  p.N = N;
  p.blocks_n = N / (16 * kTilesN);
  const int KT = K / 64;
  // Enough blocks for ~4 resident per SM (16 warps, two 1 KiB tile loads in flight each), but at least
  // two tiles per warp so that the partial sums stay a small part of the traffic.
  const int want = std::max(1, (4 * sms + p.blocks_n - 1) / p.blocks_n);
  const int most = std::max(1, KT / (2 * kWarps));
  p.k_tiles = (KT + std::min(want, most) - 1) / std::min(want, most);
  p.splits = (KT + p.k_tiles - 1) / p.k_tiles;
  return p;
}

void w4a16_gemv(DType dtype, const void* x, int K, int group, const int32_t* qweight, const void* meta,
                const W4Plan& plan, float* partials, int* counters, void* out, cudaStream_t stream) {
  if (plan.M < 1 || plan.M > kW4GemvMaxRows) fail("W4A16 GEMV: ", plan.M, " rows (1..", kW4GemvMaxRows, ")");
  const dim3 grid(plan.blocks_n, plan.splits);
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto kernel) {
      kernel<<<grid, kWarps * 32, 0, stream>>>(
          static_cast<const T*>(x), plan.M, K, plan.N, group, reinterpret_cast<const uint4*>(qweight),
          static_cast<const uint2*>(meta), plan.k_tiles, partials, counters, static_cast<T*>(out));
    };
    if (plan.M <= 8)
      launch(gemv_kernel<T, 1>);
    else if (plan.M <= 16)
      launch(gemv_kernel<T, 2>);
    else if (plan.M <= 32)
      launch(gemv_kernel<T, 4>);
    else
      launch(gemv_kernel<T, 8>);
  });
  LMD_CUDA_LAUNCHED();
}

void w4a16_dequantize(DType dtype, int K, int N, int group, const int32_t* qweight, const void* meta,
                      void* dense, cudaStream_t stream) {
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequant_kernel<T><<<grid_for(int64_t(N) * (K / 16), 256), 256, 0, stream>>>(
        K, N, group, reinterpret_cast<const uint32_t*>(qweight), static_cast<const __half*>(meta),
        static_cast<T*>(dense));
  });
  LMD_CUDA_LAUNCHED();
}

}  // namespace lmd::cuda
