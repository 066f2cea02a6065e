#include "lmd/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <string_view>

#include "attn_plan.h"
#include "cuda_check.h"
#include "kernels.h"
#include "lmd/core/awq_layout.h"
#include "lmd/engine/kv_quant.h"
#include "w4a16.h"

namespace lmd {
namespace {

// A kernel switch from the environment: `name`=1 turns it on, `name`=0 off; unset (or anything else)
// leaves `fallback`, its default.
bool env_switch(const char* name, bool fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr) return fallback;
  const std::string_view v(value);
  return v == "1" ? true : v == "0" ? false : fallback;
}

// A caching allocator: freed blocks are kept by rounded size and handed out again, so a forward step's
// scratch tensors cost no cudaMalloc (which synchronises the device) after the first step. All work is
// queued on one stream, so a block freed on the host while kernels still use it is only reused by work
// queued later on that stream.
class Pool {
 public:
  Pool() = default;
  ~Pool() { release(); }

  static size_t round(size_t bytes) {
    const size_t unit = bytes < (size_t(1) << 20) ? 512 : (size_t(2) << 20);
    return std::max(unit, (bytes + unit - 1) / unit * unit);
  }
  void* get(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second;
        free_.erase(it);
        cached_ -= bytes;
        return p;
      }
    }
    void* p = nullptr;
    if (cudaMalloc(&p, bytes) != cudaSuccess) {
      cudaGetLastError();  // out of memory: give the cached blocks back and try once more
      release();
      LMD_CUDA_CHECK(cudaMalloc(&p, bytes));
    }
    return p;
  }
  void put(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.emplace(bytes, p);
    cached_ += bytes;
  }
  size_t cached() const {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }
  void release() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!free_.empty()) cudaDeviceSynchronize();
    for (auto& [bytes, p] : free_) cudaFree(p);
    free_.clear();
    cached_ = 0;
  }

 private:
  mutable std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

void require_same(const DeviceTensor& a, const DeviceTensor& b, const char* op) {
  if (a.dtype != b.dtype)
    fail("CUDA ", op, ": dtype mismatch (", dtype_name(a.dtype), " vs ", dtype_name(b.dtype), ")");
}

// int4 linears of at least this many rows dequantize + cuBLAS, fewer run the tensor-core GEMV (64 rows a
// launch). Measured on an H100 over a Llama-2-7B layer set (lmd_bench_w4a16, docs/benchmarks.md): the
// GEMV is faster up to 192 rows (14.5 against 15.1 ms there), dequantize + cuBLAS from 256 (15.3 against
// 19.3 ms).
constexpr int kW4DenseFromRows = 193;

cudaDataType cuda_type(DType t) {
  switch (t) {
    case DType::F16:
      return CUDA_R_16F;
    case DType::BF16:
      return CUDA_R_16BF;
    case DType::F32:
      return CUDA_R_32F;
    default:
      fail("CUDA linear: unsupported dtype ", dtype_name(t));
  }
}

}  // namespace

struct CudaState {
  int device = 0;
  int sms = 0;
  std::string device_name;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  std::shared_ptr<Pool> pool;
  struct Meta {
    std::vector<int> host;
    DeviceTensor dev;
  };
  Meta meta[2];  // 0: rope_kv_write, 1: attention
  // W4A16 linears: rows from which they run as dequantize + cuBLAS, and the dense weight of the
  // larger-batch path (only grows; all use is ordered on the one stream).
  int w4_dense_from = kW4DenseFromRows;
  // The streaming int4 GEMV (W4Plan::stream) at 1-8 rows, off unless LMD_W4A16_STREAM=1: written in a
  // session without a GPU, not yet measured against version 5.
  bool w4_stream = env_switch("LMD_W4A16_STREAM", false);
  int dense_gemv_max_rows = cuda::kDenseGemvDefaultRows;
  // The streaming dense GEMV (dense_gemv.cu), on unless LMD_DENSE_STREAM=0: on an H100 (2026-12-05) the
  // batch-1 linears took 4.56 against 4.81 ms (Llama-2-7B) and the graph step 1-4% less.
  bool dense_stream = env_switch("LMD_DENSE_STREAM", true);
  // 16-warp decode attention blocks for small batches (attn_plan.cpp), off unless LMD_WIDE_DECODE=1:
  // written in a session whose every request for a GPU was turned down, so not yet run on one.
  bool wide_decode = env_switch("LMD_WIDE_DECODE", false);
  DeviceTensor w4_dense;
  DeviceTensor w4_x_fragments;  // the activations of the wide GEMV in fragment order (w4a16.h)
  // Arrival counters of the decode attention kernel's merges (kept zero between launches), sized at
  // construction for any plan on this device: a decode-step graph captures the pointer.
  DeviceTensor attn_counters;
  // The arrival counter of the fused add_rmsnorm GEMVs (gemv_input.cuh; zero between launches).
  DeviceTensor prologue_arrivals;
  // Off unless LMD_FUSED_OPS says otherwise: on an H100 (2026-12-05) each fusion (GEMV prologues, RoPE
  // in the decode attention) saved time on one of Llama-2-7B and InternLM2-1.8B and cost some on the
  // other, and all three were slower on both; their tests turn them on.
  unsigned fused_ops = parse_fused_ops(std::getenv("LMD_FUSED_OPS"));

