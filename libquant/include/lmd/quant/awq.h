// AWQ 4-bit weight-only quantization (BRIEF §5), the work behind `lmd lite auto_awq`: per-channel
// statistics of every decoder linear's input, smoothing of producer -> consumer pairs (default ratio or
// the 20-point search), asymmetric int4 quantization per group, and a driver that walks the model one
// decoder layer at a time and writes an AutoAWQ "gemm" checkpoint.
#pragma once
#include <cstdint>
#include <filesystem>
#include <ostream>
#include <string>
#include <vector>

#include "lmd/core/checkpoint.h"
#include "lmd/core/model_spec.h"
#include "lmd/core/tensor.h"
#include "lmd/engine/backend.h"
#include "lmd/engine/thread_pool.h"
#include "lmd/quant/channel_stats.h"

namespace lmd {

// A linear layer in fp32: weight [out, in] row-major (the HF layout), optional bias [out].
struct FloatLinear {
  int64_t out = 0, in = 0;
  std::vector<float> weight;
  std::vector<float> bias;  // empty: no bias
};

// One decoder layer in fp32, in checkpoint.h's canonical layout (InternLM2's wqkv already split).
struct FloatLayer {
  std::vector<float> attn_norm, ffn_norm;
  FloatLinear q, k, v, o, gate, up, down;
};

// fp32 copies of a dense layer, converted on `pool`'s threads (null: this thread); throws lmd::Error
// when a linear is already int4.
FloatLayer to_float_layer(const LayerWeights& w, ThreadPool* pool = nullptr);

// --- quantization -------------------------------------------------------------------------------

// One linear in the AutoAWQ "gemm" layout: qweight int32 [in, out/8], qzeros int32 [in/group, out/8],
// scales fp16 [in/group, out].
struct Int4Linear {
  HostTensor qweight, qzeros, scales;
};

// Asymmetric int4 per (output row, group of `group` consecutive input channels), BRIEF §5:
// scale = max(max-min, 1e-5)/15, zero = clamp(-round(min/scale), 0, 15), q = clamp(round(w/scale)+zero).
// The scale is rounded up to the next fp16 before q is chosen, so that dequantizing with the stored fp16
// scale keeps every weight of a group that contains 0 within scale/2. `name` is for messages. Output
// rows are split among `pool`'s threads (null: this thread); every group is computed the same way on
// any thread, so the bytes do not depend on the thread count.
Int4Linear quantize_int4(const FloatLinear& w, int group, const std::string& name,
                         ThreadPool* pool = nullptr);
// What quantize_int4 followed by dequantization gives, [out, in]: the search's quantized weights.
std::vector<float> fake_quantize_int4(const FloatLinear& w, int group, ThreadPool* pool = nullptr);

// --- statistics ---------------------------------------------------------------------------------

// What one linear input saw: statistics over every token, and every `stride`-th token's row kept for
// the scale search (bounded so that a 7B model's MLP inputs need not all stay in memory).
struct InputRecord {
  int64_t channels = 0;
  ChannelStats stats;
  std::vector<float> rows;  // [row_count(), channels]
  int64_t row_count() const { return channels ? int64_t(rows.size()) / channels : 0; }
};

// The inputs of one layer's linears: q/k/v share one, gate/up share one.
struct LayerInputs {
  InputRecord qkv, o, gate_up, down;
};

// The calibration hidden states between decoder layers, [windows * seqlen, hidden], as one tensor per
// forward step (a batch of windows) in the backend's activation dtype. Kept on the backend when
// `on_device`: a layer then moves no activations between host and GPU (at 128 x 2048 tokens of a
// 2048-wide model that is 1 GiB each way per layer); otherwise kept on the host, uploaded per step.
class CalibActivations {
 public:
  CalibActivations(Backend& backend, DType activation_dtype, bool on_device)
      : backend_(&backend), dtype_(activation_dtype), on_device_(on_device) {}

  // Appends the next step's hidden states [tokens, hidden] (any float dtype; converted on upload). An
  // owned tensor, not a view: the CPU backend's upload uses it in place, and the layers update it.
  void add_step(HostTensor x);
  int steps() const { return int(step_rows_.size()); }
  int64_t step_rows(int step) const { return step_rows_.at(step); }
  int64_t rows() const { return rows_; }
  bool on_device() const { return on_device_; }
  // Step i's states on the backend: on_device, the stored tensor itself (ops on it update the store).
  DeviceTensor load(int step);
  // Keeps `x` as step i's states (a no-op for the tensor load returned on_device).
  void store(int step, const DeviceTensor& x);
  // Every row in order, fp32 [rows(), hidden].
  std::vector<float> to_f32();

