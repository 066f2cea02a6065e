// Perplexity over non-overlapping windows, the way quantized and full models are compared.
#pragma once
#include <functional>
#include <vector>

#include "lmd/engine/model.h"

namespace lmd {

struct PerplexityResult {
  double perplexity = 0;
  double mean_nll = 0;
  int64_t predicted_tokens = 0;
  int windows = 0;
};

// Splits `tokens` into consecutive windows of `seqlen` (a shorter tail is dropped), runs each through
// the model in one prefill and averages the negative log-likelihood of every token after the first of
// each window. `max_windows` > 0 evaluates only the first ones. `progress(done, total)` per window.
// `kv_quant_bits` runs the cache quantized (0, 8 or 4).
PerplexityResult perplexity(Model& model, const std::vector<int>& tokens, int seqlen, int max_windows = 0,
                            int kv_quant_bits = 0, const std::function<void(int, int)>& progress = {});

}  // namespace lmd
