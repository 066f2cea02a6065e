#include "lmd/server/api_server.h"

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <iostream>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "lmd/core/error.h"
#include "lmd/core/stop_strings.h"
#include "lmd/server/api_error.h"
#include "lmd/server/chat_prompt.h"
#include "lmd/server/generation.h"
#include "lmd/server/metrics.h"
#include "lmd/server/request_parse.h"
#include "lmd/server/tool_calls.h"
#include "lmd/server/web_pages.h"

namespace lmd::server {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

// How long one step of a streamed response waits for tokens before checking on the client.
constexpr std::chrono::milliseconds kPollInterval{100};
// Idle time after which a streamed response writes a heartbeat; writing is the only way to learn that
// the client went away, and a request whose client is gone is cancelled.
constexpr std::chrono::seconds kHeartbeatInterval{1};

uint64_t random_u64() {
  static std::mutex mutex;
  static std::mt19937_64 rng{std::random_device{}()};
  std::lock_guard lock(mutex);
  return rng();
}

std::string random_hex(size_t digits) {
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < digits; ++i) s += hex[random_u64() % 16];
  return s;
}

int64_t unix_time() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

void send_json(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(dump_json(body), "application/json");
}

void send_error(httplib::Response& res, const ApiError& error) {
  if (error.status == 429) res.set_header("Retry-After", "1");
  send_json(res, error.status, error_body(error));
}

// Sends a body produced in steps with chunked transfer: `step` appends output and returns false once
// the body is complete. When a step produces nothing for a while a heartbeat is written; once the
// client has gone, a write fails, httplib drops the response, and with it `step` and the generation it
// owns, which cancels the engine's requests and frees their KV blocks.
void send_chunked(httplib::Response& res, const char* content_type, std::string heartbeat,
                  std::function<bool(std::string&)> step) {
  struct State {
    std::function<bool(std::string&)> step;
    std::string heartbeat;
    Clock::time_point last_write = Clock::now();
  };
  auto state = std::make_shared<State>(State{std::move(step), std::move(heartbeat)});
  res.set_chunked_content_provider(content_type, [state](size_t, httplib::DataSink& sink) {
    std::string out;
    bool more = false;
    try {
      more = state->step(out);
    } catch (const std::exception& e) {
      // The status line is already sent: the error can only go into the body.
      out += dump_json(error_body(500, std::string("internal error: ") + e.what()));
    }
    if (out.empty() && more && Clock::now() - state->last_write > kHeartbeatInterval) out = state->heartbeat;
    if (!out.empty()) {
      if (!sink.write(out.data(), out.size())) return false;
      state->last_write = Clock::now();
    }
    if (!more) sink.done();
    return true;
  });
}

std::string sse(const json& chunk) { return "data: " + dump_json(chunk) + "\n\n"; }

json usage_json(int prompt_tokens, int completion_tokens) {
  return {{"prompt_tokens", prompt_tokens},
          {"completion_tokens", completion_tokens},
          {"total_tokens", prompt_tokens + completion_tokens}};
}

// The fields every response object and stream chunk starts with; `choices` is filled by the caller.
json response_envelope(const std::string& id, const char* object, int64_t created, const std::string& model) {
  return {{"id", id}, {"object", object}, {"created", created}, {"model", model}, {"choices", json::array()}};
}

// The end of an SSE stream: the usage chunk (stream_options.include_usage), then [DONE].
std::string stream_end(bool include_usage, const std::string& id, const char* object, int64_t created,
                       const std::string& model, int prompt_tokens, int completion_tokens) {
  std::string out;
  if (include_usage) {
    json chunk = response_envelope(id, object, created, model);
    chunk["usage"] = usage_json(prompt_tokens, completion_tokens);
    out += sse(chunk);
  }
  return out + "data: [DONE]\n\n";
}

json utf8_bytes(const std::string& text) {
  json bytes = json::array();
  for (unsigned char c : text) bytes.push_back(int(c));
  return bytes;
}

// Chat logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}.
json chat_logprobs(const Tokenizer& tokenizer, const std::vector<TokenLogprob>& tokens) {
  json content = json::array();
  for (const TokenLogprob& t : tokens) {
    const std::string text = token_text(tokenizer, t.token);
    json top = json::array();
    for (const auto& [id, logprob] : t.top) {
      const std::string alt = token_text(tokenizer, id);
      top.push_back({{"token", alt}, {"logprob", logprob}, {"bytes", utf8_bytes(alt)}});
    }
    content.push_back(
        {{"token", text}, {"logprob", t.logprob}, {"bytes", utf8_bytes(text)}, {"top_logprobs", top}});
  }
  return {{"content", content}};
}

