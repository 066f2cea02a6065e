// Standalone check and timing of the attention kernels on prompts (multi-token items), without the rest
// of the project: the kernels are compiled in from attention.cu and the work items come from the
// backend's own planner (attn_plan.cpp), so a change to either can be tried on a GPU in seconds.
//
// Check: sequences (cached context, new tokens) over a paged cache whose block table is shuffled and
// whose unwritten rows (the other layer, slots past each sequence) hold NaN; the output is poisoned
// (0xFF bytes, NaN) with guard elements after it. Each case is compared with a float64 CPU reference
// over the same rounded inputs by relative L2 error (fp16 < 2e-3, bf16 < 1e-2), every output element
// must be written and no guard touched.
// Timing: one layer's attention for a 2048-token prompt (Llama-2-7B: 32 heads x 128; InternLM2-1.8B: 16
// query / 8 KV heads x 128; TinyLlama-1.1B: 32 / 4 x 64) and an 8192-token one (Llama-2-7B), median of
// CUDA-event-timed runs, TFLOP/s over the causal count 2 * 2 * heads * T^2 / 2 * head_dim; version 1
// (attention_kernel) is timed on the same inputs.
//
// Build (from the repository root):
//   nvcc -std=c++20 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr
//     -Ilibcore/include -Ilibengine/include -Icuda/src -o attn_prefill_check
//     cuda/tools/attn_prefill_check.cu cuda/src/attn_plan.cpp libcore/src/dtype.cpp
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "attention.cu"
#include "attn_plan.h"

using namespace lmd;
using namespace lmd::cuda;

namespace {

#define CHECK_CUDA(call)                                                                        \
  do {                                                                                          \
    const cudaError_t e = (call);                                                               \
    if (e != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e)); \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)

template <class T>
float host_f32(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}
template <class T>
T host_from(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}
template <class T>
constexpr DType dtype_of() {
  return std::is_same_v<T, __half> ? DType::F16 : DType::BF16;
}
template <class T>
const char* name_of() {
  return std::is_same_v<T, __half> ? "fp16" : "bf16";
}

constexpr size_t kWorkInts = sizeof(AttnWork) / sizeof(int), kCombineInts = sizeof(AttnCombine) / sizeof(int);

template <class T>
struct DevBuf {
  T* p = nullptr;
  explicit DevBuf(size_t n) { CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T))); }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
};

struct Case {
  std::string name;
  int heads, kv_heads, head_dim, block_len;
  std::vector<std::pair<int, int>> seqs;  // (context already cached, new tokens)
  float q_scale = 1.f;                    // > 1 sharpens the softmax
};

// Host copies of one case's inputs, the device buffers, and the backend's plan for them.
template <class T>
struct Setup {
  static constexpr int kLayers = 2, kLayer = 1;
  static constexpr int64_t kGuard = 64;
  const Case& c;
  KvGeometry g;
  int tokens = 0;  // set by make_seqs
  std::vector<SeqSlice> seqs;
  int64_t qkv_cols, out_elems;
  std::vector<T> qkv, cache;
  AttnPlan plan;
  DevBuf<T> d_qkv, d_cache, d_out;
  DevBuf<int> d_meta;
  DevBuf<float> d_partials;
  DevBuf<int> d_counters;  // zero, as `attention` expects them

