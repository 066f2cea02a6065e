// Tests of libcore's formats: dtype conversions, HostTensor, safetensors read/write/validation, the
// torch .bin reader and open_tensor_store's choice of files.
#include <unistd.h>

#include <bit>
#include <cstring>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>

#include "lmd/core/error.h"
#include "lmd/core/safetensors.h"
#include "lmd/core/tensor_store.h"
#include "lmd/core/torch_bin.h"
#include "test_support.h"

namespace fs = std::filesystem;
using namespace std::string_literals;
using lmd::DType;
using lmd::HostTensor;

namespace {

// A fresh directory under the system temp dir, removed when the test ends.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& tag) {
    path = fs::temp_directory_path() / ("lmd_test_formats_" + tag + "_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

// The message of the lmd::Error that `action` throws, or "" when it does not throw.
std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const lmd::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string le(uint64_t value, int width) {
  std::string out;
  for (int i = 0; i < width; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xff));
  return out;
}

// A safetensors file from a literal header and data section.
void write_raw_safetensors(const fs::path& path, const std::string& header, const std::string& data) {
  write_bytes(path, le(header.size(), 8) + header + data);
}

float f32_from_bits(uint32_t bits) { return std::bit_cast<float>(bits); }
uint32_t bits_of(float f) { return std::bit_cast<uint32_t>(f); }

}  // namespace

// ---- dtypes ------------------------------------------------------------------------------------

TEST_CASE("dtype sizes and names", "[formats][dtype]") {
  CHECK(lmd::dtype_size(DType::F32) == 4);
  CHECK(lmd::dtype_size(DType::BF16) == 2);
  CHECK(lmd::dtype_size(DType::I8) == 1);
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::I32, DType::I8, DType::U8}) {
    CHECK(lmd::dtype_from_name(lmd::dtype_name(t)) == t);
  }
  CHECK_FALSE(lmd::dtype_from_name("F64").has_value());
  CHECK(lmd::dtype_from_torch_name("bfloat16") == DType::BF16);
  CHECK(lmd::dtype_from_torch_name("torch.float16") == DType::F16);
  CHECK(lmd::dtype_from_torch_name("fp32") == DType::F32);
  CHECK_FALSE(lmd::dtype_from_torch_name("int4").has_value());
  CHECK(lmd::is_float(DType::BF16));
  CHECK_FALSE(lmd::is_float(DType::I32));
}

