#include "bench.h"

#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <latch>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cli_common.h"
#include "lmd/core/error.h"
#include "lmd/core/random_checkpoint.h"
#include "runtime.h"

namespace lmd {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// "13.48 GB", "1.04 MB": decimal units, as bandwidth figures are quoted.
std::string decimal_bytes(double bytes) {
  const char* unit = bytes >= 1e9 ? "GB" : bytes >= 1e6 ? "MB" : "KB";
  char text[32];
  std::snprintf(text, sizeof text, "%.2f %s", bytes / (bytes >= 1e9 ? 1e9 : bytes >= 1e6 ? 1e6 : 1e3), unit);
  return text;
}

// Writes through a temporary name and a rename, so that an interrupted run never leaves half a report.
void write_file_atomically(const fs::path& path, const std::string& text, const char* flag) {
  fs::path tmp = path;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail(flag, " ", path.string(), ": cannot create ", tmp.string());
    out << text;
    if (!out.flush()) fail(flag, " ", path.string(), ": writing ", tmp.string(), " failed (disk full?)");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) fail(flag, " ", path.string(), ": cannot rename ", tmp.string(), ": ", ec.message());
}

// ---------------------------------------------------------------------------------------------------
// lmd bench make-model

struct MakeModelOptions {
  std::string shape, dst, dtype, tokenizers, max_shard_size = "4GB";
  uint64_t seed = 0;
  int layers = 0, threads = 0;
};

// Beside the checkout, where the shared assets live (the tests' LMD_TEST_ASSETS wins when set).
std::string default_tokenizers_dir() {
  if (const char* env = std::getenv("LMD_TEST_ASSETS")) return (fs::path(env) / "tokenizers").string();
  return "../shared/tokenizers";
}

// "4GB", "500MB", "2GiB", "123456" -> bytes; decimal units as transformers' max_shard_size reads them.
uint64_t parse_byte_size(const std::string& text, const char* flag) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  std::string unit = text.substr(used);
  for (char& c : unit) c = char(std::toupper(static_cast<unsigned char>(c)));
  static const std::pair<const char*, double> kUnits[] = {
      {"", 1},     {"B", 1},        {"KB", 1e3},          {"MB", 1e6},
      {"GB", 1e9}, {"KIB", 1024.0}, {"MIB", kGiB / 1024}, {"GIB", kGiB}};
  for (const auto& [name, scale] : kUnits)
    if (used > 0 && unit == name && value * scale >= 1) return uint64_t(value * scale);
  fail(flag, ": expected a size such as 4GB, 500MB or 2GiB, got '", text, "'");
}

void run_make_model(const MakeModelOptions& o) {
  const RandomModelShape& shape = random_model_shape(o.shape);
  RandomCheckpointOptions options;
  if (!o.dtype.empty()) options.dtype = dtype_from_torch_name(o.dtype);
  options.seed = o.seed;
  options.layers = o.layers;
  options.threads = o.threads;
  options.max_shard_bytes = parse_byte_size(o.max_shard_size, "--max-shard-size");
  options.tokenizers_dir = o.tokenizers;
  const fs::path tokenizer_model = options.tokenizers_dir / shape.tokenizer / "tokenizer.model";
  if (!fs::is_regular_file(tokenizer_model))
    fail("--tokenizers ", o.tokenizers, ": ", tokenizer_model.string(),
         " not found (give the folder that holds internlm2/ and llama2/, or set LMD_TEST_ASSETS)");

  const auto t0 = Clock::now();
  int shown = -1;
  uint64_t written = 0;
  write_random_checkpoint(shape, o.dst, options, [&](uint64_t done, uint64_t total) {
    written = total;
    const int percent = int(100 * done / std::max<uint64_t>(total, 1));
    if (percent == shown) return;
    shown = percent;
    char line[96];
    std::snprintf(line, sizeof line, "\rlmd: writing %.2f / %.2f GB (%d%%)", done / 1e9, total / 1e9,
                  percent);
    std::cerr << line << std::flush;
  });
  std::cerr << "\n";
  char summary[160];
  std::snprintf(summary, sizeof summary, "%s shape, %d layers, %s, %.2f GB in %.1f s", shape.name.c_str(),
                o.layers > 0 ? o.layers : shape.layers,
                std::string(dtype_name(options.dtype.value_or(shape.dtype))).c_str(), written / 1e9,
                seconds_since(t0));
  std::cout << "lmd: wrote " << o.dst << ": " << summary << "\n";
}

