// Every CUDA op against the CPU reference backend on random inputs (relative L2 error within the
// activation dtype's rounding, and guard elements after each output that must stay untouched), and the
// CUDA model end to end against the transformers fixtures. Skipped (with a warning) without a GPU.
#include "test_support.h"

#if defined(LMD_HAVE_CUDA)
#include <algorithm>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <sstream>

#include "backend_checks.h"
#include "cuda_test_support.h"
#include "lmd/core/error.h"
#include "lmd/core/random_checkpoint.h"
#include "lmd/cuda/cuda_backend.h"
#include "lmd/engine/block_pool.h"
#include "lmd/engine/cpu_backend.h"
#include "lmd/engine/model.h"

using namespace lmd;
using namespace lmd::test;

namespace {

const DType kDtypes[] = {DType::F16, DType::BF16, DType::F32};

}  // namespace

TEST_CASE("cuda: device query", "[gpu]") {
  LMD_REQUIRE_GPU();
  CudaBackend gpu;
  WARN("device: " << gpu.name());
  CHECK(!cuda_device_name().empty());
  CHECK(gpu.free_memory() > (size_t(1) << 30));
  CHECK(gpu.activation_dtype(DType::F32) == DType::F16);
  CHECK(gpu.activation_dtype(DType::BF16) == DType::BF16);
}

TEST_CASE("cuda: download_into reuses a matching host buffer", "[gpu]") {
  LMD_REQUIRE_GPU();
  CudaBackend gpu;
  test::check_download_into(gpu);
}

TEST_CASE("cuda: rmsnorm and add_rmsnorm match the CPU", "[gpu]") {
  LMD_REQUIRE_GPU();
  CudaBackend gpu;
  CpuBackend cpu(2);
  std::mt19937 rng(1);
  Worst worst;
  for (DType dt : kDtypes)
    for (int64_t rows : {1, 7, 33})
      for (int n : {64, 100, 384, 4096}) {  // 100: not a multiple of the 16-byte pack
        INFO(dtype_name(dt) << " rows " << rows << " n " << n);
        const auto x = rounded(random_values(rng, rows * n), dt);
        const auto res = rounded(random_values(rng, rows * n, 3.f), dt);
        const auto w = rounded(random_values(rng, n, 0.5f), dt);
        DeviceTensor cx = on(cpu, x, {rows, n}, DType::F32), cres = on(cpu, res, {rows, n}, DType::F32);
        DeviceTensor cw = on(cpu, w, {n}, DType::F32), cout = cpu.alloc(DType::F32, {rows, n});
        DeviceTensor gx = on(gpu, x, {rows, n}, dt), gres = on(gpu, res, {rows, n}, dt),
                     gw = on(gpu, w, {n}, dt);

        Guarded g = guarded(gpu, dt, {rows, n});
        cpu.rmsnorm(cx, cw, 1e-5f, cout);
        gpu.rmsnorm(gx, gw, 1e-5f, g.view);
        check_written(gpu, g);
        CHECK(worst.add("rmsnorm", dt, test::rel_error(values(gpu, g.view), values(cpu, cout))) <
              tolerance(dt));

        Guarded g2 = guarded(gpu, dt, {rows, n});
        cpu.add_rmsnorm(cres, cx, cw, 1e-5f, cout);
        gpu.add_rmsnorm(gres, gx, gw, 1e-5f, g2.view);
        check_written(gpu, g2);
        CHECK(worst.add("add_rmsnorm residual", dt, test::rel_error(values(gpu, gres), values(cpu, cres))) <
              tolerance(dt));
        CHECK(worst.add("add_rmsnorm", dt, test::rel_error(values(gpu, g2.view), values(cpu, cout))) <
              tolerance(dt));
      }
  worst.report();
}

TEST_CASE("cuda: the small-batch dense GEMV matches the CPU and cuBLAS", "[gpu]") {
  LMD_REQUIRE_GPU();
  CudaBackend gpu;
  CpuBackend cpu(2);
  std::mt19937 rng(12);
  Worst worst;
  for (DType dt : {DType::F16, DType::BF16})
    for (DType out_dt : {dt, DType::F32})  // F32: the logits of a 16-bit model
      for (int tokens : {1, 2, 3, 4})
        // K of one partial 256-input pass (1000), of many (4104), widths that are not a multiple of the
        // 8 outputs per block (173), and Llama-2-7B's fused gate|up; the streaming GEMV takes the K that
        // are multiples of 256 (2048, 4096).
        for (auto [in, out] :
             {std::pair{1000, 173}, std::pair{4104, 64}, std::pair{2048, 173}, std::pair{4096, 22016}}) {
          if (in * out > 4096 * 4096 && tokens > 1) continue;
          INFO(dtype_name(dt) << " -> " << dtype_name(out_dt) << " tokens " << tokens << " " << in << "->"
                              << out);
          const auto x = rounded(random_values(rng, int64_t(tokens) * in), dt);
          LinearWeight w;
          w.weight = HostTensor::from_f32(rounded(random_values(rng, int64_t(out) * in, 0.05f), dt),
                                          {int64_t(out) * in})
                         .reshape({out, in});
          DeviceLinear cl = cpu.prepare_linear(w, DType::F32), gl = gpu.prepare_linear(w, dt);
          DeviceTensor cout = cpu.alloc(DType::F32, {tokens, out});
          cpu.linear(on(cpu, x, {tokens, in}, DType::F32), cl, cout);
          const DeviceTensor gx = on(gpu, x, {tokens, in}, dt);
          // The GEMV (plain, then streaming) and cuBLAS.
          std::vector<float> by_path[3];
          const char* names[] = {"dense cuBLAS", "dense gemv", "dense streaming gemv"};
          for (int path : {1, 2, 0}) {
            gpu.set_dense_gemv_max_rows(path > 0 ? 4 : 0);
            gpu.set_dense_gemv_stream(path == 2);
            Guarded g = guarded(gpu, out_dt, {tokens, out});
            gpu.linear(gx, gl, g.view);
            check_written(gpu, g);
            by_path[path] = values(gpu, g.view);
            CHECK(worst.add(names[path], dt, test::rel_error(by_path[path], values(cpu, cout))) <
                  tolerance(dt));
          }
          gpu.set_dense_gemv_stream(false);
          CHECK(test::rel_error(by_path[1], by_path[0]) < tolerance(dt));
          // The same sums in the same order: the same bits.
          CHECK(by_path[2] == by_path[1]);
        }
  worst.report();
}