  // Decode-step graphs (begin_graph_step), one per (sequences, block-table stride). The first step of a
  // shape runs eagerly and records the sizes of its allocations and metadata uploads; the second is
  // captured with those carved out of one arena and one metadata buffer; later ones replay.
  struct Graph {
    std::vector<size_t> alloc_sizes;  // bytes, in call order
    std::vector<size_t> meta_sizes;   // ints, in call order
    DeviceTensor arena, meta;
    cudaGraphExec_t exec = nullptr;
    bool disabled = false;  // its capture failed: steps of this shape run eagerly
  };
  enum class Mode { Eager, Record, Capture, Replay };
  std::map<std::pair<int, int>, Graph> graphs;
  // Destroys every captured graph; later steps record and capture their shapes again.
  void drop_graphs() {
    for (auto& [key, g] : graphs)
      if (g.exec) cudaGraphExecDestroy(g.exec);
    graphs.clear();
  }
  // Before a setting that chooses kernels changes (`setter` names it): the captured decode steps launch
  // the kernels chosen before, so they are captured again.
  void kernels_changing(const char* setter) {
    if (mode != Mode::Eager) fail(setter, " inside a graph step");
    LMD_CUDA_CHECK(cudaStreamSynchronize(stream));
    drop_graphs();
  }
  // The int4 GEMV's launch shape under the current settings.
  cuda::W4Plan w4_plan(int64_t rows, int64_t in, int64_t out) const {
    return cuda::w4a16_plan(int(rows), int(in), int(out), w4_stream ? sms : 0);
  }
  Mode mode = Mode::Eager;
  std::pair<int, int> graph_key;
  Graph* graph = nullptr;
  size_t alloc_i = 0, alloc_off = 0, meta_i = 0, meta_off = 0;
  std::vector<int> meta_host;  // staged metadata of the step, copied to `graph->meta` before the launch
  struct Staged {
    std::vector<int> values;
    const int* dev = nullptr;
    DeviceTensor keep;
  };
  std::map<int, Staged> staged;  // upload_meta's slots within one graph step
  CudaBackend::GraphCounts counts;

  int graph_stride() const { return graph_key.second; }
};

namespace {

// Graph-step sub-allocations are aligned like cudaMalloc's smallest alignment that vector loads need.
size_t arena_bytes(size_t bytes) { return (std::max<size_t>(bytes, 1) + 255) / 256 * 256; }

}  // namespace

unsigned parse_fused_ops(const char* value) {
  const std::string_view v = value == nullptr ? "" : value;
  if (v.empty() || v == "0") return kFuseNone;
  if (v == "1" || v == "all") return kFuseAll;
  unsigned ops = kFuseNone;
  for (size_t begin = 0; begin <= v.size();) {
    const size_t end = std::min(v.find(',', begin), v.size());
    const std::string_view name = v.substr(begin, end - begin);
    if (name == "norm")
      ops |= kFuseNorm;
    else if (name == "swiglu")
      ops |= kFuseSwiglu;
    else if (name == "rope")
      ops |= kFuseRope;
    else
      fail("LMD_FUSED_OPS=", v,
           ": expected 0, 1, all, or a comma-separated list of norm, swiglu, rope (got '", name, "')");
    begin = end + 1;
  }
  return ops;
}

bool cuda_device_available() {
  int n = 0;
  const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  cudaGetLastError();  // a missing driver leaves a sticky-looking error in the runtime's last-error slot
  return ok;
}

bool cuda_decode_attention_v2(DType activation, const KvCacheLayout& layout) {
  const cuda::KvGeometry g{layout.layers,    layout.kv_heads, layout.head_dim, layout.block_len, 0,
                           layout.quant_bits};
  return cuda::attn_decode_v2(int(dtype_size(activation)), g);
}

bool cuda_prefill_attention_v3(DType activation, const KvCacheLayout& layout, int heads) {
  const cuda::KvGeometry g{layout.layers,    layout.kv_heads, layout.head_dim, layout.block_len, 0,
                           layout.quant_bits};
  return cuda::attn_prefill_v3(int(dtype_size(activation)), g, heads);
}

std::string cuda_device_name(int device) {
  if (!cuda_device_available()) return "";
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, device) != cudaSuccess) {
    cudaGetLastError();
    return "";
  }
  std::ostringstream os;
  os.precision(3);
  os << p.name << " (sm_" << p.major << p.minor << ", " << p.multiProcessorCount << " SMs, "
     << double(p.totalGlobalMem) / double(1 << 30) << " GiB)";
  return os.str();
}

CudaBackend::CudaBackend(int device, std::optional<DType> activation)
    : state_(std::make_unique<CudaState>()), activation_(activation) {
  if (!cuda_device_available()) fail("CUDA backend: no CUDA device or driver is available");
  state_->device = device;
  LMD_CUDA_CHECK(cudaSetDevice(device));
  LMD_CUDA_CHECK(cudaDeviceGetAttribute(&state_->sms, cudaDevAttrMultiProcessorCount, device));
  state_->device_name = cuda_device_name(device);
  LMD_CUDA_CHECK(cudaStreamCreateWithFlags(&state_->stream, cudaStreamNonBlocking));
  LMD_CUBLAS_CHECK(cublasCreate(&state_->cublas));
  LMD_CUBLAS_CHECK(cublasSetStream(state_->cublas, state_->stream));
  state_->pool = std::make_shared<Pool>();
  state_->attn_counters = pool_alloc(DType::I32, {cuda::attn_max_counter_ints(state_->sms)});
  LMD_CUDA_CHECK(
      cudaMemsetAsync(state_->attn_counters.data, 0, state_->attn_counters.nbytes(), state_->stream));
  state_->prologue_arrivals = pool_alloc(DType::I32, {1});
  LMD_CUDA_CHECK(cudaMemsetAsync(state_->prologue_arrivals.data, 0, sizeof(int32_t), state_->stream));
}

CudaBackend::~CudaBackend() {
  // Tensors may outlive the backend (their deleters keep the pool alive); the stream and handle go.
  cudaStreamSynchronize(state_->stream);
  state_->meta[0] = {};
  state_->meta[1] = {};
  state_->w4_dense = {};
  state_->attn_counters = {};
  state_->prologue_arrivals = {};
  state_->drop_graphs();
  cublasDestroy(state_->cublas);
  cudaStreamDestroy(state_->stream);
}

