// Sampling on the GPU, so that a decode step brings back one (token, logprob) pair per sequence instead of
// [sequences, vocab] fp32 logits (32000 x 4 bytes each for Llama-2): greedy argmax, and the full sampler
// (penalties, temperature, top-k, top-p, min-p, the draw) choosing exactly what the CPU reference
// (choose_token in libengine/src/sampler.cpp) chooses from the same logits and draw.
// tests/test_cuda_engine.cpp compares the two.
#include <cfloat>
#include <climits>
#include <cmath>

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

// ---- sample: one block per row ----
//
// The reference orders candidates by penalised logit, larger first and lower id first among equals, and
// keeps prefixes of that order (top-k, top-p, min-p, the draw's cumulative mass). Here a candidate's place
// in the order is its 64-bit sort key, [order-preserving bits of the logit | ~id]: distinct, and larger
// means earlier. Every prefix is then "keys >= some threshold", found by a radix select (8 bits a pass,
// stopping as soon as a bucket settles the answer) over the row in global memory instead of a sort of up
// to 152k logits. Probability mass is fixed point (p / p_max * 2^40, rounded) summed in uint64: exact and
// independent of the summation order, so the kernel is deterministic, and the rounding (< 1e-12 of the
// top probability per candidate) moves a cut only when the reference's own double sum sits that close
// to it.

using u64 = unsigned long long;

constexpr int kSampleThreads = 1024;
constexpr int kSampleWarps = kSampleThreads / 32;
constexpr int kRadixBits = 8;
constexpr int kBuckets = 1 << kRadixBits;
constexpr double kMassScale = 1099511627776.0;  // 2^40: kMaxSampleVocab candidates of mass <= 1 fit 2^63

