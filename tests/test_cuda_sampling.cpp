// GPU sampling (CudaBackend::sample) against the CPU reference (choose_token): the same ids from the same
// logits and draws for every combination of the sampler's settings, and a sampled generation through the
// engine (decode-step graphs, then the sample kernel) giving the CPU engine's tokens. Skipped (with a
// warning) without a GPU.
#include "test_support.h"

#if defined(LMD_HAVE_CUDA)
#include <sstream>

#include "cuda_test_support.h"
#include "lmd/cuda/cuda_backend.h"
#include "lmd/engine/cpu_backend.h"
#include "lmd/engine/engine.h"
#include "lmd/engine/model.h"
#include "sampling_cases.h"

using namespace lmd;

namespace {

std::string describe(const SampleRow& row) {
  const SamplingParams& p = row.params;
  std::ostringstream os;
  os << "temperature " << p.temperature << ", top_k " << p.top_k << ", top_p " << p.top_p << ", min_p "
     << p.min_p << ", repetition " << p.repetition_penalty << ", frequency " << p.frequency_penalty
     << ", presence " << p.presence_penalty << ", " << row.penalties.size() << " penalty tokens, uniform "
     << row.uniform;
  return os.str();
}

}  // namespace

TEST_CASE("cuda sample chooses the CPU reference's ids on random logits", "[gpu]") {
  LMD_REQUIRE_GPU();
  CudaBackend gpu;
  const std::vector<SamplingParams> grid = test::sampling_grid();
  double worst_logprob = 0;
  for (int vocab : {32000, 92544, 151936}) {
    for (uint32_t seed : {1u, 2u}) {
      if (vocab == 151936 && seed == 2) continue;  // the CPU reference's sorts dominate the test's time
      const test::SamplingCase c = test::sampling_case(vocab, grid, seed * 7919u + uint32_t(vocab));
      const int64_t rows = int64_t(c.rows.size());
      DeviceTensor logits = gpu.upload(HostTensor::from_f32(c.logits, {rows, vocab}), DType::F32);
      const test::Guarded out = test::guarded(gpu, DType::F32, {rows, 2});
      DeviceTensor view = out.view;
      gpu.sample(logits, c.rows, view);
      test::check_written(gpu, out);
      const std::vector<float> got = test::values(gpu, out.view);
      int mismatched = 0;
      for (int64_t r = 0; r < rows; ++r) {
        const SampledToken want = choose_token({c.logits.data() + r * vocab, size_t(vocab)}, c.rows[r]);
        INFO("vocab " << vocab << ", seed " << seed << ", row " << r << ": " << describe(c.rows[r]));
        CHECK(int(got[2 * r]) == want.token);
        CHECK(std::abs(got[2 * r + 1] - want.logprob) < 1e-4f * std::max(1.f, std::abs(want.logprob)));
        mismatched += int(got[2 * r]) != want.token;
        worst_logprob = std::max(worst_logprob, double(std::abs(got[2 * r + 1] - want.logprob)));
      }
      CHECK(mismatched == 0);
    }
  }
  WARN("cuda sample: largest logprob difference " << worst_logprob);
}

TEST_CASE("cuda sample rejects what the kernel cannot take", "[gpu]") {
  LMD_REQUIRE_GPU();
  CudaBackend gpu;
  DeviceTensor logits =
      gpu.upload(HostTensor::from_f32(std::vector<float>(2 * 100, 0.f), {2, 100}), DType::F32);
  DeviceTensor out = gpu.alloc(DType::F32, {2, 2});
  std::vector<SampleRow> rows(2);
  rows[0].params.repetition_penalty = 1.2f;
  rows[0].penalties = {{5, 0}, {5, 1}};  // listed twice
  CHECK_THROWS(gpu.sample(logits, rows, out));
  rows[0].penalties.clear();
  rows[1].uniform = 1.0;  // outside [0, 1)
  CHECK_THROWS(gpu.sample(logits, rows, out));
  rows.pop_back();
  CHECK_THROWS(gpu.sample(logits, rows, out));  // one row of parameters for two rows of logits
}

TEST_CASE("cuda engine: sampled generation on stories260K gives the CPU engine's tokens", "[gpu]") {
  LMD_REQUIRE_GPU();
  LMD_REQUIRE_ASSETS();
  const std::filesystem::path dir = test::model_dir("stories260K");
  CpuBackend cpu;
  // fp32 activations: the logits then agree to ~1e-6, far below what moves a sampled choice.
  CudaBackend gpu(0, DType::F32);
  auto cpu_model = Model::load(dir, cpu);
  auto gpu_model = Model::load(dir, gpu);

  Request r;
  r.prompt = {1};
  r.gen.max_new_tokens = 64;
  r.gen.ignore_eos = true;
  r.gen.sampling.temperature = 0.8f;
  r.gen.sampling.top_p = 0.9f;
  r.gen.sampling.top_k = 40;
  r.gen.sampling.seed = 1234;
  std::vector<Request> requests = test::mixed_requests();
  requests.insert(requests.begin(), r);

  std::vector<test::Generated> want, got;
  {
    Engine engine(*cpu_model, test::chunked_engine());
    want = test::run_all(engine, requests);
  }
  {
    Engine engine(*gpu_model, test::chunked_engine());
    got = test::run_all(engine, requests);
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    INFO("request " << i);
    CHECK(got[i].tokens == want[i].tokens);
    REQUIRE(got[i].logprobs.size() == want[i].logprobs.size());
    for (size_t t = 0; t < want[i].logprobs.size(); ++t)
      CHECK(std::abs(got[i].logprobs[t] - want[i].logprobs[t]) < 1e-3f);
  }
  const CudaBackend::GraphCounts graphs = gpu.graph_counts();
  CHECK(graphs.replayed > 0);  // decode steps ran as graphs, their tokens sampled after them
  CHECK(graphs.failed == 0);
}

#endif