 private:
  Backend* backend_;
  DType dtype_;
  bool on_device_;
  std::vector<HostTensor> host_;
  std::vector<DeviceTensor> device_;
  std::vector<int64_t> step_rows_;
  int64_t rows_ = 0;
};

// Runs one decoder layer in float through the backend's ops over `hidden` (each window one sequence
// from position 0, `seqlen` tokens, each step of `hidden` whole windows), and replaces `hidden` with
// the layer's output. With `inputs`, records each linear's input, keeping rows of tokens whose index is
// a multiple of `row_stride` (0: none); statistics are gathered on `pool`'s threads (null: this thread).
void run_float_layer(Backend& backend, const ModelSpec& spec, const FloatLayer& layer, int seqlen,
                     CalibActivations& hidden, LayerInputs* inputs = nullptr, int64_t row_stride = 0,
                     ThreadPool* pool = nullptr);

// --- smoothing ----------------------------------------------------------------------------------

// A producer -> consumers pair (BRIEF §5). A per-channel scale s divides the producer's output channels
// (a norm's weight or a linear's rows and bias) and multiplies the consumers' input columns, which leaves
// the float computation unchanged while moving the activation outliers into the weights.
struct SmoothPair {
  std::string name;                    // for progress and messages: "post-attention norm -> gate,up"
  std::vector<float>* norm = nullptr;  // the producer: a norm weight ...
  FloatLinear* linear = nullptr;       // ... or a linear
  std::vector<FloatLinear*> consumers;
  // When set (post-attention norm -> gate, up), the searched block is the whole MLP with this float
  // down projection after silu(gate) * up; otherwise the block is the consumers' concatenated output.
  const FloatLinear* mlp_down = nullptr;
  const InputRecord* input = nullptr;  // the consumers' input
};

// The pairs of one layer: input norm -> q,k,v; v -> o only without GQA and not for InternLM2 (its q, k, v
// are one tensor); post-attention norm -> gate,up; up -> down.
std::vector<SmoothPair> smooth_pairs(const ModelSpec& spec, FloatLayer& layer, const LayerInputs& inputs);

// Per input channel: the mean over the consumers' rows of |W| divided by the max |W| of its group.
std::vector<float> weight_channel_scale(const std::vector<FloatLinear*>& consumers, int group);
// s = a^ratio / (w^(1-ratio) + 1e-4), at least 1e-4, divided by sqrt(max(s) * min(s)).
std::vector<float> smooth_scales(const std::vector<float>& act, const std::vector<float>& weight,
                                 double ratio);
// The default (no search): ratio 0.5 on the per-channel max |activation|.
std::vector<float> default_scales(const SmoothPair& pair, int group);

// Mean squared error of the block output on the recorded input rows when the consumers are quantized
// after smoothing by `s` (all ones: plain round-to-nearest), against the float block.
double quantized_block_error(Backend& backend, const SmoothPair& pair, const std::vector<float>& s, int group,
                             ThreadPool* pool = nullptr);

struct ScaleSearch {
  double ratio = 0;
  std::vector<float> scales;
  std::vector<double> errors;  // per grid ratio 0, 0.05, ..., 0.95
};
// The 20-point grid on the mean |activation|, keeping the ratio with the least quantized block error.
// Host work (scaling, fake quantization) runs on `pool`'s threads (null: this thread).
ScaleSearch search_scales(Backend& backend, const SmoothPair& pair, int group, ThreadPool* pool = nullptr);

void apply_smoothing(const SmoothPair& pair, const std::vector<float>& s, ThreadPool* pool = nullptr);

// --- the driver ---------------------------------------------------------------------------------

struct AwqOptions {
  std::filesystem::path model_dir, work_dir;
  std::string calib_dataset = "ptb";
  std::string dataset_dir;  // --dataset-dir; empty: $LMD_DATASETS, else ../shared/datasets
  int calib_samples = 128, calib_seqlen = 2048;
  int w_bits = 4, w_group_size = 128;
  int batch_size = 1;  // calibration windows per forward step
  bool search_scale = false;
  // false: plain round-to-nearest int4 with no calibration at all, the baseline AWQ is measured against.
  bool smooth = true;
  int64_t search_tokens = 4096;          // rows per linear input kept for the search
  size_t shard_bytes = size_t(2) << 30;  // safetensors shard size limit
  int host_threads = 0;                  // threads for host-side work; 0: hardware concurrency
};

// Quantizes options.model_dir into options.work_dir (written as a temporary folder beside it and renamed
// when complete), running layers on `backend`; progress per layer goes to `log`. Throws lmd::Error naming
// the flag, file or layer on bad input; nothing is left under work_dir on failure.
void auto_awq(const AwqOptions& options, Backend& backend, std::ostream& log);

}  // namespace lmd
