// The CUDA backend: the ops of lmd/engine/backend.h as CUDA kernels plus cuBLAS GEMMs, on one device and
// one stream. Activations are fp16 for fp16 and fp32 checkpoints and bf16 for bf16 ones; the kernels also
// accept fp32 tensors (tests use that to separate kernel errors from fp16 rounding).
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lmd/engine/backend.h"

namespace lmd::cuda {
struct GemvPrologue;
struct DecodeRope;
}  // namespace lmd::cuda

namespace lmd {

// True when a CUDA driver and at least one device are present; never throws.
bool cuda_device_available();
// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)", or "" without a device.
std::string cuda_device_name(int device = 0);
// Whether decode attention over this cache runs the register-resident kernel (version 2) rather than
// the shared-memory tile kernel; tests use it to know which path they cover.
bool cuda_decode_attention_v2(DType activation, const KvCacheLayout& layout);
// Whether prompt tokens (steps of more than one new token) over this cache with `heads` query heads run
// the tensor-core prefill kernel (version 3) rather than the shared-memory tile kernel.
bool cuda_prefill_attention_v3(DType activation, const KvCacheLayout& layout, int heads);

// The decode-step fusions, as bit flags: add+RMSNorm and SiLU*mul done by the GEMV after them, RoPE and
// the K/V write done by the decode attention.
enum FusedOps : unsigned { kFuseNone = 0, kFuseNorm = 1, kFuseSwiglu = 2, kFuseRope = 4, kFuseAll = 7 };
// The fusions an LMD_FUSED_OPS value names: "0" (or null, or empty) none, "1" or "all" every one, else a
// comma-separated list of norm, swiglu and rope. Anything else is an error naming the variable.
unsigned parse_fused_ops(const char* value);

struct CudaState;

class CudaBackend final : public Backend {
 public:
  // `activation` overrides the activation dtype chosen from the checkpoint's dtype.
  explicit CudaBackend(int device = 0, std::optional<DType> activation = std::nullopt);
  ~CudaBackend() override;

  DeviceKind kind() const override { return DeviceKind::CUDA; }
  std::string name() const override;
  DType activation_dtype(DType weight_dtype) const override;

  DeviceTensor alloc(DType dtype, Shape shape) override;
  DeviceTensor upload(const HostTensor& host, DType dtype) override;
  HostTensor download(const DeviceTensor& t) override;
  void download_into(const DeviceTensor& t, HostTensor& dst) override;
  DeviceLinear prepare_linear(const LinearWeight& w, DType compute) override;
  KvCacheStorage alloc_kv_cache(const KvCacheLayout& layout, DType compute) override;
  size_t free_memory() const override;
  void synchronize() override;

  void embedding(const DeviceTensor& table, const std::vector<int>& ids, DeviceTensor& out) override;
  void rmsnorm(const DeviceTensor& x, const DeviceTensor& weight, float eps, DeviceTensor& out) override;
  void add_rmsnorm(DeviceTensor& residual, const DeviceTensor& x, const DeviceTensor& weight, float eps,
                   DeviceTensor& out) override;
  void linear(const DeviceTensor& x, const DeviceLinear& w, DeviceTensor& out) override;
  void rope_kv_write(DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                     const RopeConfig& rope, KvCacheStorage& cache) override;
  void attention(const DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                 const KvCacheStorage& cache, DeviceTensor& out) override;
  void silu_mul(const DeviceTensor& gate_up, DeviceTensor& out) override;
  // A few rows (batch-1/2 decode): one GEMV kernel whose blocks do the element-wise op themselves
  // (cuda/src/gemv_input.cuh); otherwise the two ops.
  void add_rmsnorm_linear(DeviceTensor& residual, const DeviceTensor& x, const DeviceTensor& weight,
                          float eps, const DeviceLinear& w, DeviceTensor& normed, DeviceTensor& out) override;
  void silu_mul_linear(const DeviceTensor& gate_up, const DeviceLinear& w, DeviceTensor& act,
                       DeviceTensor& out) override;
  // Decode steps over a 16-bit cache: the decode attention kernel rotates q and k and writes the new K/V
  // itself; otherwise rope_kv_write, then attention.
  void rope_kv_attention(DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                         const RopeConfig& rope, KvCacheStorage& cache, DeviceTensor& out) override;
  void gather_rows(const DeviceTensor& x, const std::vector<int>& rows, DeviceTensor& out) override;
  void greedy(const DeviceTensor& logits, DeviceTensor& out) override;
  void sample(const DeviceTensor& logits, const std::vector<SampleRow>& rows, DeviceTensor& out) override;
  bool begin_graph_step(const BatchLayout& batch) override;
  bool end_graph_step(bool launch) override;