// ---------------------------------------------------------------------------------------------------
// lmd bench generation

struct GenerationOptions {
  std::string model_path;
  cli::EngineOptions engine;
  std::vector<int> concurrency{1, 16, 64};
  std::vector<int> prompt_tokens{128, 2048};
  std::vector<int> completion_tokens{128};
  int warmup = 1, rounds = 3;
  uint64_t seed = 0;
  double peak_bandwidth = 0;  // GB/s; 0: unknown
  std::string csv, json;
};

// One request of one round, times in seconds from the round's start.
struct RequestTrace {
  double submit = 0, first = 0, last = 0;
  int tokens = 0;
  std::vector<double> gaps;  // between consecutive tokens
  std::string error;
};

struct CaseResult {
  int batch = 0, prompt = 0, completion = 0, rounds = 0;
  int64_t generated_tokens = 0;                   // per round
  double ftl_min = 0, ftl_mean = 0, ftl_max = 0;  // first-token latency, s
  double tok_p50 = 0, tok_p90 = 0, tok_p99 = 0;   // inter-token latency, s
  double decode_tok_s = 0, output_tok_s = 0, total_tok_s = 0;
  double steady_tok_s = 0;  // after the last request's first token: every sequence decoding
  double bytes_per_step = 0, gb_s = 0, steady_gb_s = 0;
  double memory_bytes = 0;
  uint64_t preemptions = 0;
};

// What the GB/s figures are computed from: bytes one decode step must read.
struct ModelTraffic {
  double weights = 0;       // weights read per step (the input embedding table is only gathered from)
  double kv_per_token = 0;  // cache bytes of one token, all layers, K and V (+ quantization params)
};

ModelTraffic model_traffic(const Runtime& rt) {
  const Model& model = *rt.model;
  const ModelSpec& spec = model.spec();
  ModelTraffic traffic;
  traffic.weights = double(model.weight_bytes());
  if (!spec.tie_embeddings) {
    // weight_bytes() counts the input table, which a step only gathers `batch` rows from. Model keeps it
    // in the activation dtype on accelerators and in the checkpoint's dtype on the CPU.
    const DType table = rt.backend->kind() == DeviceKind::CPU ? spec.dtype : model.activation_dtype();
    traffic.weights -= double(spec.vocab) * spec.hidden * dtype_size(table);
  }
  const EngineConfig& cfg = rt.engine_config;
  const KvCacheStorage probe =
      rt.backend->alloc_kv_cache(model.kv_layout(1, cfg.block_len, cfg.quant_bits), model.activation_dtype());
  // An unquantized cache may still carry a placeholder params tensor; only quantized caches read params.
  const size_t params = cfg.quant_bits ? probe.params.nbytes() : 0;
  traffic.kv_per_token = double(probe.data.nbytes() + params) / cfg.block_len;
  return traffic;
}

double kv_pool_bytes(const Runtime& rt, const ModelTraffic& traffic) {
  return traffic.kv_per_token * rt.engine_config.block_len * rt.engine_config.num_blocks;
}

// Nearest-rank percentile of sorted values.
double percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  const size_t rank = size_t(std::ceil(p / 100.0 * double(sorted.size())));
  return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

