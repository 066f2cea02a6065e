// The ops the model forward pass is written against (BRIEF §2). Each backend (CPU reference, CUDA)
// implements them; fusions are ops of their own. Shapes are noted as [rows, cols]; "tokens" is the
// number of new tokens in one forward step across all sequences of the batch.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lmd/core/checkpoint.h"
#include "lmd/core/dtype.h"
#include "lmd/core/tensor.h"
#include "lmd/engine/rope.h"
#include "lmd/engine/sampler.h"

namespace lmd {

enum class DeviceKind { CPU, CUDA };

// A tensor in a backend's memory; `storage` owns it (freed through the backend's allocator).
struct DeviceTensor {
  std::shared_ptr<void> storage;
  void* data = nullptr;
  DType dtype = DType::F32;
  Shape shape;

  bool empty() const { return data == nullptr; }
  int64_t numel() const { return shape_numel(shape); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  int64_t dim(int i) const { return shape.at(i < 0 ? shape.size() + i : i); }
  template <class T>
  T* as() const {
    return static_cast<T*>(data);
  }
};

// A linear layer's weights after the backend prepared them (dense [out, in], or int4 in whatever
// order the backend's kernels read fastest), with an optional bias [out].
struct DeviceLinear {
  DeviceTensor weight;
  DeviceTensor qweight, qzeros, scales;
  DeviceTensor bias;
  int64_t in_features = 0, out_features = 0;
  int group_size = 0;
  bool is_int4() const { return !qweight.empty(); }
};

// Online KV-cache quantization (BRIEF §5): 0 = cache in the activation dtype, 8 = int8, 4 = int4.
// Static int8 (offline `lite kv_qparams` parameters): quant_bits 8 and `static_params` holding 4 floats
// per layer, [k_scale, k_zero, v_scale, v_zero]; the cache then has no per-row params.
struct KvCacheLayout {
  int layers = 0, kv_heads = 0, head_dim = 0;
  int block_len = 64;
  int num_blocks = 0;
  int quant_bits = 0;
  std::vector<float> static_params;
  bool is_static() const { return !static_params.empty(); }
};

// The KV block pool's memory. Each block holds, for every layer, K and V of `block_len` tokens:
// data [num_blocks, layers, 2, kv_heads, block_len, head_dim] (quantized: uint8, int4 packed two per
// byte), and when quantized online, params [num_blocks, layers, 2, kv_heads, block_len, 2] fp16
// (scale, zero).
struct KvCacheStorage {
  KvCacheLayout layout;
  DeviceTensor data;
  DeviceTensor params;
};

// One sequence's part of a forward step: `num_new` tokens starting at row `token_offset` of the step's
// token arrays, appended after `context_len` tokens already in the cache. `blocks` cover
// context_len + num_new tokens.
struct SeqSlice {
  int token_offset = 0;
  int num_new = 0;
  int context_len = 0;
  std::vector<int> blocks;
};

struct BatchLayout {
  std::vector<SeqSlice> seqs;
  int num_tokens() const { return seqs.empty() ? 0 : seqs.back().token_offset + seqs.back().num_new; }
};

// Whether `dst` can take a copy of `t` in place: an owned host tensor of t's dtype and shape.
inline bool reusable_for(const HostTensor& dst, const DeviceTensor& t) {
  return !dst.empty() && dst.writable() && dst.dtype() == t.dtype && dst.shape() == t.shape;
}

class Backend {
 public:
  virtual ~Backend() = default;
  virtual DeviceKind kind() const = 0;
  virtual std::string name() const = 0;
  // dtype of activations for a model stored in `weight_dtype` (CPU: fp32; CUDA: fp16/bf16).
  virtual DType activation_dtype(DType weight_dtype) const = 0;

  virtual DeviceTensor alloc(DType dtype, Shape shape) = 0;
  // Copies a host tensor to the backend, converted to `dtype`.
  virtual DeviceTensor upload(const HostTensor& host, DType dtype) = 0;
  virtual HostTensor download(const DeviceTensor& t) = 0;
  // t's contents into `dst`, in dst's own buffer when reusable_for(dst, t): passes that download tensors
  // of one shape over and over (auto_awq's activation statistics: 512 downloads, 7.2 GB, per InternLM2-1.8B
  // layer) then skip allocating, zero-filling and page-faulting a fresh buffer each time (on the host
  // alone, 3.1 s against 0.5 s for that layer's copies). Otherwise dst becomes download(t).
  virtual void download_into(const DeviceTensor& t, HostTensor& dst) { dst = download(t); }
  // Prepares a linear layer's weights; `compute` is the activation dtype.
  virtual DeviceLinear prepare_linear(const LinearWeight& w, DType compute) = 0;
  virtual KvCacheStorage alloc_kv_cache(const KvCacheLayout& layout, DType compute) = 0;
  // Bytes the backend could still allocate (for sizing the KV pool); CPU reports system memory.
  virtual size_t free_memory() const = 0;
  virtual void synchronize() {}