  Setup(const Case& cs, std::mt19937& rng, int sms, int plan_elem_bytes)
      : c(cs),
        g{kLayers, cs.kv_heads, cs.head_dim, cs.block_len, kLayer, 0},
        seqs(make_seqs(cs, rng, tokens)),
        qkv_cols(int64_t(cs.heads + 2 * cs.kv_heads) * cs.head_dim),
        out_elems(int64_t(tokens) * cs.heads * cs.head_dim),
        qkv(fill_qkv(rng)),
        cache(fill_cache(rng)),
        plan(plan_attention(seqs, cs.heads, plan_elem_bytes, g, sms, 0)),
        d_qkv(qkv.size()),
        d_cache(cache.size()),
        d_out(out_elems + kGuard),
        d_meta(plan.work.size() * kWorkInts + plan.combine.size() * kCombineInts + plan.blocks.size()),
        d_partials(size_t(attn_partial_floats(plan.partials, g))),
        d_counters(size_t(attn_counter_ints(plan.num_decode_combine, g))) {
    CHECK_CUDA(cudaMemcpy(d_qkv.p, qkv.data(), qkv.size() * sizeof(T), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(d_cache.p, cache.data(), cache.size() * sizeof(T), cudaMemcpyHostToDevice));
    std::vector<int> meta(plan.work.size() * kWorkInts + plan.combine.size() * kCombineInts);
    std::memcpy(meta.data(), plan.work.data(), plan.work.size() * sizeof(AttnWork));
    std::memcpy(meta.data() + plan.work.size() * kWorkInts, plan.combine.data(),
                plan.combine.size() * sizeof(AttnCombine));
    meta.insert(meta.end(), plan.blocks.begin(), plan.blocks.end());
    CHECK_CUDA(cudaMemcpy(d_meta.p, meta.data(), meta.size() * sizeof(int), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemset(d_counters.p, 0,
                          std::max<size_t>(attn_counter_ints(plan.num_decode_combine, g), 1) * sizeof(int)));
    poison_out();
  }

  static std::vector<SeqSlice> make_seqs(const Case& c, std::mt19937& rng, int& tokens) {
    int num_blocks = 0;
    for (auto [ctx, n] : c.seqs) num_blocks += (ctx + n + c.block_len - 1) / c.block_len;
    std::vector<int> ids(num_blocks + 3);  // spare blocks that no sequence owns stay NaN
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<SeqSlice> seqs;
    int next = 0;
    tokens = 0;
    for (auto [ctx, n] : c.seqs) {
      const int nb = (ctx + n + c.block_len - 1) / c.block_len;
      seqs.push_back({tokens, n, ctx, std::vector<int>(ids.begin() + next, ids.begin() + next + nb)});
      next += nb;
      tokens += n;
    }
    return seqs;
  }
  int num_blocks() const {
    int n = 3;
    for (const SeqSlice& s : seqs) n += int(s.blocks.size());
    return n;
  }
  int64_t cache_index(int block, int kv, int head, int slot) const {
    return ((((int64_t(block) * kLayers + kLayer) * 2 + kv) * c.kv_heads + head) * c.block_len + slot) *
           c.head_dim;
  }
  std::vector<T> fill_qkv(std::mt19937& rng) const {
    std::normal_distribution<float> dist(0.f, 1.f);
    std::vector<T> v(size_t(tokens) * qkv_cols);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = 0; i < qkv_cols; ++i)
        v[t * qkv_cols + i] = host_from<T>(dist(rng) * (i < int64_t(c.heads) * c.head_dim ? c.q_scale : 1.f));
    return v;
  }
  // Positions [0, context + new) of each sequence, at layer kLayer; everything else NaN.
  std::vector<T> fill_cache(std::mt19937& rng) const {
    std::normal_distribution<float> dist(0.f, 1.f);
    uint16_t nan_bits = 0xFFFF;
    T nan;
    std::memcpy(&nan, &nan_bits, 2);
    std::vector<T> v(size_t(num_blocks()) * kLayers * 2 * c.kv_heads * c.block_len * c.head_dim, nan);
    for (const SeqSlice& s : seqs)
      for (int pos = 0; pos < s.context_len + s.num_new; ++pos)
        for (int kv = 0; kv < 2; ++kv)
          for (int h = 0; h < c.kv_heads; ++h) {
            T* row = v.data() + cache_index(s.blocks[pos / c.block_len], kv, h, pos % c.block_len);
            for (int d = 0; d < c.head_dim; ++d) row[d] = host_from<T>(dist(rng));
          }
    return v;
  }
  void poison_out() { CHECK_CUDA(cudaMemset(d_out.p, 0xFF, (out_elems + kGuard) * sizeof(T))); }

  const AttnWork* work() const { return reinterpret_cast<const AttnWork*>(d_meta.p); }
  const int* blocks() const {
    return d_meta.p + plan.work.size() * kWorkInts + plan.combine.size() * kCombineInts;
  }

  // The backend's launch: decode kernel for one-token items, then version 3 (or 1) for the rest.
  void run() {
    attention(dtype_of<T>(), d_qkv.p, c.heads, g, work(), int(plan.work.size()), plan.num_decode,
              plan.decode_rows, plan.decode_warps,
              reinterpret_cast<const AttnCombine*>(d_meta.p + plan.work.size() * kWorkInts),
              int(plan.combine.size()), plan.num_decode_combine, blocks(), d_cache.p, nullptr, d_partials.p,
              d_counters.p, d_out.p, 0);
  }
  // Version 1 on every item (for a plan made as for a 4-byte type, whose items all fit it); head_dim 64
  // or 128.
  void run_v1() {
    auto run = [&](auto dims_per_lane) {
      launch<T, decltype(dims_per_lane)::value>(d_qkv.p, c.heads, g, work(), int(plan.work.size()), blocks(),
                                                d_cache.p, nullptr, d_partials.p, d_out.p, 0);
    };
    if (c.head_dim == 64) {
      run(std::integral_constant<int, 2>());
    } else {
      run(std::integral_constant<int, 4>());
    }
  }

  // Float64 reference, threaded over (token, head).
  std::vector<double> reference() const {
    std::vector<double> ref(out_elems);
    const int hd = c.head_dim, group = c.heads / c.kv_heads;
    std::vector<std::pair<const SeqSlice*, int>> rows;
    for (const SeqSlice& s : seqs)
      for (int i = 0; i < s.num_new; ++i) rows.push_back({&s, i});
    const int64_t n = int64_t(rows.size()) * c.heads;
    const int threads = std::max(1u, std::thread::hardware_concurrency());
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        std::vector<double> score, acc(hd);
        for (int64_t w = t; w < n; w += threads) {
          const auto [s, i] = rows[w / c.heads];
          const int h = int(w % c.heads), kvh = h / group, token = s->token_offset + i,
                    len = s->context_len + i + 1;
          const T* q = qkv.data() + int64_t(token) * qkv_cols + int64_t(h) * hd;
          score.assign(len, 0.0);
          double mx = -INFINITY;
          for (int p = 0; p < len; ++p) {
            const T* k = cache.data() + cache_index(s->blocks[p / c.block_len], 0, kvh, p % c.block_len);
            double dot = 0;
            for (int d = 0; d < hd; ++d) dot += double(host_f32(q[d])) * host_f32(k[d]);
            score[p] = dot / std::sqrt(double(hd));
            mx = std::max(mx, score[p]);
          }
          double sum = 0;
          for (double& x : score) sum += x = std::exp(x - mx);
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int p = 0; p < len; ++p) {
            const T* v = cache.data() + cache_index(s->blocks[p / c.block_len], 1, kvh, p % c.block_len);
            for (int d = 0; d < hd; ++d) acc[d] += score[p] / sum * host_f32(v[d]);
          }
          std::copy(acc.begin(), acc.end(), ref.begin() + (int64_t(token) * c.heads + h) * hd);
        }
      });
    for (auto& th : pool) th.join();
    return ref;
  }

  // Relative L2 error against the reference; NaN when an element is unwritten or a guard changed.
  double error() const {
    std::vector<T> got(out_elems + kGuard);
    CHECK_CUDA(cudaMemcpy(got.data(), d_out.p, got.size() * sizeof(T), cudaMemcpyDeviceToHost));
    for (int64_t i = out_elems; i < out_elems + kGuard; ++i) {
      uint16_t bits;
      std::memcpy(&bits, &got[i], 2);
      if (bits != 0xFFFF) return NAN;
    }
    const std::vector<double> ref = reference();
    double num = 0, den = 0;
    for (int64_t i = 0; i < out_elems; ++i) {
      const double x = host_f32(got[i]);
      if (std::isnan(x)) return NAN;
      num += (x - ref[i]) * (x - ref[i]);
      den += ref[i] * ref[i];
    }
    return std::sqrt(num / den);
  }
};

