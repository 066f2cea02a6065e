#include "lmd/quant/calib_data.h"

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "lmd/core/error.h"

namespace lmd {

namespace fs = std::filesystem;

fs::path dataset_root(const std::string& flag) {
  if (!flag.empty()) return flag;
  if (const char* env = std::getenv("LMD_DATASETS")) return env;
  return fs::path("..") / "shared" / "datasets";
}

fs::path dataset_file(const std::string& name, const std::string& split, const std::string& flag) {
  const fs::path root = dataset_root(flag);
  fs::path file;
  if (name == "ptb") {
    file = root / "ptb" / ("ptb." + split + ".txt");
  } else if (name == "wikitext2") {
    file = root / "wikitext-2-raw" / ("wiki." + split + ".raw");
  } else if (name == "c4" || name == "pileval") {
    file = root / name / (split + ".jsonl");
  } else {
    file = name;
    if (!fs::is_regular_file(file))
      fail("dataset '", name, "' is neither a known name (ptb, wikitext2, c4, pileval) nor a readable file");
    return file;
  }
  if (!fs::is_regular_file(file))
    fail("dataset ", name, ": ", file.string(), " not found (looked in ", root.string(),
         ", set by --dataset-dir, else $LMD_DATASETS, else ../shared/datasets); lmd never downloads data");
  return file;
}

std::string load_dataset_text(const fs::path& file) {
  std::ifstream in(file);
  if (!in) fail("cannot read dataset file ", file.string());
  const bool jsonl = file.extension() == ".jsonl" || file.extension() == ".json";
  std::string line, text;
  size_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (jsonl) {
      if (line.empty()) continue;
      try {
        line = nlohmann::json::parse(line).at("text").get<std::string>();
      } catch (const std::exception& e) {
        fail(file.string(), ":", lineno, ": expected a JSON object with a \"text\" string (", e.what(), ")");
      }
    }
    if (!text.empty()) text += "\n\n";
    text += line;
  }
  return text;
}

std::vector<std::vector<int>> sample_calibration_windows(const std::vector<int>& tokens, int samples,
                                                         int seqlen, uint64_t seed) {
  if (samples <= 0 || seqlen <= 0) fail("--calib-samples and --calib-seqlen must be positive");
  if (int64_t(tokens.size()) <= seqlen)
    fail("the calibration text has ", tokens.size(), " tokens, fewer than --calib-seqlen ", seqlen);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> start(0, int64_t(tokens.size()) - seqlen - 1);
  std::vector<std::vector<int>> windows;
  for (int i = 0; i < samples; ++i) {
    const int64_t s = start(rng);
    windows.emplace_back(tokens.begin() + s, tokens.begin() + s + seqlen);
  }
  return windows;
}

}  // namespace lmd