  // The stream every op is queued on (for timing with events and graph capture).
  void* stream() const;
  // int4 linears of at least `rows` rows dequantize to a dense weight and use cuBLAS, fewer run the
  // tensor-core GEMV (64 rows a launch). The default is the measured crossover; tests and benchmarks
  // force each path with this.
  void set_w4a16_dense_from(int rows);
  // int4 linears of 1-8 rows run the streaming GEMV (a persistent grid with its weights in flight through
  // a shared-memory ring) instead of version 5 (default: LMD_W4A16_STREAM=1 in the environment). A change
  // drops the decode-step graphs captured so far.
  void set_w4a16_stream(bool on);
  // Which of add_rmsnorm_linear (kFuseNorm), silu_mul_linear (kFuseSwiglu) and rope_kv_attention
  // (kFuseRope) run as one fused kernel where one takes them (default: LMD_FUSED_OPS in the environment,
  // parse_fused_ops); the others run as their two ops. Tests and benchmarks set each way. A change drops
  // the decode-step graphs captured so far.
  void set_fused_ops(unsigned ops);
  void set_fused_ops(bool) = delete;  // true would read as kFuseNorm alone
  // 16-bit dense linears of at most `rows` rows (default 1, capped at 4) run the warp-per-output GEMV,
  // larger ones cuBLAS; 0 forces cuBLAS everywhere (tests and benchmarks compare the two).
  void set_dense_gemv_max_rows(int rows);
  // Those GEMVs over a multiple of 256 inputs run the streaming version (a persistent grid with its weights
  // in flight through a shared-memory ring; default on, LMD_DENSE_STREAM=0 in the environment turns it off).
  // A change drops the decode-step graphs captured so far.
  void set_dense_gemv_stream(bool on);
  // Decode attention of batches whose items leave SMs idle runs blocks of 16 warps rather than 4 (default:
  // LMD_WIDE_DECODE=1 in the environment; cuda/src/attn_plan.cpp says why). A change drops the
  // decode-step graphs captured so far.
  void set_wide_decode_attention(bool on);
  int dense_gemv_max_rows() const;
  // Decode-step graphs so far: shapes captured, steps replayed, shapes that fell back to eager steps.
  struct GraphCounts {
    int captured = 0, failed = 0;
    int64_t replayed = 0;
  };
  GraphCounts graph_counts() const;

 private:
  // Copies `values` to the device unless they equal what `slot` holds already (the per-step batch
  // metadata is the same for every layer, so it is uploaded once per step, not once per layer).
  const int* upload_meta(int slot, const std::vector<int>& values);
  // out[tokens, outf] = x W^T for a dense [outf, in] weight in x's dtype, through cuBLAS.
  void gemm(const DeviceTensor& x, const void* weight, int64_t in, int64_t outf, int64_t tokens,
            DeviceTensor& out);
  // Grows the int4 linears' shared workspaces (split-K partials and counters, dense weight) to fit an
  // in x outf linear at any row count.
  void reserve_w4a16_workspace(int64_t in, int64_t outf, DType compute);
  // Copies per-step integers to the device: eagerly into `keep` (a pool tensor), or in a graph step into
  // the graph's metadata buffer, uploaded by end_graph_step.
  const int* stage(const std::vector<int>& values, DeviceTensor& keep);
  DeviceTensor pool_alloc(DType dtype, Shape shape);
  // Queues linear(input rows made by `pro`, w) -> out as one fused GEMV when a GEMV path takes the rows
  // and the prologue; false (nothing queued) otherwise. x: the op's input, for its dtype.
  bool fused_linear(const DeviceTensor& x, const DeviceLinear& w, DeviceTensor& out,
                    const cuda::GemvPrologue& pro);
  // rope_kv_write's per-step metadata (kernels.h); inv_freq starts at `freq_off`.
  std::vector<int> rope_meta(const DeviceTensor& qkv, const BatchLayout& batch, int heads,
                             const RopeConfig& rope, const KvCacheStorage& cache, int& freq_off);
  // attention(), with the rotation and K/V write of rope_kv_attention when `rope` is set.
  void run_attention(const DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                     const KvCacheStorage& cache, DeviceTensor& out, const cuda::DecodeRope& rope);
  // True while a graph step replays: ops plan but launch nothing.
  bool replaying() const;

  std::unique_ptr<CudaState> state_;
  std::optional<DType> activation_;
};

}  // namespace lmd
