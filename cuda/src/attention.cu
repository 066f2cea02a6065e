// Causal grouped-query attention over the paged KV cache. Version 1 (attention_kernel) serves every
// case: CUDA cores, fp32 math. Version 2 (decode_kernel) runs one-token items, version 3 (prefill_kernel,
// tensor cores) multi-token items over fp16/bf16 caches of head_dim 64 or 128; each says below what it
// replaced and why.
//
// Work item (AttnWork) x KV head = one block of 4 warps (16 for decode items of small batches). The item's
// rows are up to kAttnMaxRows (token, query head) pairs of one KV-head group, so every K/V row loaded from
// the cache serves the whole group (GQA) and several tokens (prefill). The item's cache range [kv_begin,
// kv_end) is cut into 32-key tiles dealt round-robin to the warps; each warp keeps its own online-softmax
// state (running max m, sum l, accumulator) per row, with no block barrier in the loop; the warps' states are
// merged at the end. Long decode contexts are split over several items (split-K): each writes (m, l, acc) to
// a partial slot, and the splits are merged by the last one to finish (decode_kernel) or by combine_kernel
// after the attention launch. The score matrix is never materialised.
//
// Layouts: q rows are read from qkv [tokens, (heads + 2 kv_heads) * head_dim]; out [tokens, heads *
// head_dim]; a partial slot is float [kv_heads, max_rows, 2 + head_dim] = (m, l, acc[head_dim]).
#include <algorithm>
#include <type_traits>

#include "cp_async.cuh"
#include "cuda_check.h"
#include "kv_cache.cuh"
#include "launch.cuh"
#include "mma.cuh"

namespace lmd::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kTile = 32;  // keys per warp tile: one per lane in the score step

__device__ __forceinline__ float2 load2(const __half* p) { return __half22float2(*(const __half2*)p); }
__device__ __forceinline__ float2 load2(const __nv_bfloat16* p) {
  return __bfloat1622float2(*(const __nv_bfloat162*)p);
}
__device__ __forceinline__ float2 load2(const float* p) { return make_float2(p[0], p[1]); }

// Row stride of the shared K/V tiles in elements: an odd number of 4-byte words, so the 32 lanes
// reading the same column of 32 different keys hit 32 different banks.
__host__ __device__ constexpr int tile_stride(int head_dim, int elem_bytes) {
  return elem_bytes == 4 ? head_dim + 1 : head_dim + 2;
}

// Output element d of one row merged from its splits' (m, l, acc) partial slots, `slot` pointing at the
// first split's and the others `split_stride` floats apart. Splits are summed in split order, so the
// result does not depend on which split finished first. Read through L2 (__ldcg): in decode_kernel the
// slots were written by other blocks of the running grid. The three loads of a split do not wait for its
// test, so that they can be in flight together.
__device__ __forceinline__ float merge_splits(const float* slot, int64_t split_stride, int splits, int d) {
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, __ldcg(slot + s * split_stride));
  float lsum = 0.f, a = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float* p = slot + s * split_stride;
    const float m = __ldcg(p), l = __ldcg(p + 1), acc = __ldcg(p + 2 + d);
    if (m == -INFINITY) continue;  // an empty split (past the context in a graph step)
    const float f = expf(m - mx);
    lsum += l * f;
    a += acc * f;
  }
  return a / lsum;
}

// Loads keys [start, start + 32) of K and V into shared memory (dequantizing an int8/int4 cache);
// rows past kv_end are zero so that 0-weighted V rows cannot inject NaN.
template <class T>
__device__ void load_tile(const KvGeometry& g, const int* blocks, int kvhead, int start, int kv_end,
                          const void* cache, const uint16_t* params, T* k_s, T* v_s, int stride, int lane) {
  const int hd = g.head_dim;
  if (g.quant_bits == 0) {
    const int chunks = hd * int(sizeof(T)) / 16;  // 16-byte loads from global memory
    for (int i = lane; i < kTile * chunks; i += 32) {
      const int key = i / chunks, c = i % chunks, pos = start + key;
      uint4 kx = make_uint4(0, 0, 0, 0), vx = kx;
      if (pos < kv_end) {
        const int block = blocks[pos / g.block_len], slot = pos % g.block_len;
        const T* base = static_cast<const T*>(cache);
        kx = reinterpret_cast<const uint4*>(base + cache_row(g, block, 0, kvhead, slot) * hd)[c];
        vx = reinterpret_cast<const uint4*>(base + cache_row(g, block, 1, kvhead, slot) * hd)[c];
      }
      // Shared rows are only 4-byte aligned (odd word stride), so store as words.
      uint32_t* kd = reinterpret_cast<uint32_t*>(k_s + key * stride) + c * 4;
      uint32_t* vd = reinterpret_cast<uint32_t*>(v_s + key * stride) + c * 4;
      kd[0] = kx.x, kd[1] = kx.y, kd[2] = kx.z, kd[3] = kx.w;
      vd[0] = vx.x, vd[1] = vx.y, vd[2] = vx.z, vd[3] = vx.w;
    }
    return;
  }
  const int row_bytes = kv_row_bytes(g), words = row_bytes / 4, per_word = g.quant_bits == 8 ? 4 : 8;
  for (int i = lane; i < 2 * kTile * words; i += 32) {
    const int kv = i / (kTile * words), key = (i / words) % kTile, c = i % words, pos = start + key;
    T* dst = (kv == 0 ? k_s : v_s) + key * stride + c * per_word;
    if (pos >= kv_end) {
      for (int e = 0; e < per_word; ++e) dst[e] = from_f32<T>(0.f);
      continue;
    }
    const int64_t index = cache_row(g, blocks[pos / g.block_len], kv, kvhead, pos % g.block_len);
    const uint32_t q =
        reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(cache) + index * row_bytes)[c];
    const float scale = __half2float(__ushort_as_half(params[index * 2]));
    const float zero = __half2float(__ushort_as_half(params[index * 2 + 1]));
    const int bits = g.quant_bits, mask = (1 << bits) - 1;
    for (int e = 0; e < per_word; ++e) dst[e] = from_f32<T>(float((q >> (bits * e)) & mask) * scale + zero);
  }
}

