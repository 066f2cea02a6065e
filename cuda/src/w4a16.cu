// W4A16 kernels (layout in w4a16.h): the AWQ -> tiled re-layout done once at load, the tensor-core GEMVs
// (version 5 up to 32 rows; the wide GEMV from 33, after copying x into fragment order), and the
// dequantization to a dense weight for cuBLAS at larger batches.
#include <algorithm>

#include "cp_async.cuh"
#include "cuda_check.h"
#include "device_types.cuh"
#include "gemv_input.cuh"
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
      const int k = kt * 64 + 16 * t + 4 * s + 2 * ((i >> 1) & 1) + (i >> 2);
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
    dst[0] = __int2half_rn(1024 + (r < 8 ? 1 : 16) * zero);
    dst[2] = scales[idx];
  }
}

int grid_for(int64_t total, int threads) {
  return int(std::min<int64_t>((total + threads - 1) / threads, 65535));
}

constexpr uint32_t kMagic = 0x64006400u;  // fp16 1024.0 in both halves

__device__ __forceinline__ uint32_t component(const uint4& w, int s) {
  return s == 0 ? w.x : s == 1 ? w.y : s == 2 ? w.z : w.w;
}
__device__ __forceinline__ __half2 as_half2(uint32_t v) { return *reinterpret_cast<const __half2*>(&v); }
__device__ __forceinline__ uint32_t as_u32(__half2 v) { return *reinterpret_cast<const uint32_t*>(&v); }

// Sixteen consecutive activations as fp16 (the tensor cores' input type for every activation dtype).
__device__ __forceinline__ void load_half16(const __half* src, uint32_t (&out)[8]) {
  const uint4 a = __ldg(reinterpret_cast<const uint4*>(src)),
              b = __ldg(reinterpret_cast<const uint4*>(src) + 1);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z,
  out[7] = b.w;
}
template <class T>
__device__ __forceinline__ void load_half16(const T* src, uint32_t (&out)[8]) {
  alignas(16) T v[16];
#pragma unroll
  for (int q = 0; q < int(sizeof(v)) / 16; ++q)
    reinterpret_cast<uint4*>(v)[q] = __ldg(reinterpret_cast<const uint4*>(src) + q);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = as_u32(__floats2half2_rn(to_f32(v[2 * i]), to_f32(v[2 * i + 1])));
}

// A fragments of a tile's four 16-input steps from a lane's 16-byte word and its meta: (1024 + zero,
// scale) of output g, (1024 + 16 zero, scale) of output g + 8. Output g + 8's nibbles are masked in place,
// so they come out as 1024 + 16 q and its products 16 times too large (exact; undone after the sums).
__device__ __forceinline__ void dequant_tile(const uint4& w, const uint2& m, uint32_t (&a)[4][4]) {
  const __half2 zero_lo = __low2half2(as_half2(m.x)), zero_hi = __high2half2(as_half2(m.x));
  const __half2 scale_lo = __low2half2(as_half2(m.y)), scale_hi = __high2half2(as_half2(m.y));
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const uint32_t v = component(w, s), v8 = v >> 8;
    const uint32_t q[4] = {(v & 0x000f000fu) | kMagic, (v & 0x00f000f0u) | kMagic,
                           (v8 & 0x000f000fu) | kMagic, (v8 & 0x00f000f0u) | kMagic};
#pragma unroll
    for (int j = 0; j < 4; ++j)
      a[s][j] =
          as_u32(__hmul2(__hsub2(as_half2(q[j]), j & 1 ? zero_hi : zero_lo), j & 1 ? scale_hi : scale_lo));
  }
}

