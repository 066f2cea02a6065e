// Random-weight Hugging Face checkpoints of real model shapes (InternLM2-1.8B/7B, Llama-2-7B, a
// Llama-3-8B-like shape), carrying the real tokenizer, so that speed work needs no downloaded weights.
//
// Weights are small random values (std 0.02, norms 1.0, as the HF initialisers do) so that forward
// passes stay finite. Every tensor's values depend only on (seed, tensor name, element index): the same
// seed gives the same bytes whatever the shard size, and `layers` = 1 gives the first layer of the full
// model. Files are written tensor by tensor in chunks, so a 13 GB model needs tens of MB of memory.
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "lmd/core/checkpoint.h"
#include "lmd/core/dtype.h"

namespace lmd {

struct RandomModelShape {
  std::string name;          // "internlm2-1.8b"
  std::string model_type;    // config.json model_type: llama | internlm2
  std::string architecture;  // config.json architectures[0]
  int hidden = 0, intermediate = 0, layers = 0, heads = 0, kv_heads = 0, vocab = 0;
  int max_position = 0;
  double rope_theta = 10000.0;
  double dynamic_rope_factor = 0.0;  // > 0: rope_scaling {"type": "dynamic", "factor": F}
  float norm_eps = 1e-5f;
  int bos_id = 1, eos_id = 2;
  DType dtype = DType::BF16;  // the released checkpoint's torch_dtype
  // Folder under the tokenizers directory, and the files copied from it (tokenizer.model first).
  std::string tokenizer;
  std::vector<std::string> tokenizer_files;
};

// The shapes `lmd bench make-model` knows.
const std::vector<RandomModelShape>& random_model_shapes();
// Throws lmd::Error listing the known names when `name` is not one of them.
const RandomModelShape& random_model_shape(std::string_view name);

struct RandomCheckpointOptions {
  std::optional<DType> dtype;  // default: the shape's
  uint64_t seed = 0;
  int layers = 0;  // > 0: overrides the shape's layer count
  // Shards hold at most this many bytes (one tensor larger than that gets a shard of its own); a
  // checkpoint that fits in one is written as model.safetensors without an index, as transformers does.
  uint64_t max_shard_bytes = 4'000'000'000;
  std::filesystem::path tokenizers_dir;  // holds the shape's `tokenizer` folder
  int threads = 0;                       // generating threads; 0: all cores
};

// (bytes written so far, total bytes of all shards)
using WriteProgress = std::function<void(uint64_t, uint64_t)>;

// Writes config.json, the safetensors shards (+ model.safetensors.index.json when sharded) and the
// tokenizer files into `dst`, which must not exist or be empty. Files are written under a ".tmp" name and
// renamed when complete. Throws lmd::Error naming the file on any failure.
void write_random_checkpoint(const RandomModelShape& shape, const std::filesystem::path& dst,
                             const RandomCheckpointOptions& options, const WriteProgress& progress = {});

// An AWQ linear (`in` inputs, `out` outputs) of random codes and zeros, scales in [0.002, 0.02): the
// shape and bytes of a real int4 layer, for kernel tests and benchmarks.
LinearWeight random_awq_linear(std::mt19937& rng, int64_t in, int64_t out, int group);

}  // namespace lmd
