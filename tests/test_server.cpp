// The HTTP server's parts: tool-call parsing and rendering per model family, prompts with tools, request
// validation, metrics; and a real server on a loopback port against the engine it serves.
#if defined(LMD_HAVE_SERVER)
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <nlohmann/json.hpp>
#include <thread>

#include "lmd/core/chat_template.h"
#include "lmd/core/tokenizer.h"
#include "lmd/engine/cpu_backend.h"
#include "lmd/engine/engine.h"
#include "lmd/engine/model.h"
#include "lmd/server/api_error.h"
#include "lmd/server/api_server.h"
#include "lmd/server/chat_prompt.h"
#include "lmd/server/metrics.h"
#include "lmd/server/request_parse.h"
#include "lmd/server/tool_calls.h"
#include "test_support.h"

using namespace lmd;
using namespace lmd::server;
using nlohmann::json;

namespace {

// The status and field an ApiError names, for checking that bad input is reported, not crashed on.
std::pair<int, std::string> api_error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const ApiError& e) {
    return {e.status, e.param};
  }
  return {0, ""};
}

}  // namespace

TEST_CASE("InternLM2 tool calls parse, with or without the end marker", "[server][tools]") {
  const std::string reply =
      "Let me look.<|action_start|><|plugin|>\n{\"name\": \"get_weather\", \"parameters\": {\"city\": "
      "\"Paris\"}}<|action_end|>";
  ParsedReply parsed = parse_tool_calls(ToolFormat::InternLM2, reply);
  REQUIRE(parsed.calls.size() == 1);
  CHECK(parsed.content == "Let me look.");
  CHECK(parsed.calls[0].name == "get_weather");
  CHECK(json::parse(parsed.calls[0].arguments) == json{{"city", "Paris"}});
  // <|action_end|> is a stop word, so generation usually ends just before it.
  parsed = parse_tool_calls(ToolFormat::InternLM2, reply.substr(0, reply.size() - 14));
  REQUIRE(parsed.calls.size() == 1);
  CHECK(parsed.calls[0].name == "get_weather");
}

TEST_CASE("Llama 3.1 and Qwen2.5 tool calls parse; Qwen may call several", "[server][tools]") {
  ParsedReply llama =
      parse_tool_calls(ToolFormat::Llama31, "<function=spotify_trending_songs>{\"n\": 5}</function>");
  REQUIRE(llama.calls.size() == 1);
  CHECK(llama.calls[0].name == "spotify_trending_songs");
  CHECK(json::parse(llama.calls[0].arguments) == json{{"n", 5}});
  CHECK(llama.content.empty());

  ParsedReply qwen = parse_tool_calls(
      ToolFormat::Qwen25,
      "Checking both.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": "
      "\"Paris\"}}\n</tool_call>\n"
      "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>");
  REQUIRE(qwen.calls.size() == 2);
  CHECK(qwen.content == "Checking both.");
  CHECK(json::parse(qwen.calls[1].arguments) == json{{"city", "Rome"}});
}

TEST_CASE("Malformed tool calls come back as plain content", "[server][tools]") {
  const std::vector<std::pair<ToolFormat, std::string>> broken = {
      {ToolFormat::Qwen25, "<tool_call>\n{\"name\": \"f\", \"arguments\": {oops}\n</tool_call>"},
      {ToolFormat::Qwen25, "<tool_call>\n{\"arguments\": {}}\n</tool_call>"},
      {ToolFormat::Llama31, "<function=>{}</function>"},
      {ToolFormat::Llama31, "<function=f>[1, 2]</function>"},
      {ToolFormat::InternLM2, "<|action_start|><|interpreter|>\nprint(1)<|action_end|>"},
      {ToolFormat::InternLM2, "<|action_start|><|plugin|>\n{\"name\": 3}"},
  };
  for (const auto& [format, text] : broken) {
    CAPTURE(text);
    const ParsedReply parsed = parse_tool_calls(format, text);
    CHECK(parsed.calls.empty());
    CHECK(parsed.content == text);
  }
  CHECK(parse_tool_calls(ToolFormat::None, " <tool_call>{}</tool_call> ").content ==
        " <tool_call>{}</tool_call> ");
}