// Maps floats to unsigned ints of the same order; -0 and +0, equal for the reference, map alike.
__device__ __forceinline__ uint32_t ordered_bits(float v) {
  const uint32_t u = __float_as_uint(v == 0.f ? 0.f : v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ u64 sort_key(float v, int id) {
  return (u64(ordered_bits(v)) << 32) | u64(~uint32_t(id));
}
__device__ __forceinline__ int key_id(u64 key) { return int(~uint32_t(key)); }

struct MaxOp {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};
struct MinOp {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a < b ? a : b;
  }
};
struct SumOp {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};

// The block-wide reduction of one value per thread, in a fixed order (deterministic for floats too); every
// thread gets the result.
template <class T, class Op>
__device__ T block_reduce(T v, Op op) {
  __shared__ T partial[kSampleWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T total = partial[0];
  for (int w = 1; w < kSampleWarps; ++w) total = op(total, partial[w]);
  __syncthreads();  // `partial` is free for the next reduction
  return total;
}

// The reference's penalties in its fp32 operation order; the _rn intrinsics keep nvcc from contracting
// them into an FMA, which would round differently from the host.
__device__ __forceinline__ float penalised(float logit, int generated, const SampleParams& p) {
  if (p.repetition_penalty != 1.f)
    logit = logit > 0.f ? __fdiv_rn(logit, p.repetition_penalty) : __fmul_rn(logit, p.repetition_penalty);
  if (generated > 0 && (p.frequency_penalty != 0.f || p.presence_penalty != 0.f))
    logit = __fsub_rn(logit, __fadd_rn(__fmul_rn(p.frequency_penalty, float(generated)), p.presence_penalty));
  return logit;
}

struct Selection {
  u64 threshold;  // the prefix is the candidates with key >= max(cutoff, threshold)
  bool found;
};

// Radix select among the candidates with key >= `cutoff`. By count: the prefix of exactly `target`
// candidates (target <= their number). By mass: the prefix ending at the first candidate whose cumulative
// mass reaches `target`; found is false when their whole mass stays below it.
template <class MassFn>
__device__ Selection radix_select(const float* values, int vocab, u64 cutoff, bool by_mass, u64 target,
                                  MassFn mass) {
  __shared__ unsigned s_count[kBuckets];
  __shared__ u64 s_mass[kBuckets];
  __shared__ int s_bucket;
  __shared__ unsigned s_bucket_count;
  __shared__ u64 s_above;
  const int lane = threadIdx.x % 32;
  u64 prefix = 0, mask = 0;
  for (int shift = 64 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int b = threadIdx.x; b < kBuckets; b += kSampleThreads) s_count[b] = 0, s_mass[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < vocab; i += kSampleThreads) {
      const float v = values[i];
      const u64 key = sort_key(v, i);
      if (key < cutoff || (key & mask) != prefix) continue;
      const int b = int(key >> shift) & (kBuckets - 1);
      atomicAdd(&s_count[b], 1u);
      if (by_mass) atomicAdd(&s_mass[b], mass(v));
    }
    __syncthreads();
    // One warp finds the first bucket from the top where the running weight reaches the target: lane l
    // holds buckets [kBuckets - 1 - 8l, kBuckets - 8 - 8l] (larger keys to lower lanes).
    if (threadIdx.x < 32) {
      constexpr int kPerLane = kBuckets / 32;
      auto weight = [&](int b) { return by_mass ? s_mass[b] : u64(s_count[b]); };
      const int top = kBuckets - 1 - lane * kPerLane;
      u64 chunk = 0;
      for (int j = 0; j < kPerLane; ++j) chunk += weight(top - j);
      u64 run = chunk;  // inclusive scan over lanes, then the weight above this lane's buckets
      for (int o = 1; o < 32; o <<= 1) {
        const u64 t = __shfl_up_sync(0xffffffffu, run, o);
        if (lane >= o) run += t;
      }
      run -= chunk;
      int found = -1;
      u64 above = 0;
      for (int j = 0; j < kPerLane; ++j) {
        const int b = top - j;
        if (found < 0 && s_count[b] > 0 && run + weight(b) >= target) found = b, above = run;
        run += weight(b);
      }
      const unsigned hits = __ballot_sync(0xffffffffu, found >= 0);
      if (hits == 0 && lane == 0) s_bucket = -1;
      if (hits != 0 && lane == __ffs(hits) - 1)
        s_bucket = found, s_bucket_count = s_count[found], s_above = above;
    }
    __syncthreads();
    const int bucket = s_bucket;
    if (bucket < 0) return {0, false};
    prefix |= u64(bucket) << shift;
    mask |= u64(kBuckets - 1) << shift;
    target -= s_above;
    // Settled: by count when the bucket holds exactly the candidates still needed, by mass when it holds
    // one candidate (the one reaching the target).
    if (by_mass ? s_bucket_count == 1 : s_bucket_count == target) return {prefix, true};
  }
  return {prefix, true};  // not reached: keys are distinct, so the last digit leaves one candidate
}

// The total mass of the candidates with key >= cutoff.
template <class MassFn>
__device__ u64 prefix_mass(const float* values, int vocab, u64 cutoff, MassFn mass) {
  u64 total = 0;
  for (int i = threadIdx.x; i < vocab; i += kSampleThreads) {
    const float v = values[i];
    if (sort_key(v, i) >= cutoff) total += mass(v);
  }
  return block_reduce(total, SumOp());
}

// Steps 3 and 4 of choose_token (sampler.h) over penalised `values`; `first` is the key of the first
// candidate in the order.
__device__ int sample_choice(const float* values, int vocab, const SampleParams& p, u64 first) {
  const double top_logit = values[key_id(first)], temperature = p.temperature;
  // p_i / p_0 = exp((l_i - l_0) / temperature) in double, the reference's arithmetic.
  auto relative_p = [&](float v) { return exp((double(v) - top_logit) / temperature); };
  auto mass = [&](float v) { return __double2ull_rn(relative_p(v) * kMassScale); };
  u64 cutoff = 0;  // the kept candidates are those with key >= cutoff
  const int k = p.top_k > 0 ? min(p.top_k, vocab) : vocab;
  if (k < vocab) cutoff = radix_select(values, vocab, 0, false, u64(k), mass).threshold;
  u64 kept = prefix_mass(values, vocab, cutoff, mass);
  bool cut = false;
  if (p.top_p < 1.f) {
    // The first candidate whose cumulative p reaches top_p of the top-k mass ends the prefix.
    const Selection s =
        radix_select(values, vocab, cutoff, true, u64(ceil(fmax(double(p.top_p), 0.0) * double(kept))), mass);
    if (s.found && s.threshold > cutoff) cutoff = s.threshold, cut = true;
  }
  if (p.min_p > 0.f) {
    // The first candidate and those with p_i >= min_p * p_0, a prefix since p falls along the order.
    u64 last = first;
    for (int i = threadIdx.x; i < vocab; i += kSampleThreads) {
      const float v = values[i];
      const u64 key = sort_key(v, i);
      if (key >= cutoff && key < last && relative_p(v) >= double(p.min_p)) last = key;
    }
    last = block_reduce(last, MinOp());
    if (last > cutoff) cutoff = last, cut = true;
  }
  if (cut) kept = prefix_mass(values, vocab, cutoff, mass);
  // The draw: r = uniform * kept; the first candidate whose cumulative mass exceeds r, i.e. reaches
  // floor(r) + 1; the last kept one when rounding leaves none.
  u64 end = cutoff;
  const Selection s =
      radix_select(values, vocab, cutoff, true, u64(floor(p.uniform * double(kept))) + 1, mass);
  if (s.found && s.threshold > end) end = s.threshold;
  u64 chosen = ~0ull;
  for (int i = threadIdx.x; i < vocab; i += kSampleThreads) {
    const u64 key = sort_key(values[i], i);
    if (key >= end && key < chosen) chosen = key;
  }
  return key_id(block_reduce(chosen, MinOp()));
}

__global__ void __launch_bounds__(kSampleThreads)
    sample_kernel(const float* logits, int vocab, const SampleParams* params, const int* penalties,
                  float* work, float* out) {
  const SampleParams p = params[blockIdx.x];
  const float* raw = logits + int64_t(blockIdx.x) * vocab;

  // The log-softmax normaliser of the unpenalised row, for the reported logprob.
  float raw_max = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += kSampleThreads) raw_max = fmaxf(raw_max, raw[i]);
  raw_max = block_reduce(raw_max, MaxOp());
  float sum = 0.f;
  for (int i = threadIdx.x; i < vocab; i += kSampleThreads) sum += expf(raw[i] - raw_max);
  const float log_norm = raw_max + logf(block_reduce(sum, SumOp()));

  // Penalties: the row goes to `work` with the listed (distinct) tokens changed.
  const float* values = raw;
  if (p.penalty_count > 0) {
    float* row = work + int64_t(blockIdx.x) * vocab;
    for (int i = threadIdx.x; i < vocab; i += kSampleThreads) row[i] = raw[i];
    __syncthreads();
    for (int j = threadIdx.x; j < p.penalty_count; j += kSampleThreads) {
      const int token = penalties[2 * (p.penalty_begin + j)],
                generated = penalties[2 * (p.penalty_begin + j) + 1];
      row[token] = penalised(raw[token], generated, p);
    }
    __syncthreads();  // makes the block's global writes visible to the whole block
    values = row;
  }

  u64 first = 0;  // every float's key is above 0
  for (int i = threadIdx.x; i < vocab; i += kSampleThreads) first = max(first, sort_key(values[i], i));
  first = block_reduce(first, MaxOp());
  const bool greedy = p.temperature <= 0.f || p.top_k == 1;
  const int chosen = greedy ? key_id(first) : sample_choice(values, vocab, p, first);
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = float(chosen);
    out[2 * blockIdx.x + 1] = raw[chosen] - log_norm;
  }
}

}  // namespace

void greedy(const float* logits, int rows, int vocab, float* out, cudaStream_t stream) {
  greedy_kernel<<<rows, kThreads, 0, stream>>>(logits, vocab, out);
  LMD_CUDA_LAUNCHED();
}

void sample(const float* logits, int rows, int vocab, const SampleParams* params, const int* penalties,
            float* work, float* out, cudaStream_t stream) {
  sample_kernel<<<rows, kSampleThreads, 0, stream>>>(logits, vocab, params, penalties, work, out);
  LMD_CUDA_LAUNCHED();
}

}  // namespace lmd::cuda