// DPL: head dims per lane in the P*V step (head_dim <= 32 * DPL); MAXR: rows per item.
template <class T, int DPL, int MAXR>
__global__ void __launch_bounds__(kWarps * 32)
    attention_kernel(const T* qkv, int heads, KvGeometry g, const AttnWork* work, const int* blocks,
                     const void* cache, const uint16_t* params, float* partials, T* out, float scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  const AttnWork w = work[blockIdx.x];
  const int kvhead = blockIdx.y, hd = g.head_dim, group = heads / g.kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rows = w.token_count * w.head_count;
  const int64_t qkv_row = int64_t(heads + 2 * g.kv_heads) * hd;
  const int stride = tile_stride(hd, sizeof(T));
  float* q_s = reinterpret_cast<float*>(smem);  // [MAXR][hd]
  T* k_s = reinterpret_cast<T*>(q_s + MAXR * hd) + warp * 2 * kTile * stride;
  T* v_s = k_s + kTile * stride;
  const int* seq_blocks = blocks + w.block_off;

  for (int i = threadIdx.x; i < rows * hd; i += blockDim.x) {
    const int r = i / hd, d = i % hd;
    const int token = w.token_begin + r / w.head_count,
              head = kvhead * group + w.head_begin + r % w.head_count;
    q_s[i] = to_f32(qkv[token * qkv_row + int64_t(head) * hd + d]);
  }
  __syncthreads();

  float m[MAXR], l[MAXR], acc[MAXR][DPL];
#pragma unroll
  for (int r = 0; r < MAXR; ++r) {
    m[r] = -INFINITY, l[r] = 0.f;
#pragma unroll
    for (int k = 0; k < DPL; ++k) acc[r][k] = 0.f;
  }
  const int tiles = (w.kv_end - w.kv_begin + kTile - 1) / kTile;
  for (int tile = warp; tile < tiles; tile += kWarps) {
    const int start = w.kv_begin + tile * kTile;
    load_tile(g, seq_blocks, kvhead, start, w.kv_end, cache, params, k_s, v_s, stride, lane);
    __syncwarp();
    const int key_pos = start + lane;
    const bool key_valid = key_pos < w.kv_end;
#pragma unroll
    for (int r = 0; r < MAXR; ++r) {
      if (r >= rows) break;
      const int qpos = w.first_pos + r / w.head_count;
      float s = -INFINITY;
      if (key_valid && key_pos <= qpos) {
        const float* q = q_s + r * hd;
        const T* k = k_s + lane * stride;
        float dot = 0.f;
        for (int d = 0; d < hd; d += 2) {
          const float2 kk = load2(k + d);
          dot += q[d] * kk.x + q[d + 1] * kk.y;
        }
        s = dot * scale;
      }
      const float m_new = fmaxf(m[r], warp_max(s));
      if (m_new == -INFINITY) continue;  // every key of this tile is in the row's future
      const float p = expf(s - m_new), corr = expf(m[r] - m_new);
      m[r] = m_new;
      l[r] = l[r] * corr + p;  // per lane; summed over the warp at the end
#pragma unroll
      for (int k = 0; k < DPL; ++k) acc[r][k] *= corr;
#pragma unroll 4
      for (int j = 0; j < kTile; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
        const T* vrow = v_s + j * stride + lane * DPL;
#pragma unroll
        for (int k = 0; k < DPL; ++k)
          if (lane * DPL + k < hd) acc[r][k] += pj * to_f32(vrow[k]);
      }
    }
    __syncwarp();  // the next tile overwrites this warp's K/V tile
  }

  // Merge the warps' states; the K/V tiles' shared memory is reused for it.
  __syncthreads();
  float* merge = reinterpret_cast<float*>(q_s + MAXR * hd);  // [warps][MAXR][2 + hd]
#pragma unroll
  for (int r = 0; r < MAXR; ++r) {
    if (r >= rows) break;
    const float lsum = warp_sum(l[r]);
    float* slot = merge + (warp * MAXR + r) * (2 + hd);
    if (lane == 0) slot[0] = m[r], slot[1] = lsum;
#pragma unroll
    for (int k = 0; k < DPL; ++k)
      if (lane * DPL + k < hd) slot[2 + lane * DPL + k] = acc[r][k];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < rows * hd; i += blockDim.x) {
    const int r = i / hd, d = i % hd;
    float mx = -INFINITY;
    for (int v = 0; v < kWarps; ++v) mx = fmaxf(mx, merge[(v * MAXR + r) * (2 + hd)]);
    float lsum = 0.f, a = 0.f;
    if (mx != -INFINITY) {
      for (int v = 0; v < kWarps; ++v) {
        const float* slot = merge + (v * MAXR + r) * (2 + hd);
        const float f = expf(slot[0] - mx);
        lsum += slot[1] * f;
        a += slot[2 + d] * f;
      }
    }
    const int token = w.token_begin + r / w.head_count,
              head = kvhead * group + w.head_begin + r % w.head_count;
    if (w.partial < 0) {
      out[int64_t(token) * heads * hd + int64_t(head) * hd + d] = from_f32<T>(a / lsum);
    } else {
      float* slot = partials + ((int64_t(w.partial) * g.kv_heads + kvhead) * MAXR + r) * (2 + hd);
      if (d == 0) slot[0] = mx, slot[1] = lsum;
      slot[2 + d] = a;
    }
  }
}

// One 16-byte vector of a cache row as E floats, before the row's (scale, zero) is applied. Quantized
// codes become exact integers without I2F (quarter rate on Hopper, which would make int4 decode compute-
// bound): the code is OR-ed into the mantissa of 2^23 and 2^23 subtracted (int8: one PRMT per byte).
// int4 nibble k of a word is masked in place, so it comes out as code * 16^k; weight(e) = 16^-k undoes
// that (the word is shifted by 12 once, so that k <= 4 keeps every nibble inside the mantissa).
template <class T, int BITS>
struct CacheVec;
template <class T>
struct CacheVec<T, 0> {
  static constexpr int E = 16 / sizeof(T);
  static __device__ __forceinline__ float weight(int) { return 1.f; }
  static __device__ __forceinline__ void unpack(const uint4& v, float (&x)[E]) {
    const T* t = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = to_f32(t[e]);
  }
};
template <class T>
struct CacheVec<T, 8> {
  static constexpr int E = 16;
  static __device__ __forceinline__ float weight(int) { return 1.f; }
  static __device__ __forceinline__ void unpack(const uint4& v, float (&x)[E]) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(&v);
#pragma unroll
    for (int e = 0; e < E; ++e)
      x[e] = __uint_as_float(__byte_perm(w[e / 4], 0x4B000000u, 0x7440u | (e % 4))) - 8388608.f;
  }
};
template <class T>
struct CacheVec<T, 4> {
  static constexpr int E = 32;
  static __device__ __forceinline__ int shift(int e) { return e % 8 < 3 ? 4 * (e % 8) : 4 * (e % 8 - 3); }
  static __device__ __forceinline__ float weight(int e) { return 1.f / float(1 << shift(e)); }
  static __device__ __forceinline__ void unpack(const uint4& v, float (&x)[E]) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(&v);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const uint32_t word = e % 8 < 3 ? w[e / 8] : w[e / 8] >> 12;
      x[e] = __uint_as_float((word & (0xFu << shift(e))) | 0x4B000000u) - 8388608.f;
    }
  }
};

