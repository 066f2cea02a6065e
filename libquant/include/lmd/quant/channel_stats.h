// Per-channel running statistics of activations over calibration tokens, shared by AWQ (which needs
// absmax and absmean of each linear's input) and `lite calibrate` (which saves all of them).
#pragma once
#include <cstdint>
#include <vector>

#include "lmd/core/tensor.h"
#include "lmd/engine/thread_pool.h"

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
  // Adds the rows of a float tensor [..., channels] (fp32, fp16 or bf16) without an fp32 copy of it,
  // the channels split among `pool`'s threads (null: this thread). Each channel still sees the rows in
  // order, so the sums are the same for every thread count.
  void add(const HostTensor& x, ThreadPool* pool);
  std::vector<float> mean() const;
  std::vector<float> absmean() const;

 private:
  void size_for(int64_t channels);
  // Folds one row's columns [begin, end) in; `x` holds those columns' values.
  void fold_row(const float* x, int64_t begin, int64_t end);
};

}  // namespace lmd
