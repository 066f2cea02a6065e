#pragma once
#include <CLI/CLI.hpp>

namespace lmd {
// `lmd serve api_server MODEL` (the OpenAI-compatible HTTP server) and `lmd serve api_client URL`.
void add_serve_command(CLI::App& app);
}  // namespace lmd
