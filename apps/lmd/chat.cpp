#include "chat.h"

#include <unistd.h>

#include <algorithm>
#include <iostream>
#include <memory>
#include <string>

#include "cli_common.h"
#include "lmd/core/stop_strings.h"
#include "runtime.h"

namespace lmd {
namespace {

struct ChatOptions {
  std::string model_path;
  cli::EngineOptions engine;
  cli::SamplingOptions sampling;
  std::string meta_instruction;
};

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

void run_chat(const ChatOptions& opt) {
  const std::string path = opt.model_path.empty() ? std::string(LMD_DEMO_MODEL_DIR) : opt.model_path;
  std::unique_ptr<Runtime> rt = load_runtime(path, opt.engine, std::cerr);
  const bool interactive = isatty(STDIN_FILENO);
  const ChatTemplate& tmpl = *rt->chat_template;
  const Tokenizer& tok = *rt->tokenizer;
  const std::string system = opt.meta_instruction;
  uint64_t session = 1;
  bool first_turn = true;
  if (interactive) std::cerr << "lmd: type a message; `end` starts a new session, `exit` quits\n";
  std::string line;
  for (;;) {
    if (interactive) std::cout << "\n>>> " << std::flush;
    if (!std::getline(std::cin, line)) break;
    const std::string text = trim(line);
    if (text == "exit") break;
    if (text == "end") {
      rt->engine->end_session(session++);
      first_turn = true;
      std::cout << "(new session)" << std::endl;
      continue;
    }
    if (text.empty()) continue;

    const std::string prompt = tmpl.render_turn(text, first_turn, system);
    Request req;
    req.prompt = tok.encode(prompt, first_turn && tmpl.add_bos());
    req.gen = generation_config(opt.sampling);
    const int req_max_new_tokens = req.gen.max_new_tokens;
    req.gen.stop_ids = rt->stop_token_ids();
    const std::vector<int> stop_ids = req.gen.stop_ids;
    req.session_id = session;
    req.keep_session = true;
    auto stream = rt->engine->submit(std::move(req));
    StreamDecoder decoder(tok);
    StopStringMatcher stops(tmpl.stop_words());
    TokenEvent ev;
    while (stream->next(ev)) {
      if (ev.finish == FinishReason::Error) {
        std::cout << std::flush;
        std::cerr << "lmd: " << ev.error << "\nlmd: type `end` to start a new session";
        if (ev.error.find("session-len") != std::string::npos)
          std::cerr << ", or restart with a larger --session-len";
        std::cerr << std::endl;
        break;
      }
      // The engine reports the stop token itself (not kept in the session); it is not part of the reply.
      const bool stop_token = std::find(stop_ids.begin(), stop_ids.end(), ev.token) != stop_ids.end();
      if (ev.token >= 0 && !stop_token && !stops.stopped()) {
        std::cout << stops.push(decoder.push(ev.token)) << std::flush;
        if (stops.stopped()) stream->cancel();  // the reply ended with a multi-token stop string
      }
      if (ev.finish == FinishReason::Length && ev.generated_tokens < req_max_new_tokens) {
        std::cout << std::flush;
        std::cerr << "\nlmd: the session reached --session-len " << rt->engine_config.session_len
                  << " tokens; type `end` to start a new session" << std::endl;
      }
    }
    if (!stops.stopped()) std::cout << stops.push(decoder.flush()) << stops.flush();
    std::cout << std::endl;
    first_turn = false;
  }
  rt->engine->shutdown();
}

}  // namespace

void add_chat_command(CLI::App& app) {
  auto opt = std::make_shared<ChatOptions>();
  CLI::App* cmd = app.add_subcommand(
      "chat", "Chat with a model in the terminal (`exit` quits, `end` starts a new session)");
  // With no model given, chat with the demo model bundled in the source tree.
  cli::add_model_path(*cmd, opt->model_path)
      ->required(false)
      ->description(
          "Hugging Face model folder (or give it with --model); default: the bundled stories260K demo");
  cli::add_engine_options(*cmd, opt->engine);
  cli::add_sampling_options(*cmd, opt->sampling);
  cmd->add_option("--meta-instruction", opt->meta_instruction, "System text for the conversation");
  cmd->callback([opt] { run_chat(*opt); });
}

}  // namespace lmd