TEST_CASE("cuda: linear, silu_mul, embedding and gather_rows match the CPU", "[gpu]") {
  LMD_REQUIRE_GPU();
  CudaBackend gpu;
  CpuBackend cpu(2);
  std::mt19937 rng(2);
  Worst worst;
  for (DType dt : kDtypes) {
    for (int tokens : {1, 5, 17})
      for (auto [in, out] : {std::pair{64, 96}, std::pair{384, 1152}, std::pair{1024, 172}})
        for (bool bias : {false, true}) {
          INFO(dtype_name(dt) << " linear tokens " << tokens << " " << in << "->" << out << " bias " << bias);
          const auto x = rounded(random_values(rng, int64_t(tokens) * in), dt);
          LinearWeight w;
          w.weight = HostTensor::from_f32(rounded(random_values(rng, int64_t(out) * in, 0.05f), dt),
                                          {int64_t(out) * in})
                         .reshape({out, in});
          if (bias) w.bias = HostTensor::from_f32(rounded(random_values(rng, out), dt), {out});
          DeviceLinear cl = cpu.prepare_linear(w, DType::F32), gl = gpu.prepare_linear(w, dt);
          DeviceTensor cout = cpu.alloc(DType::F32, {tokens, out});
          Guarded g = guarded(gpu, dt, {tokens, out});
          cpu.linear(on(cpu, x, {tokens, in}, DType::F32), cl, cout);
          gpu.linear(on(gpu, x, {tokens, in}, dt), gl, g.view);
          check_written(gpu, g);
          CHECK(worst.add("linear", dt, test::rel_error(values(gpu, g.view), values(cpu, cout))) <
                tolerance(dt));
        }
    for (int64_t rows : {1, 9})
      for (int inter : {172, 1024}) {
        INFO(dtype_name(dt) << " silu_mul rows " << rows << " inter " << inter);
        const auto gu = rounded(random_values(rng, rows * 2 * inter, 2.f), dt);
        DeviceTensor cout = cpu.alloc(DType::F32, {rows, inter});
        Guarded g = guarded(gpu, dt, {rows, inter});
        cpu.silu_mul(on(cpu, gu, {rows, 2 * inter}, DType::F32), cout);
        gpu.silu_mul(on(gpu, gu, {rows, 2 * inter}, dt), g.view);
        check_written(gpu, g);
        CHECK(worst.add("silu_mul", dt, test::rel_error(values(gpu, g.view), values(cpu, cout))) <
              tolerance(dt));
      }
    for (int hidden : {64, 36, 4096}) {  // 36 fp16 values = 72 bytes: the non-16-byte-multiple copy path
      INFO(dtype_name(dt) << " embedding hidden " << hidden);
      const int vocab = 50;
      const auto table = rounded(random_values(rng, int64_t(vocab) * hidden), dt);
      const std::vector<int> ids{3, 0, 49, 3, 17, 8, 8};
      DeviceTensor gtable = on(gpu, table, {vocab, hidden}, dt);
      Guarded g = guarded(gpu, dt, {int64_t(ids.size()), hidden});
      gpu.embedding(gtable, ids, g.view);
      check_written(gpu, g);
      DeviceTensor cout = cpu.alloc(DType::F32, {int64_t(ids.size()), hidden});
      cpu.embedding(on(cpu, table, {vocab, hidden}, DType::F32), ids, cout);
      CHECK(values(gpu, g.view) == values(cpu, cout));
      const std::vector<int> rows{6, 0, 2};
      Guarded g2 = guarded(gpu, dt, {3, hidden});
      gpu.gather_rows(g.view, rows, g2.view);
      check_written(gpu, g2);
      DeviceTensor crows = cpu.alloc(DType::F32, {3, hidden});
      cpu.gather_rows(cout, rows, crows);
      CHECK(values(gpu, g2.view) == values(cpu, crows));
      CHECK_THROWS_AS(gpu.embedding(gtable, {vocab}, g.view), lmd::Error);
    }
  }
  worst.report();
}