TEST_CASE("fp16 conversions match known bit patterns", "[formats][dtype]") {
  CHECK(lmd::f32_to_f16(1.0f) == 0x3c00);
  CHECK(lmd::f32_to_f16(-2.5f) == 0xc100);
  CHECK(lmd::f32_to_f16(65504.0f) == 0x7bff);  // largest finite
  CHECK(lmd::f32_to_f16(65519.0f) == 0x7bff);  // below the midpoint to 65536
  CHECK(lmd::f32_to_f16(65520.0f) == 0x7c00);  // the midpoint rounds to even, which is infinity
  CHECK(lmd::f32_to_f16(1e10f) == 0x7c00);
  CHECK(lmd::f32_to_f16(std::ldexp(1.0f, -24)) == 0x0001);          // smallest subnormal
  CHECK(lmd::f32_to_f16(std::ldexp(1.0f, -25)) == 0x0000);          // half of it: tie to even (0)
  CHECK(lmd::f32_to_f16(std::ldexp(3.0f, -25)) == 0x0002);          // 1.5 units: tie to even (2)
  CHECK(lmd::f32_to_f16(std::ldexp(3.0f, -26)) == 0x0001);          // 0.75 units
  CHECK(lmd::f32_to_f16(std::ldexp(1023.0f, -24)) == 0x03ff);       // largest subnormal
  CHECK(lmd::f32_to_f16(std::ldexp(2047.0f, -25)) == 0x0400);       // rounds up into the normals
  CHECK(lmd::f32_to_f16(std::ldexp(1.0f, -14)) == 0x0400);          // smallest normal
  CHECK(lmd::f32_to_f16(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);   // tie, even is down
  CHECK(lmd::f32_to_f16(1.0f + std::ldexp(3.0f, -11)) == 0x3c02);   // tie, even is up
  CHECK(lmd::f32_to_f16(1.0f + std::ldexp(1.01f, -11)) == 0x3c01);  // just above the tie
  CHECK(lmd::f32_to_f16(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK(lmd::f32_to_f16(-std::numeric_limits<float>::infinity()) == 0xfc00);
  CHECK(lmd::f32_to_f16(-0.0f) == 0x8000);
  CHECK(lmd::f32_to_f16(f32_from_bits(0x00000001)) == 0x0000);  // fp32 subnormal
  const uint16_t nan = lmd::f32_to_f16(std::numeric_limits<float>::quiet_NaN());
  CHECK((nan & 0x7c00) == 0x7c00);
  CHECK((nan & 0x03ff) != 0);
  CHECK(lmd::f32_to_f16(f32_from_bits(0x7f800001)) != 0x7c00);  // a NaN with low payload stays NaN

  CHECK(lmd::f16_to_f32(0x3c00) == 1.0f);
  CHECK(lmd::f16_to_f32(0xc100) == -2.5f);
  CHECK(lmd::f16_to_f32(0x7bff) == 65504.0f);
  CHECK(lmd::f16_to_f32(0x0001) == std::ldexp(1.0f, -24));
  CHECK(lmd::f16_to_f32(0x03ff) == std::ldexp(1023.0f, -24));
  CHECK(bits_of(lmd::f16_to_f32(0x8000)) == 0x80000000u);
  CHECK(std::isinf(lmd::f16_to_f32(0xfc00)));
  CHECK(lmd::f16_to_f32(0xfc00) < 0);
  CHECK(std::isnan(lmd::f16_to_f32(0x7e00)));
}

TEST_CASE("bf16 conversions match known bit patterns", "[formats][dtype]") {
  CHECK(lmd::f32_to_bf16(1.0f) == 0x3f80);
  CHECK(lmd::f32_to_bf16(-2.5f) == 0xc020);
  CHECK(lmd::f32_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);        // tie, even is down
  CHECK(lmd::f32_to_bf16(1.0f + std::ldexp(3.0f, -8)) == 0x3f82);        // tie, even is up
  CHECK(lmd::f32_to_bf16(f32_from_bits(0x3f808001)) == 0x3f81);          // just above the tie
  CHECK(lmd::f32_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);  // rounds to infinity
  CHECK(lmd::f32_to_bf16(std::numeric_limits<float>::infinity()) == 0x7f80);
  CHECK(lmd::f32_to_bf16(-std::numeric_limits<float>::infinity()) == 0xff80);
  CHECK(lmd::f32_to_bf16(f32_from_bits(0x00010000)) == 0x0001);  // smallest bf16 subnormal
  CHECK(lmd::f32_to_bf16(f32_from_bits(0x00008000)) == 0x0000);  // tie to even
  CHECK(lmd::f32_to_bf16(-0.0f) == 0x8000);
  const uint16_t nan = lmd::f32_to_bf16(f32_from_bits(0x7f800001));  // payload only in dropped bits
  CHECK(std::isnan(lmd::bf16_to_f32(nan)));
  CHECK(std::isnan(lmd::bf16_to_f32(lmd::f32_to_bf16(-std::numeric_limits<float>::quiet_NaN()))));

  CHECK(lmd::bf16_to_f32(0x3f80) == 1.0f);
  CHECK(lmd::bf16_to_f32(0xc020) == -2.5f);
  CHECK(lmd::bf16_to_f32(0x0001) == std::ldexp(1.0f, -133));
}

TEST_CASE("every fp16 and bf16 value round-trips through fp32", "[formats][dtype]") {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const auto bits = static_cast<uint16_t>(h);
    const float f16 = lmd::f16_to_f32(bits);
    const float bf16 = lmd::bf16_to_f32(bits);
    if (std::isnan(f16)) {
      REQUIRE(std::isnan(lmd::f16_to_f32(lmd::f32_to_f16(f16))));
    } else {
      REQUIRE(lmd::f32_to_f16(f16) == bits);
    }
    if (std::isnan(bf16)) {
      REQUIRE(std::isnan(lmd::bf16_to_f32(lmd::f32_to_bf16(bf16))));
    } else {
      REQUIRE(lmd::f32_to_bf16(bf16) == bits);
    }
  }
}

#if defined(__FLT16_MAX__)
// The compiler's _Float16 is an independent, correctly rounded reference.
TEST_CASE("fp32 -> fp16 agrees with the compiler's _Float16 on random bit patterns", "[formats][dtype]") {
  std::mt19937 rng(1234);
  for (int i = 0; i < 2'000'000; ++i) {
    const float f = f32_from_bits(static_cast<uint32_t>(rng()));
    if (std::isnan(f)) continue;
    const auto expected = std::bit_cast<uint16_t>(static_cast<_Float16>(f));
    REQUIRE(lmd::f32_to_f16(f) == expected);
  }
}
#endif

// ---- HostTensor ----------------------------------------------------------------------------------

TEST_CASE("HostTensor basics", "[formats][tensor]") {
  CHECK(lmd::shape_str({4, 64}) == "[4, 64]");
  CHECK(lmd::shape_str({}) == "[]");
  CHECK(lmd::shape_numel({3, 0, 2}) == 0);
  CHECK(lmd::shape_numel({}) == 1);

  const HostTensor t = HostTensor::from_f32({1, 2, 3, 4, 5, 6}, {3, 2});
  CHECK(t.dtype() == DType::F32);
  CHECK(t.dim(-1) == 2);
  CHECK(t.nbytes() == 24);

  const HostTensor flat = t.reshape({6});
  CHECK(flat.data() == t.data());
  CHECK(contains(error_of([&] { t.reshape({4}); }), "[4]"));

  HostTensor copy = t.clone();
  CHECK(copy.data() != t.data());
  copy.mutable_data_as<float>()[0] = 10;
  CHECK(t.to_f32()[0] == 1);

  const HostTensor half = t.to(DType::F16);
  CHECK(half.dtype() == DType::F16);
  CHECK(half.data_as<uint16_t>()[0] == 0x3c00);
  CHECK(half.to(DType::BF16).to_f32() == t.to_f32());
  CHECK(HostTensor::from_f32({-3, 7}, {2}, DType::I8).to(DType::I32).to_f32() == std::vector<float>{-3, 7});
  CHECK_FALSE(error_of([&] { t.to(DType::I8); }).empty());
  CHECK_FALSE(error_of([] { HostTensor::from_f32({1.5f}, {1}, DType::I32); }).empty());
  CHECK_FALSE(error_of([] { HostTensor::from_f32({1, 2}, {3}); }).empty());

  auto keep = std::make_shared<std::vector<float>>(std::vector<float>{1, 2});
  HostTensor view = HostTensor::view(DType::F32, {2}, keep->data(), keep);
  CHECK(contains(error_of([&] { view.mutable_data(); }), "read-only"));
  CHECK(view.clone().mutable_data() != nullptr);

  const HostTensor zeros(DType::BF16, {0, 4});
  CHECK_FALSE(zeros.empty());
  CHECK(zeros.to_f32().empty());
  CHECK(HostTensor().empty());
}

// ---- safetensors ---------------------------------------------------------------------------------

TEST_CASE("safetensors write -> read round trip, every dtype", "[formats][safetensors]") {
  TempDir dir("roundtrip");
  const fs::path path = dir.path / "out.safetensors";
  std::vector<std::pair<std::string, HostTensor>> tensors = {
      {"f32", HostTensor::from_f32({1.5f, -2, 3e-8f}, {3})},
      {"f16", HostTensor::from_f32({0.5f, 65504, -1, 2}, {2, 2}, DType::F16)},
      {"bf16", HostTensor::from_f32({3, 1e30f}, {1, 2}, DType::BF16)},
      {"i32", HostTensor::from_f32({-7, 123456}, {2}, DType::I32)},
      {"i8", HostTensor::from_f32({-128, 127, 0}, {3}, DType::I8)},
      {"u8", HostTensor::from_f32({255, 1, 2, 3, 4}, {5}, DType::U8)},
      {"empty", HostTensor(DType::F32, {0, 3})},
      {"scalar", HostTensor::from_f32({42}, {})},
  };
  lmd::write_safetensors(path, tensors, {{"format", "pt"}});
  CHECK_FALSE(fs::exists(dir.path / "out.safetensors.tmp"));

  const std::string bytes = read_bytes(path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  CHECK(header_len % 8 == 0);  // data section starts 8-byte aligned
  CHECK(bytes[8 + header_len - 1] != '\0');

  const lmd::SafetensorsFile file(path);
  CHECK(file.metadata().at("format") == "pt");
  CHECK(file.names().size() == tensors.size());
  for (const auto& [name, expected] : tensors) {
    INFO(name);
    const HostTensor got = file.get(name);
    CHECK(got.dtype() == expected.dtype());
    CHECK(got.shape() == expected.shape());
    REQUIRE(got.nbytes() == expected.nbytes());
    CHECK(std::memcmp(got.data(), expected.data(), got.nbytes()) == 0);
  }
  CHECK(contains(error_of([&] { file.get("missing"); }), "missing"));
  CHECK(contains(error_of([&] { file.get("f32").mutable_data(); }), "read-only"));

  // Writing over an existing file replaces it whole.
  lmd::write_safetensors(path, {{"only", HostTensor::from_f32({1}, {1})}});
  CHECK(lmd::SafetensorsFile(path).names() == std::vector<std::string>{"only"});

  CHECK(contains(error_of([&] {
                   lmd::write_safetensors(dir.path / "dup.safetensors", {tensors[0], tensors[0]});
                 }),
                 "twice"));
  CHECK_FALSE(fs::exists(dir.path / "dup.safetensors"));
}

TEST_CASE("safetensors reads stories260K", "[formats][safetensors]") {
  LMD_REQUIRE_ASSETS();
  const auto store = lmd::open_tensor_store(lmd::test::model_dir("stories260K"));
  CHECK(store->names().size() == 47);
  const HostTensor q = store->get("model.layers.0.self_attn.q_proj.weight");
  CHECK(q.dtype() == DType::F32);
  CHECK(q.shape() == lmd::Shape{64, 64});
  // Expected values read with python3 (struct + json, no torch) from the file's raw bytes:
  // the first three floats of the tensor's data_offsets range.
  const std::vector<float> values = q.to_f32();
  CHECK(values[0] == 0.04439278692007065f);
  CHECK(values[1] == 0.07974770665168762f);
  CHECK(values[2] == -0.008925346657633781f);
  CHECK(store->get("model.embed_tokens.weight").shape() == lmd::Shape{512, 64});
  CHECK(contains(store->file_of("model.norm.weight"), "model.safetensors"));
  CHECK(contains(error_of([&] { store->get("lm_head.weight"); }), "lm_head.weight"));
}

TEST_CASE("safetensors reads the sharded wt2-llama-22m via its index", "[formats][safetensors]") {
  LMD_REQUIRE_ASSETS();
  const fs::path dir = lmd::test::model_dir("wt2-llama-22m");
  const auto store = lmd::open_tensor_store(dir);
  std::ifstream index_file(dir / "model.safetensors.index.json");
  const auto weight_map = nlohmann::json::parse(index_file)["weight_map"];
  CHECK(store->names().size() == weight_map.size());
  for (const auto& [name, shard] : weight_map.items()) {
    INFO(name);
    CHECK(fs::path(store->file_of(name)).filename() == shard.get<std::string>());
    CHECK(store->get(name).dtype() == DType::F16);
  }
  const HostTensor embed = store->get("model.embed_tokens.weight");
  CHECK(embed.shape() == lmd::Shape{32000, 384});
  // Read with python3 (struct + json) from model-00002-of-00003.safetensors: raw fp16 bits efa7 55a4 3fa9.
  const HostTensor k = store->get("model.layers.0.self_attn.k_proj.weight");
  CHECK(k.shape() == lmd::Shape{128, 384});
  CHECK(k.data_as<uint16_t>()[0] == 0xa7ef);
  CHECK(k.data_as<uint16_t>()[1] == 0xa455);
  CHECK(k.data_as<uint16_t>()[2] == 0xa93f);
}

TEST_CASE("corrupt safetensors files fail with the file name", "[formats][safetensors]") {
  TempDir dir("corrupt");
  const std::string f32x4(16, '\0');
  struct Case {
    std::string file;
    std::function<void(const fs::path&)> write;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"truncated.safetensors", [](const fs::path& p) { write_bytes(p, "abc"); }, "too short"},
      {"long_header.safetensors", [](const fs::path& p) { write_bytes(p, le(1000, 8) + "{}"); },
       "header length"},
      {"huge_header.safetensors", [](const fs::path& p) { write_bytes(p, le(1ull << 40, 8) + "{}"); },
       "limit"},
      {"bad_json.safetensors", [](const fs::path& p) { write_raw_safetensors(p, "{\"a\": [1,", ""); },
       "JSON"},
      {"not_object.safetensors", [](const fs::path& p) { write_raw_safetensors(p, "[1, 2]", ""); }, "object"},
      {"unknown_dtype.safetensors",
       [&](const fs::path& p) {
         write_raw_safetensors(p, R"({"w": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}})", f32x4);
       },
       "Q7"},
      {"past_end.safetensors",
       [&](const fs::path& p) {
         write_raw_safetensors(p, R"({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}})", f32x4);
       },
       "past the data section"},
      {"size_mismatch.safetensors",
       [&](const fs::path& p) {
         write_raw_safetensors(p, R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}})",
                               f32x4);
       },
       "needs 16"},
      {"reversed.safetensors",
       [&](const fs::path& p) {
         write_raw_safetensors(p, R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", f32x4);
       },
       "begin after end"},
      {"overlap.safetensors",
       [&](const fs::path& p) {
         write_raw_safetensors(p,
                               R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                               R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                               f32x4);
       },
       "overlap"},
      {"negative_dim.safetensors",
       [&](const fs::path& p) {
         write_raw_safetensors(p, R"({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}})",
                               f32x4);
       },
       "non-negative"},
      {"bad_metadata.safetensors",
       [&](const fs::path& p) { write_raw_safetensors(p, R"({"__metadata__": {"n": 3}})", ""); },
       "__metadata__"},
  };
  for (const Case& c : cases) {
    INFO(c.file);
    const fs::path path = dir.path / c.file;
    c.write(path);
    const std::string message = error_of([&] { lmd::SafetensorsFile file(path); });
    CHECK(contains(message, c.file));
    CHECK(contains(message, c.expected));
  }
  // The overlap message names both tensors.
  CHECK(contains(error_of([&] { lmd::SafetensorsFile file(dir.path / "overlap.safetensors"); }),
                 "'a' and 'b'"));
  // A missing file is an lmd::Error too.
  CHECK(contains(error_of([&] { lmd::SafetensorsFile file(dir.path / "nope.safetensors"); }),
                 "nope.safetensors"));
}

