// Reading a JSON file inside libcore, with errors that name the file.
#pragma once
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lmd/core/error.h"

namespace lmd {

inline nlohmann::json read_json_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) fail("cannot open ", path);
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail(path, ": not valid JSON: ", e.what());
  }
}

}  // namespace lmd