TEST_CASE("LMD_FUSED_OPS names the fusions the CUDA backend runs") {
  CHECK(parse_fused_ops(nullptr) == kFuseNone);
  CHECK(parse_fused_ops("") == kFuseNone);
  CHECK(parse_fused_ops("0") == kFuseNone);
  CHECK(parse_fused_ops("1") == kFuseAll);
  CHECK(parse_fused_ops("all") == kFuseAll);
  CHECK(parse_fused_ops("rope") == kFuseRope);
  CHECK(parse_fused_ops("norm,swiglu") == (kFuseNorm | kFuseSwiglu));
  CHECK(parse_fused_ops("swiglu,rope,norm") == kFuseAll);
  for (const char* bad : {"2", "yes", "norm,", ",rope", "norm;rope", "Norm"}) {
    INFO(bad);
    try {
      parse_fused_ops(bad);
      FAIL("accepted");
    } catch (const Error& e) {
      CHECK(std::string(e.what()).find("LMD_FUSED_OPS") != std::string::npos);
    }
  }
}

TEST_CASE("cuda: add_rmsnorm_linear and silu_mul_linear, fused into the GEMVs, match the CPU", "[gpu]") {
  LMD_REQUIRE_GPU();
  CudaBackend gpu;
  CpuBackend cpu(2);
  std::mt19937 rng(21);
  Worst worst;
  struct FusedCase {
    int64_t in, out;
    bool int4;
  };
  // Llama-2-7B's q|k|v, gate|up and down, InternLM2-1.8B's gate|up; dense and int4 (group 128); rows that
  // the fused kernels take (1-2 at 11008 inputs, up to 4 dense and 5 int4 at 4096) and rows beyond,
  // which run the two ops.
  const FusedCase cases[] = {{4096, 12288, false}, {4096, 22016, false}, {11008, 4096, false},
                             {2048, 16384, false}, {4096, 12288, true},  {11008, 4096, true},
                             {2048, 16384, true}};
  for (const FusedCase& c : cases) {
    LinearWeight w;
    if (c.int4)
      w = random_awq_linear(rng, c.in, c.out, 128);
    else
      w.weight = HostTensor::from_f32(random_values(rng, c.in * c.out, 0.02f), {c.out, c.in});
    const DeviceLinear cl = cpu.prepare_linear(w, DType::F32);
    for (DType dt : {DType::F16, DType::BF16}) {
      const DeviceLinear gl = gpu.prepare_linear(w, dt);
      REQUIRE(gl.is_int4() == c.int4);
      // Rows, and whether the GEMVs are the streaming ones.
      const std::pair<int64_t, bool> runs[] = {{1, false}, {1, true}, {2, false}, {2, true}, {3, false},
                                               {3, true},  {4, true}, {5, true},  {9, false}};
      for (const auto& run : runs) {
        const int64_t rows = run.first;
        const bool stream = run.second;
        if (!c.int4 && rows > 4) continue;  // the dense GEMV's rows
        gpu.set_dense_gemv_max_rows(4);
        auto set_streaming = [&](bool on) {
          gpu.set_w4a16_stream(on);
          gpu.set_dense_gemv_stream(on);
        };
        set_streaming(stream);
        // The streaming GEMVs sum as the plain ones do: `fused_op` (run with the fusion `fusion`) gives the
        // same bits with them switched off.
        auto same_bits_unstreamed = [&](unsigned fusion, const std::vector<float>& streamed,
                                        const std::function<std::vector<float>()>& fused_op) {
          if (!stream) return;
          gpu.set_fused_ops(fusion);
          set_streaming(false);
          CHECK(fused_op() == streamed);
          set_streaming(true);
        };
        INFO(c.in << " -> " << c.out << (c.int4 ? " int4 " : " dense ") << dtype_name(dt) << " rows " << rows
                  << (stream ? " streaming" : ""));
        // add_rmsnorm_linear: the residual and the output, against the CPU's two ops.
        const auto x = rounded(random_values(rng, rows * c.in), dt);
        const auto res = rounded(random_values(rng, rows * c.in, 3.f), dt);
        const auto nw = rounded(random_values(rng, c.in, 0.5f), dt);
        DeviceTensor cres = on(cpu, res, {rows, c.in}, DType::F32),
                     cnorm = cpu.alloc(DType::F32, {rows, c.in});
        DeviceTensor cout = cpu.alloc(DType::F32, {rows, c.out});
        cpu.add_rmsnorm_linear(cres, on(cpu, x, {rows, c.in}, DType::F32), on(cpu, nw, {c.in}, DType::F32),
                               1e-5f, cl, cnorm, cout);
        const DeviceTensor gx = on(gpu, x, {rows, c.in}, dt), gw = on(gpu, nw, {c.in}, dt);
        std::vector<float> by_path[2], residual_by_path[2];
        for (bool fused : {true, false}) {
          gpu.set_fused_ops(fused ? kFuseNorm : kFuseNone);
          DeviceTensor gres = on(gpu, res, {rows, c.in}, dt), gnorm = gpu.alloc(dt, {rows, c.in});
          // Twice: the arrival counter must be back at zero after a launch for the next to write the
          // residual.
          for (int rep = 0; rep < 2; ++rep) {
            if (rep == 1) gres = on(gpu, res, {rows, c.in}, dt);
            Guarded g = guarded(gpu, dt, {rows, c.out});
            gpu.add_rmsnorm_linear(gres, gx, gw, 1e-5f, gl, gnorm, g.view);
            check_written(gpu, g);
            by_path[fused] = values(gpu, g.view);
            residual_by_path[fused] = values(gpu, gres);
            const std::string op = std::string(fused ? "fused" : "unfused") + " add_rmsnorm_linear";
            CHECK(worst.add(op, dt, rel_error(by_path[fused], values(cpu, cout))) < tolerance(dt));
            CHECK(worst.add(op + " residual", dt, rel_error(residual_by_path[fused], values(cpu, cres))) <
                  tolerance(dt));
          }
        }
        CHECK(rel_error(by_path[1], by_path[0]) < tolerance(dt));
        // The sum is element-wise and rounded once: the same bits either way.
        CHECK(residual_by_path[1] == residual_by_path[0]);
        same_bits_unstreamed(kFuseNorm, by_path[1], [&] {
          DeviceTensor gres = on(gpu, res, {rows, c.in}, dt), gnorm = gpu.alloc(dt, {rows, c.in});
          DeviceTensor y = gpu.alloc(dt, {rows, c.out});
          gpu.add_rmsnorm_linear(gres, gx, gw, 1e-5f, gl, gnorm, y);
          return values(gpu, y);
        });

        // silu_mul_linear: gate|up of the linear's inputs.
        const auto gu = rounded(random_values(rng, rows * 2 * c.in, 2.f), dt);
        DeviceTensor cact = cpu.alloc(DType::F32, {rows, c.in});
        cpu.silu_mul_linear(on(cpu, gu, {rows, 2 * c.in}, DType::F32), cl, cact, cout);
        const DeviceTensor ggu = on(gpu, gu, {rows, 2 * c.in}, dt);
        for (bool fused : {true, false}) {
          gpu.set_fused_ops(fused ? kFuseSwiglu : kFuseNone);
          DeviceTensor gact = gpu.alloc(dt, {rows, c.in});
          Guarded g = guarded(gpu, dt, {rows, c.out});
          gpu.silu_mul_linear(ggu, gl, gact, g.view);
          check_written(gpu, g);
          by_path[fused] = values(gpu, g.view);
          const std::string op = std::string(fused ? "fused" : "unfused") + " silu_mul_linear";
          CHECK(worst.add(op, dt, rel_error(by_path[fused], values(cpu, cout))) < tolerance(dt));
        }
        same_bits_unstreamed(kFuseSwiglu, by_path[1], [&] {
          DeviceTensor gact = gpu.alloc(dt, {rows, c.in}), y = gpu.alloc(dt, {rows, c.out});
          gpu.silu_mul_linear(ggu, gl, gact, y);
          return values(gpu, y);
        });
        CHECK(rel_error(by_path[1], by_path[0]) < tolerance(dt));
      }
    }
  }
  worst.report();
}

