// auto_awq end to end on CPU: wt2-llama-22m quantized with a small ptb calibration, read back with a
// safetensors reader written here, loaded by the engine, and compared by WikiText-2 perplexity with the
// fp16 model and with plain round-to-nearest int4; then the real `lmd` binary once, as users type it.
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <tuple>

#include "expect_error.h"
#include "lmd/core/checkpoint.h"
#include "lmd/core/error.h"
#include "lmd/core/safetensors.h"
#include "lmd/core/tensor_store.h"
#include "lmd/core/tokenizer.h"
#include "lmd/engine/cpu_backend.h"
#include "lmd/engine/model.h"
#include "lmd/quant/awq.h"
#include "lmd/quant/perplexity.h"
#include "test_support.h"

namespace {

namespace fs = std::filesystem;

struct ScratchDir {
  fs::path path;
  explicit ScratchDir(const std::string& name)
      : path(fs::temp_directory_path() / ("lmd-test-" + name + "-" + std::to_string(getpid()))) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

// The first `bytes` of a file (cut at a line end), so that tests tokenize a little text, not megabytes.
std::string head_of(const fs::path& file, size_t bytes) {
  std::ifstream in(file, std::ios::binary);
  std::string text(bytes, '\0');
  in.read(text.data(), std::streamsize(bytes));
  text.resize(size_t(in.gcount()));
  return text.substr(0, text.rfind('\n') + 1);
}

std::string file_bytes(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// A safetensors header parsed here from the bytes, independently of lmd's reader.
struct RawTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};
std::map<std::string, RawTensor> read_safetensors(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  uint64_t header_len = 0;
  in.read(reinterpret_cast<char*>(&header_len), 8);
  std::string header(header_len, '\0');
  in.read(header.data(), std::streamsize(header_len));
  const std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::map<std::string, RawTensor> out;
  const nlohmann::json json = nlohmann::json::parse(header);
  for (auto it = json.begin(); it != json.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const auto offsets = it->at("data_offsets").get<std::vector<size_t>>();
    out[it.key()] = {it->at("dtype").get<std::string>(), it->at("shape").get<std::vector<int64_t>>(),
                     data.substr(offsets[0], offsets[1] - offsets[0])};
  }
  return out;
}

template <class T>
T element(const RawTensor& t, int64_t index) {
  T v;
  std::memcpy(&v, t.bytes.data() + index * sizeof(T), sizeof(T));
  return v;
}

// Every tensor of a checkpoint folder, whether one file or shards.
std::map<std::string, RawTensor> read_checkpoint(const fs::path& dir) {
  std::map<std::string, RawTensor> all;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() == ".safetensors") all.merge(read_safetensors(entry.path()));
  }
  return all;
}

double ppl(const fs::path& model_dir, const std::vector<int>& ids, int windows) {
  lmd::CpuBackend be(2);
  std::unique_ptr<lmd::Model> model = lmd::Model::load(model_dir, be);
  return lmd::perplexity(*model, ids, 512, windows).perplexity;
}

std::string run_command(const std::string& command, int& status) {
  std::string out;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) out.append(buf, n);
  status = pclose(pipe);
  return out;
}

}  // namespace

