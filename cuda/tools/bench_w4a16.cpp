// lmd_bench_w4a16: the W4A16 linears of a Llama-2-7B-shaped model (32 layers of fused qkv 4096 -> 12288,
// o 4096 -> 4096, gate|up 4096 -> 22016, down 11008 -> 4096; random AWQ codes, group 128) through
// CudaBackend::linear, timed with CUDA events (medians) over all 32 layers, so that every call reads its
// weights from device memory, not from L2:
//   1. rows = 1, the tensor-core GEMV (version 5 and streaming): effective bandwidth = AWQ bytes (codes +
//      zeros + scales) / time, against the measured device-to-device copy bandwidth;
//   2. rows 1..256: GEMV, dequantize + cuBLAS, and the fp16 paths (cuBLAS, and the dense GEMV up to 4
//      rows) on the same shapes (the crossovers that CudaBackend's defaults follow).
#include <cuda_runtime.h>

#include <cstdio>
#include <random>
#include <vector>

#include "bench_util.h"
#include "lmd/cuda/cuda_backend.h"

using namespace lmd;
using namespace lmd::bench;

namespace {

constexpr int kLayers = 32, kGroup = 128;

struct LinearShape {
  const char* name;
  int64_t in, out;
};
constexpr LinearShape kShapes[] = {{"qkv 4096->12288", 4096, 12288},
                                   {"o 4096->4096", 4096, 4096},
                                   {"gate_up 4096->22016", 4096, 22016},
                                   {"down 11008->4096", 11008, 4096}};

}  // namespace

