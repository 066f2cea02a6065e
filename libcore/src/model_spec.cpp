// HF config.json -> ModelSpec. Defaults follow the transformers config classes (LlamaConfig,
// Qwen2Config, and the remote-code InternLMConfig / InternLM2Config), so a field a checkpoint leaves
// out means what it means to transformers.
#include "lmd/core/model_spec.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string_view>

#include "lmd/core/error.h"

namespace lmd {
namespace {

using nlohmann::json;

constexpr Arch kArches[] = {Arch::Llama, Arch::InternLM, Arch::InternLM2, Arch::Qwen2};

std::string supported_model_types() {
  std::string out;
  for (Arch a : kArches) out += std::string(out.empty() ? "" : ", ") + arch_name(a);
  return out;
}

// Reads typed fields of one JSON object; every error names the source file and the field's full path
// ("rope_scaling.factor"). A field set to null counts as absent, as it does for transformers.
class FieldReader {
 public:
  FieldReader(const json& object, std::string source, std::string prefix = "")
      : object_(&object), source_(std::move(source)), prefix_(std::move(prefix)) {}

  bool has(const char* key) const { return find(key) != nullptr; }

  const json* find(const char* key) const {
    auto it = object_->find(key);
    if (it == object_->end() || it->is_null()) return nullptr;
    return &*it;
  }

  // A nested object, or nullopt when absent/null.
  std::optional<FieldReader> object(const char* key) const {
    const json* value = find(key);
    if (!value) return std::nullopt;
    if (!value->is_object()) wrong_type(key, "an object", *value);
    return FieldReader(*value, source_, path(key) + ".");
  }

  int64_t integer(const char* key) const {
    const json* value = find(key);
    if (!value) missing(key);
    return as_integer(key, *value);
  }
  int positive_int(const char* key) const { return to_positive_int(key, integer(key)); }
  int positive_int_or(const char* key, int fallback) const {
    return has(key) ? to_positive_int(key, integer(key)) : fallback;
  }

  double number_or(const char* key, double fallback) const {
    const json* value = find(key);
    if (!value) return fallback;
    if (!value->is_number()) wrong_type(key, "a number", *value);
    return value->get<double>();
  }
  double positive_number_or(const char* key, double fallback) const {
    double value = number_or(key, fallback);
    if (!(value > 0) || !std::isfinite(value)) {
      fail(source_, ": field \"", path(key), "\": expected a positive number, got ", value);
    }
    return value;
  }

  bool boolean_or(const char* key, bool fallback) const {
    const json* value = find(key);
    if (!value) return fallback;
    if (!value->is_boolean()) wrong_type(key, "true or false", *value);
    return value->get<bool>();
  }

  std::optional<std::string> string(const char* key) const {
    const json* value = find(key);
    if (!value) return std::nullopt;
    if (!value->is_string()) wrong_type(key, "a string", *value);
    return value->get<std::string>();
  }
  std::string required_string(const char* key) const {
    auto value = string(key);
    if (!value) missing(key);
    return *value;
  }

  // A token id, or the first of a list of ids (generation stops on any of them; the spec keeps one).
  std::optional<int> token_id(const char* key) const {
    const json* value = find(key);
    if (!value) return std::nullopt;
    if (value->is_array()) {
      if (value->empty())
        fail(source_, ": field \"", path(key), "\": expected a token id or a non-empty list");
      return static_cast<int>(as_integer(key, value->front()));
    }
    return static_cast<int>(as_integer(key, *value));
  }

  std::string path(const char* key) const { return prefix_ + key; }
  const std::string& source() const { return source_; }

  [[noreturn]] void invalid(const char* key, const std::string& what) const {
    fail(source_, ": field \"", path(key), "\": ", what);
  }

 private:
  [[noreturn]] void missing(const char* key) const {
    fail(source_, ": missing required field \"", path(key), "\"");
  }
  [[noreturn]] void wrong_type(const char* key, const char* expected, const json& got) const {
    fail(source_, ": field \"", path(key), "\": expected ", expected, ", got ", got.dump());
  }

  int64_t as_integer(const char* key, const json& value) const {
    if (value.is_number_integer()) return value.get<int64_t>();
    // Some exporters write integral values as floats (4096.0); accept those, reject 0.5.
    if (value.is_number_float()) {
      double d = value.get<double>();
      if (std::isfinite(d) && d == std::floor(d) && std::abs(d) < 9e15) return static_cast<int64_t>(d);
    }
    wrong_type(key, "an integer", value);
  }

