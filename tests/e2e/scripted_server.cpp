// A test-only api_server whose model always replies with a given text, so that the end-to-end tests can
// check replies that no test model would write (tool calls). Everything but the logits is real: the
// checkpoint runs through the engine's scheduler and the server, and a backend wrapper replaces the
// logits that the engine downloads with ones that make the next token of the script certain.
//
//   lmd_scripted_server MODEL_DIR CHAT_TEMPLATE REPLY
//
// prints "port N" once it listens on 127.0.0.1, and serves until its stdin closes. One request at a
// time: a prefill (several new tokens) starts the script over, the script ends with EOS. The session is
// longer than the model's positions: prompts with tools are long in its 512-token vocabulary.
#include <iostream>
#include <thread>

#include "../forwarding_backend.h"
#include "lmd/core/chat_template.h"
#include "lmd/core/tokenizer.h"
#include "lmd/engine/cpu_backend.h"
#include "lmd/engine/engine.h"
#include "lmd/engine/model.h"
#include "lmd/server/api_server.h"

namespace {

using namespace lmd;

class ScriptedBackend final : public test::ForwardingBackend {
 public:
  explicit ScriptedBackend(Backend& inner) : ForwardingBackend(inner) {}
  // Until the script is set (while the model loads) the backend is the inner one.
  void set_script(std::vector<int> tokens, int vocab) {
    script_ = std::move(tokens);
    vocab_ = vocab;
  }

  std::string name() const override { return "scripted " + inner_.name(); }
  HostTensor download(const DeviceTensor& t) override {
    HostTensor host = inner_.download(t);
    if (t.dtype != DType::F32 || t.shape.size() != 2 || t.shape[1] != vocab_ || script_.empty()) return host;
    std::vector<float> logits(host.numel(), -1e4f);
    for (int64_t row = 0; row < t.shape[0]; ++row) logits[row * vocab_ + script_[next_]] = 0;
    next_ = (next_ + 1) % script_.size();
    return HostTensor::from_f32(logits, t.shape);
  }
  void embedding(const DeviceTensor& table, const std::vector<int>& ids, DeviceTensor& out) override {
    if (ids.size() > 1) next_ = 0;  // a prompt: a new request
    inner_.embedding(table, ids, out);
  }

 private:
  std::vector<int> script_;
  int vocab_ = 0;
  size_t next_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: lmd_scripted_server MODEL_DIR CHAT_TEMPLATE REPLY\n";
    return 2;
  }
  try {
    const std::filesystem::path dir = argv[1];
    CpuBackend cpu(1);
    const Tokenizer tokenizer = Tokenizer::load(dir);
    const ChatTemplate chat_template = ChatTemplate::parse(argv[2]);
    ScriptedBackend backend(cpu);
    auto model = Model::load(dir, backend);
    std::vector<int> script = tokenizer.encode(argv[3], false);
    script.push_back(model->spec().eos_id);
    backend.set_script(std::move(script), model->spec().vocab);
    Engine engine(*model,
                  EngineConfig{.max_batch_size = 1, .session_len = 4096, .block_len = 16, .num_blocks = 300});

    server::ServerOptions options;
    options.port = 0;
    options.model_name = dir.filename().string();
    options.drain_seconds = 1;
    server::ApiServer server(options);
    server.bind();
    server.set_model({&engine, &tokenizer, &chat_template, {}});
    std::thread http([&] { server.serve(); });
    std::cout << "port " << server.port() << std::endl;
    for (std::string line; std::getline(std::cin, line);) {
    }
    server.shutdown();
    http.join();
    engine.shutdown();
  } catch (const std::exception& e) {
    std::cerr << "lmd_scripted_server: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
