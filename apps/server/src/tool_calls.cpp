#include "lmd/server/tool_calls.h"

#include <algorithm>
#include <optional>
#include <utility>

namespace lmd::server {

using nlohmann::json;

namespace {

constexpr std::string_view kInternLM2Start = "<|action_start|>";
constexpr std::string_view kInternLM2Plugin = "<|plugin|>";
constexpr std::string_view kInternLM2End = "<|action_end|>";
constexpr std::string_view kLlama31Start = "<function=";
constexpr std::string_view kLlama31End = "</function>";
constexpr std::string_view kQwen25Start = "<tool_call>";
constexpr std::string_view kQwen25End = "</tool_call>";

std::string_view trim(std::string_view s) {
  const char* space = " \t\r\n";
  const size_t first = s.find_first_not_of(space);
  if (first == std::string_view::npos) return {};
  return s.substr(first, s.find_last_not_of(space) - first + 1);
}

std::string_view trim_end(std::string_view s) {
  const size_t last = s.find_last_not_of(" \t\r\n");
  return s.substr(0, last == std::string_view::npos ? 0 : last + 1);
}

std::string_view call_end(ToolFormat format) {
  switch (format) {
    case ToolFormat::InternLM2:
      return kInternLM2End;
    case ToolFormat::Llama31:
      return kLlama31End;
    case ToolFormat::Qwen25:
      return kQwen25End;
    case ToolFormat::None:
      break;
  }
  return {};
}

// Arguments arrive as an object, or (from some fine-tunes) as a string holding one.
std::optional<std::string> arguments_text(const json& args) {
  if (args.is_object()) return args.dump();
  if (args.is_string()) {
    json parsed = json::parse(args.get<std::string>(), nullptr, false);
    if (parsed.is_object()) return parsed.dump();
  }
  return std::nullopt;
}

// {"name": ..., "<args_key>": {...}}
std::optional<ToolCall> parse_named_call(std::string_view body,
                                         std::initializer_list<const char*> args_keys) {
  json call = json::parse(trim(body), nullptr, false);
  if (!call.is_object() || !call.contains("name") || !call["name"].is_string()) return std::nullopt;
  for (const char* key : args_keys) {
    if (!call.contains(key)) continue;
    auto args = arguments_text(call[key]);
    if (!args) return std::nullopt;
    return ToolCall{call["name"].get<std::string>(), *args};
  }
  return ToolCall{call["name"].get<std::string>(), "{}"};
}

// The text between a call's start and end markers.
std::optional<ToolCall> parse_call_body(ToolFormat format, std::string_view body) {
  switch (format) {
    case ToolFormat::InternLM2:
      // <|interpreter|> (the code interpreter) is not a function call.
      if (!body.starts_with(kInternLM2Plugin)) return std::nullopt;
      return parse_named_call(body.substr(kInternLM2Plugin.size()), {"parameters", "arguments"});
    case ToolFormat::Llama31: {
      const size_t close = body.find('>');
      if (close == std::string_view::npos) return std::nullopt;
      const std::string_view name = trim(body.substr(0, close));
      if (name.empty()) return std::nullopt;
      json args = json::parse(trim(body.substr(close + 1)), nullptr, false);
      auto text = arguments_text(args);
      if (!text) return std::nullopt;
      return ToolCall{std::string(name), *text};
    }
    case ToolFormat::Qwen25:
      return parse_named_call(body, {"arguments", "parameters"});
    case ToolFormat::None:
      break;
  }
  return std::nullopt;
}

// Whether a call's opening matches the streamable shape so far: Yes, No, or NeedMore text to tell.
enum class Match { Yes, No, NeedMore };

struct Header {
  Match match = Match::NeedMore;
  std::string name;
  size_t arguments = 0;  // where the arguments' '{' is
};

// Reads JSON tokens from text that may still be growing.
class Cursor {
 public:
  Cursor(std::string_view text, size_t pos) : text_(text), pos_(pos) {}
  size_t pos() const { return pos_; }

  // `c` after optional whitespace; consumed unless `peek`.
  Match expect(char c, bool peek = false) {
    skip_space();
    if (pos_ == text_.size()) return Match::NeedMore;
    if (text_[pos_] != c) return Match::No;
    if (!peek) ++pos_;
    return Match::Yes;
  }

