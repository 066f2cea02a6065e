// lmd_cuda_bench [--w4a16]: the batch-1 decode step of a Llama-2-7B-shaped model (32 layers, hidden
// 4096, 32 heads, MLP 11008, vocab 32000, random fp16 or int4 weights) through CudaBackend's ops at a fixed
// context, timed with CUDA events (median of many steps), against the bandwidth floor of BRIEF §8: bytes read
// per token over the measured device-to-device copy bandwidth. Also times the linears alone, the step
// replayed as a CUDA graph, and a 1024-token prefill.
// --profile: only a few warm-up steps, then one decode step between cudaProfilerStart/Stop (for
// `ncu --profile-from-start off`: the per-kernel times of one step).
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "bench_util.h"
#include "lmd/core/error.h"
#include "lmd/cuda/cuda_backend.h"

using namespace lmd;
using namespace lmd::bench;

namespace {

constexpr int kHidden = 4096, kHeads = 32, kHeadDim = 128, kInter = 11008, kLayers = 32, kVocab = 32000;

struct Layer {
  DeviceTensor attn_norm, ffn_norm;
  DeviceLinear qkv, o, gate_up, down;
};

}  // namespace

int main(int argc, char** argv) try {
  // --w4a16: the decoder linears are int4 (random AWQ codes, group 128) as an AWQ checkpoint loads them;
  // embeddings, norms and lm_head stay fp16.
  bool int4 = false, profile = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--w4a16")
      int4 = true;
    else if (arg == "--profile")
      profile = true;
    else
      fail("usage: lmd_cuda_bench [--w4a16] [--profile]");
  }
  if (!cuda_device_available()) fail("no CUDA device");
  CudaBackend be;
  auto stream = static_cast<cudaStream_t>(be.stream());
  std::printf("device: %s\n", cuda_device_name().c_str());

  // Random fp16 values: 64 MiB made on the host, tiled over every weight on the device (the GEMVs read
  // real, non-zero data; that it repeats does not matter to a bandwidth-bound product).
  std::mt19937 rng(1);
  std::normal_distribution<float> dist(0.f, 0.02f);
  std::vector<float> pattern_f(32 << 20);
  for (float& v : pattern_f) v = dist(rng);
  const DeviceTensor pattern =
      be.upload(HostTensor::from_f32(pattern_f, {int64_t(pattern_f.size())}), DType::F16);
  size_t weight_bytes = 0;
  auto fill_random = [&](DeviceTensor& t) {
    for (size_t off = 0; off < t.nbytes(); off += pattern.nbytes())
      LMD_BENCH_CHECK(cudaMemcpyAsync(static_cast<char*>(t.data) + off, pattern.data,
                                      std::min(pattern.nbytes(), t.nbytes() - off), cudaMemcpyDeviceToDevice,
                                      stream));
  };
  auto random_tensor = [&](Shape shape) {
    DeviceTensor t = be.alloc(DType::F16, std::move(shape));
    fill_random(t);
    weight_bytes += t.nbytes();
    return t;
  };
  std::map<std::pair<int64_t, int64_t>, LinearWeight> awq;  // one random AWQ tensor set per shape
  auto linear = [&](int64_t out, int64_t in) {
    if (int4 && out != kVocab) {
      auto it = awq.find({out, in});
      if (it == awq.end()) it = awq.emplace(std::pair{out, in}, random_awq_linear(rng, in, out, 128)).first;
      DeviceLinear l = be.prepare_linear(it->second, DType::F16);
      weight_bytes += l.qweight.nbytes() + l.scales.nbytes();
      return l;
    }
    DeviceLinear l;
    l.weight = random_tensor({out, in});
    l.in_features = in;
    l.out_features = out;
    return l;
  };
  std::vector<Layer> layers;
  for (int l = 0; l < kLayers; ++l)
    layers.push_back({random_tensor({kHidden}), random_tensor({kHidden}), linear(3 * kHidden, kHidden),
                      linear(kHidden, kHidden), linear(2 * kInter, kHidden), linear(kHidden, kInter)});
  const DeviceTensor final_norm = random_tensor({kHidden});
  const DeviceLinear lm_head = linear(kVocab, kHidden);
  be.synchronize();

  const int context = 128, block_len = 64;
  const int long_context = 4096;
  KvCacheLayout L{kLayers, kHeads, kHeadDim, block_len, (long_context + block_len) / block_len, 0};
  KvCacheStorage cache = be.alloc_kv_cache(L, DType::F16);
  fill_random(cache.data);  // attention at long contexts reads real values, not the zeroed pool
  RopeConfig rope;
  rope.head_dim = kHeadDim;
  std::vector<int> blocks(L.num_blocks);
  for (int i = 0; i < L.num_blocks; ++i) blocks[i] = i;

  // Activations per token count: residual, normed, qkv, attn, proj, gate_up, act, last row, logits.
  std::map<int, std::vector<DeviceTensor>> buffers;
  auto bufs = [&](int tokens) -> std::vector<DeviceTensor>& {
    auto& b = buffers[tokens];
    if (b.empty()) {
      for (int64_t cols : {kHidden, kHidden, 3 * kHidden, kHidden, kHidden, 2 * kInter, kInter})
        b.push_back(be.upload(HostTensor::from_f32(std::vector<float>(tokens * cols, 0.01f), {tokens, cols}),
                              DType::F16));
      b.push_back(be.alloc(DType::F16, {1, kHidden}));
      b.push_back(be.alloc(DType::F16, {1, kVocab}));
    }
    return b;
  };
  auto decode_batch = [&](int tokens, int ctx) {
    BatchLayout batch;
    batch.seqs.push_back({0, tokens, ctx, blocks});
    return batch;
  };

  // One forward step of `tokens` new tokens after `ctx` cached ones (the model's op sequence).
  auto step = [&](int tokens, int ctx, bool linears_only) {
    auto& b = bufs(tokens);
    DeviceTensor &res = b[0], &normed = b[1], &qkv = b[2], &attn = b[3], &proj = b[4], &gu = b[5],
                 &act = b[6];
    const BatchLayout batch = decode_batch(tokens, ctx);
    for (int l = 0; l < kLayers; ++l) {
      const Layer& y = layers[l];
      if (!linears_only) be.add_rmsnorm(res, proj, y.attn_norm, 1e-5f, normed);
      be.linear(normed, y.qkv, qkv);
      if (!linears_only) {
        be.rope_kv_write(qkv, batch, l, kHeads, rope, cache);
        be.attention(qkv, batch, l, kHeads, cache, attn);
      }
      be.linear(attn, y.o, proj);
      if (!linears_only) be.add_rmsnorm(res, proj, y.ffn_norm, 1e-5f, normed);
      be.linear(normed, y.gate_up, gu);
      if (!linears_only) be.silu_mul(gu, act);
      be.linear(act, y.down, proj);
    }
    if (tokens == 1) {
      be.add_rmsnorm(res, proj, final_norm, 1e-5f, b[7]);
      be.linear(b[7], lm_head, b[8]);
    }
  };

  const double kv_bytes = double(kLayers) * 2 * (context + 1) * kHidden * 2;
  const double bytes = double(weight_bytes) + kv_bytes;
  const double linear_bytes = double(weight_bytes) - double(kLayers * 2 + 1) * kHidden * 2;

  if (profile) {
    for (int i = 0; i < 3; ++i) step(1, context, false);
    be.synchronize();
    LMD_BENCH_CHECK(cudaProfilerStart());
    step(1, context, false);
    be.synchronize();
    LMD_BENCH_CHECK(cudaProfilerStop());
    return 0;
  }
  const auto [copy_ms, copy_gbs] = copy_bandwidth(be, stream);

  const double lin_ms = median_ms(stream, 3, 50, [&] { step(1, context, true); });
  const int gemv_rows = be.dense_gemv_max_rows();
  be.set_dense_gemv_max_rows(0);
  const double lin_cublas_ms = median_ms(stream, 3, 50, [&] { step(1, context, true); });
  be.set_dense_gemv_max_rows(gemv_rows);
  const double step_ms = median_ms(stream, 3, 50, [&] { step(1, context, false); });
  be.synchronize();

  double graph_ms = -1;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
    step(1, context, false);
    if (cudaStreamEndCapture(stream, &graph) == cudaSuccess &&
        cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess) {
      graph_ms = median_ms(stream, 3, 50, [&] { LMD_BENCH_CHECK(cudaGraphLaunch(exec, stream)); });
    }
  }
  cudaGetLastError();
  if (graph_ms < 0) std::printf("note: CUDA graph capture of the step failed\n");

  const int prefill = 1024;
  const double prefill_ms = median_ms(stream, 1, 5, [&] { step(prefill, 0, false); });

  // Each non-GEMM op of the decode step alone, over the 32 layers (the 64 norms of the step as 2 x 32).
  auto& d = bufs(1);
  const BatchLayout one = decode_batch(1, context), far = decode_batch(1, long_context);
  auto per_layer = [&](const std::function<void(int)>& op) {
    return median_ms(stream, 3, 30, [&] {
      for (int l = 0; l < kLayers; ++l) op(l);
    });
  };
  const double norm_ms =
      per_layer([&](int l) { be.add_rmsnorm(d[0], d[4], layers[l].attn_norm, 1e-5f, d[1]); });
  const double rope_ms = per_layer([&](int l) { be.rope_kv_write(d[2], one, l, kHeads, rope, cache); });
  const double attn_ms = per_layer([&](int l) { be.attention(d[2], one, l, kHeads, cache, d[3]); });
  const double attn_far_ms = per_layer([&](int l) { be.attention(d[2], far, l, kHeads, cache, d[3]); });
  const double silu_ms = per_layer([&](int) { be.silu_mul(d[5], d[6]); });

  const double floor_ms = bytes / (copy_gbs * 1e6);
  std::printf(
      "\n| measurement (Llama-2-7B shape, %s, batch 1, context %d) | time | rate | achieved | vs floor |\n",
      int4 ? "W4A16 g128" : "fp16", context);
  std::printf("|---|---|---|---|---|\n");
  std::printf("| device-to-device copy, 2 GiB | %.3f ms | | %.0f GB/s (read+write) | |\n", copy_ms, copy_gbs);
  std::printf("| 4 linears x 32 layers + lm_head (%s) | %.3f ms | | %.0f GB/s | %.0f%% |\n",
              int4 ? "W4A16 GEMV, lm_head dense GEMV" : "dense GEMV", lin_ms, linear_bytes / lin_ms / 1e6,
              100.0 * (linear_bytes / (copy_gbs * 1e6)) / lin_ms);
  std::printf("| the same, 16-bit weights through cuBLAS | %.3f ms | | %.0f GB/s | %.0f%% |\n", lin_cublas_ms,
              linear_bytes / lin_cublas_ms / 1e6, 100.0 * (linear_bytes / (copy_gbs * 1e6)) / lin_cublas_ms);
  std::printf("| decode step, all ops (%.2f GB read) | %.3f ms | %.1f tok/s | %.0f GB/s | %.0f%% |\n",
              bytes / 1e9, step_ms, 1e3 / step_ms, bytes / step_ms / 1e6, 100.0 * floor_ms / step_ms);
  if (graph_ms > 0)
    std::printf("| decode step, CUDA graph replay | %.3f ms | %.1f tok/s | %.0f GB/s | %.0f%% |\n", graph_ms,
                1e3 / graph_ms, bytes / graph_ms / 1e6, 100.0 * floor_ms / graph_ms);
  std::printf("| bandwidth floor (bytes / copy bandwidth) | %.3f ms | %.1f tok/s | | 100%% |\n", floor_ms,
              1e3 / floor_ms);
  std::printf("| prefill %d tokens, 32 layers (no lm_head) | %.2f ms | %.0f tok/s | | |\n", prefill,
              prefill_ms, prefill * 1e3 / prefill_ms);
  const double far_bytes = double(kLayers) * 2 * (long_context + 1) * kHidden * 2;
  std::printf("\n| op x 32 layers (decode, batch 1) | total | per call |\n|---|---|---|\n");
  std::printf("| add_rmsnorm (the step has 2 x 32 + 1) | %.3f ms | %.1f us |\n", norm_ms,
              norm_ms * 1e3 / kLayers);
  std::printf("| rope_kv_write | %.3f ms | %.1f us |\n", rope_ms, rope_ms * 1e3 / kLayers);
  std::printf("| attention, context %d | %.3f ms | %.1f us |\n", context, attn_ms, attn_ms * 1e3 / kLayers);
  std::printf("| attention, context %d (%.0f GB/s of K/V) | %.3f ms | %.1f us |\n", long_context,
              far_bytes / attn_far_ms / 1e6, attn_far_ms, attn_far_ms * 1e3 / kLayers);
  std::printf("| silu_mul | %.3f ms | %.1f us |\n", silu_ms, silu_ms * 1e3 / kLayers);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "lmd_cuda_bench: %s\n", e.what());
  return 1;
}
