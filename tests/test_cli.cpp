// The conventions every subcommand shares: argv normalisation, boolean flags with values, --model,
// aliases, validation and the run_cli error contract.
#include <sstream>

#include "cli_common.h"
#include "expect_error.h"
#include "lmd/core/error.h"
#include "test_support.h"

using lmd::cli::normalize_args;
using lmd::cli::parse_args;
using Args = std::vector<std::string>;

namespace {

// A stand-in for `lmd lite auto_awq`: a model path, a flag, a valued option.
struct AutoAwqCommand {
  CLI::App app{"test"};
  CLI::App* sub = nullptr;
  std::string model;
  std::string work_dir;
  bool search_scale = false;
  lmd::cli::EngineOptions engine;
  lmd::cli::SamplingOptions sampling;

  AutoAwqCommand() {
    lmd::cli::apply_conventions(app);
    sub = app.add_subcommand("auto_awq", "quantize");
    lmd::cli::add_model_path(*sub, model);
    sub->add_option("--work-dir", work_dir, "output folder");
    lmd::cli::add_bool_flag(*sub, "--search-scale", search_scale, "search the smoothing ratio");
    lmd::cli::add_engine_options(*sub, engine);
    lmd::cli::add_sampling_options(*sub, sampling);
  }
  void parse(Args args) {
    args.insert(args.begin(), "auto_awq");
    parse_args(app, std::move(args));
  }
};

}  // namespace

TEST_CASE("cli: underscores become hyphens in long option names only", "[cli]") {
  AutoAwqCommand cmd;
  CHECK(normalize_args(cmd.app, {"auto_awq", "my_model", "--work_dir", "out_dir", "--search_scale=False"}) ==
        Args{"auto_awq", "my_model", "--work-dir", "out_dir", "--search-scale=False"});
  // Values after `=` and after a valued option stay as written, even when they look like options.
  CHECK(normalize_args(cmd.app, {"--work_dir=a_b", "--chat_template", "--my_template"}) ==
        Args{"--work-dir=a_b", "--chat-template", "--my_template"});
  // Everything after `--` is positional.
  CHECK(normalize_args(cmd.app, {"--", "--work_dir"}) == Args{"--", "--work_dir"});
  // Short options are not touched.
  CHECK(normalize_args(cmd.app, {"-h_x"}) == Args{"-h_x"});
}

TEST_CASE("cli: both spellings parse to the same option", "[cli]") {
  AutoAwqCommand cmd;
  cmd.parse({"m", "--work_dir", "out", "--max_prefill_token_num=4096", "--cache-block-seq-len", "128"});
  CHECK(cmd.work_dir == "out");
  CHECK(cmd.engine.max_prefill_token_num == 4096);
  CHECK(cmd.engine.cache_block_seq_len == 128);
}

TEST_CASE("cli: boolean flags take a bare form or an explicit value", "[cli]") {
  struct Case {
    Args args;
    bool expected;
  };
  const Case cases[] = {
      {{"m"}, false},
      {{"m", "--search-scale"}, true},
      {{"--search-scale", "m"}, true},  // a non-literal after the flag stays positional
      {{"m", "--search-scale", "True"}, true},
      {{"m", "--search-scale", "False"}, false},
      {{"m", "--search-scale=false"}, false},
      {{"m", "--search_scale=TRUE"}, true},
      {{"m", "--search-scale", "1"}, true},
      {{"m", "--search-scale", "0"}, false},
      {{"m", "--search-scale", "yes"}, true},
      {{"m", "--search-scale", "no"}, false},
      {{"--search-scale", "false", "m"}, false},
  };
  for (const Case& c : cases) {
    AutoAwqCommand cmd;
    cmd.parse(c.args);
    INFO(c.args.size() << " args, first " << c.args.front());
    CHECK(cmd.search_scale == c.expected);
    CHECK(cmd.model == "m");
  }
  AutoAwqCommand cmd;
  CHECK_THROWS_AS(cmd.parse({"m", "--search-scale=maybe"}), CLI::ParseError);
}

TEST_CASE("cli: the model path as positional or --model", "[cli]") {
  SECTION("positional") {
    AutoAwqCommand cmd;
    cmd.parse({"/models/a"});
    CHECK(cmd.model == "/models/a");
  }
  SECTION("--model") {
    AutoAwqCommand cmd;
    cmd.parse({"--model", "/models/b", "--work-dir", "w"});
    CHECK(cmd.model == "/models/b");
  }
  SECTION("both, the same") {
    AutoAwqCommand cmd;
    cmd.parse({"/models/a", "--model=/models/a"});
    CHECK(cmd.model == "/models/a");
  }
  SECTION("both, different") {
    AutoAwqCommand cmd;
    CHECK_ERROR(CLI::ValidationError, cmd.parse({"/models/a", "--model", "/models/b"}), "--model",
                "/models/a", "/models/b");
  }
  SECTION("neither") {
    AutoAwqCommand cmd;
    CHECK_ERROR(CLI::RequiredError, cmd.parse({"--work-dir", "w"}), "model_path");
  }
}

