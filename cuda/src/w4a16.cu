// W4A16 kernels (layout in w4a16.h): the AWQ -> tiled re-layout done once at load, the tensor-core GEMV
// for small batches, and the dequantization to a dense weight for cuBLAS at larger batches.
#include <algorithm>
#include <type_traits>

#include "cuda_check.h"
#include "device_types.cuh"
#include "launch.cuh"
#include "mma.cuh"
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

constexpr uint32_t kMagic = 0x64006400u;  // fp16 1024.0 in both halves

// Four 8x8 fp16 matrices from shared memory; lane L gives the address of row L % 8 of matrix L / 8.
__device__ __forceinline__ void ldmatrix_x4(const __half* p, uint32_t (&r)[4]) {
  const uint32_t addr = uint32_t(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ uint32_t component(const uint4& w, int s) {
  return s == 0 ? w.x : s == 1 ? w.y : s == 2 ? w.z : w.w;
}

// Eight activations as fp16 (the tensor cores' input type for every activation dtype).
__device__ __forceinline__ uint4 to_half8(const __half (&v)[8]) { return *reinterpret_cast<const uint4*>(v); }
template <class T>
__device__ __forceinline__ uint4 to_half8(const T (&v)[8]) {
  alignas(16) __half h[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) h[i] = __float2half_rn(to_f32(v[i]));
  return *reinterpret_cast<const uint4*>(h);
}

// Version 4. Version 1 (4 warps x 32 outputs per block, activations re-read from global memory inside
// the tile loop, one 1 KiB tile per warp in flight) read 1.3 TB/s on an H200. Version 2 staged the
// activations in 256-input chunks with a block barrier per chunk (0.9 TB/s on an H100: at most two chunks
// in flight per warp, and 1.1-1.3 waves). Version 3 staged a block's whole input range once and kept 8
// tiles per warp in flight in registers with no barrier, in one wave: 1.2 TB/s. It spent ~100
// instructions per 512-byte tile on each warp, half of them the dequantization (shift, mask, subtract the
// zero, multiply by the scale for every pair of weights), with 16 warps per SM to hide the latency.
// Now the tensor cores take the magic-number values as they come out of the mask (1024 + q for the low
// nibble of a byte, 1024 + 16 q for the high one, both exact in fp16) and the zero point and scale are
// applied once per group and output: sum_k x_k (q_k - z) s = s (sum_k x_k (1024 + q_k) - (1024 + z)
// sum_k x_k), with sum_k x_k per row and group computed while x is staged. The products are exact in the
// fp32 accumulators; the 1024 offset costs 10 of their 24 bits (~1e-4 relative). A pair of weights costs
// one LOP3 (plus one shift per 8 weights), the meta sits in shared memory, and the register ring holds
// 16 tiles (8 KiB per warp) in flight.
constexpr int kWarps = 8;                      // warps per block, one 16-output strip each
constexpr int kOutputsPerBlock = 16 * kWarps;  // 128
constexpr int kZeroHalves = 8;                 // one 16-byte zero row for ldmatrix lanes of rows >= M

__host__ __device__ constexpr int ring_tiles(int mt) { return mt == 1 ? 16 : mt == 2 ? 8 : 4; }
__host__ __device__ constexpr int blocks_per_sm(int mt) { return mt <= 2 ? 2 : 1; }
constexpr int smem_budget(int mt) { return mt <= 2 ? 110 * 1024 : 200 * 1024; }

// Shared memory of a block: x [M][tiles * 64 + 8] fp16 (rows padded by 16 bytes so the 8 rows of an
// ldmatrix fall in different banks), the zero row, sum x [M][groups] fp32, meta [groups][8 strips][8][4].
struct SmemLayout {
  int stride, groups, xsum_off, meta_off, bytes;  // offsets and size in bytes
  __host__ __device__ SmemLayout(int M, int tiles, int group) {
    stride = tiles * 64 + 8;
    groups = (tiles * 64 + group - 1) / group + 1;  // a range may start and end mid-group
    xsum_off = (M * stride + kZeroHalves) * 2;
    meta_off = (xsum_off + M * groups * 4 + 15) / 16 * 16;
    bytes = meta_off + groups * kWarps * 8 * 4 * 2;
  }
};

// Grid (ceil(N / 128), splits). Block (bn, split) computes outputs [128 bn, 128 bn + 128) over the input
// tiles [split * tiles_per_split, +tiles_per_split) for all M <= 8 * MT rows. With splits > 1 each block
// writes fp32 partials and the last block of a column range to arrive (a counter per range) sums them in
// split order, so results do not depend on arrival order. group is a power of two >= 32.
template <class T, int MT>
__global__ void __launch_bounds__(kWarps * 32, blocks_per_sm(MT))
    gemv_kernel(const T* __restrict__ x, int M, int K, int N, int group, const uint4* __restrict__ qweight,
                const __half* __restrict__ meta, int tiles_per_split, float* partials, int* counters,
                T* out) {
  constexpr int D = ring_tiles(MT);
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int NT = N / 16, KT = K / 64;
  const int nt = blockIdx.x * kWarps + warp;
  const bool has_strip = nt < NT;  // the last block of a width that is not a multiple of 128 idles some
  const int split = blockIdx.y, splits = gridDim.y;
  const int kt_begin = split * tiles_per_split, kt_end = min(KT, kt_begin + tiles_per_split);
  const int gshift = __ffs(group) - 1;
  const int k_begin = kt_begin * 64, k_end = kt_end * 64, first_group = k_begin >> gshift;
  const SmemLayout L(M, tiles_per_split, group);
  __half* xs = reinterpret_cast<__half*>(smem);
  float* xsum = reinterpret_cast<float*>(smem + L.xsum_off);
  __half* meta_s = reinterpret_cast<__half*>(smem + L.meta_off);

  chain_release();
  uint4 w[D];
  auto load = [&](int kt, int d) {
    if (has_strip && kt < kt_end) w[d] = __ldcs(qweight + (int64_t(nt) * KT + kt) * 32 + lane);
  };
#pragma unroll
  for (int d = 0; d < D; ++d) load(kt_begin + d, d);
  // The block's zeros and scales: 512 contiguous bytes per group. Weights and meta are never written
  // during a step, so they are requested before waiting for the kernel that writes x.
  const int groups = ((k_end - 1) >> gshift) - first_group + 1;
  for (int i = threadIdx.x; i < groups * 32; i += kWarps * 32) {
    const int gl = i / 32, part = i % 32, strip = blockIdx.x * kWarps + part / 4;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (strip < NT)
      v = __ldg(reinterpret_cast<const uint4*>(meta + (int64_t(first_group + gl) * NT + strip) * 32) +
                part % 4);
    reinterpret_cast<uint4*>(meta_s)[i] = v;
  }
  for (int i = threadIdx.x; i < M * groups; i += kWarps * 32) xsum[i] = 0.f;
  chain_wait();
  __syncthreads();

  // Stage x[0..M)[k_begin, k_end) as fp16 and sum each row's values per group (as fp16, what the tensor
  // cores see).
  const int stride = L.stride, vecs_per_row = (k_end - k_begin) / 8;
  for (int i = threadIdx.x; i < M * vecs_per_row; i += kWarps * 32) {
    const int row = i / vecs_per_row, v = i % vecs_per_row;
    const T* src = x + int64_t(row) * K + k_begin + v * 8;
    alignas(16) T vals[8];
#pragma unroll
    for (int q = 0; q < int(sizeof(T)) / 2; ++q)
      reinterpret_cast<uint4*>(vals)[q] = __ldg(reinterpret_cast<const uint4*>(src) + q);
    const uint4 h = to_half8(vals);
    *reinterpret_cast<uint4*>(xs + row * stride + v * 8) = h;
    float sum = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) sum += __half2float(reinterpret_cast<const __half*>(&h)[e]);
    atomicAdd(xsum + row * groups + ((k_begin + v * 8) >> gshift) - first_group, sum);
  }
  if (threadIdx.x == 0) *reinterpret_cast<uint4*>(xs + M * stride) = make_uint4(0, 0, 0, 0);
  __syncthreads();

  // ldmatrix row addresses of this lane (row lane % 8 of each 8-row tile; rows >= M read the zero row).
  const __half* xrow[MT];
  bool row_ok[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row = mt * 8 + lane % 8;
    row_ok[mt] = row < M;
    xrow[mt] = row_ok[mt] ? xs + row * stride + lane / 8 * 8 : xs + M * stride;
  }

  // gacc: this group's sums of x (1024 + q) (outputs g) and x (1024 + 16 q) (outputs g + 8); acc: the
  // folded outputs. Accumulator value v of lane (g, t) is row mt * 8 + 2t + (v & 1), output
  // 16 nt + g + 8 (v >> 1).
  float acc[MT][4] = {}, gacc[MT][4] = {};
  auto fold = [&](int k) {  // the group holding input k is complete
    const int gl = (k >> gshift) - first_group;
    const uint2 m = *reinterpret_cast<const uint2*>(meta_s + ((gl * kWarps + warp) * 8 + g) * 4);
    const float2 zero = __half22float2(*reinterpret_cast<const __half2*>(&m.x));  // 1024 + z
    const float2 scale = __half22float2(*reinterpret_cast<const __half2*>(&m.y));
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int row = mt * 8 + 2 * t + (v & 1);
        const float sx = row < M ? xsum[row * groups + gl] : 0.f;
        if (v < 2)
          acc[mt][v] = fmaf(scale.x, gacc[mt][v] - zero.x * sx, acc[mt][v]);
        else  // (1024 + 16 q) / 16 = 64 + q: subtract 64 + z = (1024 + z) - 960
          acc[mt][v] = fmaf(scale.y, fmaf(gacc[mt][v], 1.f / 16, -(zero.y - 960.f) * sx), acc[mt][v]);
        gacc[mt][v] = 0.f;
      }
  };

  if (has_strip) {
    for (int base = kt_begin; base < kt_end; base += D) {
#pragma unroll
      for (int d = 0; d < D; ++d) {
        const int kt = base + d;
        if (kt >= kt_end) break;
        const int col = (kt - kt_begin) * 64;
#pragma unroll
        for (int s2 = 0; s2 < 2; ++s2) {  // 16-input steps 2 s2 and 2 s2 + 1: one ldmatrix per 8 rows
          uint32_t b[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)  // zero-row lanes stay on their 16 bytes
            ldmatrix_x4(row_ok[mt] ? xrow[mt] + col + s2 * 32 : xrow[mt], b[mt]);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t v = component(w[d], 2 * s2 + h), v8 = v >> 8;
            const uint32_t a[4] = {(v & 0x000f000fu) | kMagic, (v & 0x00f000f0u) | kMagic,
                                   (v8 & 0x000f000fu) | kMagic, (v8 & 0x00f000f0u) | kMagic};
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) Mma<__half>::run(gacc[mt], a, b[mt][2 * h], b[mt][2 * h + 1]);
            const int k_next = kt * 64 + (2 * s2 + h + 1) * 16;
            if ((k_next & (group - 1)) == 0 || k_next == k_end) fold(k_next - 1);
          }
        }
        load(kt + D, d);
      }
    }
  }

  if (has_strip) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int row = mt * 8 + 2 * t + (v & 1), col = nt * 16 + g + 8 * (v >> 1);
        if (row >= M) continue;
        if (splits == 1)
          out[int64_t(row) * N + col] = from_f32<T>(acc[mt][v]);
        else
          partials[(int64_t(split) * M + row) * N + col] = acc[mt][v];
      }
  }
  if (splits == 1) return;

  __threadfence();
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) last = atomicAdd(&counters[blockIdx.x], 1) == splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int e = threadIdx.x; e < M * kOutputsPerBlock; e += kWarps * 32) {
    const int row = e / kOutputsPerBlock, col = blockIdx.x * kOutputsPerBlock + e % kOutputsPerBlock;
    if (col >= N) continue;
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) sum += __ldcg(partials + (int64_t(s) * M + row) * N + col);
    out[int64_t(row) * N + col] = from_f32<T>(sum);
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}