// Completion logprobs: parallel arrays, text_offset counted from `offset` in the choice's text.
json completion_logprobs(const Tokenizer& tokenizer, const std::vector<TokenLogprob>& tokens,
                         size_t& offset) {
  json result = {{"tokens", json::array()},
                 {"token_logprobs", json::array()},
                 {"top_logprobs", json::array()},
                 {"text_offset", json::array()}};
  for (const TokenLogprob& t : tokens) {
    const std::string text = token_text(tokenizer, t.token);
    json top = json::object();
    for (const auto& [id, logprob] : t.top) top[token_text(tokenizer, id)] = logprob;
    result["tokens"].push_back(text);
    result["token_logprobs"].push_back(t.logprob);
    result["top_logprobs"].push_back(top);
    result["text_offset"].push_back(offset);
    offset += text.size();
  }
  return result;
}

void append_completion_logprobs(json& into, const json& more) {
  for (const char* key : {"tokens", "token_logprobs", "top_logprobs", "text_offset"})
    for (const json& v : more[key]) into[key].push_back(v);
}

std::string tool_call_id() { return "call_" + random_hex(24); }

json tool_calls_json(const std::vector<ToolCall>& calls) {
  json out = json::array();
  for (const ToolCall& call : calls)
    out.push_back({{"id", tool_call_id()},
                   {"type", "function"},
                   {"function", {{"name", call.name}, {"arguments", call.arguments}}}});
  return out;
}

// A streamed call's piece as a `tool_calls` delta: the first one opens the call with its id, type and
// name, later ones carry only argument fragments (what OpenAI's clients accumulate).
json tool_call_delta_json(const ToolCallDelta& d) {
  json call = {{"index", d.index}};
  if (!d.name.empty()) {
    call["id"] = tool_call_id();
    call["type"] = "function";
    call["function"] = {{"name", d.name}, {"arguments", d.arguments}};
  } else {
    call["function"] = {{"arguments", d.arguments}};
  }
  return json::array({call});
}

}  // namespace

struct ApiServer::Impl {
  explicit Impl(ServerOptions opts) : options(std::move(opts)) {}

  // The model, once set_model() has been called; 503 before that and while draining.
  const ServedModel& served() {
    if (draining) throw ApiError(503, "the server is shutting down", "server_error", "shutting_down");
    if (!ready) throw ApiError(503, "the model is still loading", "server_error", "model_loading");
    return model;
  }

  void check_model_name(const std::string& requested) const {
    if (!requested.empty() && requested != options.model_name)
      throw ApiError(
          404,
          "the model '" + requested + "' does not exist; this server serves '" + options.model_name + "'",
          "invalid_request_error", "model_not_found", "model");
  }

  // A slot among --max-concurrent-requests, held while the request generates or waits to.
  std::shared_ptr<void> admit() {
    const int limit = options.max_concurrent_requests;
    if (++metrics.generations_in_flight > limit) {
      --metrics.generations_in_flight;
      throw ApiError(429,
                     "the server is busy (" + std::to_string(limit) + " requests in flight); retry later",
                     "rate_limit_error", "too_many_requests");
    }
    return std::shared_ptr<void>(nullptr, [this](void*) { --metrics.generations_in_flight; });
  }

  // Starts a generation and registers it so that a shutdown can cancel it.
  std::shared_ptr<Generation> generate(const std::vector<std::vector<int>>& prompts,
                                       const GenerationOptions& options, SessionTarget session = {}) {
    auto generation = std::make_shared<Generation>(model, metrics, prompts, options, session);
    std::lock_guard lock(generations_mutex);
    std::erase_if(generations, [](auto& weak) { return weak.expired(); });
    generations.push_back(generation);
    return generation;
  }

  void cancel_all() {
    std::lock_guard lock(generations_mutex);
    for (auto& weak : generations)
      if (auto generation = weak.lock()) generation->cancel();
  }

  void install_routes();
  bool authorized(const httplib::Request& req) const;
  void apply_cors(const httplib::Request& req, httplib::Response& res) const;

