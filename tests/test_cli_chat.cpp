// `lmd chat` end to end through the real binary: piped turns, streamed text, session reuse across
// turns, `end` and `exit`; and the bad inputs of the foundation issue, each a clear message and a
// non-zero exit.
#include <sys/wait.h>

#include <fstream>
#include <sstream>

#include "lmd/core/chat_template.h"
#include "lmd/core/safetensors.h"
#include "lmd/core/tokenizer.h"
#include "lmd/engine/block_pool.h"
#include "lmd/engine/cpu_backend.h"
#include "lmd/engine/model.h"
#include "test_support.h"

using namespace lmd;
namespace fs = std::filesystem;

namespace {

struct RunResult {
  int exit_code = -1;
  std::string out, err;
};

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}

fs::path temp_dir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("lmd-test-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// Runs `lmd <args>` with `input` on stdin.
RunResult run_lmd(const std::string& args, const std::string& input) {
  const fs::path dir = temp_dir("run");
  std::ofstream(dir / "in") << input;
  const std::string cmd = std::string(LMD_BINARY) + " " + args + " <" + (dir / "in").string() + " >" +
                          (dir / "out").string() + " 2>" + (dir / "err").string();
  const int status = std::system(cmd.c_str());
  RunResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(dir / "out");
  r.err = slurp(dir / "err");
  fs::remove_all(dir);
  return r;
}

// Greedy continuation of `prompt` until eos or `n` tokens, through the model alone (no engine).
std::vector<int> greedy(Model& model, const std::vector<int>& prompt, int n) {
  std::vector<int> ids = prompt, out;
  for (int i = 0; i < n; ++i) {
    const int total = int(ids.size());
    KvCacheStorage cache =
        model.backend().alloc_kv_cache(model.kv_layout(blocks_for(total, 64), 64, 0), DType::F32);
    BatchLayout batch;
    std::vector<int> blocks(blocks_for(total, 64));
    for (size_t b = 0; b < blocks.size(); ++b) blocks[b] = int(b);
    batch.seqs.push_back({0, total, 0, blocks});
    const std::vector<float> logits = model.forward(ids, batch, cache);
    const int next = int(std::max_element(logits.begin(), logits.end()) - logits.begin());
    if (next == model.spec().eos_id) break;
    out.push_back(next);
    ids.push_back(next);
  }
  return out;
}

}  // namespace

TEST_CASE("lmd chat streams greedy replies, keeps the session between turns, and honours end/exit", "[cli]") {
  LMD_REQUIRE_ASSETS();
  const fs::path dir = test::model_dir("stories260K");
  CpuBackend cpu(2);
  auto model = Model::load(dir, cpu);
  const Tokenizer tok = Tokenizer::load(dir);
  const ChatTemplate tmpl = select_chat_template(dir, "");
  const int n = 24;
  const std::vector<int> p1 = tok.encode(tmpl.render_turn("Once upon a time", true, ""), tmpl.add_bos());
  const std::vector<int> r1 = greedy(*model, p1, n);
  std::vector<int> history = p1;
  history.insert(history.end(), r1.begin(), r1.end());
  const std::vector<int> p2 = tok.encode(tmpl.render_turn("The dog", false, ""), false);
  history.insert(history.end(), p2.begin(), p2.end());
  const std::vector<int> r2 = greedy(*model, history, n);

  const RunResult r =
      run_lmd("chat " + dir.string() + " --temperature 0 --max_new_tokens " + std::to_string(n),
              "Once upon a time\nThe dog\nend\nOnce upon a time\nexit\nnever read\n");
  INFO(r.err);
  CHECK(r.exit_code == 0);
  const std::string expected =
      tok.decode(r1) + "\n" + tok.decode(r2) + "\n(new session)\n" + tok.decode(r1) + "\n";
  CHECK(r.out == expected);
  CHECK(r.err.find("chat template base") != std::string::npos);
  CHECK(r.err.find("KV cache") != std::string::npos);
}