TEST_CASE("auto_awq on wt2-llama-22m keeps perplexity within 3% of fp16 and beats round-to-nearest",
          "[awq][e2e]") {
  LMD_REQUIRE_ASSETS();
  const fs::path model = lmd::test::model_dir("wt2-llama-22m");
  const fs::path datasets = lmd::test::assets_dir() / "datasets";
  ScratchDir scratch("awq-e2e");
  // 16 x 256 tokens sampled from the first 400 kB of ptb.train.txt (tokenizing all 5 MB takes longer
  // than the quantization itself on a small CI machine).
  const fs::path calib = scratch.path / "ptb-head.txt";
  std::ofstream(calib) << head_of(datasets / "ptb" / "ptb.train.txt", 400000);

  lmd::CpuBackend be(2);
  std::ostringstream log;
  lmd::AwqOptions awq;
  awq.model_dir = model;
  awq.work_dir = scratch.path / "awq";
  awq.calib_dataset = calib.string();
  awq.calib_samples = 16;
  awq.calib_seqlen = 256;
  awq.batch_size = 4;
  awq.host_threads = 3;
  lmd::auto_awq(awq, be, log);
  INFO(log.str());
  CHECK(log.str().find("layer 6/6") != std::string::npos);

  // The host work split among threads writes the same bytes as one thread does.
  lmd::AwqOptions serial = awq;
  serial.host_threads = 1;
  serial.work_dir = scratch.path / "serial";
  lmd::auto_awq(serial, be, log);
  CHECK(file_bytes(serial.work_dir / "model.safetensors") == file_bytes(awq.work_dir / "model.safetensors"));

  // The ratio search judged on 512 of the 4096 calibration tokens, to keep the test short.
  lmd::AwqOptions search = awq;
  search.search_scale = true;
  search.search_tokens = 512;
  search.work_dir = scratch.path / "search";
  lmd::auto_awq(search, be, log);
  CHECK(log.str().find("ratios input norm -> q,k,v") != std::string::npos);

  lmd::AwqOptions rtn = awq;
  rtn.smooth = false;
  rtn.work_dir = scratch.path / "rtn";
  rtn.shard_bytes = 8 << 20;  // forces shards and an index
  lmd::auto_awq(rtn, be, log);

  // The files, read back without lmd's reader.
  REQUIRE(fs::is_regular_file(awq.work_dir / "model.safetensors"));
  CHECK(fs::is_regular_file(awq.work_dir / "tokenizer.model"));
  CHECK(!fs::exists(scratch.path / ("awq.tmp-" + std::to_string(getpid()))));
  REQUIRE(fs::is_regular_file(rtn.work_dir / "model.safetensors.index.json"));
  std::ifstream index_file(rtn.work_dir / "model.safetensors.index.json");
  const nlohmann::json index = nlohmann::json::parse(index_file);
  std::set<std::string> shards;
  for (const auto& file : index.at("weight_map")) shards.insert(file.get<std::string>());
  CHECK(shards.size() > 1);
  for (const std::string& shard : shards) CHECK(fs::is_regular_file(rtn.work_dir / shard));
  std::ifstream config_file(awq.work_dir / "config.json");
  const nlohmann::json config = nlohmann::json::parse(config_file);
  CHECK(config.at("quantization_config") ==
        nlohmann::json::parse(R"({"quant_method": "awq", "version": "gemm",
      "bits": 4, "group_size": 128, "zero_point": true})"));
  CHECK(config.at("torch_dtype") == "float16");
  CHECK(config.at("rope_parameters").at("rope_theta") == 10000.0);  // original fields kept

  const auto tensors = read_checkpoint(awq.work_dir);
  const RawTensor& qw = tensors.at("model.layers.0.self_attn.k_proj.qweight");
  CHECK(qw.dtype == "I32");
  CHECK(qw.shape == std::vector<int64_t>{384, 128 / 8});
  CHECK(tensors.at("model.layers.0.self_attn.k_proj.qzeros").shape == std::vector<int64_t>{3, 16});
  CHECK(tensors.at("model.layers.5.mlp.down_proj.scales").dtype == "F16");
  CHECK(tensors.at("model.layers.5.mlp.down_proj.scales").shape == std::vector<int64_t>{8, 384});
  CHECK(tensors.at("model.embed_tokens.weight").dtype == "F16");
  CHECK(tensors.at("model.layers.3.post_attention_layernorm.weight").dtype == "F16");
  CHECK(tensors.count("lm_head.weight") == 0);  // tied
  CHECK(tensors.count("model.layers.0.self_attn.k_proj.weight") == 0);
  CHECK(tensors.size() == 2 + 6 * (2 + 7 * 3));

  // Round-to-nearest leaves the weights unsmoothed: its int4 values decode to the original fp16 weights
  // within half a step (gemm nibble order 0,2,4,6,1,3,5,7 decoded here from the description).
  const auto rtn_tensors = read_checkpoint(rtn.work_dir);
  const auto original = read_checkpoint(model);
  const RawTensor& w = original.at("model.layers.2.mlp.up_proj.weight");  // fp16 [1024, 384]
  const RawTensor& q = rtn_tensors.at("model.layers.2.mlp.up_proj.qweight");
  const RawTensor& z = rtn_tensors.at("model.layers.2.mlp.up_proj.qzeros");
  const RawTensor& s = rtn_tensors.at("model.layers.2.mlp.up_proj.scales");
  const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  auto nibble = [&](const RawTensor& t, int64_t row, int64_t col) {
    const uint32_t word = element<uint32_t>(t, row * (1024 / 8) + col / 8);
    const int slot = int(std::find(order, order + 8, int(col % 8)) - order);
    return int((word >> (4 * slot)) & 15u);
  };
  int bad = 0;
  for (int64_t o = 0; o < 1024; o += 7) {
    for (int64_t i = 0; i < 384; ++i) {
      const float scale = lmd::f16_to_f32(element<uint16_t>(s, (i / 128) * 1024 + o));
      const float value = float(nibble(q, i, o) - nibble(z, i / 128, o)) * scale;
      const float expected = lmd::f16_to_f32(element<uint16_t>(w, o * 384 + i));
      bad += std::fabs(value - expected) > scale / 2 * 1.0001f;
    }
  }
  CHECK(bad == 0);

  // Perplexity over the first windows of wiki.valid.raw, tokenized with BOS as reference.json describes.
  const lmd::Tokenizer tok = lmd::Tokenizer::load(model);
  const std::vector<int> ids =
      tok.encode(head_of(datasets / "wikitext-2-raw" / "wiki.valid.raw", 60000), true, false);
  const int windows = 6;
  REQUIRE(ids.size() >= size_t(windows) * 512);
  const double fp16 = ppl(model, ids, windows), awq_ppl = ppl(awq.work_dir, ids, windows),
               search_ppl = ppl(search.work_dir, ids, windows), rtn_ppl = ppl(rtn.work_dir, ids, windows);
  WARN("wikitext2 valid, " << windows << " windows of 512: fp16 " << fp16 << ", awq " << awq_ppl
                           << ", awq with search " << search_ppl << ", rtn " << rtn_ppl);
  CHECK(awq_ppl < fp16 * 1.03);
  CHECK(awq_ppl <= rtn_ppl);
  CHECK(search_ppl < fp16 * 1.03);
  CHECK(search_ppl <= rtn_ppl);
}

