#include "runtime.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iomanip>
#include <random>

#include "lmd/core/error.h"
#include "lmd/core/workspace.h"
#include "lmd/engine/cpu_backend.h"
#if defined(LMD_HAVE_CUDA)
#include "lmd/cuda/cuda_backend.h"
#endif

namespace lmd {
namespace {

// config.ini values are a workspace's defaults; flags given on the command line override them.
cli::EngineOptions with_workspace_defaults(cli::EngineOptions o, const WorkspaceConfig& ws) {
  const WorkspaceEngineDefaults& e = ws.engine;
  if (!o.was_given("session-len")) o.session_len = e.session_len;
  if (!o.was_given("quant-policy")) o.quant_policy = e.quant_policy;
  if (!o.was_given("cache-max-entry-count")) o.cache_max_entry_count = e.cache_max_entry_count;
  if (!o.was_given("cache-block-seq-len")) o.cache_block_seq_len = e.cache_block_seq_len;
  if (!o.was_given("max-batch-size")) o.max_batch_size = e.max_batch_size;
  if (!o.was_given("tp")) o.tp = ws.tensor_para_size;
  return o;
}

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// GiB, or MiB for the small models where GiB would read 0.00.
std::string gib(double bytes) {
  char buf[32];
  if (bytes < 0.1 * kGiB) {
    std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / (1024.0 * 1024.0));
  } else {
    std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / kGiB);
  }
  return buf;
}

std::string millions(int64_t n) {
  char buf[32];
  std::snprintf(buf, sizeof buf, n >= 1e9 ? "%.2fB" : "%.2fM", n >= 1e9 ? n / 1e9 : n / 1e6);
  return buf;
}

}  // namespace

std::vector<int> Runtime::stop_token_ids() const {
  std::vector<int> ids;
  if (spec().eos_id >= 0) ids.push_back(spec().eos_id);
  if (tokenizer && chat_template) {
    for (const std::string& word : chat_template->stop_words())
      if (auto id = tokenizer->special_id(word)) ids.push_back(*id);
  }
  return ids;
}

std::unique_ptr<Backend> make_backend(const std::string& device, int cpu_threads) {
  if (device == "cpu") return std::make_unique<CpuBackend>(cpu_threads);
#if defined(LMD_HAVE_CUDA)
  if (device == "cuda" || device == "auto") {
    if (cuda_device_available()) return std::make_unique<CudaBackend>();
    if (device == "cuda")
      fail("--device cuda: no CUDA device is available on this machine (use --device cpu)");
  }
#else
  if (device == "cuda")
    fail(
        "--device cuda: this lmd was built without the CUDA backend (rebuild with a CUDA toolkit, or use "
        "--device cpu)");
#endif
  if (device != "auto") fail("--device must be auto, cpu or cuda, got '", device, "'");
  return std::make_unique<CpuBackend>(cpu_threads);
}