// ---- torch .bin ----------------------------------------------------------------------------------

TEST_CASE("torch .bin: stories260K-bin equals stories260K rounded to bf16", "[formats][torch_bin]") {
  LMD_REQUIRE_ASSETS();
  const fs::path bin_dir = lmd::test::model_dir("stories260K-bin");
  const auto bin = lmd::open_tensor_store(bin_dir);
  const auto reference = lmd::open_tensor_store(lmd::test::model_dir("stories260K"));

  std::ifstream index_file(bin_dir / "pytorch_model.bin.index.json");
  const auto weight_map = nlohmann::json::parse(index_file)["weight_map"];
  REQUIRE(weight_map.size() == 47);
  CHECK(bin->names() == reference->names());
  // The shards were checked with python3 (zipfile + a stub Unpickler, no torch): linear weights and
  // embeddings are bf16 with round-to-nearest-even of the fp32 model, norms are the same fp32 values.
  int bf16_tensors = 0;
  for (const auto& [name, shard] : weight_map.items()) {
    INFO(name);
    REQUIRE(bin->contains(name));
    CHECK(fs::path(bin->file_of(name)).filename() == shard.get<std::string>());
    const HostTensor got = bin->get(name);
    const HostTensor want = reference->get(name);
    REQUIRE(got.shape() == want.shape());
    const std::vector<float> want_values = want.to_f32();
    if (name.find("norm") != std::string::npos) {
      REQUIRE(got.dtype() == DType::F32);
      CHECK(got.to_f32() == want_values);
    } else {
      REQUIRE(got.dtype() == DType::BF16);
      ++bf16_tensors;
      int mismatches = 0;
      for (size_t i = 0; i < want_values.size(); ++i) {
        mismatches += got.data_as<uint16_t>()[i] != lmd::f32_to_bf16(want_values[i]);
      }
      CHECK(mismatches == 0);
    }
  }
  CHECK(bf16_tensors == 36);  // 7 linears x 5 layers + embeddings
}

