#include "lmd/engine/engine.h"

#include <algorithm>

#include "lmd/core/error.h"

namespace lmd {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::None:
      return "";
    case FinishReason::Stop:
      return "stop";
    case FinishReason::Length:
      return "length";
    case FinishReason::Cancelled:
      return "cancelled";
    case FinishReason::Error:
      return "error";
  }
  return "";
}

// ---- RequestStream ----

void RequestStream::push(TokenEvent event) {
  {
    std::lock_guard lock(mutex_);
    if (event.finish != FinishReason::None) finished_ = true;
    events_.push_back(std::move(event));
  }
  cv_.notify_all();
}

bool RequestStream::next(TokenEvent& event) {
  std::unique_lock lock(mutex_);
  cv_.wait(lock, [&] { return !events_.empty() || drained_; });
  if (events_.empty()) return false;
  event = std::move(events_.front());
  events_.pop_front();
  if (event.finish != FinishReason::None) drained_ = true;
  return true;
}

bool RequestStream::try_next(TokenEvent& event) {
  std::lock_guard lock(mutex_);
  if (events_.empty()) return false;
  event = std::move(events_.front());
  events_.pop_front();
  if (event.finish != FinishReason::None) drained_ = true;
  return true;
}

bool RequestStream::done() const {
  std::lock_guard lock(mutex_);
  return drained_;
}

void RequestStream::cancel() {
  cancelled_ = true;
  if (engine_) engine_->wake();
}

// ---- Engine ----

struct Engine::Sequence {
  std::shared_ptr<RequestStream> stream;
  Request request;
  std::vector<int> tokens;  // the whole sequence: session history, prompt, generated tokens
  int kv_len = 0;           // leading tokens whose K/V are in the cache
  std::vector<int> blocks;
  size_t prompt_end = 0;  // tokens before generation started
  int generated = 0;
  int prefilled = 0;  // tokens run through prefill for this request (recomputation included)
  uint64_t arrival = 0;
  Sampler sampler;

  explicit Sequence(const SamplingParams& p) : sampler(p) {}
};

Engine::Engine(Model& model, const EngineConfig& config)
    : model_(model), config_(config), pool_(config.num_blocks) {
  if (config_.num_blocks <= 0) fail("the KV cache has no blocks (check --cache-max-entry-count)");
  if (config_.session_len <= 0) config_.session_len = model.spec().max_position;
  if (!config_.kv_static_params.empty() &&
      (config_.quant_bits != 8 || config_.kv_static_params.size() != 4 * size_t(model.spec().layers)))
    fail("static KV int8 needs quant_bits 8 and 4 parameters per layer (", 4 * model.spec().layers, "), got ",
         config_.quant_bits, " and ", config_.kv_static_params.size());
  KvCacheLayout layout = model.kv_layout(config_.num_blocks, config_.block_len, config_.quant_bits);
  layout.static_params = config_.kv_static_params;
  cache_ = model.backend().alloc_kv_cache(layout, model.activation_dtype());
  thread_ = std::thread([this] { scheduler_loop(); });
}

Engine::~Engine() { shutdown(); }