  void handle_chat(const httplib::Request& req, httplib::Response& res);
  void handle_completions(const httplib::Request& req, httplib::Response& res);
  void handle_interactive(const httplib::Request& req, httplib::Response& res);
  void handle_encode(const httplib::Request& req, httplib::Response& res);

  ServerOptions options;
  httplib::Server http;
  int bound_port = 0;
  ServerMetrics metrics;
  ServedModel model;
  std::atomic<bool> ready{false}, draining{false};

  std::mutex generations_mutex;
  std::vector<std::weak_ptr<Generation>> generations;

  // Interactive sessions: how many tokens each holds, and its running request (for `cancel`).
  struct Session {
    int history_tokens = 0;
    std::weak_ptr<Generation> running;
  };
  std::mutex sessions_mutex;
  std::map<uint64_t, Session> sessions;

  // shutdown() starts the drain on one thread while serve() (another thread) waits for it to end.
  std::mutex drain_mutex;
  std::thread drain_thread;
  void join_drain() {
    std::lock_guard lock(drain_mutex);
    if (drain_thread.joinable()) drain_thread.join();
  }
};

bool ApiServer::Impl::authorized(const httplib::Request& req) const {
  if (options.api_keys.empty()) return true;
  const std::string header = req.get_header_value("Authorization");
  const std::string prefix = "Bearer ";
  if (header.compare(0, prefix.size(), prefix) != 0) return false;
  const std::string key = header.substr(prefix.size());
  return std::find(options.api_keys.begin(), options.api_keys.end(), key) != options.api_keys.end();
}

void ApiServer::Impl::apply_cors(const httplib::Request& req, httplib::Response& res) const {
  if (options.allow_origins.empty()) return;
  const std::string origin = req.get_header_value("Origin");
  const auto& allowed = options.allow_origins;
  if (std::find(allowed.begin(), allowed.end(), "*") != allowed.end()) {
    res.set_header("Access-Control-Allow-Origin", "*");
  } else if (!origin.empty() && std::find(allowed.begin(), allowed.end(), origin) != allowed.end()) {
    res.set_header("Access-Control-Allow-Origin", origin);
    res.set_header("Vary", "Origin");
  } else {
    return;
  }
  res.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS");
  res.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type");
}

void ApiServer::Impl::install_routes() {
  http.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    apply_cors(req, res);
    if (req.method == "OPTIONS") {
      res.status = 204;
      return httplib::Server::HandlerResponse::Handled;
    }
    if (req.path.rfind("/v1/", 0) == 0 && !authorized(req)) {
      send_error(res, ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                               "authentication_error", "invalid_api_key"));
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  // Errors httplib answers itself (unknown path, oversize body, unparsable request) get a JSON body too.
  http.set_error_handler(
      httplib::Server::HandlerWithResponse([this](const httplib::Request&, httplib::Response& res) {
        if (!res.body.empty() || res.is_chunked_content_provider_)
          return httplib::Server::HandlerResponse::Unhandled;
        std::string message = "the request could not be read";
        if (res.status == 404) message = "no such endpoint (see GET / for the list)";
        if (res.status == 405) message = "method not allowed";
        if (res.status == 413)
          message = "the request body is larger than " + std::to_string(options.max_body_bytes) + " bytes";
        send_json(res, res.status, error_body(res.status, message));
        return httplib::Server::HandlerResponse::Handled;
      }));
  http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    try {
      std::rethrow_exception(ep);
    } catch (const ApiError& e) {
      send_error(res, e);
    } catch (const lmd::Error& e) {
      send_error(res, ApiError(400, e.what(), "invalid_request_error"));
    } catch (const std::exception& e) {
      send_error(res, ApiError(500, std::string("internal error: ") + e.what(), "server_error"));
    }
  });
  http.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    metrics.count_response(res.status);
    if (options.log_requests)
      std::cerr << "lmd: " << req.method << " " << req.path << " " << res.status << "\n";
  });

  http.Get("/", [this](const httplib::Request& req, httplib::Response& res) {
    const std::string host = req.has_header("Host") ? req.get_header_value("Host")
                                                    : options.host + ":" + std::to_string(bound_port);
    res.set_content(index_page(options.model_name, "http://" + host), "text/html; charset=utf-8");
  });
  http.Get("/chat", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(chat_page(), "text/html; charset=utf-8");
  });
  http.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    if (draining) return send_json(res, 503, {{"status", "shutting_down"}});
    if (!ready) return send_json(res, 503, {{"status", "loading"}});
    send_json(res, 200, {{"status", "ok"}});
  });
  http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    const EngineStats stats = ready ? model.engine->stats() : EngineStats{};
    res.set_content(metrics.render(stats), "text/plain; version=0.0.4");
  });
  http.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    json card = {{"id", options.model_name}, {"object", "model"},          {"created", unix_time()},
                 {"owned_by", "lmd"},        {"root", options.model_name}, {"permission", json::array()}};
    if (ready) card["max_model_len"] = model.engine->config().session_len;
    send_json(res, 200, {{"object", "list"}, {"data", json::array({card})}});
  });
  http.Post("/v1/chat/completions",
            [this](const httplib::Request& req, httplib::Response& res) { handle_chat(req, res); });
  http.Post("/v1/completions",
            [this](const httplib::Request& req, httplib::Response& res) { handle_completions(req, res); });
  http.Post("/v1/chat/interactive",
            [this](const httplib::Request& req, httplib::Response& res) { handle_interactive(req, res); });
  http.Post("/v1/encode",
            [this](const httplib::Request& req, httplib::Response& res) { handle_encode(req, res); });
}