// The end of a decode_kernel block that wrote a split's partial slot (rows [row0, row0 + rows) of KV head
// `kvhead`): the last of the item's split blocks to get here merges them into `out`, in place of a
// combine_kernel launch. Its counter (one per merge, KV head and row block) is zero before the launch, and
// that block sets it back to zero for the next one (a replayed graph step included). Not inlined: inlined,
// it changed the register allocation of decode_kernel's loop (int4 at R = 1: 167 registers instead of 128,
// a block fewer per SM).
template <class T>
__device__ __noinline__ void merge_if_last(int heads, KvGeometry g, const AttnCombine* combine, int merge,
                                           int kvhead, int row0, int rows, int max_rows,
                                           const float* partials, int* counters, T* out) {
  const AttnCombine c = combine[merge];
  const int hd = g.head_dim, group = heads / g.kv_heads;
  int* counter = counters + (int64_t(merge) * g.kv_heads + kvhead) * max_rows + row0;
  __threadfence();  // this block's partials are visible to the whole device before it is counted
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) last = atomicAdd(counter, 1) == c.splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int64_t split_stride = int64_t(g.kv_heads) * max_rows * (2 + hd);
  const float* first =
      partials + ((int64_t(c.first_partial) * g.kv_heads + kvhead) * max_rows + row0) * (2 + hd);
  for (int i = threadIdx.x; i < rows * hd; i += blockDim.x) {
    const int r = i / hd, d = i % hd, head = kvhead * group + c.head_begin + row0 + r;
    out[int64_t(c.token_begin) * heads * hd + int64_t(head) * hd + d] =
        from_f32<T>(merge_splits(first + r * (2 + hd), split_stride, c.splits, d));
  }
  if (threadIdx.x == 0) *counter = 0;
}

// HF rotate-half RoPE of one head row spread over `lanes` lanes, E dims each (lane sub holds dims
// sub * E .. sub * E + E - 1, lanes * E = head_dim; a dim's partner d +- head_dim / 2 is in lane
// sub ^ lanes / 2), computed and rounded to T as rope_kv_kernel does. All lanes of the warp call it.
template <class T, int E>
__device__ __forceinline__ void rope_rotate(float (&x)[E], int sub, int lanes, int hd, int pos,
                                            const float* freq) {
  const int half = hd / 2;
  float rotated[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const float partner = __shfl_xor_sync(0xffffffffu, x[e], lanes / 2);
    const int d = sub * E + e, f = d < half ? d : d - half;
    const float angle = float(pos) * freq[f];
    const float c = cosf(angle), s = sinf(angle);
    // Rounded as rope_kv_kernel pins it: x1 c - x2 s as fma(x1, c, -(x2 s)), x2 c + x1 s as
    // fma(x1, s, x2 c), each product inside rounded first (x1 is x[e] in the first half, the partner in
    // the second).
    rotated[e] =
        d < half ? __fmaf_rn(x[e], c, -__fmul_rn(partner, s)) : __fmaf_rn(partner, s, __fmul_rn(x[e], c));
  }
#pragma unroll
  for (int e = 0; e < E; ++e) x[e] = to_f32(from_f32<T>(rotated[e]));
}

// Decode items (one query token; version 2 of the decode path, for fp16/bf16/fp32 and int8/int4 caches).
// Version 1 (the kernel above) copies 32-key tiles through shared memory and had a single warp per 32 keys
// in flight: 20 us a layer at context 128 and 981 GB/s of K/V at context 4096 on an H200
// (docs/benchmarks.md); with int8/int4 caches on it, `lmd bench generation` at batch 64 x 2048 tokens ran
// slower than with fp16 (125.2 / 170.2 against 251.7 tok/s on an H100). Here K and V are read straight into
// registers: L = row bytes / 16 lanes hold one key's row as one 16-byte vector each (E = 8 fp16, 16 int8 or
// 32 int4 values), so a warp reads 32 / L keys per step and U steps are issued before any is used (U * 32 /
// L keys, 2 * U loads per lane in flight). Quantized rows are never dequantized element by element: with x
// = c * scale + zero,
//   q.k = scale * sum(q c) + zero * sum(q)  and  sum p v = sum (p scale) c + sum p zero,
// so each code costs one FMA, like an fp16 value. Each lane group keeps its own online-softmax state for
// its slice of the head dims; groups merge by shuffles, warps through shared memory, and the result (or the
// split's partial slot) is written as version 1 writes it. A block holds up to R rows (a register budget,
// see launch_decode); larger GQA groups are dealt over blockIdx.z, whose blocks read the same K/V close
// together in time (from L2, presumably; not measured).
// A split item's splits are merged by the last of its blocks to finish (merge_if_last) rather than by a
// combine_kernel launch after this one: that launch cost ~5 us a layer on an H100 in a Llama-2-7B batch-1
// graph step (where every item is split about 9 ways), half the time of this kernel.
// W warps a block: 4, or 16 where the batch's items leave SMs idle (plan_attention). With 4, the eighth
// session measured 13-16 us a layer for a 128-token context on an H100 (latency, not bandwidth: 0.5 MB of
// K/V), spent on 3 rounds of dependent loads a warp (block table, then K/V) and a merge of 2 splits
// through global memory. 16 warps take 128 keys in one round and merge in shared memory only.
//
// With ROPE (rope_kv_attention, 16-bit cache): q and k are read unrotated from qkv and rotated here, as
// rope_kv_kernel rotates them (rope_rotate), and the new token's key is not read from the cache: the item
// whose range ends at it stops one key short, adds that key from registers to warp 0's first lane group,
// and its blocks of blockIdx.z 0 write the token's K/V into the cache for later steps. No block reads what
// another writes, so no rope_kv_write launch (and wait) is needed before this one.
template <class T, int BITS, int R, bool ROPE, int W>
__global__ void __launch_bounds__(W * 32)
    decode_kernel(const T* qkv, int heads, KvGeometry g, const AttnWork* work, const AttnCombine* combine,
                  const int* blocks, const void* cache, const uint32_t* params, int lanes, int max_rows,
                  float* partials, int* counters, T* out, float scale, DecodeRope rope) {
  chain_release();
  using Vec = CacheVec<T, BITS>;
  constexpr int E = Vec::E;
  constexpr int U = 4;
  constexpr bool kWide = W == kAttnDecodeWideWarps;
  extern __shared__ __align__(16) unsigned char smem[];
  // The work item, the block table and the RoPE frequencies are uploaded by copies before the step's
  // kernels, never written by one: they may be read before chain_wait, while the previous kernel finishes.
  const AttnWork w = work[blockIdx.x];
  const int kvhead = blockIdx.y, hd = g.head_dim, group = heads / g.kv_heads, row0 = blockIdx.z * R;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, sub = lane % lanes, slot = lane / lanes;
  const int keys_per_step = 32 / lanes, rows = min(R, w.head_count - row0);
  // Nothing to do (uniform over the block): rows past the item's, or a graph step's empty split of an item
  // that its first split writes whole. Such a block still waits for the previous kernel before it exits,
  // so that this grid completes after it (launch.cuh).
  const bool idle = rows <= 0 || (kWide && w.partial < 0 && w.kv_begin >= w.kv_end);
  const int64_t qkv_row = int64_t(heads + 2 * g.kv_heads) * hd, row_bytes = int64_t(lanes) * 16;
  const int* seq_blocks = blocks + w.block_off;
  const unsigned char* data = static_cast<const unsigned char*>(cache);
  // ROPE: the item ends at the new token and takes it from registers (the last split that holds keys:
  // a graph step's empty splits past the context end there too).
  const bool new_key = ROPE && w.kv_begin < w.kv_end && w.kv_end == w.first_pos + 1;
  const int kv_end = new_key ? w.kv_end - 1 : w.kv_end;
  const float* freq = nullptr;
  if constexpr (ROPE) freq = rope.inv_freq + int64_t(rope.token_seq[w.token_begin]) * (hd / 2);
  // The cache blocks of a warp's U keys of a round. Wide blocks read them a round ahead of their K/V loads
  // (the first round's before chain_wait), so that a round waits for one load latency rather than two;
  // 4-warp blocks read each with its key's loads, as measured.
  const int step = U * keys_per_step;
  int key_block[U];
  auto read_key_blocks = [&](int base) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int pos = base + u * keys_per_step + slot;
      key_block[u] = pos < kv_end ? seq_blocks[pos / g.block_len] : 0;
    }
  };
  if (kWide && !idle) read_key_blocks(w.kv_begin + warp * step);
  chain_wait();
  if (idle) return;

  // q is pre-multiplied by the softmax scale and by weight(e); qsum is this lane's sum(q) for the
  // zero-point term. zacc carries sum(p zero) beside acc, which holds sum(p scale c) / weight(e).
  float q[R][E], qsum[R], m[R], l[R], acc[R][E], zacc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY, l[r] = 0.f, qsum[r] = 0.f, zacc[r] = 0.f;
    const T* qt = qkv + w.token_begin * qkv_row + int64_t(kvhead * group + w.head_begin + row0 + r) * hd;
