#include "lmd/core/random_checkpoint.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "lmd/core/error.h"
#include "lmd/core/tensor.h"

namespace lmd {
namespace {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

const std::vector<std::string> kInternLM2Files = {"tokenizer.model", "tokenizer_config.json",
                                                  "special_tokens_map.json", "generation_config.json"};

// Figures from the released config.json files. internlm2-7b follows the config shipped beside the
// shared InternLM2 tokenizer (rope_scaling null). No sentencepiece tokenizer exists for Llama 3, so the
// llama3-8b-like shape keeps Llama 3's 128256-row embedding and head (what decode speed depends on) but
// carries the Llama 2 tokenizer and its bos/eos ids: prompts encode to ids < 32000, and generated ids
// above that cannot be decoded to text, which benchmarks (ids only) never need.
// clang-format off
const std::vector<RandomModelShape> kShapes = {
    // name, model_type, architecture, hidden, intermediate, layers, heads, kv_heads, vocab, max_position,
    // rope_theta, dynamic_rope_factor, norm_eps, bos, eos, dtype, tokenizer folder, tokenizer files
    {"internlm2-1.8b", "internlm2", "InternLM2ForCausalLM", 2048, 8192, 24, 16, 8, 92544, 32768,
     1e6, 2.0, 1e-5f, 1, 2, DType::BF16, "internlm2", kInternLM2Files},
    {"internlm2-7b", "internlm2", "InternLM2ForCausalLM", 4096, 14336, 32, 32, 8, 92544, 32768,
     1e6, 0.0, 1e-5f, 1, 2, DType::BF16, "internlm2", kInternLM2Files},
    {"llama2-7b", "llama", "LlamaForCausalLM", 4096, 11008, 32, 32, 32, 32000, 4096,
     1e4, 0.0, 1e-5f, 1, 2, DType::F16, "llama2", {"tokenizer.model"}},
    {"llama3-8b-like", "llama", "LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128256, 8192,
     5e5, 0.0, 1e-5f, 1, 2, DType::BF16, "llama2", {"tokenizer.model"}},
};
// clang-format on

constexpr float kWeightStd = 0.02f;  // transformers' initializer_range for these models
constexpr int64_t kChunkElements = int64_t(1) << 22;

// splitmix64's output function; the splitmix64 stream is mix(key + (i+1) * gamma), so element i of a
// tensor can be computed without the ones before it, which lets chunks be filled in parallel and makes
// the values independent of chunking and threading.
constexpr uint64_t kGamma = 0x9e3779b97f4a7c15ull;
uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t fnv1a(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char c : s) h = (h ^ uint8_t(c)) * 0x100000001b3ull;
  return h;
}

// An approximately normal value from 64 random bits: the sum of four 16-bit uniforms (Irwin-Hall),
// rescaled to unit variance. Much cheaper than Box-Muller for billions of values, and bounded at
// +-3.46 sigma, which keeps random forward passes away from overflow in fp16.
float normal_from_bits(uint64_t r) {
  const uint32_t sum =
      uint32_t(r & 0xffff) + uint32_t((r >> 16) & 0xffff) + uint32_t((r >> 32) & 0xffff) + uint32_t(r >> 48);
  const float uniform_sum = (float(sum) + 2.0f) / 65536.0f;  // sum of four U(0,1): mean 2, variance 1/3
  return (uniform_sum - 2.0f) * 1.7320508f;
}

struct TensorPlan {
  std::string name;
  Shape shape;
  bool ones = false;  // a norm weight
};

std::vector<TensorPlan> plan_tensors(const RandomModelShape& s, int layers) {
  const int64_t h = s.hidden, inter = s.intermediate, head_dim = s.hidden / s.heads;
  const int64_t q = int64_t(s.heads) * head_dim, kv = int64_t(s.kv_heads) * head_dim;
  const bool internlm2 = s.model_type == "internlm2";
  std::vector<TensorPlan> out;
  out.push_back({internlm2 ? "model.tok_embeddings.weight" : "model.embed_tokens.weight", {s.vocab, h}});
  for (int l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    if (internlm2) {
      out.push_back({p + "attention.wqkv.weight", {q + 2 * kv, h}});
      out.push_back({p + "attention.wo.weight", {h, q}});
      out.push_back({p + "feed_forward.w1.weight", {inter, h}});
      out.push_back({p + "feed_forward.w3.weight", {inter, h}});
      out.push_back({p + "feed_forward.w2.weight", {h, inter}});
      out.push_back({p + "attention_norm.weight", {h}, true});
      out.push_back({p + "ffn_norm.weight", {h}, true});
    } else {
      out.push_back({p + "self_attn.q_proj.weight", {q, h}});
      out.push_back({p + "self_attn.k_proj.weight", {kv, h}});
      out.push_back({p + "self_attn.v_proj.weight", {kv, h}});
      out.push_back({p + "self_attn.o_proj.weight", {h, q}});
      out.push_back({p + "mlp.gate_proj.weight", {inter, h}});
      out.push_back({p + "mlp.up_proj.weight", {inter, h}});
      out.push_back({p + "mlp.down_proj.weight", {h, inter}});
      out.push_back({p + "input_layernorm.weight", {h}, true});
      out.push_back({p + "post_attention_layernorm.weight", {h}, true});
    }
  }
  out.push_back({"model.norm.weight", {h}, true});
  out.push_back({internlm2 ? "output.weight" : "lm_head.weight", {s.vocab, h}});
  return out;
}

const char* torch_dtype_name(DType t) {
  switch (t) {
    case DType::F32:
      return "float32";
    case DType::F16:
      return "float16";
    case DType::BF16:
      return "bfloat16";
    default:
      fail("random checkpoints are float32, float16 or bfloat16, not ", dtype_name(t));
  }
}

ordered_json config_json(const RandomModelShape& s, int layers, DType dtype, uint64_t seed) {
  ordered_json c;
  c["architectures"] = {s.architecture};
  c["model_type"] = s.model_type;
  c["hidden_size"] = s.hidden;
  c["intermediate_size"] = s.intermediate;
  c["num_hidden_layers"] = layers;
  c["num_attention_heads"] = s.heads;
  c["num_key_value_heads"] = s.kv_heads;
  c["vocab_size"] = s.vocab;
  c["max_position_embeddings"] = s.max_position;
  c["rms_norm_eps"] = s.norm_eps;
  c["rope_theta"] = s.rope_theta;
  c["rope_scaling"] = s.dynamic_rope_factor > 0
                          ? ordered_json{{"type", "dynamic"}, {"factor", s.dynamic_rope_factor}}
                          : ordered_json(nullptr);
  c["hidden_act"] = "silu";
  c[s.model_type == "internlm2" ? "bias" : "attention_bias"] = false;
  c["tie_word_embeddings"] = false;
  c["bos_token_id"] = s.bos_id;
  c["eos_token_id"] = s.eos_id;
  c["initializer_range"] = kWeightStd;
  c["torch_dtype"] = torch_dtype_name(dtype);
  // Not a transformers field: says plainly that these weights are noise, and how to make them again.
  c["lmd_random_weights"] = {{"shape", s.name}, {"seed", seed}};
  return c;
}

void write_text_file(const fs::path& path, const std::string& text) {
  fs::path tmp = path;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail("cannot create ", tmp.string(), ": ", std::strerror(errno));
    out << text;
    if (!out.flush()) fail("writing ", tmp.string(), " failed (disk full?)");
  }
  fs::rename(tmp, path);
}