std::string CudaBackend::name() const {
  return "cuda:" + std::to_string(state_->device) + " (" + state_->device_name + ")";
}

DType CudaBackend::activation_dtype(DType weight_dtype) const {
  if (activation_) return *activation_;
  // fp32 checkpoints run in fp16: its 10-bit mantissa keeps more of the fp32 values than bf16's 7 bits,
  // and Llama-family activations stay far inside fp16's range.
  return weight_dtype == DType::BF16 ? DType::BF16 : DType::F16;
}

void* CudaBackend::stream() const { return state_->stream; }

DeviceTensor CudaBackend::alloc(DType dtype, Shape shape) {
  CudaState& st = *state_;
  if (st.mode == CudaState::Mode::Capture || st.mode == CudaState::Mode::Replay) {
    DeviceTensor t;
    t.dtype = dtype;
    t.shape = std::move(shape);
    const size_t bytes = arena_bytes(t.nbytes());
    CudaState::Graph& g = *st.graph;
    if (st.alloc_i >= g.alloc_sizes.size() || g.alloc_sizes[st.alloc_i] != bytes)
      fail("CUDA graph step: allocation ", st.alloc_i, " differs from the recorded step of this shape");
    ++st.alloc_i;
    t.data = static_cast<char*>(g.arena.data) + st.alloc_off;
    st.alloc_off += bytes;
    t.storage = std::shared_ptr<void>(g.arena.storage, t.data);  // shares the arena's ownership
    return t;
  }
  if (st.mode == CudaState::Mode::Record) {
    DeviceTensor probe;
    probe.dtype = dtype;
    probe.shape = shape;
    st.graph->alloc_sizes.push_back(arena_bytes(probe.nbytes()));
  }
  return pool_alloc(dtype, std::move(shape));
}

DeviceTensor CudaBackend::pool_alloc(DType dtype, Shape shape) {
  DeviceTensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  const size_t bytes = Pool::round(std::max<size_t>(t.nbytes(), 1));
  void* p = state_->pool->get(bytes);
  t.data = p;
  t.storage = std::shared_ptr<void>(p, [pool = state_->pool, bytes](void* q) { pool->put(q, bytes); });
  return t;
}

DeviceTensor CudaBackend::upload(const HostTensor& host, DType dtype) {
  DeviceTensor t = alloc(dtype, host.shape());
  if (t.nbytes() == 0) return t;
  if (host.dtype() == dtype) {
    LMD_CUDA_CHECK(cudaMemcpyAsync(t.data, host.data(), t.nbytes(), cudaMemcpyHostToDevice, state_->stream));
  } else {
    const HostTensor converted = host.to(dtype);
    LMD_CUDA_CHECK(
        cudaMemcpyAsync(t.data, converted.data(), t.nbytes(), cudaMemcpyHostToDevice, state_->stream));
    // The staging copy of pageable memory may still read `converted` after the call returns.
    LMD_CUDA_CHECK(cudaStreamSynchronize(state_->stream));
  }
  return t;
}

HostTensor CudaBackend::download(const DeviceTensor& t) {
  HostTensor h;
  download_into(t, h);
  return h;
}

void CudaBackend::download_into(const DeviceTensor& t, HostTensor& dst) {
  if (!reusable_for(dst, t)) dst = HostTensor(t.dtype, t.shape);
  if (t.nbytes() == 0) return;
  LMD_CUDA_CHECK(
      cudaMemcpyAsync(dst.mutable_data(), t.data, t.nbytes(), cudaMemcpyDeviceToHost, state_->stream));
  LMD_CUDA_CHECK(cudaStreamSynchronize(state_->stream));
}

DeviceLinear CudaBackend::prepare_linear(const LinearWeight& w, DType compute) {
  DeviceLinear out;
  out.out_features = w.out_features();
  out.in_features = w.in_features();
  const int group = w.is_awq() ? int(out.in_features / w.scales.dim(0)) : 0;
  if (w.is_awq() && cuda::w4a16_supported(out.in_features, out.out_features, group)) {
    // Re-laid on the device (w4a16.h); the AWQ tensors are uploaded as they are and dropped after.
    const int K = int(out.in_features), N = int(out.out_features);
    const DeviceTensor qweight = upload(w.qweight, DType::I32), qzeros = upload(w.qzeros, DType::I32);
    const DeviceTensor scales = upload(w.scales, DType::F16);
    out.group_size = group;
    out.qweight = alloc(DType::I32, {N / 16, K / 64, 128});
    out.scales = alloc(DType::F16, {K / group, 2 * int64_t(N)});  // the (1024 + zero, scale) meta
    cuda::w4a16_relayout(qweight.as<int32_t>(), qzeros.as<int32_t>(), scales.data, K, N, group,
                         out.qweight.as<int32_t>(), out.scales.data, state_->stream);
    reserve_w4a16_workspace(K, N, compute);
  } else if (w.is_awq()) {
    // Shapes the tiles do not cover (never a Llama-family linear) run as dense GEMMs.
    out.weight = upload(dequantize_awq(w.qweight, w.qzeros, w.scales), compute);
  } else {
    out.weight = upload(w.weight, compute);
  }
  if (!w.bias.empty()) out.bias = upload(w.bias, compute);
  return out;
}

