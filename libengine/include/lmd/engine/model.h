// The one Llama-family model definition, written against the backend ops: embedding, RMSNorm, RoPE,
// grouped-query attention over the paged KV cache, SwiGLU MLP, tied or untied output head. q/k/v and
// gate/up are fused into single weights at load time.
#pragma once
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lmd/core/checkpoint.h"
#include "lmd/core/model_spec.h"
#include "lmd/engine/backend.h"

namespace lmd {

struct ModelLayer {
  DeviceTensor attn_norm, ffn_norm;
  DeviceLinear qkv, o, gate_up, down;
};

// Sees intermediate activations of forward() (calibration statistics): `tensor` is [tokens, cols] for
// `point` of `layer`: attention_norm, qkv (the fused linear's output), qkv_rope (after RoPE, i.e. what
// the KV cache receives), attention (o's input), o, ffn_norm, gate_up, act (down's input), down; and
// layer -1, point norm for the final norm.
using ForwardObserver = std::function<void(int layer, const char* point, const DeviceTensor& tensor)>;

class Model {
 public:
  // Uploads and fuses the checkpoint's weights. `progress(layer, layers)` is called after each layer.
  Model(const ModelSpec& spec, const CheckpointWeights& weights, Backend& backend,
        const std::function<void(int, int)>& progress = {});
  static std::unique_ptr<Model> load(const std::filesystem::path& dir, Backend& backend,
                                     const std::function<void(int, int)>& progress = {});

  const ModelSpec& spec() const { return spec_; }
  Backend& backend() const { return backend_; }
  DType activation_dtype() const { return act_; }
  size_t weight_bytes() const { return weight_bytes_; }
  KvCacheLayout kv_layout(int num_blocks, int block_len, int quant_bits) const;
  // An empty observer (the default) costs nothing.
  void set_observer(ForwardObserver observer) { observer_ = std::move(observer); }

  // One forward step over the new tokens `ids` laid out by `batch` (their K/V are appended to the
  // cache). Returns fp32 logits [rows, vocab]: rows = one per sequence (its last new token), or every
  // new token when `all_logits`.
  std::vector<float> forward(const std::vector<int>& ids, const BatchLayout& batch, KvCacheStorage& cache,
                             bool all_logits = false);
  // forward() for a step whose sequences pick their next token greedily: the backend takes the argmax,
  // so only (token, log-probability) per sequence comes back instead of [sequences, vocab] logits.
  std::vector<std::pair<int, float>> forward_greedy(const std::vector<int>& ids, const BatchLayout& batch,
                                                    KvCacheStorage& cache);
  // forward() for a step whose sequences choose their next token as `rows` say (one per sequence): the
  // backend samples (Backend::sample), so only (token, log-probability) per sequence comes back.
  std::vector<std::pair<int, float>> forward_sample(const std::vector<int>& ids, const BatchLayout& batch,
                                                    KvCacheStorage& cache,
                                                    const std::vector<SampleRow>& rows);

 private:
  // The ops of one step; returns the logits, or the (token, logprob) rows chosen greedily when `greedy`
  // or by Backend::sample when `sample` is set. Decode steps (one new token per sequence) run as the
  // backend's graphs when it has them; sampling runs after the graph.
  DeviceTensor run_step(const std::vector<int>& ids, const BatchLayout& batch, KvCacheStorage& cache,
                        bool all_logits, bool greedy, const std::vector<SampleRow>* sample = nullptr);

  ModelSpec spec_;
  Backend& backend_;
  DType act_;
  DeviceTensor embed_, final_norm_;
  DeviceLinear lm_head_;
  std::vector<ModelLayer> layers_;
  size_t weight_bytes_ = 0;
  ForwardObserver observer_;
};

}  // namespace lmd