// Writes one strip's sums, lane (g, t)'s value v being output 16 nt + g + 8 (v >> 1) of row mt * 8 + 2t +
// (v & 1): straight from a block of one warp, else through `partial` ([warps][MT][4][32] floats), summed
// over the warps in warp order so that results do not depend on timing.
template <class T, int MT>
__device__ __forceinline__ void store_strip(const float (&sum)[MT][4], int M, int N, int nt, float* partial,
                                            T* out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (warps == 1) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int row = mt * 8 + 2 * (lane % 4) + (v & 1);
        if (row < M) out[int64_t(row) * N + nt * 16 + lane / 4 + 8 * (v >> 1)] = from_f32<T>(sum[mt][v]);
      }
    return;
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int v = 0; v < 4; ++v) partial[((warp * MT + mt) * 4 + v) * 32 + lane] = sum[mt][v];
  __syncthreads();
  for (int e = threadIdx.x; e < MT * 128; e += blockDim.x) {
    const int mt = e / 128, v = e / 32 % 4, l = e % 32;
    const int row = mt * 8 + 2 * (l % 4) + (v & 1);
    if (row >= M) continue;
    float total = 0.f;
    for (int i = 0; i < warps; ++i) total += partial[((i * MT + mt) * 4 + v) * 32 + l];
    out[int64_t(row) * N + nt * 16 + l / 4 + 8 * (v >> 1)] = from_f32<T>(total);
  }
}

// Version 5. Versions 1-4 (docs/benchmarks.md) gave each block 128 outputs and a long input range,
// staged the activations in shared memory and planned one wave of such blocks; they read 1.2-1.4 TB/s.
// Nsight Compute on version 4 (H100): 121 registers per thread, so 16 resident warps per SM, 11.6 achieved,
// 0.5 eligible per scheduler, and one wave of 192 blocks on 132 SMs, so 60 of them held twice the
// work of the rest. Version 5 is shaped like the dense GEMV that reads 88% of the copy bandwidth: many
// small blocks that the hardware schedules as SMs free up, no shared-memory staging and no barrier before
// the math. A block owns one 16-output strip and splits its input range over its warps (about 8 tiles of
// 512 bytes each); a warp keeps ring_tiles(MT) tiles in flight in a ring of registers. The warps' partial
// sums meet in shared memory in warp order, so results do not depend on timing. Each lane reads its
// activations straight from L1: the re-layout puts the 16 inputs a lane multiplies in one tile next to
// each other (32 bytes). Dequantization: (v & 0x000f000f) | 0x64006400 is (1024 + q, 1024 + q') in fp16,
// exactly; subtracting 1024 + zero is exact too, and one multiply by the scale rounds once, as the dense
// path does. Measured (Nsight Compute, docs/benchmarks.md): warps waited on loads (long scoreboard) 5-6
// cycles per issued instruction until each tile's activations were requested one tile ahead (2-4 since);
// neither more resident warps nor half the ALU work (the zero point as a second mma) helped.
//
// 16-byte weight loads per lane in flight (a ring of registers): 8, but 6 from four row tiles on, where 8
// took the kernel to 144 registers and one block per SM (24 and 32 rows 25% slower).
__host__ __device__ constexpr int ring_tiles(int mt) { return mt <= 2 ? 8 : 6; }
constexpr int kTilesPerWarp = 8;  // one round where the strip has enough of them for the warps
// Warps per block, at most: 8 at one row tile, held to 128 registers so that two blocks fit on an SM
// (three blocks at 85 registers, with a ring of 6 and no x prefetch, measured the same: the time went
// to waiting for x, not to too few warps); 16 at two row tiles, 8 beyond (more accumulators per warp).
__host__ __device__ constexpr int max_warps(int mt) { return mt == 2 ? 16 : 8; }
__host__ __device__ constexpr int min_blocks(int mt) { return mt == 1 ? 2 : 1; }

// x row mt * 8 + g of the 16 inputs this lane multiplies in tile kt (zero for rows >= M); `staged`: x is
// the fp16 rows a prologue put in shared memory.
template <class T>
__device__ __forceinline__ void load_x(const T* x, const __half* staged, int M, int K, int row, int k,
                                       uint32_t (&b)[8]) {
  if (row < M && staged != nullptr) {
    const uint4* src = reinterpret_cast<const uint4*>(staged + int64_t(row) * K + k);
    const uint4 lo = src[0], hi = src[1];
    b[0] = lo.x, b[1] = lo.y, b[2] = lo.z, b[3] = lo.w, b[4] = hi.x, b[5] = hi.y, b[6] = hi.z, b[7] = hi.w;
  } else if (row < M) {
    load_half16(x + int64_t(row) * K + k, b);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) b[i] = 0;
  }
}

