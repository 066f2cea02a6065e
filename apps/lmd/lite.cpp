#include "lite.h"

#include <filesystem>
#include <iostream>
#include <memory>

#include "cli_common.h"
#include "lmd/core/error.h"
#include "lmd/quant/awq.h"
#include "runtime.h"

namespace lmd {
namespace {

struct AutoAwqOptions {
  std::string model_path, work_dir = "./work_dir", device = "auto";
  AwqOptions awq;
};

void run_auto_awq(AutoAwqOptions& opt) {
  opt.awq.model_dir = opt.model_path;
  opt.awq.work_dir = opt.work_dir;
  std::unique_ptr<Backend> backend = make_backend(opt.device, opt.awq.host_threads);
  std::cerr << "lmd: auto_awq " << opt.model_path << " on " << backend->name() << ", int" << opt.awq.w_bits
            << " group " << opt.awq.w_group_size << (opt.awq.search_scale ? ", searching scales" : "")
            << "\n";
  try {
    auto_awq(opt.awq, *backend, std::cerr);
  } catch (const std::filesystem::filesystem_error& e) {
    fail("auto_awq: ", e.what());
  }
}

void add_auto_awq_command(CLI::App& lite) {
  auto opt = std::make_shared<AutoAwqOptions>();
  AwqOptions& a = opt->awq;
  CLI::App* cmd =
      lite.add_subcommand("auto_awq", "Quantize a model's weights to 4-bit AWQ (AutoAWQ gemm layout)");
  cli::add_model_path(*cmd, opt->model_path);
  cmd->add_option("--work-dir", opt->work_dir, "output folder for the quantized checkpoint");
  cmd->add_option("--calib-dataset", a.calib_dataset,
                  "calibration text: ptb, wikitext2, c4, pileval or a file path");
  cmd->add_option("--dataset-dir", a.dataset_dir,
                  "folder holding the named datasets (default: $LMD_DATASETS, else ../shared/datasets)");
  cmd->add_option("--calib-samples", a.calib_samples, "calibration windows")->check(CLI::PositiveNumber);
  cmd->add_option("--calib-seqlen", a.calib_seqlen, "tokens per calibration window")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--w-bits", a.w_bits, "weight bits (4)");
  cmd->add_option("--w-group-size", a.w_group_size, "input channels per quantization group (32, 64 or 128)");
  cmd->add_option("--batch-size", a.batch_size, "calibration windows per forward step")
      ->check(CLI::PositiveNumber);
  cli::add_bool_flag(*cmd, "--search-scale", a.search_scale,
                     "search the smoothing ratio per block on its quantized output error (slower)");
  cmd->add_option("--device", opt->device, "where the layers run")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->add_option("--threads", a.host_threads,
                  "threads for host-side work (quantization, statistics) and the CPU backend; 0: all cores");
  cmd->callback([opt] { run_auto_awq(*opt); });
}

}  // namespace

CLI::App* add_lite_command(CLI::App& app) {
  CLI::App* lite =
      app.add_subcommand("lite", "Compress a model: AWQ weight quantization, KV cache calibration");
  lite->require_subcommand(1);
  add_auto_awq_command(*lite);
  return lite;
}

}  // namespace lmd
