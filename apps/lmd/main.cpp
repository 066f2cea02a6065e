// lmd: one executable, many subcommands; each lives in its own file and registers itself here.
#include <CLI/CLI.hpp>

#include "bench.h"
#include "chat.h"
#include "cli_common.h"
#include "convert.h"
#include "lite_kv.h"

int main(int argc, char** argv) {
  CLI::App app{"lmd: quantize, convert and serve Llama-family chat models", "lmd"};
  lmd::cli::apply_conventions(app);
  app.require_subcommand(1);
  app.set_version_flag("--version", "lmd 0.1.0");
  lmd::add_chat_command(app);
  lmd::add_bench_command(app);
  lmd::add_convert_command(app);
  // `lite` may already be registered by another command file (CLI11 2.1 has no get_subcommand_no_throw).
  const auto lites = app.get_subcommands([](CLI::App* sub) { return sub->get_name() == "lite"; });
  CLI::App* lite = lites.empty()
                       ? app.add_subcommand("lite", "Offline quantization tools")->require_subcommand(1)
                       : lites.front();
  lmd::add_lite_kv_commands(*lite);
  return lmd::cli::run_cli(argc, argv, app);
}
