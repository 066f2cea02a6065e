#include "lmd/quant/channel_stats.h"

#include <algorithm>
#include <cmath>

#include "awq_internal.h"

namespace lmd {
namespace {

std::vector<float> to_floats(const std::vector<double>& v, double divisor) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = float(v[i] / divisor);
  return out;
}

// Channels per task of the parallel add: whole cache lines of a 16-bit row, and enough tasks for a pool
// even at 1024 channels.
constexpr int64_t kChannelBlock = 64;

}  // namespace

void ChannelStats::size_for(int64_t channels) {
  if (!max.empty()) return;
  max.assign(channels, -INFINITY);
  min.assign(channels, INFINITY);
  absmax.assign(channels, 0.f);
  sum.assign(channels, 0.0);
  abssum.assign(channels, 0.0);
}

void ChannelStats::fold_row(const float* x, int64_t begin, int64_t end) {
  for (int64_t c = begin; c < end; ++c) {
    const float v = x[c - begin];
    max[c] = std::max(max[c], v);
    min[c] = std::min(min[c], v);
    absmax[c] = std::max(absmax[c], std::fabs(v));
    sum[c] += v;
    abssum[c] += std::fabs(v);
  }
}

void ChannelStats::add(const float* data, int64_t rows, int64_t row_stride, int64_t col0, int64_t cols) {
  size_for(cols);
  for (int64_t r = 0; r < rows; ++r) fold_row(data + r * row_stride + col0, 0, cols);
  count += rows;
}

void ChannelStats::add(const HostTensor& x, ThreadPool* pool) {
  const int64_t channels = x.dim(-1), rows = x.numel() / channels;
  size_for(channels);
  const int64_t blocks = (channels + kChannelBlock - 1) / kChannelBlock;
  awq_detail::for_chunks(pool, blocks, [&](int64_t first, int64_t last) {
    const int64_t begin = first * kChannelBlock, end = std::min(channels, last * kChannelBlock);
    std::vector<float> row(end - begin);
    for (int64_t r = 0; r < rows; ++r) {
      awq_detail::copy_as_f32(x, r * channels + begin, end - begin, row.data());
      fold_row(row.data(), begin, end);
    }
  });
  count += rows;
}

std::vector<float> ChannelStats::mean() const { return to_floats(sum, double(count)); }
std::vector<float> ChannelStats::absmean() const { return to_floats(abssum, double(count)); }

}  // namespace lmd
