#include "lmd/quant/calibrate.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lmd/core/error.h"
#include "lmd/core/safetensors.h"
#include "lmd/engine/block_pool.h"

namespace lmd {

namespace fs = std::filesystem;

namespace {

constexpr const char* kStatsFile = "calib_stats.safetensors";
constexpr const char* kIndexFile = "calib_stats.json";

std::string layer_key(int layer, const std::string& rest) {
  return "layers." + std::to_string(layer) + "." + rest;
}

}  // namespace

std::map<std::string, std::string> calibration_linear_inputs(int layers) {
  std::map<std::string, std::string> inputs;
  for (int l = 0; l < layers; ++l) {
    for (const char* m : {"attention.wq", "attention.wk", "attention.wv"})
      inputs[layer_key(l, m)] = layer_key(l, "attention_norm.output");
    inputs[layer_key(l, "attention.wo")] = layer_key(l, "attention.wo.input");
    for (const char* m : {"feed_forward.w1", "feed_forward.w3"})
      inputs[layer_key(l, m)] = layer_key(l, "ffn_norm.output");
    inputs[layer_key(l, "feed_forward.w2")] = layer_key(l, "feed_forward.w2.input");
  }
  return inputs;
}

CalibrationStats calibrate(Model& model, const std::vector<std::vector<int>>& windows,
                           const std::function<void(int, int)>& progress) {
  const ModelSpec& spec = model.spec();
  Backend& be = model.backend();
  CalibrationStats stats;
  stats.layers = spec.layers;
  stats.kv_heads = spec.kv_heads;
  stats.head_dim = spec.head_dim;
  stats.keys.resize(spec.layers);
  stats.values.resize(spec.layers);
  const int64_t q = spec.q_size(), kv = spec.kv_size(), inter = spec.intermediate;

  model.set_observer([&](int layer, const char* point, const DeviceTensor& t) {
    const std::string p = point;
    const std::vector<float> x = be.download(t).to_f32();
    const int64_t cols = t.dim(-1), rows = t.numel() / cols;
    auto add = [&](const std::string& key, int64_t col0, int64_t n) {
      stats.activations[key].add(x.data(), rows, cols, col0, n);
    };
    if (layer < 0) {
      add(p + ".output", 0, cols);  // the final norm
    } else if (p == "attention_norm" || p == "ffn_norm") {
      add(layer_key(layer, p + ".output"), 0, cols);
    } else if (p == "qkv") {
      add(layer_key(layer, "attention.wq.output"), 0, q);
      add(layer_key(layer, "attention.wk.output"), q, kv);
      add(layer_key(layer, "attention.wv.output"), q + kv, kv);
    } else if (p == "qkv_rope") {
      stats.keys[layer].add(x.data(), rows, cols, q, kv);
      stats.values[layer].add(x.data(), rows, cols, q + kv, kv);
    } else if (p == "attention") {
      add(layer_key(layer, "attention.wo.input"), 0, cols);
    } else if (p == "o") {
      add(layer_key(layer, "attention.wo.output"), 0, cols);
    } else if (p == "gate_up") {
      add(layer_key(layer, "feed_forward.w1.output"), 0, inter);
      add(layer_key(layer, "feed_forward.w3.output"), inter, inter);
    } else if (p == "act") {
      add(layer_key(layer, "feed_forward.w2.input"), 0, cols);
    } else if (p == "down") {
      add(layer_key(layer, "feed_forward.w2.output"), 0, cols);
    }
  });
  try {
    constexpr int kBlockLen = 64;
    for (size_t w = 0; w < windows.size(); ++w) {
      const std::vector<int>& ids = windows[w];
      const int n = int(ids.size());
      if (n == 0) fail("calibration window ", w, " is empty");
      // A fresh cache per window: windows are independent sequences.
      KvCacheStorage cache = be.alloc_kv_cache(model.kv_layout(blocks_for(n, kBlockLen), kBlockLen, 0),
                                               model.activation_dtype());
      BatchLayout batch;
      batch.seqs.push_back({0, n, 0, {}});
      for (int b = 0; b < blocks_for(n, kBlockLen); ++b) batch.seqs[0].blocks.push_back(b);
      model.forward(ids, batch, cache);
      stats.tokens += n;
      if (progress) progress(int(w) + 1, int(windows.size()));
    }
  } catch (...) {
    model.set_observer({});
    throw;
  }
  model.set_observer({});
  return stats;
}

void save_calibration(const CalibrationStats& stats, const CalibrationInfo& info, const fs::path& work_dir) {
  fs::create_directories(work_dir);
  std::vector<std::pair<std::string, HostTensor>> tensors;
  auto vec = [](const std::vector<float>& v) { return HostTensor::from_f32(v, {int64_t(v.size())}); };
  std::vector<std::string> points;
  for (const auto& [key, s] : stats.activations) {
    points.push_back(key);
    tensors.emplace_back(key + ".max", vec(s.max));
    tensors.emplace_back(key + ".min", vec(s.min));
    tensors.emplace_back(key + ".mean", vec(s.mean()));
    tensors.emplace_back(key + ".absmax", vec(s.absmax));
    tensors.emplace_back(key + ".absmean", vec(s.absmean()));
  }
  const Shape head_shape = {stats.kv_heads, stats.head_dim};
  for (int l = 0; l < stats.layers; ++l) {
    for (const auto& [name, s] : {std::pair{"key", &stats.keys[l]}, {"value", &stats.values[l]}}) {
      const std::string key = layer_key(l, std::string("past_kv.") + name);
      tensors.emplace_back(key + ".max", HostTensor::from_f32(s->max, head_shape));
      tensors.emplace_back(key + ".min", HostTensor::from_f32(s->min, head_shape));
      tensors.emplace_back(key + ".absmax", HostTensor::from_f32(s->absmax, head_shape));
    }
  }
  write_safetensors(work_dir / kStatsFile, tensors);

  nlohmann::json index = {
      {"format", "lmd-calibration"},
      {"version", 1},
      {"model", info.model},
      {"dataset", info.dataset},
      {"samples", info.samples},
      {"seqlen", info.seqlen},
      {"tokens", stats.tokens},
      {"layers", stats.layers},
      {"kv_heads", stats.kv_heads},
      {"head_dim", stats.head_dim},
      {"stats_file", kStatsFile},
      {"channel_stats", {"max", "min", "mean", "absmax", "absmean"}},
      {"kv_stats", {"max", "min", "absmax"}},
      {"points", points},
      {"linear_inputs", calibration_linear_inputs(stats.layers)},
  };
  const fs::path index_path = work_dir / kIndexFile, tmp = index_path.string() + ".tmp";
  {
    std::ofstream out(tmp);
    out << index.dump(2) << "\n";
    if (!out.flush()) fail("cannot write ", tmp.string());
  }
  fs::rename(tmp, index_path);
}

KvCalibration load_kv_calibration(const fs::path& work_dir) {
  const fs::path index_path = work_dir / kIndexFile;
  std::ifstream in(index_path);
  if (!in)
    fail("calibration index ", index_path.string(), " not found (run `lmd lite calibrate MODEL --work-dir ",
         work_dir.string(), "` first)");
  nlohmann::json index;
  KvCalibration kv;
  try {
    index = nlohmann::json::parse(in);
    kv.layers = index.at("layers").get<int>();
    kv.kv_heads = index.at("kv_heads").get<int>();
    kv.head_dim = index.at("head_dim").get<int>();
  } catch (const nlohmann::json::exception& e) {
    fail(index_path.string(), ": not a calibrate index (", e.what(), ")");
  }
  const SafetensorsFile file(work_dir / index.value("stats_file", kStatsFile));
  const Shape shape = {kv.kv_heads, kv.head_dim};
  auto read = [&](int layer, const char* which, const char* stat) {
    const std::string name = layer_key(layer, std::string("past_kv.") + which + "." + stat);
    if (!file.contains(name)) fail(file.path().string(), ": tensor '", name, "' is missing");
    const HostTensor t = file.get(name);
    if (t.dtype() != DType::F32 || t.shape() != shape)
      fail(file.path().string(), ": tensor '", name, "' should be F32 ", shape_str(shape), ", got ",
           dtype_name(t.dtype()), " ", shape_str(t.shape()));
    return t.to_f32();
  };
  for (int l = 0; l < kv.layers; ++l) {
    kv.k_max.push_back(read(l, "key", "max"));
    kv.k_min.push_back(read(l, "key", "min"));
    kv.k_absmax.push_back(read(l, "key", "absmax"));
    kv.v_max.push_back(read(l, "value", "max"));
    kv.v_min.push_back(read(l, "value", "min"));
    kv.v_absmax.push_back(read(l, "value", "absmax"));
  }
  return kv;
}

}  // namespace lmd
