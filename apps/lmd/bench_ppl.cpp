#include "bench_ppl.h"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>

#include "cli_common.h"
#include "lmd/core/error.h"
#include "lmd/core/tokenizer.h"
#include "lmd/quant/calib_data.h"
#include "lmd/quant/perplexity.h"
#include "runtime.h"

namespace lmd {
namespace {

struct PplOptions {
  std::string model_path, dataset = "wikitext2", split = "valid", dataset_dir;
  int seqlen = 2048, max_windows = 0;
  cli::EngineOptions engine;
};

// The evaluation file exactly as stored (wikitext's blank lines and headings included), the way the
// perplexity figures in papers and in reference.json are computed.
std::string read_verbatim(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail("cannot read dataset file ", file.string());
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

void run_ppl(const PplOptions& opt) {
  using Clock = std::chrono::steady_clock;
  const cli::EngineOptions& e = opt.engine;
  if (e.quant_policy != 0 && e.quant_policy != 4 && e.quant_policy != 8)
    fail("--quant-policy must be 0, 4 or 8, got ", e.quant_policy);
  if (e.tp != 1) fail("--tp ", e.tp, ": tensor parallelism is not available yet; use --tp 1");
  const std::filesystem::path dir = opt.model_path;
  const ModelSpec spec = load_model_spec(dir);
  if (e.model_format == "awq" && !spec.awq.enabled)
    fail("--model-format awq: ", (dir / "config.json").string(), " has no AWQ quantization_config");
  if (!e.model_format.empty() && e.model_format != "hf" && e.model_format != "awq")
    fail("--model-format must be hf or awq, got '", e.model_format, "'");
  const std::filesystem::path file = dataset_file(opt.dataset, opt.split, opt.dataset_dir);

  std::unique_ptr<Backend> backend = make_backend(e.device, e.threads);
  std::cerr << "lmd: loading " << opt.model_path << " on " << backend->name() << "\n";
  std::unique_ptr<Model> model = Model::load(dir, *backend);
  const Tokenizer tok = Tokenizer::load(dir);
  const std::vector<int> ids = tok.encode(read_verbatim(file), /*add_bos=*/true, /*parse_special=*/false);
  std::cerr << "lmd: " << file.string() << ": " << ids.size() << " tokens, windows of " << opt.seqlen << "\n";

  const Clock::time_point t0 = Clock::now();
  const PerplexityResult r =
      perplexity(*model, ids, opt.seqlen, opt.max_windows, e.quant_policy, [&](int done, int total) {
        const double s = std::chrono::duration<double>(Clock::now() - t0).count();
        std::fprintf(stderr, "\rlmd: window %d/%d, %.1f s, %.0f s left ", done, total, s,
                     s / done * (total - done));
      });
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  std::fprintf(stderr, "\n");
  std::printf("perplexity %.4f (mean NLL %.5f over %lld tokens, %d windows of %d, %s%s) in %.1f s\n",
              r.perplexity, r.mean_nll, static_cast<long long>(r.predicted_tokens), r.windows, opt.seqlen,
              spec.awq.enabled ? "awq int4 weights" : "16-bit weights",
              e.quant_policy ? (", int" + std::to_string(e.quant_policy) + " KV").c_str() : "", secs);
}

}  // namespace

void add_bench_ppl_command(CLI::App& bench) {
  auto opt = std::make_shared<PplOptions>();
  CLI::App* cmd = bench.add_subcommand("ppl", "Perplexity over non-overlapping windows of a dataset");
  cli::add_model_path(*cmd, opt->model_path);
  cmd->add_option("--dataset", opt->dataset, "wikitext2, ptb, or a text file");
  cmd->add_option("--split", opt->split, "split of a named dataset: valid, test or train");
  cmd->add_option("--dataset-dir", opt->dataset_dir,
                  "folder holding the named datasets (default: $LMD_DATASETS, else ../shared/datasets)");
  cmd->add_option("--seqlen", opt->seqlen, "tokens per window")->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--max-windows", opt->max_windows, "evaluate only the first N windows; 0: all")
      ->check(CLI::NonNegativeNumber);
  cli::add_engine_options(*cmd, opt->engine);
  cmd->callback([opt] { run_ppl(*opt); });
}

}  // namespace lmd
