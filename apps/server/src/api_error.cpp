#include "lmd/server/api_error.h"

namespace lmd::server {

void invalid_param(const std::string& param, const std::string& message, const std::string& code) {
  throw ApiError(400, message, "invalid_request_error", code, param);
}

const char* error_type_for_status(int status) {
  switch (status) {
    case 401:
      return "authentication_error";
    case 403:
      return "permission_error";
    case 404:
      return "not_found_error";
    case 429:
      return "rate_limit_error";
    default:
      return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

nlohmann::json error_body(const ApiError& error) {
  auto or_null = [](const std::string& s) { return s.empty() ? nlohmann::json() : nlohmann::json(s); };
  return {{"error",
           {{"message", error.what()},
            {"type", error.type},
            {"code", or_null(error.code)},
            {"param", or_null(error.param)}}}};
}

nlohmann::json error_body(int status, const std::string& message) {
  return error_body(ApiError(status, message, error_type_for_status(status)));
}

std::string dump_json(const nlohmann::json& value) {
  return value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace lmd::server
