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
};

struct SampledToken {
  int token = -1;
  float logprob = 0.f;                     // under the model's unmodified distribution
  std::vector<std::pair<int, float>> top;  // (token, logprob), most likely first
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  // `history` is every token of the sequence so far; `num_prompt` of them are the prompt.
  SampledToken sample(std::span<const float> logits, std::span<const int> history, size_t num_prompt);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

// log_softmax of one row, for logprobs and perplexity.
std::vector<float> log_softmax(std::span<const float> logits);

}  // namespace lmd
