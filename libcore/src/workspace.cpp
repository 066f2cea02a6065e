#include "lmd/core/workspace.h"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "lmd/core/error.h"
#include "lmd/core/safetensors.h"

namespace lmd {

namespace fs = std::filesystem;

namespace {

constexpr const char* kConfigName = "config.ini";
constexpr const char* kSection = "llama";

// The workspace name of each canonical module, beside its Hugging Face Llama name.
struct ModuleName {
  const char* workspace;
  const char* hf;
};
constexpr ModuleName kLinears[] = {
    {"attention.wq", "self_attn.q_proj"}, {"attention.wk", "self_attn.k_proj"},
    {"attention.wv", "self_attn.v_proj"}, {"attention.wo", "self_attn.o_proj"},
    {"feed_forward.w1", "mlp.gate_proj"}, {"feed_forward.w3", "mlp.up_proj"},
    {"feed_forward.w2", "mlp.down_proj"},
};
constexpr ModuleName kNorms[] = {{"attention_norm", "input_layernorm"},
                                 {"ffn_norm", "post_attention_layernorm"}};
constexpr ModuleName kGlobals[] = {{"tok_embeddings.weight", "model.embed_tokens.weight"},
                                   {"norm.weight", "model.norm.weight"},
                                   {"output.weight", "lm_head.weight"}};
constexpr const char* kLinearParts[] = {"weight", "qweight", "qzeros", "scales", "bias"};

LinearWeight LayerWeights::*const kLinearMembers[] = {
    &LayerWeights::q,    &LayerWeights::k,  &LayerWeights::v,   &LayerWeights::o,
    &LayerWeights::gate, &LayerWeights::up, &LayerWeights::down};
HostTensor LayerWeights::*const kNormMembers[] = {&LayerWeights::attn_norm, &LayerWeights::ffn_norm};

// Tensor-parallel rank 0: files carry the rank as TurboMind's do, ready for split workspaces.
std::string linear_file(int layer, const char* module, const char* part) {
  return "layers." + std::to_string(layer) + "." + module + ".0." + part;
}
std::string norm_file(int layer, const char* module) {
  return "layers." + std::to_string(layer) + "." + module + ".weight";
}

// "layers.N.<rest>" -> (N, rest).
std::optional<std::pair<int, std::string>> split_layer(const std::string& name) {
  constexpr std::string_view prefix = "layers.";
  if (name.compare(0, prefix.size(), prefix) != 0) return std::nullopt;
  const size_t dot = name.find('.', prefix.size());
  if (dot == std::string::npos) return std::nullopt;
  int layer = 0;
  const char* begin = name.data() + prefix.size();
  const auto [end, ec] = std::from_chars(begin, name.data() + dot, layer);
  if (ec != std::errc() || end != name.data() + dot) return std::nullopt;
  return std::make_pair(layer, name.substr(dot + 1));
}

// The Hugging Face Llama name of a workspace file, or nullopt for files outside the model layout.
std::optional<std::string> hf_name_of(const std::string& file) {
  for (const ModuleName& g : kGlobals)
    if (file == g.workspace) return std::string(g.hf);
  const auto layer = split_layer(file);
  if (!layer) return std::nullopt;
  const std::string hf_layer = "model.layers." + std::to_string(layer->first) + ".";
  for (const ModuleName& n : kNorms)
    if (layer->second == std::string(n.workspace) + ".weight") return hf_layer + n.hf + ".weight";
  for (const ModuleName& l : kLinears)
    for (const char* part : kLinearParts)
      if (layer->second == std::string(l.workspace) + ".0." + part) return hf_layer + l.hf + "." + part;
  return std::nullopt;
}

// The one tensor of a workspace tensor file.
HostTensor read_tensor_file(const fs::path& path) {
  const SafetensorsFile file(path);
  const std::vector<std::string> names = file.names();
  if (names.size() != 1)
    fail("workspace tensor file ", path.string(), ": expected exactly one tensor, found ", names.size());
  return file.get(names[0]);
}

class WorkspaceStore : public TensorStore {
 public:
  explicit WorkspaceStore(const fs::path& dir) {
    if (!fs::is_directory(dir)) fail("workspace weights folder ", dir.string(), " does not exist");
    for (const fs::directory_entry& entry : fs::directory_iterator(dir)) {
      const std::string file = entry.path().filename().string();
      if (!entry.is_regular_file() || file == kConfigName || entry.path().extension() == ".tmp") continue;
      files_[hf_name_of(file).value_or(file)] = entry.path();
    }
  }
  std::vector<std::string> names() const override {
    std::vector<std::string> out;
    for (const auto& [name, path] : files_) out.push_back(name);
    return out;
  }
  bool contains(const std::string& name) const override { return files_.count(name) != 0; }
  HostTensor get(const std::string& name) const override {
    const auto it = files_.find(name);
    if (it == files_.end()) fail("tensor '", name, "' has no file in the workspace");
    return read_tensor_file(it->second);
  }
  std::string file_of(const std::string& name) const override {
    const auto it = files_.find(name);
    return it == files_.end() ? name : it->second.string();
  }

