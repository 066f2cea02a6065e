#include "lmd/quant/perplexity.h"

#include <cmath>

#include "lmd/core/error.h"
#include "lmd/engine/block_pool.h"
#include "lmd/engine/sampler.h"

namespace lmd {

PerplexityResult perplexity(Model& model, const std::vector<int>& tokens, int seqlen, int max_windows,
                            int kv_quant_bits, const std::function<void(int, int)>& progress) {
  if (seqlen < 2) fail("--seqlen must be at least 2, got ", seqlen);
  int windows = int(tokens.size() / seqlen);
  if (windows == 0) fail("the evaluation text has ", tokens.size(), " tokens, fewer than --seqlen ", seqlen);
  if (max_windows > 0 && max_windows < windows) windows = max_windows;
  constexpr int kBlockLen = 64;
  const int nblocks = blocks_for(seqlen, kBlockLen);
  KvCacheStorage cache = model.backend().alloc_kv_cache(model.kv_layout(nblocks, kBlockLen, kv_quant_bits),
                                                        model.activation_dtype());
  std::vector<int> blocks(nblocks);
  for (int i = 0; i < nblocks; ++i) blocks[i] = i;
  const int vocab = model.spec().vocab;
  double nll = 0;
  int64_t count = 0;
  for (int w = 0; w < windows; ++w) {
    const std::vector<int> ids(tokens.begin() + int64_t(w) * seqlen,
                               tokens.begin() + int64_t(w + 1) * seqlen);
    BatchLayout batch;
    batch.seqs.push_back({0, seqlen, 0, blocks});
    const std::vector<float> logits = model.forward(ids, batch, cache, /*all_logits=*/true);
    for (int t = 0; t + 1 < seqlen; ++t) {
      const std::vector<float> lp = log_softmax({logits.data() + int64_t(t) * vocab, size_t(vocab)});
      nll -= lp[ids[t + 1]];
      ++count;
    }
    if (progress) progress(w + 1, windows);
  }
  PerplexityResult r;
  r.mean_nll = nll / double(count);
  r.perplexity = std::exp(r.mean_nll);
  r.predicted_tokens = count;
  r.windows = windows;
  return r;
}

}  // namespace lmd
