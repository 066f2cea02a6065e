// Reader for pytorch_model*.bin files written by torch.save (the zip format of torch >= 1.6): a zip
// archive of stored (uncompressed) entries, `<archive>/data.pkl` holding a pickled dict of
// name -> tensor, and each tensor's storage bytes in `<archive>/data/<key>`.
#pragma once
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lmd/core/mapped_file.h"
#include "lmd/core/tensor_store.h"

namespace lmd {

// One memory-mapped .bin file. The pickle is interpreted by a small VM that knows only the opcodes and
// callables torch.save emits for a state dict (it never runs arbitrary code); tensors must be
// contiguous and are views into the mapping.
class TorchBinFile : public TensorStore {
 public:
  // Throws lmd::Error naming the file (and the tensor or pickle opcode) when the file is not a
  // torch.save zip, uses compression, or holds something other than a dict of contiguous tensors.
  explicit TorchBinFile(const std::filesystem::path& path);

  std::vector<std::string> names() const override;  // sorted
  bool contains(const std::string& name) const override;
  HostTensor get(const std::string& name) const override;
  std::string file_of(const std::string& name) const override;

  const std::filesystem::path& path() const { return file_->path(); }

 private:
  std::shared_ptr<const MappedFile> file_;
  std::map<std::string, HostTensor> tensors_;
};

}  // namespace lmd