// Fills `out` with elements [begin, begin + n) of tensor `t` in `dtype`.
void fill_chunk(const TensorPlan& t, uint64_t key, DType dtype, int64_t begin, int64_t n, std::byte* out,
                int threads) {
  const size_t esize = dtype_size(dtype);
  auto fill = [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float v =
          t.ones ? 1.0f : kWeightStd * normal_from_bits(mix(key + uint64_t(begin + i + 1) * kGamma));
      std::byte* dst = out + size_t(i) * esize;
      if (dtype == DType::F32) {
        std::memcpy(dst, &v, 4);
      } else {
        const uint16_t bits = dtype == DType::F16 ? f32_to_f16(v) : f32_to_bf16(v);
        std::memcpy(dst, &bits, 2);
      }
    }
  };
  const int64_t per = (n + threads - 1) / threads;
  std::vector<std::thread> pool;
  for (int k = 1; k < threads && k * per < n; ++k)
    pool.emplace_back(fill, k * per, std::min(n, (k + 1) * per));
  fill(0, std::min(n, per));
  for (std::thread& th : pool) th.join();
}

}  // namespace

const std::vector<RandomModelShape>& random_model_shapes() { return kShapes; }

const RandomModelShape& random_model_shape(std::string_view name) {
  for (const RandomModelShape& s : kShapes)
    if (s.name == name) return s;
  std::string known;
  for (const RandomModelShape& s : kShapes) known += (known.empty() ? "" : ", ") + s.name;
  fail("unknown model shape '", name, "'; known shapes: ", known);
}

