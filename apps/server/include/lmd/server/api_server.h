// The OpenAI-compatible HTTP server (`lmd serve api_server`): /v1/models, /v1/chat/completions,
// /v1/completions, LMDeploy's /v1/chat/interactive, /v1/encode, /health, /metrics, and the pages / and
// /chat. Every request runs through the engine's scheduler; a client that goes away cancels its request.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "lmd/core/chat_template.h"
#include "lmd/core/tokenizer.h"
#include "lmd/engine/engine.h"

namespace lmd::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 23333;                        // 0: any free port (see ApiServer::port)
  std::vector<std::string> api_keys;       // empty: no authentication
  std::vector<std::string> allow_origins;  // CORS; "*" allows any
  std::string model_name;                  // what /v1/models reports and requests must name
  int max_concurrent_requests = 128;       // generating requests beyond it get 429
  size_t max_body_bytes = 4 << 20;
  double drain_seconds = 5;  // on shutdown, how long in-flight requests may finish before being cancelled
  bool log_requests = false;
};

// What the server generates with; owned by the caller and alive while the server runs.
struct ServedModel {
  Engine* engine = nullptr;
  const Tokenizer* tokenizer = nullptr;
  const ChatTemplate* chat_template = nullptr;
  std::vector<int> stop_ids;  // end a reply besides the model's EOS (template stop words that are tokens)
};

class ApiServer {
 public:
  explicit ApiServer(ServerOptions options);
  ~ApiServer();
  ApiServer(const ApiServer&) = delete;
  ApiServer& operator=(const ApiServer&) = delete;

  // Binds the listening socket; lmd::Error when the address cannot be bound.
  void bind();
  int port() const;
  // Starts generating: until then /health is 503 and generating endpoints answer 503.
  void set_model(const ServedModel& model);
  // Serves on the calling thread until shutdown() has drained the requests.
  void serve();
  // Stops taking work (/health turns 503, new requests get 503), lets in-flight requests finish for up
  // to drain_seconds, cancels what remains, then makes serve() return. Thread-safe; returns at once.
  void shutdown();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lmd::server