 private:
  std::map<std::string, fs::path> files_;
};

template <class T>
std::string number(T value) {
  char buf[64];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof buf, value);
  return std::string(buf, end);
}

const char* rope_scaling_name(RopeScaling s) {
  switch (s) {
    case RopeScaling::Linear:
      return "linear";
    case RopeScaling::Dynamic:
      return "dynamic";
    case RopeScaling::Llama3:
      return "llama3";
    case RopeScaling::None:
      break;
  }
  return "none";
}

const char* short_dtype_name(DType t) {
  switch (t) {
    case DType::F16:
      return "fp16";
    case DType::BF16:
      return "bf16";
    default:
      return "fp32";
  }
}

// The [llama] section's key/value pairs, with typed getters that name the file and field on error.
class IniSection {
 public:
  IniSection(const std::string& text, std::string source) : source_(std::move(source)) {
    std::istringstream in(text);
    std::string line, section;
    bool found = false;
    for (int lineno = 1; std::getline(in, line); ++lineno) {
      line = trim(line);
      if (line.empty() || line[0] == '#' || line[0] == ';') continue;
      if (line.front() == '[') {
        if (line.back() != ']') fail(source_, ":", lineno, ": malformed section header '", line, "'");
        section = trim(line.substr(1, line.size() - 2));
        found |= section == kSection;
        continue;
      }
      const size_t eq = line.find('=');
      if (eq == std::string::npos) fail(source_, ":", lineno, ": expected 'key = value', got '", line, "'");
      if (section == kSection) values_[trim(line.substr(0, eq))] = trim(line.substr(eq + 1));
    }
    if (!found)
      fail(source_, ": no [", kSection, "] section (is this a workspace written by `lmd convert`?)");
  }

  const std::string& text(const std::string& key) const {
    const auto it = values_.find(key);
    if (it == values_.end())
      fail(source_, ": missing field '", key, "' in [", kSection,
           "] (convert the model again with `lmd convert`)");
    return it->second;
  }
  int integer(const std::string& key) const {
    const std::string& v = text(key);
    int out = 0;
    const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
    if (ec != std::errc() || end != v.data() + v.size()) bad(key, v, "an integer");
    return out;
  }
  double real(const std::string& key) const {
    const std::string& v = text(key);
    char* end = nullptr;
    const double out = std::strtod(v.c_str(), &end);
    if (v.empty() || end != v.c_str() + v.size()) bad(key, v, "a number");
    return out;
  }
  bool boolean(const std::string& key) const {
    const std::string& v = text(key);
    if (v == "1" || v == "true" || v == "True") return true;
    if (v == "0" || v == "false" || v == "False") return false;
    bad(key, v, "0 or 1");
  }
  [[noreturn]] void bad(const std::string& key, const std::string& value, const char* expected) const {
    fail(source_, ": field '", key, "' = '", value, "' is not ", expected);
  }

 private:
  static std::string trim(const std::string& s) {
    const size_t b = s.find_first_not_of(" \t\r"), e = s.find_last_not_of(" \t\r");
    return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
  }
  std::string source_;
  std::map<std::string, std::string> values_;
};

}  // namespace