void write_random_checkpoint(const RandomModelShape& shape, const fs::path& dst,
                             const RandomCheckpointOptions& options, const WriteProgress& progress) {
  const DType dtype = options.dtype.value_or(shape.dtype);
  torch_dtype_name(dtype);  // rejects integer dtypes before anything is written
  const int layers = options.layers > 0 ? options.layers : shape.layers;
  const int threads =
      options.threads > 0 ? options.threads : int(std::max(1u, std::thread::hardware_concurrency()));
  if (shape.hidden % shape.heads != 0 || shape.heads % shape.kv_heads != 0)
    fail("model shape '", shape.name, "': hidden ", shape.hidden, " / heads ", shape.heads, " / kv heads ",
         shape.kv_heads, " do not divide evenly");
  if (fs::exists(dst) && (!fs::is_directory(dst) || !fs::is_empty(dst)))
    fail("destination ", dst.string(), " exists and is not an empty folder");
  const fs::path tokenizer_src = options.tokenizers_dir / shape.tokenizer;
  for (const std::string& file : shape.tokenizer_files)
    if (!fs::is_regular_file(tokenizer_src / file))
      fail("tokenizer file ", (tokenizer_src / file).string(), " not found (needed by shape '", shape.name,
           "')");
  fs::create_directories(dst);

  // Shards in transformers' way: tensors in order, a new shard when the next tensor would overflow.
  const std::vector<TensorPlan> tensors = plan_tensors(shape, layers);
  const size_t esize = dtype_size(dtype);
  std::vector<std::vector<size_t>> shards(1);
  uint64_t shard_bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const uint64_t bytes = uint64_t(shape_numel(tensors[i].shape)) * esize;
    if (!shards.back().empty() && shard_bytes + bytes > options.max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(i);
    shard_bytes += bytes;
  }

  std::vector<std::string> file_names;
  std::vector<std::string> headers;
  uint64_t total = 0, data_total = 0;
  for (size_t s = 0; s < shards.size(); ++s) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    file_names.push_back(shards.size() == 1 ? "model.safetensors" : name);
    ordered_json header;
    header["__metadata__"] = {{"format", "pt"}};
    uint64_t offset = 0;
    for (size_t i : shards[s]) {
      const uint64_t bytes = uint64_t(shape_numel(tensors[i].shape)) * esize;
      header[tensors[i].name] = {{"dtype", std::string(dtype_name(dtype))},
                                 {"shape", tensors[i].shape},
                                 {"data_offsets", {offset, offset + bytes}}};
      offset += bytes;
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');  // 8-byte aligned data section, as the reference writer
    total += 8 + text.size() + offset;
    data_total += offset;
    headers.push_back(std::move(text));
  }

  uint64_t done = 0;
  std::vector<std::byte> buffer(size_t(kChunkElements) * esize);
  for (size_t s = 0; s < shards.size(); ++s) {
    const fs::path path = dst / file_names[s];
    fs::path tmp = path;
    tmp += ".tmp";
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail("cannot create ", tmp.string(), ": ", std::strerror(errno));
    char length[8];
    for (int i = 0; i < 8; ++i) length[i] = char((headers[s].size() >> (8 * i)) & 0xff);
    out.write(length, 8);
    out.write(headers[s].data(), std::streamsize(headers[s].size()));
    done += 8 + headers[s].size();
    for (size_t i : shards[s]) {
      const TensorPlan& t = tensors[i];
      const uint64_t key = mix(options.seed ^ fnv1a(t.name));
      const int64_t numel = shape_numel(t.shape);
      for (int64_t begin = 0; begin < numel; begin += kChunkElements) {
        const int64_t n = std::min(kChunkElements, numel - begin);
        fill_chunk(t, key, dtype, begin, n, buffer.data(), threads);
        out.write(reinterpret_cast<const char*>(buffer.data()), std::streamsize(size_t(n) * esize));
        done += uint64_t(n) * esize;
        if (progress) progress(done, total);
      }
    }
    out.close();
    if (!out) {
      std::error_code ignored;
      fs::remove(tmp, ignored);
      fail("writing ", tmp.string(), " failed (disk full?)");
    }
    fs::rename(tmp, path);
  }

  if (shards.size() > 1) {
    ordered_json index;
    index["metadata"] = {{"total_size", data_total}};
    ordered_json map = ordered_json::object();
    for (size_t s = 0; s < shards.size(); ++s)
      for (size_t i : shards[s]) map[tensors[i].name] = file_names[s];
    index["weight_map"] = std::move(map);
    write_text_file(dst / "model.safetensors.index.json", index.dump(2) + "\n");
  }
  for (const std::string& file : shape.tokenizer_files) {
    fs::copy_file(tokenizer_src / file, dst / file, fs::copy_options::overwrite_existing);
    // The shared tokenizer files are read-only; the copies belong to the user.
    fs::permissions(dst / file, fs::perms::owner_write, fs::perm_options::add);
  }
  // config.json last: a folder interrupted earlier does not look like a loadable checkpoint.
  write_text_file(dst / "config.json", config_json(shape, layers, dtype, options.seed).dump(2) + "\n");
}

LinearWeight random_awq_linear(std::mt19937& rng, int64_t in, int64_t out, int group) {
  auto words = [&](int64_t rows) {
    HostTensor t(DType::I32, {rows, out / 8});
    for (int64_t i = 0; i < t.numel(); ++i) t.mutable_data_as<int32_t>()[i] = int32_t(rng());
    return t;
  };
  std::uniform_real_distribution<float> scale(0.002f, 0.02f);
  std::vector<float> scales(in / group * out);
  for (float& s : scales) s = scale(rng);
  LinearWeight w;
  w.qweight = words(in);
  w.qzeros = words(in / group);
  w.scales = HostTensor::from_f32(scales, {in / group, out}, DType::F16);
  return w;
}

}  // namespace lmd
