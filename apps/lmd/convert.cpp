#include "convert.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <iostream>
#include <memory>

#include "cli_common.h"
#include "lmd/core/chat_template.h"
#include "lmd/core/error.h"
#include "lmd/core/workspace.h"

namespace lmd {
namespace {

namespace fs = std::filesystem;

struct ConvertOptions {
  std::string model_name;
  std::string model_path;
  std::string model_format;  // empty: from config.json
  std::string dst_path = "workspace";
  int group_size = 0;  // 0: from config.json
  int tp = 1;
};

// Files of a Hugging Face folder the tokenizer needs; tokenizer.model is required.
constexpr const char* kTokenizerFiles[] = {"tokenizer.model", "tokenizer_config.json",
                                           "special_tokens_map.json", "generation_config.json"};

void write_workspace(const ConvertOptions& opt, const fs::path& model_dir, const fs::path& tmp) {
  ModelSpec spec = load_model_spec(model_dir);
  if (opt.model_format == "awq" && !spec.awq.enabled)
    fail("--model-format awq: ", (model_dir / "config.json").string(),
         " has no AWQ quantization_config (quantize it with `lmd lite auto_awq` first)");
  if (opt.model_format == "hf" && spec.awq.enabled)
    fail("--model-format hf: ", (model_dir / "config.json").string(),
         " describes an AWQ checkpoint; pass --model-format awq");
  if (opt.group_size != 0 && spec.awq.enabled && opt.group_size != spec.awq.group_size)
    fail("--group-size ", opt.group_size, " differs from the checkpoint's group_size ", spec.awq.group_size,
         " in ", (model_dir / "config.json").string());
  if (!fs::is_regular_file(model_dir / "tokenizer.model"))
    fail(model_dir.string(), " has no tokenizer.model (lmd reads sentencepiece tokenizers)");

  const fs::path weights_dir = tmp / "triton_models" / "weights",
                 tokenizer_dir = tmp / "triton_models" / "tokenizer";
  fs::create_directories(weights_dir);
  fs::create_directories(tokenizer_dir);
  const CheckpointWeights weights = load_checkpoint(model_dir, spec);
  write_workspace_weights(weights_dir, weights, spec, [](int done, int total) {
    std::cerr << "\rlmd: convert: layer " << done << "/" << total << std::flush;
  });
  std::cerr << "\n";
  WorkspaceConfig config;
  config.spec = spec;
  config.model_name = opt.model_name;
  config.chat_template = chat_template_for_model_name(opt.model_name);
  config.tensor_para_size = opt.tp;
  config.engine.session_len = spec.max_position;
  write_workspace_config(weights_dir, config);
  for (const char* file : kTokenizerFiles)
    if (fs::is_regular_file(model_dir / file)) fs::copy_file(model_dir / file, tokenizer_dir / file);
}

void run_convert(const ConvertOptions& opt) {
  if (opt.tp != 1)
    fail("--tp ", opt.tp,
         ": lmd runs a model on one device so far, so workspaces are written unsplit; use --tp 1");
  chat_template_for_model_name(opt.model_name);  // reject a bad NAME before the slow part
  const fs::path model_dir = opt.model_path, dst = fs::absolute(opt.dst_path).lexically_normal();
  if (!fs::is_directory(model_dir)) fail("model path '", opt.model_path, "' is not a directory");
  if (fs::exists(dst) && !fs::is_empty(dst) && !find_workspace_weights(dst))
    fail("--dst-path ", dst.string(),
         " exists and is not an lmd workspace; remove it or choose another path");
  // Written beside the destination and renamed when complete, so WS is never half-written.
  const fs::path tmp =
      dst.parent_path() / ("." + dst.filename().string() + ".tmp-" + std::to_string(getpid()));
  fs::remove_all(tmp);
  try {
    write_workspace(opt, model_dir, tmp);
  } catch (...) {
    fs::remove_all(tmp);
    throw;
  }
  fs::remove_all(dst);
  fs::rename(tmp, dst);
  std::cerr << "lmd: wrote workspace " << dst.string() << " (chat template "
            << chat_template_for_model_name(opt.model_name) << "); run it with `lmd chat " << dst.string()
            << "`\n";
}

}  // namespace

std::string chat_template_for_model_name(const std::string& name) {
  std::string lower = name;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  for (const std::string& builtin : ChatTemplate::builtin_names())
    if (lower == builtin) return builtin;
  // Old LMDeploy names: family prefix, then size and variant ("internlm2-chat-7b", "llama-2-7b-chat").
  static const std::pair<const char*, const char*> kFamilies[] = {
      {"internlm2", "internlm2"}, {"internlm", "internlm"}, {"llama3", "llama3"}, {"llama-3", "llama3"},
      {"llama2", "llama2"},       {"llama-2", "llama2"},    {"qwen", "qwen"},
  };
  for (const auto& [prefix, builtin] : kFamilies)
    if (lower.rfind(prefix, 0) == 0) return builtin;
  std::string names;
  for (const std::string& b : ChatTemplate::builtin_names()) names += (names.empty() ? "" : ", ") + b;
  fail("model name '", name, "' names no chat template: use one of ", names,
       ", or an LMDeploy model name such as internlm2-chat-7b or internlm-chat-7b");
}

void add_convert_command(CLI::App& app) {
  auto opt = std::make_shared<ConvertOptions>();
  CLI::App* cmd = app.add_subcommand(
      "convert",
      "Write a TurboMind-style workspace (triton_models/weights + config.ini, triton_models/tokenizer)");
  cmd->add_option("model_name", opt->model_name,
                  "chat template / model name, e.g. internlm2 or internlm-chat-7b (stored in config.ini)")
      ->required();
  cli::add_model_path(*cmd, opt->model_path);
  cmd->add_option("--model-format", opt->model_format, "weights format; default: read from config.json")
      ->check(CLI::IsMember({"hf", "awq"}));
  cmd->add_option("--dst-path", opt->dst_path, "the workspace folder to write");
  cmd->add_option("--group-size", opt->group_size, "AWQ group size; 0: from config.json");
  cmd->add_option("--tp", opt->tp, "tensor-parallel GPUs (1 only for now)");
  cmd->callback([opt] { run_convert(*opt); });
}

}  // namespace lmd
