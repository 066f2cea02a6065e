// Reading OpenAI / LMDeploy request bodies into typed requests. Every wrong type, out-of-range value or
// unsupported field value is an ApiError (400) naming the field; nothing here touches the engine.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "lmd/engine/sampler.h"
#include "lmd/server/tool_calls.h"

namespace lmd::server {

// Parses a request body; malformed JSON (truncated, not UTF-8, numbers out of range) and non-objects are
// 400s.
nlohmann::json parse_body(const std::string& body);

// Typed, range-checked access to the fields of a request object. A field that is absent or null reads
// as nullopt (clients send null for "default").
class Fields {
 public:
  explicit Fields(const nlohmann::json& body) : body_(body) {}
  bool has(const char* name) const;
  std::optional<double> number(const char* name, double lo, double hi) const;
  std::optional<int64_t> integer(const char* name, int64_t lo, int64_t hi) const;
  std::optional<bool> boolean(const char* name) const;
  std::optional<std::string> string(const char* name) const;
  // A string or an array of strings (`stop`).
  std::vector<std::string> strings(const char* name, size_t max_items) const;
  const nlohmann::json& body() const { return body_; }

 private:
  const nlohmann::json& body_;
};

// Fields every generating endpoint shares.
struct GenerationOptions {
  SamplingParams sampling;
  bool seeded = false;            // `seed` was given: choice i uses seed + i
  std::optional<int> max_tokens;  // nullopt: up to the session length
  std::vector<std::string> stop;  // matched on the decoded text
  int n = 1;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool ignore_eos = false;
  int logprobs = -1;  // -1: none; else alternatives per token (0 = the token's own only)
};

// `max_tokens_field` is "max_tokens" (OpenAI) or "request_output_len" (LMDeploy's interactive API).
GenerationOptions read_generation_options(const Fields& fields, const char* max_tokens_field);

struct ApiMessage {
  std::string role;  // system, user, assistant, tool
  std::string content;
  std::vector<ToolCall> tool_calls;  // assistant turns that called tools
  std::string tool_call_id;          // tool turns
};

struct ChatRequest {
  std::string model;
  std::vector<ApiMessage> messages;
  GenerationOptions options;
  nlohmann::json functions = nlohmann::json::array();  // the tools' "function" objects offered to the model
  std::string tool_choice = "auto";                    // auto | none | required | a function's name
  bool named_tool_choice = false;
};
ChatRequest parse_chat_request(const nlohmann::json& body);

struct CompletionRequest {
  std::string model;
  std::vector<std::string> prompts;
  GenerationOptions options;
  bool echo = false;
};
CompletionRequest parse_completion_request(const nlohmann::json& body);

// LMDeploy's stateful /v1/chat/interactive.
struct InteractiveRequest {
  std::string prompt;
  int64_t session_id = -1;  // -1: the server picks one
  bool interactive_mode = false;
  bool cancel = false;
  GenerationOptions options;
};
InteractiveRequest parse_interactive_request(const nlohmann::json& body);

}  // namespace lmd::server