namespace {

// Builds a minimal torch.save-style zip of stored entries (CRCs left zero: the reader does not check
// them). With `zip64`, sizes and offsets go through zip64 extra fields and a zip64 end record, as
// torch writes for large files.
std::string make_zip(const std::vector<std::pair<std::string, std::string>>& entries, bool zip64,
                     uint16_t method = 0) {
  std::string body, directory;
  for (const auto& [name, data] : entries) {
    const uint64_t offset = body.size();
    // Like torch, pad the local header with an extra field so that the data starts 64-byte aligned.
    const size_t unpadded = offset + 30 + name.size() + 4;
    const size_t pad = (64 - unpadded % 64) % 64;
    body += le(0x04034b50, 4) + le(20, 2) + le(0, 2) + le(method, 2) + le(0, 4) + le(0, 4) +
            le(data.size(), 4) + le(data.size(), 4) + le(name.size(), 2) + le(4 + pad, 2) + name +
            le(0x4246, 2) + le(pad, 2) + std::string(pad, 'Z') + data;
    const uint64_t marker = zip64 ? 0xffffffff : 0;
    const std::string extra =
        zip64 ? le(1, 2) + le(24, 2) + le(data.size(), 8) + le(data.size(), 8) + le(offset, 8)
              : std::string();
    directory += le(0x02014b50, 4) + le(45, 2) + le(45, 2) + le(0, 2) + le(method, 2) + le(0, 4) + le(0, 4) +
                 le(zip64 ? marker : data.size(), 4) + le(zip64 ? marker : data.size(), 4) +
                 le(name.size(), 2) + le(extra.size(), 2) + le(0, 2) + le(0, 2) + le(0, 2) + le(0, 4) +
                 le(zip64 ? marker : offset, 4) + name + extra;
  }
  std::string out = body + directory;
  const uint64_t count = entries.size();
  if (zip64) {
    const uint64_t record = out.size();
    out += le(0x06064b50, 4) + le(44, 8) + le(45, 2) + le(45, 2) + le(0, 4) + le(0, 4) + le(count, 8) +
           le(count, 8) + le(directory.size(), 8) + le(body.size(), 8);
    out += le(0x07064b50, 4) + le(0, 4) + le(record, 8) + le(1, 4);
    out += le(0x06054b50, 4) + le(0, 4) + le(0xffff, 2) + le(0xffff, 2) + le(0xffffffff, 4) +
           le(0xffffffff, 4) + le(0, 2);
  } else {
    out += le(0x06054b50, 4) + le(0, 4) + le(count, 2) + le(count, 2) + le(directory.size(), 4) +
           le(body.size(), 4) + le(0, 2);
  }
  return out;
}

std::string pickle_str(const std::string& s) { return "X" + le(s.size(), 4) + s; }

// Pickle of {name: _rebuild_tensor_v2(FloatStorage key "0" of 6 elements, offset, size, stride)},
// in the opcodes torch.save uses.
std::string state_dict_pickle(const std::string& name, int offset, const std::string& size_and_stride) {
  return "\x80\x02}q\x00("s + pickle_str(name) + "ctorch._utils\n_rebuild_tensor_v2\nq\x01((" +
         pickle_str("storage") + "ctorch\nFloatStorage\n" + pickle_str("0") + pickle_str("cpu") + "K\x06tQK" +
         std::string(1, static_cast<char>(offset)) + size_and_stride + "\x89}tRu.";
}

}  // namespace

