// Checkpoint name mapping per architecture, against an in-memory tensor store: views where possible,
// InternLM2's grouped wqkv split (dense and AWQ) checked against an independent construction, and
// errors that name the tensor, the file and what was expected.
#include <cstring>
#include <map>
#include <random>

#include "expect_error.h"
#include "lmd/core/checkpoint.h"
#include "lmd/core/error.h"
#include "test_support.h"

using lmd::Arch;
using lmd::CheckpointWeights;
using lmd::DType;
using lmd::HostTensor;
using lmd::ModelSpec;
using lmd::Shape;

namespace {

constexpr const char* kShardFile = "/models/mem/model-00001-of-00001.safetensors";

// Tensors by name, all "from" one file; enough of a TensorStore for the mapper.
class MemoryStore : public lmd::TensorStore {
 public:
  void put(const std::string& name, HostTensor tensor) { tensors_[name] = std::move(tensor); }
  void erase(const std::string& name) { tensors_.erase(name); }

  std::vector<std::string> names() const override {
    std::vector<std::string> out;
    for (const auto& entry : tensors_) out.push_back(entry.first);
    return out;
  }
  bool contains(const std::string& name) const override { return tensors_.count(name) > 0; }
  HostTensor get(const std::string& name) const override {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) lmd::fail("tensor ", name, " not in ", kShardFile);
    return it->second;
  }
  std::string file_of(const std::string&) const override { return kShardFile; }

 private:
  std::map<std::string, HostTensor> tensors_;
};

// Small GQA shapes whose dims suit AWQ (multiples of 8 and of group 16).
ModelSpec small_spec(Arch arch) {
  ModelSpec s;
  s.arch = arch;
  s.model_type = lmd::arch_name(arch);
  s.hidden = 32;
  s.intermediate = 48;
  s.layers = 2;
  s.heads = 4;
  s.kv_heads = 2;
  s.head_dim = 8;
  s.vocab = 20;
  return s;
}

std::vector<float> random_values(int64_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> values(n);
  for (float& v : values) v = dist(rng);
  return values;
}

HostTensor random_tensor(const Shape& shape, std::mt19937& rng, DType dtype = DType::F32) {
  return HostTensor::from_f32(random_values(lmd::shape_numel(shape), rng), shape, dtype);
}

// Tensors of integer or 16-bit raw type, filled with random bit patterns.
template <class T>
HostTensor random_raw(const Shape& shape, DType dtype, std::mt19937& rng) {
  HostTensor t(dtype, shape);
  T* data = t.mutable_data_as<T>();
  for (int64_t i = 0; i < t.numel(); ++i) data[i] = static_cast<T>(rng());
  return t;
}

template <class T>
std::vector<T> raw(const HostTensor& t) {
  return std::vector<T>(t.data_as<T>(), t.data_as<T>() + t.numel());
}

template <class T>
HostTensor raw_tensor(const std::vector<T>& values, DType dtype, const Shape& shape) {
  HostTensor t(dtype, shape);
  std::memcpy(t.mutable_data(), values.data(), values.size() * sizeof(T));
  return t;
}

// InternLM2's layout built head by head: q, k, v are row-major [rows, heads * width] (width entries
// per head along the fused dimension); the result walks KV groups, emitting each group's query heads,
// then its key head, then its value head. With rows = 1 and width = head_dim * hidden this fuses
// [out, in] weights along their rows.
template <class T>
std::vector<T> fuse_grouped(const std::vector<T>& q, const std::vector<T>& k, const std::vector<T>& v,
                            int64_t rows, int heads, int kv_heads, int64_t width) {
  const int group = heads / kv_heads;
  std::vector<T> fused;
  auto append_head = [&fused, width](const std::vector<T>& from, int64_t row_len, int64_t row, int head) {
    auto begin = from.begin() + row * row_len + head * width;
    fused.insert(fused.end(), begin, begin + width);
  };
  for (int64_t r = 0; r < rows; ++r) {
    for (int g = 0; g < kv_heads; ++g) {
      for (int j = 0; j < group; ++j) append_head(q, heads * width, r, g * group + j);
      append_head(k, kv_heads * width, r, g);
      append_head(v, kv_heads * width, r, g);
    }
  }
  return fused;
}