KvCacheStorage CudaBackend::alloc_kv_cache(const KvCacheLayout& layout, DType compute) {
  if (layout.quant_bits != 0 && layout.quant_bits != 4 && layout.quant_bits != 8)
    fail("KV cache quantization must be 0, 4 or 8 bits, got ", layout.quant_bits);
  KvCacheStorage cache;
  cache.layout = layout;
  const int64_t rows = int64_t(layout.layers) * 2 * layout.kv_heads * layout.block_len;
  if (layout.quant_bits == 0) {
    cache.data = alloc(compute, {layout.num_blocks, rows * layout.head_dim});
  } else {
    cache.data =
        alloc(DType::U8, {layout.num_blocks, rows * kv_row_bytes(layout.head_dim, layout.quant_bits)});
    cache.params = alloc(DType::F16, {layout.num_blocks, rows * 2});
    LMD_CUDA_CHECK(cudaMemsetAsync(cache.params.data, 0, cache.params.nbytes(), state_->stream));
  }
  LMD_CUDA_CHECK(cudaMemsetAsync(cache.data.data, 0, cache.data.nbytes(), state_->stream));
  return cache;
}

size_t CudaBackend::free_memory() const {
  size_t free = 0, total = 0;
  LMD_CUDA_CHECK(cudaSetDevice(state_->device));
  LMD_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return free + state_->pool->cached();
}

void CudaBackend::synchronize() { LMD_CUDA_CHECK(cudaStreamSynchronize(state_->stream)); }

CudaBackend::GraphCounts CudaBackend::graph_counts() const { return state_->counts; }

bool CudaBackend::replaying() const { return state_->mode == CudaState::Mode::Replay; }

const int* CudaBackend::stage(const std::vector<int>& values, DeviceTensor& keep) {
  CudaState& st = *state_;
  if (st.mode == CudaState::Mode::Capture || st.mode == CudaState::Mode::Replay) {
    const CudaState::Graph& g = *st.graph;
    if (st.meta_i >= g.meta_sizes.size() || g.meta_sizes[st.meta_i] != values.size())
      fail("CUDA graph step: metadata upload ", st.meta_i, " differs from the recorded step of this shape");
    ++st.meta_i;
    std::copy(values.begin(), values.end(), st.meta_host.begin() + st.meta_off);
    const int* dev = g.meta.as<int>() + st.meta_off;
    st.meta_off += values.size();
    return dev;
  }
  if (st.mode == CudaState::Mode::Record) st.graph->meta_sizes.push_back(values.size());
  keep = pool_alloc(DType::I32, {int64_t(std::max<size_t>(values.size(), 1))});
  LMD_CUDA_CHECK(cudaMemcpyAsync(keep.data, values.data(), values.size() * sizeof(int),
                                 cudaMemcpyHostToDevice, st.stream));
  return keep.as<int>();
}

bool CudaBackend::begin_graph_step(const BatchLayout& batch) {
  CudaState& st = *state_;
  if (st.mode != CudaState::Mode::Eager) fail("CUDA graph steps do not nest");
  size_t max_blocks = 1;
  for (const SeqSlice& s : batch.seqs) max_blocks = std::max(max_blocks, s.blocks.size());
  // Strides are powers of two so that a growing context recaptures a shape only log2 times.
  st.graph_key = {int(batch.seqs.size()), int(std::bit_ceil(max_blocks))};
  auto [it, fresh] = st.graphs.try_emplace(st.graph_key);
  CudaState::Graph& g = it->second;
  if (g.disabled) return false;
  st.graph = &g;
  st.alloc_i = st.alloc_off = st.meta_i = st.meta_off = 0;
  st.staged.clear();
  if (fresh) {
    st.mode = CudaState::Mode::Record;
    return true;
  }
  size_t arena = 0, meta = 0;
  for (size_t b : g.alloc_sizes) arena += b;
  for (size_t n : g.meta_sizes) meta += n;
  st.meta_host.assign(meta, 0);
  if (g.exec) {
    st.mode = CudaState::Mode::Replay;
    return true;
  }
  g.arena = pool_alloc(DType::U8, {int64_t(std::max<size_t>(arena, 1))});
  g.meta = pool_alloc(DType::I32, {int64_t(std::max<size_t>(meta, 1))});
  // Thread-local: other threads' CUDA calls (a server's) stay legal while the scheduler captures.
  LMD_CUDA_CHECK(cudaStreamBeginCapture(st.stream, cudaStreamCaptureModeThreadLocal));
  st.mode = CudaState::Mode::Capture;
  return true;
}

bool CudaBackend::end_graph_step(bool launch) {
  CudaState& st = *state_;
  const CudaState::Mode mode = st.mode;
  CudaState::Graph& g = *st.graph;
  st.mode = CudaState::Mode::Eager;
  st.graph = nullptr;
  st.staged.clear();
  cudaError_t err = cudaSuccess;
  if (mode == CudaState::Mode::Capture) {
    cudaGraph_t graph = nullptr;
    err = cudaStreamEndCapture(st.stream, &graph);
    if (err == cudaSuccess && launch) err = cudaGraphInstantiate(&g.exec, graph, 0);
    if (graph) cudaGraphDestroy(graph);
    if (err != cudaSuccess) cudaGetLastError(), g.exec = nullptr;
  }
  const bool consumed = st.alloc_i == g.alloc_sizes.size() && st.meta_i == g.meta_sizes.size();
  if (mode == CudaState::Mode::Record) {
    if (!launch) st.graphs.erase(st.graph_key);  // recorded again by the next step of this shape
    return true;
  }
  if (launch && err == cudaSuccess && consumed) {
    if (!st.meta_host.empty())
      LMD_CUDA_CHECK(cudaMemcpyAsync(g.meta.data, st.meta_host.data(), st.meta_host.size() * sizeof(int),
                                     cudaMemcpyHostToDevice, st.stream));
    LMD_CUDA_CHECK(cudaGraphLaunch(g.exec, st.stream));
    if (mode == CudaState::Mode::Capture) {
      ++st.counts.captured;
    } else {
      ++st.counts.replayed;
    }
    return true;
  }
  // A capture or replay that failed queued nothing: this shape runs eagerly from now on.
  if (g.exec) cudaGraphExecDestroy(g.exec);
  g.exec = nullptr;
  g.disabled = true;
  ++st.counts.failed;
  return false;
}

