#pragma once
#include <CLI/CLI.hpp>

namespace lmd {
// `lmd lite ...`: offline compression. Creates the `lite` group with `auto_awq` and returns it, so the
// KV calibration commands can be added to the same group.
CLI::App* add_lite_command(CLI::App& app);
}  // namespace lmd