TEST_CASE("auto_awq refuses bad flags before doing any work", "[awq]") {
  LMD_REQUIRE_ASSETS();
  lmd::CpuBackend be(1);
  std::ostringstream log;
  ScratchDir scratch("awq-errors");
  lmd::AwqOptions o;
  o.model_dir = lmd::test::model_dir("stories260K");  // hidden 64, intermediate 172
  o.work_dir = scratch.path / "out";
  CHECK_ERROR(lmd::Error, lmd::auto_awq(o, be, log), "--w-group-size 128", "model.layers.0.self_attn.q_proj",
              "64 input features");
  o.w_group_size = 32;
  CHECK_ERROR(lmd::Error, lmd::auto_awq(o, be, log), "model.layers.0.mlp.gate_proj", "172 output features");
  o.w_bits = 8;
  CHECK_ERROR(lmd::Error, lmd::auto_awq(o, be, log), "--w-bits 8");
  o.w_bits = 4;
  o.model_dir = lmd::test::model_dir("wt2-llama-22m");
  o.work_dir = scratch.path;
  std::ofstream(scratch.path / "keep.txt") << "x";
  CHECK_ERROR(lmd::Error, lmd::auto_awq(o, be, log), "--work-dir", "not empty");
  o.work_dir = scratch.path / "out";
  o.calib_dataset = "nosuchset";
  CHECK_ERROR(lmd::Error, lmd::auto_awq(o, be, log), "nosuchset");
  CHECK(!fs::exists(o.work_dir));
  CHECK(std::distance(fs::directory_iterator(scratch.path), fs::directory_iterator()) == 1);  // no temp left
}

