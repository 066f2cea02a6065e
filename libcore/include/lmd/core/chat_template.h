// Chat templates: how a conversation becomes the prompt text a chat model was trained on.
//
// A template is data (ChatFormat), so that a checkpoint with an unusual format can be served with
// `--chat-template FILE.json` instead of new code. Builtins: internlm2 (also InternLM2.5), internlm
// (InternLM v1, internlm-chat-7b), llama2, llama3, qwen (Qwen / Qwen2 / Qwen2.5 chat) and base (plain
// text, no wrapping).
#pragma once
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace lmd {

struct ChatMessage {
  // "system", "user", "assistant", or a tool result: "tool" (OpenAI's name), "environment"
  // (InternLM2's) or "ipython" (Llama 3.1's) are one role under three names.
  std::string role;
  std::string content;
};

// The fields of a chat template; also its JSON form: an object with any of these keys (missing keys are
// empty / false, or come from "builtin"):
//   "builtin"               name of a builtin to start from, the other keys override its fields
//   "name"                  what to call the template in messages (default "custom")
//   "system_prefix", "system_suffix"        around a system message
//   "user_prefix", "user_suffix"            around a user message
//   "assistant_prefix"      opens the assistant's turn; the generation prompt ends with it
//   "reply_prefix"          before a stored reply's content only: text the model's first reply token
//                           carries itself (Llama-2 answers "[/INST]" with "▁Sure", so history shows
//                           "[/INST] Sure" while the generation prompt ends at "[/INST]")
//   "assistant_suffix"      ends a reply (the text of the token the model stops on: "<|im_end|>")
//   "separator"             after a reply's suffix, before the next message
//   "default_system"        system text used when the conversation has no system message ("" = none)
//   "tool_prefix", "tool_separator", "tool_suffix"
//                           a run of consecutive tool results is tool_prefix + the results joined by
//                           tool_separator + tool_suffix (Qwen2.5 puts a run in one user turn, InternLM2
//                           and Llama 3.1 give each result a turn of its own); empty: no tool results
//   "system_in_first_user"  true: the system block goes inside the next user message, after
//                           user_prefix (Llama-2: "[INST] <<SYS>>\n...\n<</SYS>>\n\n{msg} [/INST]")
//   "stop_words"            array of texts that end a reply besides the tokenizer's EOS
//   "add_bos"               whether the prompt starts with the tokenizer's BOS token
struct ChatFormat {
  std::string name = "custom";
  std::string system_prefix;
  std::string system_suffix;
  std::string user_prefix;
  std::string user_suffix;
  std::string assistant_prefix;
  std::string reply_prefix;
  std::string assistant_suffix;
  std::string separator;
  std::string default_system;
  std::string tool_prefix;
  std::string tool_separator;
  std::string tool_suffix;
  bool system_in_first_user = false;
  std::vector<std::string> stop_words;
  bool add_bos = true;
};

class ChatTemplate {
 public:
  explicit ChatTemplate(ChatFormat format) : format_(std::move(format)) {}

  // A builtin by name (aliases: internlm2.5, qwen2, qwen2.5); lmd::Error listing the names otherwise.
  static ChatTemplate builtin(std::string_view name);
  static std::vector<std::string> builtin_names();
  // The JSON form described at ChatFormat; `source` names where it came from in error messages.
  static ChatTemplate from_json(std::string_view json_text, std::string_view source);
  // What --chat-template accepts: a builtin name, a JSON object, or the path of a JSON file.
  static ChatTemplate parse(std::string_view name_or_json_or_path);

  // The whole conversation as prompt text, without BOS (the tokenizer adds it when add_bos()). With
  // add_generation_prompt the text ends where the assistant's reply begins.
  std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const;

  // Interactive mode, where the engine keeps the session's KV between turns: the text to send for one
  // user turn. The first turn opens the conversation (with `system`, or the default system text when
  // `system` is empty); a later turn first closes the previous reply (whose stop token was sampled but
  // never fed back), then wraps the user text. For every template
  //   render_turn(u1, true, s) + reply_prefix() + a1 + render_turn(u2, false)
  //     == render({{system, s}, {user, u1}, {assistant, a1}, {user, u2}}, true)
  // where reply_prefix() + a1 is the reply text exactly as the model produced it.
  std::string render_turn(std::string_view user_text, bool first_turn, std::string_view system = {}) const;

  const std::string& name() const { return format_.name; }
  const std::string& reply_prefix() const { return format_.reply_prefix; }
  const std::vector<std::string>& stop_words() const { return format_.stop_words; }
  bool add_bos() const { return format_.add_bos; }
  const ChatFormat& format() const { return format_; }

 private:
  std::string system_block(std::string_view text) const;
  std::string user_block(std::string_view text, std::string_view system_inside) const;

  ChatFormat format_;
};

// The template for a checkpoint, judged from its own files and never from the folder's name:
// config.json `model_type` (internlm2, internlm, qwen2) and tokenizer_config.json `chat_template`
// (<|start_header_id|> -> llama3, <|im_start|> -> qwen, [INST] -> llama2, <|User|> -> internlm);
// base when nothing indicates a chat format. A non-empty `override_name_or_json` (--chat-template) wins.
ChatTemplate select_chat_template(const std::filesystem::path& model_dir,
                                  std::string_view override_name_or_json);

}  // namespace lmd
