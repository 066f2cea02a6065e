#include "cli_common.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <limits>
#include <set>
#include <sstream>

#include "lmd/core/error.h"

namespace lmd::cli {
namespace {

bool is_long_option(const std::string& arg) { return arg.size() > 2 && arg[0] == '-' && arg[1] == '-'; }

bool is_bool_literal(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(), [](unsigned char c) { return std::tolower(c); });
  static const std::set<std::string> literals = {"true", "false", "yes", "no", "on", "off", "1", "0"};
  return literals.count(text) > 0;
}

// Long names ("work-dir") of the flags and of the options that always take a value, across `app`
// and all its subcommands and option groups. Names are collected tree-wide because the normaliser
// runs before CLI11 has decided which subcommand a token belongs to.
struct LongNames {
  std::set<std::string> flags;
  std::set<std::string> valued;
};

void collect_long_names(const CLI::App& app, LongNames& names) {
  for (const CLI::Option* opt : app.get_options()) {
    const bool flag = opt->get_items_expected_max() == 0;
    const bool valued = opt->get_items_expected_min() > 0;
    for (const std::string& name : opt->get_lnames()) {
      if (flag) names.flags.insert(name);
      if (valued) names.valued.insert(name);
    }
  }
  for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; })) {
    collect_long_names(*sub, names);
  }
}

// A CLI11 check for numbers above `low` (or at least `low`) and at most `high`, with a plain message
// (CLI11's own PositiveNumber prints its range with a 300-digit upper bound).
CLI::Validator number_in(double low, bool low_open, double high = std::numeric_limits<double>::infinity()) {
  std::ostringstream range;
  if (std::isinf(high)) {
    range << (low_open ? "> " : ">= ") << low;
  } else {
    range << (low_open ? "(" : "[") << low << ", " << high << "]";
  }
  const std::string description = range.str();
  auto check = [=](const std::string& text) -> std::string {
    char* end = nullptr;
    const double value = std::strtod(text.c_str(), &end);
    if (text.empty() || end != text.c_str() + text.size()) return "expected a number, got " + text;
    if ((low_open ? value > low : value >= low) && value <= high) return {};
    return "value " + text + (std::isinf(high) ? " must be " : " is not in ") + description;
  };
  return CLI::Validator(check, description);
}

}  // namespace

void apply_conventions(CLI::App& app) { app.option_defaults()->always_capture_default(); }

std::vector<std::string> normalize_args(const CLI::App& app, std::vector<std::string> args) {
  LongNames names;
  collect_long_names(app, names);
  bool next_is_value = false;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string& arg = args[i];
    if (arg == "--") break;  // the rest is positional
    if (next_is_value || !is_long_option(arg)) {
      next_is_value = false;
      continue;
    }
    const size_t equals = arg.find('=');
    const auto name_end = equals == std::string::npos ? arg.end() : arg.begin() + equals;
    std::replace(arg.begin() + 2, name_end, '_', '-');
    if (equals != std::string::npos) continue;
    const std::string name = arg.substr(2);
    if (names.flags.count(name) && i + 1 < args.size() && is_bool_literal(args[i + 1])) {
      arg += "=" + args[i + 1];
      args.erase(args.begin() + static_cast<std::ptrdiff_t>(i) + 1);
    } else {
      next_is_value = names.valued.count(name) > 0;
    }
  }
  return args;
}

void parse_args(CLI::App& app, std::vector<std::string> args) {
  args = normalize_args(app, std::move(args));
  std::reverse(args.begin(), args.end());  // CLI11 takes arguments as a stack, last first
  app.parse(args);
}

