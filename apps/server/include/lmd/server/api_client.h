// `lmd serve api_client URL`: a terminal chat against a running server's /v1/chat/interactive, where the
// server keeps the conversation's KV between turns.
#pragma once
#include <cstdint>
#include <iosfwd>
#include <string>

namespace lmd::server {

struct ApiClientOptions {
  std::string url = "http://127.0.0.1:23333";
  std::string api_key;
  int64_t session_id = -1;  // -1: the server picks one
  int max_tokens = 512;
  double temperature = 0.7;
  double top_p = 1.0;
};

// Reads one user message per line from `in` (`exit` quits, `end` ends the session and starts a new one)
// and streams each reply to `out`; with `show_prompts`, writes a prompt before each line (a terminal).
// Leaving ends the session unless the user named it (--session-id), so that it can be continued.
// Returns the process exit status: 0, or 1 when the server cannot be reached or refuses a request.
int run_api_client(const ApiClientOptions& options, std::istream& in, std::ostream& out, std::ostream& err,
                   bool show_prompts);

}  // namespace lmd::server