TEST_CASE("lmd lite auto_awq with LMDeploy's spellings, then lmd chat and lmd bench ppl on the output",
          "[awq][e2e]") {
  LMD_REQUIRE_ASSETS();
  const fs::path model = lmd::test::model_dir("wt2-llama-22m");
  const fs::path datasets = lmd::test::assets_dir() / "datasets";
  ScratchDir scratch("awq-cli");
  const fs::path text = scratch.path / "calib.txt", out = scratch.path / "quantized";
  std::ofstream(text) << head_of(datasets / "ptb" / "ptb.train.txt", 40000);
  int status = 0;
  const std::string bin = LMD_BINARY;
  std::string output = run_command(bin + " lite auto_awq --model " + model.string() + " --calib_dataset \"" +
                                       text.string() + "\" --calib_samples 2 --calib_seqlen 128 --w_bits 4" +
                                       " --w_group_size 128 --batch_size 2 --search-scale False --work_dir " +
                                       out.string() + " --device cpu",
                                   status);
  INFO(output);
  REQUIRE(status == 0);
  CHECK(output.find("layer 6/6") != std::string::npos);

  output = run_command(
      "printf 'The history of the city\\nexit\\n' | " + bin + " chat " + out.string() +
          " --model-format awq --temperature 0 --max-new-tokens 8 --session-len 256 --max-batch-size 1",
      status);
  INFO(output);
  CHECK(status == 0);
  CHECK(output.find("awq int4") != std::string::npos);

  output = run_command(bin + " bench ppl " + out.string() + " --dataset " + text.string() +
                           " --seqlen 128 --max-windows 2 --quant-policy 8",
                       status);
  INFO(output);
  CHECK(status == 0);
  CHECK(output.find("perplexity") != std::string::npos);
  CHECK(output.find("2 windows of 128") != std::string::npos);
}