// Grid N / 16 blocks of `warps` warps. Block nt computes outputs [16 nt, 16 nt + 16) for all M <= 8 MT
// rows; warp w covers input tiles [w * tiles_per_warp, +tiles_per_warp). With a prologue P (one row tile
// only) the block first stages the input rows in shared memory as fp16, after the warps' sums.
template <class T, int MT, GemvPrologueKind P>
__global__ void __launch_bounds__(max_warps(MT) * 32, min_blocks(MT))
    gemv_kernel(const T* __restrict__ x, int M, int K, int N, int group_shift,
                const uint4* __restrict__ qweight, const uint2* __restrict__ meta, int tiles_per_warp,
                T* __restrict__ out, PrologueArgs<T> pro, int partial_bytes) {
  extern __shared__ float partial[];  // [warps][MT][4 values][32 lanes], then the staged rows
  static_assert(P == GemvPrologueKind::None || MT == 1);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int nt = blockIdx.x, NT = N / 16, KT = K / 64;
  const int kt_begin = warp * tiles_per_warp, kt_end = min(KT, kt_begin + tiles_per_warp);
  chain_release();

  // Weights and meta are never written during a step: the first round is requested before waiting for
  // the kernel that writes x.
  constexpr int kTilesPerRound = ring_tiles(MT);
  uint4 w[kTilesPerRound];
  uint2 m[kTilesPerRound];
  const uint4* strip = qweight + int64_t(nt) * KT * 32 + lane;
  auto load = [&](int kt, int d) {
    if (kt < kt_end) {
      w[d] = __ldcs(strip + kt * 32);
      m[d] = __ldg(meta + (int64_t((kt * 64 + 16 * t) >> group_shift) * NT + nt) * 8 + g);
    }
  };
#pragma unroll
  for (int d = 0; d < kTilesPerRound; ++d) load(kt_begin + d, d);
  chain_wait();
  __half* staged = nullptr;
  if constexpr (P != GemvPrologueKind::None) {
    staged = reinterpret_cast<__half*>(reinterpret_cast<char*>(partial) + partial_bytes);
    stage_gemv_input<P>(pro, M, K, staged);
  }

  // Accumulator value v of lane (g, t): output 16 nt + g + 8 (v >> 1), row mt * 8 + 2t + (v & 1). An mma
  // waits for the one before it on the same accumulators, so the steps of a tile rotate over kChains sets.
  constexpr int kChains = MT == 2 ? 2 : 1;
  // x fragments: up to two row tiles, all of them, requested one tile ahead; beyond, one row tile at a time.
  constexpr int kEarlyX = MT <= 2 ? MT : 1;
  float acc[MT][kChains][4] = {};
  uint32_t xs[2][kEarlyX][8];
  if constexpr (MT <= 2)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) load_x(x, staged, M, K, mt * 8 + g, kt_begin * 64 + 16 * t, xs[0][mt]);
  for (int base = kt_begin; base < kt_end; base += kTilesPerRound) {
#pragma unroll
    for (int d = 0; d < kTilesPerRound; ++d) {
      const int kt = base + d;
      if (kt >= kt_end) break;
      // x of the next tile is requested now, one tile ahead of its use (kTilesPerRound is even, so the
      // parity of d is that of the tile's place in the warp's range).
      uint32_t(&b)[kEarlyX][8] = xs[d & 1];
      if constexpr (MT <= 2)
        if (kt + 1 < kt_end)
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
            load_x(x, staged, M, K, mt * 8 + g, (kt + 1) * 64 + 16 * t, xs[(d + 1) & 1][mt]);
      uint32_t a[4][4];
      dequant_tile(w[d], m[d], a);
      // The slot is free: request the tile kTilesPerRound ahead, so that each warp keeps its loads in
      // flight while it computes.
      load(kt + kTilesPerRound, d);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (MT > 2) load_x(x, staged, M, K, mt * 8 + g, kt * 64 + 16 * t, b[0]);
        const uint32_t(&bm)[8] = b[MT <= 2 ? mt : 0];
#pragma unroll
        for (int s = 0; s < 4; ++s) Mma<__half>::run(acc[mt][s % kChains], a[s], bm[2 * s], bm[2 * s + 1]);
      }
    }
  }
  float sum[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      sum[mt][v] = acc[mt][0][v];
#pragma unroll
      for (int c = 1; c < kChains; ++c) sum[mt][v] += acc[mt][c][v];
      if (v >= 2) sum[mt][v] *= 1.f / 16;
    }

  store_strip<T, MT>(sum, M, N, nt, partial, out);
}