#pragma unroll
    for (int e = 0; e < E; ++e) q[r][e] = r < rows ? to_f32(qt[sub * E + e]) : 0.f;
    if constexpr (ROPE) rope_rotate<T>(q[r], sub, lanes, hd, w.first_pos, freq);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      q[r][e] *= scale;
      qsum[r] += q[r][e];
      q[r][e] *= Vec::weight(e);
      acc[r][e] = 0.f;
    }
  }

  for (int base = w.kv_begin + warp * step; base < kv_end; base += W * step) {
    uint4 kx[U], vx[U];
    uint32_t kp[U], vp[U];  // (scale, zero) as two fp16 halves
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int pos = base + u * keys_per_step + slot;
      valid[u] = pos < kv_end;
      kx[u] = vx[u] = make_uint4(0, 0, 0, 0);
      kp[u] = vp[u] = 0;
      if (valid[u]) {
        const int block = kWide ? key_block[u] : seq_blocks[pos / g.block_len], at = pos % g.block_len;
        const int64_t krow = cache_row(g, block, 0, kvhead, at), vrow = cache_row(g, block, 1, kvhead, at);
        kx[u] = reinterpret_cast<const uint4*>(data + krow * row_bytes)[sub];
        vx[u] = reinterpret_cast<const uint4*>(data + vrow * row_bytes)[sub];
        if constexpr (BITS != 0) kp[u] = params[krow], vp[u] = params[vrow];
      }
    }
    if constexpr (kWide) read_key_blocks(base + W * step);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= rows) break;  // uniform over the block
      float sc[U], mx = m[r];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float x[E], dot = 0.f;
        Vec::unpack(kx[u], x);
#pragma unroll
        for (int e = 0; e < E; ++e) dot += q[r][e] * x[e];
        if constexpr (BITS != 0) {
          const float2 sz = __half22float2(*reinterpret_cast<const __half2*>(&kp[u]));
          dot = dot * sz.x + qsum[r] * sz.y;
        }
        for (int o = 1; o < lanes; o <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        sc[u] = valid[u] ? dot : -INFINITY;
        mx = fmaxf(mx, sc[u]);
      }
      // No branch on mx: lanes of other groups may still need this warp's shuffles.
      const float ref = mx == -INFINITY ? 0.f : mx, corr = expf(m[r] - ref);
      l[r] *= corr;
      zacc[r] *= corr;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[r][e] *= corr;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float p = expf(sc[u] - ref), x[E];
        l[r] += p;
        if constexpr (BITS != 0) {
          const float2 sz = __half22float2(*reinterpret_cast<const __half2*>(&vp[u]));
          zacc[r] += p * sz.y;
          p *= sz.x;
        }
        Vec::unpack(vx[u], x);
#pragma unroll
        for (int e = 0; e < E; ++e) acc[r][e] += p * x[e];
      }
      m[r] = mx;
    }
  }
  if constexpr (ROPE) {
    if (new_key) {  // uniform over the block
      const T* kt = qkv + w.token_begin * qkv_row + int64_t(heads + kvhead) * hd + sub * E;
      const T* vt = kt + int64_t(g.kv_heads) * hd;
      float k[E], v[E];
#pragma unroll
      for (int e = 0; e < E; ++e) k[e] = to_f32(kt[e]), v[e] = to_f32(vt[e]);
      rope_rotate<T>(k, sub, lanes, hd, w.first_pos, freq);
      const bool owner = warp == 0 && slot == 0;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r >= rows) break;  // uniform over the block
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) dot += q[r][e] * k[e];
        for (int o = 1; o < lanes; o <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (owner) {
          const float mx = fmaxf(m[r], dot), corr = expf(m[r] - mx), p = expf(dot - mx);
          l[r] = l[r] * corr + p;
#pragma unroll
          for (int e = 0; e < E; ++e) acc[r][e] = acc[r][e] * corr + p * v[e];
          m[r] = mx;
        }
      }
      if (owner && blockIdx.z == 0) {
        const int at = w.first_pos % g.block_len, block = seq_blocks[w.first_pos / g.block_len];
        alignas(16) T kr[E], vr[E];
#pragma unroll
        for (int e = 0; e < E; ++e) kr[e] = from_f32<T>(k[e]), vr[e] = from_f32<T>(v[e]);
        T* dst = static_cast<T*>(rope.cache);
        reinterpret_cast<uint4*>(dst + cache_row(g, block, 0, kvhead, at) * hd)[sub] =
            *reinterpret_cast<const uint4*>(kr);
        reinterpret_cast<uint4*>(dst + cache_row(g, block, 1, kvhead, at) * hd)[sub] =
            *reinterpret_cast<const uint4*>(vr);
      }
    }
  }
  if constexpr (BITS != 0)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int e = 0; e < E; ++e) acc[r][e] = acc[r][e] * Vec::weight(e) + zacc[r];

  // Merge the lane groups of each warp (lanes with equal `sub` hold the same dims), then the warps.
  float* merge = reinterpret_cast<float*>(smem);  // [W][R][2 + hd]
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= rows) break;
    for (int o = lanes; o < 32; o <<= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, m[r], o), ol = __shfl_xor_sync(0xffffffffu, l[r], o);
      const float mx = fmaxf(m[r], om), ref = mx == -INFINITY ? 0.f : mx;
      const float f = expf(m[r] - ref), of = expf(om - ref);
      l[r] = l[r] * f + ol * of;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[r][e] = acc[r][e] * f + __shfl_xor_sync(0xffffffffu, acc[r][e], o) * of;
      m[r] = mx;
    }
    float* dst = merge + (warp * R + r) * (2 + hd);
    if (lane == 0) dst[0] = m[r], dst[1] = l[r];
    if (slot == 0)
