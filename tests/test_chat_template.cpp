#include <fstream>

#include "lmd/core/chat_template.h"
#include "lmd/core/error.h"
#include "test_support.h"

namespace {

namespace fs = std::filesystem;
using lmd::ChatMessage;
using lmd::ChatTemplate;

const std::string kSystem = "You are terse.";
const std::string kUser1 = "Hi";
const std::string kReply1 = "Hello! How can I help?";
const std::string kUser2 = "What is 2+2?";

std::vector<ChatMessage> two_turns(bool with_system) {
  std::vector<ChatMessage> messages;
  if (with_system) messages.push_back({"system", kSystem});
  messages.push_back({"user", kUser1});
  messages.push_back({"assistant", kReply1});
  messages.push_back({"user", kUser2});
  return messages;
}

// A scratch checkpoint folder holding the given files; removed when the test ends.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& name) : path_(fs::temp_directory_path() / name) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~ScratchDir() { fs::remove_all(path_); }
  void write(const std::string& file, const std::string& text) const { std::ofstream(path_ / file) << text; }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

std::string selected(const fs::path& dir) { return lmd::select_chat_template(dir, "").name(); }

}  // namespace

TEST_CASE("chat template: internlm2 renders the InternLM2 chat format", "[chat_template]") {
  ChatTemplate t = ChatTemplate::builtin("internlm2");
  CHECK(t.render(two_turns(true), true) ==
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n");
  CHECK(t.render_turn(kUser2, false) ==
        "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n");
  CHECK(t.stop_words() == std::vector<std::string>{"<|im_end|>", "<|action_end|>"});
  CHECK(t.add_bos());
  // Without a system message, LMDeploy's InternLM meta instruction is the system text.
  std::string first = t.render({{"user", kUser1}}, true);
  CHECK(first.rfind("<|im_start|>system\nYou are an AI assistant whose name is InternLM (书生·浦语).\n", 0) ==
        0);
  CHECK(first.size() > 200);
  CHECK(ChatTemplate::builtin("internlm2.5").name() == "internlm2");
}

TEST_CASE("chat template: internlm v1 renders the internlm-chat-7b format", "[chat_template]") {
  ChatTemplate t = ChatTemplate::builtin("internlm");
  CHECK(t.render(two_turns(true), true) ==
        "<|System|>:You are terse.\n"
        "<|User|>:Hi\n"
        "<|Bot|>:Hello! How can I help?<eoa>\n"
        "<|User|>:What is 2+2?\n"
        "<|Bot|>:");
  CHECK(t.render_turn(kUser2, false) == "<eoa>\n<|User|>:What is 2+2?\n<|Bot|>:");
  CHECK(t.stop_words() == std::vector<std::string>{"<eoa>"});
}

TEST_CASE("chat template: llama2 renders Meta's [INST] format", "[chat_template]") {
  ChatTemplate t = ChatTemplate::builtin("llama2");
  CHECK(t.render(two_turns(true), true) ==
        "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! How can I help?</s>"
        "<s>[INST] What is 2+2? [/INST]");
  CHECK(t.render(two_turns(false), true) ==
        "[INST] Hi [/INST] Hello! How can I help?</s><s>[INST] What is 2+2? [/INST]");
  CHECK(t.render_turn(kUser2, false) == "</s><s>[INST] What is 2+2? [/INST]");
  CHECK(t.render_turn(kUser1, true, kSystem) == "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST]");
  CHECK(t.add_bos());
}

TEST_CASE("chat template: qwen renders im_start with its own default system", "[chat_template]") {
  ChatTemplate t = ChatTemplate::builtin("qwen");
  CHECK(t.render(two_turns(false), true) ==
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n");
  CHECK(t.render_turn(kUser2, false) ==
        "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n");
  CHECK_FALSE(t.add_bos());
  CHECK(ChatTemplate::builtin("qwen2.5").name() == "qwen");
}

TEST_CASE("chat template: llama3 renders header blocks", "[chat_template]") {
  ChatTemplate t = ChatTemplate::builtin("llama3");
  CHECK(t.render(two_turns(true), true) ==
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n");
  CHECK(t.render_turn(kUser2, false) ==
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

TEST_CASE("chat template: base is plain text", "[chat_template]") {
  ChatTemplate t = ChatTemplate::builtin("base");
  CHECK(t.render(two_turns(false), true) == "HiHello! How can I help?What is 2+2?");
  CHECK(t.render_turn("Once upon a time", true) == "Once upon a time");
  CHECK(t.render_turn("more", false) == "more");
  CHECK(t.stop_words().empty());
}

TEST_CASE("chat template: interactive turns add up to the full render", "[chat_template]") {
  for (const auto& name : ChatTemplate::builtin_names()) {
    ChatTemplate t = ChatTemplate::builtin(name);
    INFO(name);
    for (bool with_system : {true, false}) {
      std::string system = with_system ? kSystem : "";
      std::string streamed =
          t.render_turn(kUser1, true, system) + t.reply_prefix() + kReply1 + t.render_turn(kUser2, false);
      CHECK(streamed == t.render(two_turns(with_system), true));
      // A third turn continues the same way.
      auto three = two_turns(with_system);
      three.push_back({"assistant", "4"});
      three.push_back({"user", "Thanks"});
      CHECK(streamed + t.reply_prefix() + "4" + t.render_turn("Thanks", false) == t.render(three, true));
    }
  }
}

TEST_CASE("chat template: tool results in each model's own turns", "[chat_template]") {
  // A call, two results in a row, then the generation prompt.
  const std::vector<ChatMessage> messages = {
      {"system", kSystem}, {"user", kUser1}, {"assistant", "CALL"}, {"tool", "22C"}, {"tool", "rain"}};
  CHECK(ChatTemplate::builtin("internlm2").render(messages, true) ==
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nCALL<|im_end|>\n"
        "<|im_start|>environment name=<|plugin|>\n22C<|im_end|>\n"
        "<|im_start|>environment name=<|plugin|>\nrain<|im_end|>\n"
        "<|im_start|>assistant\n");
  CHECK(ChatTemplate::builtin("llama3").render(messages, true) ==
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nCALL<|eot_id|>"
        "<|start_header_id|>ipython<|end_header_id|>\n\n22C<|eot_id|>"
        "<|start_header_id|>ipython<|end_header_id|>\n\nrain<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n");
  // Qwen2.5 gathers a run of results into one user turn.
  CHECK(ChatTemplate::builtin("qwen").render(messages, true) ==
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nCALL<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n22C\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
        "<|im_end|>\n"
        "<|im_start|>assistant\n");
  // The ecosystems' names for the role are one role; a run ends at the next other message.
  const std::vector<ChatMessage> named = {{"user", kUser1},       {"assistant", "CALL"},
                                          {"environment", "22C"}, {"assistant", "CALL"},
                                          {"ipython", "rain"},    {"user", kUser2}};
  CHECK(ChatTemplate::parse(R"({"builtin": "qwen", "default_system": ""})").render(named, false) ==
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nCALL<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n22C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nCALL<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nrain\n</tool_response><|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n");
  // The JSON form sets the fields too.
  ChatTemplate custom = ChatTemplate::parse(
      R"({"user_prefix": "U:", "user_suffix": "\n", "tool_prefix": "[", "tool_separator": "|", "tool_suffix": "]\n"})");
  CHECK(custom.render({{"user", "q"}, {"tool", "a"}, {"tool", "b"}}, false) == "U:q\n[a|b]\n");
}

TEST_CASE("chat template: unsupported roles and names are errors", "[chat_template]") {
  // Templates without a tool syntax have no tool results; no template has a role it does not know.
  CHECK_THROWS_AS(ChatTemplate::builtin("llama2").render({{"tool", "{}"}}, true), lmd::Error);
  CHECK_THROWS_AS(ChatTemplate::builtin("base").render({{"environment", "{}"}}, true), lmd::Error);
  ChatTemplate t = ChatTemplate::builtin("internlm2");
  CHECK_THROWS_AS(t.render({{"narrator", "{}"}}, true), lmd::Error);
  try {
    ChatTemplate::builtin("vicuna");
    FAIL("expected lmd::Error");
  } catch (const lmd::Error& e) {
    std::string message = e.what();
    CHECK(message.find("vicuna") != std::string::npos);
    for (const auto& name : ChatTemplate::builtin_names()) CHECK(message.find(name) != std::string::npos);
  }
  CHECK_THROWS_AS(ChatTemplate::parse("no-such-template"), lmd::Error);
}

TEST_CASE("chat template: JSON form from a string or a file", "[chat_template]") {
  ChatTemplate custom = ChatTemplate::parse(
      R"({"name": "vicuna-ish", "user_prefix": "USER: ", "user_suffix": "\n", "assistant_prefix": "ASSISTANT:",
          "reply_prefix": " ", "assistant_suffix": "</s>", "separator": "\n", "stop_words": ["</s>"],
          "add_bos": false})");
  CHECK(custom.name() == "vicuna-ish");
  CHECK(custom.render(two_turns(false), true) ==
        "USER: Hi\nASSISTANT: Hello! How can I help?</s>\nUSER: What is 2+2?\nASSISTANT:");
  CHECK(custom.stop_words() == std::vector<std::string>{"</s>"});
  CHECK_FALSE(custom.add_bos());

  // "builtin" starts from a builtin's fields.
  ChatTemplate quiet = ChatTemplate::parse(R"({"builtin": "internlm2", "default_system": ""})");
  CHECK(quiet.render({{"user", "Hi"}}, true) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  CHECK(quiet.stop_words() == ChatTemplate::builtin("internlm2").stop_words());

  ScratchDir dir("lmd_test_chat_template_json");
  dir.write("template.json", R"({"builtin": "llama2", "default_system": "Be brief."})");
  ChatTemplate from_file = ChatTemplate::parse((dir.path() / "template.json").string());
  CHECK(from_file.render({{"user", "Hi"}}, true) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]");

  CHECK_THROWS_AS(ChatTemplate::parse(R"({"user_prefx": "typo"})"), lmd::Error);
  CHECK_THROWS_AS(ChatTemplate::parse(R"({"add_bos": "yes"})"), lmd::Error);
  CHECK_THROWS_AS(ChatTemplate::parse(R"({"stop_words": "<eoa>"})"), lmd::Error);
  CHECK_THROWS_AS(ChatTemplate::parse(R"({"user_prefix": )"), lmd::Error);
}

TEST_CASE("chat template: chosen from the checkpoint's files, not its folder name", "[chat_template]") {
  LMD_REQUIRE_ASSETS();
  const fs::path internlm2 = lmd::test::assets_dir() / "tokenizers" / "internlm2";
  {
    // An InternLM2 chat checkpoint in a folder whose name suggests another model.
    ScratchDir dir("llama-2-7b-chat-renamed");
    fs::copy_file(internlm2 / "config.json", dir.path() / "config.json");
    fs::copy_file(internlm2 / "tokenizer_config.json", dir.path() / "tokenizer_config.json");
    CHECK(selected(dir.path()) == "internlm2");
  }
  CHECK(selected(lmd::test::model_dir("stories260K-internlm2")) == "internlm2");
  CHECK(selected(lmd::test::model_dir("stories260K")) == "base");

  ScratchDir dir("lmd_test_chat_template_select");
  CHECK(selected(dir.path()) == "base");
  dir.write("config.json", R"({"model_type": "llama"})");
  CHECK(selected(dir.path()) == "base");
  dir.write(
      "tokenizer_config.json",
      R"({"chat_template": "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"})");
  CHECK(selected(dir.path()) == "llama2");
  dir.write(
      "tokenizer_config.json",
      R"({"chat_template": "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"})");
  CHECK(selected(dir.path()) == "llama3");
  dir.write("tokenizer_config.json",
            R"({"chat_template": [{"name": "default", "template": "<|im_start|>"}]})");
  CHECK(selected(dir.path()) == "qwen");
  dir.write("tokenizer_config.json", "{}");
  dir.write("config.json", R"({"model_type": "qwen2"})");
  CHECK(selected(dir.path()) == "qwen");
  dir.write("config.json", R"({"model_type": "internlm"})");
  CHECK(selected(dir.path()) == "internlm");

  // The override wins: a builtin name, a JSON object.
  CHECK(lmd::select_chat_template(dir.path(), "llama2").name() == "llama2");
  CHECK(lmd::select_chat_template(dir.path(), R"({"name": "mine"})").name() == "mine");
  CHECK_THROWS_AS(lmd::select_chat_template(dir.path(), "gpt4"), lmd::Error);

  dir.write("config.json", "{not json");
  try {
    selected(dir.path());
    FAIL("expected lmd::Error");
  } catch (const lmd::Error& e) {
    CHECK(std::string(e.what()).find("config.json") != std::string::npos);
  }
}
