// Maps each architecture's tensor names onto one canonical layer layout (BRIEF §3), splitting
// InternLM2's grouped wqkv, and checks every shape against the ModelSpec.
#pragma once
#include <filesystem>
#include <memory>
#include <vector>

#include "lmd/core/model_spec.h"
#include "lmd/core/tensor.h"
#include "lmd/core/tensor_store.h"

namespace lmd {

// A linear layer's weight: dense [out, in] (HF layout), or AWQ int4 (qweight [in, out/8] int32,
// qzeros [in/group, out/8] int32, scales [in/group, out] fp16).
struct LinearWeight {
  HostTensor weight;                   // dense
  HostTensor qweight, qzeros, scales;  // awq
  HostTensor bias;                     // optional, [out]
  bool is_awq() const { return !qweight.empty(); }
  int64_t out_features() const;
  int64_t in_features() const;
};

struct LayerWeights {
  HostTensor attn_norm, ffn_norm;  // [hidden]
  LinearWeight q, k, v, o;
  LinearWeight gate, up, down;
};

struct CheckpointWeights {
  HostTensor embed;       // [vocab, hidden]
  HostTensor final_norm;  // [hidden]
  HostTensor lm_head;     // [vocab, hidden]; a view of embed when tied
  std::vector<LayerWeights> layers;
  std::shared_ptr<TensorStore> store;  // keeps memory maps alive
};

// Loads and maps every tensor; throws lmd::Error naming the tensor and file on a missing tensor,
// a wrong shape or an unsupported dtype.
CheckpointWeights load_checkpoint(const std::filesystem::path& model_dir, const ModelSpec& spec);
// `model_dir` only names the checkpoint in messages about missing tensors; when empty, the folder of
// the store's files is used.
CheckpointWeights map_checkpoint(std::shared_ptr<TensorStore> store, const ModelSpec& spec,
                                 const std::filesystem::path& model_dir = {});

}  // namespace lmd