void put_linear(MemoryStore& store, const std::string& prefix, int64_t out, int64_t in, bool bias,
                std::mt19937& rng, DType dtype = DType::F32) {
  store.put(prefix + ".weight", random_tensor({out, in}, rng, dtype));
  if (bias) store.put(prefix + ".bias", random_tensor({out}, rng, dtype));
}

// A complete Llama/Qwen2/InternLM checkpoint for `spec`.
std::shared_ptr<MemoryStore> llama_store(const ModelSpec& s, std::mt19937& rng) {
  auto store = std::make_shared<MemoryStore>();
  store->put("model.embed_tokens.weight", random_tensor({s.vocab, s.hidden}, rng));
  store->put("model.norm.weight", random_tensor({s.hidden}, rng));
  if (!s.tie_embeddings) store->put("lm_head.weight", random_tensor({s.vocab, s.hidden}, rng));
  for (int i = 0; i < s.layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    put_linear(*store, p + "self_attn.q_proj", s.q_size(), s.hidden, s.qkv_bias, rng);
    put_linear(*store, p + "self_attn.k_proj", s.kv_size(), s.hidden, s.qkv_bias, rng);
    put_linear(*store, p + "self_attn.v_proj", s.kv_size(), s.hidden, s.qkv_bias, rng);
    put_linear(*store, p + "self_attn.o_proj", s.hidden, s.q_size(), s.o_bias, rng);
    put_linear(*store, p + "mlp.gate_proj", s.intermediate, s.hidden, false, rng);
    put_linear(*store, p + "mlp.up_proj", s.intermediate, s.hidden, false, rng);
    put_linear(*store, p + "mlp.down_proj", s.hidden, s.intermediate, false, rng);
    store->put(p + "input_layernorm.weight", random_tensor({s.hidden}, rng));
    store->put(p + "post_attention_layernorm.weight", random_tensor({s.hidden}, rng));
  }
  return store;
}

bool same_storage(const HostTensor& a, const HostTensor& b) {
  return a.data() == b.data() && a.shape() == b.shape();
}

}  // namespace

TEST_CASE("checkpoint: llama names map to views of the store", "[checkpoint]") {
  std::mt19937 rng(1);
  ModelSpec spec = small_spec(Arch::Llama);
  auto store = llama_store(spec, rng);
  CheckpointWeights w = lmd::map_checkpoint(store, spec);
  REQUIRE(w.layers.size() == 2);
  CHECK(same_storage(w.embed, store->get("model.embed_tokens.weight")));
  CHECK(same_storage(w.final_norm, store->get("model.norm.weight")));
  CHECK(same_storage(w.lm_head, store->get("lm_head.weight")));
  const auto& l1 = w.layers[1];
  const std::string p = "model.layers.1.";
  CHECK(same_storage(l1.q.weight, store->get(p + "self_attn.q_proj.weight")));
  CHECK(same_storage(l1.k.weight, store->get(p + "self_attn.k_proj.weight")));
  CHECK(same_storage(l1.v.weight, store->get(p + "self_attn.v_proj.weight")));
  CHECK(same_storage(l1.o.weight, store->get(p + "self_attn.o_proj.weight")));
  CHECK(same_storage(l1.gate.weight, store->get(p + "mlp.gate_proj.weight")));
  CHECK(same_storage(l1.up.weight, store->get(p + "mlp.up_proj.weight")));
  CHECK(same_storage(l1.down.weight, store->get(p + "mlp.down_proj.weight")));
  CHECK(same_storage(l1.attn_norm, store->get(p + "input_layernorm.weight")));
  CHECK(same_storage(l1.ffn_norm, store->get(p + "post_attention_layernorm.weight")));
  CHECK(l1.q.bias.empty());
  CHECK_FALSE(l1.q.is_awq());
  CHECK(l1.k.out_features() == spec.kv_size());
  CHECK(l1.k.in_features() == spec.hidden);
  CHECK(l1.down.in_features() == spec.intermediate);
  CHECK(w.store == store);
}

TEST_CASE("checkpoint: tied embeddings give lm_head as a view of embed", "[checkpoint]") {
  std::mt19937 rng(2);
  ModelSpec spec = small_spec(Arch::Llama);
  spec.tie_embeddings = true;
  auto store = llama_store(spec, rng);
  CheckpointWeights w = lmd::map_checkpoint(store, spec);
  CHECK(same_storage(w.lm_head, w.embed));
}

