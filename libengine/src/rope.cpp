#include "lmd/engine/rope.h"

#include <cmath>
#include <numbers>

namespace lmd {

RopeConfig RopeConfig::from_spec(const ModelSpec& spec) {
  RopeConfig r;
  r.head_dim = spec.head_dim;
  r.theta = spec.rope_theta;
  r.scaling = spec.rope_scaling;
  r.factor = spec.rope_factor;
  r.max_position = spec.max_position;
  r.low_freq_factor = spec.rope_low_freq_factor;
  r.high_freq_factor = spec.rope_high_freq_factor;
  r.original_max_position = spec.rope_original_max_position;
  return r;
}

std::vector<float> rope_inv_freq(const RopeConfig& rope, int seq_len) {
  const int half = rope.head_dim / 2;
  const double dim = rope.head_dim;
  double base = rope.theta;
  if (rope.scaling == RopeScaling::Dynamic && seq_len > rope.max_position) {
    base *= std::pow(rope.factor * seq_len / rope.max_position - (rope.factor - 1), dim / (dim - 2));
  }
  std::vector<float> inv(half);
  for (int i = 0; i < half; ++i) {
    double f = 1.0 / std::pow(base, 2.0 * i / dim);
    if (rope.scaling == RopeScaling::Linear) {
      f /= rope.factor;
    } else if (rope.scaling == RopeScaling::Llama3) {
      // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
      const double low_wavelen = rope.original_max_position / rope.low_freq_factor;
      const double high_wavelen = rope.original_max_position / rope.high_freq_factor;
      const double wavelen = 2 * std::numbers::pi / f;
      if (wavelen > low_wavelen) {
        f /= rope.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) /
                              (rope.high_freq_factor - rope.low_freq_factor);
        f = (1 - smooth) * f / rope.factor + smooth * f;
      }
    }
    inv[i] = static_cast<float>(f);
  }
  return inv;
}

}  // namespace lmd
