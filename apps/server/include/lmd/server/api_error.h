// OpenAI-shaped API errors: every failure a client can cause becomes
// {"error": {"message", "type", "code", "param"}} with a 4xx status, never a dropped connection.
#pragma once
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

namespace lmd::server {

class ApiError : public std::runtime_error {
 public:
  ApiError(int status, std::string message, std::string type, std::string code = {}, std::string param = {})
      : std::runtime_error(message),
        status(status),
        type(std::move(type)),
        code(std::move(code)),
        param(std::move(param)) {}

  int status;
  std::string type, code, param;
};

// 400 invalid_request_error about one request field.
[[noreturn]] void invalid_param(const std::string& param, const std::string& message,
                                const std::string& code = "invalid_value");

// The JSON body of an error response; empty code/param become null as OpenAI sends them.
nlohmann::json error_body(const ApiError& error);
nlohmann::json error_body(int status, const std::string& message);

// The error type OpenAI uses for an HTTP status.
const char* error_type_for_status(int status);

// JSON text that never throws on invalid UTF-8 (it is replaced with U+FFFD): model output can be cut
// inside a multi-byte character.
std::string dump_json(const nlohmann::json& value);

}  // namespace lmd::server