// Version 7, streaming (one row tile: 1-8 rows; off unless chosen, see W4Plan::stream). Version 5 reads
// 1.68 TB/s at one row (docs/benchmarks.md): each of its blocks requests its whole strip at once (a ring
// of 8 tiles a warp, in registers: 118 of them, so 16 warps an SM), then waits, computes and exits, so an
// SM's loads in flight rise and fall with its blocks. Here a persistent grid (as many blocks as fit on
// the SMs) walks strips blockIdx.x, + gridDim.x, ...; each warp keeps kStreamRing tiles of its flat
// sequence (its input range of one strip, then of the next) in flight through cp.async into a ring in
// shared memory, so the next strip's weights arrive while this one is computed and its sums are merged,
// and the ring costs no registers. Warps read only their own ring slots (cp.async.wait_group makes a
// thread's own copies visible to it), refilling a slot after the tile's mma has consumed it. A fused
// prologue stages the input rows once per block instead of once per strip.
constexpr unsigned kStreamRing = 8;  // a power of two
constexpr int kStreamMinBlocks = 3;
// Shared memory of a streaming block of `warps` warps: the rings (per slot and lane a 16-byte weight word
// and the 8-byte meta), two sets of warp sums (strips alternate between them, so one barrier a strip
// suffices), then any staged input rows.
__host__ __device__ constexpr int stream_ring_bytes(int warps) { return warps * kStreamRing * 32 * (16 + 8); }
__host__ __device__ constexpr int stream_partial_bytes(int warps) {
  return warps > 1 ? 2 * warps * 128 * 4 : 0;
}

template <class T, GemvPrologueKind P>
__global__ void __launch_bounds__(max_warps(1) * 32, kStreamMinBlocks)
    gemv_stream_kernel(const T* __restrict__ x, int M, int K, int N, int group_shift,
                       const uint4* __restrict__ qweight, const uint2* __restrict__ meta, int tiles_per_warp,
                       T* __restrict__ out, PrologueArgs<T> pro) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4,
            t = lane % 4;
  const int NT = N / 16, KT = K / 64;
  const int kt_begin = warp * tiles_per_warp, kt_end = min(KT, kt_begin + tiles_per_warp);
  // This lane's word of ring slot s: wring[32 s] and mring[32 s].
  uint4* wring = reinterpret_cast<uint4*>(smem) + warp * kStreamRing * 32 + lane;
  uint2* mring =
      reinterpret_cast<uint2*>(smem + warps * kStreamRing * 32 * 16) + warp * kStreamRing * 32 + lane;
  float* partial = reinterpret_cast<float*>(smem + stream_ring_bytes(warps));
  __half* staged = reinterpret_cast<__half*>(smem + stream_ring_bytes(warps) + stream_partial_bytes(warps));
  chain_release();

  // Requests the warp's next tile into ring slot `slot`. Weights and meta are never written during a
  // step, so the first round goes before waiting for the kernel that writes x. Offsets are 32-bit
  // (qweight holds N K / 32 words) and advance by one tile a call, jumping gridDim.x - 1 strips ahead at
  // the end of the warp's range of one; the slots' shared addresses are computed once.
  const uint32_t wdst = smem_addr(wring), mdst = smem_addr(mring);
  const unsigned span = unsigned(kt_end - kt_begin), first_k = unsigned(kt_begin) * 64 + 16 * t;
  const unsigned strip_jump = (gridDim.x * unsigned(KT) - span) * 32;
  unsigned next_nt = blockIdx.x, left = span,
           woff = (next_nt * unsigned(KT) + unsigned(kt_begin)) * 32 + lane, next_k = first_k;
  auto issue = [&](unsigned slot) {
    if (next_nt < unsigned(NT)) {
      cp_async16(wdst + slot * 512, qweight + woff);
      cp_async8(mdst + slot * 256, meta + ((next_k >> group_shift) * unsigned(NT) + next_nt) * 8 + g);
      woff += 32, next_k += 64;
      if (--left == 0) left = span, next_nt += gridDim.x, woff += strip_jump, next_k = first_k;
    }
    cp_async_commit();  // possibly empty, so that a tile's group is always the oldest of kStreamRing
  };
