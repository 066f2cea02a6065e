#include "lmd/core/chat_template.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "json_file.h"
#include "lmd/core/error.h"

namespace lmd {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// LMDeploy's meta instruction for InternLM chat models (v1 and v2), trailing newline included.
constexpr std::string_view kInternLMSystem =
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such "
    "as English and 中文.\n";

ChatFormat im_start_format(std::string name, std::string_view default_system,
                           std::vector<std::string> stop_words, bool add_bos) {
  ChatFormat f;
  f.name = std::move(name);
  f.system_prefix = "<|im_start|>system\n";
  f.system_suffix = "<|im_end|>\n";
  f.user_prefix = "<|im_start|>user\n";
  f.user_suffix = "<|im_end|>\n";
  f.assistant_prefix = "<|im_start|>assistant\n";
  f.assistant_suffix = "<|im_end|>";
  f.separator = "\n";
  f.default_system = default_system;
  f.stop_words = std::move(stop_words);
  f.add_bos = add_bos;
  return f;
}

// Each result of a run in a turn of its own.
void tool_turns(ChatFormat& f, std::string prefix, std::string suffix) {
  f.tool_separator = suffix + prefix;
  f.tool_prefix = std::move(prefix);
  f.tool_suffix = std::move(suffix);
}

std::vector<ChatFormat> builtin_formats() {
  std::vector<ChatFormat> formats;
  // LMDeploy's InternLM2 tool results: the `environment` role from the plugin.
  ChatFormat internlm2 =
      im_start_format("internlm2", kInternLMSystem, {"<|im_end|>", "<|action_end|>"}, true);
  tool_turns(internlm2, "<|im_start|>environment name=<|plugin|>\n", "<|im_end|>\n");
  formats.push_back(internlm2);

  ChatFormat internlm;
  internlm.name = "internlm";
  internlm.system_prefix = "<|System|>:";
  internlm.system_suffix = "\n";
  internlm.user_prefix = "<|User|>:";
  internlm.user_suffix = "\n";
  internlm.assistant_prefix = "<|Bot|>:";
  internlm.assistant_suffix = "<eoa>";
  internlm.separator = "\n";
  internlm.default_system = kInternLMSystem;
  internlm.stop_words = {"<eoa>"};
  formats.push_back(internlm);

  // Meta's format: the reply ends at the sampled EOS, so no space is rendered before "</s>".
  ChatFormat llama2;
  llama2.name = "llama2";
  llama2.system_prefix = "<<SYS>>\n";
  llama2.system_suffix = "\n<</SYS>>\n\n";
  llama2.system_in_first_user = true;
  llama2.user_prefix = "[INST] ";
  llama2.user_suffix = " [/INST]";
  llama2.reply_prefix = " ";
  llama2.assistant_suffix = "</s>";
  llama2.separator = "<s>";
  formats.push_back(llama2);

  ChatFormat llama3;
  llama3.name = "llama3";
  llama3.system_prefix = "<|start_header_id|>system<|end_header_id|>\n\n";
  llama3.system_suffix = "<|eot_id|>";
  llama3.user_prefix = "<|start_header_id|>user<|end_header_id|>\n\n";
  llama3.user_suffix = "<|eot_id|>";
  llama3.assistant_prefix = "<|start_header_id|>assistant<|end_header_id|>\n\n";
  llama3.assistant_suffix = "<|eot_id|>";
  llama3.stop_words = {"<|eot_id|>", "<|end_of_text|>"};
  // Llama 3.1 answers tool calls from the `ipython` role.
  tool_turns(llama3, "<|start_header_id|>ipython<|end_header_id|>\n\n", "<|eot_id|>");
  formats.push_back(llama3);

  // Qwen2.5's template: a run of results is one user turn of <tool_response> blocks.
  ChatFormat qwen = im_start_format("qwen", "You are a helpful assistant.", {"<|im_end|>"}, false);
  qwen.tool_prefix = "<|im_start|>user\n<tool_response>\n";
  qwen.tool_separator = "\n</tool_response>\n<tool_response>\n";
  qwen.tool_suffix = "\n</tool_response><|im_end|>\n";
  formats.push_back(qwen);

  ChatFormat base;
  base.name = "base";
  formats.push_back(base);
  return formats;
}

std::string_view canonical_name(std::string_view name) {
  if (name == "internlm2.5") return "internlm2";
  if (name == "qwen2" || name == "qwen2.5") return "qwen";
  return name;
}

std::string joined_builtin_names() {
  std::string names;
  for (const auto& name : ChatTemplate::builtin_names()) names += (names.empty() ? "" : ", ") + name;
  return names;
}

// tokenizer_config.json `chat_template`: a Jinja string, or a list of {"name", "template"}.
std::string chat_template_text(const json& config) {
  auto it = config.find("chat_template");
  if (it == config.end()) return {};
  if (it->is_string()) return it->get<std::string>();
  std::string all;
  if (it->is_array()) {
    for (const auto& entry : *it) {
      if (entry.is_object() && entry.contains("template") && entry["template"].is_string()) {
        all += entry["template"].get<std::string>();
      }
    }
  }
  return all;
}

bool is_tool_role(std::string_view role) {
  return role == "tool" || role == "environment" || role == "ipython";
}

bool contains(std::string_view text, std::string_view part) {
  return text.find(part) != std::string_view::npos;
}

}  // namespace