namespace {

struct AttnCase {
  int heads, kv_heads, head_dim, block_len;
  std::vector<std::pair<int, int>> seqs;  // (context already cached, new tokens)
};

// Fills each backend's cache with the sequences' contexts (one prefill step), then runs the new tokens:
// rope_kv_write and attention are compared after both steps, and after each of `graph_steps` more decode
// steps (every sequence adds one token) that the GPU runs as graph steps: the first records, the second
// captures, the others replay (a fresh backend per case: graphs are keyed by shape only). A graph step's
// qkv and output live outside the graph, whose replays use the captured pointers: they are refilled
// before each step, the output with NaN, so that a row no kernel wrote shows.
// `static_params` (4 per layer) selects the offline per-layer int8 mode. `fused`: the GPU runs steps in
// which every sequence adds one token as rope_kv_attention with fused ops on (the CPU as its two ops);
// its queries stay unrotated in qkv, so only the attention output is compared there, and the cache it
// wrote is read by the steps after it.
void run_attention_case(CudaBackend& gpu, CpuBackend& cpu, const AttnCase& c, DType dt, int quant_bits,
                        std::mt19937& rng, Worst& worst, const std::vector<float>& static_params = {},
                        int graph_steps = 0, bool fused = false) {
  const std::string kv_name = quant_bits == 0         ? "attention"
                              : static_params.empty() ? "attention KV int" + std::to_string(quant_bits)
                                                      : "attention KV static int8";
  const int layers = 2, layer = 1, qkv_cols = (c.heads + 2 * c.kv_heads) * c.head_dim;
  RopeConfig rope;
  rope.head_dim = c.head_dim;
  rope.theta = 10000.0;
  std::vector<std::vector<int>> blocks;
  int num_blocks = 0;
  for (auto [ctx, n] : c.seqs) num_blocks += blocks_for(ctx + n + graph_steps, c.block_len);
  std::vector<int> all(num_blocks);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);  // block tables out of order, interleaved between sequences
  int next = 0;
  for (auto [ctx, n] : c.seqs) {
    const int nb = blocks_for(ctx + n + graph_steps, c.block_len);
    blocks.emplace_back(all.begin() + next, all.begin() + next + nb);
    next += nb;
  }
  KvCacheLayout L{layers, c.kv_heads, c.head_dim, c.block_len, num_blocks, quant_bits};
  L.static_params = static_params;
  KvCacheStorage ccache = cpu.alloc_kv_cache(L, DType::F32), gcache = gpu.alloc_kv_cache(L, dt);

