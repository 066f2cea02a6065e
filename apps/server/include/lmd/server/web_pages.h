// The pages the server shows to a browser; self-contained (no external scripts, styles or fonts).
#pragma once
#include <string>

namespace lmd::server {

// GET /: the endpoints with curl examples, and a link to the chat page.
std::string index_page(const std::string& model_name, const std::string& base_url);
// GET /chat: a multi-turn chat that streams from /v1/chat/completions.
const std::string& chat_page();

}  // namespace lmd::server