// A reply streamed in pieces of `piece` bytes: the content, the calls as a client accumulates them, and
// the deltas of the calls.
struct Streamed {
  std::string content;
  std::vector<ToolCall> calls;
  std::vector<ToolCallDelta> deltas;
  bool malformed = false;
};

Streamed stream_reply(ToolFormat format, const std::string& reply, size_t piece) {
  ToolCallStream stream(format);
  Streamed out;
  auto add = [&](const ReplyDelta& d) {
    out.content += d.content;
    for (const ToolCallDelta& call : d.calls) {
      if (!call.name.empty()) out.calls.push_back({call.name, ""});
      REQUIRE(call.index + 1 == out.calls.size());
      out.calls.back().arguments += call.arguments;
      out.deltas.push_back(call);
    }
  };
  for (size_t pos = 0; pos < reply.size(); pos += piece) add(stream.push(reply.substr(pos, piece)));
  add(stream.finish());
  out.malformed = stream.malformed();
  return out;
}

TEST_CASE("Streamed tool calls arrive as a name, then argument fragments, at any token boundary",
          "[server][tools]") {
  const std::vector<std::pair<ToolFormat, std::string>> replies = {
      {ToolFormat::InternLM2,
       "Let me look.<|action_start|><|plugin|>\n{\"name\": \"get_weather\", \"parameters\": {\"city\": "
       "\"Paris {\\\"}\", \"days\": [1, {\"x\": 2}]}}<|action_end|>"},
      {ToolFormat::InternLM2,  // <|action_end|> is a stop word: the reply often ends before it
       "Let me look.<|action_start|><|plugin|>\n{\"name\": \"get_weather\", \"parameters\": {\"city\": "
       "\"Paris {\\\"}\", \"days\": [1, {\"x\": 2}]}}"},
      {ToolFormat::Llama31,
       "Let me look.<function=get_weather>{\"city\": \"Paris {\\\"}\", \"days\": [1, {\"x\": "
       "2}]}</function>"},
      {ToolFormat::Qwen25,
       "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris {\\\"}\", "
       "\"days\": [1, {\"x\": 2}]}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": "
       "{}}\n</tool_call>"},
  };
  const std::string args = "{\"city\": \"Paris {\\\"}\", \"days\": [1, {\"x\": 2}]}";
  for (const auto& [format, reply] : replies) {
    const ParsedReply whole = parse_tool_calls(format, reply);
    REQUIRE(!whole.calls.empty());
    CHECK(whole.content == "Let me look.");
    CHECK(whole.calls[0].name == "get_weather");
    CHECK(whole.calls[0].arguments == args);  // the model's own text
    for (size_t piece : {size_t(1), size_t(2), size_t(5), reply.size()}) {
      CAPTURE(tool_format_name(format), piece);
      const Streamed streamed = stream_reply(format, reply, piece);
      CHECK_FALSE(streamed.malformed);
      CHECK(streamed.content == "Let me look.");
      REQUIRE(streamed.calls.size() == whole.calls.size());
      for (size_t i = 0; i < whole.calls.size(); ++i) {
        CHECK(streamed.calls[i].name == whole.calls[i].name);
        CHECK(streamed.calls[i].arguments == whole.calls[i].arguments);
      }
      // The first delta names the call and has no arguments; the arguments follow as they arrive.
      CHECK(streamed.deltas[0].name == "get_weather");
      CHECK(streamed.deltas[0].arguments.empty());
      const auto first_call_pieces = std::count_if(streamed.deltas.begin(), streamed.deltas.end(),
                                                   [](const ToolCallDelta& d) { return d.index == 0; });
      if (piece == 1) CHECK(size_t(first_call_pieces) == 1 + args.size());
    }
  }
}

