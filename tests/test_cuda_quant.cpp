// Offline quantization work on the GPU: `lite calibrate` statistics gathered through the CUDA backend
// equal those gathered through the CPU reference. Skipped (with a warning) without a GPU.
#include "test_support.h"

#if defined(LMD_HAVE_CUDA)
#include "cuda_test_support.h"
#include "lmd/cuda/cuda_backend.h"
#include "lmd/engine/cpu_backend.h"
#include "lmd/engine/model.h"
#include "lmd/quant/calibrate.h"

using namespace lmd;

TEST_CASE("cuda: calibrate statistics match the CPU backend's", "[gpu][calibrate]") {
  LMD_REQUIRE_GPU();
  LMD_REQUIRE_ASSETS();
  // fp32 activations on the GPU, so the two runs differ by summation order only.
  CudaBackend gpu(0, DType::F32);
  CpuBackend cpu(2);
  const auto dir = test::model_dir("stories260K");
  auto gmodel = Model::load(dir, gpu), cmodel = Model::load(dir, cpu);
  const std::vector<std::vector<int>> windows = {{1, 403, 261, 378, 303, 270, 280, 501, 46, 77, 300},
                                                 {1, 66, 285, 266, 37, 411, 267, 302, 360, 409, 13, 29}};
  const CalibrationStats g = calibrate(*gmodel, windows), c = calibrate(*cmodel, windows);
  REQUIRE(g.tokens == c.tokens);
  REQUIRE(g.activations.size() == c.activations.size());
  double worst = 0;
  auto compare = [&](const std::string& what, const std::vector<float>& a, const std::vector<float>& b) {
    INFO(what);
    REQUIRE(a.size() == b.size());
    const double err = test::rel_error(a, b);
    worst = std::max(worst, err);
    CHECK(err < 1e-4);
  };
  auto compare_stats = [&](const std::string& name, const ChannelStats& a, const ChannelStats& b) {
    compare(name + " max", a.max, b.max);
    compare(name + " min", a.min, b.min);
    compare(name + " absmax", a.absmax, b.absmax);
    compare(name + " mean", a.mean(), b.mean());
    compare(name + " absmean", a.absmean(), b.absmean());
  };
  for (const auto& [name, stats] : c.activations) compare_stats(name, g.activations.at(name), stats);
  for (size_t l = 0; l < c.keys.size(); ++l) {
    compare_stats("layer " + std::to_string(l) + " K", g.keys.at(l), c.keys[l]);
    compare_stats("layer " + std::to_string(l) + " V", g.values.at(l), c.values[l]);
  }
  WARN("calibrate, CUDA fp32 vs CPU: worst relative L2 error over " << c.activations.size()
                                                                    << " activation points: " << worst);
}
#endif