const int* CudaBackend::upload_meta(int slot, const std::vector<int>& values) {
  if (state_->mode != CudaState::Mode::Eager) {
    CudaState::Staged& s = state_->staged[slot];
    if (s.dev && s.values == values) return s.dev;
    s.values = values;
    s.dev = stage(values, s.keep);
    return s.dev;
  }
  CudaState::Meta& m = state_->meta[slot];
  if (!m.dev.empty() && m.host == values) return m.dev.as<int>();
  m.host = values;
  m.dev = alloc(DType::I32, {int64_t(std::max<size_t>(values.size(), 1))});
  LMD_CUDA_CHECK(cudaMemcpyAsync(m.dev.data, m.host.data(), values.size() * sizeof(int),
                                 cudaMemcpyHostToDevice, state_->stream));
  return m.dev.as<int>();
}

void CudaBackend::embedding(const DeviceTensor& table, const std::vector<int>& ids, DeviceTensor& out) {
  require_same(table, out, "embedding");
  const int64_t vocab = table.dim(0);
  for (int id : ids)
    if (id < 0 || id >= vocab) fail("token id ", id, " is outside the vocabulary (", vocab, ")");
  gather_rows(table, ids, out);
}

void CudaBackend::gather_rows(const DeviceTensor& x, const std::vector<int>& rows, DeviceTensor& out) {
  require_same(x, out, "gather_rows");
  if (rows.empty()) return;
  const int64_t n = x.numel() / x.dim(-1);
  for (int r : rows)
    if (r < 0 || r >= n) fail("CUDA gather_rows: row ", r, " is outside [0, ", n, ")");
  DeviceTensor keep;
  const int* idx = stage(rows, keep);
  if (replaying()) return;
  cuda::gather_rows(x.data, idx, int(rows.size()), x.dim(-1) * int64_t(dtype_size(x.dtype)), out.data,
                    state_->stream);
}

void CudaBackend::greedy(const DeviceTensor& logits, DeviceTensor& out) {
  if (logits.dtype != DType::F32 || out.dtype != DType::F32)
    fail("CUDA greedy: logits and output must be fp32");
  const int64_t vocab = logits.dim(-1), rows = logits.numel() / vocab;
  if (out.numel() != 2 * rows) fail("CUDA greedy: output has ", out.numel(), " values for ", rows, " rows");
  if (replaying() || rows == 0) return;
  cuda::greedy(logits.as<float>(), int(rows), int(vocab), out.as<float>(), state_->stream);
}

void CudaBackend::sample(const DeviceTensor& logits, const std::vector<SampleRow>& rows, DeviceTensor& out) {
  if (state_->mode != CudaState::Mode::Eager)
    fail("CUDA sample: not part of a graph step (its penalty lists change size); call it after the step");
  if (logits.dtype != DType::F32 || out.dtype != DType::F32)
    fail("CUDA sample: logits and output must be fp32");
  const int64_t vocab = logits.dim(-1), n = int64_t(rows.size());
  if (logits.numel() != n * vocab || out.numel() != 2 * n)
    fail("CUDA sample: ", n, " rows of parameters for logits ", shape_str(logits.shape), " and output ",
         shape_str(out.shape));
  if (vocab >= cuda::kMaxSampleVocab)
    fail("CUDA sample: a vocabulary of ", vocab, " is beyond the kernel's ", cuda::kMaxSampleVocab);
  if (n == 0) return;
  // Metadata: cuda::SampleParams per row, then every row's (token, generated) penalty pairs.
  constexpr size_t kWords = sizeof(cuda::SampleParams) / sizeof(int);
  std::vector<int> meta(n * kWords);
  std::vector<int> row_of_token(vocab, -1);  // catches a token listed twice for one row
  bool any_penalties = false;
  for (int64_t r = 0; r < n; ++r) {
    const SamplingParams& sp = rows[r].params;
    if (!sp.greedy() && !(rows[r].uniform >= 0.0 && rows[r].uniform < 1.0))
      fail("CUDA sample: row ", r, "'s random draw ", rows[r].uniform, " is outside [0, 1)");
    cuda::SampleParams q{sp.temperature,
                         sp.top_k,
                         sp.top_p,
                         sp.min_p,
                         sp.repetition_penalty,
                         sp.frequency_penalty,
                         sp.presence_penalty,
                         int((meta.size() - n * kWords) / 2),
                         0,
                         0,
                         rows[r].uniform};
    if (sp.penalised()) {
      for (const PenaltyToken& t : rows[r].penalties) {
        if (t.token < 0 || t.token >= vocab) continue;  // as the reference: outside the vocabulary, ignored
        if (row_of_token[t.token] == r)
          fail("CUDA sample: row ", r, " lists penalty token ", t.token, " twice");
        row_of_token[t.token] = int(r);
        meta.push_back(t.token);
        meta.push_back(t.generated);
        ++q.penalty_count;
      }
    }
    any_penalties |= q.penalty_count > 0;
    std::memcpy(meta.data() + r * kWords, &q, sizeof(q));
  }
  DeviceTensor keep, work;
  const int* dev = stage(meta, keep);
  if (any_penalties) work = alloc(DType::F32, {n, vocab});
  cuda::sample(logits.as<float>(), int(n), int(vocab), reinterpret_cast<const cuda::SampleParams*>(dev),
               dev + n * kWords, work.empty() ? nullptr : work.as<float>(), out.as<float>(), state_->stream);
}

