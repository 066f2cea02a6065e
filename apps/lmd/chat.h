#pragma once
#include <CLI/CLI.hpp>

namespace lmd {
// `lmd chat MODEL`: terminal chat that streams replies and keeps the session's KV between turns.
void add_chat_command(CLI::App& app);
}  // namespace lmd
