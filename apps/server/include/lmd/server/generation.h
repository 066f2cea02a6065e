// One HTTP request's generation: a request to the engine per choice (n choices per prompt), the engine's
// token events turned into reply text (stop tokens left out, stop strings matched on the decoded text,
// partial matches held back) and logprobs, as deltas that a response writer streams or collects.
#pragma once
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lmd/core/stop_strings.h"
#include "lmd/core/tokenizer.h"
#include "lmd/engine/engine.h"
#include "lmd/server/metrics.h"
#include "lmd/server/request_parse.h"

namespace lmd::server {

struct ServedModel;

struct TokenLogprob {
  int token = -1;
  float logprob = 0;
  std::vector<std::pair<int, float>> top;
};

struct ChoiceDelta {
  size_t index = 0;
  std::string text;
  std::vector<TokenLogprob> logprobs;
  std::string finish_reason;  // set on the choice's last delta: stop, length, abort, error
  std::string error;          // with finish_reason "error"
};

// Where a generation's requests go in the engine.
struct SessionTarget {
  uint64_t session_id = 0;  // 0: one-off sequences
  bool keep_session = false;
};

class Generation {
 public:
  // Submits every choice. An ApiError (400) when the engine refuses at once (the prompt and the
  // session's history do not fit in the session length, the session is busy).
  Generation(const ServedModel& model, ServerMetrics& metrics, const std::vector<std::vector<int>>& prompts,
             const GenerationOptions& options, SessionTarget session = {});
  // Cancels whatever is still running (a client that went away).
  ~Generation();
  Generation(const Generation&) = delete;
  Generation& operator=(const Generation&) = delete;

  // Waits up to `timeout` for progress and appends the deltas that became visible. Returns false once
  // every choice has finished (its last delta carries finish_reason).
  bool poll(std::vector<ChoiceDelta>& deltas, std::chrono::milliseconds timeout);
  void cancel();

  size_t num_choices() const { return choices_.size(); }
  int prompt_tokens() const { return prompt_tokens_; }
  int completion_tokens() const;

 private:
  struct Choice {
    Choice(const Tokenizer& tokenizer, const std::vector<std::string>& stops)
        : decoder(tokenizer), stops(stops) {}
    std::shared_ptr<RequestStream> stream;
    std::optional<TokenEvent> early;  // an event read while checking for an immediate refusal
    StreamDecoder decoder;
    StopStringMatcher stops;
    int tokens = 0;
    bool finished = false;
  };
  // Turns one engine event of choice `index` into a delta (when it makes anything visible).
  void handle(size_t index, const TokenEvent& event, std::vector<ChoiceDelta>& deltas);
  bool is_stop_token(int token) const;

  const ServedModel& model_;
  ServerMetrics& metrics_;
  GenerationOptions options_;
  std::vector<int> stop_ids_;
  std::vector<std::unique_ptr<Choice>> choices_;
  int prompt_tokens_ = 0;
  std::chrono::steady_clock::time_point start_, last_token_;
  bool any_token_ = false;
};

// A token's text as a client should see it in logprobs: byte-fallback pieces as their byte, '▁' as a
// space, special tokens as their text.
std::string token_text(const Tokenizer& tokenizer, int id);

}  // namespace lmd::server
