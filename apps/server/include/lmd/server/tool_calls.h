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

// The opening of a call, up to where the model's choice begins: the start marker (and for InternLM2 the
// plugin tag) when `function` is empty, and with a `function` also its name, so that only the arguments
// are left to write. A prompt that ends with it makes a call binding without constraining decoding.
std::string tool_call_prefill(ToolFormat format, std::string_view function);

struct ToolCall {
  std::string name;
  std::string arguments;  // a JSON object, as text (what OpenAI puts in function.arguments)
};

struct ParsedReply {
  std::string content;  // the text outside the calls (trimmed when there are calls)
  std::vector<ToolCall> calls;
};

// A whole reply: its calls, or (when there are none, or one does not parse) the reply as content.
// `prefill`: the text the prompt ended with (see tool_call_prefill), which begins the reply; `text` is
// what the model generated after it.
ParsedReply parse_tool_calls(ToolFormat format, std::string_view text, std::string_view prefill = {});

// A piece of a streamed tool call, as OpenAI streams them: a call's first piece carries its name and
// no arguments, later pieces carry fragments of the arguments' text.
struct ToolCallDelta {
  size_t index = 0;  // which call of the reply
  std::string name;  // the first piece only
  std::string arguments;
};

struct ReplyDelta {
  std::string content;
  std::vector<ToolCallDelta> calls;
};

// One streamed reply split into content and tool calls as it arrives. Content is passed on until the
// text that opens a call (held back while it is only partly there, as is whitespace that may turn out
// to come right before a call, which the content leaves out). A call is announced once its name
// is known and its arguments have begun as a JSON object, and the arguments' text is passed on as it
// is generated. A call in any other shape (arguments before the name, arguments as a string) is held
// until it ends and then sent whole; if it does not parse, its text becomes content. Text between and
// after calls is sent at the end, trimmed. With ToolFormat::None all text is content (and there is no
// prefill). `prefill` begins the reply as in parse_tool_calls; what it yields comes with the first push
// (or finish).
class ToolCallStream {
 public:
  explicit ToolCallStream(ToolFormat format, std::string_view prefill = {});
  ReplyDelta push(std::string_view text);
  // At the end of the reply: what was held back.
  ReplyDelta finish();
  // Calls announced so far.
  size_t num_calls() const { return calls_; }
  // After finish(): whether a call did not parse as a whole. An announced call stays a call in the
  // stream even when its arguments turn out malformed or cut short (a stream cannot take it back, and
  // OpenAI's own streams behave so); parse_tool_calls returns such a reply as plain content.
  bool malformed() const { return malformed_; }

 private:
  enum class Phase { Outside, Header, Arguments, Tail, Whole };
  // Moves through text_ as far as it can be judged; `at_end`: no more text will come.
  void advance(ReplyDelta& out, bool at_end);
  void begin_call(size_t body);
  // The current call ends at `end` (the end marker's position, or npos when the reply ended first).
  void end_call(size_t end);

  ToolFormat format_;
  std::string start_, end_;  // the markers around a call
  std::string text_;         // the reply so far
  Phase phase_ = Phase::Outside;
  size_t pos_ = 0;        // text_ up to here has been dealt with (Outside)
  size_t body_ = 0;       // where the current call's text starts, after its start marker
  size_t args_sent_ = 0;  // the arguments' text up to here has been sent (Arguments, Tail)
  int depth_ = 0;         // the arguments' JSON nesting at args_sent_
  bool in_string_ = false, escaped_ = false;
  std::string outside_;            // text outside calls once the first call began, sent at the end
  std::string space_before_call_;  // held back before the first call; content if it is not one
  size_t calls_ = 0;
  bool call_started_ = false, malformed_ = false;
};

// How a tool call is written in the format (for assistant turns that called tools earlier).
std::string render_tool_call(ToolFormat format, const ToolCall& call);

// The text that tells the model about `functions` (the OpenAI tools' "function" objects) in the
// format's own words.
std::string render_tool_definitions(ToolFormat format, const nlohmann::json& functions);
// The role header under which the definitions form a turn of their own ("system name=<|plugin|>" for
// InternLM2); empty when they are appended to the system message instead.
std::string tool_definitions_role(ToolFormat format);

}  // namespace lmd::server
