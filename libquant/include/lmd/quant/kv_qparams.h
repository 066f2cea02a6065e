// `lmd lite kv_qparams` (BRIEF §5, the offline KV int8 flow): calibrate's per-layer K/V statistics ->
// one (scale, zero) for K and one for V per layer and tensor-parallel rank, written into a workspace
// as float32 [k_scale, k_zero, v_scale, v_zero] ("layers.N.past_kv_scale.R.weight"), and config.ini
// switched to static KV int8.
#pragma once
#include <array>
#include <filesystem>
#include <ostream>
#include <vector>

#include "lmd/quant/calibrate.h"

namespace lmd {

// params[rank][layer] = {k_scale, k_zero, v_scale, v_zero}. Rank r covers KV heads
// [r * kv_heads / num_tp, (r + 1) * kv_heads / num_tp). Asymmetric: zero = (min + max) / 2,
// scale = (max - min) / (2^bits - 1); symmetric: zero = 0, scale = absmax / (2^(bits-1) - 1).
std::vector<std::vector<std::array<float, 4>>> compute_kv_qparams(const KvCalibration& stats, int bits,
                                                                  bool symmetric, int num_tp);

// The whole command: reads work_dir's statistics, checks them against the workspace's config.ini,
// writes every rank's parameters and sets static_kv_int8 = 1 (quant_policy = 0). Reports to `log`.
void export_kv_qparams(const std::filesystem::path& work_dir, const std::filesystem::path& workspace,
                       int bits, bool symmetric, int num_tp, std::ostream& log);

}  // namespace lmd