  int to_positive_int(const char* key, int64_t value) const {
    if (value <= 0 || value > INT32_MAX) {
      fail(source_, ": field \"", path(key), "\": expected a positive integer, got ", value);
    }
    return static_cast<int>(value);
  }

  const json* object_;  // a pointer so that readers can be reassigned
  std::string source_;
  std::string prefix_;
};

// transformers 4.x writes `rope_theta` and `rope_scaling` at the top level; 5.x folds both into
// `rope_parameters` ({rope_theta, rope_type, factor, ...}). Either object may carry the scaling.
void read_rope(const FieldReader& config, ModelSpec& spec) {
  std::optional<FieldReader> parameters = config.object("rope_parameters");
  spec.rope_theta = config.positive_number_or("rope_theta", spec.rope_theta);
  if (parameters) spec.rope_theta = parameters->positive_number_or("rope_theta", spec.rope_theta);

  std::optional<FieldReader> scaling = config.object("rope_scaling");
  if (!scaling) scaling = parameters;
  if (!scaling) return;

  // transformers renamed "type" to "rope_type"; both occur in the wild.
  const char* type_key = scaling->has("rope_type") ? "rope_type" : "type";
  std::string type = scaling->string(type_key).value_or("default");
  if (type == "default") return;
  if (type == "linear") {
    spec.rope_scaling = RopeScaling::Linear;
  } else if (type == "dynamic") {
    spec.rope_scaling = RopeScaling::Dynamic;
  } else if (type == "llama3") {
    spec.rope_scaling = RopeScaling::Llama3;
    spec.rope_low_freq_factor = scaling->positive_number_or("low_freq_factor", spec.rope_low_freq_factor);
    spec.rope_high_freq_factor = scaling->positive_number_or("high_freq_factor", spec.rope_high_freq_factor);
    spec.rope_original_max_position =
        scaling->positive_int_or("original_max_position_embeddings", spec.rope_original_max_position);
  } else {
    scaling->invalid(
        type_key, "unsupported RoPE scaling \"" + type + "\"; supported: default, linear, dynamic, llama3");
  }
  if (!scaling->has("factor")) scaling->invalid("factor", "required for RoPE scaling \"" + type + "\"");
  spec.rope_factor = scaling->positive_number_or("factor", 1.0);
}

void read_biases(const FieldReader& config, ModelSpec& spec) {
  switch (spec.arch) {
    case Arch::Llama:
      if (config.boolean_or("mlp_bias", false))
        config.invalid("mlp_bias", "biases on the MLP are not supported");
      spec.qkv_bias = spec.o_bias = config.boolean_or("attention_bias", false);
      break;
    case Arch::InternLM:
    case Arch::InternLM2:
      // Both InternLM config classes default `bias` to true; it covers q/k/v (wqkv) and o (wo).
      spec.qkv_bias = spec.o_bias = config.boolean_or("bias", true);
      break;
    case Arch::Qwen2:
      // Qwen2 hard-codes bias on q/k/v and none on o; the config has no field for it.
      spec.qkv_bias = true;
      spec.o_bias = false;
      break;
  }
}

void read_dtype(const FieldReader& config, ModelSpec& spec) {
  // transformers 5.x renamed torch_dtype to dtype.
  const char* key = config.has("torch_dtype") ? "torch_dtype" : "dtype";
  std::optional<std::string> name = config.string(key);
  if (!name) return;
  std::optional<DType> dtype = dtype_from_torch_name(*name);
  if (!dtype || !is_float(*dtype)) {
    config.invalid(key, "expected float16, bfloat16 or float32, got \"" + *name + "\"");
  }
  spec.dtype = *dtype;
}

void read_quantization(const FieldReader& config, ModelSpec& spec) {
  std::optional<FieldReader> quant = config.object("quantization_config");
  if (!quant) return;
  std::string method = quant->required_string("quant_method");
  if (method != "awq") quant->invalid("quant_method", "unsupported \"" + method + "\"; supported: awq");
  spec.awq.enabled = true;
  spec.awq.bits = quant->positive_int_or("bits", spec.awq.bits);
  if (spec.awq.bits != 4)
    quant->invalid("bits", "only 4-bit AWQ is supported, got " + std::to_string(spec.awq.bits));
  spec.awq.group_size = quant->positive_int_or("group_size", spec.awq.group_size);
  spec.awq.zero_point = quant->boolean_or("zero_point", spec.awq.zero_point);
  std::string version = quant->string("version").value_or("gemm");
  for (char& c : version) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (version != "gemm") {
    quant->invalid("version", "only the \"gemm\" packing is supported, got \"" + version + "\"");
  }
}

void check_shapes(const FieldReader& config, ModelSpec& spec) {
  if (spec.heads % spec.kv_heads != 0) {
    fail(config.source(), ": field \"num_attention_heads\" (", spec.heads,
         ") must be a multiple of \"num_key_value_heads\" (", spec.kv_heads, ")");
  }
  if (spec.head_dim == 0) {
    if (spec.hidden % spec.heads != 0) {
      fail(config.source(), ": field \"hidden_size\" (", spec.hidden,
           ") is not divisible by \"num_attention_heads\" (", spec.heads, ") and no \"head_dim\" is given");
    }
    spec.head_dim = spec.hidden / spec.heads;
  }
  // Rotate-half RoPE pairs dimension i with i + head_dim/2.
  if (spec.head_dim % 2 != 0)
    config.invalid("head_dim", "must be even for RoPE, got " + std::to_string(spec.head_dim));
}

}  // namespace

const char* arch_name(Arch a) {
  switch (a) {
    case Arch::Llama:
      return "llama";
    case Arch::InternLM:
      return "internlm";
    case Arch::InternLM2:
      return "internlm2";
    case Arch::Qwen2:
      return "qwen2";
  }
  return "unknown";
}

std::optional<Arch> arch_from_model_type(std::string_view model_type) {
  for (Arch a : kArches) {
    if (model_type == arch_name(a)) return a;
  }
  return std::nullopt;
}

int64_t ModelSpec::param_count() const {
  const int64_t h = hidden;
  const int64_t attention = h * q_size() + 2 * h * kv_size() + int64_t(q_size()) * h +
                            (qkv_bias ? q_size() + 2 * kv_size() : 0) + (o_bias ? h : 0);
  const int64_t mlp = 3 * h * intermediate;
  const int64_t per_layer = attention + mlp + 2 * h;  // + attention and ffn norms
  const int64_t embeddings = int64_t(vocab) * h * (tie_embeddings ? 1 : 2);
  return embeddings + h + layers * per_layer;  // + final norm
}

ModelSpec parse_model_spec(const std::string& config_json, const std::string& source_name) {
  json root;
  try {
    root = json::parse(config_json);
  } catch (const json::parse_error& e) {
    fail(source_name, ": invalid JSON: ", e.what());
  }
  if (!root.is_object()) fail(source_name, ": expected a JSON object at the top level");
  FieldReader config(root, source_name);

  ModelSpec spec;
  spec.model_type = config.required_string("model_type");
  std::optional<Arch> arch = arch_from_model_type(spec.model_type);
  if (!arch) {
    config.invalid("model_type",
                   "unsupported \"" + spec.model_type + "\"; supported: " + supported_model_types());
  }
  spec.arch = *arch;
  if (spec.arch == Arch::Qwen2 && config.boolean_or("use_sliding_window", false)) {
    config.invalid("use_sliding_window", "sliding-window attention is not supported");
  }

  spec.hidden = config.positive_int("hidden_size");
  spec.intermediate = config.positive_int("intermediate_size");
  spec.layers = config.positive_int("num_hidden_layers");
  spec.heads = config.positive_int("num_attention_heads");
  spec.kv_heads = config.positive_int_or("num_key_value_heads", spec.heads);  // absent = MHA
  spec.head_dim = config.positive_int_or("head_dim", 0);
  spec.vocab = config.positive_int("vocab_size");
  spec.norm_eps = static_cast<float>(config.positive_number_or("rms_norm_eps", spec.norm_eps));
  spec.max_position = config.positive_int_or("max_position_embeddings", spec.max_position);
  spec.tie_embeddings = config.boolean_or("tie_word_embeddings", false);
  spec.bos_id = config.token_id("bos_token_id").value_or(spec.bos_id);
  spec.eos_id = config.token_id("eos_token_id").value_or(spec.eos_id);

  check_shapes(config, spec);
  read_rope(config, spec);
  read_biases(config, spec);
  read_dtype(config, spec);
  read_quantization(config, spec);
  return spec;
}

ModelSpec load_model_spec(const std::filesystem::path& model_dir) {
  const std::filesystem::path path = model_dir / "config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    if (!std::filesystem::is_directory(model_dir))
      fail("model folder ", model_dir.string(), " does not exist");
    fail(path.string(), ": cannot open (a Hugging Face model folder needs a config.json)");
  }
  std::ostringstream text;
  text << in.rdbuf();
  return parse_model_spec(text.str(), path.string());
}

}  // namespace lmd
