// config.json -> ModelSpec: every shipped config, the synthetic variants real checkpoints use, and
// error messages that name the file and the field.
#include <nlohmann/json.hpp>

#include "expect_error.h"
#include "lmd/core/error.h"
#include "lmd/core/model_spec.h"
#include "test_support.h"

using lmd::Arch;
using lmd::DType;
using lmd::ModelSpec;
using lmd::RopeScaling;
using nlohmann::json;

namespace {

// A small valid Llama config that tests modify one field at a time.
json base_config() {
  return json{{"model_type", "llama"},  {"hidden_size", 64},        {"intermediate_size", 172},
              {"num_hidden_layers", 2}, {"num_attention_heads", 8}, {"num_key_value_heads", 4},
              {"vocab_size", 512},      {"rms_norm_eps", 1e-5},     {"max_position_embeddings", 512},
              {"rope_theta", 10000.0},  {"torch_dtype", "float16"}};
}

ModelSpec parse(const json& config) { return lmd::parse_model_spec(config.dump(), "test/config.json"); }

}  // namespace

TEST_CASE("model spec: stories260K (tied llama, GQA, fp32)", "[model_spec]") {
  LMD_REQUIRE_ASSETS();
  for (const char* name : {"stories260K", "stories260K-bin"}) {
    ModelSpec s = lmd::load_model_spec(lmd::test::model_dir(name));
    CHECK(s.arch == Arch::Llama);
    CHECK(s.model_type == "llama");
    CHECK(s.hidden == 64);
    CHECK(s.intermediate == 172);
    CHECK(s.layers == 5);
    CHECK(s.heads == 8);
    CHECK(s.kv_heads == 4);
    CHECK(s.head_dim == 8);
    CHECK(s.vocab == 512);
    CHECK(s.norm_eps == 1e-5f);
    CHECK(s.max_position == 512);
    CHECK(s.rope_theta == 10000.0);
    CHECK(s.rope_scaling == RopeScaling::None);
    CHECK(s.tie_embeddings);
    CHECK_FALSE(s.qkv_bias);
    CHECK_FALSE(s.o_bias);
    CHECK(s.dtype == DType::F32);
    CHECK(s.bos_id == 1);
    CHECK(s.eos_id == 2);
    CHECK_FALSE(s.awq.enabled);
  }
}

TEST_CASE("model spec: stories260K-internlm2", "[model_spec]") {
  LMD_REQUIRE_ASSETS();
  ModelSpec s = lmd::load_model_spec(lmd::test::model_dir("stories260K-internlm2"));
  CHECK(s.arch == Arch::InternLM2);
  CHECK(s.heads == 8);
  CHECK(s.kv_heads == 4);
  CHECK(s.head_dim == 8);
  CHECK_FALSE(s.tie_embeddings);
  CHECK_FALSE(s.qkv_bias);  // "bias": false
  CHECK_FALSE(s.o_bias);
  CHECK(s.dtype == DType::F32);
}

TEST_CASE("model spec: wt2-llama-22m uses rope_parameters and dtype", "[model_spec]") {
  LMD_REQUIRE_ASSETS();
  ModelSpec s = lmd::load_model_spec(lmd::test::model_dir("wt2-llama-22m"));
  CHECK(s.arch == Arch::Llama);
  CHECK(s.hidden == 384);
  CHECK(s.intermediate == 1024);
  CHECK(s.layers == 6);
  CHECK(s.heads == 6);
  CHECK(s.kv_heads == 2);
  CHECK(s.head_dim == 64);
  CHECK(s.vocab == 32000);
  CHECK(s.max_position == 2048);
  CHECK(s.rope_theta == 10000.0);
  CHECK(s.rope_scaling == RopeScaling::None);  // rope_type "default"
  CHECK(s.tie_embeddings);
  CHECK(s.dtype == DType::F16);
  CHECK(s.q_size() == 384);
  CHECK(s.kv_size() == 128);
}

TEST_CASE("model spec: tiny-random-llama-2 (MHA, bf16)", "[model_spec]") {
  LMD_REQUIRE_ASSETS();
  ModelSpec s = lmd::load_model_spec(lmd::test::model_dir("tiny-random-llama-2"));
  CHECK(s.hidden == 16);
  CHECK(s.layers == 2);
  CHECK(s.heads == 4);
  CHECK(s.kv_heads == 4);
  CHECK(s.head_dim == 4);
  CHECK(s.intermediate == 64);
  CHECK(s.vocab == 3000);
  CHECK(s.max_position == 256);
  CHECK_FALSE(s.tie_embeddings);
  CHECK(s.dtype == DType::BF16);
}