namespace {

// wt2-llama-22m re-saved in InternLM2's layout: grouped wqkv (per KV head: its query heads, its key
// head, its value head), w1/w3/w2, attention_norm/ffn_norm, tok_embeddings.
void write_internlm2_copy(const fs::path& llama, const fs::path& out) {
  const lmd::ModelSpec spec = lmd::load_model_spec(llama);
  const auto store = lmd::open_tensor_store(llama);
  std::vector<std::pair<std::string, lmd::HostTensor>> tensors;
  tensors.emplace_back("model.tok_embeddings.weight", store->get("model.embed_tokens.weight"));
  tensors.emplace_back("model.norm.weight", store->get("model.norm.weight"));
  const int64_t hd = spec.head_dim, per_group = spec.heads / spec.kv_heads, row_bytes = spec.hidden * 2;
  for (int l = 0; l < spec.layers; ++l) {
    const std::string src = "model.layers." + std::to_string(l) + ".", dst = src;
    const lmd::HostTensor q = store->get(src + "self_attn.q_proj.weight"),
                          k = store->get(src + "self_attn.k_proj.weight"),
                          v = store->get(src + "self_attn.v_proj.weight");
    lmd::HostTensor wqkv(lmd::DType::F16, {q.dim(0) + k.dim(0) + v.dim(0), spec.hidden});
    char* at = wqkv.mutable_data_as<char>();
    for (int64_t g = 0; g < spec.kv_heads; ++g) {
      for (const auto& [t, rows, first] : {std::tuple{&q, per_group * hd, g * per_group * hd},
                                           std::tuple{&k, hd, g * hd}, std::tuple{&v, hd, g * hd}}) {
        std::memcpy(at, t->data_as<char>() + first * row_bytes, rows * row_bytes);
        at += rows * row_bytes;
      }
    }
    tensors.emplace_back(dst + "attention.wqkv.weight", wqkv);
    tensors.emplace_back(dst + "attention.wo.weight", store->get(src + "self_attn.o_proj.weight"));
    tensors.emplace_back(dst + "feed_forward.w1.weight", store->get(src + "mlp.gate_proj.weight"));
    tensors.emplace_back(dst + "feed_forward.w3.weight", store->get(src + "mlp.up_proj.weight"));
    tensors.emplace_back(dst + "feed_forward.w2.weight", store->get(src + "mlp.down_proj.weight"));
    tensors.emplace_back(dst + "attention_norm.weight", store->get(src + "input_layernorm.weight"));
    tensors.emplace_back(dst + "ffn_norm.weight", store->get(src + "post_attention_layernorm.weight"));
  }
  fs::create_directories(out);
  lmd::write_safetensors(out / "model.safetensors", tensors, {{"format", "pt"}});
  std::ifstream config_in(llama / "config.json");
  nlohmann::json config = nlohmann::json::parse(config_in);
  config["model_type"] = "internlm2";
  config["architectures"] = {"InternLM2ForCausalLM"};
  config["bias"] = false;
  std::ofstream(out / "config.json") << config.dump(2);
  fs::copy_file(llama / "tokenizer.model", out / "tokenizer.model");
}

bool same_bytes(const lmd::HostTensor& a, const lmd::HostTensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

}  // namespace

TEST_CASE("auto_awq writes InternLM2's grouped wqkv so that it loads as the Llama layout does", "[awq]") {
  LMD_REQUIRE_ASSETS();
  const fs::path llama = lmd::test::model_dir("wt2-llama-22m");
  ScratchDir scratch("awq-internlm2");
  const fs::path internlm2 = scratch.path / "internlm2";
  write_internlm2_copy(llama, internlm2);
  const fs::path calib = scratch.path / "calib.txt";
  std::ofstream(calib) << head_of(lmd::test::assets_dir() / "datasets" / "ptb" / "ptb.train.txt", 40000);

  lmd::CpuBackend be(2);
  std::ostringstream log;
  lmd::AwqOptions o;
  o.calib_dataset = calib.string();
  o.calib_samples = 2;
  o.calib_seqlen = 128;
  o.model_dir = llama;
  o.work_dir = scratch.path / "llama-awq";
  lmd::auto_awq(o, be, log);
  o.model_dir = internlm2;
  o.work_dir = scratch.path / "internlm2-awq";
  lmd::auto_awq(o, be, log);

  const lmd::ModelSpec a_spec = lmd::load_model_spec(scratch.path / "llama-awq");
  const lmd::ModelSpec b_spec = lmd::load_model_spec(scratch.path / "internlm2-awq");
  REQUIRE(b_spec.arch == lmd::Arch::InternLM2);
  REQUIRE(b_spec.awq.enabled);
  const lmd::CheckpointWeights a = lmd::load_checkpoint(scratch.path / "llama-awq", a_spec);
  const lmd::CheckpointWeights b = lmd::load_checkpoint(scratch.path / "internlm2-awq", b_spec);
  for (int l = 0; l < a_spec.layers; ++l) {
    INFO("layer " << l);
    const lmd::LayerWeights &x = a.layers[l], &y = b.layers[l];
    CHECK(same_bytes(x.attn_norm, y.attn_norm));
    CHECK(same_bytes(x.ffn_norm, y.ffn_norm));
    for (const auto member :
         {&lmd::LayerWeights::q, &lmd::LayerWeights::k, &lmd::LayerWeights::v, &lmd::LayerWeights::o,
          &lmd::LayerWeights::gate, &lmd::LayerWeights::up, &lmd::LayerWeights::down}) {
      CHECK(same_bytes((x.*member).qweight, (y.*member).qweight));
      CHECK(same_bytes((x.*member).qzeros, (y.*member).qzeros));
      CHECK(same_bytes((x.*member).scales, (y.*member).scales));
    }
  }
}
