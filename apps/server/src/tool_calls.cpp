#include "lmd/server/tool_calls.h"

#include <optional>

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

ParsedReply parse_tool_calls(ToolFormat format, std::string_view text) {
  ParsedReply plain{std::string(trim(text)), {}};
  if (format == ToolFormat::None) return plain;
  const std::string start = tool_call_start(format);
  const std::string_view end = call_end(format);
  ParsedReply parsed;
  std::string content;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t begin = text.find(start, pos);
    if (begin == std::string_view::npos) {
      content += text.substr(pos);
      break;
    }
    content += text.substr(pos, begin - pos);
    const size_t body = begin + start.size();
    // The end marker may be missing: it is often a stop word, and generation ends on it.
    const size_t finish = text.find(end, body);
    auto call = parse_call_body(
        format, text.substr(body, finish == std::string_view::npos ? text.npos : finish - body));
    if (!call) return plain;
    parsed.calls.push_back(std::move(*call));
    if (finish == std::string_view::npos) break;
    pos = finish + end.size();
  }
  parsed.content = std::string(trim(content));
  return parsed;
}

ToolCallStream::ToolCallStream(ToolFormat format)
    : format_(format),
      gate_(format == ToolFormat::None ? std::vector<std::string>{}
                                       : std::vector<std::string>{tool_call_start(format)}) {}

std::string ToolCallStream::push(const std::string& text) {
  text_ += text;
  std::string shown = gate_.push(text);
  shown_ += shown.size();
  return shown;
}

ParsedReply ToolCallStream::finish() {
  if (!gate_.stopped()) return {gate_.flush(), {}};
  ParsedReply parsed = parse_tool_calls(format_, std::string_view(text_).substr(shown_));
  if (parsed.calls.empty()) parsed.content = text_.substr(shown_);  // not a call after all: plain text
  return parsed;
}

std::string render_tool_call(ToolFormat format, const ToolCall& call) {
  json args = json::parse(call.arguments, nullptr, false);
  if (args.is_discarded()) args = json::object();
  switch (format) {
    case ToolFormat::InternLM2:
      return std::string(kInternLM2Start) + std::string(kInternLM2Plugin) + "\n" +
             json{{"name", call.name}, {"parameters", args}}.dump() + std::string(kInternLM2End);
    case ToolFormat::Llama31:
      return std::string(kLlama31Start) + call.name + ">" + args.dump() + std::string(kLlama31End);
    case ToolFormat::Qwen25:
      return std::string(kQwen25Start) + "\n" + json{{"name", call.name}, {"arguments", args}}.dump() + "\n" +
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

std::string tool_result_role(ToolFormat format) {
  switch (format) {
    case ToolFormat::InternLM2:
      return "environment name=" + std::string(kInternLM2Plugin);
    case ToolFormat::Llama31:
      return "ipython";
    case ToolFormat::Qwen25:
    case ToolFormat::None:
      break;
  }
  return {};
}

std::string render_tool_result(ToolFormat format, const std::string& content) {
  if (format == ToolFormat::Qwen25) return "<tool_response>\n" + content + "\n</tool_response>";
  return content;
}

}  // namespace lmd::server
