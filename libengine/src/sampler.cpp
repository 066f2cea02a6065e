#include "lmd/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_map>

namespace lmd {

std::vector<float> log_softmax(std::span<const float> logits) {
  const float mx = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float v : logits) sum += std::exp(double(v) - mx);
  const float lse = mx + float(std::log(sum));
  std::vector<float> out(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) out[i] = logits[i] - lse;
  return out;
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

SampledToken Sampler::sample(std::span<const float> raw, std::span<const int> history, size_t num_prompt) {
  const int vocab = static_cast<int>(raw.size());
  std::vector<float> logits(raw.begin(), raw.end());

  if (params_.repetition_penalty != 1.0f) {
    std::vector<bool> seen(vocab, false);
    for (int t : history)
      if (t >= 0 && t < vocab) seen[t] = true;
    for (int t = 0; t < vocab; ++t)
      if (seen[t])
        logits[t] =
            logits[t] > 0 ? logits[t] / params_.repetition_penalty : logits[t] * params_.repetition_penalty;
  }
  if (params_.frequency_penalty != 0.f || params_.presence_penalty != 0.f) {
    std::unordered_map<int, int> counts;
    for (size_t i = num_prompt; i < history.size(); ++i) ++counts[history[i]];
    for (auto [t, c] : counts)
      if (t >= 0 && t < vocab) logits[t] -= params_.frequency_penalty * c + params_.presence_penalty;
  }

  int chosen;
  if (params_.greedy()) {
    chosen = int(std::max_element(logits.begin(), logits.end()) - logits.begin());
  } else {
    // Candidates sorted by logit; top-k, then the softmax at temperature, then top-p and min-p.
    std::vector<int> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    const int k = params_.top_k > 0 ? std::min(params_.top_k, vocab) : vocab;
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int a, int b) { return logits[a] > logits[b]; });
    order.resize(k);
    std::vector<double> probs(k);
    const double mx = logits[order[0]];
    double sum = 0;
    for (int i = 0; i < k; ++i) sum += probs[i] = std::exp((logits[order[i]] - mx) / params_.temperature);
    for (double& p : probs) p /= sum;
    int keep = k;
    if (params_.top_p < 1.f) {
      double cum = 0;
      for (int i = 0; i < k; ++i) {
        cum += probs[i];
        if (cum >= params_.top_p) {
          keep = i + 1;
          break;
        }
      }
    }
    if (params_.min_p > 0.f) {
      int i = 1;
      while (i < keep && probs[i] >= params_.min_p * probs[0]) ++i;
      keep = i;
    }
    double total = 0;
    for (int i = 0; i < keep; ++i) total += probs[i];
    const double r = std::uniform_real_distribution<double>(0.0, total)(rng_);
    double cum = 0;
    chosen = order[keep - 1];
    for (int i = 0; i < keep; ++i) {
      cum += probs[i];
      if (r < cum) {
        chosen = order[i];
        break;
      }
    }
  }

  SampledToken out;
  out.token = chosen;
  const std::vector<float> lp = log_softmax(raw);
  out.logprob = lp[chosen];
  if (params_.top_logprobs > 0) {
    std::vector<int> idx(vocab);
    std::iota(idx.begin(), idx.end(), 0);
    const int n = std::min(params_.top_logprobs, vocab);
    std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), [&](int a, int b) { return lp[a] > lp[b]; });
    for (int i = 0; i < n; ++i) out.top.emplace_back(idx[i], lp[idx[i]]);
  }
  return out;
}

}  // namespace lmd