std::vector<std::string> ChatTemplate::builtin_names() {
  std::vector<std::string> names;
  for (const auto& format : builtin_formats()) names.push_back(format.name);
  return names;
}

ChatTemplate ChatTemplate::builtin(std::string_view name) {
  for (auto& format : builtin_formats()) {
    if (format.name == canonical_name(name)) return ChatTemplate(std::move(format));
  }
  fail("unknown chat template '", name, "': expected one of ", joined_builtin_names(),
       ", a JSON object or a JSON file");
}

ChatTemplate ChatTemplate::from_json(std::string_view json_text, std::string_view source) {
  json object;
  try {
    object = json::parse(json_text);
  } catch (const json::exception& e) {
    fail("chat template ", source, ": not valid JSON: ", e.what());
  }
  if (!object.is_object()) fail("chat template ", source, ": expected a JSON object of template fields");

  ChatFormat format;
  if (auto it = object.find("builtin"); it != object.end()) {
    if (!it->is_string()) fail("chat template ", source, ": \"builtin\": expected a builtin template name");
    format = builtin(it->get<std::string>()).format();
  }
  const std::vector<std::pair<const char*, std::string*>> text_fields = {
      {"name", &format.name},
      {"system_prefix", &format.system_prefix},
      {"system_suffix", &format.system_suffix},
      {"user_prefix", &format.user_prefix},
      {"user_suffix", &format.user_suffix},
      {"assistant_prefix", &format.assistant_prefix},
      {"reply_prefix", &format.reply_prefix},
      {"assistant_suffix", &format.assistant_suffix},
      {"separator", &format.separator},
      {"default_system", &format.default_system},
      {"tool_prefix", &format.tool_prefix},
      {"tool_separator", &format.tool_separator},
      {"tool_suffix", &format.tool_suffix},
  };
  const std::vector<std::pair<const char*, bool*>> flag_fields = {
      {"system_in_first_user", &format.system_in_first_user},
      {"add_bos", &format.add_bos},
  };
  for (const auto& [key, value] : object.items()) {
    auto text_field = std::find_if(text_fields.begin(), text_fields.end(),
                                   [&](const auto& field) { return key == field.first; });
    auto flag_field = std::find_if(flag_fields.begin(), flag_fields.end(),
                                   [&](const auto& field) { return key == field.first; });
    if (text_field != text_fields.end()) {
      if (!value.is_string()) fail("chat template ", source, ": \"", key, "\": expected a string");
      *text_field->second = value.get<std::string>();
    } else if (flag_field != flag_fields.end()) {
      if (!value.is_boolean()) fail("chat template ", source, ": \"", key, "\": expected true or false");
      *flag_field->second = value.get<bool>();
    } else if (key == "stop_words") {
      if (!value.is_array() ||
          !std::all_of(value.begin(), value.end(), [](const json& v) { return v.is_string(); })) {
        fail("chat template ", source, ": \"stop_words\": expected an array of strings");
      }
      format.stop_words = value.get<std::vector<std::string>>();
    } else if (key != "builtin") {
      fail("chat template ", source, ": unknown field \"", key,
           "\" (expected builtin, name, system_prefix, system_suffix, user_prefix, user_suffix, "
           "assistant_prefix, "
           "reply_prefix, assistant_suffix, separator, default_system, tool_prefix, tool_separator, "
           "tool_suffix, system_in_first_user, stop_words, add_bos)");
    }
  }
  return ChatTemplate(std::move(format));
}

