// Named tensors of a checkpoint, whatever files they come from (safetensors single/sharded, or
// PyTorch .bin single/sharded). Tensors are views into memory-mapped files where possible.
#pragma once
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lmd/core/tensor.h"

namespace lmd {

class TensorStore {
 public:
  virtual ~TensorStore() = default;
  virtual std::vector<std::string> names() const = 0;
  virtual bool contains(const std::string& name) const = 0;
  // Throws lmd::Error naming the tensor (and the file that should hold it) when absent or unreadable.
  virtual HostTensor get(const std::string& name) const = 0;
  // The file a tensor lives in, for messages.
  virtual std::string file_of(const std::string& name) const = 0;
};

// Opens the weights in a Hugging Face model folder: model.safetensors, model.safetensors.index.json
// + shards, pytorch_model.bin, or pytorch_model.bin.index.json + shards (in that order of preference).
std::unique_ptr<TensorStore> open_tensor_store(const std::filesystem::path& model_dir);

}  // namespace lmd