int main() try {
  if (!cuda_device_available()) fail("no CUDA device");
  CudaBackend be;
  auto stream = static_cast<cudaStream_t>(be.stream());
  std::printf("device: %s\n", cuda_device_name().c_str());
  const auto [copy_ms, copy_gbs] = copy_bandwidth(be, stream);
  const auto [read_ms, read_gbs] = read_bandwidth(be, stream);

  // Per shape: 32 int4 copies (one random host tensor uploaded 32 times) and 32 fp16 copies.
  std::mt19937 rng(1);
  std::vector<std::vector<DeviceLinear>> int4(4), dense(4);
  for (int s = 0; s < 4; ++s) {
    const LinearShape& sh = kShapes[s];
    const LinearWeight awq = random_awq_linear(rng, sh.in, sh.out, kGroup);
    std::uniform_real_distribution<float> u(-0.05f, 0.05f);
    std::vector<float> w(sh.in * sh.out);
    for (float& v : w) v = u(rng);
    LinearWeight fp16;
    fp16.weight = HostTensor::from_f32(w, {sh.out, sh.in}, DType::F16);
    for (int l = 0; l < kLayers; ++l) {
      int4[s].push_back(be.prepare_linear(awq, DType::F16));
      dense[s].push_back(be.prepare_linear(fp16, DType::F16));
    }
  }
  be.synchronize();

  std::uniform_real_distribution<float> u(-1.f, 1.f);
  auto activations = [&](int64_t rows, int64_t cols) {
    std::vector<float> v(rows * cols);
    for (float& x : v) x = u(rng);
    return be.upload(HostTensor::from_f32(v, {rows, cols}), DType::F16);
  };
  // All four linears of all layers, `rows` rows each.
  auto run_all = [&](int rows, const std::vector<std::vector<DeviceLinear>>& set, int shape = -1) {
    std::vector<DeviceTensor> x, y;
    for (const LinearShape& sh : kShapes) {
      x.push_back(activations(rows, sh.in));
      y.push_back(be.alloc(DType::F16, {rows, sh.out}));
    }
    return median_ms(stream, 3, 20, [&] {
      for (int l = 0; l < kLayers; ++l)
        for (int s = 0; s < 4; ++s)
          if (shape < 0 || shape == s) be.linear(x[s], set[s][l], y[s]);
    });
  };

  std::printf(
      "\n| W4A16 GEMV, 1 row, x %d layers | version 5 per call | GB/s | of copy | streaming per call | GB/s "
      "| "
      "of copy |\n",
      kLayers);
  std::printf("|---|---|---|---|---|---|---|\n");
  be.set_w4a16_dense_from(65);
  // Version 5 and the streaming GEMV (W4Plan::stream) alike, one linear kind and then all four.
  auto both = [&](const char* name, double bytes, int shape) {
    double ms[2];
    for (bool stream : {false, true}) {
      be.set_w4a16_stream(stream);
      ms[stream] = run_all(1, int4, shape);
    }
    be.set_w4a16_stream(false);
    std::printf("| %s |", name);
    for (double t : ms)
      std::printf(" %.1f us | %.0f | %.0f%% |", t * 1e3 / kLayers, bytes * kLayers / t / 1e6,
                  100.0 * bytes * kLayers / t / 1e6 / copy_gbs);
    std::printf("\n");
    return ms[0];
  };
  double total_bytes = 0;
  for (int s = 0; s < 4; ++s) {
    const double bytes = awq_bytes(kShapes[s].in, kShapes[s].out, kGroup);
    total_bytes += bytes;
    both(kShapes[s].name, bytes, s);
  }
  char all_name[64];
  std::snprintf(all_name, sizeof all_name, "all four of a layer (%.2f GB over the %d)",
                total_bytes * kLayers / 1e9, kLayers);
  both(all_name, total_bytes, -1);
  std::printf("| device-to-device copy, 2 GiB (read + write) | %.3f ms | %.0f | 100%% |\n", copy_ms,
              copy_gbs);
  std::printf("| device read, 2 GiB (read only) | %.3f ms | %.0f | %.0f%% |\n", read_ms, read_gbs,
              100.0 * read_gbs / copy_gbs);

  std::printf(
      "\n| rows | fp16 cuBLAS | fp16 GEMV | fp16 streaming GEMV | W4A16 GEMV | W4A16 streaming GEMV | W4A16 "
      "dequant + cuBLAS | best W4A16 vs best fp16 |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  const int gemv_rows = be.dense_gemv_max_rows();
  for (int rows : {1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256}) {
    be.set_dense_gemv_max_rows(0);
    const double cublas_ms = run_all(rows, dense);
    double fp16_ms = cublas_ms;
    char fp16_gemv[2][32] = {"-", "-"};
    if (rows <= 4) {
      be.set_dense_gemv_max_rows(4);
      for (bool streaming : {false, true}) {
        be.set_dense_gemv_stream(streaming);
        const double ms = run_all(rows, dense);
        std::snprintf(fp16_gemv[streaming], sizeof fp16_gemv[streaming], "%.3f ms", ms);
        fp16_ms = std::min(fp16_ms, ms);
      }
      be.set_dense_gemv_stream(false);
    }
    be.set_dense_gemv_max_rows(gemv_rows);
    be.set_w4a16_dense_from(rows + 1);
    const double gemv_ms = run_all(rows, int4);
    double w4_ms = gemv_ms;
    char stream_gemv[32] = "-";
    if (rows <= 8) {
      be.set_w4a16_stream(true);
      const double ms = run_all(rows, int4);
      be.set_w4a16_stream(false);
      std::snprintf(stream_gemv, sizeof stream_gemv, "%.3f ms", ms);
      w4_ms = std::min(w4_ms, ms);
    }
    be.set_w4a16_dense_from(0);
    const double deq_ms = run_all(rows, int4);
    std::printf("| %d | %.3f ms | %s | %s | %.3f ms | %s | %.3f ms | %.2fx |\n", rows, cublas_ms,
                fp16_gemv[0], fp16_gemv[1], gemv_ms, stream_gemv, deq_ms, fp16_ms / std::min(w4_ms, deq_ms));
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "lmd_bench_w4a16: %s\n", e.what());
  return 1;
}
