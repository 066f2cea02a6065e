// A whole file mapped read-only into memory. Tensors read from checkpoints are views into it and hold
// a shared_ptr to it, so the mapping lives exactly as long as some tensor still uses it.
#pragma once
#include <cstddef>
#include <filesystem>
#include <memory>

namespace lmd {

class MappedFile {
 public:
  // Throws lmd::Error naming the file when it cannot be opened or mapped.
  static std::shared_ptr<const MappedFile> open(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const std::byte* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  MappedFile() = default;
  std::filesystem::path path_;
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace lmd
