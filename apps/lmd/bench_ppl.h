#pragma once
#include <CLI/CLI.hpp>

namespace lmd {
// `lmd bench ppl MODEL --dataset wikitext2|ptb|PATH`: perplexity over non-overlapping windows, added to
// the `bench` group.
void add_bench_ppl_command(CLI::App& bench);
}  // namespace lmd