TEST_CASE("torch .bin: storage offsets, zip64 and malformed archives", "[formats][torch_bin]") {
  TempDir dir("bin");
  std::string storage;
  for (int i = 0; i < 6; ++i) storage += le(bits_of(static_cast<float>(i)), 4);
  // size (2, 2), stride (2, 1) at storage offset 2: the values 2..5.
  const std::string contiguous = state_dict_pickle("w", 2, "K\x02K\x02\x86K\x02K\x01\x86");
  for (bool zip64 : {false, true}) {
    INFO("zip64 " << zip64);
    const fs::path path = dir.path / "ok.bin";
    write_bytes(path, make_zip({{"archive/data.pkl", contiguous}, {"archive/data/0", storage}}, zip64));
    const lmd::TorchBinFile file(path);
    REQUIRE(file.names() == std::vector<std::string>{"w"});
    const HostTensor w = file.get("w");
    CHECK(w.shape() == lmd::Shape{2, 2});
    CHECK(w.to_f32() == std::vector<float>{2, 3, 4, 5});
  }

  struct Case {
    std::string file;
    std::string bytes;
    std::string expected;
  };
  const std::string good = make_zip({{"archive/data.pkl", contiguous}, {"archive/data/0", storage}}, false);
  const std::vector<Case> cases = {
      {"garbage.bin", std::string(100, 'x'), "not a zip"},
      {"tiny.bin", "PK", "too short"},
      {"truncated.bin", good.substr(0, good.size() / 2), "truncated"},
      {"transposed.bin",
       make_zip({{"archive/data.pkl", state_dict_pickle("w", 0, "K\x02K\x02\x86K\x01K\x02\x86")},
                 {"archive/data/0", storage}},
                false),
       "non-contiguous"},
      {"past_storage.bin",
       make_zip({{"archive/data.pkl", state_dict_pickle("w", 4, "K\x02K\x02\x86K\x02K\x01\x86")},
                 {"archive/data/0", storage}},
                false),
       "runs past its storage"},
      {"compressed.bin", make_zip({{"archive/data.pkl", contiguous}, {"archive/data/0", storage}}, false, 8),
       "compressed"},
      {"missing_storage.bin", make_zip({{"archive/data.pkl", contiguous}}, false), "archive/data/0"},
      {"no_pickle.bin", make_zip({{"archive/data/0", storage}}, false), "data.pkl"},
      {"bad_opcode.bin", make_zip({{"archive/data.pkl", "\x80\x02(S'x'\n."}}, false), "opcode 0x53"},
      {"short_pickle.bin", make_zip({{"archive/data.pkl", contiguous.substr(0, 40)}}, false), "truncated"},
      {"evil_call.bin",
       make_zip({{"archive/data.pkl", "\x80\x02\x63os\nsystem\n" + pickle_str("ls") + "\x85R."}}, false),
       "os.system"},
      {"not_dict.bin", make_zip({{"archive/data.pkl", "\x80\x02]."}}, false), "list"},
  };
  for (const Case& c : cases) {
    INFO(c.file);
    const fs::path path = dir.path / c.file;
    write_bytes(path, c.bytes);
    const std::string message = error_of([&] { lmd::TorchBinFile file(path); });
    CHECK(contains(message, c.file));
    CHECK(contains(message, c.expected));
  }
}