  DeviceTensor graph_qkv;
  Guarded graph_out;
  const CudaBackend::GraphCounts graphs_before = gpu.graph_counts();
  for (int step = 0; step < 2 + graph_steps; ++step) {
    const bool graph = step >= 2;
    BatchLayout batch;
    int tokens = 0;
    for (size_t s = 0; s < c.seqs.size(); ++s) {
      const auto [ctx, n] = c.seqs[s];
      const int num_new = step == 0 ? ctx : step == 1 ? n : 1;
      const int context = step == 0 ? 0 : step == 1 ? ctx : ctx + n + step - 2;
      if (num_new == 0) continue;
      batch.seqs.push_back({tokens, num_new, context, blocks[s]});
      tokens += num_new;
    }
    if (tokens == 0) continue;
    INFO("step " << step << " tokens " << tokens);
    const auto qkv = rounded(random_values(rng, int64_t(tokens) * qkv_cols), dt);
    DeviceTensor cqkv = on(cpu, qkv, {tokens, qkv_cols}, DType::F32),
                 gqkv = on(gpu, qkv, {tokens, qkv_cols}, dt);
    const Shape out_shape{tokens, c.heads * c.head_dim};
    Guarded g = guarded(gpu, dt, out_shape);
    if (graph) {
      if (graph_qkv.empty()) {
        graph_qkv = gpu.alloc(dt, {tokens, qkv_cols});
        graph_out = guarded(gpu, dt, out_shape);
      }
      auto copy = [&](DeviceTensor src, DeviceTensor dst) {  // as one row each
        src.shape = dst.shape = {1, src.numel()};
        gpu.gather_rows(src, {0}, dst);
      };
      copy(gqkv, graph_qkv);
      copy(g.full, graph_out.full);
      gqkv = graph_qkv;
      g = graph_out;
      REQUIRE(gpu.begin_graph_step(batch));
    }
    bool one_token = true;
    for (const SeqSlice& q : batch.seqs) one_token &= q.num_new == 1;
    const bool fused_step = fused && one_token;
    cpu.rope_kv_write(cqkv, batch, layer, c.heads, rope, ccache);
    DeviceTensor cout = cpu.alloc(DType::F32, out_shape);
    cpu.attention(cqkv, batch, layer, c.heads, ccache, cout);
    if (fused_step) {
      gpu.rope_kv_attention(gqkv, batch, layer, c.heads, rope, gcache, g.view);
    } else {
      gpu.rope_kv_write(gqkv, batch, layer, c.heads, rope, gcache);
      gpu.attention(gqkv, batch, layer, c.heads, gcache, g.view);
    }
    if (graph) REQUIRE(gpu.end_graph_step(true));
    if (!fused_step)
      CHECK(worst.add("rope_kv_write", dt, test::rel_error(values(gpu, gqkv), values(cpu, cqkv))) <
            tolerance(dt));
    check_written(gpu, g);
    // The GPU's K/V tiles hold dequantized values rounded to dt: one more rounding than the reference.
    CHECK(worst.add(fused_step ? "rope_kv_attention (fused)" : kv_name, dt,
                    test::rel_error(values(gpu, g.view), values(cpu, cout))) < 2 * tolerance(dt));
  }
  const CudaBackend::GraphCounts graphs = gpu.graph_counts();
  CHECK(graphs.captured - graphs_before.captured == (graph_steps >= 2 ? 1 : 0));
  CHECK(graphs.replayed - graphs_before.replayed == std::max(0, graph_steps - 2));
  CHECK(graphs.failed == graphs_before.failed);
}

}  // namespace

