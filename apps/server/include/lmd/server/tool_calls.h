// Function calling for models that were trained on a tool syntax of their own: tool definitions are
// rendered into the prompt in that syntax, and calls in the reply are parsed back into OpenAI
// `tool_calls`. A reply whose call does not parse is returned as plain content, never an error.
//
//   InternLM2/2.5: <|action_start|><|plugin|>\n{"name": ..., "parameters": {...}}<|action_end|>
//   Llama 3.1:     <function=NAME>{...}</function>
//   Qwen2.5:       <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>   (several per reply)
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "lmd/core/stop_strings.h"

namespace lmd::server {

enum class ToolFormat { None, InternLM2, Llama31, Qwen25 };

// The tool syntax of a chat template's model family (internlm2*, llama3* as of Llama 3.1, qwen* as of
// Qwen2.5); None for templates without one.
ToolFormat tool_format_for_template(std::string_view template_name);
const char* tool_format_name(ToolFormat format);

// The text that opens a call in the reply; streaming holds the reply back from here on.
std::string tool_call_start(ToolFormat format);

struct ToolCall {
  std::string name;
  std::string arguments;  // a JSON object, as text (what OpenAI puts in function.arguments)
};

struct ParsedReply {
  std::string content;  // the text outside the calls, trimmed
  std::vector<ToolCall> calls;
};

ParsedReply parse_tool_calls(ToolFormat format, std::string_view text);

// One streamed reply split into content and tool calls: content is passed on until the text that opens
// a call (held back while it is only partly there), everything from there is held until the reply
// ends and then parsed. With ToolFormat::None all text is content.
class ToolCallStream {
 public:
  explicit ToolCallStream(ToolFormat format);
  // Appends reply text; returns the content that can be shown now.
  std::string push(const std::string& text);
  // At the end of the reply: the content not shown yet, and the calls. A call that does not parse
  // leaves its text as content.
  ParsedReply finish();

 private:
  ToolFormat format_;
  StopStringMatcher gate_;
  std::string text_;
  size_t shown_ = 0;
};

// How a tool call is written in the format (for assistant turns that called tools earlier).
std::string render_tool_call(ToolFormat format, const ToolCall& call);

// The text that tells the model about `functions` (the OpenAI tools' "function" objects) in the
// format's own words.
std::string render_tool_definitions(ToolFormat format, const nlohmann::json& functions);
// The role header under which the definitions form a turn of their own ("system name=<|plugin|>" for
// InternLM2); empty when they are appended to the system message instead.
std::string tool_definitions_role(ToolFormat format);

// The role header of a tool result turn ("environment name=<|plugin|>" for InternLM2, "ipython" for
// Llama 3.1); empty when results go back as user turns, wrapped by render_tool_result.
std::string tool_result_role(ToolFormat format);
std::string render_tool_result(ToolFormat format, const std::string& content);

}  // namespace lmd::server
