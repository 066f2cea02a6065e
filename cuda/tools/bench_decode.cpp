// lmd_cuda_bench [--w4a16] [--shape llama2-7b|internlm2-1.8b] [--profile]: the batch-1 decode step of a
// model of that shape (default Llama-2-7B: 32 layers, hidden 4096, 32 heads, MLP 11008, vocab 32000, fp16;
// InternLM2-1.8B: 24 layers, hidden 2048, 16 heads over 8 KV heads, MLP 8192, vocab 92544, bf16) with
// random 16-bit or int4 weights, through CudaBackend's ops at a fixed context, timed with CUDA events
// (median of many steps), against the bandwidth floor of BRIEF §8: bytes read per token over the measured
// device-to-device copy bandwidth. Also times the linears alone, the step replayed as a CUDA graph, the
// graph with one kind of op left out (what fusing that op away could save at most), and a 1024-token
// prefill.
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
#include <tuple>
#include <vector>

#include "bench_util.h"
#include "lmd/core/error.h"
#include "lmd/cuda/cuda_backend.h"

using namespace lmd;
using namespace lmd::bench;

namespace {

struct ModelShape {
  const char* name;
  int hidden, heads, kv_heads, head_dim, inter, layers, vocab;
  DType dtype;
};
constexpr ModelShape kShapes[] = {{"Llama-2-7B", 4096, 32, 32, 128, 11008, 32, 32000, DType::F16},
                                  {"InternLM2-1.8B", 2048, 16, 8, 128, 8192, 24, 92544, DType::BF16}};

// Op kinds of a decode step that a timing may leave out.
enum OpMask : unsigned {
  kNorms = 1,
  kRopeKv = 2,
  kAttention = 4,
  kSiluMul = 8,
  kAllOps = kNorms | kRopeKv | kAttention | kSiluMul,
};

struct Layer {
  DeviceTensor attn_norm, ffn_norm;
  DeviceLinear qkv, o, gate_up, down;
};

}  // namespace