TEST_CASE("cli: old option names stay as aliases", "[cli]") {
  CHECK(lmd::cli::with_aliases("--max-batch-size", {"--instance-num"}) == "--max-batch-size,--instance-num");
  AutoAwqCommand cmd;
  cmd.parse({"m", "--instance_num", "16"});
  CHECK(cmd.engine.max_batch_size == 16);
}

TEST_CASE("cli: engine options remember which flags were given, even at their default value", "[cli]") {
  AutoAwqCommand cmd;
  cmd.parse({"m", "--quant_policy", "0", "--instance-num", "128"});
  CHECK(cmd.engine.was_given("quant-policy"));
  CHECK(cmd.engine.was_given("max-batch-size"));
  CHECK_FALSE(cmd.engine.was_given("session-len"));
}

TEST_CASE("cli: engine options defaults and validation", "[cli]") {
  AutoAwqCommand cmd;
  cmd.parse({"m"});
  CHECK(cmd.engine.device == "auto");
  CHECK(cmd.engine.cache_max_entry_count == 0.8);
  CHECK(cmd.engine.cache_block_seq_len == 64);
  CHECK(cmd.engine.max_prefill_token_num == 8192);
  CHECK(cmd.engine.quant_policy == 0);
  CHECK(cmd.engine.tp == 1);
  CHECK(cmd.engine.model_format.empty());

  AutoAwqCommand ok;
  ok.parse({"m", "--quant-policy", "8", "--device", "cpu", "--model-format", "awq", "--tp", "2"});
  CHECK(ok.engine.quant_policy == 8);
  CHECK(ok.engine.device == "cpu");
  CHECK(ok.engine.model_format == "awq");
  CHECK(ok.engine.tp == 2);

  CHECK_ERROR(CLI::ValidationError, AutoAwqCommand().parse({"m", "--quant-policy", "3"}), "--quant-policy");
  CHECK_ERROR(CLI::ValidationError, AutoAwqCommand().parse({"m", "--quant_policy=16"}), "--quant-policy");
  CHECK_ERROR(CLI::ValidationError, AutoAwqCommand().parse({"m", "--device", "tpu"}), "--device");
  CHECK_ERROR(CLI::ValidationError, AutoAwqCommand().parse({"m", "--cache-max-entry-count", "0"}),
              "--cache-max-entry-count");
  CHECK_ERROR(CLI::ValidationError, AutoAwqCommand().parse({"m", "--tp", "0"}), "--tp");
}

TEST_CASE("cli: sampling options", "[cli]") {
  AutoAwqCommand cmd;
  cmd.parse({"m"});
  CHECK(cmd.sampling.temperature == 0.8);
  CHECK(cmd.sampling.top_p == 0.8);
  CHECK(cmd.sampling.top_k == 40);
  CHECK(cmd.sampling.min_p == 0.0);
  CHECK(cmd.sampling.repetition_penalty == 1.0);
  CHECK_FALSE(cmd.sampling.seed.has_value());

  AutoAwqCommand set;
  set.parse({"m", "--temperature", "0", "--top_k", "1", "--seed", "42", "--max-new-tokens", "7"});
  CHECK(set.sampling.temperature == 0.0);
  CHECK(set.sampling.top_k == 1);
  CHECK(set.sampling.seed == 42u);
  CHECK(set.sampling.max_new_tokens == 7);
  CHECK_ERROR(CLI::ValidationError, AutoAwqCommand().parse({"m", "--top-p", "1.5"}), "--top-p");
}

TEST_CASE("cli: help lists defaults", "[cli]") {
  AutoAwqCommand cmd;
  const std::string help = cmd.sub->help();
  CHECK(help.find("8192") != std::string::npos);
  CHECK(help.find("0.8") != std::string::npos);
  CHECK(help.find("--instance-num") != std::string::npos);
}

TEST_CASE("cli: run_cli exit codes and messages", "[cli]") {
  std::ostringstream captured_err, captured_out;
  std::streambuf* old_err = std::cerr.rdbuf(captured_err.rdbuf());
  std::streambuf* old_out = std::cout.rdbuf(captured_out.rdbuf());
  auto run = [](std::vector<const char*> argv) {
    AutoAwqCommand cmd;
    cmd.sub->callback([&cmd] { lmd::fail("model folder ", cmd.model, " has no config.json"); });
    return lmd::cli::run_cli(static_cast<int>(argv.size()), argv.data(), cmd.app);
  };
  const int failed = run({"lmd", "auto_awq", "/nowhere"});
  const int bad_flag = run({"lmd", "auto_awq", "m", "--quant-policy", "5"});
  const int help = run({"lmd", "auto_awq", "--help"});
  std::cerr.rdbuf(old_err);
  std::cout.rdbuf(old_out);

  CHECK(failed == 1);
  CHECK(captured_err.str().find("lmd: error: model folder /nowhere has no config.json\n") !=
        std::string::npos);
  CHECK(bad_flag == static_cast<int>(CLI::ExitCodes::ValidationError));
  CHECK(captured_err.str().find("--quant-policy") != std::string::npos);
  CHECK(help == 0);
  CHECK(captured_out.str().find("--search-scale") != std::string::npos);
}
