// W4A16 on the CUDA backend: int4 linears (tensor-core GEMV and dequantize + cuBLAS, each forced) against
// the CPU reference (dequantize_awq, fp32 matmul) on Llama-2-7B layer shapes, and an RTN-quantized
// wt2-llama-22m whose CUDA logits must follow the CPU backend's. Skipped (with a warning) without a GPU.
#include "test_support.h"

#if defined(LMD_HAVE_CUDA)
#include <random>

#include "cuda_test_support.h"
#include "lmd/core/random_checkpoint.h"
#include "lmd/cuda/cuda_backend.h"
#include "lmd/engine/cpu_backend.h"
#include "lmd/engine/model.h"
#include "lmd/quant/awq.h"

using namespace lmd;
using namespace lmd::test;

TEST_CASE("cuda w4a16: int4 linears match the CPU dequant reference", "[gpu][w4a16]") {
  LMD_REQUIRE_GPU();
  CudaBackend gpu;
  CpuBackend cpu;
  std::mt19937 rng(11);
  Worst worst;
  struct Shape2 {
    int64_t in, out;
    std::vector<int> groups;
  };
  // q|k|v fused (4096 -> 12288), o, gate or up, down; the group sizes 32 and 64 on a square and a tall K.
  const std::vector<Shape2> shapes{
      {4096, 4096, {32, 64, 128}}, {4096, 11008, {128}}, {11008, 4096, {32, 64, 128}}, {4096, 12288, {128}}};
  for (const Shape2& sh : shapes)
    for (int group : sh.groups) {
      const LinearWeight w = random_awq_linear(rng, sh.in, sh.out, group);
      const DeviceLinear cl = cpu.prepare_linear(w, DType::F32);
      const DeviceLinear g16 = gpu.prepare_linear(w, DType::F16), g_bf = gpu.prepare_linear(w, DType::BF16);
      REQUIRE(g16.is_int4());
      for (int64_t m : {1, 2, 7, 16, 24, 33, 64, 100, 256}) {
        const auto x = random_values(rng, m * sh.in);
        for (DType dt : {DType::F16, DType::BF16}) {
          const auto xr = rounded(x, dt);
          DeviceTensor ref = cpu.alloc(DType::F32, {m, sh.out});
          cpu.linear(on(cpu, xr, {m, sh.in}, DType::F32), cl, ref);
          const std::vector<float> expected = values(cpu, ref);
          const DeviceTensor gx = on(gpu, xr, {m, sh.in}, dt);
          // Each path forced: the GEMV (64 rows a launch), the streaming GEMV (1-8 rows) and dequantize +
          // cuBLAS.
          enum Path { kGemv, kStream, kDequant };
          for (Path path : {kGemv, kStream, kDequant}) {
            if (path == kStream && m > 8) continue;
            const char* name = path == kGemv     ? "w4a16 gemv"
                               : path == kStream ? "w4a16 streaming gemv"
                                                 : "w4a16 dequant+cuBLAS";
            INFO(sh.in << " -> " << sh.out << " group " << group << " rows " << m << " " << dtype_name(dt)
                       << " " << name);
            gpu.set_w4a16_dense_from(path == kDequant ? 0 : m + 1);
            gpu.set_w4a16_stream(path == kStream);
            Guarded g = guarded(gpu, dt, {m, sh.out});
            gpu.linear(gx, dt == DType::F16 ? g16 : g_bf, g.view);
            check_written(gpu, g);
            CHECK(worst.add(name, dt, rel_error(values(gpu, g.view), expected)) < tolerance(dt));
          }
          gpu.set_w4a16_stream(false);
        }
      }
    }
  worst.report();
}

TEST_CASE("cuda w4a16: an int4 wt2-llama-22m follows the CPU backend", "[gpu][w4a16]") {
  LMD_REQUIRE_GPU();
  LMD_REQUIRE_ASSETS();
  const auto dir = model_dir("wt2-llama-22m");
  const ModelSpec spec = load_model_spec(dir);
  CheckpointWeights weights = load_checkpoint(dir, spec);
  // Round-to-nearest int4, group 128, on every decoder linear (what `auto_awq` writes without smoothing).
  for (LayerWeights& layer : weights.layers) {
    const FloatLayer f = to_float_layer(layer);
    auto quantize = [](LinearWeight& w, const FloatLinear& fl) {
      Int4Linear q = quantize_int4(fl, 128, "test");
      w = {};
      w.qweight = std::move(q.qweight);
      w.qzeros = std::move(q.qzeros);
      w.scales = std::move(q.scales);
    };
    quantize(layer.q, f.q);
    quantize(layer.k, f.k);
    quantize(layer.v, f.v);
    quantize(layer.o, f.o);
    quantize(layer.gate, f.gate);
    quantize(layer.up, f.up);
    quantize(layer.down, f.down);
  }
  CudaBackend gpu;
  CpuBackend cpu(2);
  Model gm(spec, weights, gpu), cm(spec, weights, cpu);
  REQUIRE(gm.activation_dtype() == DType::F16);
  const int block_len = 16, prompt = 37, steps = 6;
  KvCacheStorage gc = gpu.alloc_kv_cache(gm.kv_layout(4, block_len, 0), gm.activation_dtype());
  KvCacheStorage cc = cpu.alloc_kv_cache(cm.kv_layout(4, block_len, 0), cm.activation_dtype());
  const std::vector<int> blocks{3, 0, 2, 1};
  std::mt19937 rng(7);
  std::vector<int> ids(prompt);
  for (int& t : ids) t = 3 + int(rng() % 31000);
  int context = 0;
  // The prompt (37 rows, all logits), then single-token decode steps fed with the CPU's greedy choice
  // (graph steps from the second); the last three with the norms and SwiGLU fused into the int4 GEMVs,
  // which are the streaming ones there.
  for (int step = 0; step <= steps; ++step) {
    gpu.set_fused_ops(step > steps / 2 ? kFuseAll : kFuseNone);
    gpu.set_w4a16_stream(step > steps / 2);
    BatchLayout batch;
    batch.seqs.push_back({0, int(ids.size()), context, blocks});
    const std::vector<float> gl = gm.forward(ids, batch, gc, step == 0),
                             cl = cm.forward(ids, batch, cc, step == 0);
    const double err = rel_error(gl, cl);
    INFO("step " << step);
    WARN("int4 wt2-llama-22m, CUDA fp16 vs CPU fp32, step " << step << (step > steps / 2 ? " (fused)" : "")
                                                            << ": logits relative error " << err);
    CHECK(err < 1e-2);
    context += int(ids.size());
    ids = {int(std::max_element(cl.end() - spec.vocab, cl.end()) - (cl.end() - spec.vocab))};
  }
}

#endif