#pragma unroll
  for (unsigned slot = 0; slot < kStreamRing; ++slot) issue(slot);
  chain_wait();
  const __half* xs = nullptr;
  if constexpr (P != GemvPrologueKind::None) {
    stage_gemv_input<P>(pro, M, K, staged);
    xs = staged;
  }

  unsigned slot = 0;
  int sums = 0;
  for (int nt = blockIdx.x; nt < NT; nt += gridDim.x) {
    // Accumulator value v of lane (g, t): output 16 nt + g + 8 (v >> 1), row 2t + (v & 1).
    float acc[4] = {};
    uint32_t b[2][8];  // x of this tile and the next, in turn
    load_x(x, xs, M, K, g, kt_begin * 64 + 16 * t, b[0]);
    auto tile = [&](int kt, const uint32_t(&cur)[8], uint32_t(&next)[8]) {
      if (kt + 1 < kt_end) load_x(x, xs, M, K, g, (kt + 1) * 64 + 16 * t, next);  // one tile ahead
      cp_async_wait<kStreamRing - 1>();
      uint4 w;
      uint2 m;
      asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w)
                   : "r"(wdst + slot * 512)
                   : "memory");
      asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];\n"
                   : "=r"(m.x), "=r"(m.y)
                   : "r"(mdst + slot * 256)
                   : "memory");
      uint32_t a[4][4];
      dequant_tile(w, m, a);
#pragma unroll
      for (int s = 0; s < 4; ++s) Mma<__half>::run(acc, a[s], cur[2 * s], cur[2 * s + 1]);
      issue(slot);  // after the mma: the slot's words have been read
      slot = (slot + 1) & (kStreamRing - 1);
    };
    int kt = kt_begin;
    for (; kt + 1 < kt_end; kt += 2) {
      tile(kt, b[0], b[1]);
      tile(kt + 1, b[1], b[0]);
    }
    if (kt < kt_end) tile(kt, b[0], b[1]);
    const float sum[1][4] = {{acc[0], acc[1], acc[2] * (1.f / 16), acc[3] * (1.f / 16)}};
    store_strip<T, 1>(sum, M, N, nt, partial + sums * warps * 128, out);
    sums ^= 1;
  }
}

// Sixteen halves of x: [8 mt + g][64 kt + 16 t + 8 h + j] at xf[((mt KT + kt) 2 + h) 32 + lane][j] (lane =
// 4g + t; zero for rows >= M), the order in which the wide GEMV's lanes read them. A warp's 16-byte load
// is then 512 contiguous bytes (4 cache lines; from x itself it touches 8 rows, 8 lines half used), and
// 16-bit or fp32 activations become fp16 once instead of in every block.
template <class T>
__global__ void fragment_x_kernel(const T* __restrict__ x, int M, int K, int MT, uint4* __restrict__ xf) {
  chain_release();
  chain_wait();
  const int KT = K / 64;
  const int64_t total = int64_t(MT) * KT * 64;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int lane = int(idx % 32), h = int(idx / 32 % 2);
    const int64_t tile = idx / 64;
    const int kt = int(tile % KT), row = int(tile / KT) * 8 + lane / 4;
    uint32_t v[8] = {};
    if (row < M) load_half16(x + int64_t(row) * K + kt * 64 + 16 * (lane % 4), v);
    xf[idx] = h == 0 ? make_uint4(v[0], v[1], v[2], v[3]) : make_uint4(v[4], v[5], v[6], v[7]);
  }
}