TEST_CASE("torch .bin: truncated real shard fails with the file name", "[formats][torch_bin]") {
  LMD_REQUIRE_ASSETS();
  TempDir dir("bin_real");
  const std::string shard =
      read_bytes(lmd::test::model_dir("stories260K-bin") / "pytorch_model-00001-of-00002.bin");
  for (size_t keep : {shard.size() - 10, shard.size() / 2, size_t{1000}}) {
    INFO(keep);
    const fs::path path = dir.path / "pytorch_model.bin";
    write_bytes(path, shard.substr(0, keep));
    CHECK(contains(error_of([&] { lmd::open_tensor_store(dir.path); }), "pytorch_model.bin"));
  }
}

// ---- open_tensor_store ---------------------------------------------------------------------------

TEST_CASE("open_tensor_store picks files and reports what it looked for", "[formats][store]") {
  TempDir dir("store");
  CHECK(contains(error_of([&] { lmd::open_tensor_store(dir.path / "absent"); }), "absent"));
  const std::string none = error_of([&] { lmd::open_tensor_store(dir.path); });
  CHECK(contains(none, dir.path.string()));
  CHECK(contains(none, "model.safetensors"));
  CHECK(contains(none, "pytorch_model.bin.index.json"));

  // Sharded safetensors written by us: the index resolves names to shards.
  lmd::write_safetensors(dir.path / "a.safetensors", {{"x", HostTensor::from_f32({1, 2}, {2})}});
  lmd::write_safetensors(dir.path / "b.safetensors", {{"y", HostTensor::from_f32({3}, {1}, DType::F16)}});
  write_bytes(dir.path / "model.safetensors.index.json",
              R"({"metadata": {}, "weight_map": {"x": "a.safetensors", "y": "b.safetensors"}})");
  {
    const auto store = lmd::open_tensor_store(dir.path);
    CHECK(store->names() == std::vector<std::string>{"x", "y"});
    CHECK(store->get("y").to_f32() == std::vector<float>{3});
    CHECK(contains(store->file_of("y"), "b.safetensors"));
    CHECK(contains(error_of([&] { store->get("z"); }), "'z'"));
  }

  write_bytes(dir.path / "model.safetensors.index.json", R"({"weight_map": {"x": "c.safetensors"}})");
  const std::string missing_shard = error_of([&] { lmd::open_tensor_store(dir.path); });
  CHECK(contains(missing_shard, "c.safetensors"));
  CHECK(contains(missing_shard, "model.safetensors.index.json"));

  write_bytes(dir.path / "model.safetensors.index.json", R"({"weight_map": {"y": "a.safetensors"}})");
  CHECK(contains(error_of([&] { lmd::open_tensor_store(dir.path); }), "does not contain"));

  write_bytes(dir.path / "model.safetensors.index.json", R"({"weights": {}})");
  CHECK(contains(error_of([&] { lmd::open_tensor_store(dir.path); }), "weight_map"));

  // A single model.safetensors wins over an index.
  lmd::write_safetensors(dir.path / "model.safetensors", {{"single", HostTensor::from_f32({1}, {1})}});
  CHECK(lmd::open_tensor_store(dir.path)->names() == std::vector<std::string>{"single"});
}
