#include "lmd/core/tensor_store.h"

#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "lmd/core/error.h"
#include "lmd/core/safetensors.h"
#include "lmd/core/torch_bin.h"

namespace lmd {

namespace {

namespace fs = std::filesystem;

using ShardOpener = std::function<std::shared_ptr<TensorStore>(const fs::path&)>;

// Tensors spread over several files, located through an index's weight_map.
class ShardedStore : public TensorStore {
 public:
  ShardedStore(const fs::path& index_path, const ShardOpener& open_shard) : index_path_(index_path) {
    const std::string where = "checkpoint index " + index_path.string();
    std::ifstream in(index_path);
    if (!in) fail("cannot read ", where);
    nlohmann::json index;
    try {
      index = nlohmann::json::parse(in);
    } catch (const nlohmann::json::parse_error& e) {
      fail(where, ": not valid JSON: ", e.what());
    }
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
      fail(where, ": expected an object with a 'weight_map' object (tensor name -> shard file)");
    }
    std::map<std::string, std::shared_ptr<TensorStore>> shards;
    for (const auto& [name, shard] : index["weight_map"].items()) {
      if (!shard.is_string()) fail(where, ": weight_map entry '", name, "' must name a shard file");
      const auto shard_name = shard.get<std::string>();
      auto& store = shards[shard_name];
      if (!store) {
        const fs::path shard_path = index_path.parent_path() / shard_name;
        if (!fs::exists(shard_path)) {
          fail(where, ": shard '", shard_name, "' (for tensor '", name, "') does not exist at ",
               shard_path.string());
        }
        store = open_shard(shard_path);
      }
      // Checked now so that a wrong index fails at load time with both names, not mid-conversion.
      if (!store->contains(name)) {
        fail(where, ": tensor '", name, "' is mapped to shard '", shard_name, "', which does not contain it");
      }
      tensor_shard_[name] = store;
    }
  }

  std::vector<std::string> names() const override {
    std::vector<std::string> out;
    out.reserve(tensor_shard_.size());
    for (const auto& [name, shard] : tensor_shard_) out.push_back(name);
    return out;
  }

  bool contains(const std::string& name) const override { return tensor_shard_.count(name) != 0; }

  HostTensor get(const std::string& name) const override {
    const auto it = tensor_shard_.find(name);
    if (it == tensor_shard_.end()) {
      fail("tensor '", name, "' is not in the weight_map of ", index_path_.string());
    }
    return it->second->get(name);
  }

  std::string file_of(const std::string& name) const override {
    const auto it = tensor_shard_.find(name);
    return it == tensor_shard_.end() ? index_path_.string() : it->second->file_of(name);
  }

 private:
  fs::path index_path_;
  std::map<std::string, std::shared_ptr<TensorStore>> tensor_shard_;
};

}  // namespace

std::unique_ptr<TensorStore> open_tensor_store(const std::filesystem::path& model_dir) {
  if (!fs::is_directory(model_dir)) fail("model directory ", model_dir.string(), " does not exist");
  const auto open_safetensors = [](const fs::path& p) { return std::make_shared<SafetensorsFile>(p); };
  const auto open_torch_bin = [](const fs::path& p) { return std::make_shared<TorchBinFile>(p); };
  if (fs::exists(model_dir / "model.safetensors")) {
    return std::make_unique<SafetensorsFile>(model_dir / "model.safetensors");
  }
  if (fs::exists(model_dir / "model.safetensors.index.json")) {
    return std::make_unique<ShardedStore>(model_dir / "model.safetensors.index.json", open_safetensors);
  }
  if (fs::exists(model_dir / "pytorch_model.bin")) {
    return std::make_unique<TorchBinFile>(model_dir / "pytorch_model.bin");
  }
  if (fs::exists(model_dir / "pytorch_model.bin.index.json")) {
    return std::make_unique<ShardedStore>(model_dir / "pytorch_model.bin.index.json", open_torch_bin);
  }
  fail("model directory ", model_dir.string(),
       " has no weights: looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin "
       "and pytorch_model.bin.index.json");
}

}  // namespace lmd
