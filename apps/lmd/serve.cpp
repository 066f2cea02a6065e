#include "serve.h"

#include <unistd.h>

#include <atomic>
#include <csignal>
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cli_common.h"
#include "lmd/core/error.h"
#include "runtime.h"
#if defined(LMD_HAVE_SERVER)
#include "lmd/server/api_client.h"
#include "lmd/server/api_server.h"
#endif

namespace lmd {
namespace {

struct ApiServerOptions {
  std::string model_path;
  cli::EngineOptions engine;
  std::string server_name = "127.0.0.1";
  int server_port = 23333;
  std::vector<std::string> api_keys;
  std::string model_name;
  std::vector<std::string> allow_origins;
  int max_concurrent_requests = 256;
  std::string log_level = "WARNING";
};

struct ApiClientCliOptions {
  std::string url;
  std::string api_key;
  int64_t session_id = -1;
  int max_tokens = 512;
  double temperature = 0.7;
  double top_p = 1.0;
};

#if defined(LMD_HAVE_SERVER)

std::atomic<int> g_stop_signal{0};
extern "C" void on_stop_signal(int signal) { g_stop_signal = signal; }

std::string default_model_name(const std::string& path) {
  std::filesystem::path p(path);
  if (p.filename().empty()) p = p.parent_path();
  return p.filename().string();
}

void run_api_server(const ApiServerOptions& opt) {
  server::ServerOptions so;
  so.host = opt.server_name;
  so.port = opt.server_port;
  so.api_keys = opt.api_keys;
  so.allow_origins = opt.allow_origins;
  so.model_name = opt.model_name.empty() ? default_model_name(opt.model_path) : opt.model_name;
  so.max_concurrent_requests = opt.max_concurrent_requests;
  so.log_requests = opt.log_level == "INFO" || opt.log_level == "DEBUG";
  if ((so.host == "0.0.0.0" || so.host == "::") && so.api_keys.empty())
    std::cerr << "lmd: warning: serving on all interfaces (" << so.host
              << ") without --api-keys: anyone who can reach this machine can use the model\n";

  // A client that disconnects must not kill the server; SIGINT/SIGTERM start a graceful shutdown.
  std::signal(SIGPIPE, SIG_IGN);
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);

  server::ApiServer server(so);
  server.bind();
  // The server answers (/health: 503) while the model loads.
  std::thread http([&] { server.serve(); });
  std::atomic<bool> finished{false};
  std::thread watcher([&] {
    while (!finished && g_stop_signal == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (g_stop_signal != 0) std::cerr << "lmd: shutting down\n";
    server.shutdown();
  });
  std::unique_ptr<Runtime> rt;
  try {
    rt = load_runtime(opt.model_path, opt.engine, std::cerr);
  } catch (...) {
    finished = true;
    watcher.join();
    http.join();
    throw;
  }
  if (g_stop_signal == 0) {
    server.set_model({rt->engine.get(), &*rt->tokenizer, &*rt->chat_template, rt->stop_token_ids()});
    std::cerr << "lmd: serving " << so.model_name << " on http://" << so.host << ":" << server.port()
              << " (GET / lists the endpoints; /chat is a web chat)" << std::endl;
  }
  http.join();  // returns once a signal has drained the requests
  finished = true;
  watcher.join();
  rt->engine->shutdown();
}

void run_api_client(const ApiClientCliOptions& opt) {
  server::ApiClientOptions co;
  co.url = opt.url;
  co.api_key = opt.api_key;
  co.session_id = opt.session_id;
  co.max_tokens = opt.max_tokens;
  co.temperature = opt.temperature;
  co.top_p = opt.top_p;
  const int status = server::run_api_client(co, std::cin, std::cout, std::cerr, isatty(STDIN_FILENO));
  if (status != 0) fail("api_client: the conversation with ", opt.url, " failed");
}

#else

[[noreturn]] void without_server() {
  fail(
      "this lmd was built without the HTTP server: cpp-httplib was not found when it was built "
      "(install libcpp-httplib-dev and rebuild)");
}
void run_api_server(const ApiServerOptions&) { without_server(); }
void run_api_client(const ApiClientCliOptions&) { without_server(); }

#endif

}  // namespace

void add_serve_command(CLI::App& app) {
  CLI::App* serve = app.add_subcommand("serve", "Serve a model over HTTP, or chat with a running server");
  serve->require_subcommand(1);

  auto so = std::make_shared<ApiServerOptions>();
  CLI::App* api_server = serve->add_subcommand(
      "api_server",
      "OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/chat/interactive, ...");
  cli::add_model_path(*api_server, so->model_path);
  cli::add_engine_options(*api_server, so->engine);
  api_server->add_option("--server-name", so->server_name, "address to listen on (0.0.0.0: all interfaces)");
  api_server->add_option("--server-port", so->server_port, "port to listen on")->check(CLI::Range(0, 65535));
  api_server->add_option("--api-keys", so->api_keys, "keys clients must send as 'Authorization: Bearer KEY'");
  api_server->add_option("--model-name", so->model_name,
                         "the model's name in the API; default: the folder's name");
  api_server->add_option("--allow-origins", so->allow_origins, "origins allowed by CORS ('*': any)");
  api_server
      ->add_option("--max-concurrent-requests", so->max_concurrent_requests,
                   "requests generating at once; more get 429 Too Many Requests")
      ->check(CLI::Range(1, 100000));
  api_server->add_option("--log-level", so->log_level, "INFO or DEBUG logs every request")
      ->transform(CLI::IsMember({"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"}, CLI::ignore_case));
  api_server->callback([so] { run_api_server(*so); });

  auto co = std::make_shared<ApiClientCliOptions>();
  CLI::App* api_client = serve->add_subcommand(
      "api_client",
      "Chat in the terminal with a running api_server (`exit` quits, `end` starts a new session)");
  api_client->add_option("api_server_url", co->url, "the server, e.g. http://127.0.0.1:23333")->required();
  api_client->add_option("--api-key", co->api_key, "sent as 'Authorization: Bearer KEY'");
  api_client->add_option("--session-id", co->session_id, "the session to continue; default: a new one");
  api_client->add_option("--max-new-tokens", co->max_tokens, "most tokens per reply")
      ->check(CLI::Range(1, 1 << 30));
  api_client->add_option("--temperature", co->temperature, "sampling temperature; 0: greedy")
      ->check(CLI::Range(0.0, 2.0));
  api_client->add_option("--top-p", co->top_p, "nucleus sampling mass")->check(CLI::Range(0.0, 1.0));
  api_client->callback([co] { run_api_client(*co); });
}

}  // namespace lmd
