// `lmd lite calibrate` and `lmd lite kv_qparams`: the older LMDeploy flow of offline KV int8.
#pragma once
#include <CLI/CLI.hpp>

namespace lmd {

// Registers `calibrate` and `kv_qparams` on the `lite` sub-app.
void add_lite_kv_commands(CLI::App& lite);

}  // namespace lmd