TEST_CASE("model spec: the real internlm2-chat-7b config", "[model_spec]") {
  LMD_REQUIRE_ASSETS();
  ModelSpec s = lmd::load_model_spec(lmd::test::assets_dir() / "tokenizers" / "internlm2");
  CHECK(s.arch == Arch::InternLM2);
  CHECK(s.hidden == 4096);
  CHECK(s.intermediate == 14336);
  CHECK(s.layers == 32);
  CHECK(s.heads == 32);
  CHECK(s.kv_heads == 8);
  CHECK(s.head_dim == 128);
  CHECK(s.vocab == 92544);
  CHECK(s.max_position == 32768);
  CHECK(s.rope_theta == 1000000.0);  // written as an integer
  CHECK(s.rope_scaling == RopeScaling::None);
  CHECK(s.dtype == DType::BF16);
  CHECK_FALSE(s.qkv_bias);
  // InternLM2-7B is published as 7.74B parameters.
  CHECK(s.param_count() == 7737708544);
}

TEST_CASE("model spec: param_count counts tied embeddings once", "[model_spec]") {
  json config = base_config();
  config["tie_word_embeddings"] = true;
  const int64_t tied = parse(config).param_count();
  config["tie_word_embeddings"] = false;
  CHECK(parse(config).param_count() - tied == 512 * 64);
  // One layer: q 64x64, k,v 64x32, o 64x64, mlp 3x64x172, two norms; plus embeddings and final norm.
  const int64_t layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 172 + 2 * 64;
  CHECK(tied == 512 * 64 + 64 + 2 * layer);
}

