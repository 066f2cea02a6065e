// Helpers shared by the GPU tests: random inputs rounded as the device stores them, guarded outputs
// (sentinels after the output that no op may touch), tolerances per activation dtype.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "lmd/cuda/cuda_backend.h"
#include "lmd/engine/backend.h"
#include "test_support.h"

#define LMD_REQUIRE_GPU()                                                 \
  do {                                                                    \
    if (!cuda_device_available()) {                                       \
      WARN("no CUDA device or driver on this machine; GPU test skipped"); \
      return;                                                             \
    }                                                                     \
  } while (0)

namespace lmd::test {

inline constexpr int64_t kGuard = 64;  // elements after each output that no op may touch

// Relative L2 error allowed for a result computed from inputs in `dt` and rounded to `dt` once or a few
// times: fp32 ~1e-6 per rounding, fp16 ~5e-4 (10-bit mantissa), bf16 ~4e-3 (7-bit mantissa).
inline double tolerance(DType dt) { return dt == DType::F32 ? 1e-5 : dt == DType::F16 ? 2e-3 : 1.6e-2; }

inline std::vector<float> random_values(std::mt19937& rng, int64_t n, float scale = 1.f) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// The values as the device stores them in `dt`, back in fp32 (so both backends start from equal inputs).
inline std::vector<float> rounded(const std::vector<float>& v, DType dt) {
  return HostTensor::from_f32(v, {int64_t(v.size())}).to(dt).to_f32();
}

inline DeviceTensor on(Backend& be, const std::vector<float>& v, Shape shape, DType dt) {
  return be.upload(HostTensor::from_f32(v, {int64_t(v.size())}).reshape(std::move(shape)), dt);
}

inline std::vector<float> values(Backend& be, const DeviceTensor& t) { return be.download(t).to_f32(); }

// An output tensor followed by kGuard guard elements; every byte starts as 0xFF (NaN in every float
// dtype), so an element the op fails to write shows up as NaN and a stray write as a changed guard.
struct Guarded {
  DeviceTensor full, view;
};
inline Guarded guarded(Backend& be, DType dt, Shape shape) {
  const int64_t n = shape_numel(shape);
  HostTensor poison(dt, {n + kGuard});
  std::memset(poison.mutable_data(), 0xFF, poison.nbytes());
  Guarded g;
  g.full = be.upload(poison, dt);
  g.view = g.full;
  g.view.shape = std::move(shape);
  return g;
}
inline void check_written(Backend& be, const Guarded& g) {
  const HostTensor h = be.download(g.full);
  const auto* bytes = static_cast<const uint8_t*>(h.data());
  const size_t out_bytes = g.view.nbytes();
  CHECK(std::all_of(bytes + out_bytes, bytes + h.nbytes(), [](uint8_t b) { return b == 0xFF; }));
  const std::vector<float> v = be.download(g.view).to_f32();
  CHECK(std::none_of(v.begin(), v.end(), [](float x) { return std::isnan(x); }));
}

// The largest relative error seen per op and dtype, reported at the end of a test case for the record.
struct Worst {
  std::map<std::string, double> err;
  double add(const std::string& op, DType dt, double e) {
    double& w = err[op + " " + std::string(dtype_name(dt))];
    w = std::max(w, e);
    return e;
  }
  void report() const {
    std::ostringstream os;
    os << "max relative L2 error:";
    for (const auto& [key, e] : err) os << "\n  " << key << ": " << e;
    WARN(os.str());
  }
};

}  // namespace lmd::test
