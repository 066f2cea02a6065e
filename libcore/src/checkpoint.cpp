// Tensor names per architecture -> one canonical layout. Dense tensors stay views into the store's
// memory; only InternLM2's fused wqkv is copied, because its q, k and v rows interleave per KV head.
#include "lmd/core/checkpoint.h"

#include <array>
#include <cstring>

#include "lmd/core/error.h"

namespace lmd {

int64_t LinearWeight::out_features() const { return is_awq() ? scales.dim(1) : weight.dim(0); }
int64_t LinearWeight::in_features() const { return is_awq() ? qweight.dim(0) : weight.dim(1); }

namespace {

// Splits a fused tensor along `axis`, whose entries are grouped per KV head as InternLM2 stores wqkv
// (BRIEF §3): for each of kv_heads groups, heads/kv_heads query heads, then one key head, then one
// value head, each `head_units` entries long. Returns owned {q, k, v} with the fused tensor's dtype.
std::array<HostTensor, 3> split_grouped_qkv(const HostTensor& fused, int axis, int64_t head_units, int heads,
                                            int kv_heads) {
  const int64_t q_per_group = heads / kv_heads;
  int64_t outer = 1, inner_bytes = static_cast<int64_t>(dtype_size(fused.dtype()));
  for (int d = 0; d < axis; ++d) outer *= fused.dim(d);
  for (int d = axis + 1; d < fused.ndim(); ++d) inner_bytes *= fused.dim(d);

  const int64_t units[3] = {heads * head_units, kv_heads * head_units, kv_heads * head_units};
  std::array<HostTensor, 3> parts;
  std::array<char*, 3> out;
  for (int p = 0; p < 3; ++p) {
    Shape shape = fused.shape();
    shape[axis] = units[p];
    parts[p] = HostTensor(fused.dtype(), shape);
    out[p] = parts[p].mutable_data_as<char>();
  }
  // Bytes per group of each part, and per group of the fused axis.
  const int64_t q_bytes = q_per_group * head_units * inner_bytes, kv_bytes = head_units * inner_bytes;
  const char* src = fused.data_as<char>();
  for (int64_t o = 0; o < outer; ++o) {
    for (int g = 0; g < kv_heads; ++g) {
      std::memcpy(out[0], src, q_bytes);
      std::memcpy(out[1], src + q_bytes, kv_bytes);
      std::memcpy(out[2], src + q_bytes + kv_bytes, kv_bytes);
      src += q_bytes + 2 * kv_bytes;
      out[0] += q_bytes;
      out[1] += kv_bytes;
      out[2] += kv_bytes;
    }
  }
  return parts;
}

// Fetches tensors from the store, checking presence, dtype and shape; errors name the tensor, the file
// (or the model folder when missing) and what was expected.
class Mapper {
 public:
  Mapper(const TensorStore& store, const ModelSpec& spec, std::string folder)
      : store_(store), spec_(spec), folder_(std::move(folder)) {}

  HostTensor dense(const std::string& name, const Shape& expected) const {
    HostTensor t = fetch(name);
    if (!is_float(t.dtype())) {
      fail("tensor \"", name, "\" in ", store_.file_of(name), ": dtype ", dtype_name(t.dtype()),
           " is not supported for a dense weight (expected F32, F16 or BF16)");
    }
    check_shape(name, t, expected);
    return t;
  }

  HostTensor typed(const std::string& name, const Shape& expected, DType dtype) const {
    HostTensor t = fetch(name);
    if (t.dtype() != dtype) {
      fail("tensor \"", name, "\" in ", store_.file_of(name), ": expected dtype ", dtype_name(dtype),
           ", got ", dtype_name(t.dtype()));
    }
    check_shape(name, t, expected);
    return t;
  }