std::string format_workspace_config(const WorkspaceConfig& c) {
  const ModelSpec& s = c.spec;
  std::ostringstream o;
  auto put = [&o](const char* key, const std::string& value) { o << key << " = " << value << "\n"; };
  o << "[" << kSection << "]\n";
  put("model_name", c.model_name);
  put("chat_template", c.chat_template);
  put("model_arch", s.model_type);
  put("head_num", number(s.heads));
  put("kv_head_num", number(s.kv_heads));
  put("size_per_head", number(s.head_dim));
  put("hidden_units", number(s.hidden));
  put("vocab_size", number(s.vocab));
  put("num_layer", number(s.layers));
  put("inter_size", number(s.intermediate));
  put("norm_eps", number(s.norm_eps));
  put("rope_theta", number(s.rope_theta));
  put("rotary_embedding", number(s.head_dim));
  put("rope_scaling_type", rope_scaling_name(s.rope_scaling));
  put("rope_scaling_factor", number(s.rope_factor));
  put("rope_low_freq_factor", number(s.rope_low_freq_factor));
  put("rope_high_freq_factor", number(s.rope_high_freq_factor));
  put("rope_original_max_position_embeddings", number(s.rope_original_max_position));
  put("max_position_embeddings", number(s.max_position));
  put("data_type", short_dtype_name(s.dtype));
  put("weight_type", s.awq.enabled ? "int4" : short_dtype_name(s.dtype));
  put("group_size", number(s.awq.enabled ? s.awq.group_size : 0));
  put("tie_word_embeddings", number(int(s.tie_embeddings)));
  put("qkv_bias", number(int(s.qkv_bias)));
  put("o_bias", number(int(s.o_bias)));
  put("bos_id", number(s.bos_id));
  put("eos_id", number(s.eos_id));
  put("tensor_para_size", number(c.tensor_para_size));
  put("session_len", number(c.engine.session_len));
  put("quant_policy", number(c.engine.quant_policy));
  put("static_kv_int8", number(int(c.engine.static_kv_int8)));
  put("cache_max_entry_count", number(c.engine.cache_max_entry_count));
  put("cache_block_seq_len", number(c.engine.cache_block_seq_len));
  put("max_batch_size", number(c.engine.max_batch_size));
  return o.str();
}