TEST_CASE("cuda: rope_kv_write and paged attention match the CPU", "[gpu]") {
  LMD_REQUIRE_GPU();
  CudaBackend gpu;
  CpuBackend cpu;  // all cores: the long-context cases are heavy for the reference
  std::mt19937 rng(3);
  Worst worst;
  const std::vector<std::pair<int, int>> mixed{{0, 1}, {37, 1}, {100, 13}, {0, 70}, {17, 3}};
  const std::vector<AttnCase> cases{
      {8, 8, 64, 16, mixed},                     // MHA, head_dim 64
      {8, 4, 128, 16, mixed},                    // GQA 2
      {16, 4, 64, 64, mixed},                    // GQA 4, blocks of 64
      {32, 4, 128, 16, mixed},                   // GQA 8
      {8, 1, 64, 32, {{5, 9}, {250, 1}}},        // GQA 8 with one KV head
      {8, 4, 8, 16, {{0, 30}, {12, 1}}},         // stories260K's head_dim 8
      {32, 32, 128, 64, {{1500, 1}, {700, 2}}},  // long decode: split-K with the combine pass
      {4, 2, 256, 16, {{40, 5}}},                // head_dim 256
      {8, 2, 128, 16, {{2000, 1}}},              // one decode item cut into 16 splits (8 if 16-warp)
      // Six Llama-2-7B-like decodes (192 blocks): 4-warp decode blocks either way, each split 2 ways.
      {32, 32, 128, 16, {{300, 1}, {301, 1}, {17, 1}, {450, 1}, {129, 1}, {0, 1}}},
  };
  // Decode items in 4-warp blocks and, where the batch leaves SMs idle, in 16-warp ones.
  for (bool wide : {false, true})
    for (const AttnCase& c : cases)
      for (DType dt : kDtypes) {
        if (dt == DType::F32 && c.head_dim > 128) continue;  // fp32 tiles of 256 dims exceed shared memory
        INFO(dtype_name(dt) << " heads " << c.heads << "/" << c.kv_heads << " head_dim " << c.head_dim
                            << " block " << c.block_len << (wide ? " wide" : ""));
        gpu.set_wide_decode_attention(wide);
        run_attention_case(gpu, cpu, c, dt, 0, rng, worst);
      }
  // Quantized caches: decode items run the register-resident kernel for head_dim 64 and 128 (GQA up to
  // 8, split-K) and the tile kernel for head_dim 8, whose rows are narrower than a 16-byte load.
  for (int bits : {8, 4})
    for (int i : {1, 2, 3, 4, 5, 6, 9})
      for (DType dt : {DType::F16, DType::BF16}) {
        const AttnCase& c = cases[i];
        if (dt == DType::BF16 && i != 3) continue;
        const bool wide = (i + bits) % 2 == 0;  // each case in 16-warp blocks with one of int8 and int4
        gpu.set_wide_decode_attention(wide);
        INFO("KV int" << bits << " " << dtype_name(dt) << " heads " << c.heads << "/" << c.kv_heads
                      << " head_dim " << c.head_dim << " block " << c.block_len << (wide ? " wide" : ""));
        const KvCacheLayout L{2, c.kv_heads, c.head_dim, c.block_len, 1, bits};
        CHECK(cuda_decode_attention_v2(dt, L) == (c.head_dim >= 64));
        run_attention_case(gpu, cpu, c, dt, bits, rng, worst);
      }
  // Offline per-layer int8: scales and zeros exactly representable in fp16 (the GPU keeps them as fp16
  // row parameters), so both backends dequantize to the same values. K/V here lie within [-2, 2).
  const std::vector<float> fixed{1.f / 64, 0.f, 1.f / 64, 0.f, 1.f / 64, 0.f, 1.f / 64, 0.f};
  for (int i : {1, 3, 4}) {
    INFO("KV static int8 F16 case " << i);
    run_attention_case(gpu, cpu, cases[i], DType::F16, 8, rng, worst, fixed);
  }
  worst.report();
}

// Decode steps as CUDA graph steps, whose plans split every item as many ways as fill the device, or into as
// many 32-key chunks (256 for 16-warp decode blocks) as the graph's block stride holds if fewer (splits past
// the context are empty; test_attn_plan.cpp checks the plans). On an H100 (132 SMs), in 4-warp blocks: 9 ways
// for one sequence of Llama-2-7B's 32 KV heads at 1000 tokens, 32 for one KV head at 600 (19 holding keys;
// the int8/int4 kernels deal the 8 heads of the group over 4 and 8 row blocks, each with its own merge), 4
// for 3 short sequences over 4 KV heads, 2 for 40 sequences over 4, 17 for a 700-token and an empty sequence
// over InternLM2's 8, 256 for one KV head at 8000 tokens. Each case runs again in 16-warp blocks (but the 40
// sequences, which fill the device): 4, 4 (3 holding keys; 8 row blocks), unsplit, 4 (the empty sequence's
// first split holds its only key and writes the output alone, the other three do nothing) and 32 ways. The
// last split block of each merge merges it: a replay finds every arrival counter back at zero, or rows go
// unwritten (NaN). Each case runs again as rope_kv_attention with fused ops on (16-bit activations): the
// decode attention kernel rotates q and k itself and writes the new token's K/V, which later steps attend
// over; over a quantized cache and at head_dim 8 the op runs as its two ops. Cases 4 and 5 add
// InternLM2-1.8B's GQA 2 over 64-token blocks and that head_dim-8 fallback.
TEST_CASE("cuda: split decode attention in graph steps matches the CPU, plain and with RoPE fused", "[gpu]") {
  LMD_REQUIRE_GPU();
  CpuBackend cpu;
  std::mt19937 rng(5);
  Worst worst;
  std::vector<std::pair<int, int>> many;
  for (int i = 0; i < 40; ++i) many.push_back({i * 37 % 301, 1});
  const std::vector<AttnCase> cases{
      {32, 32, 128, 16, {{1000, 1}}},
      {8, 1, 64, 32, {{600, 1}}},
      {32, 4, 128, 16, {{100, 1}, {37, 1}, {0, 1}}},
      {4, 4, 64, 16, many},
      {16, 8, 128, 64, {{700, 1}, {0, 1}}},
      {8, 4, 8, 16, {{12, 1}}},
      {8, 1, 64, 32, {{8000, 1}}},
  };
  constexpr int kGraphSteps = 4;  // record, capture, 2 replays
  for (size_t i = 0; i < cases.size(); ++i)
    for (DType dt : kDtypes)
      for (int bits : {0, 8, 4})
        for (bool fused : {false, true})
          for (bool wide : {false, true}) {
            if ((dt != DType::F16 && (bits != 0 || i == 3)) || (bits != 0 && i > 1)) continue;
            if (fused && dt == DType::F32) continue;
            INFO("case " << i << " " << dtype_name(dt) << " KV bits " << bits << (fused ? " fused" : "")
                         << (wide ? " wide" : ""));
            CudaBackend gpu;
            gpu.set_fused_ops(fused ? kFuseRope : kFuseNone);
            gpu.set_wide_decode_attention(wide);
            run_attention_case(gpu, cpu, cases[i], dt, bits, rng, worst, {}, kGraphSteps, fused);
          }
  worst.report();
}