  // A string literal after optional whitespace.
  Match string(std::string& value) {
    const Match quote = expect('"', true);
    if (quote != Match::Yes) return quote;
    size_t end = pos_ + 1;
    for (bool escaped = false; end < text_.size() && (escaped || text_[end] != '"'); ++end)
      escaped = !escaped && text_[end] == '\\';
    if (end == text_.size()) return Match::NeedMore;
    const json literal = json::parse(text_.substr(pos_, end + 1 - pos_), nullptr, false);
    if (!literal.is_string()) return Match::No;
    value = literal.get<std::string>();
    pos_ = end + 1;
    return Match::Yes;
  }

 private:
  void skip_space() {
    while (pos_ < text_.size() && std::string_view(" \t\r\n").find(text_[pos_]) != std::string_view::npos)
      ++pos_;
  }
  std::string_view text_;
  size_t pos_;
};

// {"name": "...", "<args_key>": {   (InternLM2 and Qwen2.5, which write the name first)
Header json_header(std::string_view body, size_t pos, std::initializer_list<std::string_view> args_keys) {
  Cursor c(body, pos);
  Header h;
  std::string key;
  h.match = c.expect('{');
  if (h.match == Match::Yes) h.match = c.string(key);
  if (h.match == Match::Yes && key != "name") h.match = Match::No;
  if (h.match == Match::Yes) h.match = c.expect(':');
  if (h.match == Match::Yes) h.match = c.string(h.name);
  if (h.match == Match::Yes) h.match = c.expect(',');
  if (h.match == Match::Yes) h.match = c.string(key);
  if (h.match == Match::Yes && std::find(args_keys.begin(), args_keys.end(), key) == args_keys.end())
    h.match = Match::No;
  if (h.match == Match::Yes) h.match = c.expect(':');
  if (h.match == Match::Yes) h.match = c.expect('{', true);
  h.arguments = c.pos();
  return h;
}

// The opening of a call (the text after its start marker) up to where its arguments begin.
Header call_header(ToolFormat format, std::string_view body) {
  switch (format) {
    case ToolFormat::InternLM2:
      if (body.size() < kInternLM2Plugin.size())
        return {kInternLM2Plugin.starts_with(body) ? Match::NeedMore : Match::No};
      if (!body.starts_with(kInternLM2Plugin)) return {Match::No};
      return json_header(body, kInternLM2Plugin.size(), {"parameters", "arguments"});
    case ToolFormat::Llama31: {
      const size_t close = body.find('>');
      if (close == std::string_view::npos) return {Match::NeedMore};
      Header h{Match::Yes, std::string(trim(body.substr(0, close)))};
      if (h.name.empty()) return {Match::No};
      Cursor c(body, close + 1);
      h.match = c.expect('{', true);
      h.arguments = c.pos();
      return h;
    }
    case ToolFormat::Qwen25:
      return json_header(body, 0, {"arguments", "parameters"});
    case ToolFormat::None:
      break;
  }
  return {Match::No};
}

// How much of the end of `text` could be the start of `marker`.
size_t partial_marker(std::string_view text, std::string_view marker) {
  for (size_t n = std::min(text.size(), marker.size() - 1); n > 0; --n)
    if (marker.starts_with(text.substr(text.size() - n))) return n;
  return 0;
}

}  // namespace

ToolFormat tool_format_for_template(std::string_view name) {
  if (name.starts_with("internlm2")) return ToolFormat::InternLM2;
  if (name.starts_with("llama3")) return ToolFormat::Llama31;
  if (name.starts_with("qwen")) return ToolFormat::Qwen25;
  return ToolFormat::None;
}

const char* tool_format_name(ToolFormat format) {
  switch (format) {
    case ToolFormat::InternLM2:
      return "internlm2";
    case ToolFormat::Llama31:
      return "llama3_1";
    case ToolFormat::Qwen25:
      return "qwen2.5";
    case ToolFormat::None:
      break;
  }
  return "none";
}

std::string tool_call_start(ToolFormat format) {
  switch (format) {
    case ToolFormat::InternLM2:
      return std::string(kInternLM2Start);
    case ToolFormat::Llama31:
      return std::string(kLlama31Start);
    case ToolFormat::Qwen25:
      return std::string(kQwen25Start);
    case ToolFormat::None:
      break;
  }
  return {};
}

std::string tool_call_prefill(ToolFormat format, std::string_view function) {
  // Spaced as the models write their calls (unlike json::dump), so that the prompt reads as their own text.
  const std::string name = json(std::string(function)).dump();
  switch (format) {
    case ToolFormat::InternLM2: {
      const std::string start = std::string(kInternLM2Start) + std::string(kInternLM2Plugin) + "\n";
      return function.empty() ? start : start + "{\"name\": " + name + ", \"parameters\": ";
    }
    case ToolFormat::Llama31:
      return std::string(kLlama31Start) + (function.empty() ? "" : std::string(function) + ">");
    case ToolFormat::Qwen25: {
      const std::string start = std::string(kQwen25Start) + "\n";
      return function.empty() ? start : start + "{\"name\": " + name + ", \"arguments\": ";
    }
    case ToolFormat::None:
      break;
  }
  return {};
}

ParsedReply parse_tool_calls(ToolFormat format, std::string_view text, std::string_view prefill) {
  ToolCallStream stream(format, prefill);
  ReplyDelta reply = stream.push(text);
  ReplyDelta rest = stream.finish();
  if (stream.num_calls() == 0 || stream.malformed()) return {std::string(prefill) + std::string(text), {}};
  ParsedReply parsed{std::string(trim(reply.content + rest.content)),
                     std::vector<ToolCall>(stream.num_calls())};
  reply.calls.insert(reply.calls.end(), rest.calls.begin(), rest.calls.end());
  for (const ToolCallDelta& d : reply.calls) {
    parsed.calls[d.index].name += d.name;
    parsed.calls[d.index].arguments += d.arguments;
  }
  return parsed;
}

ToolCallStream::ToolCallStream(ToolFormat format, std::string_view prefill)
    : format_(format), start_(tool_call_start(format)), end_(call_end(format)), text_(prefill) {}

ReplyDelta ToolCallStream::push(std::string_view text) {
  ReplyDelta out;
  if (format_ == ToolFormat::None) {
    out.content = text;
    return out;
  }
  text_ += text;
  advance(out, false);
  return out;
}

ReplyDelta ToolCallStream::finish() {
  ReplyDelta out;
  if (format_ == ToolFormat::None) return out;
  advance(out, true);
  // Text around calls is layout (Qwen2.5 puts newlines between them); without calls it is the reply.
  out.content += calls_ > 0 ? std::string(trim(outside_)) : outside_;
  return out;
}

void ToolCallStream::begin_call(size_t body) {
  call_started_ = true;
  phase_ = Phase::Header;
  body_ = body;
}

void ToolCallStream::end_call(size_t end) {
  const std::string_view body = std::string_view(text_).substr(body_, end == text_.npos ? end : end - body_);
  if (!parse_call_body(format_, body)) malformed_ = true;
  pos_ = end == text_.npos ? text_.size() : end + end_.size();
  phase_ = Phase::Outside;
}

void ToolCallStream::advance(ReplyDelta& out, bool at_end) {
  for (;;) {
    switch (phase_) {
      case Phase::Outside: {
        const std::string_view rest = std::string_view(text_).substr(pos_);
        const size_t start = rest.find(start_);
        // Held back: a start marker that has only partly arrived, and before the first call, trailing
        // whitespace, which a non-streamed reply leaves out of its content when a call follows.
        std::string_view shown =
            start != rest.npos ? rest.substr(0, start)
                               : rest.substr(0, rest.size() - (at_end ? 0 : partial_marker(rest, start_)));
        if (!call_started_ && (start != rest.npos || !at_end)) shown = trim_end(shown);
        (call_started_ ? outside_ : out.content) += shown;
        if (start == rest.npos) {
          pos_ += shown.size();
          return;
        }
        if (!call_started_) space_before_call_ = rest.substr(shown.size(), start - shown.size());
        begin_call(pos_ + start + start_.size());
        break;
      }
      case Phase::Header: {
        const Header h = call_header(format_, std::string_view(text_).substr(body_));
        if (h.match == Match::NeedMore && !at_end) return;
        if (h.match != Match::Yes) {
          phase_ = Phase::Whole;
          break;
        }
        out.calls.push_back({calls_++, h.name, ""});
        space_before_call_.clear();
        args_sent_ = body_ + h.arguments;
        depth_ = 0;
        in_string_ = escaped_ = false;
        phase_ = Phase::Arguments;
        break;
      }
      case Phase::Arguments: {
        // The arguments end at their closing brace, or where the call ends when they are malformed.
        const size_t end = text_.find(end_, args_sent_);
        const size_t limit = end == text_.npos ? text_.size() : end;
        size_t pos = args_sent_;
        bool closed = false;
        for (; pos < limit && !closed; ++pos) {
          const char c = text_[pos];
          if (in_string_) {
            in_string_ = escaped_ || c != '"';
            escaped_ = !escaped_ && c == '\\';
          } else if (c == '"') {
            in_string_ = true;
          } else if (c == '{' || c == '[') {
            ++depth_;
          } else if (c == '}' || c == ']') {
            closed = --depth_ == 0;
          }
        }
        if (pos > args_sent_)
          out.calls.push_back({calls_ - 1, "", text_.substr(args_sent_, pos - args_sent_)});
        args_sent_ = pos;
        if (closed) {
          phase_ = Phase::Tail;
        } else if (end != text_.npos || at_end) {
          end_call(end);  // cut short
        } else {
          return;
        }
        break;
      }
      case Phase::Tail:
      case Phase::Whole: {
        const size_t end = text_.find(end_, phase_ == Phase::Tail ? args_sent_ : body_);
        if (end == text_.npos && !at_end) return;
        if (phase_ == Phase::Tail) {
          end_call(end);
          break;
        }
        const std::string_view body =
            std::string_view(text_).substr(body_, end == text_.npos ? end : end - body_);
        if (auto call = parse_call_body(format_, body)) {
          out.calls.push_back({calls_, call->name, ""});
          out.calls.push_back({calls_++, "", call->arguments});
          space_before_call_.clear();
        } else {
          // Not a call after all: its text is content, with the whitespace before it.
          malformed_ = true;
          outside_ += std::exchange(space_before_call_, {}) + start_ + std::string(body) +
                      (end == text_.npos ? "" : end_);
        }
        pos_ = end == text_.npos ? text_.size() : end + end_.size();
        phase_ = Phase::Outside;
        break;
      }
    }
  }
}

std::string render_tool_call(ToolFormat format, const ToolCall& call) {
  json args = json::parse(call.arguments, nullptr, false);
  if (args.is_discarded()) args = json::object();
  switch (format) {
    case ToolFormat::InternLM2:
      return tool_call_prefill(format, {}) + json{{"name", call.name}, {"parameters", args}}.dump() +
             std::string(kInternLM2End);
    case ToolFormat::Llama31:
      return tool_call_prefill(format, call.name) + args.dump() + std::string(kLlama31End);
    case ToolFormat::Qwen25:
      return tool_call_prefill(format, {}) + json{{"name", call.name}, {"arguments", args}}.dump() + "\n" +
             std::string(kQwen25End);
    case ToolFormat::None:
      break;
  }
  return {};
}

std::string render_tool_definitions(ToolFormat format, const json& functions) {
  switch (format) {
    case ToolFormat::InternLM2:
      return functions.dump();
    case ToolFormat::Llama31: {
      // The wording of Meta's Llama 3.1 model card for custom (JSON-defined) tools.
      std::string text = "You have access to the following functions:\n\n";
      for (const json& f : functions) {
        text += "Use the function '" + f.value("name", "") + "' to: " + f.value("description", "") + "\n" +
                f.dump() + "\n\n";
      }
      text +=
          "If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n\n"
          "<function=example_function_name>{\"example_name\": \"example_value\"}</function>\n\n"
          "Reminder:\n"
          "- Function calls MUST follow the specified format, start with <function= and end with "
          "</function>\n"
          "- Required parameters MUST be specified\n"
          "- Only call one function at a time\n"
          "- Put the entire function call reply on one line\n";
      return text;
    }
    case ToolFormat::Qwen25: {
      // The wording of Qwen2.5's chat template.
      std::string text =
          "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
          "You are provided with function signatures within <tools></tools> XML tags:\n<tools>";
      for (const json& f : functions) text += "\n" + json{{"type", "function"}, {"function", f}}.dump();
      text +=
          "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
          "within "
          "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
          "<args-json-object>}\n</tool_call>";
      return text;
    }
    case ToolFormat::None:
      break;
  }
  return {};
}

std::string tool_definitions_role(ToolFormat format) {
  return format == ToolFormat::InternLM2 ? "system name=" + std::string(kInternLM2Plugin) : std::string();
}

}  // namespace lmd::server
