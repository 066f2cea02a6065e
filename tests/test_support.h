// Shared helpers for the tests: Catch2 2.x/3.x compatibility and where the shared assets live.
#pragma once
#if defined(LMD_CATCH3)
#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#else
#include <catch2/catch.hpp>
#endif

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

namespace lmd::test {

// ../shared beside the checkout, or LMD_TEST_ASSETS.
inline std::filesystem::path assets_dir() {
  if (const char* env = std::getenv("LMD_TEST_ASSETS")) return env;
  return std::filesystem::path(LMD_SOURCE_DIR) / ".." / "shared";
}
inline std::filesystem::path model_dir(const std::string& name) { return assets_dir() / "models" / name; }
inline bool have_assets() { return std::filesystem::exists(assets_dir() / "models"); }

// Relative error ||a-b|| / ||b|| (L2).
inline double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

}  // namespace lmd::test

// Skips the current test case with a message when the shared assets are absent.
#define LMD_REQUIRE_ASSETS()                                                         \
  do {                                                                               \
    if (!lmd::test::have_assets()) {                                                 \
      WARN("shared test assets not found at " << lmd::test::assets_dir()             \
                                              << " (set LMD_TEST_ASSETS); skipped"); \
      return;                                                                        \
    }                                                                                \
  } while (0)