#pragma unroll
      for (int e = 0; e < E; ++e) dst[2 + sub * E + e] = acc[r][e];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < rows * hd; i += blockDim.x) {
    const int r = i / hd, d = i % hd;
    float mx = -INFINITY;
    for (int v = 0; v < W; ++v) mx = fmaxf(mx, merge[(v * R + r) * (2 + hd)]);
    float lsum = 0.f, a = 0.f;
    if (mx != -INFINITY) {
      for (int v = 0; v < W; ++v) {
        const float* src = merge + (v * R + r) * (2 + hd);
        const float f = expf(src[0] - mx);
        lsum += src[1] * f;
        a += src[2 + d] * f;
      }
    }
    const int head = kvhead * group + w.head_begin + row0 + r;
    if (w.partial < 0) {
      out[int64_t(w.token_begin) * heads * hd + int64_t(head) * hd + d] = from_f32<T>(a / lsum);
    } else {
      float* dst = partials + ((int64_t(w.partial) * g.kv_heads + kvhead) * max_rows + row0 + r) * (2 + hd);
      if (d == 0) dst[0] = mx, dst[1] = lsum;
      dst[2 + d] = a;
    }
  }
  if (w.partial >= 0)
    merge_if_last(heads, g, combine, w.combine, kvhead, row0, rows, max_rows, partials, counters, out);
}

// Multi-token items over an fp16/bf16 cache with head_dim 64 or 128 (version 3, tensor cores). Version 1
// above runs prompts on CUDA cores: a 2048-token Llama-2-7B prefill took 219 ms against transformers' 65
// (docs/benchmarks.md), most of it attention. Here one block of 4 warps takes an item of up to 128 rows
// (tokens x the group's heads, token-major as in version 1) and walks the item's cache range in 64-key
// tiles, flash-attention style:
//   S = Q K^T  (mma.sync m16n8k16, fp32 accumulators; each warp its 32 rows x 64 keys),
//   causal mask by position (row r is token first_pos + r / head_count), online softmax in registers,
//   O += P V   (P rounded to the activation type straight from S's accumulator registers, whose m16n8
//               layout is the A operand's of the next m16n8k16 product).
// K/V tiles come from the paged cache through cp.async into two shared-memory stages (the next tile loads
// while this one is multiplied); rows past kv_end are zero-filled so that 0-weighted V rows cannot
// inject NaN from unwritten cache slots. Shared rows are HD * 2 bytes, a multiple of 128, so the 16-byte
// chunk c of row r is stored at chunk c ^ (r % 8): the 8 rows one ldmatrix phase reads then hit 8
// different bank groups. Items are whole (kv_begin 0, never split; see plan_attention), and each writes
// its rows of `out` directly.
// Measured (one layer, 2048-token causal prompt, cuda/tools/attn_prefill_check.cu; H100 and H200 gave
// the same times): with 16 rows per warp (64-row items) Llama-2-7B took 0.324 ms (106 TFLOP/s) and
// InternLM2-1.8B 0.195 ms; each K/V fragment loaded by ldmatrix fed only one m16 tile. With 32 rows per
// warp every fragment feeds two, and the times fell to 0.265 ms (130 TFLOP/s) and 0.171 ms; 8192 tokens
// went from 141 to 203 TFLOP/s. At head_dim 128 the two tiles' accumulators leave no room for Q in
// registers (255 registers, a few spilled), so Q fragments are re-read from shared memory per tile.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

constexpr int kPrefillKeys = 64;                             // keys per tile
constexpr int kPrefillWarpRows = kAttnPrefillRows / kWarps;  // Q rows per warp, a multiple of 16
constexpr int kPrefillStages = 2;

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of HD-element 16-bit rows.
template <int HD>
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return uint32_t(row * HD * 2 + ((chunk ^ (row % 8)) * 16));
}

template <int HD>
constexpr size_t prefill_smem() {
  return size_t(kAttnPrefillRows + kPrefillStages * 2 * kPrefillKeys) * HD * 2;
}

