// `lmd bench`: random-weight checkpoints (library and CLI) and the generation profile, run through the
// real binary.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "lmd/core/checkpoint.h"
#include "lmd/core/error.h"
#include "lmd/core/model_spec.h"
#include "lmd/core/random_checkpoint.h"
#include "lmd/core/safetensors.h"
#include "lmd/core/tokenizer.h"
#include "test_support.h"

using namespace lmd;
namespace fs = std::filesystem;

namespace {

// A fresh folder under the system temp dir, removed with everything in it when the test ends.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& tag) {
    path = fs::temp_directory_path() / ("lmd-test-bench-" + tag + "-" + std::to_string(getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

CommandResult run_lmd(const std::string& args) {
  CommandResult result;
  FILE* pipe = popen((std::string(LMD_BINARY) + " " + args + " 2>&1").c_str(), "r");
  REQUIRE(pipe != nullptr);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) result.output.append(buf, n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  REQUIRE(in.good());
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

// A Llama-layout shape small enough to write several times per test, with the shared Llama 2 tokenizer.
RandomModelShape tiny_shape() {
  RandomModelShape s = random_model_shape("llama2-7b");
  s.name = "tiny";
  s.hidden = 64;
  s.intermediate = 160;
  s.layers = 2;
  s.heads = 4;
  s.kv_heads = 2;
  s.vocab = 512;
  return s;
}

std::map<std::string, std::string> folder_bytes(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& entry : fs::directory_iterator(dir))
    out[entry.path().filename().string()] = read_file(entry.path());
  return out;
}

}  // namespace

TEST_CASE("random checkpoint: deterministic by seed, the same tensors whatever the sharding", "[bench]") {
  LMD_REQUIRE_ASSETS();
  TempDir tmp("tiny");
  RandomCheckpointOptions options;
  options.tokenizers_dir = test::assets_dir() / "tokenizers";
  options.seed = 7;
  options.max_shard_bytes = 40'000;  // several shards and an index
  options.threads = 3;               // chunk filling split unevenly
  write_random_checkpoint(tiny_shape(), tmp.path / "a", options);
  options.threads = 1;
  write_random_checkpoint(tiny_shape(), tmp.path / "b", options);
  options.max_shard_bytes = 4'000'000'000;
  write_random_checkpoint(tiny_shape(), tmp.path / "single", options);
  options.seed = 8;
  write_random_checkpoint(tiny_shape(), tmp.path / "other", options);

  CHECK(folder_bytes(tmp.path / "a") == folder_bytes(tmp.path / "b"));
  const nlohmann::json index =
      nlohmann::json::parse(read_file(tmp.path / "a" / "model.safetensors.index.json"));
  std::set<std::string> shard_files;
  for (const auto& [name, file] : index["weight_map"].items()) shard_files.insert(file.get<std::string>());
  CHECK(shard_files.size() > 2);
  for (const std::string& file : shard_files) CHECK(fs::exists(tmp.path / "a" / file));
  CHECK(shard_files.count("model-00001-of-" +
                          std::string(5 - std::to_string(shard_files.size()).size(), '0') +
                          std::to_string(shard_files.size()) + ".safetensors"));
  CHECK(fs::exists(tmp.path / "single" / "model.safetensors"));
  CHECK(!fs::exists(tmp.path / "single" / "model.safetensors.index.json"));

  const ModelSpec spec = load_model_spec(tmp.path / "a");
  CHECK(spec.arch == Arch::Llama);
  CHECK(spec.dtype == DType::F16);
  CHECK(spec.layers == 2);
  CHECK(spec.kv_heads == 2);
  const CheckpointWeights sharded = load_checkpoint(tmp.path / "a", spec);
  const CheckpointWeights single = load_checkpoint(tmp.path / "single", spec);
  const CheckpointWeights other = load_checkpoint(tmp.path / "other", spec);
  CHECK(sharded.layers.at(1).down.weight.shape() == Shape{64, 160});
  CHECK(sharded.layers.at(0).k.weight.shape() == Shape{32, 64});
  CHECK(sharded.lm_head.shape() == Shape{512, 64});
  CHECK(sharded.layers[1].down.weight.to_f32() == single.layers[1].down.weight.to_f32());
  CHECK(sharded.embed.to_f32() == single.embed.to_f32());
  CHECK(sharded.embed.to_f32() != other.embed.to_f32());

  // Small normal-ish values (std 0.02, bounded), norms exactly 1.
  const std::vector<float> w = sharded.layers[0].gate.weight.to_f32();
  double sum = 0, sq = 0;
  for (float v : w) {
    REQUIRE(std::abs(v) < 0.08f);
    sum += v;
    sq += double(v) * v;
  }
  CHECK(std::abs(sum / w.size()) < 0.002);
  CHECK(std::sqrt(sq / w.size()) == Approx(0.02).epsilon(0.05));
  for (float v : sharded.layers[0].attn_norm.to_f32()) REQUIRE(v == 1.0f);

  // A non-empty destination is refused rather than mixed with old files.
  CHECK_THROWS_AS(write_random_checkpoint(tiny_shape(), tmp.path / "a", options), lmd::Error);
}

TEST_CASE("bench make-model: a 1-layer internlm2-1.8b checkpoint with the real tokenizer", "[bench]") {
  LMD_REQUIRE_ASSETS();
  TempDir tmp("internlm2");
  const fs::path dst = tmp.path / "m";
  const CommandResult made =
      run_lmd("bench make-model internlm2-1.8b --layers 1 --seed 3 --dst " + dst.string() + " --tokenizers " +
              (test::assets_dir() / "tokenizers").string());
  INFO(made.output);
  REQUIRE(made.exit_code == 0);

  const ModelSpec spec = load_model_spec(dst);
  CHECK(spec.arch == Arch::InternLM2);
  CHECK(spec.dtype == DType::BF16);
  CHECK(spec.hidden == 2048);
  CHECK(spec.intermediate == 8192);
  CHECK(spec.layers == 1);
  CHECK(spec.heads == 16);
  CHECK(spec.kv_heads == 8);
  CHECK(spec.vocab == 92544);
  CHECK(spec.max_position == 32768);
  CHECK(spec.rope_theta == 1e6);
  CHECK(spec.rope_scaling == RopeScaling::Dynamic);
  CHECK(spec.rope_factor == 2.0);
  CHECK(!spec.tie_embeddings);
  const CheckpointWeights w = load_checkpoint(dst, spec);
  CHECK(w.embed.shape() == Shape{92544, 2048});
  CHECK(w.lm_head.shape() == Shape{92544, 2048});
  CHECK(w.layers.size() == 1);
  CHECK(w.layers[0].q.weight.shape() == Shape{2048, 2048});
  CHECK(w.layers[0].k.weight.shape() == Shape{1024, 2048});
  CHECK(w.layers[0].gate.weight.shape() == Shape{8192, 2048});
  CHECK(w.layers[0].down.weight.shape() == Shape{2048, 8192});

  const Tokenizer tok = Tokenizer::load(dst);
  CHECK(tok.encode("<|im_start|>", false) == std::vector<int>{92543});
  CHECK(tok.vocab_size() == 92544);

  const CommandResult again = run_lmd("bench make-model internlm2-1.8b --dst " + dst.string() +
                                      " --tokenizers " + (test::assets_dir() / "tokenizers").string());
  CHECK(again.exit_code != 0);
  CHECK(again.output.find("not an empty folder") != std::string::npos);
  const CommandResult no_tokenizer = run_lmd("bench make-model llama2-7b --dst " + (tmp.path / "x").string() +
                                             " --tokenizers " + tmp.path.string());
  CHECK(no_tokenizer.exit_code != 0);
  CHECK(no_tokenizer.output.find("--tokenizers") != std::string::npos);
  CHECK(!fs::exists(tmp.path / "x"));
}

TEST_CASE("bench generation: stories260K profile has consistent figures", "[bench]") {
  LMD_REQUIRE_ASSETS();
  TempDir tmp("gen");
  const fs::path json_path = tmp.path / "r.json", csv_path = tmp.path / "r.csv";
  const CommandResult run =
      run_lmd("bench generation " + test::model_dir("stories260K").string() +
              " --device cpu --threads 2 --concurrency 1,3 --prompt-tokens 16 "
              "--completion-tokens 12 --warmup 1 --rounds 2 --peak-bandwidth 10 --json " +
              json_path.string() + " --csv " + csv_path.string());
  INFO(run.output);
  REQUIRE(run.exit_code == 0);
  CHECK(run.output.find("decode") != std::string::npos);

  const nlohmann::json j = nlohmann::json::parse(read_file(json_path));
  CHECK(j["weight_bytes"].get<double>() > 0);
  CHECK(j["kv_bytes_per_token"].get<double>() > 0);
  REQUIRE(j["results"].size() == 2);
  for (const auto& r : j["results"]) {
    const int batch = r["batch"];
    INFO("batch " << batch);
    CHECK(r["prompt_tokens"] == 16);
    CHECK(r["generated_tokens"].get<int>() == batch * 12);
    const auto& ftl = r["first_token_latency_s"];
    CHECK(ftl["min"].get<double>() > 0);
    CHECK(ftl["min"].get<double>() <= ftl["mean"].get<double>());
    CHECK(ftl["mean"].get<double>() <= ftl["max"].get<double>());
    const auto& tok = r["token_latency_s"];
    CHECK(tok["p50"].get<double>() > 0);
    CHECK(tok["p50"].get<double>() <= tok["p90"].get<double>());
    CHECK(tok["p90"].get<double>() <= tok["p99"].get<double>());
    CHECK(r["decode_tokens_per_s"].get<double>() > 0);
    CHECK(r["output_tokens_per_s"].get<double>() > 0);
    CHECK(r["achieved_gb_per_s"].get<double>() > 0);
    CHECK(r["steady_decode_tokens_per_s"].get<double>() > 0);
    CHECK(r["steady_achieved_gb_per_s"].get<double>() > 0);
    CHECK(r["fraction_of_peak_bandwidth"].get<double>() > 0);
    CHECK(r["peak_memory_bytes"].get<double>() > 0);
  }
  CHECK(j["results"][0]["batch"] == 1);
  CHECK(j["results"][1]["batch"] == 3);

  const std::string csv = read_file(csv_path);
  CHECK(std::count(csv.begin(), csv.end(), '\n') == 3);  // header + 2 rows
  CHECK(csv.rfind("batch,prompt_tokens,completion_tokens", 0) == 0);
  CHECK(csv.find(",steady_decode_tokens_per_s,") != std::string::npos);

  const CommandResult short_session =
      run_lmd("bench generation " + test::model_dir("stories260K").string() +
              " --device cpu --session-len 8 --prompt-tokens 16 --completion-tokens 4");
  CHECK(short_session.exit_code != 0);
  CHECK(short_session.output.find("--session-len") != std::string::npos);
}
