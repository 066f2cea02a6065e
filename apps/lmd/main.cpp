// lmd: one executable, many subcommands; each lives in its own file and registers itself here.
#include <CLI/CLI.hpp>

#include "bench.h"
#include "bench_ppl.h"
#include "chat.h"
#include "cli_common.h"
#include "convert.h"
#include "lite.h"
#include "lite_kv.h"
#include "serve.h"

int main(int argc, char** argv) {
  CLI::App app{"lmd: quantize, convert and serve Llama-family chat models", "lmd"};
  lmd::cli::apply_conventions(app);
  app.require_subcommand(1);
  app.set_version_flag("--version", "lmd 0.1.0");
  lmd::add_chat_command(app);
  lmd::add_serve_command(app);
  CLI::App* lite = lmd::add_lite_command(app);
  lmd::add_lite_kv_commands(*lite);
  lmd::add_convert_command(app);
  CLI::App* bench = lmd::add_bench_command(app);
  lmd::add_bench_ppl_command(*bench);
  return lmd::cli::run_cli(argc, argv, app);
}