void ApiServer::Impl::handle_chat(const httplib::Request& req, httplib::Response& res) {
  const json body = parse_body(req.body);
  const ChatRequest request = parse_chat_request(body);
  check_model_name(request.model);
  const ServedModel& m = served();
  const ToolFormat tool_format = request_tool_format(*m.chat_template, request);
  const std::string prompt = render_chat_prompt(*m.chat_template, request);
  const std::string prefill = reply_prefill(tool_format, request);  // the prompt's end, the reply's start
  auto slot = admit();
  auto generation = generate({m.tokenizer->encode(prompt, m.chat_template->add_bos())}, request.options);

  struct ChoiceState {
    ChoiceState(ToolFormat format, std::string_view prefill) : splitter(format, prefill) {}
    ToolCallStream splitter;  // streamed responses
    std::string text;         // non-streamed ones, parsed when complete
    std::vector<TokenLogprob> logprobs;
    std::string finish_reason;
  };
  auto choices = std::make_shared<std::vector<ChoiceState>>(generation->num_choices(),
                                                            ChoiceState(tool_format, prefill));
  const std::string id = "chatcmpl-" + random_hex(24);
  const int64_t created = unix_time();
  const GenerationOptions opts = request.options;
  const std::string model_name = options.model_name;
  const Tokenizer& tokenizer = *m.tokenizer;
  // A reply that called tools ends with finish_reason tool_calls.
  auto finish_reason = [](const std::string& reason, bool called) {
    return called && reason == "stop" ? std::string("tool_calls") : reason;
  };

  if (!opts.stream) {
    send_chunked(res, "application/json", " ", [=, &tokenizer](std::string& out) {
      std::vector<ChoiceDelta> deltas;
      const bool more = generation->poll(deltas, kPollInterval);
      for (const ChoiceDelta& d : deltas) {
        ChoiceState& c = (*choices)[d.index];
        c.text += d.text;
        c.logprobs.insert(c.logprobs.end(), d.logprobs.begin(), d.logprobs.end());
        c.finish_reason = d.finish_reason;
        if (d.finish_reason == "error") {
          out = dump_json(error_body(500, "generation failed: " + d.error));
          return false;
        }
      }
      if (more) return true;
      json result = response_envelope(id, "chat.completion", created, model_name);
      for (size_t i = 0; i < choices->size(); ++i) {
        const ChoiceState& c = (*choices)[i];
        const ParsedReply parsed = parse_tool_calls(tool_format, c.text, prefill);
        const bool called = !parsed.calls.empty();
        json message = {{"role", "assistant"}};
        message["content"] = parsed.content.empty() && called ? json() : json(parsed.content);
        if (called) message["tool_calls"] = tool_calls_json(parsed.calls);
        result["choices"].push_back(
            {{"index", i},
             {"message", message},
             {"logprobs", opts.logprobs >= 0 ? chat_logprobs(tokenizer, c.logprobs) : json()},
             {"finish_reason", finish_reason(c.finish_reason, called)}});
      }
      result["usage"] = usage_json(generation->prompt_tokens(), generation->completion_tokens());
      out = dump_json(result);
      (void)slot;  // held until the body is complete
      return false;
    });
    return;
  }

  auto started = std::make_shared<bool>(false);
  send_chunked(res, "text/event-stream", ": keep-alive\n\n", [=, &tokenizer](std::string& out) {
    auto chunk = [&](size_t index, json delta, const json& logprobs, const json& finish_reason) {
      json c = response_envelope(id, "chat.completion.chunk", created, model_name);
      c["choices"].push_back({{"index", index},
                              {"delta", std::move(delta)},
                              {"logprobs", logprobs},
                              {"finish_reason", finish_reason}});
      if (opts.include_usage) c["usage"] = nullptr;
      out += sse(c);
    };
    if (!*started) {
      *started = true;
      for (size_t i = 0; i < choices->size(); ++i)
        // With tools, a reply may be calls alone, whose content is null as in the non-streamed message.
        chunk(i,
              tool_format == ToolFormat::None ? json{{"role", "assistant"}, {"content", ""}}
                                              : json{{"role", "assistant"}},
              nullptr, nullptr);
    }
    std::vector<ChoiceDelta> deltas;
    const bool more = generation->poll(deltas, kPollInterval);
    for (const ChoiceDelta& d : deltas) {
      ChoiceState& c = (*choices)[d.index];
      auto send = [&](const ReplyDelta& reply, const std::vector<TokenLogprob>& tokens) {
        const json logprobs = opts.logprobs >= 0 ? chat_logprobs(tokenizer, tokens) : json();
        if (!reply.content.empty() || !tokens.empty())
          chunk(d.index, {{"content", reply.content}}, logprobs, nullptr);
        for (const ToolCallDelta& call : reply.calls)
          chunk(d.index, {{"tool_calls", tool_call_delta_json(call)}}, nullptr, nullptr);
      };
      send(c.splitter.push(d.text), d.logprobs);
      if (d.finish_reason.empty()) continue;
      if (d.finish_reason == "error") out += sse(error_body(500, "generation failed: " + d.error));
      send(c.splitter.finish(), {});
      chunk(d.index, json::object(), nullptr, finish_reason(d.finish_reason, c.splitter.num_calls() > 0));
    }
    if (more) return true;
    out += stream_end(opts.include_usage, id, "chat.completion.chunk", created, model_name,
                      generation->prompt_tokens(), generation->completion_tokens());
    (void)slot;  // held until the body is complete
    return false;
  });
}