std::unique_ptr<Runtime> load_runtime(const std::string& model_path, const cli::EngineOptions& flags,
                                      std::ostream& log) {
  namespace fs = std::filesystem;
  auto rt = std::make_unique<Runtime>();
  rt->model_dir = model_path;
  if (!fs::is_directory(rt->model_dir))
    fail("model path '", model_path,
         "' is not a directory (expected a Hugging Face checkpoint folder or an `lmd convert` workspace)");
  // A workspace (`lmd convert`) carries its model description and engine defaults in config.ini.
  const std::optional<fs::path> workspace = find_workspace_weights(rt->model_dir);
  std::optional<WorkspaceConfig> ws_config;
  if (workspace) ws_config = read_workspace_config(*workspace);
  const cli::EngineOptions options = ws_config ? with_workspace_defaults(flags, *ws_config) : flags;
  const ModelSpec spec = ws_config ? ws_config->spec : load_model_spec(rt->model_dir);
  const fs::path config_file = workspace ? *workspace / "config.ini" : rt->model_dir / "config.json";
  if (options.model_format == "awq" && !spec.awq.enabled)
    fail("--model-format awq: ", config_file.string(),
         " has no AWQ quantization (quantize it with `lmd lite auto_awq` first)");
  if (!options.model_format.empty() && options.model_format != "hf" && options.model_format != "awq")
    fail("--model-format must be hf or awq, got '", options.model_format, "'");
  if (options.tp != 1) fail("--tp ", options.tp, ": tensor parallelism is not available yet; use --tp 1");

  rt->backend = make_backend(options.device, options.threads);
  log << "lmd: loading " << model_path << " on " << rt->backend->name() << "\n";
  const auto t0 = std::chrono::steady_clock::now();
  const CheckpointWeights weights =
      workspace ? load_workspace_weights(*workspace, spec) : load_checkpoint(rt->model_dir, spec);
  rt->tokenizer = Tokenizer::load(workspace ? workspace_tokenizer_dir(*workspace) : rt->model_dir);
  // A workspace keeps the template named at convert time.
  rt->chat_template = !ws_config ? select_chat_template(rt->model_dir, options.chat_template)
                      : options.chat_template.empty() ? ChatTemplate::builtin(ws_config->chat_template)
                                                      : ChatTemplate::parse(options.chat_template);
  // A terminal sees one line that counts up; a log file gets a line per quarter of the layers.
  const bool tty = isatty(STDERR_FILENO);
  rt->model = std::make_unique<Model>(spec, weights, *rt->backend, [&](int done, int total) {
    if (tty) {
      log << "\rlmd: uploading layer " << done << "/" << total << std::flush;
    } else if (done * 4 / total != (done - 1) * 4 / total) {
      log << "lmd: uploaded layer " << done << "/" << total << "\n";
    }
  });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  log << (tty ? "\r" : "") << "lmd: " << arch_name(spec.arch) << ", " << spec.layers << " layers, hidden "
      << spec.hidden << ", " << spec.heads << " heads / " << spec.kv_heads << " KV heads, vocab "
      << spec.vocab << ", " << millions(spec.param_count()) << " params, "
      << (spec.awq.enabled ? "awq int4 + " : "") << dtype_name(spec.dtype) << " weights, "
      << gib(rt->model->weight_bytes()) << ", loaded in " << std::fixed << std::setprecision(2) << secs
      << std::defaultfloat << " s\n";
  log << "lmd: chat template " << rt->chat_template->name() << "\n";

  EngineConfig& cfg = rt->engine_config;
  cfg.block_len = options.cache_block_seq_len;
  if (cfg.block_len <= 0) fail("--cache-block-seq-len must be positive, got ", cfg.block_len);
  cfg.session_len = options.session_len > 0 ? options.session_len : spec.max_position;
  cfg.max_batch_size = options.max_batch_size;
  cfg.max_prefill_tokens = options.max_prefill_token_num;
  cfg.quant_bits = options.quant_policy;
  // Offline per-layer KV int8 (`lite kv_qparams`) applies unless --quant-policy asks for online quantization.
  const bool static_kv = ws_config && ws_config->engine.static_kv_int8 && cfg.quant_bits == 0;
  if (static_kv) {
    cfg.quant_bits = 8;
    cfg.kv_static_params = read_static_kv_params(*workspace, spec.layers);
  }
  auto block_bytes_for = [&](int bits) {
    KvCacheLayout one = rt->model->kv_layout(1, cfg.block_len, bits);
    if (bits == cfg.quant_bits) one.static_params = cfg.kv_static_params;
    const KvCacheStorage probe = rt->backend->alloc_kv_cache(one, rt->model->activation_dtype());
    return double(probe.data.nbytes() + probe.params.nbytes());
  };
  const double block_bytes = block_bytes_for(cfg.quant_bits);
  const int blocks_per_session = blocks_for(cfg.session_len, cfg.block_len);
  if (options.cache_max_entry_count >= 1) {
    cfg.num_blocks = int(options.cache_max_entry_count);
  } else if (options.cache_max_entry_count > 0) {
    double budget = options.cache_max_entry_count * double(rt->backend->free_memory());
    cfg.num_blocks = int(budget / block_bytes);
    if (rt->backend->kind() == DeviceKind::CPU) {
      // Host memory is shared with everything else: never reserve more than the batch can use.
      cfg.num_blocks = std::min<int64_t>(cfg.num_blocks, int64_t(blocks_per_session) * cfg.max_batch_size);
    }
  } else {
    fail("--cache-max-entry-count must be > 0, got ", options.cache_max_entry_count);
  }
  if (cfg.num_blocks < 1)
    fail("--cache-max-entry-count ", options.cache_max_entry_count, " leaves no memory for the KV cache (",
         gib(rt->backend->free_memory()), " free after loading the weights)");
  const int64_t tokens = int64_t(cfg.num_blocks) * cfg.block_len;
  log << "lmd: KV cache " << gib(block_bytes * cfg.num_blocks) << " = " << cfg.num_blocks << " blocks x "
      << cfg.block_len << " tokens = " << tokens << " tokens"
      << (static_kv        ? " (static int8 KV, per-layer offline scales)"
          : cfg.quant_bits ? " (int" + std::to_string(cfg.quant_bits) + " KV)"
                           : std::string())
      << "\n";
  if (cfg.quant_bits) {
    char ratio[16];
    std::snprintf(ratio, sizeof ratio, "%.2f", block_bytes_for(0) / block_bytes);
    log << "lmd: quantized KV: the same memory holds " << ratio << "x the tokens of an unquantized "
        << dtype_name(rt->model->activation_dtype()) << " KV cache\n";
  }
  if (tokens < cfg.session_len)
    log << "lmd: warning: --session-len " << cfg.session_len << " does not fit in the KV cache; at most "
        << tokens << " tokens fit (raise --cache-max-entry-count or lower --session-len)\n";
  rt->engine = std::make_unique<Engine>(*rt->model, cfg);
  return rt;
}

GenerationConfig generation_config(const cli::SamplingOptions& o) {
  GenerationConfig g;
  g.max_new_tokens = o.max_new_tokens;
  g.sampling.temperature = float(o.temperature);
  g.sampling.top_k = o.top_k;
  g.sampling.top_p = float(o.top_p);
  g.sampling.min_p = float(o.min_p);
  g.sampling.repetition_penalty = float(o.repetition_penalty);
  g.sampling.seed = o.seed ? *o.seed : std::random_device{}();
  return g;
}

}  // namespace lmd
