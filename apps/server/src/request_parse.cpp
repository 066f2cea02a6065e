#include "lmd/server/request_parse.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "lmd/server/api_error.h"

namespace lmd::server {

using nlohmann::json;

namespace {

const char* type_name(const json& v) {
  if (v.is_number_integer()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_boolean()) return "a boolean";
  if (v.is_array()) return "an array";
  if (v.is_object()) return "an object";
  return "null";
}

[[noreturn]] void wrong_type(const std::string& name, const char* expected, const json& got) {
  invalid_param(name, "'" + name + "' must be " + expected + ", got " + type_name(got), "invalid_type");
}

// Text of a message's content: a string, or a list of content parts of which only text is supported.
std::string content_text(const json& content, const std::string& param) {
  if (content.is_null()) return {};
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) wrong_type(param, "a string or an array of content parts", content);
  std::string text;
  for (const json& part : content) {
    if (!part.is_object() || !part.contains("type") || !part["type"].is_string())
      invalid_param(param, "each content part must be an object with a 'type'");
    if (part["type"] != "text")
      invalid_param(param, "content parts of type '" + part["type"].get<std::string>() +
                               "' are not supported by this text-only model");
    if (!part.contains("text") || !part["text"].is_string())
      invalid_param(param, "a text content part needs a string 'text'");
    text += part["text"].get<std::string>();
  }
  return text;
}

std::vector<ToolCall> read_tool_calls(const json& calls, const std::string& param) {
  if (!calls.is_array()) wrong_type(param, "an array", calls);
  std::vector<ToolCall> out;
  for (const json& call : calls) {
    const json fn = call.is_object() ? call.value("function", json()) : json();
    if (!fn.is_object() || !fn.contains("name") || !fn["name"].is_string())
      invalid_param(param, "each tool call needs a function with a string 'name'");
    std::string args = "{}";
    if (fn.contains("arguments")) {
      if (fn["arguments"].is_string())
        args = fn["arguments"].get<std::string>();
      else if (fn["arguments"].is_object())
        args = fn["arguments"].dump();
      else
        wrong_type(param + ".function.arguments", "a JSON string", fn["arguments"]);
    }
    out.push_back({fn["name"].get<std::string>(), args});
  }
  return out;
}

std::string read_model(const Fields& fields) { return fields.string("model").value_or(""); }

}  // namespace

json parse_body(const std::string& body) {
  json value;
  try {
    value = json::parse(body);
  } catch (const json::exception& e) {
    throw ApiError(400, std::string("the request body is not valid JSON: ") + e.what(),
                   "invalid_request_error", "invalid_json");
  }
  if (!value.is_object())
    throw ApiError(400, "the request body must be a JSON object", "invalid_request_error", "invalid_json");
  return value;
}

bool Fields::has(const char* name) const { return body_.contains(name) && !body_[name].is_null(); }

std::optional<double> Fields::number(const char* name, double lo, double hi) const {
  if (!has(name)) return std::nullopt;
  const json& v = body_[name];
  if (!v.is_number()) wrong_type(name, "a number", v);
  const double x = v.get<double>();
  if (!std::isfinite(x) || x < lo || x > hi) {
    std::ostringstream os;
    os << "'" << name << "' must be between " << lo << " and " << hi << ", got " << v.dump();
    invalid_param(name, os.str());
  }
  return x;
}

std::optional<int64_t> Fields::integer(const char* name, int64_t lo, int64_t hi) const {
  if (!has(name)) return std::nullopt;
  const json& v = body_[name];
  // 5.0 is accepted as 5; 1e30 and 2.5 are not integers.
  if (v.is_number_float()) {
    const double x = v.get<double>();
    if (!(std::trunc(x) == x && std::abs(x) < 9e15)) wrong_type(name, "an integer", v);
  } else if (!v.is_number()) {
    wrong_type(name, "an integer", v);
  }
  const bool too_big =
      v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max());
  const int64_t x = too_big ? std::numeric_limits<int64_t>::max() : v.get<int64_t>();
  if (too_big || x < lo || x > hi)
    invalid_param(name, "'" + std::string(name) + "' must be between " + std::to_string(lo) + " and " +
                            std::to_string(hi) + ", got " + v.dump());
  return x;
}