// The GEMV from eight row tiles (33+ rows) on. There a tile's activations are 16 times its weight bytes,
// and version 5 spent its time reading them: a warp that multiplies them into two strips instead of one
// reads half as many per weight byte, and reads them in fragment order (fragment_x_kernel). Measured on
// an H100 (docs/benchmarks.md): 64 rows of a Llama-2-7B layer set 6.95 -> 4.77 ms; at 17-32 rows, where
// version 5 is faster (3.28 against 3.71 ms at 32 rows), version 5 runs. Grid N / 32
// blocks; block b computes outputs [32 b, 32 b + 32) for all M <= 8 MT rows, warp w over input tiles
// [w * tiles_per_warp, +tiles_per_warp), kWideRing tiles of both strips in flight.
constexpr int kWideWarps = 8, kWideRing = 4;
template <class T, int MT>
__global__ void __launch_bounds__(kWideWarps * 32, 1)
    gemv_wide_kernel(const uint4* __restrict__ xf, int M, int K, int N, int group_shift,
                     const uint4* __restrict__ qweight, const uint2* __restrict__ meta, int tiles_per_warp,
                     T* __restrict__ out) {
  extern __shared__ float partial[];  // [warps][MT][4 values][32 lanes], one strip at a time
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int warps = blockDim.x / 32, NT = N / 16, KT = K / 64, nt0 = 2 * blockIdx.x;
  const int kt_begin = warp * tiles_per_warp, kt_end = min(KT, kt_begin + tiles_per_warp);
  chain_release();

  uint4 w[kWideRing][2];
  uint2 m[kWideRing][2];
  auto load = [&](int kt, int d) {
    if (kt < kt_end)
#pragma unroll
      for (int sp = 0; sp < 2; ++sp) {
        w[d][sp] = __ldcs(qweight + (int64_t(nt0 + sp) * KT + kt) * 32 + lane);
        m[d][sp] = __ldg(meta + (int64_t((kt * 64 + 16 * t) >> group_shift) * NT + nt0 + sp) * 8 + g);
      }
  };
#pragma unroll
  for (int d = 0; d < kWideRing; ++d) load(kt_begin + d, d);
  chain_wait();

  // Accumulator value v of lane (g, t) for strip sp: output 16 (nt0 + sp) + g + 8 (v >> 1), row
  // mt * 8 + 2t + (v & 1).
  float acc[2][MT][4] = {};
  for (int base = kt_begin; base < kt_end; base += kWideRing) {
#pragma unroll
    for (int d = 0; d < kWideRing; ++d) {
      const int kt = base + d;
      if (kt >= kt_end) break;
      uint32_t a[2][4][4];
#pragma unroll
      for (int sp = 0; sp < 2; ++sp) dequant_tile(w[d][sp], m[d][sp], a[sp]);
      load(kt + kWideRing, d);
      const uint4* xt = xf + int64_t(kt) * 64 + lane;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint4 lo = __ldg(xt + int64_t(mt) * KT * 64), hi = __ldg(xt + int64_t(mt) * KT * 64 + 32);
        const uint32_t b[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
        for (int sp = 0; sp < 2; ++sp)
#pragma unroll
          for (int s = 0; s < 4; ++s) Mma<__half>::run(acc[sp][mt], a[sp][s], b[2 * s], b[2 * s + 1]);
      }
    }
  }
#pragma unroll
  for (int sp = 0; sp < 2; ++sp)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc[sp][mt][2] *= 1.f / 16, acc[sp][mt][3] *= 1.f / 16;

#pragma unroll
  for (int sp = 0; sp < 2; ++sp) {
    if (sp > 0 && warps > 1) __syncthreads();  // the first strip's sums have been read
    store_strip<T, MT>(acc[sp], M, N, nt0 + sp, partial, out);
  }
}

int row_tiles(int M) { return M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8; }

// One thread per (tile, lane): lane (g, t)'s 16-byte word holds inputs 16t..16t+15 of the tile for
// outputs g and g + 8 (w4a16.h). The same magic-number decode as the GEMV, so both paths round alike:
// (v >> 8i') & 0x000f000f with i' = 0, 1 gives inputs 4s..4s+1 and 4s+2..4s+3 of output g, and the mask
// 0x00f000f0 those of output g + 8.
__device__ __forceinline__ void store16(const uint32_t (&h)[8], __half* dst) {
  reinterpret_cast<uint4*>(dst)[0] = make_uint4(h[0], h[1], h[2], h[3]);
  reinterpret_cast<uint4*>(dst)[1] = make_uint4(h[4], h[5], h[6], h[7]);
}
template <class T>
__device__ __forceinline__ void store16(const uint32_t (&h)[8], T* dst) {
  alignas(16) T v[16];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float2 f = __half22float2(as_half2(h[i]));
    v[2 * i] = from_f32<T>(f.x);
    v[2 * i + 1] = from_f32<T>(f.y);
  }