TEST_CASE("checkpoint: qwen2 and internlm v1 biases", "[checkpoint]") {
  std::mt19937 rng(3);
  SECTION("qwen2: q/k/v biases, none on o") {
    ModelSpec spec = small_spec(Arch::Qwen2);
    spec.qkv_bias = true;
    auto store = llama_store(spec, rng);
    CheckpointWeights w = lmd::map_checkpoint(store, spec);
    CHECK(same_storage(w.layers[0].q.bias, store->get("model.layers.0.self_attn.q_proj.bias")));
    CHECK(same_storage(w.layers[0].v.bias, store->get("model.layers.0.self_attn.v_proj.bias")));
    CHECK(w.layers[0].o.bias.empty());
    store->erase("model.layers.1.self_attn.k_proj.bias");
    CHECK_ERROR(lmd::Error, lmd::map_checkpoint(store, spec, "/models/qwen"),
                "model.layers.1.self_attn.k_proj.bias", "/models/qwen");
  }
  SECTION("internlm v1: biases on q/k/v/o") {
    ModelSpec spec = small_spec(Arch::InternLM);
    spec.qkv_bias = spec.o_bias = true;
    auto store = llama_store(spec, rng);
    CheckpointWeights w = lmd::map_checkpoint(store, spec);
    CHECK(same_storage(w.layers[1].o.bias, store->get("model.layers.1.self_attn.o_proj.bias")));
    CHECK(same_storage(w.layers[1].k.bias, store->get("model.layers.1.self_attn.k_proj.bias")));
  }
}

TEST_CASE("checkpoint: internlm2 names and the grouped wqkv split", "[checkpoint]") {
  std::mt19937 rng(4);
  for (bool bias : {false, true}) {
    CAPTURE(bias);
    ModelSpec spec = small_spec(Arch::InternLM2);
    spec.qkv_bias = spec.o_bias = bias;
    const int64_t hd = spec.head_dim, hidden = spec.hidden;
    auto store = std::make_shared<MemoryStore>();
    store->put("model.tok_embeddings.weight", random_tensor({spec.vocab, hidden}, rng));
    store->put("model.norm.weight", random_tensor({hidden}, rng));
    store->put("output.weight", random_tensor({spec.vocab, hidden}, rng));
    struct Expected {
      std::vector<float> q, k, v, q_bias, k_bias, v_bias;
    };
    std::vector<Expected> expected(spec.layers);
    for (int i = 0; i < spec.layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      Expected& e = expected[i];
      // bf16 checks that the split keeps the checkpoint's dtype.
      e.q = HostTensor::from_f32(random_values(spec.q_size() * hidden, rng), {spec.q_size(), hidden},
                                 DType::BF16)
                .to_f32();
      e.k = HostTensor::from_f32(random_values(spec.kv_size() * hidden, rng), {spec.kv_size(), hidden},
                                 DType::BF16)
                .to_f32();
      e.v = HostTensor::from_f32(random_values(spec.kv_size() * hidden, rng), {spec.kv_size(), hidden},
                                 DType::BF16)
                .to_f32();
      const int64_t fused_rows = spec.q_size() + 2 * spec.kv_size();
      store->put(p + "attention.wqkv.weight",
                 HostTensor::from_f32(fuse_grouped(e.q, e.k, e.v, 1, spec.heads, spec.kv_heads, hd * hidden),
                                      {fused_rows, hidden}, DType::BF16));
      if (bias) {
        e.q_bias = random_values(spec.q_size(), rng);
        e.k_bias = random_values(spec.kv_size(), rng);
        e.v_bias = random_values(spec.kv_size(), rng);
        store->put(
            p + "attention.wqkv.bias",
            HostTensor::from_f32(fuse_grouped(e.q_bias, e.k_bias, e.v_bias, 1, spec.heads, spec.kv_heads, hd),
                                 {fused_rows}));
      }
      put_linear(*store, p + "attention.wo", hidden, spec.q_size(), bias, rng);
      put_linear(*store, p + "feed_forward.w1", spec.intermediate, hidden, false, rng);
      put_linear(*store, p + "feed_forward.w3", spec.intermediate, hidden, false, rng);
      put_linear(*store, p + "feed_forward.w2", hidden, spec.intermediate, false, rng);
      store->put(p + "attention_norm.weight", random_tensor({hidden}, rng));
      store->put(p + "ffn_norm.weight", random_tensor({hidden}, rng));
    }

    CheckpointWeights w = lmd::map_checkpoint(store, spec);
    CHECK(same_storage(w.embed, store->get("model.tok_embeddings.weight")));
    CHECK(same_storage(w.lm_head, store->get("output.weight")));
    for (int i = 0; i < spec.layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      const auto& l = w.layers[i];
      CHECK(l.q.weight.dtype() == DType::BF16);
      CHECK(l.q.weight.shape() == Shape{spec.q_size(), hidden});
      CHECK(l.k.weight.shape() == Shape{spec.kv_size(), hidden});
      CHECK(l.q.weight.to_f32() == expected[i].q);
      CHECK(l.k.weight.to_f32() == expected[i].k);
      CHECK(l.v.weight.to_f32() == expected[i].v);
      if (bias) {
        CHECK(l.q.bias.to_f32() == expected[i].q_bias);
        CHECK(l.k.bias.to_f32() == expected[i].k_bias);
        CHECK(l.v.bias.to_f32() == expected[i].v_bias);
        CHECK(same_storage(l.o.bias, store->get(p + "attention.wo.bias")));
      } else {
        CHECK(l.q.bias.empty());
      }
      CHECK(same_storage(l.o.weight, store->get(p + "attention.wo.weight")));
      CHECK(same_storage(l.gate.weight, store->get(p + "feed_forward.w1.weight")));
      CHECK(same_storage(l.up.weight, store->get(p + "feed_forward.w3.weight")));
      CHECK(same_storage(l.down.weight, store->get(p + "feed_forward.w2.weight")));
      CHECK(same_storage(l.attn_norm, store->get(p + "attention_norm.weight")));
      CHECK(same_storage(l.ffn_norm, store->get(p + "ffn_norm.weight")));
    }
  }
}