  // `prefix` is the module path ("model.layers.0.self_attn.q_proj"). With AWQ, a linear left in
  // 16 bits (AutoAWQ's modules_to_not_convert) still has a plain `.weight`, so it loads dense.
  LinearWeight linear(const std::string& prefix, int64_t out, int64_t in, bool has_bias) const {
    LinearWeight lw;
    if (spec_.awq.enabled && (store_.contains(prefix + ".qweight") || !store_.contains(prefix + ".weight"))) {
      check_awq_dims(prefix, out, in);
      const int64_t pack = 32 / spec_.awq.bits, groups = in / spec_.awq.group_size;
      lw.qweight = typed(prefix + ".qweight", {in, out / pack}, DType::I32);
      lw.qzeros = typed(prefix + ".qzeros", {groups, out / pack}, DType::I32);
      lw.scales = dense(prefix + ".scales", {groups, out});
    } else {
      lw.weight = dense(prefix + ".weight", {out, in});
    }
    if (has_bias) lw.bias = dense(prefix + ".bias", {out});
    return lw;
  }

  // InternLM2's fused wqkv -> q, k, v. Dense weights ([out, in]) and biases split their rows. AWQ tensors
  // have `out` as columns: scales split columns of head_dim, qweight/qzeros columns of head_dim/8 int32
  // (8 output columns are packed per int32, so a head boundary is a whole int32 column whenever
  // head_dim is a multiple of 8; the nibble order inside an int32 stays intact).
  std::array<LinearWeight, 3> fused_qkv(const std::string& prefix) const {
    const int64_t in = spec_.hidden, fused_out = spec_.q_size() + 2 * spec_.kv_size();
    const int64_t head_dim = spec_.head_dim;
    const int heads = spec_.heads, kv_heads = spec_.kv_heads;
    LinearWeight fused = linear(prefix, fused_out, in, spec_.qkv_bias);
    std::array<LinearWeight, 3> qkv;
    auto assign = [&qkv](HostTensor LinearWeight::*member, std::array<HostTensor, 3> parts) {
      for (int p = 0; p < 3; ++p) qkv[p].*member = std::move(parts[p]);
    };
    if (fused.is_awq()) {
      const int64_t pack = 32 / spec_.awq.bits;
      if (head_dim % pack != 0) {
        fail("tensor \"", prefix, ".qweight\" in ", store_.file_of(prefix + ".qweight"), ": head_dim ",
             head_dim, " is not a multiple of ", pack,
             ", so q/k/v cannot be split on whole packed int32 columns");
      }
      assign(&LinearWeight::qweight, split_grouped_qkv(fused.qweight, 1, head_dim / pack, heads, kv_heads));
      assign(&LinearWeight::qzeros, split_grouped_qkv(fused.qzeros, 1, head_dim / pack, heads, kv_heads));
      assign(&LinearWeight::scales, split_grouped_qkv(fused.scales, 1, head_dim, heads, kv_heads));
    } else {
      assign(&LinearWeight::weight, split_grouped_qkv(fused.weight, 0, head_dim, heads, kv_heads));
    }
    if (!fused.bias.empty())
      assign(&LinearWeight::bias, split_grouped_qkv(fused.bias, 0, head_dim, heads, kv_heads));
    return qkv;
  }

 private:
  HostTensor fetch(const std::string& name) const {
    if (!store_.contains(name)) {
      fail("tensor \"", name, "\" not found in the checkpoint in ", folder_, " (expected for model_type \"",
           spec_.model_type, "\"", spec_.awq.enabled ? " with AWQ quantization" : "", ")");
    }
    return store_.get(name);
  }

  void check_shape(const std::string& name, const HostTensor& t, const Shape& expected) const {
    if (t.shape() != expected) {
      fail("tensor \"", name, "\" in ", store_.file_of(name), ": expected shape ", shape_str(expected),
           ", got ", shape_str(t.shape()));
    }
  }

  void check_awq_dims(const std::string& prefix, int64_t out, int64_t in) const {
    const int64_t pack = 32 / spec_.awq.bits;
    if (out % pack != 0) {
      fail("AWQ linear \"", prefix, "\" in ", folder_, ": ", out, " output features are not a multiple of ",
           pack, " (values packed per int32)");
    }
    if (in % spec_.awq.group_size != 0) {
      fail("AWQ linear \"", prefix, "\" in ", folder_, ": ", in,
           " input features are not a multiple of group_size ", spec_.awq.group_size);
    }
  }