TEST_CASE("Streamed calls in other shapes come whole; broken ones are content or stay calls",
          "[server][tools]") {
  // Arguments before the name, or as a string holding JSON: held until the call ends, then sent whole.
  for (const std::string& reply :
       {std::string("<tool_call>\n{\"arguments\": {\"n\": 1}, \"name\": \"f\"}\n</tool_call>"),
        std::string("<tool_call>\n{\"name\": \"f\", \"arguments\": \"{\\\"n\\\": 1}\"}\n</tool_call>")}) {
    CAPTURE(reply);
    const Streamed streamed = stream_reply(ToolFormat::Qwen25, reply, 1);
    REQUIRE(streamed.calls.size() == 1);
    CHECK(streamed.calls[0].name == "f");
    CHECK(streamed.calls[0].arguments == "{\"n\":1}");
    CHECK(streamed.deltas.size() == 2);
    CHECK(streamed.content.empty());
  }
  // A call that is not one after all is shown as text; without a tool format everything is text.
  const std::string broken = "Sure <tool_call>{not json</tool_call>";
  for (size_t piece : {size_t(1), broken.size()}) {
    const Streamed streamed = stream_reply(ToolFormat::Qwen25, broken, piece);
    CHECK(streamed.calls.empty());
    CHECK(streamed.content == broken);
    CHECK(streamed.malformed);
  }
  CHECK(stream_reply(ToolFormat::None, broken, 3).content == broken);
  // Text that only starts like a call marker, and whitespace before it, is held back until it is known.
  ToolCallStream stream(ToolFormat::Qwen25);
  CHECK(stream.push("a <tool").content == "a");
  CHECK(stream.push("s>").content == " <tools>");
  // A call announced and then cut short (max_tokens) stays a call in the stream: it cannot be taken
  // back. Whole, the reply is plain content.
  const std::string cut = "<function=f>{\"city\": \"Par";
  const Streamed streamed = stream_reply(ToolFormat::Llama31, cut, 4);
  REQUIRE(streamed.calls.size() == 1);
  CHECK(streamed.calls[0].arguments == "{\"city\": \"Par");
  CHECK(streamed.malformed);
  CHECK(parse_tool_calls(ToolFormat::Llama31, cut).content == cut);
}