namespace {

// One AWQ linear's three tensors for `out` x `in`, as raw values.
struct AwqParts {
  std::vector<int32_t> qweight, qzeros;
  std::vector<uint16_t> scales;  // fp16 bit patterns
};

AwqParts random_awq(int64_t out, int64_t in, int group, std::mt19937& rng) {
  AwqParts parts;
  parts.qweight = raw<int32_t>(random_raw<int32_t>({in, out / 8}, DType::I32, rng));
  parts.qzeros = raw<int32_t>(random_raw<int32_t>({in / group, out / 8}, DType::I32, rng));
  parts.scales = raw<uint16_t>(random_raw<uint16_t>({in / group, out}, DType::F16, rng));
  return parts;
}

void put_awq(MemoryStore& store, const std::string& prefix, const AwqParts& parts, int64_t out, int64_t in,
             int group) {
  store.put(prefix + ".qweight", raw_tensor(parts.qweight, DType::I32, {in, out / 8}));
  store.put(prefix + ".qzeros", raw_tensor(parts.qzeros, DType::I32, {in / group, out / 8}));
  store.put(prefix + ".scales", raw_tensor(parts.scales, DType::F16, {in / group, out}));
}

}  // namespace

TEST_CASE("checkpoint: AWQ llama linears", "[checkpoint]") {
  std::mt19937 rng(5);
  ModelSpec spec = small_spec(Arch::Llama);
  spec.awq.enabled = true;
  spec.awq.group_size = 16;
  auto store = llama_store(spec, rng);
  const std::string q = "model.layers.0.self_attn.q_proj";
  store->erase(q + ".weight");
  put_awq(*store, q, random_awq(spec.q_size(), spec.hidden, 16, rng), spec.q_size(), spec.hidden, 16);
  // The other linears stay 16-bit, as AutoAWQ's modules_to_not_convert leaves them.
  CheckpointWeights w = lmd::map_checkpoint(store, spec);
  const auto& l0 = w.layers[0];
  REQUIRE(l0.q.is_awq());
  CHECK(same_storage(l0.q.qweight, store->get(q + ".qweight")));
  CHECK(same_storage(l0.q.scales, store->get(q + ".scales")));
  CHECK(l0.q.out_features() == spec.q_size());
  CHECK(l0.q.in_features() == spec.hidden);
  CHECK_FALSE(l0.k.is_awq());

  SECTION("wrong qzeros shape") {
    store->put(q + ".qzeros", random_raw<int32_t>({spec.hidden / 16, spec.q_size()}, DType::I32, rng));
    CHECK_ERROR(lmd::Error, lmd::map_checkpoint(store, spec), q + ".qzeros", kShardFile, "[2, 4]", "[2, 32]");
  }
  SECTION("qweight stored as float") {
    store->put(q + ".qweight", random_tensor({spec.hidden, spec.q_size() / 8}, rng));
    CHECK_ERROR(lmd::Error, lmd::map_checkpoint(store, spec), q + ".qweight", "I32", "F32");
  }
  SECTION("input features not a multiple of group_size") {
    spec.awq.group_size = 24;
    CHECK_ERROR(lmd::Error, lmd::map_checkpoint(store, spec), q, "group_size 24");
  }
}

