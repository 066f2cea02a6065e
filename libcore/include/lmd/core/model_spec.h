// One description of a Llama-family model, read from a Hugging Face config.json (BRIEF §3).
#pragma once
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

#include "lmd/core/dtype.h"

namespace lmd {

enum class Arch { Llama, InternLM, InternLM2, Qwen2 };
const char* arch_name(Arch a);  // the config.json model_type spelling
// The Arch a config.json model_type names, or nullopt for a type lmd does not support.
std::optional<Arch> arch_from_model_type(std::string_view model_type);

enum class RopeScaling { None, Linear, Dynamic, Llama3 };

struct AwqConfig {
  bool enabled = false;
  int bits = 4;
  int group_size = 128;
  bool zero_point = true;
};

struct ModelSpec {
  Arch arch = Arch::Llama;
  std::string model_type;  // as written in config.json
  int hidden = 0;
  int intermediate = 0;
  int layers = 0;
  int heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int vocab = 0;
  float norm_eps = 1e-6f;
  int max_position = 2048;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling = RopeScaling::None;
  double rope_factor = 1.0;
  // llama3-style scaling parameters (only with RopeScaling::Llama3).
  double rope_low_freq_factor = 1.0, rope_high_freq_factor = 4.0;
  int rope_original_max_position = 8192;
  bool tie_embeddings = false;
  bool qkv_bias = false;     // q/k/v (InternLM2: wqkv): InternLM, InternLM2 with bias, Qwen2, attention_bias
  bool o_bias = false;       // o (InternLM2: wo): InternLM, InternLM2 with bias, attention_bias
  DType dtype = DType::F16;  // torch_dtype / dtype of the checkpoint; F16 when config.json names none
  int bos_id = 1;
  int eos_id = 2;
  AwqConfig awq;

  int q_size() const { return heads * head_dim; }
  int kv_size() const { return kv_heads * head_dim; }
  // Parameters in the float model (embeddings and head counted once when tied).
  int64_t param_count() const;
};

// Reads <dir>/config.json. Throws lmd::Error naming the file and field on anything missing or wrong.
ModelSpec load_model_spec(const std::filesystem::path& model_dir);
ModelSpec parse_model_spec(const std::string& config_json, const std::string& source_name);

}  // namespace lmd