void Engine::shutdown() {
  {
    std::lock_guard lock(mutex_);
    if (stop_) {
      if (!thread_.joinable()) return;
    }
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Engine::wake() {
  { std::lock_guard lock(mutex_); }
  cv_.notify_all();
}

std::shared_ptr<RequestStream> Engine::submit(Request request) {
  auto stream = std::make_shared<RequestStream>();
  stream->engine_ = this;
  auto seq = std::make_unique<Sequence>(request.gen.sampling);
  std::unique_lock lock(mutex_);
  stream->id_ = next_id_++;
  auto reject = [&](const std::string& why) {
    TokenEvent ev;
    ev.finish = FinishReason::Error;
    ev.error = why;
    stream->push(ev);
    return stream;
  };
  if (stop_) return reject("the engine is shutting down");
  if (request.prompt.empty() && request.session_id == 0) return reject("the prompt is empty");
  if (request.session_id != 0) {
    Session& s = sessions_[request.session_id];
    if (s.busy)
      return reject("session " + std::to_string(request.session_id) + " is busy with another request");
    s.busy = true;
    seq->tokens = std::move(s.tokens);
    seq->kv_len = s.kv_len;
    seq->blocks = std::move(s.blocks);
    s.tokens.clear();
    s.blocks.clear();
    s.kv_len = 0;
  }
  seq->tokens.insert(seq->tokens.end(), request.prompt.begin(), request.prompt.end());
  if (int(seq->tokens.size()) >= config_.session_len) {
    const size_t history = seq->tokens.size() - request.prompt.size();
    // Give the history back untouched so that the caller can decide what to do.
    if (request.session_id != 0) {
      Session& s = sessions_[request.session_id];
      s.busy = false;
      seq->tokens.resize(history);
      s.tokens = std::move(seq->tokens);
      s.kv_len = seq->kv_len;
      s.blocks = std::move(seq->blocks);
    }
    return reject("the prompt (" + std::to_string(request.prompt.size()) +
                  " tokens) plus the session's history (" + std::to_string(history) +
                  " tokens) does not fit in --session-len " + std::to_string(config_.session_len));
  }
  seq->prompt_end = seq->tokens.size();
  seq->arrival = ++clock_;
  seq->stream = stream;
  seq->request = std::move(request);
  waiting_.push_back(std::move(seq));
  lock.unlock();
  cv_.notify_all();
  return stream;
}

void Engine::end_session(uint64_t session_id) {
  std::lock_guard lock(mutex_);
  auto it = sessions_.find(session_id);
  if (it == sessions_.end()) return;
  if (it->second.busy) {
    // Its request still runs; it is cancelled and will not be kept.
    for (auto& s : waiting_)
      if (s->request.session_id == session_id) s->stream->cancelled_ = true, s->request.keep_session = false;
    for (auto& s : running_)
      if (s->request.session_id == session_id) s->stream->cancelled_ = true, s->request.keep_session = false;
    cv_.notify_all();
    return;
  }
  pool_.release(it->second.blocks);
  sessions_.erase(it);
}

bool Engine::session_busy(uint64_t session_id) const {
  std::lock_guard lock(mutex_);
  auto it = sessions_.find(session_id);
  return it != sessions_.end() && it->second.busy;
}

EngineStats Engine::stats() const {
  std::lock_guard lock(mutex_);
  EngineStats s = counters_;
  s.running = int(running_.size());
  s.waiting = int(waiting_.size());
  s.sessions = int(sessions_.size());
  s.blocks_used = pool_.used_count();
  s.blocks_free = pool_.free_count();
  return s;
}

void Engine::scheduler_loop() {
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [&] { return stop_ || !waiting_.empty() || !running_.empty(); });
      if (stop_) {
        for (auto& s : running_) finish(*s, FinishReason::Cancelled);
        for (auto& s : waiting_) finish(*s, FinishReason::Cancelled);
        running_.clear();
        waiting_.clear();
        return;
      }
    }
    try {
      step();
    } catch (const std::exception& e) {
      // A failing forward step must not take the process down: fail the requests in it.
      std::lock_guard lock(mutex_);
      for (auto& s : running_) finish(*s, FinishReason::Error, e.what());
      running_.clear();
    }
  }
}

// Called with mutex_ held.
void Engine::finish(Sequence& seq, FinishReason reason, const std::string& error) {
  TokenEvent ev;
  ev.finish = reason;
  ev.error = error;
  ev.prompt_tokens = seq.prefilled;
  ev.generated_tokens = seq.generated;
  const uint64_t sid = seq.request.session_id;
  if (sid != 0) {
    Session& s = sessions_[sid];
    s.busy = false;
    s.last_used = ++clock_;
    if (seq.request.keep_session && reason != FinishReason::Error) {
      s.tokens = std::move(seq.tokens);
      s.kv_len = std::min<int>(seq.kv_len, int(s.tokens.size()));
      s.blocks = std::move(seq.blocks);
    } else {
      pool_.release(seq.blocks);
      sessions_.erase(sid);
    }
  } else {
    pool_.release(seq.blocks);
  }
  seq.stream->push(std::move(ev));
}

