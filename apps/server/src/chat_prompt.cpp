#include "lmd/server/chat_prompt.h"

#include "lmd/core/error.h"
#include "lmd/server/api_error.h"

namespace lmd::server {

using nlohmann::json;

namespace {

// InternLM2's tool definitions are a turn in a role the template has no field for,
// `system name=<|plugin|>`, so it is written into the content of the system message before it: that
// content is closed with the template's turn suffix, the new turn's header follows, and the template's
// own suffix then closes the new turn. This is exact when system and user turns end with the same
// text, as in the im_start format this role belongs to.
void splice_turn(const ChatFormat& format, ChatMessage& before, const std::string& role,
                 const std::string& content) {
  const size_t user = format.user_prefix.find("user");
  if (user == std::string::npos || format.system_suffix != format.user_suffix)
    invalid_param("messages", "chat template '" + format.name + "' cannot express a '" + role + "' turn");
  std::string header = format.user_prefix;
  header.replace(user, 4, role);
  before.content += format.user_suffix + header + content;
}

json offered_functions(const ChatRequest& request) {
  if (request.tool_choice == "none") return json::array();
  if (!request.named_tool_choice) return request.functions;
  json only = json::array();
  for (const json& fn : request.functions)
    if (fn["name"] == request.tool_choice) only.push_back(fn);
  return only;
}

std::string tool_choice_instruction(const ChatRequest& request) {
  if (request.named_tool_choice) return "\nYou must call the function '" + request.tool_choice + "'.";
  if (request.tool_choice == "required") return "\nYou must call one or more of the functions above.";
  return {};
}

}  // namespace

ToolFormat request_tool_format(const ChatTemplate& tmpl, const ChatRequest& request) {
  const bool uses_tools =
      !offered_functions(request).empty() ||
      std::any_of(request.messages.begin(), request.messages.end(),
                  [](const ApiMessage& m) { return m.role == "tool" || !m.tool_calls.empty(); });
  if (!uses_tools) return ToolFormat::None;
  const ToolFormat format = tool_format_for_template(tmpl.name());
  if (format == ToolFormat::None)
    invalid_param("tools", "chat template '" + tmpl.name() +
                               "' has no tool-call syntax (function calling works with internlm2, llama3 and "
                               "qwen templates; see --chat-template)");
  return format;
}

std::string reply_prefill(ToolFormat format, const ChatRequest& request) {
  if (request.named_tool_choice) return tool_call_prefill(format, request.tool_choice);
  if (request.tool_choice == "required") return tool_call_prefill(format, {});
  return {};
}

std::string render_chat_prompt(const ChatTemplate& tmpl, const ChatRequest& request) {
  const ToolFormat format = request_tool_format(tmpl, request);
  std::vector<ChatMessage> messages;

  const json functions = offered_functions(request);
  if (!functions.empty()) {
    const std::string definitions =
        render_tool_definitions(format, functions) + tool_choice_instruction(request);
    const bool has_system = request.messages.front().role == "system";
    const std::string system = has_system ? request.messages.front().content : tmpl.format().default_system;
    const std::string role = tool_definitions_role(format);
    if (role.empty()) {
      messages.push_back({"system", system + definitions});
    } else {
      messages.push_back({"system", system});
      splice_turn(tmpl.format(), messages.back(), role, definitions);
    }
  }

  for (size_t i = 0; i < request.messages.size(); ++i) {
    // Tool results keep their role: the template renders them in the model's own form.
    const ApiMessage& m = request.messages[i];
    if (i == 0 && m.role == "system" && !functions.empty()) continue;  // already merged above
    std::string content = m.content;
    for (const ToolCall& call : m.tool_calls) {
      if (format == ToolFormat::Qwen25 && !content.empty()) content += "\n";
      content += render_tool_call(format, call);
    }
    messages.push_back({m.role, std::move(content)});
  }
  try {
    return tmpl.render(messages, true) + reply_prefill(format, request);
  } catch (const Error& e) {
    invalid_param("messages", e.what());
  }
}

}  // namespace lmd::server
