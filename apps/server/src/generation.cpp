#include "lmd/server/generation.h"

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <random>
#include <thread>

#include "lmd/server/api_error.h"
#include "lmd/server/api_server.h"

namespace lmd::server {

namespace {

uint64_t random_seed() {
  static std::mutex mutex;
  static std::mt19937_64 rng{std::random_device{}()};
  std::lock_guard lock(mutex);
  return rng();
}

const char* finish_reason_text(FinishReason reason) {
  switch (reason) {
    case FinishReason::Stop:
      return "stop";
    case FinishReason::Length:
      return "length";
    case FinishReason::Cancelled:
      return "abort";
    case FinishReason::Error:
      return "error";
    case FinishReason::None:
      break;
  }
  return "";
}

}  // namespace

std::string token_text(const Tokenizer& tokenizer, int id) {
  std::string piece = tokenizer.id_to_piece(id);
  if (tokenizer.is_special(id)) return piece;
  unsigned byte = 0;
  if (piece.size() == 6 && std::sscanf(piece.c_str(), "<0x%02X>", &byte) == 1)
    return std::string(1, char(byte));
  static const std::string kSpaceMark = "\xE2\x96\x81";  // '▁'
  for (size_t pos = piece.find(kSpaceMark); pos != std::string::npos; pos = piece.find(kSpaceMark, pos + 1))
    piece.replace(pos, kSpaceMark.size(), " ");
  return piece;
}

Generation::Generation(const ServedModel& model, ServerMetrics& metrics,
                       const std::vector<std::vector<int>>& prompts, const GenerationOptions& options,
                       SessionTarget session)
    : model_(model), metrics_(metrics), options_(options), stop_ids_(model.stop_ids) {
  start_ = std::chrono::steady_clock::now();
  const int eos = model.engine->model().spec().eos_id;
  if (options.ignore_eos) std::erase(stop_ids_, eos);
  const int session_len = model.engine->config().session_len;
  for (const std::vector<int>& prompt : prompts) {
    prompt_tokens_ += int(prompt.size());
    if (session.session_id == 0 && int(prompt.size()) >= session_len)
      throw ApiError(400,
                     "the prompt is " + std::to_string(prompt.size()) +
                         " tokens long; this server's session length is " + std::to_string(session_len) +
                         " tokens (--session-len)",
                     "invalid_request_error", "context_length_exceeded");
    for (int i = 0; i < options.n; ++i) {
      Request request;
      request.prompt = prompt;
      request.gen.sampling = options.sampling;
      request.gen.sampling.seed = options.seeded ? options.sampling.seed + uint64_t(i) : random_seed();
      request.gen.stop_ids = stop_ids_;
      request.gen.ignore_eos = options.ignore_eos;
      request.gen.max_new_tokens = options.max_tokens.value_or(std::max(1, session_len - int(prompt.size())));
      request.session_id = session.session_id;
      request.keep_session = session.keep_session;
      auto choice = std::make_unique<Choice>(*model.tokenizer, options.stop);
      choice->stream = model.engine->submit(std::move(request));
      // The engine refuses a request inside submit(), so a refusal is already waiting here.
      TokenEvent first;
      if (choice->stream->try_next(first)) {
        if (first.finish == FinishReason::Error && first.token < 0) {
          cancel();
          throw ApiError(400, first.error, "invalid_request_error",
                         session.session_id ? "session_refused" : "context_length_exceeded");
        }
        choice->early = std::move(first);
      }
      choices_.push_back(std::move(choice));
    }
  }
}

Generation::~Generation() { cancel(); }

void Generation::cancel() {
  // Safe from any thread: cancelling a finished request does nothing.
  for (auto& choice : choices_) choice->stream->cancel();
}

int Generation::completion_tokens() const {
  int total = 0;
  for (const auto& choice : choices_) total += choice->tokens;
  return total;
}

bool Generation::is_stop_token(int token) const {
  return std::find(stop_ids_.begin(), stop_ids_.end(), token) != stop_ids_.end() ||
         (!options_.ignore_eos && token == model_.engine->model().spec().eos_id);
}

void Generation::handle(size_t index, const TokenEvent& event, std::vector<ChoiceDelta>& deltas) {
  Choice& choice = *choices_[index];
  if (choice.finished) return;
  ChoiceDelta delta;
  delta.index = index;
  // The token a reply stops on is not part of the reply.
  if (event.token >= 0 && !is_stop_token(event.token)) {
    const auto now = std::chrono::steady_clock::now();
    if (!any_token_)
      metrics_.time_to_first_token.observe(std::chrono::duration<double>(now - start_).count());
    else
      metrics_.time_per_output_token.observe(std::chrono::duration<double>(now - last_token_).count());
    any_token_ = true;
    last_token_ = now;
    ++choice.tokens;
    delta.text = choice.stops.push(choice.decoder.push(event.token));
    if (options_.logprobs >= 0) delta.logprobs.push_back({event.token, event.logprob, event.top_logprobs});
    if (choice.stops.stopped()) {
      choice.stream->cancel();
      delta.finish_reason = "stop";
    }
  }
  if (event.finish != FinishReason::None && delta.finish_reason.empty()) {
    delta.text += choice.stops.push(choice.decoder.flush());
    delta.text += choice.stops.flush();
    delta.finish_reason = choice.stops.stopped() ? "stop" : finish_reason_text(event.finish);
    delta.error = event.error;
  }
  if (!delta.finish_reason.empty()) {
    choice.finished = true;
    if (std::all_of(choices_.begin(), choices_.end(), [](auto& c) { return c->finished; }))
      metrics_.request_latency.observe(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
  }
  if (!delta.text.empty() || !delta.logprobs.empty() || !delta.finish_reason.empty())
    deltas.push_back(std::move(delta));
}

bool Generation::poll(std::vector<ChoiceDelta>& deltas, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    bool progressed = false;
    for (size_t i = 0; i < choices_.size(); ++i) {
      Choice& choice = *choices_[i];
      if (choice.early) {
        handle(i, *choice.early, deltas);
        choice.early.reset();
        progressed = true;
      }
      TokenEvent event;
      while (!choice.finished && choice.stream->try_next(event)) {
        handle(i, event, deltas);
        progressed = true;
      }
    }
    const bool running = std::any_of(choices_.begin(), choices_.end(), [](auto& c) { return !c->finished; });
    if (!running) return false;
    if (progressed || std::chrono::steady_clock::now() >= deadline) return true;
    // The engine's streams have no wait-for-any; a short sleep keeps 2 ms of latency at negligible cost.
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

}  // namespace lmd::server