int run_cli(int argc, const char* const* argv, CLI::App& app) {
  if (app.get_name().empty() && argc > 0) app.name(std::filesystem::path(argv[0]).filename().string());
  try {
    parse_args(app, std::vector<std::string>(argv + std::min(argc, 1), argv + argc));
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const Error& e) {
    std::cerr << "lmd: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

CLI::Option* add_bool_flag(CLI::App& app, const std::string& name, bool& target,
                           const std::string& description) {
  return app.add_flag(name, target, description + " (bare flag, or true/false)");
}

CLI::Option* add_model_path(CLI::App& app, std::string& path) {
  CLI::Option* positional =
      app.add_option("model_path", path, "Hugging Face model folder (or give it with --model)")->required();
  // CLI11 runs option callbacks in the order the options were added, after all arguments are read,
  // and checks required options after that: so here the positional has already stored its value, and
  // giving it --model's value keeps `model_path is required` for when neither was given.
  app.add_option_function<std::string>(
      "--model",
      [positional, &path](const std::string& value) {
        if (positional->count() == 0) {
          positional->add_result(value);
          path = value;
        } else if (value != path) {
          throw CLI::ValidationError("--model", "the model is given twice, as " + path + " and as " + value);
        }
      },
      "the model folder, instead of the positional model_path");
  return positional;
}

std::string with_aliases(std::string_view name, std::initializer_list<std::string_view> old_names) {
  std::string names(name);
  for (std::string_view old : old_names) (names += ",") += old;
  return names;
}

void add_engine_options(CLI::App& app, EngineOptions& o) {
  // Records that a flag was given on the command line, whatever its value (a workspace's config.ini
  // supplies defaults that only given flags override).
  auto given = [&o](const char* name) { return [&o, name](const std::string&) { o.given.insert(name); }; };
  app.add_option("--device", o.device, "where the model runs")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->each(given("device"));
  app.add_option("--session-len", o.session_len, "max tokens of one session; 0: the model's context length")
      ->check(number_in(0, false))
      ->each(given("session-len"));
  app.add_option(
         "--cache-max-entry-count", o.cache_max_entry_count,
         "KV cache size: below 1, the fraction of memory free after the weights; 1 or more, a block count")
      ->check(number_in(0, true))
      ->each(given("cache-max-entry-count"));
  app.add_option("--cache-block-seq-len", o.cache_block_seq_len, "tokens per KV cache block")
      ->check(number_in(0, true))
      ->each(given("cache-block-seq-len"));
  app.add_option(with_aliases("--max-batch-size", {"--instance-num"}), o.max_batch_size,
                 "most sequences decoded together")
      ->check(number_in(0, true))
      ->each(given("max-batch-size"));
  app.add_option("--max-prefill-token-num", o.max_prefill_token_num,
                 "most prompt tokens prefilled in one step")
      ->check(number_in(0, true))
      ->each(given("max-prefill-token-num"));
  app.add_option("--quant-policy", o.quant_policy, "KV cache quantization: 0 none, 8 int8, 4 int4")
      ->check(CLI::IsMember({0, 4, 8}))
      ->each(given("quant-policy"));
  app.add_option("--model-format", o.model_format, "weights format; default: read from config.json")
      ->check(CLI::IsMember({"hf", "awq"}))
      ->each(given("model-format"));
  app.add_option("--tp", o.tp, "tensor-parallel GPUs")->check(number_in(0, true))->each(given("tp"));
  app.add_option("--chat-template", o.chat_template, "builtin template name or JSON; default: from the model")
      ->each(given("chat-template"));
  app.add_option("--threads", o.threads, "CPU backend threads; 0: all cores")
      ->check(number_in(0, false))
      ->each(given("threads"));
}

void add_sampling_options(CLI::App& app, SamplingOptions& o) {
  app.add_option("--temperature", o.temperature, "sampling temperature; 0: greedy")
      ->check(number_in(0, false));
  app.add_option("--top-k", o.top_k, "sample among the k likeliest tokens; 0: all")
      ->check(number_in(0, false));
  app.add_option("--top-p", o.top_p, "nucleus sampling mass")->check(number_in(0, true, 1));
  app.add_option("--min-p", o.min_p, "drop tokens below min_p times the top probability")
      ->check(number_in(0, false, 1));
  app.add_option("--repetition-penalty", o.repetition_penalty, "penalty on tokens already present")
      ->check(number_in(0, true));
  app.add_option_function<uint64_t>(
      "--seed", [&o](uint64_t seed) { o.seed = seed; }, "random seed; default: a fresh one per request");
  app.add_option("--max-new-tokens", o.max_new_tokens, "most tokens generated per reply")
      ->check(number_in(0, true));
}

}  // namespace lmd::cli