int main(int argc, char** argv) try {
  // --w4a16: the decoder linears are int4 (random AWQ codes, group 128) as an AWQ checkpoint loads them;
  // embeddings, norms and lm_head stay fp16.
  bool int4 = false, profile = false;
  ModelShape shape = kShapes[0];
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--w4a16")
      int4 = true;
    else if (arg == "--profile")
      profile = true;
    else if (arg == "--shape" && i + 1 < argc && std::string(argv[i + 1]) == "internlm2-1.8b" && ++i)
      shape = kShapes[1];
    else if (arg == "--shape" && i + 1 < argc && std::string(argv[i + 1]) == "llama2-7b" && ++i)
      shape = kShapes[0];
    else
      fail("usage: lmd_cuda_bench [--w4a16] [--shape llama2-7b|internlm2-1.8b] [--profile]");
  }
  const int kHidden = shape.hidden, kHeads = shape.heads, kKvHeads = shape.kv_heads,
            kHeadDim = shape.head_dim, kInter = shape.inter, kLayers = shape.layers, kVocab = shape.vocab;
  const int kQkv = (kHeads + 2 * kKvHeads) * kHeadDim;
  const DType dt = shape.dtype;
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
  const DeviceTensor pattern = be.upload(HostTensor::from_f32(pattern_f, {int64_t(pattern_f.size())}), dt);
  size_t weight_bytes = 0;
  auto fill_random = [&](DeviceTensor& t) {
    for (size_t off = 0; off < t.nbytes(); off += pattern.nbytes())
      LMD_BENCH_CHECK(cudaMemcpyAsync(static_cast<char*>(t.data) + off, pattern.data,
                                      std::min(pattern.nbytes(), t.nbytes() - off), cudaMemcpyDeviceToDevice,
                                      stream));
  };
  auto random_tensor = [&](Shape shape) {
    DeviceTensor t = be.alloc(dt, std::move(shape));
    fill_random(t);
    weight_bytes += t.nbytes();
    return t;
  };
  std::map<std::pair<int64_t, int64_t>, LinearWeight> awq;  // one random AWQ tensor set per shape
  auto linear = [&](int64_t out, int64_t in) {
    if (int4 && out != kVocab) {
      auto it = awq.find({out, in});
      if (it == awq.end()) it = awq.emplace(std::pair{out, in}, random_awq_linear(rng, in, out, 128)).first;
      DeviceLinear l = be.prepare_linear(it->second, dt);
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
    layers.push_back({random_tensor({kHidden}), random_tensor({kHidden}), linear(kQkv, kHidden),
                      linear(kHidden, kHidden), linear(2 * kInter, kHidden), linear(kHidden, kInter)});
  const DeviceTensor final_norm = random_tensor({kHidden});
  const DeviceLinear lm_head = linear(kVocab, kHidden);
  be.synchronize();

  const int context = 128, block_len = 64;
  const int long_context = 4096;
  KvCacheLayout L{kLayers, kKvHeads, kHeadDim, block_len, (long_context + block_len) / block_len, 0};
  KvCacheStorage cache = be.alloc_kv_cache(L, dt);
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
      for (int64_t cols : {kHidden, kHidden, kQkv, kHeads * kHeadDim, kHidden, 2 * kInter, kInter})
        b.push_back(
            be.upload(HostTensor::from_f32(std::vector<float>(tokens * cols, 0.01f), {tokens, cols}), dt));
      b.push_back(be.alloc(dt, {1, kHidden}));
      b.push_back(be.alloc(dt, {1, kVocab}));
    }
    return b;
  };
  auto decode_batch = [&](int tokens, int ctx) {
    BatchLayout batch;
    batch.seqs.push_back({0, tokens, ctx, blocks});
    return batch;
  };

  // One forward step of `tokens` new tokens after `ctx` cached ones (the model's op sequence), running the
  // linears and the op kinds in `ops`; with fusions `fuse` (FusedOps), every op kind through the model's
  // fused calls, each of which runs fused where `fuse` has its flag.
  auto step = [&](int tokens, int ctx, unsigned ops, unsigned fuse = kFuseNone) {
    auto& b = bufs(tokens);
    DeviceTensor &res = b[0], &normed = b[1], &qkv = b[2], &attn = b[3], &proj = b[4], &gu = b[5],
                 &act = b[6];
    const BatchLayout batch = decode_batch(tokens, ctx);
    be.set_fused_ops(fuse);
    const bool fused = fuse != kFuseNone;
    for (int l = 0; l < kLayers; ++l) {
      const Layer& y = layers[l];
      if (fused) {
        be.add_rmsnorm_linear(res, proj, y.attn_norm, 1e-5f, y.qkv, normed, qkv);
      } else {
        if (ops & kNorms) be.add_rmsnorm(res, proj, y.attn_norm, 1e-5f, normed);
        be.linear(normed, y.qkv, qkv);
      }
      if (fused) {
        be.rope_kv_attention(qkv, batch, l, kHeads, rope, cache, attn);
      } else {
        if (ops & kRopeKv) be.rope_kv_write(qkv, batch, l, kHeads, rope, cache);
        if (ops & kAttention) be.attention(qkv, batch, l, kHeads, cache, attn);
      }
      be.linear(attn, y.o, proj);
      if (fused) {
        be.add_rmsnorm_linear(res, proj, y.ffn_norm, 1e-5f, y.gate_up, normed, gu);
        be.silu_mul_linear(gu, y.down, act, proj);
        continue;
      }
      if (ops & kNorms) be.add_rmsnorm(res, proj, y.ffn_norm, 1e-5f, normed);
      be.linear(normed, y.gate_up, gu);
      if (ops & kSiluMul) be.silu_mul(gu, act);
      be.linear(act, y.down, proj);
    }
    if (tokens == 1) {
      if (ops & kNorms) be.add_rmsnorm(res, proj, final_norm, 1e-5f, b[7]);
      be.linear(b[7], lm_head, b[8]);
    }
  };

  const double kv_bytes = double(kLayers) * 2 * (context + 1) * kKvHeads * kHeadDim * 2;
  const double bytes = double(weight_bytes) + kv_bytes;
  const double linear_bytes = double(weight_bytes) - double(kLayers * 2 + 1) * kHidden * 2;

  if (profile) {
    for (int i = 0; i < 3; ++i) step(1, context, kAllOps);
    be.synchronize();
    LMD_BENCH_CHECK(cudaProfilerStart());
    step(1, context, kAllOps);
    be.synchronize();
    LMD_BENCH_CHECK(cudaProfilerStop());
    return 0;
  }
  const auto [copy_ms, copy_gbs] = copy_bandwidth(be, stream);
  const auto [read_ms, read_gbs] = read_bandwidth(be, stream);

  // The plain GEMV first, then the streaming one (the default); the rows after them use the plain one,
  // and those named "streaming GEMVs" both streaming GEMVs. The decode attention runs 4-warp blocks but in
  // the rows that name 16-warp ones (LMD_WIDE_DECODE=1).
  be.set_wide_decode_attention(false);
  be.set_dense_gemv_stream(false);
  const double lin_ms = median_ms(stream, 3, 50, [&] { step(1, context, 0); });
  be.set_dense_gemv_stream(true);
  const double lin_stream_ms = median_ms(stream, 3, 50, [&] { step(1, context, 0); });
  be.set_dense_gemv_stream(false);
  const int gemv_rows = be.dense_gemv_max_rows();
  be.set_dense_gemv_max_rows(0);
  const double lin_cublas_ms = median_ms(stream, 3, 50, [&] { step(1, context, 0); });
  be.set_dense_gemv_max_rows(gemv_rows);
  const double step_ms = median_ms(stream, 3, 50, [&] { step(1, context, kAllOps); });
  const double fused_step_ms = median_ms(stream, 3, 50, [&] { step(1, context, kAllOps, kFuseAll); });
  be.synchronize();

  // The decode step with the op kinds `ops`, replayed as a CUDA graph; -1 when the capture failed.
  auto graph_ms = [&](unsigned ops, unsigned fuse = kFuseNone) {
    double ms = -1;
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    be.set_fused_ops(
        fuse);  // a change synchronizes the stream: not inside the capture (step's call is a no-op)
    if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
      step(1, context, ops, fuse);
      if (cudaStreamEndCapture(stream, &graph) == cudaSuccess &&
          cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess)
        ms = median_ms(stream, 3, 50, [&] { LMD_BENCH_CHECK(cudaGraphLaunch(exec, stream)); });
    }
    cudaGetLastError();
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    return ms;
  };
  const double full_graph_ms = graph_ms(kAllOps);
  const double fused_graph_ms = graph_ms(kAllOps, kFuseAll);
  // The same two with the streaming GEMVs (dense, and int4: W4Plan::stream).
  be.set_dense_gemv_stream(true);
  be.set_w4a16_stream(int4);
  const double stream_graph_ms = graph_ms(kAllOps), stream_fused_graph_ms = graph_ms(kAllOps, kFuseAll);
  // The same step with the decode attention in 16-warp blocks (set_wide_decode_attention).
  be.set_wide_decode_attention(true);
  const double wide_attn_graph_ms = graph_ms(kAllOps), wide_rope_graph_ms = graph_ms(kAllOps, kFuseRope);
  be.set_wide_decode_attention(false);
  be.set_dense_gemv_stream(false);
  be.set_w4a16_stream(false);
  if (full_graph_ms < 0) std::printf("note: CUDA graph capture of the step failed\n");
  const std::pair<const char*, unsigned> left_out[] = {{"add_rmsnorm", kNorms},
                                                       {"rope_kv_write", kRopeKv},
                                                       {"attention", kAttention},
                                                       {"silu_mul", kSiluMul},
                                                       {"all but the linears", kAllOps}};
  std::vector<double> ablated_ms;
  for (const auto& [name, ops] : left_out) ablated_ms.push_back(graph_ms(kAllOps & ~ops));
  // Each fusion alone (LMD_FUSED_OPS=norm, swiglu or rope), so that a slower one can be left off.
  const std::pair<const char*, unsigned> one_fusion[] = {
      {"norm (add_rmsnorm in the qkv and gate_up GEMVs)", kFuseNorm},
      {"swiglu (silu_mul in the down GEMV)", kFuseSwiglu},
      {"rope (RoPE and the K/V write in the decode attention)", kFuseRope}};
  std::vector<double> one_fusion_ms;
  for (const auto& [name, fuse] : one_fusion) one_fusion_ms.push_back(graph_ms(kAllOps, fuse));

  const int prefill = 1024;
  const double prefill_ms = median_ms(stream, 1, 5, [&] { step(prefill, 0, kAllOps); });

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
  be.set_wide_decode_attention(true);
  const double wide_attn_ms = per_layer([&](int l) { be.attention(d[2], one, l, kHeads, cache, d[3]); });
  const double wide_attn_far_ms = per_layer([&](int l) { be.attention(d[2], far, l, kHeads, cache, d[3]); });
  be.set_wide_decode_attention(false);
  const double silu_ms = per_layer([&](int) { be.silu_mul(d[5], d[6]); });

  const double floor_ms = bytes / (copy_gbs * 1e6);
  std::printf("\n| measurement (%s shape, %s, batch 1, context %d) | time | rate | achieved | vs floor |\n",
              shape.name, int4 ? "W4A16 g128" : std::string(dtype_name(dt)).c_str(), context);
  std::printf("|---|---|---|---|---|\n");
  std::printf("| device-to-device copy, 2 GiB | %.3f ms | | %.0f GB/s (read+write) | |\n", copy_ms, copy_gbs);
  std::printf("| device read, 2 GiB | %.3f ms | | %.0f GB/s (read only) | |\n", read_ms, read_gbs);
  std::printf("| the linears below against the read-only bandwidth | | | | %.0f%% |\n",
              100.0 * (linear_bytes / (read_gbs * 1e6)) / lin_ms);
  std::printf("| 4 linears x 32 layers + lm_head (%s) | %.3f ms | | %.0f GB/s | %.0f%% |\n",
              int4 ? "W4A16 GEMV, lm_head dense GEMV" : "dense GEMV", lin_ms, linear_bytes / lin_ms / 1e6,
              100.0 * (linear_bytes / (copy_gbs * 1e6)) / lin_ms);
  std::printf("| the same, the streaming dense GEMV (%s) | %.3f ms | | %.0f GB/s | %.0f%% |\n",
              int4 ? "lm_head" : "every linear", lin_stream_ms, linear_bytes / lin_stream_ms / 1e6,
              100.0 * (linear_bytes / (copy_gbs * 1e6)) / lin_stream_ms);
  std::printf("| the same, 16-bit weights through cuBLAS | %.3f ms | | %.0f GB/s | %.0f%% |\n", lin_cublas_ms,
              linear_bytes / lin_cublas_ms / 1e6, 100.0 * (linear_bytes / (copy_gbs * 1e6)) / lin_cublas_ms);
  std::printf("| decode step, all ops (%.2f GB read) | %.3f ms | %.1f tok/s | %.0f GB/s | %.0f%% |\n",
              bytes / 1e9, step_ms, 1e3 / step_ms, bytes / step_ms / 1e6, 100.0 * floor_ms / step_ms);
  if (full_graph_ms > 0)
    std::printf("| decode step, CUDA graph replay | %.3f ms | %.1f tok/s | %.0f GB/s | %.0f%% |\n",
                full_graph_ms, 1e3 / full_graph_ms, bytes / full_graph_ms / 1e6,
                100.0 * floor_ms / full_graph_ms);
  std::printf(
      "| decode step, fused ops (norms, RoPE, SwiGLU inside the next kernel) | %.3f ms | %.1f tok/s | %.0f "
      "GB/s | %.0f%% "
      "|\n",
      fused_step_ms, 1e3 / fused_step_ms, bytes / fused_step_ms / 1e6, 100.0 * floor_ms / fused_step_ms);
  if (fused_graph_ms > 0)
    std::printf("| the same, CUDA graph replay | %.3f ms | %.1f tok/s | %.0f GB/s | %.0f%% |\n",
                fused_graph_ms, 1e3 / fused_graph_ms, bytes / fused_graph_ms / 1e6,
                100.0 * floor_ms / fused_graph_ms);
  const std::pair<const char*, double> stream_rows[] = {
      {"decode step, CUDA graph replay, streaming GEMVs", stream_graph_ms},
      {"the same with the fused ops", stream_fused_graph_ms},
      {"the streaming GEMVs, decode attention in 16-warp blocks", wide_attn_graph_ms},
      {"the same with RoPE + KV write fused into that attention", wide_rope_graph_ms}};
  for (const auto& [name, ms] : stream_rows)
    if (ms > 0)
      std::printf("| %s | %.3f ms | %.1f tok/s | %.0f GB/s | %.0f%% |\n", name, ms, 1e3 / ms,
                  bytes / ms / 1e6, 100.0 * floor_ms / ms);
  std::printf("| bandwidth floor (bytes / copy bandwidth) | %.3f ms | %.1f tok/s | | 100%% |\n", floor_ms,
              1e3 / floor_ms);
  std::printf("| prefill %d tokens, %d layers (no lm_head) | %.2f ms | %.0f tok/s | | |\n", prefill, kLayers,
              prefill_ms, prefill * 1e3 / prefill_ms);
  std::printf("\n| graph replay of the unfused step without | time | saved |\n|---|---|---|\n");
  for (size_t i = 0; i < ablated_ms.size(); ++i)
    std::printf("| %s | %.3f ms | %.3f ms |\n", left_out[i].first, ablated_ms[i],
                full_graph_ms - ablated_ms[i]);
  std::printf("\n| graph replay with one fusion (LMD_FUSED_OPS) | time | saved |\n|---|---|---|\n");
  for (size_t i = 0; i < one_fusion_ms.size(); ++i)
    std::printf("| %s | %.3f ms | %.3f ms |\n", one_fusion[i].first, one_fusion_ms[i],
                full_graph_ms - one_fusion_ms[i]);
  std::printf("| all three | %.3f ms | %.3f ms |\n", fused_graph_ms, full_graph_ms - fused_graph_ms);
  const double far_bytes = double(kLayers) * 2 * (long_context + 1) * kKvHeads * kHeadDim * 2;
  std::printf("\n| op x %d layers (decode, batch 1) | total | per call |\n|---|---|---|\n", kLayers);
  std::printf("| add_rmsnorm (the step has 2 x %d + 1) | %.3f ms | %.1f us |\n", kLayers, norm_ms,
              norm_ms * 1e3 / kLayers);
  std::printf("| rope_kv_write | %.3f ms | %.1f us |\n", rope_ms, rope_ms * 1e3 / kLayers);
  for (const auto& [blocks, near_ms, far_ms] :
       {std::tuple("", attn_ms, attn_far_ms),
        std::tuple(", 16-warp blocks", wide_attn_ms, wide_attn_far_ms)}) {
    std::printf("| attention, context %d%s | %.3f ms | %.1f us |\n", context, blocks, near_ms,
                near_ms * 1e3 / kLayers);
    std::printf("| attention, context %d%s (%.0f GB/s of K/V) | %.3f ms | %.1f us |\n", long_context, blocks,
                far_bytes / far_ms / 1e6, far_ms, far_ms * 1e3 / kLayers);
  }
  std::printf("| silu_mul | %.3f ms | %.1f us |\n", silu_ms, silu_ms * 1e3 / kLayers);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "lmd_cuda_bench: %s\n", e.what());
  return 1;
}