// Prompts over fp16/bf16 caches of head_dim 64 and 128 run the tensor-core prefill kernel (version 3):
// prompt lengths around its 64-row items and 64-key tiles, chunked prefill over a cached context (an
// interactive second turn: the context is prefilled in step 0, the new tokens in step 1), GQA 1 to 8,
// blocks of 16 and 64 (and of 32 with 16 heads per KV head, whose items hold 8 tokens).
TEST_CASE("cuda: tensor-core prefill attention matches the CPU", "[gpu]") {
  LMD_REQUIRE_GPU();
  CudaBackend gpu;
  CpuBackend cpu;
  std::mt19937 rng(11);
  Worst worst;
  const std::vector<std::vector<std::pair<int, int>>> batches{
      {{0, 1}},    {{0, 7}},    {{0, 64}},
      {{0, 65}},   {{0, 300}},  {{0, 1000}},
      {{300, 77}}, {{1000, 7}}, {{63, 65}, {0, 1}, {40, 1}, {0, 9}},
  };
  for (int head_dim : {64, 128})
    for (int kv_heads : {8, 4, 2, 1})
      for (DType dt : {DType::F16, DType::BF16})
        for (size_t b = 0; b < batches.size(); ++b) {
          const AttnCase c{8, kv_heads, head_dim, b % 2 ? 16 : 64, batches[b]};
          INFO(dtype_name(dt) << " heads 8/" << kv_heads << " head_dim " << head_dim << " block "
                              << c.block_len << " batch " << b);
          CHECK(cuda_prefill_attention_v3(dt, {2, kv_heads, head_dim, c.block_len, 1, 0}, c.heads));
          run_attention_case(gpu, cpu, c, dt, 0, rng, worst);
        }
  const AttnCase wide_group{16, 1, 128, 32, {{0, 30}, {50, 9}}};
  CHECK(cuda_prefill_attention_v3(DType::F16, {2, 1, 128, 32, 1, 0}, 16));
  run_attention_case(gpu, cpu, wide_group, DType::F16, 0, rng, worst);
  // Paths that keep the tile kernel for prompts: fp32, quantized caches, other head dims.
  CHECK_FALSE(cuda_prefill_attention_v3(DType::F32, {2, 8, 128, 16, 1, 0}, 8));
  CHECK_FALSE(cuda_prefill_attention_v3(DType::F16, {2, 8, 128, 16, 1, 8}, 8));
  CHECK_FALSE(cuda_prefill_attention_v3(DType::F16, {2, 8, 256, 16, 1, 0}, 8));
  worst.report();
}

namespace {

nlohmann::json read_json(const std::filesystem::path& p) {
  std::ifstream f(p);
  REQUIRE(f.good());
  return nlohmann::json::parse(f);
}

struct Greedy {
  std::vector<int> ids;
  std::vector<std::vector<float>> logits;  // per generated token
};

// Prefill `prompt`, then decode `n` tokens greedily one at a time through a paged cache of 16-token
// blocks laid out in reverse order.
Greedy greedy(Model& model, const std::vector<int>& prompt, int n) {
  const int total = int(prompt.size()) + n, block_len = 16;
  KvCacheStorage cache = model.backend().alloc_kv_cache(
      model.kv_layout(blocks_for(total, block_len), block_len, 0), model.activation_dtype());
  std::vector<int> blocks(blocks_for(total, block_len));
  for (size_t i = 0; i < blocks.size(); ++i) blocks[i] = int(blocks.size() - 1 - i);
  Greedy g;
  std::vector<int> ids = prompt;
  int context = 0;
  for (int step = 0; step < n; ++step) {
    BatchLayout batch;
    batch.seqs.push_back({0, int(ids.size()), context, blocks});
    g.logits.push_back(model.forward(ids, batch, cache));
    const auto& l = g.logits.back();
    g.ids.push_back(int(std::max_element(l.begin(), l.end()) - l.begin()));
    context += int(ids.size());
    ids = {g.ids.back()};
  }
  return g;
}

// Compares greedy ids with the reference. The runs must agree until a step where the reference's token
// was, in our logits, within `tie` of our top logit (a near-tie that rounding may legitimately flip);
// after such a step the sequences diverge and are not compared further. Returns the matching prefix.
int check_greedy(const Greedy& got, const std::vector<int>& expected, float tie) {
  size_t i = 0;
  while (i < expected.size() && i < got.ids.size() && got.ids[i] == expected[i]) ++i;
  if (i < expected.size()) {
    REQUIRE(i < got.ids.size());
    const auto& l = got.logits[i];
    const float top = *std::max_element(l.begin(), l.end());
    WARN("first difference at generated token " << i << ": got " << got.ids[i] << ", reference "
                                                << expected[i] << ", logit gap " << top - l[expected[i]]);
    CHECK(top - l[expected[i]] <= tie);
  }
  return int(i);
}

}  // namespace