void ApiServer::Impl::handle_completions(const httplib::Request& req, httplib::Response& res) {
  const json body = parse_body(req.body);
  const CompletionRequest request = parse_completion_request(body);
  check_model_name(request.model);
  const ServedModel& m = served();
  std::vector<std::vector<int>> prompts;
  for (const std::string& prompt : request.prompts) prompts.push_back(m.tokenizer->encode(prompt, true));
  auto slot = admit();
  auto generation = generate(prompts, request.options);

  struct ChoiceState {
    std::string text;
    json logprobs;
    size_t offset = 0;  // text_offset of the next token
    std::string finish_reason;
    bool started = false;
  };
  auto choices = std::make_shared<std::vector<ChoiceState>>(generation->num_choices());
  const int n = request.options.n;
  for (size_t i = 0; i < choices->size(); ++i) {
    ChoiceState& c = (*choices)[i];
    if (request.echo) c.text = request.prompts[i / n];
    c.offset = c.text.size();
    c.logprobs = completion_logprobs(*m.tokenizer, {}, c.offset);
  }
  const std::string id = "cmpl-" + random_hex(24);
  const int64_t created = unix_time();
  const GenerationOptions opts = request.options;
  const std::string model_name = options.model_name;
  const Tokenizer& tokenizer = *m.tokenizer;
  auto choice_json = [opts](size_t index, const std::string& text, const json& logprobs, const json& finish) {
    return json{{"index", index},
                {"text", text},
                {"logprobs", opts.logprobs >= 0 ? logprobs : json()},
                {"finish_reason", finish}};
  };

  if (!opts.stream) {
    send_chunked(res, "application/json", " ", [=, &tokenizer](std::string& out) {
      std::vector<ChoiceDelta> deltas;
      const bool more = generation->poll(deltas, kPollInterval);
      for (const ChoiceDelta& d : deltas) {
        ChoiceState& c = (*choices)[d.index];
        c.text += d.text;
        append_completion_logprobs(c.logprobs, completion_logprobs(tokenizer, d.logprobs, c.offset));
        if (!d.finish_reason.empty()) c.finish_reason = d.finish_reason;
        if (d.finish_reason == "error") {
          out = dump_json(error_body(500, "generation failed: " + d.error));
          return false;
        }
      }
      if (more) return true;
      json result = response_envelope(id, "text_completion", created, model_name);
      for (size_t i = 0; i < choices->size(); ++i) {
        const ChoiceState& c = (*choices)[i];
        result["choices"].push_back(choice_json(i, c.text, c.logprobs, c.finish_reason));
      }
      result["usage"] = usage_json(generation->prompt_tokens(), generation->completion_tokens());
      out = dump_json(result);
      (void)slot;  // held until the body is complete
      return false;
    });
    return;
  }

  send_chunked(res, "text/event-stream", ": keep-alive\n\n", [=, &tokenizer](std::string& out) {
    auto chunk = [&](const json& choice) {
      json c = response_envelope(id, "text_completion", created, model_name);
      c["choices"].push_back(choice);
      if (opts.include_usage) c["usage"] = nullptr;
      out += sse(c);
    };
    std::vector<ChoiceDelta> deltas;
    const bool more = generation->poll(deltas, kPollInterval);
    for (const ChoiceDelta& d : deltas) {
      ChoiceState& c = (*choices)[d.index];
      // The echoed prompt goes out with the choice's first text.
      const std::string text = c.started ? d.text : c.text + d.text;
      c.started = true;
      if (d.finish_reason == "error") out += sse(error_body(500, "generation failed: " + d.error));
      const json finish = d.finish_reason.empty() ? json() : json(d.finish_reason);
      chunk(choice_json(d.index, text, completion_logprobs(tokenizer, d.logprobs, c.offset), finish));
    }
    if (more) return true;
    out += stream_end(opts.include_usage, id, "text_completion", created, model_name,
                      generation->prompt_tokens(), generation->completion_tokens());
    (void)slot;  // held until the body is complete
    return false;
  });
}