// Called with mutex_ held: frees the least recently used idle session's blocks.
bool Engine::evict_idle_session() {
  auto victim = sessions_.end();
  for (auto it = sessions_.begin(); it != sessions_.end(); ++it) {
    if (it->second.busy || it->second.blocks.empty()) continue;
    if (victim == sessions_.end() || it->second.last_used < victim->second.last_used) victim = it;
  }
  if (victim == sessions_.end()) return false;
  // The session keeps its tokens; its KV is recomputed when it is next used.
  pool_.release(victim->second.blocks);
  victim->second.kv_len = 0;
  return true;
}

// Called with mutex_ held. Makes `seq` hold blocks for `tokens` tokens, evicting idle sessions and then
// preempting the youngest other running sequence. False when nothing more can be freed.
bool Engine::reserve_blocks(Sequence& seq, int tokens, std::vector<std::unique_ptr<Sequence>>& running) {
  const int need = blocks_for(tokens, config_.block_len) - int(seq.blocks.size());
  if (need <= 0) return true;
  while (pool_.free_count() < need) {
    if (evict_idle_session()) continue;
    // Preempt the youngest running sequence other than `seq`; it goes back to the front of the queue
    // and recomputes its KV when it is readmitted.
    auto youngest = running.end();
    for (auto it = running.begin(); it != running.end(); ++it)
      if (it->get() != &seq && !(*it)->blocks.empty() &&
          (youngest == running.end() || (*it)->arrival > (*youngest)->arrival))
        youngest = it;
    if (youngest == running.end() || (*youngest)->arrival < seq.arrival) return false;
    Sequence& victim = **youngest;
    pool_.release(victim.blocks);
    victim.kv_len = 0;
    ++counters_.preemptions;
    waiting_.push_front(std::move(*youngest));
    running.erase(youngest);
  }
  return pool_.allocate(need, seq.blocks);
}

