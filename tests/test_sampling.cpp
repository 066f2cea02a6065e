// The sampler's pure choice (choose_token) and the backend `sample` op that carries it to devices: the
// Sampler's seeded draws are unchanged by the split, the CPU op is the reference, ties go to the lowest
// id, and the engine's device-side path (Backend::sample per decode step) picks what the Sampler picks.
#include <random>

#include "forwarding_backend.h"
#include "lmd/engine/cpu_backend.h"
#include "lmd/engine/engine.h"
#include "lmd/engine/model.h"
#include "lmd/engine/sampler.h"
#include "sampling_cases.h"
#include "test_support.h"

using namespace lmd;

namespace {

// The CPU backend presenting itself as an accelerator, so that the engine takes its device-side token
// choice (Backend::greedy / Backend::sample) on a machine without one.
class AcceleratorLike final : public test::ForwardingBackend {
 public:
  AcceleratorLike() : ForwardingBackend(cpu_) {}
  DeviceKind kind() const override { return DeviceKind::CUDA; }
  std::string name() const override { return "cpu posing as an accelerator"; }
  void greedy(const DeviceTensor& logits, DeviceTensor& out) override {
    ++greedy_calls;
    inner_.greedy(logits, out);
  }
  void sample(const DeviceTensor& logits, const std::vector<SampleRow>& rows, DeviceTensor& out) override {
    ++sample_calls;
    inner_.sample(logits, rows, out);
  }

  int greedy_calls = 0, sample_calls = 0;

 private:
  CpuBackend cpu_{2};
};

}  // namespace

TEST_CASE("sampler: the Sampler's draws are unchanged by moving the draw out of the choice", "[engine]") {
  // Before the split the Sampler drew uniform_real_distribution(0, total); now it draws [0, 1) and
  // choose_token scales by the kept mass. The two must be the same numbers, so seeded outputs stay.
  for (double total : {1.0, 0.9, 0.3337, 1e-3}) {
    std::mt19937_64 old_rng(42);
    Sampler sampler(SamplingParams{.seed = 42});
    for (int i = 0; i < 100; ++i)
      CHECK(sampler.draw_uniform() * total == std::uniform_real_distribution<double>(0.0, total)(old_rng));
  }
}

TEST_CASE("sampler: choose_token orders equal logits by id and Sampler::sample is choose_token", "[engine]") {
  const std::vector<float> flat(10, 0.5f);
  SamplingParams p{.temperature = 1.f, .top_k = 3, .top_p = 1.f};
  for (double u : {0.0, 0.34, 0.67, 0.999}) {
    const int want = u < 1.0 / 3 ? 0 : u < 2.0 / 3 ? 1 : 2;
    CHECK(choose_token(flat, SampleRow{p, u, {}}).token == want);
  }
  // Greedy ties go to the lowest id; so do the ties the penalties create.
  CHECK(
      choose_token(std::vector<float>{1.f, 3.f, 2.f, 3.f}, SampleRow{{.temperature = 0.f}, 0.0, {}}).token ==
      1);
  const SampleRow penalised{{.temperature = 0.f, .repetition_penalty = 1.5f}, 0.0, {{1, 0}}};
  CHECK(choose_token(std::vector<float>{1.f, 3.f, 2.f, 2.f}, penalised).token == 1);  // 3 / 1.5 ties ids 2, 3

  // penalty_tokens: distinct ids in order of first use; generated counts only after the prompt.
  SamplingParams rep{.repetition_penalty = 1.2f, .frequency_penalty = 0.1f};
  const std::vector<int> history = {5, 7, 5, 9, 7, 7};
  const std::vector<PenaltyToken> listed = penalty_tokens(rep, history, 3);
  REQUIRE(listed.size() == 3);
  CHECK((listed[0].token == 5 && listed[0].generated == 0));
  CHECK((listed[1].token == 7 && listed[1].generated == 2));
  CHECK((listed[2].token == 9 && listed[2].generated == 1));
  rep.repetition_penalty = 1.f;  // only the generated tokens matter then
  CHECK(penalty_tokens(rep, history, 3).size() == 2);
  CHECK(penalty_tokens(SamplingParams{}, history, 3).empty());

  // The Sampler is choose_token with its seeded draws (and the penalty list of its history).
  const test::SamplingCase c = test::sampling_case(300, test::sampling_grid(), 9);
  for (size_t r = 0; r < c.rows.size(); ++r) {
    SamplingParams params = c.rows[r].params;
    params.seed = r;
    Sampler sampler(params), draws(params);
    const std::span<const float> row(c.logits.data() + r * c.vocab, c.vocab);
    const std::vector<int> history = {3, 3, 250, 17, 250, 3};
    SampleRow same{params, params.greedy() ? 0.0 : draws.draw_uniform(), penalty_tokens(params, history, 2)};
    const SampledToken a = sampler.sample(row, history, 2), b = choose_token(row, same);
    CHECK(a.token == b.token);
    CHECK(a.logprob == b.logprob);
  }
}

TEST_CASE("cpu backend: sample is choose_token per row", "[engine]") {
  CpuBackend cpu(2);
  const test::SamplingCase c = test::sampling_case(1000, test::sampling_grid(), 4);
  const int64_t rows = int64_t(c.rows.size());
  DeviceTensor logits = cpu.upload(HostTensor::from_f32(c.logits, {rows, c.vocab}), DType::F32);
  DeviceTensor out = cpu.alloc(DType::F32, {rows, 2});
  cpu.sample(logits, c.rows, out);
  const std::vector<float> got = cpu.download(out).to_f32();
  for (int64_t r = 0; r < rows; ++r) {
    const SampledToken want = choose_token({c.logits.data() + r * c.vocab, size_t(c.vocab)}, c.rows[r]);
    CHECK(int(got[2 * r]) == want.token);
    CHECK(got[2 * r + 1] == want.logprob);
  }
  DeviceTensor short_out = cpu.alloc(DType::F32, {rows - 1, 2});
  CHECK_THROWS(cpu.sample(logits, c.rows, short_out));
}

TEST_CASE("engine: choosing tokens on the device (Backend::sample) gives the Sampler's tokens", "[engine]") {
  LMD_REQUIRE_ASSETS();
  CpuBackend cpu(2);
  AcceleratorLike device;
  auto host_model = Model::load(test::model_dir("stories260K"), cpu);
  auto device_model = Model::load(test::model_dir("stories260K"), device);
  const std::vector<Request> requests = test::mixed_requests();
  std::vector<test::Generated> want, got;
  {
    Engine engine(*host_model, test::chunked_engine());
    want = test::run_all(engine, requests);
  }
  {
    Engine engine(*device_model, test::chunked_engine());
    got = test::run_all(engine, requests);
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    INFO("request " << i);
    CHECK(got[i].tokens == want[i].tokens);
    CHECK(got[i].logprobs == want[i].logprobs);
  }
  // Steps with the top_logprobs request take the host path; the others the device's choice.
  CHECK(device.sample_calls > 0);

  // Only plainly greedy requests: the device's argmax.
  std::vector<Request> greedy_only(requests.begin() + 5, requests.begin() + 6);
  Engine engine(*device_model, test::chunked_engine());
  test::run_all(engine, greedy_only);
  CHECK(device.greedy_calls > 0);
}
