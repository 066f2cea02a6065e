// Rotary position embedding parameters and inverse frequencies (BRIEF §3), shared by every backend.
#pragma once
#include <vector>

#include "lmd/core/model_spec.h"

namespace lmd {

struct RopeConfig {
  int head_dim = 0;  // rotary dimension (the whole head)
  double theta = 10000.0;
  RopeScaling scaling = RopeScaling::None;
  double factor = 1.0;
  int max_position = 2048;
  double low_freq_factor = 1.0, high_freq_factor = 4.0;
  int original_max_position = 8192;

  static RopeConfig from_spec(const ModelSpec& spec);
};

// inv_freq[i], i < head_dim/2, for a sequence whose total length is `seq_len` (dynamic NTK changes the
// base once a sequence grows past max_position; linear scaling divides positions, folded in here).
std::vector<float> rope_inv_freq(const RopeConfig& rope, int seq_len);

}  // namespace lmd