template <class T, int HD>
__global__ void __launch_bounds__(kWarps * 32)
    prefill_kernel(const T* qkv, int heads, KvGeometry g, const AttnWork* work, const int* blocks,
                   const T* cache, T* out, float scale_log2) {
  static_assert(sizeof(T) == 2 && HD % 64 == 0);
  constexpr int kMTiles = kPrefillWarpRows / 16;       // m16 tiles per warp
  constexpr bool kQInRegisters = kMTiles * HD <= 128;  // else Q fragments are re-read per tile
  constexpr int kChunks = HD / 8;                      // 16-byte chunks per row
  constexpr int kRowsPerPass = kWarps * 32 / kChunks;  // rows one pass of the block's threads copies
  constexpr int kTileBytes = kPrefillKeys * HD * 2;
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t q_s = smem_addr(smem), kv_s = q_s + kAttnPrefillRows * HD * 2;  // kv_s: [stage][K, V]
  const AttnWork w = work[blockIdx.x];
  const int kvhead = blockIdx.y, group = heads / g.kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rows = w.token_count * w.head_count;
  const int64_t qkv_row = int64_t(heads + 2 * g.kv_heads) * HD;
  const int* seq_blocks = blocks + w.block_off;
  const int copy_chunk = threadIdx.x % kChunks, copy_row = threadIdx.x / kChunks;

  // Q rows past `rows` are zero: their scores stay finite and they are never written.
  for (int r = copy_row; r < kAttnPrefillRows; r += kRowsPerPass) {
    const T* src = qkv;
    if (r < rows) {
      const int token = w.token_begin + r / w.head_count,
                head = kvhead * group + w.head_begin + r % w.head_count;
      src = qkv + token * qkv_row + int64_t(head) * HD + copy_chunk * 8;
    }
    cp_async16(q_s + swizzled<HD>(r, copy_chunk), src, r < rows ? 16 : 0);
  }
  cp_async_commit();
  auto load_tile = [&](int start, int stage) {
    const uint32_t k_dst = kv_s + stage * 2 * kTileBytes, v_dst = k_dst + kTileBytes;
    for (int r = copy_row; r < kPrefillKeys; r += kRowsPerPass) {
      const int pos = start + r;
      const T *k_src = cache, *v_src = cache;
      if (pos < w.kv_end) {
        const int block = seq_blocks[pos / g.block_len], slot = pos % g.block_len;
        k_src = cache + cache_row(g, block, 0, kvhead, slot) * HD + copy_chunk * 8;
        v_src = cache + cache_row(g, block, 1, kvhead, slot) * HD + copy_chunk * 8;
      }
      const int bytes = pos < w.kv_end ? 16 : 0;
      cp_async16(k_dst + swizzled<HD>(r, copy_chunk), k_src, bytes);
      cp_async16(v_dst + swizzled<HD>(r, copy_chunk), v_src, bytes);
    }
  };
  const int tiles = (w.kv_end - w.kv_begin + kPrefillKeys - 1) / kPrefillKeys;
  load_tile(w.kv_begin, 0);
  cp_async_commit();

  // This thread's rows of the m16n8 accumulator layout: warp_row0 + mt * 16 + lane / 4 (+ 8).
  const int warp_row0 = warp * kPrefillWarpRows;
  int qpos[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      qpos[mt][h] = w.first_pos + (warp_row0 + mt * 16 + lane / 4 + 8 * h) / w.head_count;
  const int warp_rows = min(kPrefillWarpRows, rows - warp_row0);  // <= 0: the warp only helps to copy
  const int warp_last_pos = warp_rows > 0 ? w.first_pos + (warp_row0 + warp_rows - 1) / w.head_count : -1;
  // A fragments of the warp's Q rows, one per m16 tile and 16 dims.
  auto load_q = [&](uint32_t(&a)[4], int mt, int kk) {
    ldmatrix_x4(a, q_s + swizzled<HD>(warp_row0 + mt * 16 + lane % 16, kk * 2 + lane / 16));
  };

  cp_async_wait<1>();  // the Q group
  __syncthreads();
  uint32_t qf[kQInRegisters ? kMTiles : 1][kQInRegisters ? HD / 16 : 1][4];
  if constexpr (kQInRegisters) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) load_q(qf[mt][kk], mt, kk);
  }

  float o[kMTiles][HD / 8][4], m[kMTiles][2], l[kMTiles][2];  // m in log2 units
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.f;
#pragma unroll
    for (int j = 0; j < HD / 8; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
  }

  for (int t = 0; t < tiles; ++t) {
    const int start = w.kv_begin + t * kPrefillKeys;
    if (t + 1 < tiles) load_tile(start + kPrefillKeys, (t + 1) % kPrefillStages);
    cp_async_commit();  // possibly empty, so that "all but the newest group" is always tile t
    cp_async_wait<1>();
    __syncthreads();
    const uint32_t k_s = kv_s + (t % kPrefillStages) * 2 * kTileBytes, v_s = k_s + kTileBytes;
    if (start <= warp_last_pos) {
      float s[kMTiles][kPrefillKeys / 8][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int j = 0; j < kPrefillKeys / 8; ++j)
          s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        uint32_t qk[kQInRegisters ? 1 : kMTiles][4];
        if constexpr (!kQInRegisters)
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) load_q(qk[mt], mt, kk);
#pragma unroll
        for (int np = 0; np < kPrefillKeys / 16; ++np) {
          uint32_t b[4];  // keys np * 16 + [0, 8) then [8, 16); dims kk * 16 + [0, 8) then [8, 16) each
          ldmatrix_x4(b, k_s + swizzled<HD>(np * 16 + lane % 8 + (lane / 16) * 8, kk * 2 + (lane / 8) % 2));
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            if constexpr (kQInRegisters) {
              Mma<T>::run(s[mt][2 * np], qf[mt][kk], b[0], b[1]);
              Mma<T>::run(s[mt][2 * np + 1], qf[mt][kk], b[2], b[3]);
            } else {
              Mma<T>::run(s[mt][2 * np], qk[mt], b[0], b[1]);
              Mma<T>::run(s[mt][2 * np + 1], qk[mt], b[2], b[3]);
            }
          }
        }
      }
      // Keys after a row's position (causal) or past kv_end (which is past every row's position).
      if (start + kPrefillKeys - 1 > w.first_pos) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
          for (int j = 0; j < kPrefillKeys / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if (start + j * 8 + 2 * (lane % 4) + e % 2 > qpos[mt][e / 2]) s[mt][j][e] = -INFINITY;
      }
      uint32_t p[kMTiles][kPrefillKeys / 16][4];  // A fragments of P, one per m16 tile and 16 keys
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float mx = -INFINITY;
#pragma unroll
          for (int j = 0; j < kPrefillKeys / 8; ++j)
            mx = fmaxf(mx, fmaxf(s[mt][j][2 * h], s[mt][j][2 * h + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a row
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = fmaxf(m[mt][h], mx * scale_log2);
          const float ref = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet stays at zero
          const float corr = exp2f(m[mt][h] - ref);
          m[mt][h] = m_new;
          l[mt][h] *= corr;  // per lane; the row's lanes are summed at the end
#pragma unroll
          for (int j = 0; j < HD / 8; ++j) o[mt][j][2 * h] *= corr, o[mt][j][2 * h + 1] *= corr;
#pragma unroll
          for (int j = 0; j < kPrefillKeys / 8; ++j) {
            const float p0 = exp2f(s[mt][j][2 * h] * scale_log2 - ref),
                        p1 = exp2f(s[mt][j][2 * h + 1] * scale_log2 - ref);
            l[mt][h] += p0 + p1;
            p[mt][j / 2][(j % 2) * 2 + h] = Mma<T>::pack(p0, p1);
          }
        }
#pragma unroll
      for (int kk = 0; kk < kPrefillKeys / 16; ++kk)
#pragma unroll
        for (int dp = 0; dp < HD / 16; ++dp) {
          uint32_t b[4];  // keys kk * 16 + [0, 8) then [8, 16), dims dp * 16 + [0, 8); then dims + 8
          ldmatrix_x4_trans(
              b, v_s + swizzled<HD>(kk * 16 + lane % 8 + ((lane / 8) % 2) * 8, dp * 2 + lane / 16));
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            Mma<T>::run(o[mt][2 * dp], p[mt][kk], b[0], b[1]);
            Mma<T>::run(o[mt][2 * dp + 1], p[mt][kk], b[2], b[3]);
          }
        }
    }
    __syncthreads();  // the next iteration's copy overwrites this stage
  }