TEST_CASE("lmd chat says when the session is full", "[cli]") {
  LMD_REQUIRE_ASSETS();
  const RunResult r = run_lmd("chat " + test::model_dir("stories260K").string() +
                                  " --temperature 0 --session-len 40 --max-new-tokens 30",
                              "Once upon a time\nthere was a big dog who liked to run\n");
  CHECK(r.exit_code == 0);
  CHECK(r.err.find("--session-len 40") != std::string::npos);
  CHECK(r.err.find("`end`") != std::string::npos);
}

TEST_CASE("bad inputs stop with one clear message and a non-zero exit", "[cli]") {
  LMD_REQUIRE_ASSETS();
  const fs::path base = temp_dir("bad");
  auto copy_model = [&](const std::string& name, const std::string& as) {
    const fs::path d = base / as;
    fs::copy(test::model_dir(name), d, fs::copy_options::recursive);
    for (auto& e : fs::recursive_directory_iterator(d))
      fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
    return d;
  };
  auto expect_failure = [&](const fs::path& model, std::initializer_list<std::string> parts) {
    const RunResult r = run_lmd("chat " + model.string() + " --max-new-tokens 2", "hi\n");
    INFO(model.string() << "\nstderr: " << r.err);
    CHECK(r.exit_code == 1);  // an lmd::Error, not a crash (a signal would give 128+)
    CHECK(r.err.rfind("lmd: error: ") != std::string::npos);
    for (const std::string& part : parts) CHECK(r.err.find(part) != std::string::npos);
  };

  expect_failure(base / "no-such-model", {"no-such-model"});
  {
    const fs::path d = copy_model("stories260K", "truncated");
    fs::resize_file(d / "model.safetensors", fs::file_size(d / "model.safetensors") / 2);
    expect_failure(d, {"model.safetensors"});
  }
  {
    const fs::path d = copy_model("stories260K-bin", "bad-bin");
    fs::resize_file(d / "pytorch_model-00002-of-00002.bin", 1000);
    expect_failure(d, {"pytorch_model-00002-of-00002.bin"});
  }
  {
    const fs::path d = copy_model("stories260K", "wrong-shape");
    std::string cfg = slurp(d / "config.json");
    cfg.replace(cfg.find("\"intermediate_size\": 172"), 24, "\"intermediate_size\": 176");
    std::ofstream(d / "config.json") << cfg;
    expect_failure(d, {"mlp.gate_proj.weight", "176"});
  }
  {
    const fs::path d = copy_model("stories260K", "wrong-dtype");
    SafetensorsFile src(test::model_dir("stories260K") / "model.safetensors");
    std::vector<std::pair<std::string, HostTensor>> tensors;
    for (const std::string& name : src.names()) {
      HostTensor t = src.get(name);
      if (name == "model.norm.weight") t = HostTensor(DType::I32, t.shape());
      tensors.emplace_back(name, t);
    }
    write_safetensors(d / "model.safetensors", tensors);
    expect_failure(d, {"model.norm.weight"});
  }
  {
    const fs::path d = copy_model("stories260K", "unknown-type");
    std::string cfg = slurp(d / "config.json");
    cfg.replace(cfg.find("\"llama\""), 7, "\"gpt2\"");
    std::ofstream(d / "config.json") << cfg;
    expect_failure(d, {"model_type", "gpt2"});
  }
  {
    const fs::path d = copy_model("stories260K", "no-tokenizer");
    fs::remove(d / "tokenizer.model");
    expect_failure(d, {"tokenizer.model"});
  }
  fs::remove_all(base);
}

TEST_CASE("--device cuda without a GPU or CUDA build is a clear error", "[cli]") {
  LMD_REQUIRE_ASSETS();
#if !defined(LMD_HAVE_CUDA)
  const RunResult r = run_lmd("chat " + test::model_dir("stories260K").string() + " --device cuda", "hi\n");
  CHECK(r.exit_code == 1);
  CHECK(r.err.find("--device cuda") != std::string::npos);
#endif
}
