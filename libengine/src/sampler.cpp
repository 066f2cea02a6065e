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

std::vector<PenaltyToken> penalty_tokens(const SamplingParams& params, std::span<const int> history,
                                         size_t num_prompt) {
  std::vector<PenaltyToken> out;
  if (!params.penalised()) return out;
  const bool repetition = params.repetition_penalty != 1.f;
  const bool counted = params.frequency_penalty != 0.f || params.presence_penalty != 0.f;
  std::unordered_map<int, size_t> index;  // token -> its entry in `out`
  for (size_t i = 0; i < history.size(); ++i) {
    const bool generated = i >= num_prompt;
    if (!repetition && !(counted && generated)) continue;  // a prompt token only the repetition penalty sees
    auto [it, fresh] = index.try_emplace(history[i], out.size());
    if (fresh) out.push_back({history[i], 0});
    if (generated) ++out[it->second].generated;
  }
  return out;
}

SampledToken choose_token(std::span<const float> raw, const SampleRow& row) {
  const SamplingParams& params = row.params;
  const int vocab = static_cast<int>(raw.size());
  std::vector<float> logits(raw.begin(), raw.end());
  for (const PenaltyToken& p : row.penalties) {
    if (p.token < 0 || p.token >= vocab) continue;
    float& l = logits[p.token];
    if (params.repetition_penalty != 1.f)
      l = l > 0 ? l / params.repetition_penalty : l * params.repetition_penalty;
    if (p.generated > 0 && (params.frequency_penalty != 0.f || params.presence_penalty != 0.f))
      l -= params.frequency_penalty * p.generated + params.presence_penalty;
  }

  int chosen;
  if (params.greedy()) {
    chosen = int(std::max_element(logits.begin(), logits.end()) - logits.begin());
  } else {
    // Candidates sorted by logit, the lower id first among equal logits (a total order, so that every
    // backend can reproduce it); top-k, then the softmax at temperature, then top-p and min-p.
    std::vector<int> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    const int k = params.top_k > 0 ? std::min(params.top_k, vocab) : vocab;
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int a, int b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    order.resize(k);
    std::vector<double> probs(k);
    const double mx = logits[order[0]];
    double sum = 0;
    for (int i = 0; i < k; ++i) sum += probs[i] = std::exp((logits[order[i]] - mx) / params.temperature);
    for (double& p : probs) p /= sum;
    int keep = k;
    if (params.top_p < 1.f) {
      double cum = 0;
      for (int i = 0; i < k; ++i) {
        cum += probs[i];
        if (cum >= params.top_p) {
          keep = i + 1;
          break;
        }
      }
    }
    if (params.min_p > 0.f) {
      int i = 1;
      while (i < keep && probs[i] >= params.min_p * probs[0]) ++i;
      keep = i;
    }
    double total = 0;
    for (int i = 0; i < keep; ++i) total += probs[i];
    const double r = row.uniform * total;
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
  out.logprob = log_softmax(raw)[chosen];
  return out;
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

// uniform_real_distribution(a, b) is a + canonical * (b - a) in libstdc++ and libc++: drawing from
// [0, 1) and scaling by the kept mass (choose_token) gives the values the Sampler drew from
// [0, total) before the draw moved out of the choice.
double Sampler::draw_uniform() { return std::uniform_real_distribution<double>(0.0, 1.0)(rng_); }

SampledToken Sampler::sample(std::span<const float> logits, std::span<const int> history, size_t num_prompt) {
  SampleRow row;
  row.params = params_;
  row.uniform = params_.greedy() ? 0.0 : draw_uniform();
  row.penalties = penalty_tokens(params_, history, num_prompt);
  SampledToken out = choose_token(logits, row);
  if (params_.top_logprobs > 0) {
    const std::vector<float> lp = log_softmax(logits);
    std::vector<int> idx(lp.size());
    std::iota(idx.begin(), idx.end(), 0);
    const int n = std::min<int>(params_.top_logprobs, int(lp.size()));
    std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), [&](int a, int b) { return lp[a] > lp[b]; });
    for (int i = 0; i < n; ++i) out.top.emplace_back(idx[i], lp[idx[i]]);
  }
  return out;
}

}  // namespace lmd