void ApiServer::Impl::handle_interactive(const httplib::Request& req, httplib::Response& res) {
  const json body = parse_body(req.body);
  const InteractiveRequest request = parse_interactive_request(body);
  const ServedModel& m = served();
  if (request.session_id == 0)
    invalid_param("session_id", "'session_id' must be positive, or -1 for a new session");
  // New sessions get ids that fit the int32 that LMDeploy's clients use.
  const uint64_t session_id = request.session_id > 0 ? uint64_t(request.session_id)
                                                     : 1 + random_u64() % std::numeric_limits<int32_t>::max();
  auto result_json = [session_id](const std::string& text, int tokens, int input_tokens, int history_tokens,
                                  const json& finish_reason) {
    return json{{"text", text},
                {"tokens", tokens},
                {"input_tokens", input_tokens},
                {"history_tokens", history_tokens},
                {"finish_reason", finish_reason},
                {"session_id", session_id}};
  };

  std::unique_lock lock(sessions_mutex);
  Session& session = sessions[session_id];
  if (request.cancel) {
    if (auto running = session.running.lock()) running->cancel();
    return send_json(res, 200, result_json("", 0, 0, session.history_tokens, "abort"));
  }
  if (m.engine->session_busy(session_id) || !session.running.expired())
    invalid_param("session_id", "session " + std::to_string(session_id) + " is busy with another request",
                  "session_busy");
  if (!request.interactive_mode) {
    // A stateless request starts from scratch; with an empty prompt it only ends the session.
    m.engine->end_session(session_id);
    sessions.erase(session_id);
    if (request.prompt.empty()) return send_json(res, 200, result_json("", 0, 0, 0, "stop"));
  }
  Session& state = sessions[session_id];
  const bool first_turn = state.history_tokens == 0;
  const int history_tokens = state.history_tokens;
  const std::vector<int> prompt = m.tokenizer->encode(
      m.chat_template->render_turn(request.prompt, first_turn), first_turn && m.chat_template->add_bos());
  auto slot = admit();
  auto generation = generate({prompt}, request.options, {session_id, request.interactive_mode});
  state.running = generation;
  lock.unlock();

  // When the reply ends: the session now holds its history plus this turn.
  auto record_turn = [this, session_id, generation,
                      keep = request.interactive_mode](const std::string& finish) {
    std::lock_guard lock(sessions_mutex);
    auto it = sessions.find(session_id);
    if (it == sessions.end()) return 0;
    if (!keep || finish == "error") {
      sessions.erase(it);
      return 0;
    }
    it->second.history_tokens += generation->prompt_tokens() + generation->completion_tokens();
    it->second.running.reset();
    return it->second.history_tokens;
  };
  const int input_tokens = int(prompt.size());
  auto text = std::make_shared<std::string>();
  const bool stream = request.options.stream;
  send_chunked(
      res, stream ? "application/x-ndjson" : "application/json", stream ? "\n" : " ", [=](std::string& out) {
        std::vector<ChoiceDelta> deltas;
        const bool more = generation->poll(deltas, kPollInterval);
        for (const ChoiceDelta& d : deltas) {
          const json finish = d.finish_reason.empty() ? json() : json(d.finish_reason);
          const int history = d.finish_reason.empty() ? history_tokens : record_turn(d.finish_reason);
          json line = result_json(stream ? d.text : *text + d.text, generation->completion_tokens(),
                                  input_tokens, history, finish);
          if (d.finish_reason == "error") line["error"] = d.error;
          *text += d.text;
          if (stream)
            out += dump_json(line) + "\n";
          else if (!more)
            out = dump_json(line);
        }
        (void)slot;  // held until the body is complete
        return more;
      });
}