// Submits `batch` requests at once (one thread each, released together) and records when each token
// arrived. Greedy and ignore_eos, so every request generates exactly `completion` tokens.
std::vector<RequestTrace> run_round(Engine& engine, int batch, int prompt, int completion, int vocab,
                                    std::mt19937_64& rng) {
  std::vector<Request> requests(batch);
  // Ids 0-2 are unk/bos/eos in every tokenizer here; random text never contains them.
  std::uniform_int_distribution<int> id(std::min(3, vocab - 1), vocab - 1);
  for (Request& r : requests) {
    r.prompt.resize(prompt);
    for (int& t : r.prompt) t = id(rng);
    r.gen.max_new_tokens = completion;
    r.gen.ignore_eos = true;
    r.gen.sampling.temperature = 0;
  }
  std::vector<RequestTrace> traces(batch);
  std::latch start(batch);
  const auto t0 = Clock::now();
  std::vector<std::thread> threads;
  for (int i = 0; i < batch; ++i) {
    threads.emplace_back([&, i] {
      RequestTrace& trace = traces[i];
      start.arrive_and_wait();
      trace.submit = seconds_since(t0);
      std::shared_ptr<RequestStream> stream = engine.submit(std::move(requests[i]));
      TokenEvent event;
      while (stream->next(event)) {
        const double now = seconds_since(t0);
        if (event.token >= 0) {
          if (trace.tokens == 0)
            trace.first = now;
          else
            trace.gaps.push_back(now - trace.last);
          trace.last = now;
          ++trace.tokens;
        }
        if (event.finish == FinishReason::Error || event.finish == FinishReason::Cancelled)
          trace.error = event.error.empty() ? finish_reason_name(event.finish) : event.error;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (const RequestTrace& t : traces) {
    if (!t.error.empty()) fail("a benchmark request failed: ", t.error);
    if (t.tokens != completion)
      fail("a benchmark request generated ", t.tokens, " tokens instead of --completion-tokens ", completion);
  }
  return traces;
}

// Lowest free device memory seen while it runs (accelerators only: on the CPU, free memory is the
// whole machine's and says nothing about lmd).
class FreeMemoryWatch {
 public:
  explicit FreeMemoryWatch(const Backend& backend) : backend_(backend), lowest_(backend.free_memory()) {
    thread_ = std::thread([this] {
      while (!stop_) {
        lowest_ = std::min(lowest_.load(), backend_.free_memory());
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
    });
  }
  ~FreeMemoryWatch() {
    stop_ = true;
    thread_.join();
  }
  size_t lowest() const { return lowest_; }

 private:
  const Backend& backend_;
  std::atomic<size_t> lowest_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

CaseResult run_case(Runtime& rt, const GenerationOptions& o, const ModelTraffic& traffic,
                    size_t free_at_start, int batch, int prompt, int completion, std::mt19937_64& rng) {
  Engine& engine = *rt.engine;
  const int vocab = rt.spec().vocab;
  const std::string label = "batch " + std::to_string(batch) + ", prompt " + std::to_string(prompt) +
                            ", completion " + std::to_string(completion);
  for (int w = 0; w < o.warmup; ++w) {
    std::cerr << "\rlmd: " << label << ": warmup " << w + 1 << "/" << o.warmup << "   " << std::flush;
    run_round(engine, batch, prompt, completion, vocab, rng);
  }

  CaseResult r;
  r.batch = batch;
  r.prompt = prompt;
  r.completion = completion;
  r.rounds = o.rounds;
  r.generated_tokens = int64_t(batch) * completion;
  std::vector<double> first_latencies, gaps;
  double decode_tokens = 0, decode_time = 0, output_tokens = 0, all_tokens = 0, elapsed = 0;
  double steady_tokens = 0, steady_time = 0;
  const uint64_t preemptions_before = engine.stats().preemptions;
  const bool accelerator = rt.backend->kind() != DeviceKind::CPU;
  std::optional<FreeMemoryWatch> watch;
  if (accelerator) watch.emplace(*rt.backend);
  for (int round = 0; round < o.rounds; ++round) {
    std::cerr << "\rlmd: " << label << ": round " << round + 1 << "/" << o.rounds << "   " << std::flush;
    const std::vector<RequestTrace> traces = run_round(engine, batch, prompt, completion, vocab, rng);
    double first_token = 1e300, last_token = 0, first_submit = 1e300;
    for (const RequestTrace& t : traces) {
      first_latencies.push_back(t.first - t.submit);
      gaps.insert(gaps.end(), t.gaps.begin(), t.gaps.end());
      first_token = std::min(first_token, t.first);
      last_token = std::max(last_token, t.last);
      first_submit = std::min(first_submit, t.submit);
      decode_tokens += t.tokens - 1;
      output_tokens += t.tokens;
      all_tokens += t.tokens + prompt;
    }
    // Decode: from the first request's first token to the last token of all. With more prompt tokens
    // than one prefill step takes, later prefills run inside this window, as they do in serving: at
    // batch 64 x 2048 prompt tokens it was mostly prefill (251 tok/s for a 28.6 ms p50 token gap on an
    // H100). Steady decode starts at the last request's first token, when no prefill is left.
    decode_time += last_token - first_token;
    double steady_from = 0;
    for (const RequestTrace& t : traces) steady_from = std::max(steady_from, t.first);
    for (const RequestTrace& t : traces) {
      double at = t.first;
      for (double gap : t.gaps) steady_tokens += (at += gap) > steady_from;
    }
    steady_time += last_token - steady_from;
    elapsed += last_token - first_submit;
  }
  r.preemptions = engine.stats().preemptions - preemptions_before;

  std::sort(first_latencies.begin(), first_latencies.end());
  std::sort(gaps.begin(), gaps.end());
  r.ftl_min = first_latencies.front();
  r.ftl_max = first_latencies.back();
  for (double v : first_latencies) r.ftl_mean += v / double(first_latencies.size());
  r.tok_p50 = percentile(gaps, 50);
  r.tok_p90 = percentile(gaps, 90);
  r.tok_p99 = percentile(gaps, 99);
  r.decode_tok_s = decode_time > 0 ? decode_tokens / decode_time : 0;
  r.steady_tok_s = steady_time > 0 ? steady_tokens / steady_time : 0;
  r.output_tok_s = elapsed > 0 ? output_tokens / elapsed : 0;
  r.total_tok_s = elapsed > 0 ? all_tokens / elapsed : 0;
  // A decode step reads the weights once and every running sequence's context; on average a sequence
  // holds its prompt and half its completion.
  r.bytes_per_step = traffic.weights + batch * (prompt + completion / 2.0) * traffic.kv_per_token;
  r.gb_s = r.bytes_per_step * (r.decode_tok_s / batch) / 1e9;
  r.steady_gb_s = r.bytes_per_step * (r.steady_tok_s / batch) / 1e9;
  if (accelerator) {
    // Weights and KV pool were allocated before free_at_start; what the steps allocate on top comes from
    // the lowest free memory seen.
    r.memory_bytes = double(rt.model->weight_bytes()) + kv_pool_bytes(rt, traffic) +
                     double(free_at_start - std::min(free_at_start, watch->lowest()));
  } else {
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    r.memory_bytes = double(usage.ru_maxrss) * 1024.0;  // Linux reports KiB
  }
  std::cerr << "\r" << std::string(label.size() + 24, ' ') << "\r" << std::flush;
  return r;
}

std::string format_table(const std::vector<CaseResult>& results, double peak_bandwidth, bool accelerator) {
  std::ostringstream os;
  char line[320];
  std::snprintf(line, sizeof line, "%5s %6s %6s | %26s | %9s %9s %9s | %24s | %8s %8s %8s%s\n", "batch",
                "prompt", "output", "first token ms min/mean/max", "decode", "steady", "output",
                "token latency ms p50/p90/p99", accelerator ? "GPU GiB" : "RSS GiB", "GB/s", "steady",
                peak_bandwidth > 0 ? "  % peak" : "");
  os << line;
  std::snprintf(line, sizeof line, "%5s %6s %6s | %26s | %9s %9s %9s | %24s | %8s %8s %8s\n", "", "", "", "",
                "tok/s", "tok/s", "tok/s", "", "", "", "GB/s");
  os << line;
  for (const CaseResult& r : results) {
    char ftl[40], tok[40];
    std::snprintf(ftl, sizeof ftl, "%.2f/%.2f/%.2f", r.ftl_min * 1e3, r.ftl_mean * 1e3, r.ftl_max * 1e3);
    std::snprintf(tok, sizeof tok, "%.3f/%.3f/%.3f", r.tok_p50 * 1e3, r.tok_p90 * 1e3, r.tok_p99 * 1e3);
    std::snprintf(line, sizeof line, "%5d %6d %6d | %26s | %9.1f %9.1f %9.1f | %24s | %8.2f %8.2f %8.2f",
                  r.batch, r.prompt, r.completion, ftl, r.decode_tok_s, r.steady_tok_s, r.output_tok_s, tok,
                  r.memory_bytes / kGiB, r.gb_s, r.steady_gb_s);
    os << line;
    if (peak_bandwidth > 0) {
      std::snprintf(line, sizeof line, " %7.1f%%", 100.0 * r.gb_s / peak_bandwidth);
      os << line;
    }
    if (r.preemptions) os << "  (" << r.preemptions << " preemptions)";
    os << "\n";
  }
  return os.str();
}

const char* kCsvColumns =
    "batch,prompt_tokens,completion_tokens,rounds,generated_tokens,first_token_latency_min_s,"
    "first_token_latency_mean_s,first_token_latency_max_s,token_latency_p50_s,token_latency_p90_s,"
    "token_latency_p99_s,decode_tokens_per_s,output_tokens_per_s,total_tokens_per_s,bytes_per_decode_step,"
    "achieved_gb_per_s,peak_memory_bytes,preemptions,steady_decode_tokens_per_s,steady_achieved_gb_per_s";

std::string format_csv(const std::vector<CaseResult>& results) {
  std::ostringstream os;
  os.precision(9);
  os << kCsvColumns << "\n";
  for (const CaseResult& r : results)
    os << r.batch << ',' << r.prompt << ',' << r.completion << ',' << r.rounds << ',' << r.generated_tokens
       << ',' << r.ftl_min << ',' << r.ftl_mean << ',' << r.ftl_max << ',' << r.tok_p50 << ',' << r.tok_p90
       << ',' << r.tok_p99 << ',' << r.decode_tok_s << ',' << r.output_tok_s << ',' << r.total_tok_s << ','
       << r.bytes_per_step << ',' << r.gb_s << ',' << r.memory_bytes << ',' << r.preemptions << ','
       << r.steady_tok_s << ',' << r.steady_gb_s << "\n";
  return os.str();
}

nlohmann::ordered_json results_json(const Runtime& rt, const GenerationOptions& o,
                                    const ModelTraffic& traffic, const std::vector<CaseResult>& results) {
  nlohmann::ordered_json j;
  j["model"] = rt.model_dir.string();
  j["backend"] = rt.backend->name();
  j["weights_dtype"] = std::string(dtype_name(rt.spec().dtype));
  j["weight_bytes"] = rt.model->weight_bytes();
  j["weight_bytes_read_per_step"] = traffic.weights;
  j["kv_bytes_per_token"] = traffic.kv_per_token;
  j["kv_cache_bytes"] = kv_pool_bytes(rt, traffic);
  j["quant_policy"] = rt.engine_config.quant_bits;
  j["peak_bandwidth_gb_per_s"] = o.peak_bandwidth > 0 ? nlohmann::ordered_json(o.peak_bandwidth) : nullptr;
  j["warmup"] = o.warmup;
  j["rounds"] = o.rounds;
  nlohmann::ordered_json rows = nlohmann::ordered_json::array();
  for (const CaseResult& r : results) {
    nlohmann::ordered_json row;
    row["batch"] = r.batch;
    row["prompt_tokens"] = r.prompt;
    row["completion_tokens"] = r.completion;
    row["rounds"] = r.rounds;
    row["generated_tokens"] = r.generated_tokens;
    row["first_token_latency_s"] = {{"min", r.ftl_min}, {"mean", r.ftl_mean}, {"max", r.ftl_max}};
    row["token_latency_s"] = {{"p50", r.tok_p50}, {"p90", r.tok_p90}, {"p99", r.tok_p99}};
    row["decode_tokens_per_s"] = r.decode_tok_s;
    row["output_tokens_per_s"] = r.output_tok_s;
    row["total_tokens_per_s"] = r.total_tok_s;
    row["bytes_per_decode_step"] = r.bytes_per_step;
    row["achieved_gb_per_s"] = r.gb_s;
    if (o.peak_bandwidth > 0) row["fraction_of_peak_bandwidth"] = r.gb_s / o.peak_bandwidth;
    row["steady_decode_tokens_per_s"] = r.steady_tok_s;
    row["steady_achieved_gb_per_s"] = r.steady_gb_s;
    row["peak_memory_bytes"] = r.memory_bytes;
    row["preemptions"] = r.preemptions;
    rows.push_back(std::move(row));
  }
  j["results"] = std::move(rows);
  return j;
}

void run_generation(GenerationOptions o, bool session_len_given, bool batch_size_given) {
  const int max_prompt = *std::max_element(o.prompt_tokens.begin(), o.prompt_tokens.end());
  const int max_completion = *std::max_element(o.completion_tokens.begin(), o.completion_tokens.end());
  const int max_batch = *std::max_element(o.concurrency.begin(), o.concurrency.end());
  // Unless told otherwise, size sessions and the batch for the largest case: it keeps the CPU backend's
  // KV pool (capped at session-len x max-batch-size) no larger than the benchmark uses.
  if (!session_len_given) o.engine.session_len = max_prompt + max_completion;
  if (!batch_size_given) o.engine.max_batch_size = max_batch;
  if (o.engine.session_len < max_prompt + max_completion)
    fail("--session-len ", o.engine.session_len, " is shorter than the largest case (", max_prompt,
         " prompt + ", max_completion, " completion tokens)");

  std::unique_ptr<Runtime> rt = load_runtime(o.model_path, o.engine, std::cerr);
  const ModelTraffic traffic = model_traffic(*rt);
  const size_t free_at_start = rt->backend->free_memory();
  const bool accelerator = rt->backend->kind() != DeviceKind::CPU;
  std::mt19937_64 rng(o.seed);
  std::vector<CaseResult> results;
  for (int batch : o.concurrency)
    for (int prompt : o.prompt_tokens)
      for (int completion : o.completion_tokens)
        results.push_back(run_case(*rt, o, traffic, free_at_start, batch, prompt, completion, rng));
  rt->engine->shutdown();

  std::cout << "lmd bench generation: " << o.model_path << " on " << rt->backend->name() << ", "
            << dtype_name(rt->spec().dtype) << " weights; a decode step reads "
            << decimal_bytes(traffic.weights) << " of weights + " << decimal_bytes(traffic.kv_per_token)
            << " per context token\n"
            << format_table(results, o.peak_bandwidth, accelerator);
  if (!o.csv.empty()) write_file_atomically(o.csv, format_csv(results), "--csv");
  if (!o.json.empty())
    write_file_atomically(o.json, results_json(*rt, o, traffic, results).dump(2) + "\n", "--json");
}

void add_make_model(CLI::App& bench) {
  auto o = std::make_shared<MakeModelOptions>();
  CLI::App* cmd = bench.add_subcommand(
      "make-model", "Write a random-weight Hugging Face checkpoint of a real model shape (for speed work)");
  std::vector<std::string> names;
  for (const RandomModelShape& s : random_model_shapes()) names.push_back(s.name);
  cmd->add_option("shape", o->shape, "model shape")->required()->check(CLI::IsMember(names));
  cmd->add_option("--dst", o->dst, "output folder (must not exist or be empty)")->required();
  cmd->add_option("--dtype", o->dtype, "weight dtype; default: the released model's")
      ->check(CLI::IsMember({"float16", "bfloat16", "float32"}));
  cmd->add_option("--seed", o->seed, "random seed; the same seed writes the same bytes");
  cmd->add_option("--layers", o->layers, "number of layers instead of the shape's (for quick tests)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--max-shard-size", o->max_shard_size, "largest safetensors shard (e.g. 4GB, 500MB)");
  o->tokenizers = default_tokenizers_dir();
  cmd->add_option("--tokenizers", o->tokenizers, "folder holding the internlm2/ and llama2/ tokenizers");
  cmd->add_option("--threads", o->threads, "generating threads; 0: all cores")->check(CLI::NonNegativeNumber);
  cmd->callback([o] { run_make_model(*o); });
}

void add_generation(CLI::App& bench) {
  auto o = std::make_shared<GenerationOptions>();
  CLI::App* cmd = bench.add_subcommand(
      "generation", "Profile first-token latency, decode throughput, token latency, memory and GB/s");
  cli::add_model_path(*cmd, o->model_path);
  cli::add_engine_options(*cmd, o->engine);
  const auto positive = CLI::PositiveNumber;
  cmd->add_option("-c,--concurrency", o->concurrency, "batch sizes: requests submitted together")
      ->delimiter(',')
      ->check(positive);
  cmd->add_option("--prompt-tokens", o->prompt_tokens, "prompt lengths (random token ids)")
      ->delimiter(',')
      ->check(positive);
  cmd->add_option("--completion-tokens", o->completion_tokens, "tokens generated per request (eos ignored)")
      ->delimiter(',')
      ->check(positive);
  cmd->add_option("-w,--warmup", o->warmup, "untimed rounds per case")->check(CLI::NonNegativeNumber);
  cmd->add_option("--rounds,--test-round", o->rounds, "timed rounds per case")->check(positive);
  cmd->add_option("--seed", o->seed, "seed of the random prompts");
  cmd->add_option("--peak-bandwidth", o->peak_bandwidth,
                  "device memory bandwidth in GB/s (measured copy rate); adds a % of peak column")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--csv", o->csv, "write the results as CSV");
  cmd->add_option("--json", o->json, "write the results as JSON");
  cmd->callback(
      [o, cmd] { run_generation(*o, cmd->count("--session-len") > 0, cmd->count("--max-batch-size") > 0); });
}

}  // namespace

CLI::App* add_bench_command(CLI::App& app) {
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks: generation profiles, random-weight test models");
  bench->require_subcommand(1);
  add_generation(*bench);
  add_make_model(*bench);
  return bench;
}

}  // namespace lmd
