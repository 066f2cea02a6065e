#include "lmd/server/api_client.h"

#include <httplib.h>

#include <iostream>
#include <nlohmann/json.hpp>

namespace lmd::server {

using nlohmann::json;

namespace {

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

class InteractiveClient {
 public:
  InteractiveClient(const ApiClientOptions& options, std::ostream& err)
      : options_(options), http_(options.url), err_(err), session_id_(options.session_id) {
    http_.set_read_timeout(600);
    if (!options.api_key.empty()) headers_.emplace("Authorization", "Bearer " + options.api_key);
  }

  // Sends one request; each streamed line's text goes to `on_text`. Returns false (after saying why)
  // on failure; the session id the server chose is kept for later turns.
  bool send(json body, const std::function<void(const std::string&)>& on_text) {
    body["session_id"] = session_id_;
    body["stream"] = true;
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/chat/interactive";
    req.headers = headers_;
    req.set_header("Content-Type", "application/json");
    req.body = body.dump();
    std::string pending, error_body;
    int status = 0;
    req.response_handler = [&](const httplib::Response& res) {
      status = res.status;
      return true;
    };
    req.content_receiver = [&](const char* data, size_t size, uint64_t, uint64_t) {
      if (status != 200) {
        error_body.append(data, size);
        return true;
      }
      pending.append(data, size);
      for (size_t nl; (nl = pending.find('\n')) != std::string::npos;) {
        const std::string line = trim(pending.substr(0, nl));
        pending.erase(0, nl + 1);
        if (line.empty()) continue;  // a heartbeat
        const json chunk = json::parse(line, nullptr, false);
        if (chunk.is_discarded()) continue;
        if (chunk.contains("session_id") && chunk["session_id"].is_number_integer())
          session_id_ = chunk["session_id"].get<int64_t>();
        if (chunk.contains("text") && chunk["text"].is_string()) on_text(chunk["text"].get<std::string>());
        if (chunk.contains("error") && chunk["error"].is_string())
          err_ << "\nlmd: " << chunk["error"].get<std::string>() << "\n";
      }
      return true;
    };
    httplib::Response res;
    httplib::Error error = httplib::Error::Success;
    if (!http_.send(req, res, error)) {
      err_ << "lmd: cannot reach " << options_.url << ": " << httplib::to_string(error) << "\n";
      return false;
    }
    if (status != 200) {
      const json parsed = json::parse(error_body, nullptr, false);
      std::string message = error_body;
      if (parsed.is_object() && parsed.contains("error") && parsed["error"].is_object())
        message = parsed["error"].value("message", error_body);
      err_ << "lmd: the server answered " << status << ": " << message << "\n";
      return false;
    }
    return true;
  }

  // A session id given by the user is reused; otherwise the server picks a new one.
  void new_session() { session_id_ = options_.session_id; }
  int64_t session_id() const { return session_id_; }

 private:
  const ApiClientOptions& options_;
  httplib::Client http_;
  httplib::Headers headers_;
  std::ostream& err_;
  int64_t session_id_;
};

}  // namespace

int run_api_client(const ApiClientOptions& options, std::istream& in, std::ostream& out, std::ostream& err,
                   bool show_prompts) {
  InteractiveClient client(options, err);
  if (show_prompts)
    err << "lmd: chatting with " << options.url << "; `end` starts a new session, `exit` quits\n";
  // An empty stateless request ends the session on the server and frees its KV.
  auto end_session = [&] {
    return client.session_id() <= 0 ||
           client.send({{"prompt", ""}, {"interactive_mode", false}}, [](auto&) {});
  };
  std::string line;
  for (;;) {
    if (show_prompts) out << "\n>>> " << std::flush;
    if (!std::getline(in, line)) break;
    const std::string text = trim(line);
    if (text == "exit") break;
    if (text == "end") {
      if (!end_session()) return 1;
      client.new_session();
      out << "(new session)" << std::endl;
      continue;
    }
    if (text.empty()) continue;
    json request = {{"prompt", text},
                    {"interactive_mode", true},
                    {"request_output_len", options.max_tokens},
                    {"temperature", options.temperature},
                    {"top_p", options.top_p}};
    if (!client.send(request, [&](const std::string& piece) { out << piece << std::flush; })) return 1;
    out << std::endl;
  }
  // A session the user named may be continued later; one the server picked is ended.
  return options.session_id > 0 || end_session() ? 0 : 1;
}

}  // namespace lmd::server
