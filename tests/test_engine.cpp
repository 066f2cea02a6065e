// The CPU reference engine against transformers fixtures in ../shared, and the engine's scheduling
// (batching, chunked prefill, sessions, preemption) against single-sequence runs.
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "backend_checks.h"
#include "lmd/engine/cpu_backend.h"
#include "lmd/engine/engine.h"
#include "lmd/engine/kv_quant.h"
#include "lmd/engine/model.h"
#include "lmd/engine/sampler.h"
#include "test_support.h"

using namespace lmd;
using nlohmann::json;

namespace {

json read_json(const std::filesystem::path& p) {
  std::ifstream f(p);
  REQUIRE(f.good());
  return json::parse(f);
}

// Runs the model on `prompt` then greedily decodes `n` tokens one by one through the paged cache.
std::vector<int> greedy_decode(Model& model, const std::vector<int>& prompt, int n, int block_len = 16) {
  const int total = int(prompt.size()) + n;
  KvCacheStorage cache = model.backend().alloc_kv_cache(
      model.kv_layout(blocks_for(total, block_len), block_len, 0), model.activation_dtype());
  std::vector<int> blocks(blocks_for(total, block_len));
  for (size_t i = 0; i < blocks.size(); ++i)
    blocks[i] = int(blocks.size() - 1 - i);  // not in order on purpose
  std::vector<int> out;
  std::vector<int> ids = prompt;
  int context = 0;
  for (int step = 0; step < n; ++step) {
    BatchLayout batch;
    batch.seqs.push_back({0, int(ids.size()), context, blocks});
    const std::vector<float> logits = model.forward(ids, batch, cache);
    const int next = int(std::max_element(logits.begin(), logits.end()) - logits.begin());
    context += int(ids.size());
    out.push_back(next);
    ids = {next};
  }
  return out;
}

std::vector<float> last_logits(Model& model, const std::vector<int>& prompt) {
  KvCacheStorage cache = model.backend().alloc_kv_cache(
      model.kv_layout(blocks_for(int(prompt.size()), 64), 64, 0), model.activation_dtype());
  BatchLayout batch;
  std::vector<int> blocks(blocks_for(int(prompt.size()), 64));
  for (size_t i = 0; i < blocks.size(); ++i) blocks[i] = int(i);
  batch.seqs.push_back({0, int(prompt.size()), 0, blocks});
  return model.forward(prompt, batch, cache);
}

// A greedy request for `n` tokens that ignores eos.
Request greedy_request(std::vector<int> prompt, int n) {
  Request r;
  r.prompt = std::move(prompt);
  r.gen.max_new_tokens = n;
  r.gen.sampling.temperature = 0;
  r.gen.ignore_eos = true;
  return r;
}

std::vector<int> engine_generate(Engine& engine, std::vector<int> prompt, int n, uint64_t session = 0,
                                 bool keep = false) {
  Request r = greedy_request(std::move(prompt), n);
  r.session_id = session;
  r.keep_session = keep;
  auto stream = engine.submit(std::move(r));
  std::vector<int> out;
  TokenEvent ev;
  while (stream->next(ev)) {
    if (ev.finish == FinishReason::Error) FAIL(ev.error);
    if (ev.token >= 0) out.push_back(ev.token);
  }
  return out;
}

}  // namespace

TEST_CASE("stories260K reproduces transformers' 200 greedy ids from BOS", "[engine]") {
  LMD_REQUIRE_ASSETS();
  CpuBackend cpu(2);
  for (const char* name : {"stories260K", "stories260K-internlm2"}) {
    INFO(name);
    auto model = Model::load(test::model_dir(name), cpu);
    const json ref = read_json(test::model_dir(name) / "greedy_reference.json");
    const std::vector<int> expected = ref["greedy_200_ids"];
    // The fixture lists BOS followed by 199 generated ids.
    const std::vector<int> got = greedy_decode(*model, {1}, int(expected.size()) - 1);
    std::vector<int> with_bos{1};
    with_bos.insert(with_bos.end(), got.begin(), got.end());
    CHECK(with_bos == expected);
  }
}

TEST_CASE("stories260K-bin (sharded torch .bin, bf16) reproduces its greedy ids", "[engine]") {
  LMD_REQUIRE_ASSETS();
  CpuBackend cpu(2);
  auto model = Model::load(test::model_dir("stories260K-bin"), cpu);
  const json ref = read_json(test::model_dir("stories260K-bin") / "greedy_reference.json");
  const std::vector<int> expected = ref["greedy_64_ids"];
  const std::vector<int> prompt = ref["prompt_ids"];
  // The fixture lists the 64 generated ids, without the prompt.
  const std::vector<int> got = greedy_decode(*model, prompt, int(expected.size()));
  CHECK(got == expected);
}