void CudaBackend::rmsnorm(const DeviceTensor& x, const DeviceTensor& weight, float eps, DeviceTensor& out) {
  require_same(x, weight, "rmsnorm");
  require_same(x, out, "rmsnorm");
  const int n = int(x.dim(-1));
  if (replaying()) return;
  cuda::rmsnorm(x.dtype, x.data, nullptr, weight.data, eps, x.numel() / n, n, out.data, state_->stream);
}

void CudaBackend::add_rmsnorm(DeviceTensor& residual, const DeviceTensor& x, const DeviceTensor& weight,
                              float eps, DeviceTensor& out) {
  require_same(x, residual, "add_rmsnorm");
  require_same(x, weight, "add_rmsnorm");
  require_same(x, out, "add_rmsnorm");
  const int n = int(x.dim(-1));
  if (replaying()) return;
  cuda::rmsnorm(x.dtype, x.data, residual.data, weight.data, eps, x.numel() / n, n, out.data, state_->stream);
}

void CudaBackend::gemm(const DeviceTensor& x, const void* weight, int64_t in, int64_t outf, int64_t tokens,
                       DeviceTensor& out) {
  // Row-major out[T, out] = x[T, in] W[out, in]^T is column-major out^T = W^T(op T) x^T.
  const float alpha = 1.f, beta = 0.f;
  const cudaDataType type = cuda_type(x.dtype);
  LMD_CUBLAS_CHECK(cublasGemmEx(state_->cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(outf), int(tokens), int(in),
                                &alpha, weight, type, int(in), x.data, type, int(in), &beta, out.data,
                                cuda_type(out.dtype), int(outf), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void CudaBackend::reserve_w4a16_workspace(int64_t in, int64_t outf, DType compute) {
  // Sized at load for the largest int4 linear, so that linear() never allocates: a decode-step graph
  // captures these pointers and replays them later. Raw bytes: linears prepared for different activation
  // dtypes (tests do) share the one buffer.
  CudaState& st = *state_;
  const int64_t n = in * outf * int64_t(dtype_size(compute));
  if (st.w4_dense.numel() < n) st.w4_dense = pool_alloc(DType::U8, {n});
  if (st.w4_x_fragments.numel() < cuda::kW4GemvChunkRows * in)
    st.w4_x_fragments = pool_alloc(DType::F16, {cuda::kW4GemvChunkRows * in});
}

void CudaBackend::linear(const DeviceTensor& x, const DeviceLinear& w, DeviceTensor& out) {
  if (!w.is_int4()) require_same(x, w.weight, "linear");
  // The output may be fp32 from 16-bit inputs (the logits: fp16 logits tie and flip greedy choices).
  if (out.dtype != x.dtype && !(out.dtype == DType::F32 && w.bias.empty() && !w.is_int4()))
    require_same(x, out, "linear");
  const int64_t in = w.in_features, outf = w.out_features, tokens = x.numel() / in;
  if (x.dim(-1) != in) fail("linear: input has ", x.dim(-1), " features, weight expects ", in);
  if (tokens == 0 || replaying()) return;
  CudaState& st = *state_;
  if (!w.is_int4()) {
    if (tokens <= st.dense_gemv_max_rows &&
        cuda::dense_gemv_supported(x.dtype, out.dtype, int(tokens), int(in)))
      cuda::dense_gemv(x.dtype, out.dtype, x.data, w.weight.data, int(tokens), int(in), int(outf), out.data,
                       st.stream, {}, st.dense_stream ? st.sms : 0);
    else
      gemm(x, w.weight.data, in, outf, tokens, out);
  } else if (tokens < st.w4_dense_from) {
    const cuda::W4Plan plan = st.w4_plan(tokens, in, outf);
    if (plan.wide && st.w4_x_fragments.nbytes() < size_t(cuda::kW4GemvChunkRows * in) * sizeof(uint16_t))
      fail("CUDA linear: the int4 GEMV workspace was not reserved for ", in, " inputs");
    cuda::w4a16_gemv(x.dtype, x.data, int(in), w.group_size, w.qweight.as<int32_t>(), w.scales.data, plan,
                     st.w4_x_fragments.data, out.data, st.stream);
  } else {
    if (st.w4_dense.nbytes() < size_t(in * outf) * dtype_size(x.dtype))
      fail("CUDA linear: the int4 dequantization workspace was not reserved for ", dtype_name(x.dtype), " ",
           in, "x", outf);
    cuda::w4a16_dequantize(x.dtype, int(in), int(outf), w.group_size, w.qweight.as<int32_t>(), w.scales.data,
                           st.w4_dense.data, st.stream);
    gemm(x, st.w4_dense.data, in, outf, tokens, out);
  }
  if (!w.bias.empty()) {
    require_same(x, w.bias, "linear bias");
    cuda::add_bias(x.dtype, out.data, w.bias.data, tokens, int(outf), st.stream);
  }
}

bool CudaBackend::fused_linear(const DeviceTensor& x, const DeviceLinear& w, DeviceTensor& out,
                               const cuda::GemvPrologue& pro) {
  CudaState& st = *state_;
  const int64_t in = w.in_features, outf = w.out_features, tokens = out.numel() / std::max<int64_t>(outf, 1);
  const unsigned needs = pro.kind == cuda::GemvPrologueKind::AddNorm ? kFuseNorm : kFuseSwiglu;
  if (!(st.fused_ops & needs) || out.dim(-1) != outf || (!w.is_int4() && x.dtype != w.weight.dtype))
    return false;
  const bool dense = !w.is_int4() && tokens <= st.dense_gemv_max_rows &&
                     cuda::dense_gemv_supported(x.dtype, out.dtype, int(tokens), int(in), pro.kind);
  const bool int4 = w.is_int4() && tokens < st.w4_dense_from && out.dtype == x.dtype &&
                    cuda::w4a16_prologue_supported(x.dtype, int(tokens), int(in));
  if (!dense && !int4) return false;
  if (tokens == 0 || replaying()) return true;
  if (dense)
    cuda::dense_gemv(x.dtype, out.dtype, nullptr, w.weight.data, int(tokens), int(in), int(outf), out.data,
                     st.stream, pro, st.dense_stream ? st.sms : 0);
  else
    cuda::w4a16_gemv(x.dtype, nullptr, int(in), w.group_size, w.qweight.as<int32_t>(), w.scales.data,
                     st.w4_plan(tokens, in, outf), nullptr, out.data, st.stream, pro);
  if (!w.bias.empty()) {
    require_same(x, w.bias, "linear bias");
    cuda::add_bias(x.dtype, out.data, w.bias.data, tokens, int(outf), st.stream);
  }
  return true;
}

void CudaBackend::add_rmsnorm_linear(DeviceTensor& residual, const DeviceTensor& x,
                                     const DeviceTensor& weight, float eps, const DeviceLinear& w,
                                     DeviceTensor& normed, DeviceTensor& out) {
  require_same(x, residual, "add_rmsnorm_linear");
  require_same(x, weight, "add_rmsnorm_linear");
  if (x.dim(-1) == w.in_features && residual.numel() == x.numel() && weight.numel() == w.in_features &&
      out.numel() / std::max<int64_t>(w.out_features, 1) == x.numel() / x.dim(-1)) {
    cuda::GemvPrologue pro;
    pro.kind = cuda::GemvPrologueKind::AddNorm;
    pro.src = x.data;
    pro.residual = residual.data;
    pro.norm_weight = weight.data;
    pro.eps = eps;
    pro.arrivals = state_->prologue_arrivals.as<unsigned>();
    if (fused_linear(x, w, out, pro)) return;
  }
  Backend::add_rmsnorm_linear(residual, x, weight, eps, w, normed, out);
}

void CudaBackend::silu_mul_linear(const DeviceTensor& gate_up, const DeviceLinear& w, DeviceTensor& act,
                                  DeviceTensor& out) {
  if (gate_up.dim(-1) == 2 * w.in_features &&
      out.numel() / std::max<int64_t>(w.out_features, 1) == gate_up.numel() / gate_up.dim(-1)) {
    cuda::GemvPrologue pro;
    pro.kind = cuda::GemvPrologueKind::SiluMul;
    pro.src = gate_up.data;
    if (fused_linear(gate_up, w, out, pro)) return;
  }
  Backend::silu_mul_linear(gate_up, w, act, out);
}

void CudaBackend::set_fused_ops(unsigned ops) {
  CudaState& st = *state_;
  if (ops & ~unsigned(kFuseAll)) fail("set_fused_ops: unknown flags ", ops);
  if (ops == st.fused_ops) return;
  st.kernels_changing("set_fused_ops");
  st.fused_ops = ops;
}

void CudaBackend::set_w4a16_dense_from(int rows) { state_->w4_dense_from = rows; }
void CudaBackend::set_w4a16_stream(bool on) {
  CudaState& st = *state_;
  if (on == st.w4_stream) return;
  st.kernels_changing("set_w4a16_stream");
  st.w4_stream = on;
}
void CudaBackend::set_dense_gemv_stream(bool on) {
  CudaState& st = *state_;
  if (on == st.dense_stream) return;
  st.kernels_changing("set_dense_gemv_stream");
  st.dense_stream = on;
}
void CudaBackend::set_wide_decode_attention(bool on) {
  CudaState& st = *state_;
  if (on == st.wide_decode) return;
  st.kernels_changing("set_wide_decode_attention");
  st.wide_decode = on;
}
void CudaBackend::set_dense_gemv_max_rows(int rows) {
  state_->dense_gemv_max_rows = std::min(rows, cuda::kDenseGemvMaxRows);
}
int CudaBackend::dense_gemv_max_rows() const { return state_->dense_gemv_max_rows; }

std::vector<int> CudaBackend::rope_meta(const DeviceTensor& qkv, const BatchLayout& batch, int heads,
                                        const RopeConfig& rope, const KvCacheStorage& cache, int& freq_off) {
  const KvCacheLayout& L = cache.layout;
  const int tokens = batch.num_tokens(), half = L.head_dim / 2;
  if (qkv.dim(-1) != int64_t(heads + 2 * L.kv_heads) * L.head_dim)
    fail("CUDA rope_kv_write: qkv has ", qkv.dim(-1), " columns, expected ",
         (heads + 2 * L.kv_heads) * L.head_dim);
  if (L.quant_bits == 0) require_same(qkv, cache.data, "rope_kv_write (cache)");
  // meta: token_seq [T], token_pos [T], seq_block_off [S], blocks..., inv_freq [S, half] (float bits).
  const int seqs = int(batch.seqs.size());
  const bool graph = state_->mode != CudaState::Mode::Eager;
  std::vector<int> meta(2 * tokens + seqs);
  std::vector<float> freqs;
  for (int s = 0; s < seqs; ++s) {
    const SeqSlice& q = batch.seqs[s];
    if ((q.context_len + q.num_new + L.block_len - 1) / L.block_len > int(q.blocks.size()))
      fail("CUDA rope_kv_write: sequence ", s, " has too few cache blocks");
    for (int i = 0; i < q.num_new; ++i) {
      meta[q.token_offset + i] = s;
      meta[tokens + q.token_offset + i] = q.context_len + i;
    }
    meta[2 * tokens + s] = int(meta.size());
    if (graph) {
      const std::vector<int> padded = cuda::padded_blocks(q.blocks, state_->graph_stride());
      meta.insert(meta.end(), padded.begin(), padded.end());
    } else {
      meta.insert(meta.end(), q.blocks.begin(), q.blocks.end());
    }
    const std::vector<float> f = rope_inv_freq(rope, q.context_len + q.num_new);
    freqs.insert(freqs.end(), f.begin(), f.begin() + half);
  }
  freq_off = int(meta.size());
  for (float f : freqs) meta.push_back(std::bit_cast<int>(f));
  return meta;
}

void CudaBackend::rope_kv_write(DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                                const RopeConfig& rope, KvCacheStorage& cache) {
  const KvCacheLayout& L = cache.layout;
  int freq_off = 0;
  const std::vector<int> meta = rope_meta(qkv, batch, heads, rope, cache, freq_off);
  const int tokens = batch.num_tokens();
  if (tokens == 0) return;
  const int* dev = upload_meta(0, meta);
  if (replaying()) return;
  const cuda::KvGeometry g{L.layers, L.kv_heads, L.head_dim, L.block_len, layer, L.quant_bits};
  cuda::StaticKvParams fixed;
  if (L.is_static()) {
    const float* p = L.static_params.data() + int64_t(layer) * 4;
    fixed = {true, p[0], p[1], p[2], p[3]};
  }
  cuda::rope_kv_write(qkv.dtype, qkv.data, tokens, heads, g, dev, dev + tokens, dev + 2 * tokens, dev,
                      reinterpret_cast<const float*>(dev + freq_off), cache.data.data,
                      cache.params.empty() ? nullptr : cache.params.as<uint16_t>(), fixed, state_->stream);
}

void CudaBackend::attention(const DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                            const KvCacheStorage& cache, DeviceTensor& out) {
  run_attention(qkv, batch, layer, heads, cache, out, {});
}

void CudaBackend::rope_kv_attention(DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                                    const RopeConfig& rope, KvCacheStorage& cache, DeviceTensor& out) {
  const KvCacheLayout& L = cache.layout;
  const cuda::KvGeometry g{L.layers, L.kv_heads, L.head_dim, L.block_len, layer, L.quant_bits};
  bool decode = !batch.seqs.empty();
  for (const SeqSlice& s : batch.seqs) decode &= s.num_new == 1;
  if (!(state_->fused_ops & kFuseRope) || !decode || !cuda::attn_decode_rope(int(dtype_size(qkv.dtype)), g)) {
    Backend::rope_kv_attention(qkv, batch, layer, heads, rope, cache, out);
    return;
  }
  int freq_off = 0;
  const std::vector<int> meta = rope_meta(qkv, batch, heads, rope, cache, freq_off);
  const int* dev = upload_meta(0, meta);
  run_attention(qkv, batch, layer, heads, cache, out,
                {dev, reinterpret_cast<const float*>(dev + freq_off), cache.data.data});
}

void CudaBackend::run_attention(const DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                                const KvCacheStorage& cache, DeviceTensor& out,
                                const cuda::DecodeRope& rope) {
  const KvCacheLayout& L = cache.layout;
  require_same(qkv, out, "attention");
  if (L.quant_bits == 0) require_same(qkv, cache.data, "attention (cache)");
  const cuda::KvGeometry g{L.layers, L.kv_heads, L.head_dim, L.block_len, layer, L.quant_bits};
  const bool graph = state_->mode != CudaState::Mode::Eager;
  const cuda::AttnPlan plan =
      cuda::plan_attention(batch.seqs, heads, int(dtype_size(qkv.dtype)), g, state_->sms,
                           graph ? state_->graph_stride() : 0, state_->wide_decode);
  if (plan.work.empty()) return;
  static_assert(sizeof(cuda::AttnWork) % sizeof(int) == 0 && sizeof(cuda::AttnCombine) % sizeof(int) == 0);
  const size_t work_ints = plan.work.size() * sizeof(cuda::AttnWork) / sizeof(int);
  std::vector<int> meta(work_ints + plan.combine.size() * sizeof(cuda::AttnCombine) / sizeof(int));
  std::memcpy(meta.data(), plan.work.data(), plan.work.size() * sizeof(cuda::AttnWork));
  std::memcpy(meta.data() + work_ints, plan.combine.data(), plan.combine.size() * sizeof(cuda::AttnCombine));
  const int blocks_off = int(meta.size());
  meta.insert(meta.end(), plan.blocks.begin(), plan.blocks.end());
  const int* dev = upload_meta(1, meta);
  if (cuda::attn_counter_ints(plan.num_decode_combine, g) > state_->attn_counters.numel())
    fail("CUDA attention: ", plan.num_decode_combine, " merges over ", g.kv_heads,
         " KV heads exceed the arrival counters");

  DeviceTensor scratch;
  if (plan.partials > 0) scratch = alloc(DType::F32, {cuda::attn_partial_floats(plan.partials, g)});
  if (replaying()) return;
  cuda::attention(qkv.dtype, qkv.data, heads, g, reinterpret_cast<const cuda::AttnWork*>(dev),
                  int(plan.work.size()), plan.num_decode, plan.decode_rows, plan.decode_warps,
                  reinterpret_cast<const cuda::AttnCombine*>(dev + work_ints), int(plan.combine.size()),
                  plan.num_decode_combine, dev + blocks_off, cache.data.data,
                  cache.params.empty() ? nullptr : cache.params.as<uint16_t>(),
                  scratch.empty() ? nullptr : scratch.as<float>(), state_->attn_counters.as<int>(), out.data,
                  state_->stream, rope);
}

void CudaBackend::silu_mul(const DeviceTensor& gate_up, DeviceTensor& out) {
  require_same(gate_up, out, "silu_mul");
  const int inter = int(out.dim(-1));
  if (gate_up.dim(-1) != 2 * int64_t(inter))
    fail("CUDA silu_mul: gate_up has ", gate_up.dim(-1), " columns, expected ", 2 * inter);
  if (replaying()) return;
  cuda::silu_mul(out.dtype, gate_up.data, out.numel() / inter, inter, out.data, state_->stream);
}

}  // namespace lmd