#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_row0 + mt * 16 + lane / 4 + 8 * h;
      float sum = l[mt][h];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      if (r >= rows) continue;
      const float inv = 1.f / sum;
      const int token = w.token_begin + r / w.head_count,
                head = kvhead * group + w.head_begin + r % w.head_count;
      T* dst = out + int64_t(token) * heads * HD + int64_t(head) * HD + 2 * (lane % 4);
#pragma unroll
      for (int j = 0; j < HD / 8; ++j)
        *reinterpret_cast<uint32_t*>(dst + j * 8) =
            Mma<T>::pack(o[mt][j][2 * h] * inv, o[mt][j][2 * h + 1] * inv);
    }
}

// The merges of the items that attention_kernel ran split.
template <class T>
__global__ void combine_kernel(int heads, KvGeometry g, const AttnCombine* combine, int max_rows,
                               const float* partials, T* out) {
  chain_release();
  chain_wait();
  const AttnCombine c = combine[blockIdx.x];
  const int kvhead = blockIdx.y, hd = g.head_dim, group = heads / g.kv_heads;
  const int rows = c.token_count * c.head_count;
  const int64_t split_stride = int64_t(g.kv_heads) * max_rows * (2 + hd);
  const float* first = partials + (int64_t(c.first_partial) * g.kv_heads + kvhead) * max_rows * (2 + hd);
  for (int i = threadIdx.x; i < rows * hd; i += blockDim.x) {
    const int r = i / hd, d = i % hd;
    const int token = c.token_begin + r / c.head_count,
              head = kvhead * group + c.head_begin + r % c.head_count;
    out[int64_t(token) * heads * hd + int64_t(head) * hd + d] =
        from_f32<T>(merge_splits(first + r * (2 + hd), split_stride, c.splits, d));
  }
}

template <int DPL>
constexpr int max_rows_for() {
  return DPL <= 4 ? 8 : 4;
}

size_t attention_smem(int head_dim, int elem_bytes, int max_rows) {
  const size_t q = size_t(max_rows) * head_dim * 4;
  const size_t tiles = size_t(kWarps) * 2 * kTile * tile_stride(head_dim, elem_bytes) * elem_bytes;
  const size_t merge = size_t(kWarps) * max_rows * (2 + head_dim) * 4;
  return q + std::max(tiles, merge);
}

template <class T, int HD>
void launch_prefill(const void* qkv, int heads, const KvGeometry& g, const AttnWork* work, int num_work,
                    const int* blocks, const void* cache, void* out, cudaStream_t stream) {
  constexpr size_t smem = prefill_smem<HD>();
  auto kernel = prefill_kernel<T, HD>;
  static bool configured = false;  // raising the dynamic shared-memory limit once per instantiation
  if (!configured) {
    LMD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    configured = true;
  }
  constexpr float kLog2e = 1.4426950408889634f;  // the kernel's softmax runs on exp2
  kernel<<<dim3(num_work, g.kv_heads), kWarps * 32, smem, stream>>>(
      static_cast<const T*>(qkv), heads, g, work, blocks, static_cast<const T*>(cache), static_cast<T*>(out),
      kLog2e / sqrtf(float(HD)));
  LMD_CUDA_LAUNCHED();
}

template <class T, int DPL>
void launch(const void* qkv, int heads, const KvGeometry& g, const AttnWork* work, int num_work,
            const int* blocks, const void* cache, const uint16_t* params, float* partials, void* out,
            cudaStream_t stream) {
  constexpr int kMaxRows = max_rows_for<DPL>();
  const size_t smem = attention_smem(g.head_dim, sizeof(T), kMaxRows);
  auto kernel = attention_kernel<T, DPL, kMaxRows>;
  static bool configured = false;  // raising the dynamic shared-memory limit once per instantiation
  if (!configured) {
    LMD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    configured = true;
  }
  const dim3 grid(num_work, g.kv_heads);
  kernel<<<grid, kWarps * 32, smem, stream>>>(static_cast<const T*>(qkv), heads, g, work, blocks, cache,
                                              params, partials, static_cast<T*>(out),
                                              1.f / sqrtf(float(g.head_dim)));
  LMD_CUDA_LAUNCHED();
}

// Lanes per key row for decode_kernel, or 0 where it does not apply: rows that are not a power-of-two
// number of 16-byte vectors up to 32 (head_dim 8 in any dtype, int4 below 32 dims, 96 dims in any dtype,
// fp32 at 256 dims); those decode items run version 1.
int decode_lanes(int elem_bytes, const KvGeometry& g) {
  const int row_bytes = g.quant_bits == 0 ? g.head_dim * elem_bytes : g.quant_bits * g.head_dim / 8;
  const int vectors = row_bytes / 16;
  if (row_bytes % 16 != 0 || vectors == 0 || vectors > 32) return 0;
  return (vectors & (vectors - 1)) == 0 ? vectors : 0;
}

