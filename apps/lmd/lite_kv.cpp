#include "lite_kv.h"

#include <chrono>
#include <iostream>
#include <memory>
#include <string>

#include "cli_common.h"
#include "lmd/core/tokenizer.h"
#include "lmd/quant/calib_data.h"
#include "lmd/quant/calibrate.h"
#include "lmd/quant/kv_qparams.h"
#include "runtime.h"

namespace lmd {
namespace {

struct CalibrateOptions {
  std::string model_path;
  std::string calib_dataset = "ptb";
  int calib_samples = 128;
  int calib_seqlen = 2048;
  std::string work_dir = "./work_dir";
  std::string dataset_dir;
  std::string device = "auto";
  int threads = 0;
};

void run_calibrate(const CalibrateOptions& opt) {
  const auto file = dataset_file(opt.calib_dataset, "train", opt.dataset_dir);  // fail before the slow part
  std::unique_ptr<Backend> backend = make_backend(opt.device, opt.threads);
  std::cerr << "lmd: calibrate: loading " << opt.model_path << " on " << backend->name() << "\n";
  std::unique_ptr<Model> model = Model::load(opt.model_path, *backend, [](int done, int total) {
    std::cerr << "\rlmd: layer " << done << "/" << total << std::flush;
  });
  const Tokenizer tok = Tokenizer::load(opt.model_path);
  const std::vector<int> tokens =
      tok.encode(load_dataset_text(file), /*add_bos=*/false, /*parse_special=*/false);
  const auto windows = sample_calibration_windows(tokens, opt.calib_samples, opt.calib_seqlen);
  std::cerr << "\rlmd: calibrate: " << windows.size() << " windows of " << opt.calib_seqlen << " tokens from "
            << file.string() << " (" << tokens.size() << " tokens)\n";
  const auto t0 = std::chrono::steady_clock::now();
  const CalibrationStats stats = calibrate(*model, windows, [&](int done, int total) {
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::cerr << "\rlmd: calibrate: window " << done << "/" << total << ", "
              << int(double(done) * opt.calib_seqlen / std::max(secs, 1e-9)) << " tokens/s" << std::flush;
  });
  std::cerr << "\n";
  save_calibration(stats, {opt.model_path, opt.calib_dataset, opt.calib_samples, opt.calib_seqlen},
                   opt.work_dir);
  std::cerr << "lmd: calibrate: statistics of " << stats.activations.size() << " activations and "
            << stats.layers << " layers' K/V written to " << opt.work_dir
            << "/calib_stats.{safetensors,json}\n";
}

struct KvQparamsOptions {
  std::string work_dir;
  std::string turbomind_dir;
  int kv_bits = 8;
  bool kv_sym = false;
  int num_tp = 1;
};

}  // namespace

void add_lite_kv_commands(CLI::App& lite) {
  auto cal = std::make_shared<CalibrateOptions>();
  CLI::App* cmd = lite.add_subcommand(
      "calibrate",
      "Collect per-channel activation statistics and per-head K/V statistics on calibration data");
  cli::add_model_path(*cmd, cal->model_path);
  cmd->add_option("--calib-dataset", cal->calib_dataset, "ptb, wikitext2, c4, pileval or a text file");
  cmd->add_option("--calib-samples", cal->calib_samples, "calibration windows")->check(CLI::PositiveNumber);
  cmd->add_option("--calib-seqlen", cal->calib_seqlen, "tokens per window")->check(CLI::PositiveNumber);
  cmd->add_option("--work-dir", cal->work_dir, "where the statistics are written");
  cmd->add_option("--dataset-dir", cal->dataset_dir,
                  "folder holding the datasets; default: $LMD_DATASETS, else ../shared/datasets");
  cmd->add_option("--device", cal->device, "where the model runs")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->add_option("--threads", cal->threads, "CPU backend threads; 0: all cores");
  cmd->callback([cal] { run_calibrate(*cal); });

  auto kv = std::make_shared<KvQparamsOptions>();
  CLI::App* qp = lite.add_subcommand(
      "kv_qparams", "Turn calibrate's K/V statistics into offline KV int8 parameters inside a workspace");
  qp->add_option("work_dir,--work-dir", kv->work_dir, "the calibrate --work-dir")->required();
  qp->add_option("turbomind_dir,--turbomind-dir", kv->turbomind_dir,
                 "the workspace (WS, WS/triton_models or WS/triton_models/weights)")
      ->required();
  qp->add_option("--kv-bits", kv->kv_bits, "bits of the static KV cache (8)");
  cli::add_bool_flag(*qp, "--kv-sym", kv->kv_sym, "symmetric parameters (zero 0) instead of asymmetric");
  qp->add_option("--num-tp", kv->num_tp, "tensor-parallel ranks of the workspace")
      ->check(CLI::PositiveNumber);
  qp->callback([kv] {
    export_kv_qparams(kv->work_dir, kv->turbomind_dir, kv->kv_bits, kv->kv_sym, kv->num_tp, std::cerr);
  });
}

}  // namespace lmd