WorkspaceConfig parse_workspace_config(const std::string& ini_text, const std::string& source) {
  const IniSection ini(ini_text, source);
  WorkspaceConfig c;
  ModelSpec& s = c.spec;
  c.model_name = ini.text("model_name");
  c.chat_template = ini.text("chat_template");
  s.model_type = ini.text("model_arch");
  const std::optional<Arch> arch = arch_from_model_type(s.model_type);
  if (!arch)
    ini.bad("model_arch", s.model_type, "a supported architecture (llama, internlm, internlm2, qwen2)");
  s.arch = *arch;
  s.heads = ini.integer("head_num");
  s.kv_heads = ini.integer("kv_head_num");
  s.head_dim = ini.integer("size_per_head");
  s.hidden = ini.integer("hidden_units");
  s.vocab = ini.integer("vocab_size");
  s.layers = ini.integer("num_layer");
  s.intermediate = ini.integer("inter_size");
  s.norm_eps = float(ini.real("norm_eps"));
  s.rope_theta = ini.real("rope_theta");
  if (ini.integer("rotary_embedding") != s.head_dim)
    ini.bad("rotary_embedding", ini.text("rotary_embedding"),
            "size_per_head (partial rotary is not supported)");
  const std::string& scaling = ini.text("rope_scaling_type");
  if (scaling == "none") {
    s.rope_scaling = RopeScaling::None;
  } else if (scaling == "linear") {
    s.rope_scaling = RopeScaling::Linear;
  } else if (scaling == "dynamic") {
    s.rope_scaling = RopeScaling::Dynamic;
  } else if (scaling == "llama3") {
    s.rope_scaling = RopeScaling::Llama3;
  } else {
    ini.bad("rope_scaling_type", scaling, "none, linear, dynamic or llama3");
  }
  s.rope_factor = ini.real("rope_scaling_factor");
  s.rope_low_freq_factor = ini.real("rope_low_freq_factor");
  s.rope_high_freq_factor = ini.real("rope_high_freq_factor");
  s.rope_original_max_position = ini.integer("rope_original_max_position_embeddings");
  s.max_position = ini.integer("max_position_embeddings");
  const std::optional<DType> dtype = dtype_from_torch_name(ini.text("data_type"));
  if (!dtype || !is_float(*dtype)) ini.bad("data_type", ini.text("data_type"), "fp16, bf16 or fp32");
  s.dtype = *dtype;
  const std::string& weight_type = ini.text("weight_type");
  s.awq.enabled = weight_type == "int4";
  if (!s.awq.enabled && weight_type != ini.text("data_type"))
    ini.bad("weight_type", weight_type, "int4 or the data_type");
  if (s.awq.enabled) {
    s.awq.group_size = ini.integer("group_size");
    if (s.awq.group_size <= 0) ini.bad("group_size", ini.text("group_size"), "a positive group size");
  }
  s.tie_embeddings = ini.boolean("tie_word_embeddings");
  s.qkv_bias = ini.boolean("qkv_bias");
  s.o_bias = ini.boolean("o_bias");
  s.bos_id = ini.integer("bos_id");
  s.eos_id = ini.integer("eos_id");
  for (const auto& [key, value] : {std::pair{"head_num", s.heads},
                                   {"kv_head_num", s.kv_heads},
                                   {"size_per_head", s.head_dim},
                                   {"hidden_units", s.hidden},
                                   {"vocab_size", s.vocab},
                                   {"num_layer", s.layers},
                                   {"inter_size", s.intermediate}})
    if (value <= 0) ini.bad(key, std::to_string(value), "positive");
  if (s.heads % s.kv_heads != 0) ini.bad("kv_head_num", ini.text("kv_head_num"), "a divisor of head_num");

  c.tensor_para_size = ini.integer("tensor_para_size");
  WorkspaceEngineDefaults& e = c.engine;
  e.session_len = ini.integer("session_len");
  e.quant_policy = ini.integer("quant_policy");
  if (e.quant_policy != 0 && e.quant_policy != 4 && e.quant_policy != 8)
    ini.bad("quant_policy", ini.text("quant_policy"), "0, 4 or 8");
  e.static_kv_int8 = ini.boolean("static_kv_int8");
  e.cache_max_entry_count = ini.real("cache_max_entry_count");
  e.cache_block_seq_len = ini.integer("cache_block_seq_len");
  e.max_batch_size = ini.integer("max_batch_size");
  return c;
}

std::optional<fs::path> find_workspace_weights(const fs::path& path) {
  for (const fs::path& dir : {path / "triton_models" / "weights", path / "weights", path})
    if (fs::is_regular_file(dir / kConfigName)) return dir;
  return std::nullopt;
}

fs::path workspace_tokenizer_dir(const fs::path& weights_dir) {
  return weights_dir.parent_path() / "tokenizer";
}

WorkspaceConfig read_workspace_config(const fs::path& weights_dir) {
  const fs::path path = weights_dir / kConfigName;
  std::ifstream in(path);
  if (!in) fail("cannot read workspace config ", path.string());
  std::ostringstream text;
  text << in.rdbuf();
  return parse_workspace_config(text.str(), path.string());
}

void write_workspace_config(const fs::path& weights_dir, const WorkspaceConfig& config) {
  const fs::path path = weights_dir / kConfigName, tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp);
    out << format_workspace_config(config);
    if (!out.flush()) fail("cannot write ", tmp.string());
  }
  fs::rename(tmp, path);
}

void write_workspace_tensor(const fs::path& weights_dir, const std::string& name, const HostTensor& tensor) {
  write_safetensors(weights_dir / name, {{name, tensor}});
}