TEST_CASE("reference logits match transformers within 1e-4", "[engine]") {
  LMD_REQUIRE_ASSETS();
  CpuBackend cpu(2);
  for (const char* name : {"stories260K", "wt2-llama-22m"}) {
    INFO(name);
    auto model = Model::load(test::model_dir(name), cpu);
    const json ref =
        read_json(test::model_dir(name) /
                  (std::string(name) == "stories260K" ? "reference_logits.json" : "reference.json"));
    for (const auto& [prompt, data] : ref["prompts"].items()) {
      const std::vector<int> ids = data["input_ids"];
      const std::vector<float> expected = data["last_logits"];
      const std::vector<float> got = last_logits(*model, ids);
      CHECK(test::rel_error(got, expected) < 1e-4);
      const std::vector<int> greedy = data["greedy32"];
      CHECK(greedy_decode(*model, ids, int(greedy.size())) == greedy);
    }
  }
  auto tiny = Model::load(test::model_dir("tiny-random-llama-2"), cpu);
  const json corpus = read_json(test::model_dir("tiny-random-llama-2") / "corpus.json");
  for (const json& c : corpus["model_cases"]) {
    const std::vector<int> ids = c["input_ids"];
    const std::vector<float> got = last_logits(*tiny, ids);
    for (const auto& [tok, value] : c["sampled_logits"].items()) {
      const float v = value;
      CHECK(std::abs(got[std::stoi(tok)] - v) <= 1e-4 * std::max(1.f, std::abs(v)));
    }
    const std::vector<int> cont = c["greedy_continuation"];
    CHECK(greedy_decode(*tiny, ids, int(cont.size())) == cont);
  }
}

TEST_CASE("engine: batching, chunked prefill, sessions and preemption give single-run results", "[engine]") {
  LMD_REQUIRE_ASSETS();
  CpuBackend cpu(2);
  auto model = Model::load(test::model_dir("stories260K"), cpu);
  std::mt19937 rng(7);
  std::vector<std::vector<int>> prompts;
  for (int i = 0; i < 8; ++i) {
    std::vector<int> p{1};
    const int len = 3 + int(rng() % 40);
    for (int j = 0; j < len; ++j) p.push_back(3 + int(rng() % 500));
    prompts.push_back(p);
  }
  std::vector<std::vector<int>> alone;
  for (auto& p : prompts) alone.push_back(greedy_decode(*model, p, 24));

  SECTION("concurrent requests in one running batch with small prefill chunks") {
    EngineConfig cfg;
    cfg.block_len = 16;
    cfg.num_blocks = 64;
    cfg.max_prefill_tokens = 7;  // forces chunked prefill beside running decodes
    Engine engine(*model, cfg);
    std::vector<std::shared_ptr<RequestStream>> streams;
    for (auto& p : prompts) streams.push_back(engine.submit(greedy_request(p, 24)));
    for (size_t i = 0; i < streams.size(); ++i) {
      std::vector<int> got;
      TokenEvent ev;
      while (streams[i]->next(ev))
        if (ev.token >= 0) got.push_back(ev.token);
      CHECK(got == alone[i]);
    }
  }
  SECTION("a pool too small for all requests preempts and recomputes without changing outputs") {
    EngineConfig cfg;
    cfg.block_len = 16;
    cfg.num_blocks = 8;  // 128 tokens for 8 sequences of up to ~68 tokens
    Engine engine(*model, cfg);
    std::vector<std::shared_ptr<RequestStream>> streams;
    for (auto& p : prompts) streams.push_back(engine.submit(greedy_request(p, 24)));
    for (size_t i = 0; i < streams.size(); ++i) {
      std::vector<int> got;
      TokenEvent ev;
      while (streams[i]->next(ev)) {
        CHECK(ev.finish != FinishReason::Error);
        if (ev.token >= 0) got.push_back(ev.token);
      }
      CHECK(got == alone[i]);
    }
    CHECK(engine.stats().preemptions > 0);
  }
  SECTION("an interactive second turn equals a full re-prefill") {
    EngineConfig cfg;
    cfg.block_len = 16;
    cfg.num_blocks = 32;
    Engine engine(*model, cfg);
    const std::vector<int> turn1 = engine_generate(engine, prompts[0], 10, 42, true);
    CHECK(turn1 == std::vector<int>(alone[0].begin(), alone[0].begin() + 10));
    CHECK(engine.stats().sessions == 1);
    const std::vector<int> turn2 = engine_generate(engine, prompts[1], 12, 42, true);
    std::vector<int> full = prompts[0];
    full.insert(full.end(), turn1.begin(), turn1.end());
    full.insert(full.end(), prompts[1].begin(), prompts[1].end());
    CHECK(turn2 == greedy_decode(*model, full, 12));
    engine.end_session(42);
    CHECK(engine.stats().blocks_used == 0);
  }
  SECTION("cancel frees blocks; a busy session refuses a second request; overlong prompts are refused") {
    EngineConfig cfg;
    cfg.block_len = 16;
    cfg.num_blocks = 32;
    cfg.session_len = 64;
    Engine engine(*model, cfg);
    Request r;
    r.prompt = prompts[0];
    r.gen.max_new_tokens = 1000;
    r.gen.ignore_eos = true;
    r.session_id = 5;
    auto s = engine.submit(r);
    auto second = engine.submit(r);
    TokenEvent ev;
    REQUIRE(second->next(ev));
    CHECK(ev.finish == FinishReason::Error);
    CHECK(ev.error.find("session 5") != std::string::npos);
    s->cancel();
    while (s->next(ev)) {
    }
    CHECK((ev.finish == FinishReason::Cancelled || ev.finish == FinishReason::Length));
    CHECK(engine.stats().blocks_used == 0);
    Request big;
    big.prompt = std::vector<int>(100, 5);
    auto refused = engine.submit(big);
    REQUIRE(refused->next(ev));
    CHECK(ev.finish == FinishReason::Error);
    CHECK(ev.error.find("--session-len") != std::string::npos);
  }
}

