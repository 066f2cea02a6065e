// Token sampling from one row of logits: penalties, temperature, top-k, top-p, min-p, seeded RNG.
#pragma once
#include <cstdint>
#include <random>
#include <span>
#include <utility>
#include <vector>

namespace lmd {

struct SamplingParams {
  float temperature = 0.8f;         // <= 0: greedy
  int top_k = 40;                   // <= 0: no limit
  float top_p = 0.8f;               // 1: no limit
  float min_p = 0.0f;               // keep tokens with p >= min_p * p_max
  float repetition_penalty = 1.0f;  // HF style, over prompt and generated tokens
  float frequency_penalty = 0.0f;   // OpenAI style, over generated tokens
  float presence_penalty = 0.0f;
  uint64_t seed = 0;
  int top_logprobs = 0;  // alternatives to report per token

  bool greedy() const { return temperature <= 0.f || top_k == 1; }
  bool penalised() const {
    return repetition_penalty != 1.f || frequency_penalty != 0.f || presence_penalty != 0.f;
  }
};

struct SampledToken {
  int token = -1;
  float logprob = 0.f;                     // under the model's unmodified distribution
  std::vector<std::pair<int, float>> top;  // (token, logprob), most likely first
};

// One distinct token of a sequence's history, for the penalties: `generated` is how often it occurs
// among the generated tokens (the frequency and presence penalties count only those).
struct PenaltyToken {
  int token = 0;
  int generated = 0;
};

// Everything choosing one row's token needs besides its logits. `uniform` is the sequence's random draw
// in [0, 1) (Sampler::draw_uniform; unused when params.greedy()). `penalties` lists distinct token ids
// (penalty_tokens); ids outside the vocabulary are ignored.
struct SampleRow {
  SamplingParams params;
  double uniform = 0.0;
  std::vector<PenaltyToken> penalties;
};

// The distinct tokens of `history` (the first `num_prompt` are the prompt) that `params`' penalties touch,
// in order of first occurrence; empty when it has no penalties.
std::vector<PenaltyToken> penalty_tokens(const SamplingParams& params, std::span<const int> history,
                                         size_t num_prompt);

// The token choice, deterministic given `row` (the reference for every backend's `sample` op):
//   1. penalties on the listed tokens, in fp32: the repetition penalty divides a positive logit by it and
//      multiplies a negative one; then logit -= frequency_penalty * generated + presence_penalty for
//      tokens generated at least once;
//   2. greedy (params.greedy()): the largest penalised logit, lowest id on ties;
//   3. otherwise candidates in order of penalised logit, larger first, lower id first among equals; top-k
//      keeps the first k; p_i = exp((l_i - l_0) / temperature), in double, normalised over those k;
//      top-p (when < 1) keeps the shortest prefix whose cumulative p reaches top_p; min-p keeps, of that
//      prefix, the first candidate and those with p_i >= min_p * p_0;
//   4. r = uniform * (sum of kept p); the choice is the first kept candidate whose cumulative p exceeds r
//      (the last kept one if rounding leaves none).
// The logprob is the log-softmax of the unpenalised logits at the choice; `top` stays empty.
SampledToken choose_token(std::span<const float> logits, const SampleRow& row);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  // `history` is every token of the sequence so far; `num_prompt` of them are the prompt.
  SampledToken sample(std::span<const float> logits, std::span<const int> history, size_t num_prompt);
  // The next draw of the sequence's RNG, as sample() makes once per non-greedy choice; a backend that
  // samples on its own (Backend::sample) gets it through SampleRow::uniform.
  double draw_uniform();

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

// log_softmax of one row, for logprobs and perplexity.
std::vector<float> log_softmax(std::span<const float> logits);

}  // namespace lmd