void write_workspace_weights(const fs::path& dir, const CheckpointWeights& w, const ModelSpec& spec,
                             const std::function<void(int, int)>& progress) {
  write_workspace_tensor(dir, kGlobals[0].workspace, w.embed);
  write_workspace_tensor(dir, kGlobals[1].workspace, w.final_norm);
  if (!spec.tie_embeddings) write_workspace_tensor(dir, kGlobals[2].workspace, w.lm_head);
  for (int l = 0; l < spec.layers; ++l) {
    const LayerWeights& layer = w.layers.at(l);
    for (size_t i = 0; i < std::size(kNorms); ++i)
      write_workspace_tensor(dir, norm_file(l, kNorms[i].workspace), layer.*kNormMembers[i]);
    for (size_t i = 0; i < std::size(kLinears); ++i) {
      const LinearWeight& lin = layer.*kLinearMembers[i];
      const HostTensor* parts[] = {&lin.weight, &lin.qweight, &lin.qzeros, &lin.scales, &lin.bias};
      for (size_t p = 0; p < std::size(kLinearParts); ++p)
        if (!parts[p]->empty())
          write_workspace_tensor(dir, linear_file(l, kLinears[i].workspace, kLinearParts[p]), *parts[p]);
    }
    if (progress) progress(l + 1, spec.layers);
  }
}

std::unique_ptr<TensorStore> open_workspace_store(const fs::path& weights_dir) {
  return std::make_unique<WorkspaceStore>(weights_dir);
}

CheckpointWeights load_workspace_weights(const fs::path& dir, const ModelSpec& spec) {
  auto require = [&](const std::string& file) {
    if (!fs::exists(dir / file))
      fail("workspace ", dir.string(), ": tensor file '", file,
           "' is missing (the workspace is incomplete; convert the model again with `lmd convert`)");
  };
  require(kGlobals[0].workspace);
  require(kGlobals[1].workspace);
  if (!spec.tie_embeddings) require(kGlobals[2].workspace);
  for (int l = 0; l < spec.layers; ++l) {
    for (const ModuleName& n : kNorms) require(norm_file(l, n.workspace));
    for (size_t i = 0; i < std::size(kLinears); ++i) {
      const char* module = kLinears[i].workspace;
      const bool awq = spec.awq.enabled && !fs::exists(dir / linear_file(l, module, "weight"));
      for (const char* part :
           awq ? std::vector<const char*>{"qweight", "qzeros", "scales"} : std::vector<const char*>{"weight"})
        require(linear_file(l, module, part));
      const bool is_o = kLinearMembers[i] == &LayerWeights::o;
      const bool is_qkv = i < 3;
      if ((is_qkv && spec.qkv_bias) || (is_o && spec.o_bias)) require(linear_file(l, module, "bias"));
    }
  }
  // The tensors are stored in the canonical (Llama) layout whatever the model's architecture.
  ModelSpec canonical = spec;
  canonical.arch = Arch::Llama;
  return map_checkpoint(open_workspace_store(dir), canonical, dir);
}

std::string kv_scale_tensor_name(int layer, int rank) {
  return "layers." + std::to_string(layer) + ".past_kv_scale." + std::to_string(rank) + ".weight";
}

std::vector<float> read_static_kv_params(const fs::path& dir, int layers) {
  std::vector<float> params;
  for (int l = 0; l < layers; ++l) {
    const fs::path path = dir / kv_scale_tensor_name(l, 0);
    if (!fs::exists(path))
      fail("workspace ", dir.string(), ": config.ini sets static_kv_int8 = 1 but '", path.filename().string(),
           "' is missing (run `lmd lite kv_qparams` again)");
    const HostTensor t = read_tensor_file(path);
    if (t.dtype() != DType::F32 || t.shape() != Shape{4})
      fail("workspace tensor file ", path.string(),
           ": expected F32 [4] (k_scale, k_zero, v_scale, v_zero), got ", dtype_name(t.dtype()), " ",
           shape_str(t.shape()));
    const float* v = t.data_as<float>();
    if (!(v[0] > 0) || !(v[2] > 0))
      fail("workspace tensor file ", path.string(), ": scales must be positive, got k_scale ", v[0],
           ", v_scale ", v[2]);
    params.insert(params.end(), v, v + 4);
  }
  return params;
}

}  // namespace lmd