TEST_CASE("checkpoint: AWQ internlm2 wqkv splits packed columns per KV group", "[checkpoint]") {
  std::mt19937 rng(6);
  ModelSpec spec = small_spec(Arch::InternLM2);
  spec.layers = 1;
  spec.awq.enabled = true;
  spec.awq.group_size = 16;
  const int group = spec.awq.group_size;
  const int64_t hd = spec.head_dim, hidden = spec.hidden, fused_out = spec.q_size() + 2 * spec.kv_size();
  auto store = std::make_shared<MemoryStore>();
  store->put("model.tok_embeddings.weight", random_tensor({spec.vocab, hidden}, rng));
  store->put("model.norm.weight", random_tensor({hidden}, rng));
  store->put("output.weight", random_tensor({spec.vocab, hidden}, rng));
  const std::string p = "model.layers.0.";
  AwqParts q = random_awq(spec.q_size(), hidden, group, rng);
  AwqParts k = random_awq(spec.kv_size(), hidden, group, rng);
  AwqParts v = random_awq(spec.kv_size(), hidden, group, rng);
  // Packed tensors hold head_dim / 8 int32 columns per head; scales hold head_dim columns per head.
  AwqParts fused{
      fuse_grouped(q.qweight, k.qweight, v.qweight, hidden, spec.heads, spec.kv_heads, hd / 8),
      fuse_grouped(q.qzeros, k.qzeros, v.qzeros, hidden / group, spec.heads, spec.kv_heads, hd / 8),
      fuse_grouped(q.scales, k.scales, v.scales, hidden / group, spec.heads, spec.kv_heads, hd)};
  put_awq(*store, p + "attention.wqkv", fused, fused_out, hidden, group);
  put_awq(*store, p + "attention.wo", random_awq(hidden, spec.q_size(), group, rng), hidden, spec.q_size(),
          group);
  put_awq(*store, p + "feed_forward.w1", random_awq(spec.intermediate, hidden, group, rng), spec.intermediate,
          hidden, group);
  put_awq(*store, p + "feed_forward.w3", random_awq(spec.intermediate, hidden, group, rng), spec.intermediate,
          hidden, group);
  put_awq(*store, p + "feed_forward.w2", random_awq(hidden, spec.intermediate, group, rng), hidden,
          spec.intermediate, group);
  store->put(p + "attention_norm.weight", random_tensor({hidden}, rng));
  store->put(p + "ffn_norm.weight", random_tensor({hidden}, rng));

  CheckpointWeights w = lmd::map_checkpoint(store, spec);
  const auto& l = w.layers[0];
  const std::pair<const lmd::LinearWeight*, const AwqParts*> checks[] = {{&l.q, &q}, {&l.k, &k}, {&l.v, &v}};
  for (const auto& [linear, parts] : checks) {
    REQUIRE(linear->is_awq());
    CHECK(linear->qweight.dtype() == DType::I32);
    CHECK(linear->scales.dtype() == DType::F16);
    CHECK(raw<int32_t>(linear->qweight) == parts->qweight);
    CHECK(raw<int32_t>(linear->qzeros) == parts->qzeros);
    CHECK(raw<uint16_t>(linear->scales) == parts->scales);
    CHECK(linear->in_features() == hidden);
  }
  CHECK(l.q.out_features() == spec.q_size());
  CHECK(l.k.out_features() == spec.kv_size());
  CHECK(l.q.qweight.shape() == Shape{hidden, spec.q_size() / 8});
  CHECK(same_storage(l.down.qweight, store->get(p + "feed_forward.w2.qweight")));
}