template <class F>
double median_ms(int warmup, int reps, F&& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  CHECK_CUDA(cudaGetLastError());
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    CHECK_CUDA(cudaEventRecord(start));
    fn();
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  CHECK_CUDA(cudaGetLastError());
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

int failures = 0;

template <class T>
void check(const Case& c, std::mt19937& rng, int sms) {
  Setup<T> s(c, rng, sms, sizeof(T));
  s.run();
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const double err = s.error(), limit = std::is_same_v<T, __half> ? 2e-3 : 1e-2;
  const bool ok = err < limit;  // false for NaN
  failures += !ok;
  const int prefill_items = int(s.plan.work.size()) - s.plan.num_decode;
  std::printf("%-4s %-34s %2d/%d x%3d blk%3d  items %4d (v3 %s %4d)  rel_l2 %.2e %s\n", name_of<T>(),
              c.name.c_str(), c.heads, c.kv_heads, c.head_dim, c.block_len, int(s.plan.work.size()),
              attn_prefill_v3(sizeof(T), s.g, c.heads) ? "yes" : "no ", prefill_items, err,
              ok ? "ok" : "FAIL");
}

// `check`: also compare with the reference (a minute of CPU time per dtype beyond a few thousand tokens).
template <class T>
void time_prefill(const char* name, int heads, int kv_heads, int head_dim, int tokens, bool check,
                  std::mt19937& rng, int sms) {
  const Case c{name, heads, kv_heads, head_dim, 64, {{0, tokens}}};
  const double flop = 4.0 * heads * double(tokens) * tokens / 2 * head_dim;
  Setup<T> v3(c, rng, sms, sizeof(T));
  const double ms = median_ms(5, 30, [&] { v3.run(); });
  const double err = check ? v3.error() : 0.0;
  failures += !(err < (std::is_same_v<T, __half> ? 2e-3 : 1e-2));
  Setup<T> v1(c, rng, sms, 4);  // items planned for version 1 (its 8-row items)
  const double ms_v1 = median_ms(1, 5, [&] { v1.run_v1(); });
  std::printf(
      "TIME %-4s %-15s %2d/%d x%3d T=%5d: v3 %.3f ms (%5.1f TFLOP/s, rel_l2 %.2e)  v1 %.3f ms (%.1f "
      "TFLOP/s)\n",
      name_of<T>(), name, heads, kv_heads, head_dim, tokens, ms, flop / ms / 1e9, err, ms_v1,
      flop / ms_v1 / 1e9);
}

}  // namespace