TEST_CASE("model spec: defaults for optional fields", "[model_spec]") {
  json config = base_config();
  for (const char* key : {"num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "rope_theta"}) {
    config.erase(key);
  }
  config["head_dim"] = nullptr;  // null counts as absent
  ModelSpec s = parse(config);
  CHECK(s.kv_heads == 8);  // absent = MHA
  CHECK(s.head_dim == 8);
  CHECK(s.norm_eps == 1e-6f);
  CHECK(s.max_position == 2048);
  CHECK(s.rope_theta == 10000.0);
  CHECK_FALSE(s.tie_embeddings);
}

TEST_CASE("model spec: explicit head_dim different from hidden/heads", "[model_spec]") {
  json config = base_config();
  config["head_dim"] = 16;
  ModelSpec s = parse(config);
  CHECK(s.head_dim == 16);
  CHECK(s.q_size() == 128);
  CHECK(s.kv_size() == 64);
}

TEST_CASE("model spec: biases per architecture", "[model_spec]") {
  json config = base_config();
  SECTION("internlm v1 with bias") {
    config["model_type"] = "internlm";
    config["bias"] = true;
    ModelSpec s = parse(config);
    CHECK(s.arch == Arch::InternLM);
    CHECK(s.qkv_bias);
    CHECK(s.o_bias);
  }
  SECTION("internlm v1 defaults to bias") {
    config["model_type"] = "internlm";
    CHECK(parse(config).o_bias);
  }
  SECTION("internlm2 with bias") {
    config["model_type"] = "internlm2";
    config["bias"] = true;
    ModelSpec s = parse(config);
    CHECK(s.qkv_bias);
    CHECK(s.o_bias);
  }
  SECTION("qwen2: q/k/v bias, no o bias") {
    config["model_type"] = "qwen2";
    ModelSpec s = parse(config);
    CHECK(s.arch == Arch::Qwen2);
    CHECK(s.qkv_bias);
    CHECK_FALSE(s.o_bias);
  }
  SECTION("llama attention_bias") {
    config["attention_bias"] = true;
    ModelSpec s = parse(config);
    CHECK(s.qkv_bias);
    CHECK(s.o_bias);
  }
}

TEST_CASE("model spec: rope scaling spellings", "[model_spec]") {
  json config = base_config();
  SECTION("dynamic (InternLM2.5)") {
    config["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};
    ModelSpec s = parse(config);
    CHECK(s.rope_scaling == RopeScaling::Dynamic);
    CHECK(s.rope_factor == 2.0);
  }
  SECTION("linear with rope_type") {
    config["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 4.0}};
    ModelSpec s = parse(config);
    CHECK(s.rope_scaling == RopeScaling::Linear);
    CHECK(s.rope_factor == 4.0);
  }
  SECTION("llama3") {
    config["rope_scaling"] = {{"rope_type", "llama3"},
                              {"factor", 8.0},
                              {"low_freq_factor", 1.0},
                              {"high_freq_factor", 4.0},
                              {"original_max_position_embeddings", 8192}};
    ModelSpec s = parse(config);
    CHECK(s.rope_scaling == RopeScaling::Llama3);
    CHECK(s.rope_factor == 8.0);
    CHECK(s.rope_low_freq_factor == 1.0);
    CHECK(s.rope_high_freq_factor == 4.0);
    CHECK(s.rope_original_max_position == 8192);
  }
  SECTION("rope_parameters carries theta and scaling (transformers 5)") {
    config.erase("rope_theta");
    config["rope_parameters"] = {{"rope_theta", 500000.0}, {"rope_type", "dynamic"}, {"factor", 3.0}};
    ModelSpec s = parse(config);
    CHECK(s.rope_theta == 500000.0);
    CHECK(s.rope_scaling == RopeScaling::Dynamic);
    CHECK(s.rope_factor == 3.0);
  }
  SECTION("null scaling") {
    config["rope_scaling"] = nullptr;
    CHECK(parse(config).rope_scaling == RopeScaling::None);
  }
}

TEST_CASE("model spec: dtype spellings and eos lists", "[model_spec]") {
  json config = base_config();
  config.erase("torch_dtype");
  config["dtype"] = "bfloat16";
  config["eos_token_id"] = {92542, 2};
  config["bos_token_id"] = 7;
  ModelSpec s = parse(config);
  CHECK(s.dtype == DType::BF16);
  CHECK(s.eos_id == 92542);
  CHECK(s.bos_id == 7);
}

TEST_CASE("model spec: AWQ quantization_config", "[model_spec]") {
  json config = base_config();
  config["quantization_config"] = {
      {"quant_method", "awq"}, {"bits", 4}, {"group_size", 64}, {"zero_point", true}, {"version", "gemm"}};
  ModelSpec s = parse(config);
  CHECK(s.awq.enabled);
  CHECK(s.awq.bits == 4);
  CHECK(s.awq.group_size == 64);
  CHECK(s.awq.zero_point);

  config["quantization_config"]["version"] = "gemv";
  CHECK_ERROR(lmd::Error, parse(config), "quantization_config.version", "gemm");
  config["quantization_config"]["version"] = "GEMM";
  CHECK(parse(config).awq.enabled);
  config["quantization_config"]["quant_method"] = "gptq";
  CHECK_ERROR(lmd::Error, parse(config), "quantization_config.quant_method", "awq");
  config["quantization_config"] = {{"quant_method", "awq"}, {"bits", 8}};
  CHECK_ERROR(lmd::Error, parse(config), "quantization_config.bits");
}

TEST_CASE("model spec: errors name the file and the field", "[model_spec]") {
  json config = base_config();
  SECTION("missing required field") {
    config.erase("hidden_size");
    CHECK_ERROR(lmd::Error, parse(config), "test/config.json", "\"hidden_size\"", "missing");
  }
  SECTION("wrong type") {
    config["num_hidden_layers"] = "two";
    CHECK_ERROR(lmd::Error, parse(config), "test/config.json", "num_hidden_layers", "integer");
  }
  SECTION("non-integral number for an integer") {
    config["vocab_size"] = 512.5;
    CHECK_ERROR(lmd::Error, parse(config), "vocab_size");
  }
  SECTION("non-positive size") {
    config["num_attention_heads"] = 0;
    CHECK_ERROR(lmd::Error, parse(config), "num_attention_heads", "positive");
  }
  SECTION("unknown model_type lists the supported ones") {
    config["model_type"] = "mistral";
    CHECK_ERROR(lmd::Error, parse(config), "model_type", "mistral", "llama, internlm, internlm2, qwen2");
  }
  SECTION("kv heads not dividing heads") {
    config["num_key_value_heads"] = 3;
    CHECK_ERROR(lmd::Error, parse(config), "num_attention_heads", "num_key_value_heads");
  }
  SECTION("heads not dividing hidden") {
    config["num_attention_heads"] = 6;
    config["num_key_value_heads"] = 6;
    CHECK_ERROR(lmd::Error, parse(config), "hidden_size", "num_attention_heads");
  }
  SECTION("unknown rope scaling") {
    config["rope_scaling"] = {{"type", "yarn"}, {"factor", 2.0}};
    CHECK_ERROR(lmd::Error, parse(config), "rope_scaling.type", "yarn");
  }
  SECTION("scaling without factor") {
    config["rope_scaling"] = {{"type", "dynamic"}};
    CHECK_ERROR(lmd::Error, parse(config), "rope_scaling.factor");
  }
  SECTION("unsupported dtype") {
    config["torch_dtype"] = "int8";
    CHECK_ERROR(lmd::Error, parse(config), "torch_dtype", "int8");
  }
  SECTION("invalid JSON") {
    CHECK_ERROR(lmd::Error, lmd::parse_model_spec("{\"model_type\": ", "bad/config.json"), "bad/config.json",
                "invalid JSON");
  }
  SECTION("not an object") {
    CHECK_ERROR(lmd::Error, lmd::parse_model_spec("[1, 2]", "bad/config.json"), "bad/config.json");
  }
}

TEST_CASE("model spec: missing folder or config.json", "[model_spec]") {
  const auto dir = std::filesystem::temp_directory_path() / "lmd_test_model_spec_empty";
  std::filesystem::create_directories(dir);
  CHECK_ERROR(lmd::Error, lmd::load_model_spec(dir), (dir / "config.json").string());
  CHECK_ERROR(lmd::Error, lmd::load_model_spec(dir / "nope"), "does not exist");
  std::filesystem::remove_all(dir);
}