TEST_CASE("checkpoint: errors name the tensor, the file and what was expected", "[checkpoint]") {
  std::mt19937 rng(7);
  ModelSpec spec = small_spec(Arch::Llama);
  auto store = llama_store(spec, rng);
  SECTION("wrong shape") {
    store->put("model.layers.1.mlp.up_proj.weight", random_tensor({spec.intermediate, spec.hidden + 1}, rng));
    CHECK_ERROR(lmd::Error, lmd::map_checkpoint(store, spec), "model.layers.1.mlp.up_proj.weight", kShardFile,
                "expected shape [48, 32]", "got [48, 33]");
  }
  SECTION("missing tensor names the model folder") {
    store->erase("model.layers.0.post_attention_layernorm.weight");
    CHECK_ERROR(lmd::Error, lmd::map_checkpoint(store, spec, "/models/llama-7b"),
                "model.layers.0.post_attention_layernorm.weight", "/models/llama-7b");
    // Without a folder, the folder of the store's files.
    CHECK_ERROR(lmd::Error, lmd::map_checkpoint(store, spec), "/models/mem");
  }
  SECTION("untied checkpoint without lm_head") {
    store->erase("lm_head.weight");
    CHECK_ERROR(lmd::Error, lmd::map_checkpoint(store, spec), "lm_head.weight");
  }
  SECTION("integer dtype for a dense weight") {
    store->put("model.norm.weight", random_raw<int32_t>({spec.hidden}, DType::I32, rng));
    CHECK_ERROR(lmd::Error, lmd::map_checkpoint(store, spec), "model.norm.weight", kShardFile, "I32",
                "F32, F16 or BF16");
  }
  SECTION("internlm2 wqkv of the wrong size") {
    ModelSpec i2 = small_spec(Arch::InternLM2);
    auto s2 = std::make_shared<MemoryStore>();
    s2->put("model.tok_embeddings.weight", random_tensor({i2.vocab, i2.hidden}, rng));
    s2->put("model.norm.weight", random_tensor({i2.hidden}, rng));
    s2->put("output.weight", random_tensor({i2.vocab, i2.hidden}, rng));
    s2->put("model.layers.0.attention.wqkv.weight", random_tensor({3 * i2.q_size(), i2.hidden}, rng));
    CHECK_ERROR(lmd::Error, lmd::map_checkpoint(s2, i2), "model.layers.0.attention.wqkv.weight", "[64, 32]",
                "[96, 32]");
  }
}

TEST_CASE("checkpoint: the shipped InternLM2 layout maps like its Llama twin", "[checkpoint]") {
  LMD_REQUIRE_ASSETS();
  // Needs the real safetensors reader; skipped where the tensor store is not linked in yet.
  std::shared_ptr<lmd::TensorStore> llama_store_on_disk, internlm2_store;
  try {
    llama_store_on_disk = lmd::open_tensor_store(lmd::test::model_dir("stories260K"));
    internlm2_store = lmd::open_tensor_store(lmd::test::model_dir("stories260K-internlm2"));
  } catch (const lmd::Error& e) {
    WARN("tensor store unavailable: " << e.what());
    return;
  }
  ModelSpec llama_spec = lmd::load_model_spec(lmd::test::model_dir("stories260K"));
  ModelSpec internlm2_spec = lmd::load_model_spec(lmd::test::model_dir("stories260K-internlm2"));
  CheckpointWeights a = lmd::map_checkpoint(llama_store_on_disk, llama_spec);
  CheckpointWeights b = lmd::map_checkpoint(internlm2_store, internlm2_spec);
  CHECK(a.embed.to_f32() == b.embed.to_f32());
  CHECK(a.lm_head.to_f32() == b.lm_head.to_f32());
  for (int i = 0; i < llama_spec.layers; ++i) {
    CHECK(a.layers[i].q.weight.to_f32() == b.layers[i].q.weight.to_f32());
    CHECK(a.layers[i].k.weight.to_f32() == b.layers[i].k.weight.to_f32());
    CHECK(a.layers[i].v.weight.to_f32() == b.layers[i].v.weight.to_f32());
    CHECK(a.layers[i].down.weight.to_f32() == b.layers[i].down.weight.to_f32());
  }
}