TEST_CASE("A required or named tool_choice prefills the call's opening; the reply continues it",
          "[server][tools]") {
  struct Case {
    ToolFormat format;
    std::string function;  // empty: required
    std::string prefill;   // exactly what the prompt ends with
    std::string reply;     // what the model writes after it
  };
  const std::vector<Case> cases = {
      {ToolFormat::InternLM2, "", "<|action_start|><|plugin|>\n",
       "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}"},
      {ToolFormat::InternLM2, "get_weather",
       "<|action_start|><|plugin|>\n{\"name\": \"get_weather\", \"parameters\": ", "{\"city\": \"Paris\"}}"},
      {ToolFormat::Llama31, "", "<function=", "get_weather>{\"city\": \"Paris\"}</function>"},
      {ToolFormat::Llama31, "get_weather", "<function=get_weather>", "{\"city\": \"Paris\"}</function>"},
      {ToolFormat::Qwen25, "", "<tool_call>\n",
       "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"},
      {ToolFormat::Qwen25, "get_weather",
       "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": ", "{\"city\": \"Paris\"}}\n</tool_call>"},
  };
  const std::string args = "{\"city\": \"Paris\"}";
  for (const Case& c : cases) {
    CAPTURE(tool_format_name(c.format), c.function);
    CHECK(tool_call_prefill(c.format, c.function) == c.prefill);

    const ParsedReply whole = parse_tool_calls(c.format, c.reply, c.prefill);
    REQUIRE(whole.calls.size() == 1);
    CHECK(whole.content.empty());
    CHECK(whole.calls[0].name == "get_weather");
    CHECK(whole.calls[0].arguments == args);

    for (size_t piece : {size_t(1), size_t(3), c.reply.size()}) {
      CAPTURE(piece);
      ToolCallStream stream(c.format, c.prefill);
      std::string content;
      std::vector<ToolCallDelta> deltas;
      auto add = [&](const ReplyDelta& d) {
        content += d.content;
        deltas.insert(deltas.end(), d.calls.begin(), d.calls.end());
      };
      for (size_t pos = 0; pos < c.reply.size(); pos += piece) add(stream.push(c.reply.substr(pos, piece)));
      add(stream.finish());
      CHECK_FALSE(stream.malformed());
      CHECK(content.empty());
      // The first delta opens the call with its name, even when the name was in the prefill; the
      // arguments follow in fragments as they are generated.
      REQUIRE(deltas.size() >= 2);
      CHECK(deltas[0].name == "get_weather");
      CHECK(deltas[0].arguments.empty());
      std::string streamed_args;
      for (size_t i = 1; i < deltas.size(); ++i) {
        CHECK(deltas[i].index == 0);
        CHECK(deltas[i].name.empty());
        streamed_args += deltas[i].arguments;
      }
      CHECK(streamed_args == args);
      if (piece == 1) CHECK(deltas.size() == 1 + args.size());
    }

    // A continuation that is not a call is returned as the documented malformed reply: the whole text,
    // prefill included, as content.
    const ParsedReply broken = parse_tool_calls(c.format, "I'd rather not.", c.prefill);
    CHECK(broken.calls.empty());
    CHECK(broken.content == c.prefill + "I'd rather not.");
  }
  // A name is written as a JSON string in the JSON formats.
  CHECK(tool_call_prefill(ToolFormat::Qwen25, "a\"b") ==
        "<tool_call>\n{\"name\": \"a\\\"b\", \"arguments\": ");
}

TEST_CASE("The prompt ends with the prefill for required and named tool_choice only", "[server][tools]") {
  const json tools = {{{"type", "function"}, {"function", {{"name", "get_weather"}}}},
                      {{"type", "function"}, {"function", {{"name", "get_time"}}}}};
  for (const std::string name : {"internlm2", "llama3", "qwen2.5"}) {
    CAPTURE(name);
    const ChatTemplate tmpl = ChatTemplate::builtin(name);
    const ToolFormat format = tool_format_for_template(name);
    json body = {{"messages", {{{"role", "user"}, {"content", "Weather?"}}}}, {"tools", tools}};
    const std::string generation_prompt = tmpl.render({{"user", "Weather?"}}, true);
    const std::string assistant = generation_prompt.substr(generation_prompt.rfind("Weather?") + 8);

    for (const json& choice :
         {json("auto"), json("required"), json{{"type", "function"}, {"function", {{"name", "get_time"}}}}}) {
      CAPTURE(choice.dump());
      body["tool_choice"] = choice;
      const ChatRequest request = parse_chat_request(body);
      const std::string prefill = reply_prefill(format, request);
      CHECK(prefill == (choice == "auto"       ? ""
                        : choice == "required" ? tool_call_prefill(format, "")
                                               : tool_call_prefill(format, "get_time")));
      // Right after the assistant's turn header.
      const std::string prompt = render_chat_prompt(tmpl, request);
      CHECK(prompt.ends_with(assistant + prefill));
    }
  }
}

TEST_CASE("A rendered tool call parses back to itself in every format", "[server][tools]") {
  const ToolCall call{"get_weather", "{\"city\":\"Paris\",\"days\":3}"};
  for (ToolFormat format : {ToolFormat::InternLM2, ToolFormat::Llama31, ToolFormat::Qwen25}) {
    CAPTURE(tool_format_name(format));
    const ParsedReply parsed = parse_tool_calls(format, render_tool_call(format, call));
    REQUIRE(parsed.calls.size() == 1);
    CHECK(parsed.calls[0].name == call.name);
    CHECK(json::parse(parsed.calls[0].arguments) == json::parse(call.arguments));
  }
  CHECK(tool_format_for_template("internlm2") == ToolFormat::InternLM2);
  CHECK(tool_format_for_template("llama3") == ToolFormat::Llama31);
  CHECK(tool_format_for_template("qwen") == ToolFormat::Qwen25);
  CHECK(tool_format_for_template("base") == ToolFormat::None);
}

TEST_CASE("Chat prompts carry tools, calls and results in the model's syntax", "[server][tools]") {
  const json body = {
      {"messages",
       {{{"role", "system"}, {"content", "Be brief."}},
        {{"role", "user"}, {"content", "Weather in Paris?"}},
        {{"role", "assistant"},
         {"content", ""},
         {"tool_calls",
          {{{"id", "call_1"},
            {"type", "function"},
            {"function", {{"name", "get_weather"}, {"arguments", "{\"city\": \"Paris\"}"}}}}}}},
        {{"role", "tool"}, {"tool_call_id", "call_1"}, {"content", "22C"}}}},
      {"tools",
       {{{"type", "function"},
         {"function", {{"name", "get_weather"}, {"parameters", {{"type", "object"}}}}}}}}};
  const ChatRequest request = parse_chat_request(body);

  const std::string internlm2 = render_chat_prompt(ChatTemplate::builtin("internlm2"), request);
  CHECK(
      internlm2 ==
      "<|im_start|>system\nBe brief.<|im_end|>\n"
      "<|im_start|>system name=<|plugin|>\n[{\"name\":\"get_weather\",\"parameters\":{\"type\":\"object\"}}]"
      "<|im_end|>\n"
      "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
      "<|im_start|>assistant\n<|action_start|><|plugin|>\n{\"name\":\"get_weather\",\"parameters\":{\"city\":"
      "\"Paris\"}}<|action_end|><|im_end|>\n"
      "<|im_start|>environment name=<|plugin|>\n22C<|im_end|>\n"
      "<|im_start|>assistant\n");

  const std::string qwen = render_chat_prompt(ChatTemplate::builtin("qwen2.5"), request);
  CHECK(qwen.find("<|im_start|>system\nBe brief.\n\n# Tools") == 0);
  CHECK(qwen.find("<tools>\n{\"function\":{\"name\":\"get_weather\"") != std::string::npos);
  CHECK(qwen.find(
            "<|im_start|>user\n<tool_response>\n22C\n</tool_response><|im_end|>\n<|im_start|>assistant\n") !=
        std::string::npos);

  const std::string llama3 = render_chat_prompt(ChatTemplate::builtin("llama3"), request);
  CHECK(llama3.find("<|start_header_id|>ipython<|end_header_id|>\n\n22C<|eot_id|>") != std::string::npos);
  CHECK(llama3.find("<function=get_weather>{\"city\":\"Paris\"}</function><|eot_id|>") != std::string::npos);

  // No tool syntax in the base template: a clear 400, not a prompt the model cannot read.
  CHECK(api_error_of([&] { render_chat_prompt(ChatTemplate::builtin("base"), request); }) ==
        std::make_pair(400, std::string("tools")));
  // tool_choice none leaves the tools out.
  json no_tools = body;
  no_tools["messages"] = {{{"role", "user"}, {"content", "Hi"}}};
  no_tools["tool_choice"] = "none";
  CHECK(render_chat_prompt(ChatTemplate::builtin("base"), parse_chat_request(no_tools)) == "Hi");
}

TEST_CASE("Bad requests are 400s that name the field", "[server][validation]") {
  const json ok = {{"messages", {{{"role", "user"}, {"content", "Hi"}}}}};
  auto with = [&](const char* key, json value) {
    json body = ok;
    body[key] = std::move(value);
    return body;
  };
  const std::vector<std::pair<json, std::string>> cases = {
      {with("max_tokens", -1), "max_tokens"},
      {with("max_tokens", "10"), "max_tokens"},
      {with("max_tokens", 1e300), "max_tokens"},
      {with("max_tokens", 2.5), "max_tokens"},
      {with("temperature", 5), "temperature"},
      {with("top_p", 0), "top_p"},
      {with("n", 0), "n"},
      {with("stop", json::array({1})), "stop"},
      {with("stream", "yes"), "stream"},
      {with("messages", "Hi"), "messages"},
      {with("messages", json::array()), "messages"},
      {with("messages", {{{"role", "robot"}, {"content", "x"}}}), "messages[0].role"},
      {with("messages", {{{"role", "user"}, {"content", {{{"type", "image_url"}}}}}}), "messages[0].content"},
      {with("tool_choice", {{"type", "function"}, {"function", {{"name", "nope"}}}}), "tool_choice"},
      {with("top_logprobs", 3), "top_logprobs"},
  };
  for (const auto& [body, param] : cases) {
    CAPTURE(body.dump());
    CHECK(api_error_of([&] { parse_chat_request(body); }) == std::make_pair(400, param));
  }
  CHECK(api_error_of([] {
          parse_completion_request({{"prompt", 5}});
        }) == std::make_pair(400, std::string("prompt")));
  CHECK(api_error_of([] { parse_body("{\"messages\": ["); }).first == 400);
  CHECK(api_error_of([] { parse_body("{\"a\": \"\xff\xfe\"}"); }).first == 400);
  CHECK(api_error_of([] { parse_body("[1, 2]"); }).first == 400);
  CHECK(api_error_of([] { parse_body("{\"n\": 1e999}"); }).first == 400);

  const ChatRequest parsed = parse_chat_request(with("stop", "\n\n"));
  CHECK(parsed.options.stop == std::vector<std::string>{"\n\n"});
  CHECK(parsed.options.sampling.temperature == Approx(0.7));
  const json error = error_body(ApiError(400, "bad", "invalid_request_error", "", "n"));
  CHECK(error["error"]["code"].is_null());
  CHECK(error["error"]["param"] == "n");
}

TEST_CASE("Metrics render in the Prometheus text format", "[server]") {
  ServerMetrics metrics;
  metrics.time_to_first_token.observe(0.02);
  metrics.time_to_first_token.observe(7);
  metrics.count_response(200);
  EngineStats stats;
  stats.blocks_used = 3;
  stats.blocks_free = 5;
  const std::string text = metrics.render(stats);
  CHECK(text.find("lmd_kv_blocks_used 3\n") != std::string::npos);
  CHECK(text.find("lmd_kv_blocks_free 5\n") != std::string::npos);
  CHECK(text.find("lmd_time_to_first_token_seconds_bucket{le=\"0.025\"} 1\n") != std::string::npos);
  CHECK(text.find("lmd_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2\n") != std::string::npos);
  CHECK(text.find("lmd_time_to_first_token_seconds_count 2\n") != std::string::npos);
  CHECK(text.find("lmd_http_responses_total{code=\"200\"} 1\n") != std::string::npos);
}

namespace {

// A bare HTTP/1.1 client over a socket: enough to send malformed requests and to hang up mid-stream.
class RawClient {
 public:
  explicit RawClient(int port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(uint16_t(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  }
  ~RawClient() { close(); }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  void send(const std::string& method, const std::string& path, const std::string& body,
            const std::string& extra_headers = "") {
    const std::string request =
        method + " " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + extra_headers +
        "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" +
        body;
    REQUIRE(::send(fd_, request.data(), request.size(), MSG_NOSIGNAL) == ssize_t(request.size()));
  }
  // Reads until `marker` has arrived (or the server closes); returns everything read so far.
  std::string read_until(const std::string& marker) {
    char buf[4096];
    while (received_.find(marker) == std::string::npos) {
      const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) break;
      received_.append(buf, size_t(n));
    }
    return received_;
  }
  // The whole response: status and body (de-chunked).
  std::pair<int, std::string> response() {
    read_until("\x01never");
    const int status = std::stoi(received_.substr(9, 3));
    const size_t head_end = received_.find("\r\n\r\n");
    std::string body = received_.substr(head_end + 4);
    if (received_.substr(0, head_end).find("Transfer-Encoding: chunked") == std::string::npos)
      return {status, body};
    std::string plain;
    for (size_t pos = 0;;) {
      const size_t line_end = body.find("\r\n", pos);
      const size_t size = std::stoul(body.substr(pos, line_end - pos), nullptr, 16);
      if (size == 0) break;
      plain += body.substr(line_end + 2, size);
      pos = line_end + 2 + size + 2;
    }
    return {status, plain};
  }

 private:
  int fd_ = -1;
  std::string received_;
};

std::pair<int, json> call(int port, const std::string& method, const std::string& path,
                          const std::string& body, const std::string& headers = "") {
  RawClient client(port);
  client.send(method, path, body, headers);
  auto [status, text] = client.response();
  return {status, json::parse(text, nullptr, false)};
}

struct LiveServer {
  explicit LiveServer(ServerOptions options)
      : cpu(2),
        model(Model::load(test::model_dir("stories260K"), cpu)),
        tokenizer(Tokenizer::load(test::model_dir("stories260K"))),
        chat_template(select_chat_template(test::model_dir("stories260K"), "")),
        engine(*model,
               EngineConfig{.max_batch_size = 8, .session_len = 256, .block_len = 16, .num_blocks = 64}),
        server(std::move(options)) {
    server.bind();
    server.set_model({&engine, &tokenizer, &chat_template, {}});
    thread = std::thread([this] { server.serve(); });
  }
  ~LiveServer() {
    server.shutdown();
    thread.join();
  }
  CpuBackend cpu;
  std::unique_ptr<Model> model;
  Tokenizer tokenizer;
  ChatTemplate chat_template;
  Engine engine;
  ApiServer server;
  std::thread thread;
};

ServerOptions loopback_options() {
  ServerOptions options;
  options.port = 0;
  options.model_name = "stories260K";
  options.drain_seconds = 1;
  return options;
}

}  // namespace

TEST_CASE("The server's greedy completion equals the engine's, and errors are JSON", "[server][live]") {
  LMD_REQUIRE_ASSETS();
  LiveServer live(loopback_options());
  const int port = live.server.port();

  Request direct;
  direct.prompt = live.tokenizer.encode("Once upon a time", true);
  direct.gen.max_new_tokens = 24;
  direct.gen.sampling.temperature = 0;
  auto stream = live.engine.submit(direct);
  std::vector<int> ids;
  TokenEvent event;
  while (stream->next(event))
    if (event.token >= 0 && event.token != live.model->spec().eos_id) ids.push_back(event.token);

  auto [status, body] = call(port, "POST", "/v1/completions",
                             R"({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0})");
  REQUIRE(status == 200);
  CHECK(body["choices"][0]["text"] == live.tokenizer.decode(ids));
  CHECK(body["usage"]["completion_tokens"] == int(ids.size()));

  // Stop strings end the text before them, across token boundaries.
  const std::string text = body["choices"][0]["text"];
  const std::string stop = text.substr(10, 4);
  auto [stop_status, stopped] = call(
      port, "POST", "/v1/completions",
      json{{"prompt", "Once upon a time"}, {"max_tokens", 24}, {"temperature", 0}, {"stop", stop}}.dump());
  CHECK(stop_status == 200);
  CHECK(stopped["choices"][0]["text"] == text.substr(0, text.find(stop)));
  CHECK(stopped["choices"][0]["finish_reason"] == "stop");

  CHECK(call(port, "GET", "/health", "").first == 200);
  auto [bad_status, bad] = call(port, "POST", "/v1/chat/completions", "{\"messages\": [");
  CHECK(bad_status == 400);
  CHECK(bad["error"]["type"] == "invalid_request_error");
  CHECK(call(port, "POST", "/v1/completions", R"({"prompt": "x", "model": "gpt-4"})").first == 404);
  CHECK(call(port, "GET", "/v1/nothing", "").first == 404);
  const std::string long_prompt(3000, 'a');
  auto [long_status, too_long] = call(port, "POST", "/v1/completions", json{{"prompt", long_prompt}}.dump());
  CHECK(long_status == 400);
  CHECK(too_long["error"]["code"] == "context_length_exceeded");
}

TEST_CASE("A client that hangs up mid-stream frees its KV blocks", "[server][live]") {
  LMD_REQUIRE_ASSETS();
  LiveServer live(loopback_options());
  {
    RawClient client(live.server.port());
    client.send("POST", "/v1/completions",
                R"({"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": true, "stream": true})");
    client.read_until("data: ");
    CHECK(live.engine.stats().blocks_used > 0);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (live.engine.stats().blocks_used > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(live.engine.stats().blocks_used == 0);
  CHECK(live.engine.stats().running == 0);
}

TEST_CASE("API keys are enforced and interactive sessions keep their history", "[server][live]") {
  LMD_REQUIRE_ASSETS();
  ServerOptions options = loopback_options();
  options.api_keys = {"secret"};
  LiveServer live(options);
  const int port = live.server.port();
  auto [denied, error] = call(port, "GET", "/v1/models", "");
  CHECK(denied == 401);
  CHECK(error["error"]["code"] == "invalid_api_key");
  CHECK(call(port, "GET", "/v1/models", "", "Authorization: Bearer wrong\r\n").first == 401);
  const std::string auth = "Authorization: Bearer secret\r\n";
  CHECK(call(port, "GET", "/v1/models", "", auth).second["data"][0]["id"] == "stories260K");

  const std::string turn =
      R"({"session_id": 7, "interactive_mode": true, "prompt": "Lily", "request_output_len": 8,
                              "temperature": 0})";
  auto [first_status, first] = call(port, "POST", "/v1/chat/interactive", turn, auth);
  REQUIRE(first_status == 200);
  CHECK(first["history_tokens"].get<int>() > 0);
  auto [second_status, second] = call(port, "POST", "/v1/chat/interactive", turn, auth);
  REQUIRE(second_status == 200);
  CHECK(second["history_tokens"].get<int>() > first["history_tokens"].get<int>());
  CHECK(live.engine.stats().sessions == 1);
  // An empty stateless request ends the session.
  call(port, "POST", "/v1/chat/interactive", R"({"session_id": 7, "prompt": ""})", auth);
  CHECK(live.engine.stats().sessions == 0);
}

#endif  // LMD_HAVE_SERVER