void ApiServer::Impl::handle_encode(const httplib::Request& req, httplib::Response& res) {
  const json body = parse_body(req.body);
  const Fields fields(body);
  const ServedModel& m = served();
  if (!fields.has("input")) invalid_param("input", "'input' is required", "missing_required_parameter");
  const bool single = body["input"].is_string();
  const std::vector<std::string> inputs = fields.strings("input", 1024);
  const bool preprocess = fields.boolean("do_preprocess").value_or(false);
  const bool add_bos = fields.boolean("add_bos").value_or(true);
  json ids = json::array(), lengths = json::array();
  for (const std::string& input : inputs) {
    const std::string text = preprocess ? m.chat_template->render({{"user", input}}, true) : input;
    const std::vector<int> tokens =
        m.tokenizer->encode(text, add_bos && (!preprocess || m.chat_template->add_bos()));
    ids.push_back(tokens);
    lengths.push_back(tokens.size());
  }
  if (single) return send_json(res, 200, {{"input_ids", ids[0]}, {"length", lengths[0]}});
  send_json(res, 200, {{"input_ids", ids}, {"length", lengths}});
}

ApiServer::ApiServer(ServerOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {
  Impl& s = *impl_;
  // One worker thread per connection: enough for every admitted request plus health and metrics probes.
  const size_t workers = size_t(std::max(1, s.options.max_concurrent_requests)) + 16;
  s.http.new_task_queue = [workers] { return new httplib::ThreadPool(workers); };
  s.http.set_payload_max_length(s.options.max_body_bytes);
  s.http.set_keep_alive_max_count(1000);
  s.install_routes();
}

ApiServer::~ApiServer() {
  shutdown();
  impl_->join_drain();
}

void ApiServer::bind() {
  Impl& s = *impl_;
  if (s.options.port == 0) {
    s.bound_port = s.http.bind_to_any_port(s.options.host);
    if (s.bound_port <= 0) fail("cannot listen on ", s.options.host, " (--server-name)");
  } else {
    if (!s.http.bind_to_port(s.options.host, s.options.port))
      fail("cannot listen on ", s.options.host, ":", s.options.port,
           " (is another server running there? see --server-name / --server-port)");
    s.bound_port = s.options.port;
  }
}

int ApiServer::port() const { return impl_->bound_port; }

void ApiServer::set_model(const ServedModel& model) {
  impl_->model = model;
  impl_->ready = true;
}

void ApiServer::serve() {
  impl_->http.listen_after_bind();
  impl_->join_drain();
}

void ApiServer::shutdown() {
  Impl& s = *impl_;
  if (s.draining.exchange(true)) return;
  // Held while the thread is stored: the drain can stop the listener, and serve() join it, before then.
  std::lock_guard lock(s.drain_mutex);
  s.drain_thread = std::thread([&s] {
    // httplib cuts streamed responses short once it stops, so in-flight requests are drained first.
    auto wait_idle = [&](double seconds) {
      const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
      while (s.metrics.generations_in_flight > 0 && Clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    };
    wait_idle(s.options.drain_seconds);
    s.cancel_all();
    wait_idle(2);
    s.http.stop();
  });
}

}  // namespace lmd::server