  // out[t] = table[ids[t]]; ids int32 [tokens] (host memory), table [vocab, hidden], out [tokens, hidden].
  virtual void embedding(const DeviceTensor& table, const std::vector<int>& ids, DeviceTensor& out) = 0;
  // out = x / rms(x) * weight, per row.
  virtual void rmsnorm(const DeviceTensor& x, const DeviceTensor& weight, float eps, DeviceTensor& out) = 0;
  // residual += x; out = rmsnorm(residual) * weight (the pre-norm block boundary, fused).
  virtual void add_rmsnorm(DeviceTensor& residual, const DeviceTensor& x, const DeviceTensor& weight,
                           float eps, DeviceTensor& out) = 0;
  // out [tokens, out] = x [tokens, in] * W^T + bias. `out` is in the activation dtype, or fp32 (logits).
  virtual void linear(const DeviceTensor& x, const DeviceLinear& w, DeviceTensor& out) = 0;
  // qkv [tokens, (heads + 2*kv_heads) * head_dim]: rotates q and k in place (HF rotate-half), and
  // writes k and v of every new token into the cache at its position (quantizing when the cache is).
  virtual void rope_kv_write(DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                             const RopeConfig& rope, KvCacheStorage& cache) = 0;
  // Causal grouped-query attention of the new tokens' queries (read from qkv) over each sequence's
  // cache (context + new tokens, already written); out [tokens, heads * head_dim].
  virtual void attention(const DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                         const KvCacheStorage& cache, DeviceTensor& out) = 0;
  // out [tokens, inter] = silu(gate_up[:, :inter]) * gate_up[:, inter:].
  virtual void silu_mul(const DeviceTensor& gate_up, DeviceTensor& out) = 0;
  // Fusions of the decode step: an op done by the kernel of the op after it where the backend has one
  // (CUDA, a few rows), which saves a kernel and a round trip through memory per call. The defaults run
  // the two ops, through `normed` / `act`; a fused kernel may leave those unwritten.
  //   add_rmsnorm_linear: residual += x; out = linear(rmsnorm(residual) * weight, w).
  //   silu_mul_linear: out = linear(silu_mul(gate_up), w).
  //   rope_kv_attention: rope_kv_write, then attention (a fused kernel may leave qkv's queries unrotated).
  virtual void add_rmsnorm_linear(DeviceTensor& residual, const DeviceTensor& x, const DeviceTensor& weight,
                                  float eps, const DeviceLinear& w, DeviceTensor& normed, DeviceTensor& out);
  virtual void silu_mul_linear(const DeviceTensor& gate_up, const DeviceLinear& w, DeviceTensor& act,
                               DeviceTensor& out);
  virtual void rope_kv_attention(DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                                 const RopeConfig& rope, KvCacheStorage& cache, DeviceTensor& out);
  // out [rows.size(), cols] = x[rows].
  virtual void gather_rows(const DeviceTensor& x, const std::vector<int>& rows, DeviceTensor& out) = 0;
  // Greedy choice per row of fp32 logits [rows, vocab]: out fp32 [rows, 2] = (token, its log-probability
  // under the row's softmax); the lowest id wins a tie (as std::max_element). The token is stored as a
  // float, exact for vocabularies below 2^24.
  virtual void greedy(const DeviceTensor& logits, DeviceTensor& out) = 0;
  // The sampler's choice per row of fp32 logits [rows, vocab]: row r is chosen as choose_token(logits[r],
  // rows[r]) does (sampler.h: penalties, temperature, top-k, top-p, min-p, the draw `rows[r].uniform`), so
  // every backend picks the same ids from the same logits. out fp32 [rows, 2] = (token, its log-probability
  // under the row's unpenalised softmax), the token stored as in greedy(). Not part of a graph step (the
  // penalty lists change size every step): call it after end_graph_step.
  virtual void sample(const DeviceTensor& logits, const std::vector<SampleRow>& rows, DeviceTensor& out) = 0;

  // CUDA graphs for decode steps (a plan/run split). Model::forward brackets a step in which every
  // sequence adds one token with begin_graph_step / end_graph_step. A backend that returns true records
  // the launches of the ops in between into a graph keyed by the step's shape and replays that graph on
  // later steps of the same shape: there the ops only plan (check arguments, stage their per-step
  // metadata), and end_graph_step uploads the metadata and launches the graph. Tensors allocated inside
  // the bracket live in memory the graph owns: results must be read before the next step of that shape.
  // end_graph_step(false) abandons the step (an op threw). end_graph_step(true) returns false when the
  // step's work was not queued (its capture failed): the caller runs the step again, and the backend runs
  // steps of that shape eagerly from then on. The default: no graphs, ops run as called.
  virtual bool begin_graph_step(const BatchLayout&) { return false; }
  virtual bool end_graph_step(bool /*launch*/) { return true; }
};

}  // namespace lmd
