// What every lmd subcommand gets for free, so that commands copied from LMDeploy tutorials work:
// `--work_dir` and `--work-dir` both accepted, `--flag True/False` on boolean flags, the model given as
// a positional or as `--model`, old option names kept as aliases, defaults shown in --help, and one
// place that turns CLI11 errors and lmd::Error into messages and exit codes.
//
// Builds against CLI11 2.1 and 2.4: only API present in both is used.
#pragma once
#include <CLI/CLI.hpp>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace lmd::cli {

// Conventions set on the root app before any option or subcommand is added (subcommands inherit
// them): help shows each option's default.
void apply_conventions(CLI::App& app);

// Rewrites command-line arguments (without the program name) before CLI11 sees them:
//  - in every `--long-option` token, `_` becomes `-` in the name part (before any `=`); values,
//    positionals and everything after a bare `--` are left alone;
//  - a flag of `app` (or any subcommand) followed by a boolean literal (true/false, yes/no, on/off,
//    1/0, any case) is joined into `--flag=value`, CLI11's own spelling of a flag with a value.
//    Anything else after a flag stays a separate argument, so `--search-scale MODEL` keeps MODEL
//    positional (a positional literally named `1` or `true` right after a flag needs `--flag=true`).
std::vector<std::string> normalize_args(const CLI::App& app, std::vector<std::string> args);

// normalize_args, then CLI11 parsing (and the callbacks of the chosen subcommands). Throws
// CLI::ParseError (including CallForHelp) and whatever the callbacks throw.
void parse_args(CLI::App& app, std::vector<std::string> args);

// The program's main: parses argv into `app` (subcommands do their work in CLI11 callbacks) and
// returns the exit code. CLI11 errors and help print as CLI11 prints them, with its exit codes;
// lmd::Error prints `lmd: error: <message>` on stderr and returns 1.
int run_cli(int argc, const char* const* argv, CLI::App& app);

// A boolean flag that also takes an explicit value: `--name`, `--name True`, `--name=false`, `--name 0`.
CLI::Option* add_bool_flag(CLI::App& app, const std::string& name, bool& target,
                           const std::string& description);

// The model folder, given as the positional `model_path` or as `--model PATH` (the same path twice is
// fine; two different paths are an error; neither is an error). Returns the positional option.
CLI::Option* add_model_path(CLI::App& app, std::string& path);

// An option name with old spellings kept as aliases, for CLI11's add_option/add_flag:
// with_aliases("--max-batch-size", {"--instance-num"}) == "--max-batch-size,--instance-num".
std::string with_aliases(std::string_view name, std::initializer_list<std::string_view> old_names);

// Engine knobs every model-loading command shares (BRIEF §1), with LMDeploy's defaults. Plain values:
// the commands turn them into the engine's own configuration.
struct EngineOptions {
  std::string device = "auto";         // auto | cpu | cuda
  int session_len = 0;                 // 0: the model's max_position_embeddings
  double cache_max_entry_count = 0.8;  // fraction of free accelerator memory given to the KV cache
  int cache_block_seq_len = 64;        // tokens per KV block
  int max_batch_size = 128;
  int max_prefill_token_num = 8192;
  int quant_policy = 0;         // KV cache: 0 = 16-bit, 8 = int8, 4 = int4
  std::string model_format;     // hf | awq; empty: from the checkpoint's config.json
  int tp = 1;                   // tensor-parallel GPUs
  std::string chat_template;    // builtin name or JSON; empty: from the checkpoint
  int threads = 0;              // CPU backend threads; 0: all cores
  std::set<std::string> given;  // flags given on the command line, named without dashes
  bool was_given(const std::string& name) const { return given.count(name) != 0; }
};
void add_engine_options(CLI::App& app, EngineOptions& options);

// Sampling knobs, with the defaults of `lmdeploy chat`.
struct SamplingOptions {
  double temperature = 0.8;
  int top_k = 40;
  double top_p = 0.8;
  double min_p = 0.0;
  double repetition_penalty = 1.0;
  std::optional<uint64_t> seed;  // unset: a random seed per request
  int max_new_tokens = 512;
};
void add_sampling_options(CLI::App& app, SamplingOptions& options);

}  // namespace lmd::cli
