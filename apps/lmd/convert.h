// `lmd convert NAME MODEL --dst-path WS`: writes the TurboMind-style workspace that chat/serve/bench
// load directly (libcore/workspace.h, docs/formats.md).
#pragma once
#include <CLI/CLI.hpp>
#include <string>

namespace lmd {

void add_convert_command(CLI::App& app);

// The builtin chat template a convert NAME selects: a builtin name, or an old LMDeploy model name
// (internlm-chat-7b -> internlm, internlm2-chat-7b -> internlm2, llama2-7b-chat -> llama2, ...).
// lmd::Error listing what is accepted otherwise.
std::string chat_template_for_model_name(const std::string& name);

}  // namespace lmd