TEST_CASE("cuda: stories260K reproduces transformers' 200 greedy ids", "[gpu]") {
  LMD_REQUIRE_GPU();
  LMD_REQUIRE_ASSETS();
  const auto dir = test::model_dir("stories260K");
  const std::vector<int> ref = read_json(dir / "greedy_reference.json")["greedy_200_ids"];
  const std::vector<int> expected(ref.begin() + 1, ref.end());  // BOS, then 199 generated ids
  {
    // fp32 activations: only summation order differs from transformers, so every id must match.
    CudaBackend gpu(0, DType::F32);
    auto model = Model::load(dir, gpu);
    const Greedy g = greedy(*model, {1}, int(expected.size()));
    CHECK(g.ids == expected);
  }
  {
    // fp16, the default for this fp32 checkpoint.
    CudaBackend gpu;
    auto model = Model::load(dir, gpu);
    REQUIRE(model->activation_dtype() == DType::F16);
    const int same = check_greedy(greedy(*model, {1}, int(expected.size())), expected, 0.05f);
    WARN("stories260K fp16: " << same << " of " << expected.size() << " greedy ids match transformers fp32");
  }
}

TEST_CASE("cuda: wt2-llama-22m logits and greedy ids match transformers", "[gpu]") {
  LMD_REQUIRE_GPU();
  LMD_REQUIRE_ASSETS();
  const auto dir = test::model_dir("wt2-llama-22m");
  const nlohmann::json ref = read_json(dir / "reference.json");
  CudaBackend gpu;
  auto model = Model::load(dir, gpu);
  REQUIRE(model->activation_dtype() == DType::F16);
  // Decode steps as two ops per norm and SwiGLU, then fused into the GEMVs (and the streaming GEMV).
  for (bool fused : {false, true}) {
    gpu.set_fused_ops(fused ? kFuseAll : kFuseNone);
    gpu.set_dense_gemv_stream(fused);  // the down projections (1024 inputs) then stream
    const char* how = fused ? " (fused, streaming GEMV)" : "";
    for (const auto& [prompt, data] : ref["prompts"].items()) {
      INFO(prompt << how);
      const std::vector<int> ids = data["input_ids"];
      const std::vector<float> expected = data["last_logits"];
      const std::vector<int> greedy32 = data["greedy32"];
      const Greedy g = greedy(*model, ids, int(greedy32.size()));
      const double err = test::rel_error(g.logits[0], expected);
      WARN("wt2-llama-22m fp16" << how << " last-logit relative error " << err);
      CHECK(err < 1e-2);
      const int same = check_greedy(g, greedy32, 0.05f);
      WARN("wt2-llama-22m fp16" << how << ": " << same << " of " << greedy32.size() << " greedy ids match");
    }
  }
}

TEST_CASE("cuda: a CUDA model and the CPU model agree on a batch with chunked prefill", "[gpu]") {
  LMD_REQUIRE_GPU();
  LMD_REQUIRE_ASSETS();
  const auto dir = test::model_dir("wt2-llama-22m");
  CudaBackend gpu;
  CpuBackend cpu(2);
  auto gm = Model::load(dir, gpu);
  auto cm = Model::load(dir, cpu);
  // Two sequences: the first prefills 40 tokens in chunks of 23 and 17, the second joins with 9.
  std::mt19937 rng(5);
  std::vector<int> a(40), b(9);
  for (int& t : a) t = 3 + int(rng() % 31000);
  for (int& t : b) t = 3 + int(rng() % 31000);
  const int block_len = 16;
  KvCacheStorage gc = gpu.alloc_kv_cache(gm->kv_layout(8, block_len, 0), gm->activation_dtype());
  KvCacheStorage cc = cpu.alloc_kv_cache(cm->kv_layout(8, block_len, 0), cm->activation_dtype());
  const std::vector<int> ablocks{5, 2, 7}, bblocks{0};
  BatchLayout first;
  first.seqs.push_back({0, 23, 0, ablocks});
  const std::vector<int> first_ids(a.begin(), a.begin() + 23);
  CHECK(test::rel_error(gm->forward(first_ids, first, gc), cm->forward(first_ids, first, cc)) < 1e-2);
  BatchLayout second;
  second.seqs.push_back({0, 17, 23, ablocks});
  second.seqs.push_back({17, 9, 0, bblocks});
  std::vector<int> second_ids(a.begin() + 23, a.end());
  second_ids.insert(second_ids.end(), b.begin(), b.end());
  const auto gl = gm->forward(second_ids, second, gc, true), cl = cm->forward(second_ids, second, cc, true);
  const double err = test::rel_error(gl, cl);
  WARN("wt2-llama-22m fp16 vs CPU fp32, all logits of a mixed batch: relative error " << err);
  CHECK(err < 1e-2);
}

#else

TEST_CASE("cuda: not built", "[gpu]") { WARN("built without the CUDA backend; GPU tests skipped"); }

#endif
