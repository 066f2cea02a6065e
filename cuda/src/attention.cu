// Causal grouped-query attention over the paged KV cache, for prefill and decode alike (version 1:
// CUDA cores, fp32 math; a tensor-core prefill is a later step).
//
// Work item (AttnWork) x KV head = one block of 4 warps. The item's rows are up to kAttnMaxRows
// (token, query head) pairs of one KV-head group, so every K/V row loaded from the cache serves the
// whole group (GQA) and several tokens (prefill). The item's cache range [kv_begin, kv_end) is cut into
// 32-key tiles dealt round-robin to the warps; each warp keeps its own online-softmax state (running max
// m, sum l, accumulator) per row, with no block barrier in the loop; the warps' states are merged at the
// end. Long decode contexts are split over several items (split-K): each writes (m, l, acc) to a partial
// slot and attention_combine merges the splits. The score matrix is never materialised.
//
// Layouts: q rows are read from qkv [tokens, (heads + 2 kv_heads) * head_dim]; out [tokens, heads *
// head_dim]; a partial slot is float [kv_heads, max_rows, 2 + head_dim] = (m, l, acc[head_dim]).
#include <algorithm>

#include "cuda_check.h"
#include "kv_cache.cuh"

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

template <class T>
__global__ void combine_kernel(int heads, KvGeometry g, const AttnCombine* combine, int max_rows,
                               const float* partials, T* out) {
  const AttnCombine c = combine[blockIdx.x];
  const int kvhead = blockIdx.y, hd = g.head_dim, group = heads / g.kv_heads;
  const int rows = c.token_count * c.head_count;
  auto slot = [&](int split, int r) {
    return partials + ((int64_t(c.first_partial + split) * g.kv_heads + kvhead) * max_rows + r) * (2 + hd);
  };
  for (int i = threadIdx.x; i < rows * hd; i += blockDim.x) {
    const int r = i / hd, d = i % hd;
    float mx = -INFINITY;
    for (int s = 0; s < c.splits; ++s) mx = fmaxf(mx, slot(s, r)[0]);
    float lsum = 0.f, a = 0.f;
    for (int s = 0; s < c.splits; ++s) {
      const float* p = slot(s, r);
      if (p[0] == -INFINITY) continue;
      const float f = expf(p[0] - mx);
      lsum += p[1] * f;
      a += p[2 + d] * f;
    }
    const int token = c.token_begin + r / c.head_count,
              head = kvhead * group + c.head_begin + r % c.head_count;
    out[int64_t(token) * heads * hd + int64_t(head) * hd + d] = from_f32<T>(a / lsum);
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

int dims_per_lane(int head_dim) {
  if (head_dim % 8 != 0 || head_dim > 256)
    fail("CUDA attention: head_dim ", head_dim, " is not supported (a multiple of 8 up to 256 is)");
  return head_dim <= 32 ? 1 : head_dim <= 64 ? 2 : head_dim <= 128 ? 4 : 8;
}

}  // namespace

int attn_max_rows(int head_dim) { return dims_per_lane(head_dim) <= 4 ? 8 : 4; }

int64_t attn_partial_floats(int num_partials, const KvGeometry& g) {
  return int64_t(num_partials) * g.kv_heads * attn_max_rows(g.head_dim) * (2 + g.head_dim);
}

void attention(DType dtype, const void* qkv, int heads, const KvGeometry& g, const AttnWork* work,
               int num_work, const AttnCombine* combine, int num_combine, const int* blocks,
               const void* cache, const uint16_t* params, float* partials, void* out, cudaStream_t stream) {
  if (num_work == 0) return;
  const int dpl = dims_per_lane(g.head_dim);
  dispatch_float(dtype, [&](auto t) {
    using T = decltype(t);
    if (attention_smem(g.head_dim, sizeof(T), attn_max_rows(g.head_dim)) > 227 * 1024)
      fail("CUDA attention: head_dim ", g.head_dim, " in ", dtype_name(dtype),
           " needs too much shared memory");
    switch (dpl) {
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
      combine_kernel<T><<<dim3(num_combine, g.kv_heads), 128, 0, stream>>>(
          heads, g, combine, attn_max_rows(g.head_dim), partials, static_cast<T*>(out));
      LMD_CUDA_LAUNCHED();
    }
  });
}

}  // namespace lmd::cuda