std::optional<bool> Fields::boolean(const char* name) const {
  if (!has(name)) return std::nullopt;
  if (!body_[name].is_boolean()) wrong_type(name, "a boolean", body_[name]);
  return body_[name].get<bool>();
}

std::optional<std::string> Fields::string(const char* name) const {
  if (!has(name)) return std::nullopt;
  if (!body_[name].is_string()) wrong_type(name, "a string", body_[name]);
  return body_[name].get<std::string>();
}

std::vector<std::string> Fields::strings(const char* name, size_t max_items) const {
  if (!has(name)) return {};
  const json& v = body_[name];
  if (v.is_string()) return {v.get<std::string>()};
  if (!v.is_array()) wrong_type(name, "a string or an array of strings", v);
  if (v.size() > max_items)
    invalid_param(name,
                  "'" + std::string(name) + "' may hold at most " + std::to_string(max_items) + " items");
  std::vector<std::string> out;
  for (const json& item : v) {
    if (!item.is_string()) wrong_type(name, "a string or an array of strings", v);
    out.push_back(item.get<std::string>());
  }
  return out;
}

GenerationOptions read_generation_options(const Fields& f, const char* max_tokens_field) {
  constexpr int64_t kMaxInt = std::numeric_limits<int32_t>::max();
  GenerationOptions o;
  // LMDeploy's defaults.
  o.sampling.temperature = float(f.number("temperature", 0, 2).value_or(0.7));
  o.sampling.top_p = float(f.number("top_p", 0, 1).value_or(1.0));
  if (f.has("top_p") && o.sampling.top_p <= 0) invalid_param("top_p", "'top_p' must be greater than 0");
  o.sampling.top_k = int(f.integer("top_k", -1, kMaxInt).value_or(40));
  o.sampling.min_p = float(f.number("min_p", 0, 1).value_or(0));
  o.sampling.repetition_penalty = float(f.number("repetition_penalty", 0.01, 10).value_or(1));
  o.sampling.frequency_penalty = float(f.number("frequency_penalty", -2, 2).value_or(0));
  o.sampling.presence_penalty = float(f.number("presence_penalty", -2, 2).value_or(0));
  if (auto seed =
          f.integer("seed", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max())) {
    o.seeded = true;
    o.sampling.seed = uint64_t(*seed);
  }
  if (auto n = f.integer(max_tokens_field, 1, kMaxInt)) o.max_tokens = int(*n);
  if (auto n = f.integer("max_completion_tokens", 1, kMaxInt)) o.max_tokens = int(*n);
  o.stop = f.strings("stop", 16);
  for (const std::string& s : o.stop)
    if (s.empty()) invalid_param("stop", "stop strings must not be empty");
  o.n = int(f.integer("n", 1, 16).value_or(1));
  o.stream = f.boolean("stream").value_or(false);
  o.ignore_eos = f.boolean("ignore_eos").value_or(false);
  if (f.has("stream_options")) {
    const json& so = f.body()["stream_options"];
    if (!so.is_object()) wrong_type("stream_options", "an object", so);
    o.include_usage = Fields(so).boolean("include_usage").value_or(false);
  }
  return o;
}