TEST_CASE("sampler: greedy, seeded reproducibility, top-k/top-p/min-p support, penalties", "[engine]") {
  std::vector<float> logits = {1.0f, 3.0f, 2.5f, -1.0f, 0.5f};
  SamplingParams greedy;
  greedy.temperature = 0;
  CHECK(Sampler(greedy).sample(logits, {}, 0).token == 1);

  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.seed = 123;
  Sampler a(p), b(p);
  for (int i = 0; i < 50; ++i) CHECK(a.sample(logits, {}, 0).token == b.sample(logits, {}, 0).token);

  // top_k = 2 only ever returns the two largest logits.
  p.top_k = 2;
  Sampler k2(p);
  for (int i = 0; i < 200; ++i) {
    const int t = k2.sample(logits, {}, 0).token;
    CHECK((t == 1 || t == 2));
  }
  // top_p: probabilities at T=1 are ~[.05,.50,.30,.01,.03...]; p=0.5 keeps only the top token.
  p.top_k = 0;
  p.top_p = 0.5f;
  Sampler tp(p);
  for (int i = 0; i < 100; ++i) CHECK(tp.sample(logits, {}, 0).token == 1);
  // min_p = 0.5 keeps tokens with p >= 0.5 * p(1): token 2 (exp(-0.5)=0.61) stays, token 0 goes.
  p.top_p = 1.0f;
  p.min_p = 0.5f;
  Sampler mp(p);
  int seen2 = 0;
  for (int i = 0; i < 300; ++i) {
    const int t = mp.sample(logits, {}, 0).token;
    CHECK((t == 1 || t == 2));
    seen2 += t == 2;
  }
  CHECK(seen2 > 50);
  // Repetition penalty 2 halves token 1's positive logit (3 -> 1.5 < 2.5): greedy picks token 2.
  SamplingParams rep = greedy;
  rep.repetition_penalty = 2.0f;
  std::vector<int> history = {1};
  CHECK(Sampler(rep).sample(logits, history, 1).token == 2);
  // Frequency penalty counts generated tokens only: two generated 1s cost 2 * 0.3.
  SamplingParams freq = greedy;
  freq.frequency_penalty = 0.3f;
  std::vector<int> gen_history = {1, 1};
  CHECK(Sampler(freq).sample(logits, gen_history, 0).token == 2);
  CHECK(Sampler(freq).sample(logits, gen_history, 2).token == 1);
  // Reported logprob is log softmax of the raw logits.
  const SampledToken t = Sampler(greedy).sample(logits, {}, 0);
  const std::vector<float> lp = log_softmax(logits);
  CHECK(std::abs(t.logprob - lp[1]) < 1e-6);
}

TEST_CASE("KV quantization round trip is within half a step per element", "[engine]") {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0, 2);
  for (int bits : {8, 4}) {
    std::vector<float> x(128), back(128);
    for (float& v : x) v = nd(rng);
    std::vector<uint8_t> q(kv_row_bytes(128, bits));
    uint16_t params[2];
    quantize_kv_row(x.data(), 128, bits, q.data(), params);
    dequantize_kv_row(q.data(), params, 128, bits, back.data());
    const float lo = *std::min_element(x.begin(), x.end()), hi = *std::max_element(x.begin(), x.end());
    const float step = (hi - lo) / ((1 << bits) - 1);
    for (int i = 0; i < 128; ++i) CHECK(std::abs(back[i] - x[i]) <= 0.5f * step + 2e-3f * std::abs(hi - lo));
  }
}

TEST_CASE("cpu backend: download_into reuses a matching host buffer", "[engine]") {
  CpuBackend be(1);
  test::check_download_into(be);
}