int row_tiles(int M) { return M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8; }

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

W4Plan w4a16_plan(int M, int K, int N, int group, int sms) {
  W4Plan p;
  p.M = M;
  p.N = N;
  p.blocks_n = (N / 16 + kWarps - 1) / kWarps;
  const int KT = K / 64, mt = row_tiles(M);
  // One wave: as many splits as fill the resident block slots, no more (each split adds partial sums to
  // write and re-read, and a second, partial wave would run alone at the end).
  const int slots = blocks_per_sm(mt) * sms;
  int splits = std::clamp(slots / p.blocks_n, 1, KT);
  p.tiles_per_split = (KT + splits - 1) / splits;
  // Then as many more as the staged activations need to fit in shared memory.
  while (p.tiles_per_split > 1 && SmemLayout(M, p.tiles_per_split, group).bytes > smem_budget(mt))
    --p.tiles_per_split;
  p.splits = (KT + p.tiles_per_split - 1) / p.tiles_per_split;
  p.smem_bytes = SmemLayout(M, p.tiles_per_split, group).bytes;
  return p;
}

void w4a16_gemv(DType dtype, const void* x, int K, int group, const int32_t* qweight, const void* meta,
                const W4Plan& plan, float* partials, int* counters, void* out, cudaStream_t stream) {
  if (plan.M < 1 || plan.M > kW4GemvMaxRows) fail("W4A16 GEMV: ", plan.M, " rows (1..", kW4GemvMaxRows, ")");
  const dim3 grid(plan.blocks_n, plan.splits);
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto kernel, auto mt) {
      // Above 48 KiB a kernel must opt in to its dynamic shared memory; once per instantiation.
      static const bool opted_in = [&] {
        LMD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            smem_budget(decltype(mt)::value)));
        return true;
      }();
      (void)opted_in;
      launch_chained(Chain::Always, kernel, grid, kWarps * 32, plan.smem_bytes, stream, x, plan.M, K, plan.N,
                     group, reinterpret_cast<const uint4*>(qweight), meta, plan.tiles_per_split, partials,
                     counters, out);
    };
    switch (row_tiles(plan.M)) {
      case 1:
        launch(gemv_kernel<T, 1>, std::integral_constant<int, 1>{});
        break;
      case 2:
        launch(gemv_kernel<T, 2>, std::integral_constant<int, 2>{});
        break;
      case 4:
        launch(gemv_kernel<T, 4>, std::integral_constant<int, 4>{});
        break;
      default:
        launch(gemv_kernel<T, 8>, std::integral_constant<int, 8>{});
        break;
    }
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
