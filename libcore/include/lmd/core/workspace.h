// The TurboMind-style workspace that `lmd convert` writes and chat/serve/bench load directly
// (docs/formats.md):
//   WS/triton_models/weights/config.ini   one [llama] section: the model, its engine defaults
//   WS/triton_models/weights/<tensor>     one file per tensor, each a one-tensor safetensors file
//   WS/triton_models/tokenizer/           tokenizer.model and the tokenizer's JSON files
// Tensors are stored already mapped onto the canonical layer layout (InternLM2's wqkv split, every
// architecture under one naming), so loading is memory-mapping without copies.
#pragma once
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lmd/core/checkpoint.h"
#include "lmd/core/model_spec.h"
#include "lmd/core/tensor_store.h"

namespace lmd {

// Engine defaults a workspace carries; command-line flags override them.
struct WorkspaceEngineDefaults {
  int session_len = 0;
  int quant_policy = 0;         // online KV quantization (lmd >= LMDeploy v0.4 meaning): 0, 8 or 4
  bool static_kv_int8 = false;  // offline per-layer KV int8 from `lite kv_qparams`
  double cache_max_entry_count = 0.8;
  int cache_block_seq_len = 64;
  int max_batch_size = 128;
};

struct WorkspaceConfig {
  ModelSpec spec;
  std::string model_name;     // the NAME given to `lmd convert`
  std::string chat_template;  // the builtin template that NAME selects
  int tensor_para_size = 1;
  WorkspaceEngineDefaults engine;
};

// config.ini text for `config`, and back. parse_workspace_config throws lmd::Error naming `source`
// and the field for a missing [llama] section, a missing field or a value that does not parse.
std::string format_workspace_config(const WorkspaceConfig& config);
WorkspaceConfig parse_workspace_config(const std::string& ini_text, const std::string& source);

// The weights folder of a workspace given as WS, WS/triton_models or WS/triton_models/weights; nullopt
// when `path` is none of these (a Hugging Face folder, say).
std::optional<std::filesystem::path> find_workspace_weights(const std::filesystem::path& path);
// The tokenizer folder beside a weights folder.
std::filesystem::path workspace_tokenizer_dir(const std::filesystem::path& weights_dir);

WorkspaceConfig read_workspace_config(const std::filesystem::path& weights_dir);
// Rewrites config.ini atomically (temp file + rename).
void write_workspace_config(const std::filesystem::path& weights_dir, const WorkspaceConfig& config);

// Writes one tensor file `weights_dir/name`.
void write_workspace_tensor(const std::filesystem::path& weights_dir, const std::string& name,
                            const HostTensor& tensor);
// Writes every tensor of `weights` under the workspace names (tensor-parallel rank 0); `progress(done,
// total)` after each layer.
void write_workspace_weights(const std::filesystem::path& weights_dir, const CheckpointWeights& weights,
                             const ModelSpec& spec, const std::function<void(int, int)>& progress = {});

// The tensors of a workspace under the Hugging Face Llama names (model.layers.N.self_attn.q_proj.weight,
// ...), so that map_checkpoint loads them for any architecture; other files keep their own names.
// file_of() names the workspace file.
std::unique_ptr<TensorStore> open_workspace_store(const std::filesystem::path& weights_dir);

// Checks that every tensor file `spec` needs is present (naming the first missing file), then maps
// them. Shape, dtype and size problems are reported naming the file.
CheckpointWeights load_workspace_weights(const std::filesystem::path& weights_dir, const ModelSpec& spec);

// Offline KV int8 parameters (`lite kv_qparams`): file name of layer `layer`, rank `rank`, holding
// float32 [k_scale, k_zero, v_scale, v_zero].
std::string kv_scale_tensor_name(int layer, int rank);
// 4 floats per layer for rank 0, in layer order; lmd::Error naming the missing or malformed file.
std::vector<float> read_static_kv_params(const std::filesystem::path& weights_dir, int layers);

}  // namespace lmd
