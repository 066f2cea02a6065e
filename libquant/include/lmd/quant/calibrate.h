// `lmd lite calibrate` (BRIEF §5): runs calibration windows through the model and keeps per-channel
// statistics of every decoder linear's input and every norm/linear output, and per-layer K/V
// statistics per [kv_head, head_dim] (K after RoPE, as the cache stores it). The statistics are
// gathered through Model's forward observer, so they come from the one model definition and run on
// whatever backend the model is on.
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "lmd/engine/model.h"
#include "lmd/quant/channel_stats.h"

namespace lmd {

struct CalibrationStats {
  // Keyed "layers.N.attention_norm.output", "layers.N.attention.wq.output", "layers.N.attention.wo.input",
  // ... "norm.output" (calibration_linear_inputs() says which key is each linear's input).
  std::map<std::string, ChannelStats> activations;
  // Per layer, [kv_heads * head_dim] (max, min, absmax are used; sums are kept for completeness).
  std::vector<ChannelStats> keys, values;
  int layers = 0, kv_heads = 0, head_dim = 0;
  int64_t tokens = 0;
};

// Each decoder linear ("layers.N.attention.wq", ...) -> the key of the statistics of its input.
std::map<std::string, std::string> calibration_linear_inputs(int layers);

// Runs every window through `model` (one prefill each); `progress(done, total)` after each window.
CalibrationStats calibrate(Model& model, const std::vector<std::vector<int>>& windows,
                           const std::function<void(int, int)>& progress = {});

// What the statistics were computed from, recorded in the index.
struct CalibrationInfo {
  std::string model, dataset;
  int samples = 0, seqlen = 0;
};

// Writes work_dir/calib_stats.safetensors (tensors "<key>.{max,min,mean,absmax,absmean}" [channels] and
// "layers.N.past_kv.{key,value}.{max,min,absmax}" [kv_heads, head_dim], float32) and the index
// work_dir/calib_stats.json. Creates work_dir.
void save_calibration(const CalibrationStats& stats, const CalibrationInfo& info,
                      const std::filesystem::path& work_dir);

// Per-layer K/V statistics read back from a calibrate work dir, each [kv_heads * head_dim].
struct KvCalibration {
  int layers = 0, kv_heads = 0, head_dim = 0;
  std::vector<std::vector<float>> k_max, k_min, k_absmax, v_max, v_min, v_absmax;
};
// lmd::Error naming the file when the work dir holds no (or incomplete) calibrate output.
KvCalibration load_kv_calibration(const std::filesystem::path& work_dir);

}  // namespace lmd
