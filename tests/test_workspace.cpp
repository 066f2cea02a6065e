// The TurboMind-style workspace: config.ini, per-tensor files, `lmd convert` -> chat giving the same
// greedy tokens as the Hugging Face folder (hf and awq inputs), clear errors for broken workspaces, and
// the whole offline KV flow through the real binary.
#include <array>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_common.h"
#include "convert.h"
#include "expect_error.h"
#include "lmd/core/awq_layout.h"
#include "lmd/core/error.h"
#include "lmd/core/safetensors.h"
#include "lmd/core/workspace.h"
#include "runtime.h"
#include "test_support.h"

using namespace lmd;
namespace fs = std::filesystem;

namespace {

fs::path scratch(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("lmd_test_ws_" + name);
  fs::remove_all(p);
  return p;
}

void convert(std::vector<std::string> args) {
  CLI::App app{"test"};
  cli::apply_conventions(app);
  add_convert_command(app);
  args.insert(args.begin(), "convert");
  cli::parse_args(app, args);
}

cli::EngineOptions cpu_options() {
  cli::EngineOptions o;
  o.device = "cpu";
  o.threads = 2;
  return o;
}

std::vector<int> greedy(Runtime& rt, const std::string& text, int n) {
  Request r;
  r.prompt = rt.tokenizer->encode(text, true);
  r.gen.max_new_tokens = n;
  r.gen.sampling.temperature = 0;
  r.gen.ignore_eos = true;
  auto stream = rt.engine->submit(r);
  std::vector<int> out;
  TokenEvent ev;
  while (stream->next(ev))
    if (ev.token >= 0) out.push_back(ev.token);
  return out;
}

std::vector<int> greedy_of(const fs::path& model, const std::string& text, int n,
                           const cli::EngineOptions& options = cpu_options()) {
  std::ostringstream log;
  auto rt = load_runtime(model.string(), options, log);
  return greedy(*rt, text, n);
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_file(const fs::path& p, const std::string& text) { std::ofstream(p) << text; }

// Runs the lmd binary through the shell; returns stdout, leaves stderr in `err`.
std::string run_lmd(const std::string& args, std::string& err, const std::string& input = "") {
  const fs::path dir = fs::temp_directory_path();
  const fs::path in = dir / "lmd_test_ws_in", out = dir / "lmd_test_ws_out", errf = dir / "lmd_test_ws_err";
  write_file(in, input);
  const std::string cmd = std::string(LMD_BINARY) + " " + args + " < " + in.string() + " > " + out.string() +
                          " 2> " + errf.string();
  const int rc = std::system(cmd.c_str());
  err = read_file(errf);
  INFO("command: " << cmd << "\nstderr: " << err);
  REQUIRE(rc == 0);
  return read_file(out);
}

// An AutoAWQ-layout checkpoint of wt2-llama-22m by plain round-to-nearest (BRIEF §5), standing in for
// `lmd lite auto_awq` output.
fs::path make_awq_checkpoint(const fs::path& src, const fs::path& dst) {
  constexpr int kGroup = 128;
  fs::create_directories(dst);
  const auto store = open_tensor_store(src);
  std::vector<std::pair<std::string, HostTensor>> out;
  for (const std::string& name : store->names()) {
    const HostTensor t = store->get(name);
    const std::string suffix = "_proj.weight";
    if (name.size() < suffix.size() ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
      out.emplace_back(name, t);
      continue;
    }
    const int64_t rows = t.dim(0), cols = t.dim(1), groups = cols / kGroup;  // [out, in]
    const std::vector<float> w = t.to_f32();
    std::vector<uint8_t> q(cols * rows), zeros(groups * rows);
    std::vector<float> scales(groups * rows);
    for (int64_t o = 0; o < rows; ++o)
      for (int64_t g = 0; g < groups; ++g) {
        const float* x = &w[o * cols + g * kGroup];
        const float lo = *std::min_element(x, x + kGroup), hi = *std::max_element(x, x + kGroup);
        const float scale = f16_to_f32(f32_to_f16(std::max(hi - lo, 1e-5f) / 15));
        const int zero = std::clamp(int(-std::nearbyint(lo / scale)), 0, 15);
        scales[g * rows + o] = scale;
        zeros[g * rows + o] = uint8_t(zero);
        for (int i = 0; i < kGroup; ++i)
          q[(g * kGroup + i) * rows + o] =
              uint8_t(std::clamp(int(std::nearbyint(x[i] / scale)) + zero, 0, 15));
      }
    const std::string prefix = name.substr(0, name.size() - std::string(".weight").size());
    out.emplace_back(prefix + ".qweight", awq_pack(q, cols, rows));
    out.emplace_back(prefix + ".qzeros", awq_pack(zeros, groups, rows));
    out.emplace_back(prefix + ".scales", HostTensor::from_f32(scales, {groups, rows}, DType::F16));
  }
  write_safetensors(dst / "model.safetensors", out);
  nlohmann::json config = nlohmann::json::parse(read_file(src / "config.json"));
  config["quantization_config"] = {{"quant_method", "awq"},
                                   {"version", "gemm"},
                                   {"bits", 4},
                                   {"group_size", kGroup},
                                   {"zero_point", true}};
  write_file(dst / "config.json", config.dump(2));
  fs::copy_file(src / "tokenizer.model", dst / "tokenizer.model");
  return dst;
}

}  // namespace

TEST_CASE("workspace: config.ini round trip and errors naming the field", "[workspace]") {
  WorkspaceConfig c;
  c.spec.model_type = "internlm2";
  c.spec.arch = Arch::InternLM2;
  c.spec.hidden = 64, c.spec.intermediate = 172, c.spec.layers = 5, c.spec.heads = 8, c.spec.kv_heads = 4;
  c.spec.head_dim = 8, c.spec.vocab = 512, c.spec.norm_eps = 1e-5f, c.spec.rope_theta = 1e6;
  c.spec.rope_scaling = RopeScaling::Dynamic, c.spec.rope_factor = 2.5, c.spec.dtype = DType::BF16;
  c.spec.awq.enabled = true, c.spec.awq.group_size = 64, c.spec.tie_embeddings = true, c.spec.qkv_bias = true;
  c.model_name = "internlm2-chat-7b";
  c.chat_template = "internlm2";
  c.engine.quant_policy = 8, c.engine.cache_block_seq_len = 32, c.engine.cache_max_entry_count = 0.5;
  const std::string text = format_workspace_config(c);
  const WorkspaceConfig back = parse_workspace_config(text, "config.ini");
  CHECK(format_workspace_config(back) == text);
  CHECK(back.spec.arch == Arch::InternLM2);
  CHECK(back.spec.norm_eps == 1e-5f);
  CHECK(back.spec.rope_scaling == RopeScaling::Dynamic);
  CHECK(back.spec.awq.group_size == 64);
  CHECK(back.spec.dtype == DType::BF16);
  CHECK(back.engine.cache_max_entry_count == 0.5);
  CHECK(text.find("weight_type = int4\n") != std::string::npos);
  CHECK(text.find("session_len = ") != std::string::npos);

  auto without = [&](const std::string& key) {
    std::istringstream in(text);
    std::string line, out;
    while (std::getline(in, line))
      if (line.rfind(key + " =", 0) != 0) out += line + "\n";
    return out;
  };
  CHECK_ERROR(Error, parse_workspace_config(without("head_num"), "WS/config.ini"), "WS/config.ini",
              "missing field 'head_num'");
  std::string bad = text;
  bad.replace(bad.find("num_layer = 5"), 13, "num_layer = five");
  CHECK_ERROR(Error, parse_workspace_config(bad, "c.ini"), "c.ini", "'num_layer' = 'five'", "integer");
  CHECK_ERROR(Error, parse_workspace_config("[other]\na = 1\n", "c.ini"), "c.ini", "no [llama] section");
}

TEST_CASE("workspace: convert NAME maps old LMDeploy model names to templates", "[workspace]") {
  CHECK(chat_template_for_model_name("internlm2") == "internlm2");
  CHECK(chat_template_for_model_name("internlm2-chat-7b") == "internlm2");
  CHECK(chat_template_for_model_name("internlm-chat-7b") == "internlm");
  CHECK(chat_template_for_model_name("Llama-2-7b-chat") == "llama2");
  CHECK(chat_template_for_model_name("qwen-7b") == "qwen");
  CHECK_ERROR(Error, chat_template_for_model_name("gpt2"), "'gpt2'", "internlm2-chat-7b");
}

TEST_CASE("workspace: convert then chat gives the HF folder's greedy tokens", "[workspace]") {
  LMD_REQUIRE_ASSETS();
  struct Case {
    const char* model;
    const char* name;
  };
  for (const Case& c : {Case{"stories260K", "base"}, Case{"stories260K-internlm2", "internlm2-chat-7b"},
                        Case{"stories260K-bin", "base"}}) {
    INFO(c.model);
    const fs::path hf = test::model_dir(c.model), ws = scratch(c.model);
    convert({c.name, hf.string(), "--dst_path", ws.string()});
    const fs::path weights = ws / "triton_models" / "weights";
    CHECK(fs::exists(weights / "config.ini"));
    CHECK(fs::exists(weights / "layers.0.attention.wq.0.weight"));
    CHECK(fs::exists(ws / "triton_models" / "tokenizer" / "tokenizer.model"));
    // Tied embeddings are stored once.
    CHECK(fs::exists(weights / "output.weight") == !load_model_spec(hf).tie_embeddings);
    // Each tensor keeps its checkpoint dtype (the .bin model: bf16 linears, fp32 norms).
    const HostTensor q =
        SafetensorsFile(weights / "layers.0.attention.wq.0.weight").get("layers.0.attention.wq.0.weight");
    CHECK(q.dtype() == open_tensor_store(hf)
                           ->get(std::string(c.model) == "stories260K-internlm2"
                                     ? "model.layers.0.attention.wqkv.weight"
                                     : "model.layers.0.self_attn.q_proj.weight")
                           .dtype());
    const auto expected = greedy_of(hf, "Once upon a time", 24);
    CHECK(greedy_of(ws, "Once upon a time", 24) == expected);
    CHECK(greedy_of(ws / "triton_models" / "weights", "Once upon a time", 24) == expected);
    std::ostringstream log;
    auto rt = load_runtime(ws.string(), cpu_options(), log);
    CHECK(rt->chat_template->name() == (std::string(c.name) == "base" ? "base" : "internlm2"));
    fs::remove_all(ws);
  }
}

TEST_CASE("workspace: convert an AWQ checkpoint, same greedy tokens", "[workspace][awq]") {
  LMD_REQUIRE_ASSETS();
  const fs::path awq = make_awq_checkpoint(test::model_dir("wt2-llama-22m"), scratch("awq_src"));
  const fs::path ws = scratch("awq");
  CHECK_ERROR(Error, convert({"llama2", awq.string(), "--dst-path", ws.string(), "--model-format", "hf"}),
              "--model-format hf", "AWQ");
  CHECK_ERROR(Error,
              convert({"llama2", awq.string(), "--dst-path", ws.string(), "--model-format", "awq",
                       "--group-size", "64"}),
              "--group-size 64", "128");
  convert(
      {"llama2", awq.string(), "--dst-path", ws.string(), "--model-format", "awq", "--group-size", "128"});
  const WorkspaceConfig config = read_workspace_config(ws / "triton_models" / "weights");
  CHECK(config.spec.awq.enabled);
  CHECK(config.spec.awq.group_size == 128);
  CHECK(fs::exists(ws / "triton_models" / "weights" / "layers.5.feed_forward.w2.0.qweight"));
  CHECK(greedy_of(ws, "The tower is", 8) == greedy_of(awq, "The tower is", 8));
  fs::remove_all(ws);
  fs::remove_all(awq);
}

TEST_CASE("workspace: config.ini values are defaults that flags override", "[workspace]") {
  LMD_REQUIRE_ASSETS();
  const fs::path ws = scratch("defaults");
  convert({"base", test::model_dir("stories260K").string(), "--dst-path", ws.string()});
  const fs::path weights = ws / "triton_models" / "weights";
  WorkspaceConfig c = read_workspace_config(weights);
  c.engine.cache_block_seq_len = 32;
  c.engine.quant_policy = 4;
  c.engine.session_len = 200;
  write_workspace_config(weights, c);
  std::ostringstream log;
  auto rt = load_runtime(ws.string(), cpu_options(), log);
  CHECK(rt->engine_config.block_len == 32);
  CHECK(rt->engine_config.quant_bits == 4);
  CHECK(rt->engine_config.session_len == 200);
  rt.reset();
  cli::EngineOptions flags = cpu_options();
  flags.cache_block_seq_len = 16;
  flags.quant_policy = 8;
  flags.chat_template = "llama2";
  flags.given = {"cache-block-seq-len", "quant-policy", "chat-template"};
  rt = load_runtime(ws.string(), flags, log);
  CHECK(rt->engine_config.block_len == 16);
  CHECK(rt->engine_config.quant_bits == 8);
  CHECK(rt->chat_template->name() == "llama2");
  rt.reset();
  // A flag given at lmd's own default still overrides the workspace.
  flags = cpu_options();
  flags.given = {"quant-policy"};
  rt = load_runtime(ws.string(), flags, log);
  CHECK(rt->engine_config.quant_bits == 0);
  CHECK(rt->engine_config.block_len == 32);
  fs::remove_all(ws);
}

TEST_CASE("workspace: quantized KV pool holds more tokens in the same memory", "[workspace][kv]") {
  LMD_REQUIRE_ASSETS();
  // A small budget so the CPU's per-batch cap does not decide the block count.
  cli::EngineOptions o = cpu_options();
  o.cache_max_entry_count = 1e-3;
  o.max_batch_size = 100000;
  std::array<int, 3> blocks{};
  const int policies[3] = {0, 8, 4};
  for (int i = 0; i < 3; ++i) {
    o.quant_policy = policies[i];
    std::ostringstream log;
    auto rt = load_runtime(test::model_dir("wt2-llama-22m").string(), o, log);
    blocks[i] = rt->engine_config.num_blocks;
    if (policies[i]) CHECK(log.str().find("the same memory holds") != std::string::npos);
  }
  // head_dim 64, float32 cache on the CPU: int8 rows take 64 + 4 bytes for 256, int4 32 + 4.
  const double r8 = double(blocks[1]) / blocks[0], r4 = double(blocks[2]) / blocks[0];
  WARN("blocks at the same --cache-max-entry-count: float " << blocks[0] << ", int8 " << blocks[1] << " ("
                                                            << r8 << "x), int4 " << blocks[2] << " (" << r4
                                                            << "x)");
  if (blocks[0] >= 20) {  // enough blocks for the ratio to show through free-memory noise
    CHECK(r8 > 3.0);
    CHECK(r4 > 5.5);
  }
}

TEST_CASE("workspace: broken workspaces give errors naming the file", "[workspace]") {
  LMD_REQUIRE_ASSETS();
  const fs::path ws = scratch("broken"), weights = ws / "triton_models" / "weights";
  const fs::path hf = test::model_dir("stories260K");
  convert({"base", hf.string(), "--dst-path", ws.string()});
  std::ostringstream log;
  const cli::EngineOptions o = cpu_options();

  const std::string w2 = "layers.1.feed_forward.w2.0.weight";
  fs::rename(weights / w2, ws / "moved");
  CHECK_ERROR(Error, load_runtime(ws.string(), o, log), w2, "is missing", "lmd convert");
  fs::rename(ws / "moved", weights / w2);

  fs::resize_file(weights / w2, fs::file_size(weights / w2) - 100);
  CHECK_ERROR(Error, load_runtime(ws.string(), o, log), w2);

  fs::copy_file(weights / "layers.1.feed_forward.w1.0.weight", weights / w2,
                fs::copy_options::overwrite_existing);
  CHECK_ERROR(Error, load_runtime(ws.string(), o, log), w2, "expected shape");

  const std::string ini = read_file(weights / "config.ini");
  std::string cut = ini;
  cut.erase(cut.find("inter_size"), cut.find('\n', cut.find("inter_size")) - cut.find("inter_size") + 1);
  write_file(weights / "config.ini", cut);
  CHECK_ERROR(Error, load_runtime(ws.string(), o, log), "config.ini", "missing field 'inter_size'");

  convert({"base", hf.string(), "--dst-path", ws.string()});  // a workspace is replaced whole
  std::string stat = ini;
  stat.replace(stat.find("static_kv_int8 = 0"), 18, "static_kv_int8 = 1");
  write_file(weights / "config.ini", stat);
  CHECK_ERROR(Error, load_runtime(ws.string(), o, log), "static_kv_int8 = 1",
              "layers.0.past_kv_scale.0.weight", "kv_qparams");

  const fs::path other = scratch("not_a_workspace");
  fs::create_directories(other);
  write_file(other / "keep.txt", "user data");
  CHECK_ERROR(Error, convert({"base", hf.string(), "--dst-path", other.string()}), "is not an lmd workspace");
  CHECK(fs::exists(other / "keep.txt"));
  CHECK_ERROR(Error, convert({"gpt2", hf.string(), "--dst-path", ws.string()}), "'gpt2'");
  fs::remove_all(other);
  fs::remove_all(ws);
}

TEST_CASE("workspace: lmd binary end to end: convert, chat, calibrate, kv_qparams", "[workspace][e2e]") {
  LMD_REQUIRE_ASSETS();
  const std::string input = "Once upon a time\nexit\n";
  const std::string chat = " --device cpu --threads 2 --temperature 0 --max-new-tokens 24";
  std::string err;
  for (const auto& [model, name] :
       {std::pair{"stories260K", "base"}, {"stories260K-internlm2", "internlm2"}}) {
    const fs::path hf = test::model_dir(model), ws = scratch(std::string("e2e_") + model);
    run_lmd("convert " + std::string(name) + " " + hf.string() + " --dst-path " + ws.string(), err);
    const std::string expected = run_lmd("chat " + hf.string() + chat, err, input);
    CHECK(expected.size() > 10);
    CHECK(run_lmd("chat " + ws.string() + chat, err, input) == expected);
    fs::remove_all(ws);
  }

  // Online KV quantization on chat, with the start-up report.
  const fs::path hf = test::model_dir("stories260K");
  run_lmd("chat " + hf.string() + chat + " --quant-policy 8", err, input);
  CHECK(err.find("(int8 KV)") != std::string::npos);
  CHECK(err.find("the same memory holds") != std::string::npos);
  run_lmd("chat " + hf.string() + chat + " --quant-policy 4", err, input);
  CHECK(err.find("(int4 KV)") != std::string::npos);

  // The older offline flow: calibrate, kv_qparams (both CLI spellings), chat on the workspace.
  const fs::path ws = scratch("e2e_kv"), work = scratch("e2e_work");
  run_lmd(
      "convert internlm2 " + test::model_dir("stories260K-internlm2").string() + " --dst-path " + ws.string(),
      err);
  run_lmd("lite calibrate " + test::model_dir("stories260K-internlm2").string() +
              " --calib-dataset ptb --calib-samples 2 --calib-seqlen 128 --work_dir " + work.string() +
              " --dataset-dir " + (test::assets_dir() / "datasets").string() + " --device cpu --threads 2",
          err);
  CHECK(err.find("window 2/2") != std::string::npos);
  CHECK(fs::exists(work / "calib_stats.safetensors"));
  run_lmd("lite kv_qparams --work_dir " + work.string() + " --turbomind_dir " +
              (ws / "triton_models" / "weights").string() + " --kv_sym False --num-tp 1",
          err);
  run_lmd("lite kv_qparams " + work.string() + " " + ws.string() + " --kv-bits 8 --kv-sym false", err);
  CHECK(err.find("static KV int8") != std::string::npos);
  CHECK(read_file(ws / "triton_models" / "weights" / "config.ini").find("static_kv_int8 = 1") !=
        std::string::npos);
  const std::string reply = run_lmd("chat " + ws.string() + chat, err, input);
  CHECK(err.find("static int8 KV") != std::string::npos);
  CHECK(reply.size() > 10);
  fs::remove_all(ws);
  fs::remove_all(work);
}