  const TensorStore& store_;
  const ModelSpec& spec_;
  std::string folder_;
};

LayerWeights map_layer(const Mapper& m, const ModelSpec& spec, int index) {
  const std::string layer = "model.layers." + std::to_string(index) + ".";
  const int64_t hidden = spec.hidden, q = spec.q_size(), kv = spec.kv_size(), inter = spec.intermediate;
  LayerWeights w;
  if (spec.arch == Arch::InternLM2) {
    auto qkv = m.fused_qkv(layer + "attention.wqkv");
    w.q = std::move(qkv[0]);
    w.k = std::move(qkv[1]);
    w.v = std::move(qkv[2]);
    w.o = m.linear(layer + "attention.wo", hidden, q, spec.o_bias);
    w.gate = m.linear(layer + "feed_forward.w1", inter, hidden, false);
    w.up = m.linear(layer + "feed_forward.w3", inter, hidden, false);
    w.down = m.linear(layer + "feed_forward.w2", hidden, inter, false);
    w.attn_norm = m.dense(layer + "attention_norm.weight", {hidden});
    w.ffn_norm = m.dense(layer + "ffn_norm.weight", {hidden});
    return w;
  }
  // Llama, Qwen2 and InternLM v1 share names; they differ only in which biases exist.
  w.q = m.linear(layer + "self_attn.q_proj", q, hidden, spec.qkv_bias);
  w.k = m.linear(layer + "self_attn.k_proj", kv, hidden, spec.qkv_bias);
  w.v = m.linear(layer + "self_attn.v_proj", kv, hidden, spec.qkv_bias);
  w.o = m.linear(layer + "self_attn.o_proj", hidden, q, spec.o_bias);
  w.gate = m.linear(layer + "mlp.gate_proj", inter, hidden, false);
  w.up = m.linear(layer + "mlp.up_proj", inter, hidden, false);
  w.down = m.linear(layer + "mlp.down_proj", hidden, inter, false);
  w.attn_norm = m.dense(layer + "input_layernorm.weight", {hidden});
  w.ffn_norm = m.dense(layer + "post_attention_layernorm.weight", {hidden});
  return w;
}

// For messages about missing tensors when the caller did not say where the checkpoint lives.
std::string folder_of(const TensorStore& store) {
  std::vector<std::string> names = store.names();
  if (names.empty()) return "an empty checkpoint";
  return std::filesystem::path(store.file_of(names.front())).parent_path().string();
}

}  // namespace

CheckpointWeights map_checkpoint(std::shared_ptr<TensorStore> store, const ModelSpec& spec,
                                 const std::filesystem::path& model_dir) {
  const Mapper m(*store, spec, model_dir.empty() ? folder_of(*store) : model_dir.string());
  const bool internlm2 = spec.arch == Arch::InternLM2;
  const Shape vocab_by_hidden = {spec.vocab, spec.hidden};

  CheckpointWeights weights;
  weights.embed =
      m.dense(internlm2 ? "model.tok_embeddings.weight" : "model.embed_tokens.weight", vocab_by_hidden);
  weights.final_norm = m.dense("model.norm.weight", {spec.hidden});
  // Tied checkpoints sometimes still carry a copy of the head; like transformers, ignore it.
  weights.lm_head = spec.tie_embeddings
                        ? weights.embed
                        : m.dense(internlm2 ? "output.weight" : "lm_head.weight", vocab_by_hidden);
  weights.layers.reserve(spec.layers);
  for (int i = 0; i < spec.layers; ++i) weights.layers.push_back(map_layer(m, spec, i));
  weights.store = std::move(store);
  return weights;
}

CheckpointWeights load_checkpoint(const std::filesystem::path& model_dir, const ModelSpec& spec) {
  return map_checkpoint(open_tensor_store(model_dir), spec, model_dir);
}

}  // namespace lmd
