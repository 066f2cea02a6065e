#include "lmd/core/safetensors.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "lmd/core/error.h"

namespace lmd {

namespace {

// Real headers are a few hundred KB at most; the reference implementation refuses more than 100 MB,
// which also keeps a garbage length from allocating gigabytes.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

uint64_t read_u64_le(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : file_(MappedFile::open(path)) {
  const std::string where = "safetensors file " + path.string();
  if (file_->size() < 8) {
    fail(where, ": ", file_->size(), " bytes is too short; expected at least the 8-byte header length");
  }
  const uint64_t header_len = read_u64_le(file_->data());
  if (header_len > kMaxHeaderBytes) {
    fail(where, ": header length ", header_len, " exceeds the ", kMaxHeaderBytes,
         "-byte limit (corrupt file?)");
  }
  if (header_len > file_->size() - 8) {
    fail(where, ": header length ", header_len, " runs past the end of the file (", file_->size(), " bytes)");
  }
  data_start_ = 8 + header_len;
  const size_t data_size = file_->size() - data_start_;

  const auto* header_begin = reinterpret_cast<const char*>(file_->data() + 8);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(header_begin, header_begin + header_len);
  } catch (const nlohmann::json::parse_error& e) {
    fail(where, ": header is not valid JSON: ", e.what());
  }
  if (!header.is_object()) fail(where, ": header must be a JSON object, got ", header.type_name());

  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") {
      if (!info.is_object()) fail(where, ": __metadata__ must be an object of strings");
      for (const auto& [key, value] : info.items()) {
        if (!value.is_string()) fail(where, ": __metadata__ value for '", key, "' must be a string");
        metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    const std::string what = where + ": tensor '" + name + "'";
    if (!info.is_object()) fail(what, ": expected an object with dtype, shape and data_offsets");
    if (!info.contains("dtype") || !info["dtype"].is_string()) fail(what, ": missing string field 'dtype'");
    const auto dtype_text = info["dtype"].get<std::string>();
    const std::optional<DType> dtype = dtype_from_name(dtype_text);
    if (!dtype) fail(what, ": unsupported dtype '", dtype_text, "' (expected F32, F16, BF16, I32, I8 or U8)");

    if (!info.contains("shape") || !info["shape"].is_array()) fail(what, ": missing array field 'shape'");
    Shape shape;
    for (const auto& dim : info["shape"]) {
      if (!dim.is_number_unsigned()) fail(what, ": shape entries must be non-negative integers");
      if (dim.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        fail(what, ": shape dimension ", dim.get<uint64_t>(), " is too large");
      }
      shape.push_back(dim.get<int64_t>());
    }

    const auto& offsets = info.contains("data_offsets") ? info["data_offsets"] : nlohmann::json();
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      fail(what, ": 'data_offsets' must be [begin, end] with non-negative integers");
    }
    const auto begin = offsets[0].get<uint64_t>();
    const auto end = offsets[1].get<uint64_t>();
    if (begin > end) fail(what, ": data_offsets [", begin, ", ", end, "] begin after end");
    if (end > data_size) {
      fail(what, ": data_offsets [", begin, ", ", end, "] run past the data section (", data_size, " bytes)");
    }
    // Shapes larger than the data section cannot match its offsets; checking first avoids overflow below.
    uint64_t numel = 1;
    for (int64_t dim : shape) {
      if (dim != 0 && numel > data_size / static_cast<uint64_t>(dim)) {
        fail(what, ": shape ", shape_str(shape), " holds more bytes than the file has");
      }
      numel *= static_cast<uint64_t>(dim);
    }
    const uint64_t expected = numel * dtype_size(*dtype);
    if (end - begin != expected) {
      fail(what, ": data_offsets [", begin, ", ", end, "] hold ", end - begin, " bytes but ", dtype_text,
           shape_str(shape), " needs ", expected);
    }
    entries_.emplace(name, Entry{*dtype, std::move(shape), begin, end});
  }

  std::vector<std::pair<const std::string*, const Entry*>> by_offset;
  for (const auto& [name, entry] : entries_) {
    if (entry.end > entry.begin) by_offset.emplace_back(&name, &entry);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const auto& a, const auto& b) { return a.second->begin < b.second->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i].second->begin < by_offset[i - 1].second->end) {
      fail(where, ": tensors '", *by_offset[i - 1].first, "' and '", *by_offset[i].first,
           "' overlap in the data section");
    }
  }
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& [name, entry] : entries_) out.push_back(name);
  return out;
}

bool SafetensorsFile::contains(const std::string& name) const { return entries_.count(name) != 0; }

HostTensor SafetensorsFile::get(const std::string& name) const {
  const auto it = entries_.find(name);
  if (it == entries_.end()) fail("tensor '", name, "' not found in safetensors file ", path().string());
  const Entry& entry = it->second;
  const std::byte* data = file_->data() + data_start_ + entry.begin;
  // Writers other than the reference one may leave the data section unaligned; typed access to
  // misaligned memory is undefined, so such tensors are copied instead of viewed.
  if (reinterpret_cast<uintptr_t>(data) % dtype_size(entry.dtype) != 0) {
    HostTensor copy(entry.dtype, entry.shape);
    std::memcpy(copy.mutable_data(), data, entry.end - entry.begin);
    return copy;
  }
  return HostTensor::view(entry.dtype, entry.shape, data, file_);
}

std::string SafetensorsFile::file_of(const std::string&) const { return path().string(); }

void write_safetensors(const std::filesystem::path& path,
                       const std::vector<std::pair<std::string, HostTensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (name == "__metadata__")
      fail("writing ", path.string(), ": '__metadata__' is not a valid tensor name");
    if (!seen.insert(name).second) fail("writing ", path.string(), ": tensor '", name, "' appears twice");
    if (tensor.empty()) fail("writing ", path.string(), ": tensor '", name, "' is empty (no data)");
    header[name] = {{"dtype", std::string(dtype_name(tensor.dtype()))},
                    {"shape", tensor.shape()},
                    {"data_offsets", {offset, offset + tensor.nbytes()}}};
    offset += tensor.nbytes();
  }
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  std::filesystem::path tmp = path;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail("cannot create ", tmp.string(), ": ", std::strerror(errno));
    char length_bytes[8];
    for (int i = 0; i < 8; ++i) length_bytes[i] = static_cast<char>((header_text.size() >> (8 * i)) & 0xff);
    out.write(length_bytes, 8);
    out.write(header_text.data(), static_cast<std::streamsize>(header_text.size()));
    for (const auto& [name, tensor] : tensors) {
      out.write(static_cast<const char*>(tensor.data()), static_cast<std::streamsize>(tensor.nbytes()));
    }
    out.close();
    if (!out) {
      std::error_code ignored;
      std::filesystem::remove(tmp, ignored);
      fail("writing ", tmp.string(), " failed (disk full?)");
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    fail("cannot rename ", tmp.string(), " to ", path.string(), ": ", ec.message());
  }
}

}  // namespace lmd