bool Engine::step() {
  std::vector<int> ids;
  BatchLayout batch;
  std::vector<Sequence*> in_batch;
  {
    std::lock_guard lock(mutex_);
    // Cancelled requests leave first, freeing their blocks.
    auto drop_cancelled = [&](auto& list) {
      for (auto it = list.begin(); it != list.end();) {
        if ((*it)->stream->cancelled_) {
          finish(**it, FinishReason::Cancelled);
          it = list.erase(it);
        } else {
          ++it;
        }
      }
    };
    drop_cancelled(running_);
    drop_cancelled(waiting_);
    while (!waiting_.empty() && int(running_.size()) < config_.max_batch_size) {
      running_.push_back(std::move(waiting_.front()));
      waiting_.pop_front();
    }
    std::sort(running_.begin(), running_.end(), [](auto& a, auto& b) { return a->arrival < b->arrival; });

    int prefill_budget = config_.max_prefill_tokens;
    for (size_t i = 0; i < running_.size(); ++i) {
      Sequence& seq = *running_[i];
      const int pending = int(seq.tokens.size()) - seq.kv_len;
      int n = pending;
      if (pending > 1) {  // prefill (or recomputation): a chunk within this step's budget
        n = std::min(pending, prefill_budget);
        if (n <= 0) continue;
      }
      const size_t before = running_.size();
      if (!reserve_blocks(seq, seq.kv_len + n, running_)) {
        if (in_batch.empty() && running_.size() == 1) {
          finish(seq, FinishReason::Error,
                 "the KV cache cannot hold this sequence (" + std::to_string(seq.kv_len + n) + " tokens in " +
                     std::to_string(pool_.total()) + " blocks of " + std::to_string(config_.block_len) +
                     "); raise --cache-max-entry-count or lower --session-len");
          running_.erase(running_.begin() + i);
        }
        break;  // the rest wait for blocks
      }
      if (running_.size() != before)
        i = std::find_if(running_.begin(), running_.end(), [&](auto& p) { return p.get() == &seq; }) -
            running_.begin();
      if (pending > 1) prefill_budget -= n;
      SeqSlice slice;
      slice.token_offset = int(ids.size());
      slice.num_new = n;
      slice.context_len = seq.kv_len;
      slice.blocks = seq.blocks;
      batch.seqs.push_back(std::move(slice));
      ids.insert(ids.end(), seq.tokens.begin() + seq.kv_len, seq.tokens.begin() + seq.kv_len + n);
      in_batch.push_back(&seq);
    }
  }
  if (in_batch.empty()) return false;

  // On an accelerator the token choice runs there, so that one (token, logprob) per sequence comes back
  // instead of [sequences, vocab] fp32 logits: the argmax when every sequence picks plainly greedily, else
  // Backend::sample with each sequence's RNG draw and penalty list. Both choose what the Sampler would
  // (the reference, which the CPU keeps). Reporting alternatives (top_logprobs) needs the logits.
  bool on_device = model_.backend().kind() != DeviceKind::CPU, plain_greedy = true;
  for (const Sequence* seq : in_batch) {
    const SamplingParams& p = seq->request.gen.sampling;
    on_device &= p.top_logprobs == 0;
    plain_greedy &= p.greedy() && !p.penalised();
  }
  std::vector<float> logits;
  std::vector<std::pair<int, float>> chosen;
  if (on_device && plain_greedy) {
    chosen = model_.forward_greedy(ids, batch, cache_);
  } else if (on_device) {
    std::vector<SampleRow> rows(in_batch.size());
    for (size_t i = 0; i < in_batch.size(); ++i) {
      Sequence& seq = *in_batch[i];
      // A sequence still prefilling its prompt picks nothing this step: its row stays a discarded greedy
      // choice and its RNG is not drawn (the Sampler draws once per token it picks).
      if (seq.kv_len + batch.seqs[i].num_new < int(seq.tokens.size())) {
        rows[i].params.temperature = 0.f;
        continue;
      }
      rows[i].params = seq.request.gen.sampling;
      if (!rows[i].params.greedy()) rows[i].uniform = seq.sampler.draw_uniform();
      rows[i].penalties = penalty_tokens(rows[i].params, seq.tokens, seq.prompt_end);
    }
    chosen = model_.forward_sample(ids, batch, cache_, rows);
  } else {
    logits = model_.forward(ids, batch, cache_);
  }
  const int vocab = model_.spec().vocab;

  std::lock_guard lock(mutex_);
  std::vector<Sequence*> finished;
  for (size_t i = 0; i < in_batch.size(); ++i) {
    Sequence& seq = *in_batch[i];
    seq.kv_len += batch.seqs[i].num_new;
    if (seq.generated == 0 || batch.seqs[i].num_new > 1) seq.prefilled += batch.seqs[i].num_new;
    counters_.prompt_tokens += batch.seqs[i].num_new > 1 ? batch.seqs[i].num_new : 0;
    if (seq.kv_len < int(seq.tokens.size())) continue;  // more prompt to prefill
    SampledToken tok;
    if (on_device) {
      tok.token = chosen[i].first;
      tok.logprob = chosen[i].second;
    } else {
      const std::span<const float> row(logits.data() + i * vocab, vocab);
      tok = seq.sampler.sample(row, seq.tokens, seq.prompt_end);
    }
    ++seq.generated;
    ++counters_.generated_tokens;
    const GenerationConfig& gen = seq.request.gen;
    const bool is_stop =
        std::find(gen.stop_ids.begin(), gen.stop_ids.end(), tok.token) != gen.stop_ids.end() ||
        (!gen.ignore_eos && tok.token == model_.spec().eos_id);
    TokenEvent ev;
    ev.token = tok.token;
    ev.logprob = tok.logprob;
    ev.top_logprobs = std::move(tok.top);
    ev.prompt_tokens = seq.prefilled;
    ev.generated_tokens = seq.generated;
    FinishReason reason = FinishReason::None;
    if (is_stop) {
      reason = FinishReason::Stop;  // the stop token is reported but not kept in the history
    } else {
      seq.tokens.push_back(tok.token);
      if (seq.generated >= gen.max_new_tokens || int(seq.tokens.size()) >= config_.session_len)
        reason = FinishReason::Length;
    }
    seq.stream->push(ev);
    if (reason != FinishReason::None) {
      finish(seq, reason);
      finished.push_back(&seq);
    }
  }
  if (!finished.empty()) {
    std::erase_if(running_, [&](auto& p) {
      return std::find(finished.begin(), finished.end(), p.get()) != finished.end();
    });
  }
  return true;
}

}  // namespace lmd