#pragma unroll
  for (int q = 0; q < int(sizeof(v)) / 16; ++q)
    reinterpret_cast<uint4*>(dst)[q] = reinterpret_cast<const uint4*>(v)[q];
}

template <class T>
__global__ void dequant_kernel(int K, int N, int group, const uint4* qweight, const uint2* meta, T* dense) {
  const int64_t total = int64_t(N / 16) * (K / 64) * 32;
  const int KT = K / 64;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int lane = int(idx % 32), g = lane / 4, t = lane % 4;
    const int64_t tile = idx / 32;
    const int kt = int(tile % KT), nt = int(tile / KT);
    const int k0 = kt * 64 + 16 * t;
    const uint2 m = meta[(int64_t(k0 / group) * (N / 16) + nt) * 8 + g];
    const uint4 word = qweight[idx];
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const __half2 zero = hi ? __high2half2(as_half2(m.x)) : __low2half2(as_half2(m.x));
      const __half2 scale = hi ? __high2half2(as_half2(m.y)) : __low2half2(as_half2(m.y));
      const uint32_t mask =
          hi ? 0x00f000f0u : 0x000f000fu;  // output g + 8: 16 times too large, as in the GEMV
      uint32_t h[8];
#pragma unroll
      for (int s = 0; s < 4; ++s)
#pragma unroll
        for (int pair = 0; pair < 2; ++pair) {
          const uint32_t v = component(word, s) >> (8 * pair);
          __half2 r = __hmul2(__hsub2(as_half2((v & mask) | kMagic), zero), scale);
          if (hi) r = __hmul2(r, __float2half2_rn(1.f / 16));
          h[2 * s + pair] = as_u32(r);
        }
      store16(h, dense + int64_t(nt * 16 + g + 8 * hi) * K + k0);
    }
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

W4Plan w4a16_plan(int M, int K, int N, int stream_sms) {
  W4Plan p;
  p.M = M;
  p.N = N;
  const int KT = K / 64, mt = row_tiles(std::min(M, kW4GemvChunkRows));
  p.wide = mt == 8;
  // About kTilesPerWarp tiles per warp, up to the block's most warps (beyond that each warp streams more
  // rounds through its ring); then the range spread evenly over them.
  p.warps = std::clamp((KT + kTilesPerWarp - 1) / kTilesPerWarp, 1, p.wide ? kWideWarps : max_warps(mt));
  p.tiles_per_warp = (KT + p.warps - 1) / p.warps;
  p.warps = (KT + p.tiles_per_warp - 1) / p.tiles_per_warp;
  p.smem_bytes = p.warps > 1 ? p.warps * mt * 128 * int(sizeof(float)) : 0;
  if (stream_sms > 0 && mt == 1) {
    p.stream = true;
    p.sms = stream_sms;
    p.smem_bytes = stream_ring_bytes(p.warps) + stream_partial_bytes(p.warps);
  }
  return p;
}

bool w4a16_prologue_supported(DType dtype, int M, int K) {
  return (dtype == DType::F16 || dtype == DType::BF16) && M >= 1 && row_tiles(M) == 1 &&
         int64_t(M) * K * 2 <= kGemvPrologueMaxBytes;
}

