// Launchers for the backend's kernels. Pointers are device pointers; `dtype` is the element type of
// the activation tensors involved (F16, BF16 or F32). All launches go on `stream`.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lmd/core/dtype.h"

namespace lmd::cuda {

// out[i] = src[rows[i]] for rows of `row_bytes` bytes.
void gather_rows(const void* src, const int* rows, int n, int64_t row_bytes, void* out, cudaStream_t stream);

// The element-wise op a small-batch GEMV may do itself before its product (gemv_input.cuh): None (x is
// the input), AddNorm (residual += src; x = rmsnorm(residual) * norm_weight: add_rmsnorm_linear) or
// SiluMul (x = silu(src[:, :K]) * src[:, K:]: silu_mul_linear).
enum class GemvPrologueKind { None, AddNorm, SiluMul };
struct GemvPrologue {
  GemvPrologueKind kind = GemvPrologueKind::None;
  const void* src = nullptr;  // AddNorm: the delta [rows, K]; SiluMul: gate_up [rows, 2K]
  void* residual = nullptr;   // AddNorm [rows, K]
  const void* norm_weight = nullptr;
  float eps = 0;
  unsigned* arrivals = nullptr;  // AddNorm: a counter that is zero between launches (each launch resets it)
};
// Shared memory a fused prologue may take for the staged input rows: the fused GEMVs run only where the
// rows fit (batch 1-2 at K = 11008, up to 4 at K = 4096), and the unfused ops beyond. With the int4 GEMV's
// 4 KB of warp sums and the prologue's own few bytes, a block stays within the 48 KB it gets by default.
inline constexpr int kGemvPrologueMaxBytes = 48 * 1024 - 4 * 1024 - 256;
// Rows a fused prologue stages at most (the int4 GEMV's one row tile).
inline constexpr int kGemvPrologueMaxRows = 8;

// out[rows, N] = x[rows, K] w[N, K]^T for 16-bit x and w, in the input dtype or fp32 (the logits): the
// small-batch path of dense linears (dense_gemv.cu) for up to kDenseGemvMaxRows rows. By default it
// runs one row: at 2-4 rows cuBLAS was faster on an H100 (5.15 vs 5.36 ms over a Llama-2-7B layer set at
// 2 rows, lmd_bench_w4a16). With a prologue, x is unused and the input rows come from `pro`.
inline constexpr int kDenseGemvMaxRows = 4, kDenseGemvDefaultRows = 1;
bool dense_gemv_supported(DType dtype, DType out_dtype, int rows, int K, GemvPrologueKind pro = {});
// stream_sms > 0: the streaming version (dense_gemv.cu) where K % 256 == 0, a persistent grid sized for
// that many SMs.
void dense_gemv(DType dtype, DType out_dtype, const void* x, const void* w, int rows, int K, int N, void* out,
                cudaStream_t stream, const GemvPrologue& pro = {}, int stream_sms = 0);

// Threads of the rmsnorm kernel's block (one block a row): its sum of squares is split over them, and
// the fused add+RMSNorm prologue splits it alike so that both round the same.
inline constexpr int kRmsNormThreads = 256;
// out = x / rms(x) * w per row of n; when `residual` is set, residual += x first and the sum (rounded
// to dtype) is normalised.
void rmsnorm(DType dtype, const void* x, void* residual, const void* w, float eps, int64_t rows, int n,
             void* out, cudaStream_t stream);

// out[r, i] = silu(gu[r, i]) * gu[r, inter + i].
void silu_mul(DType dtype, const void* gate_up, int64_t rows, int inter, void* out, cudaStream_t stream);

// Per row of fp32 logits [rows, vocab]: out[r] = (argmax as float, its log-softmax); lowest id on ties.
void greedy(const float* logits, int rows, int vocab, float* out, cudaStream_t stream);

// One row's sampling parameters as the sample kernel reads them (the host packs them into int32 metadata).
struct SampleParams {
  float temperature;
  int top_k;
  float top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty;
  int penalty_begin, penalty_count;  // the row's (token, generated) pairs in `penalties`
  int unused;                        // pads `uniform` to its 8-byte alignment
  double uniform;
};
static_assert(sizeof(SampleParams) == 48);
// Fixed-point probability mass in the sample kernel bounds the vocabulary.
constexpr int kMaxSampleVocab = 1 << 23;

// Per row of fp32 logits [rows, vocab]: out[r] = (token as float, its log-softmax) chosen as choose_token
// (libengine sampler.h) chooses with params[r]. penalties: int32 (token, generated) pairs, distinct tokens
// per row, within the vocabulary; work: fp32 [rows, vocab] scratch for the penalised logits of rows with
// penalties (may be null when no row has any).
void sample(const float* logits, int rows, int vocab, const SampleParams* params, const int* penalties,
            float* work, float* out, cudaStream_t stream);

// y[r, j] += bias[j].
void add_bias(DType dtype, void* y, const void* bias, int64_t rows, int cols, cudaStream_t stream);

// Per-step layout shared by rope_kv_write and attention (see meta layout in rope_kv.cu).
struct KvGeometry {
  int layers, kv_heads, head_dim, block_len, layer;
  int quant_bits;  // 0, 8 or 4
};

// Offline per-layer int8 KV (`lite kv_qparams`): the layer's fixed (scale, zero) for K and V, applied as
// the CPU reference does (signed q = round((x - zero) / scale) in [-128, 127]). The cache keeps the
// online int8 format: q + 128 with per-row params (scale, zero - 128 * scale), so the attention kernels
// read both modes alike.
struct StaticKvParams {
  bool enabled = false;
  float k_scale = 0, k_zero = 0, v_scale = 0, v_zero = 0;
};

// meta: int32 [tokens] sequence index, [tokens] position, [seqs] offset of the sequence's block list
// in `blocks`, then the block lists; inv_freq: fp32 [seqs, head_dim / 2].
void rope_kv_write(DType dtype, void* qkv, int tokens, int heads, const KvGeometry& g, const int* token_seq,
                   const int* token_pos, const int* seq_block_off, const int* blocks, const float* inv_freq,
                   void* cache, uint16_t* params, const StaticKvParams& fixed, cudaStream_t stream);

// Rows one work item may hold at most (attn_max_rows).
constexpr int kAttnMaxRows = 8;

// Warps of a decode_kernel block: kAttnDecodeWideWarps where a batch's one-token items leave SMs idle
// (plan_attention says when), else kAttnDecodeWarps.
constexpr int kAttnDecodeWarps = 4;
constexpr int kAttnDecodeWideWarps = 16;

// One unit of attention work: `token_count` consecutive new tokens of one sequence times `head_count`
// query heads of one KV-head group (rows = tokens x heads <= kAttnMaxRows), over cache positions
// [kv_begin, kv_end). `partial` < 0: this is the only split and writes the output (a one-token item
// with no keys does nothing: a graph step's split past the keys of an item that its first split holds
// whole); else the index of its partial-result slot, and `combine` the index of the merge of its splits
// in the combine list.
struct AttnWork {
  int token_begin, token_count, head_begin, head_count;
  int first_pos;  // position of token_begin in its sequence
  int block_off;  // offset of the sequence's block list in the block table
  int kv_begin, kv_end;
  int partial, combine;
};
// The merge of one row set's splits: partial slots [first_partial, first_partial + splits).
struct AttnCombine {
  int token_begin, token_count, head_begin, head_count;
  int first_partial, splits;
};

// Rows one work item may hold for this head_dim (register budget of the accumulators).
int attn_max_rows(int head_dim);

// Whether one-token items over this cache run the register-resident decode kernel (version 2) rather
// than the general one.
bool attn_decode_v2(int elem_bytes, const KvGeometry& g);

// Rows of one multi-token work item for the tensor-core prefill kernel (version 3).
constexpr int kAttnPrefillRows = 128;

// Whether multi-token items over this cache run the tensor-core prefill kernel (version 3): fp16/bf16
// activations and cache, head_dim 64 or 128, and at most kAttnPrefillRows / 2 query heads per KV head.
// Such items are whole (never split over the cache: kv_begin 0, no partial slot) and hold up to
// kAttnPrefillRows rows: all `heads / kv_heads` heads of the group for consecutive tokens.
bool attn_prefill_v3(int elem_bytes, const KvGeometry& g, int heads);

// The first `num_decode` work items have one token and at most `decode_rows` rows each: they run the
// decode kernel, in blocks of `decode_warps` warps, where it applies (attn_decode_v2); the rest run the
// prefill kernel where it applies (attn_prefill_v3), else the general one. The first `num_decode_combine`
// merges are those of the one-token items: where the decode kernel runs, it merges them itself, counting its
// blocks' arrivals in `counters` (attn_counter_ints of them, zero before the call and zero again after it);
// the other merges run as a separate pass.
//
// With `rope` set (rope_kv_attention; every item one-token, attn_decode_rope), q and the new token's k are
// rotated by the kernel from qkv as written by the qkv linear, and the new token's K/V go into the cache
// by the kernel, in place of a rope_kv_write launch before this one.
struct DecodeRope {
  const int* token_seq = nullptr;   // [tokens] the sequence of each new token
  const float* inv_freq = nullptr;  // [sequences, head_dim / 2]
  void* cache = nullptr;            // the cache, written
};
bool attn_decode_rope(int elem_bytes, const KvGeometry& g);
void attention(DType dtype, const void* qkv, int heads, const KvGeometry& g, const AttnWork* work,
               int num_work, int num_decode, int decode_rows, int decode_warps, const AttnCombine* combine,
               int num_combine, int num_decode_combine, const int* blocks, const void* cache,
               const uint16_t* params, float* partials, int* counters, void* out, cudaStream_t stream,
               const DecodeRope& rope = {});

// Floats of partial-result workspace `attention` needs for `num_partials` slots.
int64_t attn_partial_floats(int num_partials, const KvGeometry& g);

// Arrival counters `attention` needs for `num_decode_combine` merges of one-token items.
int64_t attn_counter_ints(int num_decode_combine, const KvGeometry& g);

}  // namespace lmd::cuda
