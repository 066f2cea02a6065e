// Per-channel running statistics of activations over calibration tokens, shared by AWQ (which needs
// absmax and absmean of each linear's input) and `lite calibrate` (which saves all of them).
#pragma once
#include <cstdint>
#include <vector>

namespace lmd {

struct ChannelStats {
  std::vector<float> max, min, absmax;
  std::vector<double> sum, abssum;
  int64_t count = 0;

  // Adds rows [rows, cols] read from `data` with `row_stride` floats between rows, starting at
  // column `col0`.
  void add(const float* data, int64_t rows, int64_t row_stride, int64_t col0, int64_t cols);
  // Adds contiguous rows [rows, channels].
  void add(const float* data, int64_t rows, int64_t channels) { add(data, rows, channels, 0, channels); }
  std::vector<float> mean() const;
  std::vector<float> absmean() const;
};

}  // namespace lmd