template <class T, int BITS>
void launch_decode(const void* qkv, int heads, const KvGeometry& g, const AttnWork* work, int num_work,
                   const AttnCombine* combine, const int* blocks, const void* cache, const uint16_t* params,
                   int lanes, int rows, int warps, float* partials, int* counters, void* out,
                   const DecodeRope& rope, cudaStream_t stream) {
  // q and acc take 2 * R * E registers. Compiled for sm_90a: fp16 R = 8 fits (224 registers); int8
  // spills at R = 4 and int4 needs 255 at R = 2, so quantized caches keep R * E <= 32 (128 registers).
  // Wide blocks (16 warps) have 128 registers a thread at most: 2 rows of a 16-bit cache fit (124), int8
  // spills at R = 2, so quantized caches run one row a block.
  constexpr int E = CacheVec<T, BITS>::E, kMaxR = BITS == 0 ? std::min(8, 64 / E) : 32 / E;
  constexpr int kWideMaxR = BITS == 0 ? std::min(2, kMaxR) : 1;
  const int max_rows = attn_max_rows(g.head_dim);
  auto run = [&](auto kernel, int r, int w) {
    const size_t smem = size_t(w) * r * (2 + g.head_dim) * sizeof(float);
    const dim3 grid(num_work, g.kv_heads, (rows + r - 1) / r);
    launch_chained(kernel, grid, w * 32, smem, stream, qkv, heads, g, work, combine, blocks, cache,
                   reinterpret_cast<const uint32_t*>(params), lanes, max_rows, partials, counters, out,
                   1.f / sqrtf(float(g.head_dim)), rope);
    LMD_CUDA_LAUNCHED();
  };
  auto pick = [&](auto rope_tag) {
    constexpr bool kRope = decltype(rope_tag)::value;
    if (warps == kAttnDecodeWideWarps) {
      constexpr int W = kAttnDecodeWideWarps;
      if (rows <= 1 || kWideMaxR == 1) {
        run(decode_kernel<T, BITS, 1, kRope, W>, 1, W);
      } else {
        run(decode_kernel<T, BITS, kWideMaxR, kRope, W>, kWideMaxR, W);
      }
      return;
    }
    if (warps != kAttnDecodeWarps) fail("CUDA attention: decode blocks of ", warps, " warps");
    constexpr int W = kAttnDecodeWarps;
    if (rows <= 1 || kMaxR == 1) {
      run(decode_kernel<T, BITS, 1, kRope, W>, 1, W);
    } else if (rows <= 2 || kMaxR == 2) {
      run(decode_kernel<T, BITS, std::min(2, kMaxR), kRope, W>, std::min(2, kMaxR), W);
    } else if (rows <= 4 || kMaxR == 4) {
      run(decode_kernel<T, BITS, std::min(4, kMaxR), kRope, W>, std::min(4, kMaxR), W);
    } else {
      run(decode_kernel<T, BITS, kMaxR, kRope, W>, kMaxR, W);
    }
  };
  if constexpr (BITS == 0 && sizeof(T) == 2) {
    if (rope.inv_freq != nullptr) {
      pick(std::true_type{});
      return;
    }
  }
  if (rope.inv_freq != nullptr) fail("CUDA attention: rope_kv_attention takes 16-bit caches only");
  pick(std::false_type{});
}

int dims_per_lane(int head_dim) {
  if (head_dim % 8 != 0 || head_dim > 256)
    fail("CUDA attention: head_dim ", head_dim, " is not supported (a multiple of 8 up to 256 is)");
  return head_dim <= 32 ? 1 : head_dim <= 64 ? 2 : head_dim <= 128 ? 4 : 8;
}

}  // namespace

int attn_max_rows(int head_dim) { return dims_per_lane(head_dim) <= 4 ? kAttnMaxRows : kAttnMaxRows / 2; }

bool attn_decode_v2(int elem_bytes, const KvGeometry& g) { return decode_lanes(elem_bytes, g) > 0; }

bool attn_prefill_v3(int elem_bytes, const KvGeometry& g, int heads) {
  return elem_bytes == 2 && g.quant_bits == 0 && (g.head_dim == 64 || g.head_dim == 128) &&
         heads / g.kv_heads <= kAttnPrefillRows / 2;
}

int64_t attn_partial_floats(int num_partials, const KvGeometry& g) {
  return int64_t(num_partials) * g.kv_heads * attn_max_rows(g.head_dim) * (2 + g.head_dim);
}

// One per (merge, KV head, row): decode_kernel counts a row block's arrivals at its first row.
int64_t attn_counter_ints(int num_decode_combine, const KvGeometry& g) {
  return int64_t(num_decode_combine) * g.kv_heads * attn_max_rows(g.head_dim);
}

bool attn_decode_rope(int elem_bytes, const KvGeometry& g) {
  return elem_bytes == 2 && g.quant_bits == 0 && decode_lanes(elem_bytes, g) >= 2;
}

void attention(DType dtype, const void* qkv, int heads, const KvGeometry& g, const AttnWork* work,
               int num_work, int num_decode, int decode_rows, int decode_warps, const AttnCombine* combine,
               int num_combine, int num_decode_combine, const int* blocks, const void* cache,
               const uint16_t* params, float* partials, int* counters, void* out, cudaStream_t stream,
               const DecodeRope& rope) {
  if (num_work == 0) return;
  if (rope.inv_freq != nullptr && (num_decode != num_work || !attn_decode_rope(int(dtype_size(dtype)), g)))
    fail("CUDA attention: rope_kv_attention runs one-token items over a 16-bit cache only");
  const int dpl = dims_per_lane(g.head_dim);
  dispatch_float(dtype, [&](auto t) {
    using T = decltype(t);
    if (const int lanes = decode_lanes(sizeof(T), g); lanes > 0 && num_decode > 0) {
      auto decode = [&](auto bits) {
        launch_decode<T, decltype(bits)::value>(qkv, heads, g, work, num_decode, combine, blocks, cache,
                                                params, lanes, decode_rows, decode_warps, partials, counters,
                                                out, rope, stream);
      };
      if (g.quant_bits == 8) {
        decode(std::integral_constant<int, 8>());
      } else if (g.quant_bits == 4) {
        decode(std::integral_constant<int, 4>());
      } else {
        decode(std::integral_constant<int, 0>());
      }
      work += num_decode;
      num_work -= num_decode;
      combine += num_decode_combine;
      num_combine -= num_decode_combine;
    }
    if constexpr (sizeof(T) == 2) {
      if (num_work > 0 && attn_prefill_v3(sizeof(T), g, heads)) {
        if (g.head_dim == 64) {
          launch_prefill<T, 64>(qkv, heads, g, work, num_work, blocks, cache, out, stream);
        } else {
          launch_prefill<T, 128>(qkv, heads, g, work, num_work, blocks, cache, out, stream);
        }
        num_work = 0;
      }
    }
    if (attention_smem(g.head_dim, sizeof(T), attn_max_rows(g.head_dim)) > 227 * 1024)
      fail("CUDA attention: head_dim ", g.head_dim, " in ", dtype_name(dtype),
           " needs too much shared memory");
    switch (num_work == 0 ? 0 : dpl) {
      case 0:
        break;
      case 1:
        launch<T, 1>(qkv, heads, g, work, num_work, blocks, cache, params, partials, out, stream);
        break;
      case 2:
        launch<T, 2>(qkv, heads, g, work, num_work, blocks, cache, params, partials, out, stream);
        break;
      case 4:
        launch<T, 4>(qkv, heads, g, work, num_work, blocks, cache, params, partials, out, stream);
        break;
      default:
        launch<T, 8>(qkv, heads, g, work, num_work, blocks, cache, params, partials, out, stream);
    }
    if (num_combine > 0) {
      launch_chained(combine_kernel<T>, dim3(num_combine, g.kv_heads), 128, 0, stream, heads, g, combine,
                     attn_max_rows(g.head_dim), partials, out);
      LMD_CUDA_LAUNCHED();
    }
  });
}

}  // namespace lmd::cuda
