#include "lmd/quant/channel_stats.h"

#include <algorithm>
#include <cmath>

namespace lmd {
namespace {

std::vector<float> to_floats(const std::vector<double>& v, double divisor) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = float(v[i] / divisor);
  return out;
}

}  // namespace

void ChannelStats::add(const float* data, int64_t rows, int64_t row_stride, int64_t col0, int64_t cols) {
  if (max.empty()) {
    max.assign(cols, -INFINITY);
    min.assign(cols, INFINITY);
    absmax.assign(cols, 0.f);
    sum.assign(cols, 0.0);
    abssum.assign(cols, 0.0);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = data + r * row_stride + col0;
    for (int64_t c = 0; c < cols; ++c) {
      max[c] = std::max(max[c], x[c]);
      min[c] = std::min(min[c], x[c]);
      absmax[c] = std::max(absmax[c], std::fabs(x[c]));
      sum[c] += x[c];
      abssum[c] += std::fabs(x[c]);
    }
  }
  count += rows;
}

std::vector<float> ChannelStats::mean() const { return to_floats(sum, double(count)); }
std::vector<float> ChannelStats::absmean() const { return to_floats(abssum, double(count)); }

}  // namespace lmd
