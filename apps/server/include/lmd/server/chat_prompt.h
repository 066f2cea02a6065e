// An OpenAI chat request as prompt text: the messages under the model's chat template, with the tools
// on offer, earlier tool calls and tool results written in the model's own tool syntax.
#pragma once
#include <string>

#include "lmd/core/chat_template.h"
#include "lmd/server/request_parse.h"
#include "lmd/server/tool_calls.h"

namespace lmd::server {

// The tool syntax used for `request` under `tmpl`: None when the request offers no tools (or
// tool_choice is none). An ApiError (400) when it offers tools to a template without a tool syntax.
ToolFormat request_tool_format(const ChatTemplate& tmpl, const ChatRequest& request);

// The beginning of the reply that the prompt writes for the model under the request's tool syntax
// `format`: the opening of a call when tool_choice is required or names a function (tool_call_prefill),
// else empty. The reply's parsers take it as the start of the reply.
std::string reply_prefill(ToolFormat format, const ChatRequest& request);

// The prompt, ending where the assistant's reply begins, followed by the reply_prefill. An ApiError
// (400) for conversations the template cannot express.
std::string render_chat_prompt(const ChatTemplate& tmpl, const ChatRequest& request);

}  // namespace lmd::server
