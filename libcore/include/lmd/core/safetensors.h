// The safetensors format: 8-byte little-endian header length N, N bytes of JSON
// ({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}), then the raw
// tensor bytes, offsets counted from the end of the header.
#pragma once
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lmd/core/mapped_file.h"
#include "lmd/core/tensor_store.h"

namespace lmd {

// One memory-mapped .safetensors file. The header is validated completely on open (sizes, offsets
// inside the file, no overlaps), so get() can hand out views without further checks.
class SafetensorsFile : public TensorStore {
 public:
  // Throws lmd::Error naming the file (and the tensor) on any malformed header.
  explicit SafetensorsFile(const std::filesystem::path& path);

  std::vector<std::string> names() const override;  // sorted
  bool contains(const std::string& name) const override;
  // A read-only view into the mapping (an owned copy when the data is not aligned to its dtype).
  HostTensor get(const std::string& name) const override;
  std::string file_of(const std::string& name) const override;

  const std::filesystem::path& path() const { return file_->path(); }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  struct Entry {
    DType dtype;
    Shape shape;
    size_t begin;  // byte offsets inside the data section
    size_t end;
  };
  std::shared_ptr<const MappedFile> file_;
  size_t data_start_ = 0;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Writes tensors in the given order to `path`, through `path + ".tmp"` and a rename so that a crash
// never leaves a half-written file under the final name. The header is padded with spaces to a multiple
// of 8 bytes, as the reference implementation does, so that the data section starts 8-byte aligned.
void write_safetensors(const std::filesystem::path& path,
                       const std::vector<std::pair<std::string, HostTensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace lmd