ChatRequest parse_chat_request(const json& body) {
  Fields f(body);
  ChatRequest r;
  r.model = read_model(f);
  r.options = read_generation_options(f, "max_tokens");
  if (f.boolean("logprobs").value_or(false))
    r.options.logprobs = int(f.integer("top_logprobs", 0, 20).value_or(0));
  else if (f.has("top_logprobs"))
    invalid_param("top_logprobs", "'top_logprobs' needs 'logprobs': true");
  r.options.sampling.top_logprobs = std::max(r.options.logprobs, 0);

  if (!f.has("messages")) invalid_param("messages", "'messages' is required", "missing_required_parameter");
  const json& messages = body["messages"];
  if (!messages.is_array()) wrong_type("messages", "an array", messages);
  if (messages.empty()) invalid_param("messages", "'messages' must not be empty");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string param = "messages[" + std::to_string(i) + "]";
    const json& m = messages[i];
    if (!m.is_object()) wrong_type(param, "an object", m);
    Fields mf(m);
    ApiMessage msg;
    msg.role = mf.string("role").value_or("");
    if (msg.role != "system" && msg.role != "user" && msg.role != "assistant" && msg.role != "tool")
      invalid_param(param + ".role", "'role' must be one of system, user, assistant, tool");
    msg.content = content_text(m.value("content", json()), param + ".content");
    if (msg.role == "assistant" && mf.has("tool_calls"))
      msg.tool_calls = read_tool_calls(m["tool_calls"], param);
    if (msg.role == "tool") msg.tool_call_id = mf.string("tool_call_id").value_or("");
    r.messages.push_back(std::move(msg));
  }

  if (f.has("tools")) {
    const json& tools = body["tools"];
    if (!tools.is_array()) wrong_type("tools", "an array", tools);
    for (const json& tool : tools) {
      if (!tool.is_object() || tool.value("type", "") != "function" || !tool.contains("function") ||
          !tool["function"].is_object() || !tool["function"].contains("name") ||
          !tool["function"]["name"].is_string())
        invalid_param("tools", "each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}");
      r.functions.push_back(tool["function"]);
    }
  }
  if (f.has("tool_choice")) {
    const json& choice = body["tool_choice"];
    if (choice.is_string()) {
      r.tool_choice = choice.get<std::string>();
      if (r.tool_choice != "auto" && r.tool_choice != "none" && r.tool_choice != "required")
        invalid_param("tool_choice", "'tool_choice' must be auto, none, required or a named function");
    } else if (choice.is_object() && choice.contains("function") && choice["function"].is_object() &&
               choice["function"].contains("name") && choice["function"]["name"].is_string()) {
      r.tool_choice = choice["function"]["name"].get<std::string>();
      r.named_tool_choice = true;
      const bool offered = std::any_of(r.functions.begin(), r.functions.end(),
                                       [&](const json& fn) { return fn["name"] == r.tool_choice; });
      if (!offered)
        invalid_param("tool_choice", "tool_choice names '" + r.tool_choice + "', which is not in 'tools'");
    } else {
      wrong_type("tool_choice", "a string or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                 choice);
    }
    if (r.tool_choice != "none" && r.tool_choice != "auto" && r.functions.empty())
      invalid_param("tool_choice", "'tool_choice' needs 'tools'");
  }
  return r;
}

CompletionRequest parse_completion_request(const json& body) {
  Fields f(body);
  CompletionRequest r;
  r.model = read_model(f);
  r.options = read_generation_options(f, "max_tokens");
  // OpenAI's default for completions: 16 tokens.
  if (!r.options.max_tokens) r.options.max_tokens = 16;
  if (auto n = f.integer("logprobs", 0, 20)) r.options.logprobs = int(*n);
  r.options.sampling.top_logprobs = std::max(r.options.logprobs, 0);
  r.echo = f.boolean("echo").value_or(false);
  if (!f.has("prompt")) invalid_param("prompt", "'prompt' is required", "missing_required_parameter");
  r.prompts = f.strings("prompt", 64);
  if (r.prompts.empty()) invalid_param("prompt", "'prompt' must not be empty");
  if (f.has("suffix")) invalid_param("suffix", "'suffix' is not supported");
  return r;
}

InteractiveRequest parse_interactive_request(const json& body) {
  Fields f(body);
  InteractiveRequest r;
  r.prompt = f.string("prompt").value_or("");
  r.session_id = f.integer("session_id", -1, std::numeric_limits<int64_t>::max()).value_or(-1);
  r.interactive_mode = f.boolean("interactive_mode").value_or(false);
  r.cancel = f.boolean("cancel").value_or(false);
  r.options = read_generation_options(f, "request_output_len");
  if (r.options.n != 1) invalid_param("n", "the interactive API generates one reply");
  return r;
}

}  // namespace lmd::server
