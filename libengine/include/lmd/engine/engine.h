// The Engine API: submit requests (token ids + generation config), receive tokens as they are
// produced, cancel; sessions keep their KV between requests (interactive mode). A scheduler thread
// runs continuous batching: requests join the running batch, prompts are prefilled in chunks beside
// running decodes, and when KV blocks run out idle sessions are evicted, then the youngest request is
// preempted and recomputed later.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lmd/engine/block_pool.h"
#include "lmd/engine/model.h"
#include "lmd/engine/sampler.h"

namespace lmd {

struct GenerationConfig {
  int max_new_tokens = 512;
  SamplingParams sampling;
  std::vector<int> stop_ids;  // end generation (besides the model's eos unless ignore_eos)
  bool ignore_eos = false;
};

enum class FinishReason { None, Stop, Length, Cancelled, Error };
const char* finish_reason_name(FinishReason r);  // "stop", "length", "cancelled", "error"

struct TokenEvent {
  int token = -1;  // -1 for a final event that carries no token
  float logprob = 0.f;
  std::vector<std::pair<int, float>> top_logprobs;
  FinishReason finish = FinishReason::None;
  std::string error;
  int prompt_tokens = 0;     // tokens prefilled for this request (incl. session history recomputed)
  int generated_tokens = 0;  // so far
};

// The consumer's end of one request.
class RequestStream {
 public:
  // Blocks until the next event; returns false once the final event has been read.
  bool next(TokenEvent& event);
  // Non-blocking variant; returns false when nothing is ready (check done()).
  bool try_next(TokenEvent& event);
  bool done() const;
  void cancel();
  uint64_t id() const { return id_; }

 private:
  friend class Engine;
  void push(TokenEvent event);
  uint64_t id_ = 0;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<TokenEvent> events_;
  bool finished_ = false, drained_ = false;
  std::atomic<bool> cancelled_{false};
  class Engine* engine_ = nullptr;
};

struct Request {
  std::vector<int> prompt;  // tokens to append (after the session's history when session_id != 0)
  GenerationConfig gen;
  uint64_t session_id = 0;    // 0: a one-off sequence
  bool keep_session = false;  // keep the KV for the session's next request
};

struct EngineConfig {
  int max_batch_size = 64;
  int max_prefill_tokens = 8192;
  int session_len = 0;  // 0: the model's max_position
  int block_len = 64;
  int num_blocks = 0;
  int quant_bits = 0;
  std::vector<float> kv_static_params;  // static int8 KV: see KvCacheLayout::static_params
};

struct EngineStats {
  int running = 0, waiting = 0, sessions = 0;
  int blocks_used = 0, blocks_free = 0;
  uint64_t prompt_tokens = 0, generated_tokens = 0, preemptions = 0;
};

class Engine {
 public:
  Engine(Model& model, const EngineConfig& config);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  std::shared_ptr<RequestStream> submit(Request request);
  // Drops a session's kept KV (cancels its running request, if any).
  void end_session(uint64_t session_id);
  bool session_busy(uint64_t session_id) const;
  EngineStats stats() const;
  const EngineConfig& config() const { return config_; }
  Model& model() const { return model_; }
  // Stops the scheduler: running and waiting requests finish as cancelled.
  void shutdown();

 private:
  friend class RequestStream;
  struct Sequence;
  struct Session {
    std::vector<int> tokens;
    int kv_len = 0;
    std::vector<int> blocks;
    bool busy = false;
    uint64_t last_used = 0;
  };

  void wake();
  void scheduler_loop();
  bool step();  // one forward step; false when there was nothing to do
  bool reserve_blocks(Sequence& seq, int tokens, std::vector<std::unique_ptr<Sequence>>& running);
  bool evict_idle_session();
  void finish(Sequence& seq, FinishReason reason, const std::string& error = {});

  Model& model_;
  EngineConfig config_;
  KvCacheStorage cache_;
  BlockPool pool_;

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;  // touched by the scheduler thread only
  std::map<uint64_t, Session> sessions_;
  uint64_t next_id_ = 1, clock_ = 0;
  EngineStats counters_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace lmd
