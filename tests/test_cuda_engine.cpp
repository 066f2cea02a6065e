// The CUDA backend end to end through lmd::Engine: decode steps run as CUDA graphs and greedy tokens are
// chosen on the GPU, so these check that batching, graph record/capture/replay across batch sizes and
// block-table strides, interactive sessions and `lmd chat --device cuda` give what single runs give.
// Skipped (with a warning) without a GPU.
#include "test_support.h"

#if defined(LMD_HAVE_CUDA)
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <random>

#include "cuda_test_support.h"
#include "lmd/core/chat_template.h"
#include "lmd/core/tokenizer.h"
#include "lmd/cuda/cuda_backend.h"
#include "lmd/engine/engine.h"
#include "lmd/engine/model.h"
#include "lmd/engine/sampler.h"

using namespace lmd;
namespace fs = std::filesystem;

namespace {

Request greedy_request(std::vector<int> prompt, int n, uint64_t session = 0, bool keep = false) {
  Request r;
  r.prompt = std::move(prompt);
  r.gen.max_new_tokens = n;
  r.gen.sampling.temperature = 0;
  r.gen.ignore_eos = true;
  r.session_id = session;
  r.keep_session = keep;
  return r;
}

std::vector<int> collect(RequestStream& stream) {
  std::vector<int> out;
  TokenEvent ev;
  while (stream.next(ev)) {
    if (ev.finish == FinishReason::Error) FAIL(ev.error);
    if (ev.token >= 0) out.push_back(ev.token);
  }
  return out;
}

std::vector<int> generate(Engine& engine, std::vector<int> prompt, int n, uint64_t session = 0,
                          bool keep = false) {
  return collect(*engine.submit(greedy_request(std::move(prompt), n, session, keep)));
}

EngineConfig small_engine(int blocks) {
  EngineConfig c;
  c.max_batch_size = 64;
  c.block_len = 16;  // short blocks: the prompts below cross several, so graph strides change
  c.num_blocks = blocks;
  return c;
}

}  // namespace

TEST_CASE("cuda greedy sampling equals the CPU Sampler's greedy choice and logprob", "[gpu]") {
  LMD_REQUIRE_GPU();
  CudaBackend gpu;
  std::mt19937 rng(5);
  for (int vocab : {7, 1000, 32000, 92544}) {
    INFO("vocab " << vocab);
    const int rows = 5;
    std::normal_distribution<float> dist(0.f, 3.f);
    std::vector<float> logits(size_t(rows) * vocab);
    for (float& x : logits) x = dist(rng);
    logits[size_t(3) * vocab + vocab - 1] = logits[size_t(3) * vocab + vocab / 2] = 50.f;  // a tie
    DeviceTensor dl = gpu.upload(HostTensor::from_f32(logits, {rows, vocab}), DType::F32);
    DeviceTensor out = gpu.alloc(DType::F32, {rows, 2});
    gpu.greedy(dl, out);
    const std::vector<float> got = gpu.download(out).to_f32();
    Sampler sampler(SamplingParams{.temperature = 0.f});
    for (int r = 0; r < rows; ++r) {
      const std::span<const float> row(logits.data() + size_t(r) * vocab, vocab);
      const SampledToken want = sampler.sample(row, {}, 0);
      CHECK(int(got[2 * r]) == want.token);
      CHECK(std::abs(got[2 * r + 1] - want.logprob) < 1e-4f * std::max(1.f, std::abs(want.logprob)));
    }
  }
}

