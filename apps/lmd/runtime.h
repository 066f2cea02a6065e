// What every model-loading command does first: pick the backend, load the checkpoint with progress,
// size the KV block pool from the engine flags, start the engine, and say what was decided.
#pragma once
#include <filesystem>
#include <memory>
#include <optional>
#include <ostream>
#include <string>

#include "cli_common.h"
#include "lmd/core/chat_template.h"
#include "lmd/core/model_spec.h"
#include "lmd/core/tokenizer.h"
#include "lmd/engine/backend.h"
#include "lmd/engine/engine.h"
#include "lmd/engine/model.h"

namespace lmd {

struct Runtime {
  std::filesystem::path model_dir;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::unique_ptr<Engine> engine;
  std::optional<Tokenizer> tokenizer;
  std::optional<ChatTemplate> chat_template;
  EngineConfig engine_config;

  const ModelSpec& spec() const { return model->spec(); }
  // Token ids that end a reply: the model's eos and the template's stop words that are single tokens.
  std::vector<int> stop_token_ids() const;
};

// The backend `device` names (auto: CUDA when this build has it and a GPU is present, else CPU).
std::unique_ptr<Backend> make_backend(const std::string& device, int cpu_threads);

// Loads everything from a Hugging Face folder or an `lmd convert` workspace (WS, WS/triton_models or
// WS/triton_models/weights; its config.ini values are defaults that `options` override); progress and
// the memory report go to `log`. Throws lmd::Error naming the path or flag on failure.
std::unique_ptr<Runtime> load_runtime(const std::string& model_path, const cli::EngineOptions& options,
                                      std::ostream& log);

// Sampling flags -> the engine's generation config.
GenerationConfig generation_config(const cli::SamplingOptions& options);

}  // namespace lmd