ChatTemplate ChatTemplate::parse(std::string_view name_or_json_or_path) {
  std::string_view text = name_or_json_or_path;
  auto first = text.find_first_not_of(" \t\r\n");
  if (first != std::string_view::npos && text[first] == '{')
    return from_json(text, "given on the command line");
  auto names = builtin_names();
  if (std::find(names.begin(), names.end(), canonical_name(text)) != names.end()) return builtin(text);
  fs::path path(text);
  if (!text.empty() && fs::is_regular_file(path)) {
    std::ifstream in(path);
    if (!in) fail("cannot open chat template file ", path);
    std::ostringstream contents;
    contents << in.rdbuf();
    return from_json(contents.str(), path.string());
  }
  return builtin(text);
}

std::string ChatTemplate::system_block(std::string_view text) const {
  return format_.system_prefix + std::string(text) + format_.system_suffix;
}

std::string ChatTemplate::user_block(std::string_view text, std::string_view system_inside) const {
  return format_.user_prefix + std::string(system_inside) + std::string(text) + format_.user_suffix;
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  std::string prompt;
  // Llama-2 style: a system block waiting for the next user message to be placed inside it.
  std::string held_system;
  auto add_system = [&](std::string_view text) {
    if (format_.system_in_first_user) {
      held_system += system_block(text);
    } else {
      prompt += system_block(text);
    }
  };
  if ((messages.empty() || messages.front().role != "system") && !format_.default_system.empty()) {
    add_system(format_.default_system);
  }
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& message = messages[i];
    if (message.role == "system") {
      add_system(message.content);
    } else if (message.role == "user") {
      prompt += user_block(message.content, held_system);
      held_system.clear();
    } else if (message.role == "assistant") {
      prompt += format_.assistant_prefix + format_.reply_prefix + message.content + format_.assistant_suffix +
                format_.separator;
    } else if (is_tool_role(message.role) && !format_.tool_prefix.empty()) {
      const bool run_continues = i > 0 && is_tool_role(messages[i - 1].role);
      const bool run_ends = i + 1 == messages.size() || !is_tool_role(messages[i + 1].role);
      prompt += (run_continues ? format_.tool_separator : format_.tool_prefix) + message.content;
      if (run_ends) prompt += format_.tool_suffix;
    } else {
      fail("chat message ", i, ": role '", message.role, "' is not supported by chat template '",
           format_.name, "' (expected system, user or assistant",
           format_.tool_prefix.empty() ? "" : ", or a tool result: tool, environment or ipython", ")");
    }
  }
  prompt += held_system;
  if (add_generation_prompt) prompt += format_.assistant_prefix;
  return prompt;
}

std::string ChatTemplate::render_turn(std::string_view user_text, bool first_turn,
                                      std::string_view system) const {
  if (first_turn) {
    std::vector<ChatMessage> messages;
    if (!system.empty()) messages.push_back({"system", std::string(system)});
    messages.push_back({"user", std::string(user_text)});
    return render(messages, true);
  }
  return format_.assistant_suffix + format_.separator + user_block(user_text, {}) + format_.assistant_prefix;
}

ChatTemplate select_chat_template(const fs::path& model_dir, std::string_view override_name_or_json) {
  if (!override_name_or_json.empty()) return ChatTemplate::parse(override_name_or_json);

  std::string model_type;
  if (fs::path config = model_dir / "config.json"; fs::exists(config)) {
    json object = read_json_file(config);
    if (object.is_object() && object.contains("model_type") && object["model_type"].is_string()) {
      model_type = object["model_type"].get<std::string>();
    }
  }
  std::string jinja;
  if (fs::path config = model_dir / "tokenizer_config.json"; fs::exists(config)) {
    json object = read_json_file(config);
    if (object.is_object()) jinja = chat_template_text(object);
  }

  // The checkpoint's own chat_template is the most specific evidence; then the architecture, whose
  // official chat models all share one format.
  if (contains(jinja, "<|start_header_id|>")) return ChatTemplate::builtin("llama3");
  if (model_type == "internlm2") return ChatTemplate::builtin("internlm2");
  if (model_type == "internlm") return ChatTemplate::builtin("internlm");
  if (model_type == "qwen2") return ChatTemplate::builtin("qwen");
  if (contains(jinja, "<|im_start|>")) return ChatTemplate::builtin("qwen");
  if (contains(jinja, "[INST]")) return ChatTemplate::builtin("llama2");
  if (contains(jinja, "<|User|>")) return ChatTemplate::builtin("internlm");
  return ChatTemplate::builtin("base");
}

}  // namespace lmd