TEST_CASE("cuda engine: 32 prompts batched decode the same greedy tokens as each alone", "[gpu]") {
  LMD_REQUIRE_GPU();
  LMD_REQUIRE_ASSETS();
  // fp32 activations: the batched and single runs then agree exactly, with no fp16 near-ties to excuse.
  CudaBackend gpu(0, DType::F32);
  auto model = Model::load(test::model_dir("stories260K"), gpu);
  std::mt19937 rng(11);
  std::vector<std::vector<int>> prompts(32);
  std::vector<int> lengths(32);
  for (int i = 0; i < 32; ++i) {
    prompts[i].resize(3 + rng() % 45);
    for (int& t : prompts[i]) t = 3 + int(rng() % 500);
    lengths[i] = 8 + i % 13;  // sequences leave the batch at different steps: many batch sizes
  }
  Engine engine(*model, small_engine(512));
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (int i = 0; i < 32; ++i) streams.push_back(engine.submit(greedy_request(prompts[i], lengths[i])));
  std::vector<std::vector<int>> batched;
  for (auto& s : streams) batched.push_back(collect(*s));
  for (int i = 0; i < 32; ++i) {
    INFO("prompt " << i << " of " << prompts[i].size() << " tokens");
    CHECK(int(batched[i].size()) == lengths[i]);
    CHECK(generate(engine, prompts[i], lengths[i]) == batched[i]);
  }
  // A second batched round replays the graphs captured above.
  streams.clear();
  for (int i = 0; i < 32; ++i) streams.push_back(engine.submit(greedy_request(prompts[i], lengths[i])));
  for (int i = 0; i < 32; ++i) CHECK(collect(*streams[i]) == batched[i]);
  const CudaBackend::GraphCounts graphs = gpu.graph_counts();
  WARN("decode graphs: " << graphs.captured << " shapes captured, " << graphs.replayed << " steps replayed, "
                         << graphs.failed << " failed");
  CHECK(graphs.captured > 0);
  CHECK(graphs.replayed > 0);
  CHECK(graphs.failed == 0);
}

TEST_CASE("cuda engine: an interactive second turn equals a full re-prefill", "[gpu]") {
  LMD_REQUIRE_GPU();
  LMD_REQUIRE_ASSETS();
  CudaBackend gpu(0, DType::F32);
  auto model = Model::load(test::model_dir("stories260K"), gpu);
  Engine engine(*model, small_engine(256));
  const std::vector<int> turn1{1, 403, 407, 261, 116, 29}, turn2{450, 112, 338};  // vocab 512
  const std::vector<int> reply1 = generate(engine, turn1, 20, 7, true);
  const std::vector<int> reply2 = generate(engine, turn2, 30, 7, true);
  std::vector<int> full = turn1;
  full.insert(full.end(), reply1.begin(), reply1.end());
  full.insert(full.end(), turn2.begin(), turn2.end());
  CHECK(generate(engine, full, 30) == reply2);
  engine.end_session(7);
}

TEST_CASE("lmd chat --device cuda streams what the CUDA engine generates", "[gpu]") {
  LMD_REQUIRE_GPU();
  LMD_REQUIRE_ASSETS();
  const fs::path dir = test::model_dir("stories260K");
  CudaBackend gpu;  // the activation dtype lmd chat picks (fp16 for this fp32 checkpoint)
  auto model = Model::load(dir, gpu);
  const Tokenizer tok = Tokenizer::load(dir);
  const ChatTemplate tmpl = select_chat_template(dir, "");
  const int n = 24;
  EngineConfig config = small_engine(256);
  config.block_len = 64;
  Engine engine(*model, config);
  auto turn = [&](const std::vector<int>& prompt) {
    Request r = greedy_request(prompt, n, 1, true);
    r.gen.ignore_eos = false;
    std::vector<int> out = collect(*engine.submit(std::move(r)));
    if (!out.empty() && out.back() == model->spec().eos_id) out.pop_back();  // chat hides it
    return out;
  };
  const std::vector<int> p1 = tok.encode(tmpl.render_turn("Once upon a time", true, ""), tmpl.add_bos());
  const std::vector<int> r1 = turn(p1);
  const std::vector<int> r2 = turn(tok.encode(tmpl.render_turn("The dog", false, ""), false));

  const fs::path tmp = fs::temp_directory_path() / ("lmd-cuda-chat-" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  std::ofstream(tmp / "in") << "Once upon a time\nThe dog\nend\nOnce upon a time\nexit\n";
  const std::string cmd = std::string(LMD_BINARY) + " chat " + dir.string() +
                          " --device cuda --temperature 0 --max_new_tokens " + std::to_string(n) + " <" +
                          (tmp / "in").string() + " >" + (tmp / "out").string() + " 2>" +
                          (tmp / "err").string();
  const int status = std::system(cmd.c_str());
  auto slurp = [](const fs::path& p) {
    std::ifstream f(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  const std::string out = slurp(tmp / "out"), err = slurp(tmp / "err");
  fs::remove_all(tmp);
  INFO(err);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(out == tok.decode(r1) + "\n" + tok.decode(r2) + "\n(new session)\n" + tok.decode(r1) + "\n");
}

#endif
