#pragma once
#include <CLI/CLI.hpp>

namespace lmd {
// `lmd bench` with its `generation` (latency/throughput/memory profile) and `make-model` (random-weight
// checkpoints of real shapes) subcommands. Returns the group so that other benchmarks attach to it.
CLI::App* add_bench_command(CLI::App& app);
}  // namespace lmd