void w4a16_gemv(DType dtype, const void* x, int K, int group, const int32_t* qweight, const void* meta,
                const W4Plan& plan, void* x_fragments, void* out, cudaStream_t stream,
                const GemvPrologue& pro) {
  if (plan.M < 1) fail("W4A16 GEMV: ", plan.M, " rows");
  if (pro.kind != GemvPrologueKind::None && !w4a16_prologue_supported(dtype, plan.M, K))
    fail("W4A16 GEMV: no fused prologue for ", plan.M, " rows of ", K, " ", dtype_name(dtype), " inputs");
  const int group_shift = __builtin_ctz(unsigned(group)), mt = row_tiles(std::min(plan.M, kW4GemvChunkRows));
  auto* xf = static_cast<uint4*>(x_fragments);
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    // kW4GemvChunkRows rows a launch (the wide GEMV's fragments of x hold that many).
    for (int row = 0; row < plan.M; row += kW4GemvChunkRows) {
      const int rows = std::min(kW4GemvChunkRows, plan.M - row);
      const T* xc = static_cast<const T*>(x) + int64_t(row) * K;
      T* oc = static_cast<T*>(out) + int64_t(row) * plan.N;
      auto launch = [&](auto kernel, size_t staged_bytes = 0) {
        launch_chained(kernel, plan.N / 16, plan.warps * 32, plan.smem_bytes + staged_bytes, stream, xc, rows,
                       K, plan.N, group_shift, reinterpret_cast<const uint4*>(qweight),
                       static_cast<const uint2*>(meta), plan.tiles_per_warp, oc, prologue_args<T>(pro),
                       plan.smem_bytes);
      };
      auto launch_wide = [&](auto kernel) {
        launch_chained(fragment_x_kernel<T>, grid_for(int64_t(mt) * (K / 64) * 64, 256), 256, 0, stream, xc,
                       rows, K, mt, xf);
        launch_chained(kernel, plan.N / 32, plan.warps * 32, plan.smem_bytes, stream,
                       static_cast<const uint4*>(xf), rows, K, plan.N, group_shift,
                       reinterpret_cast<const uint4*>(qweight), static_cast<const uint2*>(meta),
                       plan.tiles_per_warp, oc);
      };
      const size_t staged = size_t(rows) * K * sizeof(__half);
      auto launch_stream = [&](auto kernel, size_t staged_bytes = 0) {
        const size_t smem = plan.smem_bytes + staged_bytes;
        const int blocks = std::min(plan.N / 16, resident_blocks(kernel, plan.warps * 32, smem) * plan.sms);
        launch_chained(kernel, blocks, plan.warps * 32, smem, stream, xc, rows, K, plan.N, group_shift,
                       reinterpret_cast<const uint4*>(qweight), static_cast<const uint2*>(meta),
                       plan.tiles_per_warp, oc, prologue_args<T>(pro));
      };
      if (plan.stream) {
        if constexpr (sizeof(T) == 2) {
          if (pro.kind == GemvPrologueKind::AddNorm) {
            launch_stream(gemv_stream_kernel<T, GemvPrologueKind::AddNorm>, staged);
            continue;
          }
          if (pro.kind == GemvPrologueKind::SiluMul) {
            launch_stream(gemv_stream_kernel<T, GemvPrologueKind::SiluMul>, staged);
            continue;
          }
        }
        launch_stream(gemv_stream_kernel<T, GemvPrologueKind::None>);
        continue;
      }
      if constexpr (sizeof(T) == 2) {  // fused prologues take 16-bit activations only
        if (pro.kind == GemvPrologueKind::AddNorm) {
          launch(gemv_kernel<T, 1, GemvPrologueKind::AddNorm>, staged);
          continue;
        }
        if (pro.kind == GemvPrologueKind::SiluMul) {
          launch(gemv_kernel<T, 1, GemvPrologueKind::SiluMul>, staged);
          continue;
        }
      }
      switch (mt) {
        case 1:
          launch(gemv_kernel<T, 1, GemvPrologueKind::None>);
          break;
        case 2:
          launch(gemv_kernel<T, 2, GemvPrologueKind::None>);
          break;
        case 4:
          launch(gemv_kernel<T, 4, GemvPrologueKind::None>);
          break;
        default:
          launch_wide(gemv_wide_kernel<T, 8>);
          break;
      }
    }
  });
  LMD_CUDA_LAUNCHED();
}

void w4a16_dequantize(DType dtype, int K, int N, int group, const int32_t* qweight, const void* meta,
                      void* dense, cudaStream_t stream) {
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequant_kernel<T><<<grid_for(int64_t(N / 16) * (K / 64) * 32, 256), 256, 0, stream>>>(
        K, N, group, reinterpret_cast<const uint4*>(qweight), static_cast<const uint2*>(meta),
        static_cast<T*>(dense));
  });
  LMD_CUDA_LAUNCHED();
}

}  // namespace lmd::cuda