int main() {
  int sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, %d SMs\n", prop.name, sms);
  std::mt19937 rng(7);
  std::vector<Case> cases;
  for (int hd : {64, 128})
    for (auto [heads, kv] : std::vector<std::pair<int, int>>{{8, 8}, {8, 4}, {16, 4}, {16, 2}})
      for (int len : {1, 7, 64, 65, 300, 1000})
        cases.push_back({"prompt " + std::to_string(len), heads, kv, hd, len % 2 ? 16 : 64, {{0, len}}});
  // Chunked prefill over a cached context (an interactive second turn), batches mixing decode and
  // prefill sequences, blocks of 32, a sharp softmax, and 16 to 64 heads per KV head (64: items of two
  // tokens, so a prompt of 9 leaves a one-token item for the decode kernel).
  const std::vector<std::pair<int, int>> mixed{{0, 1},  {37, 1},   {100, 13}, {0, 70},
                                               {17, 3}, {300, 77}, {63, 65}};
  for (int hd : {64, 128}) {
    cases.push_back({"second turn 300+77", 32, 32, hd, 64, {{300, 77}}});
    cases.push_back({"second turn 1000+7", 16, 2, hd, 16, {{1000, 7}}});
    cases.push_back({"second turn 63+65", 8, 1, hd, 32, {{63, 65}}});
    cases.push_back({"mixed batch", 16, 4, hd, 16, mixed});
    cases.push_back({"mixed batch, sharp softmax", 8, 8, hd, 64, mixed, 4.f});
    cases.push_back({"group 16", 16, 1, hd, 16, {{0, 100}, {20, 9}}});
    cases.push_back({"group 32", 32, 1, hd, 16, {{0, 7}, {5, 40}}});
    cases.push_back({"group 64", 64, 1, hd, 16, {{0, 9}}});
  }
  for (const Case& c : cases) {
    check<__half>(c, rng, sms);
    check<__nv_bfloat16>(c, rng, sms);
  }
  std::printf("prefill items of %d rows\n", kAttnPrefillRows);
  time_prefill<__half>("Llama-2-7B", 32, 32, 128, 2048, true, rng, sms);
  time_prefill<__nv_bfloat16>("Llama-2-7B", 32, 32, 128, 2048, true, rng, sms);
  time_prefill<__half>("InternLM2-1.8B", 16, 8, 128, 2048, true, rng, sms);
  time_prefill<__nv_bfloat16>("InternLM2-1.8B", 16, 8, 128, 2048, true, rng, sms);
  time_prefill<__half>("TinyLlama-1.1B", 32, 4, 64, 2048, true, rng, sms);
  time_prefill<__half>("Llama-2-7B", 32, 32, 128, 8192, false, rng, sms);
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
