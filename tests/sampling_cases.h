// Sampling cases shared by the CPU and GPU sampling tests: rows of random logits (continuous, with ties at
// the top and everywhere, peaked, flat), each under a combination of temperature, top-k, top-p, min-p and
// penalties, with its random draw (the extremes 0 and just below 1 included); and a batch of engine
// requests that mixes every kind of token choice.
#pragma once
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "lmd/engine/engine.h"
#include "lmd/engine/sampler.h"
#include "test_support.h"

namespace lmd::test {

struct SamplingCase {
  int vocab = 0;
  std::vector<float> logits;  // [rows.size(), vocab]
  std::vector<SampleRow> rows;
};

// Every combination of the settings that switch each step of choose_token on and off: greedy
// (temperature 0, top_k 1), top_k none/small/large, top_p off/wide/narrow, min_p off/on, and
// penalties none / repetition / repetition + frequency + presence.
inline std::vector<SamplingParams> sampling_grid() {
  std::vector<SamplingParams> out;
  for (float temperature : {0.f, 0.5f, 1.f, 1.7f})
    for (int top_k : {0, 1, 40, 1000})
      for (float top_p : {1.f, 0.9f, 0.3f})
        for (float min_p : {0.f, 0.05f})
          for (int penalties : {0, 1, 2}) {
            SamplingParams p;
            p.temperature = temperature;
            p.top_k = top_k;
            p.top_p = top_p;
            p.min_p = min_p;
            p.repetition_penalty = penalties == 0 ? 1.f : penalties == 1 ? 1.3f : 1.1f;
            p.frequency_penalty = penalties == 2 ? 0.5f : 0.f;
            p.presence_penalty = penalties == 2 ? 0.3f : 0.f;
            out.push_back(p);
          }
  return out;
}

// One row of logits per parameter set; the row's shape cycles through five kinds.
inline SamplingCase sampling_case(int vocab, const std::vector<SamplingParams>& params, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 3.f);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  SamplingCase c;
  c.vocab = vocab;
  c.logits.resize(params.size() * size_t(vocab));
  for (size_t r = 0; r < params.size(); ++r) {
    float* row = c.logits.data() + r * vocab;
    const int kind = int(r % 5);
    for (int i = 0; i < vocab; ++i) {
      const float x = normal(rng);
      switch (kind) {
        case 0:  // continuous
          row[i] = x;
          break;
        case 1:  // quarter steps: ties everywhere, the top included
          row[i] = std::round(x * 4.f) / 4.f;
          break;
        case 2:  // one token far ahead of the rest
          row[i] = i == vocab / 3 ? 25.f : x;
          break;
        case 3:  // all equal: the order is the ids'
          row[i] = 0.f;
          break;
        default:  // continuous, the top value shared by three ids (the lowest id must win)
          row[i] = x;
      }
    }
    if (kind == 4) row[vocab - 1] = row[vocab / 2] = row[7] = 20.f;

    SampleRow s;
    s.params = params[r];
    s.uniform = r % 17 == 0 ? 0.0 : r % 17 == 1 ? std::nextafter(1.0, 0.0) : uniform(rng);
    // A history among the row's 60 largest logits, where penalties change the choice; one id outside
    // the vocabulary, which both backends ignore.
    std::vector<int> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    const int top = std::min(60, vocab);
    std::partial_sort(order.begin(), order.begin() + top, order.end(),
                      [&](int a, int b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
    std::vector<int> history;
    for (int i = 0; i < 48; ++i) history.push_back(order[rng() % top]);
    history.push_back(vocab + 5);
    s.penalties = penalty_tokens(s.params, history, 30);
    c.rows.push_back(std::move(s));
  }
  return c;
}

struct Generated {
  std::vector<int> tokens;
  std::vector<float> logprobs;
};

inline Generated collect(RequestStream& stream) {
  Generated out;
  TokenEvent ev;
  while (stream.next(ev)) {
    if (ev.finish == FinishReason::Error) FAIL(ev.error);
    if (ev.token >= 0) out.tokens.push_back(ev.token), out.logprobs.push_back(ev.logprob);
  }
  return out;
}

// Requests that batch together with every kind of token choice: seeded sampling with and without
// penalties, greedy with penalties, plain greedy, and one asking for top_logprobs (which needs the logits
// on the host). Prompts of different lengths prefill in chunks beside running decodes.
inline std::vector<Request> mixed_requests() {
  std::vector<Request> out;
  std::mt19937 rng(3);
  for (int i = 0; i < 8; ++i) {
    Request r;
    r.prompt.resize(2 + rng() % 40);
    for (int& t : r.prompt) t = 3 + int(rng() % 500);  // stories260K: vocab 512
    r.gen.max_new_tokens = i == 6 ? 4 : 24 + i;        // the top_logprobs request leaves early
    r.gen.ignore_eos = true;
    SamplingParams& p = r.gen.sampling;
    p.seed = 1000 + i;
    p.temperature = 0.8f;
    p.top_k = 40;
    p.top_p = 0.9f;
    if (i == 1) p.top_k = 0, p.top_p = 1.f, p.temperature = 1.2f;
    if (i == 2) p.min_p = 0.1f, p.repetition_penalty = 1.3f;
    if (i == 3) p.frequency_penalty = 0.4f, p.presence_penalty = 0.2f;
    if (i == 4) p.temperature = 0.f, p.repetition_penalty = 1.5f;  // greedy with a penalty
    if (i == 5) p.temperature = 0.f;                               // plain greedy
    if (i == 6) p.top_logprobs = 3;
    out.push_back(std::move(r));
  }
  return out;
}

inline std::vector<Generated> run_all(Engine& engine, const std::vector<Request>& requests) {
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (const Request& r : requests) streams.push_back(engine.submit(r));
  std::vector<Generated> out;
  for (auto& s : streams) out.push_back(collect(*s));
  return out;
}

inline EngineConfig chunked_engine() {
  EngineConfig c;
  c.block_len = 16;
  c.num_blocks = 256;
  c.max_prefill_tokens = 24;  // prompts take several steps, beside other sequences' decodes
  return c;
}

}  // namespace lmd::test
