// The auto_awq driver: calibration activations through the model one decoder layer at a time, smoothing,
// int4 quantization, and an AutoAWQ "gemm" checkpoint written to a temporary folder renamed when complete.
#include "lmd/quant/awq.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "awq_internal.h"
#include "lmd/core/error.h"
#include "lmd/core/safetensors.h"
#include "lmd/core/tokenizer.h"
#include "lmd/quant/calib_data.h"

namespace lmd {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// "VmRSS" or "VmHWM" (peak) of this process from /proc, in GiB; 0 where /proc is absent.
double proc_gib(const std::string& field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stod(line.substr(field.size() + 1)) / (1024.0 * 1024.0);
  }
  return 0;
}

// InternLM2's wqkv rows, grouped per KV head (BRIEF §3): for each group, its query heads, then its key
// head, then its value head. Applied to weights ([out, in] rows) and biases alike.
FloatLinear fuse_grouped_qkv(const FloatLinear& q, const FloatLinear& k, const FloatLinear& v,
                             const ModelSpec& spec) {
  const int64_t hd = spec.head_dim, per_group = spec.heads / spec.kv_heads;
  FloatLinear f;
  f.in = q.in;
  f.out = q.out + k.out + v.out;
  auto append = [&](const FloatLinear& src, int64_t first_row, int64_t rows) {
    f.weight.insert(f.weight.end(), src.weight.begin() + first_row * f.in,
                    src.weight.begin() + (first_row + rows) * f.in);
    if (!src.bias.empty())
      f.bias.insert(f.bias.end(), src.bias.begin() + first_row, src.bias.begin() + first_row + rows);
  };
  for (int64_t g = 0; g < spec.kv_heads; ++g) {
    append(q, g * per_group * hd, per_group * hd);
    append(k, g * hd, hd);
    append(v, g * hd, hd);
  }
  return f;
}

struct NamedLinear {
  std::string name;  // module path, without ".qweight"
  FloatLinear weight;
};

std::string layer_prefix(int index) { return "model.layers." + std::to_string(index) + "."; }

// The decoder linears under the names the architecture's checkpoints use.
std::vector<NamedLinear> checkpoint_linears(const ModelSpec& spec, int index, const FloatLayer& L) {
  const std::string p = layer_prefix(index);
  if (spec.arch == Arch::InternLM2) {
    return {{p + "attention.wqkv", fuse_grouped_qkv(L.q, L.k, L.v, spec)},
            {p + "attention.wo", L.o},
            {p + "feed_forward.w1", L.gate},
            {p + "feed_forward.w3", L.up},
            {p + "feed_forward.w2", L.down}};
  }
  return {{p + "self_attn.q_proj", L.q}, {p + "self_attn.k_proj", L.k}, {p + "self_attn.v_proj", L.v},
          {p + "self_attn.o_proj", L.o}, {p + "mlp.gate_proj", L.gate}, {p + "mlp.up_proj", L.up},
          {p + "mlp.down_proj", L.down}};
}

// Collects tensors and writes a safetensors shard whenever the next tensor would pass the size limit, so
// that only one shard's worth of output is held in memory. Shards get their final names (model.safetensors,
// or model-0000N-of-0000M.safetensors plus the index) once the count is known.
class ShardWriter {
 public:
  ShardWriter(fs::path dir, size_t limit) : dir_(std::move(dir)), limit_(limit) {}

  // Seconds spent writing files so far (the rest of the driver's time is compute).
  double write_seconds() const { return write_s_; }

  void add(const std::string& name, HostTensor t) {
    if (!pending_.empty() && pending_bytes_ + t.nbytes() > limit_) flush();
    pending_bytes_ += t.nbytes();
    total_bytes_ += t.nbytes();
    shard_of_[name] = int(shards_);
    pending_.emplace_back(name, std::move(t));
  }

  // Returns the number of shards written.
  int finish() {
    flush();
    const int n = int(shards_);
    if (n == 1) {
      fs::rename(temp_name(0), dir_ / "model.safetensors");
      return n;
    }
    char buf[64];
    std::vector<std::string> final_names;
    for (int i = 0; i < n; ++i) {
      std::snprintf(buf, sizeof buf, "model-%05d-of-%05d.safetensors", i + 1, n);
      final_names.push_back(buf);
      fs::rename(temp_name(i), dir_ / buf);
    }
    nlohmann::ordered_json index;
    index["metadata"]["total_size"] = total_bytes_;
    for (const auto& [name, shard] : shard_of_) index["weight_map"][name] = final_names[shard];
    std::ofstream(dir_ / "model.safetensors.index.json") << index.dump(2) << "\n";
    return n;
  }

  size_t total_bytes() const { return total_bytes_; }

 private:
  fs::path temp_name(int shard) const { return dir_ / ("shard-" + std::to_string(shard) + ".safetensors"); }

  void flush() {
    if (pending_.empty()) return;
    const Clock::time_point t0 = Clock::now();
    // transformers refuses safetensors files whose metadata does not name the framework.
    write_safetensors(temp_name(int(shards_)), pending_, {{"format", "pt"}});
    write_s_ += seconds_since(t0);
    ++shards_;
    pending_.clear();
    pending_bytes_ = 0;
  }

  fs::path dir_;
  size_t limit_;
  std::vector<std::pair<std::string, HostTensor>> pending_;
  size_t pending_bytes_ = 0, total_bytes_ = 0, shards_ = 0;
  double write_s_ = 0;
  std::map<std::string, int> shard_of_;
};

// A 16-bit tensor as fp16, converted on `pool`'s threads (the embeddings and lm_head are the largest
// tensors of a small model).
HostTensor to_f16(const HostTensor& t, ThreadPool& pool) {
  if (t.dtype() == DType::F16) return t;
  HostTensor out(DType::F16, t.shape());
  auto* bits = out.mutable_data_as<uint16_t>();
  constexpr int64_t kChunk = 4096;
  const int64_t n = t.numel();
  pool.parallel_for((n + kChunk - 1) / kChunk, [&](int64_t first, int64_t last) {
    std::vector<float> values(kChunk);
    for (int64_t begin = first * kChunk; begin < std::min(n, last * kChunk); begin += kChunk) {
      const int64_t count = std::min(kChunk, n - begin);
      awq_detail::copy_as_f32(t, begin, count, values.data());
      for (int64_t i = 0; i < count; ++i) bits[begin + i] = f32_to_f16(values[i]);
    }
  });
  return out;
}

void write_linear(ShardWriter& out, const NamedLinear& l, int group, ThreadPool& pool) {
  Int4Linear q = quantize_int4(l.weight, group, l.name, &pool);
  out.add(l.name + ".qweight", std::move(q.qweight));
  out.add(l.name + ".qzeros", std::move(q.qzeros));
  out.add(l.name + ".scales", std::move(q.scales));
  if (!l.weight.bias.empty())
    out.add(l.name + ".bias", HostTensor::from_f32(l.weight.bias, {l.weight.out}, DType::F16));
}

// config.json with every original field kept, the AWQ quantization_config added and 16-bit fp16 declared.
void write_config(const fs::path& model_dir, const fs::path& out_dir, int group) {
  const fs::path src = model_dir / "config.json";
  std::ifstream in(src);
  nlohmann::ordered_json config;
  try {
    config = nlohmann::ordered_json::parse(in);
  } catch (const std::exception& e) {
    fail(src.string(), ": not valid JSON (", e.what(), ")");
  }
  config["torch_dtype"] = "float16";
  if (config.contains("dtype")) config["dtype"] = "float16";  // the newer transformers spelling
  config["quantization_config"] = {
      {"quant_method", "awq"}, {"version", "gemm"}, {"bits", 4}, {"group_size", group}, {"zero_point", true}};
  std::ofstream(out_dir / "config.json") << config.dump(2) << "\n";
}

// The tokenizer, generation settings and any remote-code modules (InternLM2), so the output folder is a
// complete checkpoint for lmd and for transformers alike.
void copy_side_files(const fs::path& model_dir, const fs::path& out_dir) {
  static const char* const kFiles[] = {"tokenizer.model",       "tokenizer.json",
                                       "tokenizer_config.json", "special_tokens_map.json",
                                       "added_tokens.json",     "generation_config.json"};
  for (const char* name : kFiles) {
    if (fs::is_regular_file(model_dir / name)) fs::copy_file(model_dir / name, out_dir / name);
  }
  for (const auto& entry : fs::directory_iterator(model_dir)) {
    if (entry.is_regular_file() && entry.path().extension() == ".py")
      fs::copy_file(entry.path(), out_dir / entry.path().filename());
  }
}

void check_options(const AwqOptions& o) {
  if (o.w_bits != 4) fail("--w-bits ", o.w_bits, ": only 4-bit weights are supported");
  if (o.w_group_size <= 0) fail("--w-group-size must be positive, got ", o.w_group_size);
  if (o.batch_size <= 0) fail("--batch-size must be positive, got ", o.batch_size);
  if (o.smooth && (o.calib_samples <= 0 || o.calib_seqlen <= 0))
    fail("--calib-samples and --calib-seqlen must be positive, got ", o.calib_samples, " and ",
         o.calib_seqlen);
  if (!fs::is_directory(o.model_dir))
    fail("model path '", o.model_dir.string(),
         "' is not a directory (expected a Hugging Face checkpoint folder)");
}

// The output folder without a trailing separator, refusing one that already holds files.
fs::path output_dir(const fs::path& work_dir) {
  fs::path out = fs::absolute(work_dir).lexically_normal();
  if (out.filename().empty()) out = out.parent_path();
  if (fs::exists(out) && !(fs::is_directory(out) && fs::is_empty(out)))
    fail("--work-dir ", work_dir.string(),
         " already exists and is not empty; remove it or choose another folder");
  return out;
}

// Removes the temporary output folder unless the run completed.
struct TempDir {
  fs::path path;
  bool keep = false;
  ~TempDir() {
    std::error_code ec;
    if (!keep) fs::remove_all(path, ec);
  }
};

// Keep the calibration activations on the backend when they take at most this share of its free memory;
// the rest is for one layer's weights, a step's temporaries and the search's copies.
constexpr double kResidentShare = 0.5;

// Each calibration window's tokens looked up in the embedding table, `batch_size` windows per step.
CalibActivations calibration_inputs(const AwqOptions& o, const ModelSpec& spec, const HostTensor& embed,
                                    Backend& backend, std::ostream& log) {
  const Clock::time_point t0 = Clock::now();
  const Tokenizer tok = Tokenizer::load(o.model_dir);
  const fs::path file = dataset_file(o.calib_dataset, "train", o.dataset_dir);
  const std::vector<int> tokens = tok.encode(load_dataset_text(file), true, /*parse_special=*/false);
  const auto windows = sample_calibration_windows(tokens, o.calib_samples, o.calib_seqlen);
  const DType act = backend.activation_dtype(spec.dtype);
  const double bytes = double(o.calib_samples) * o.calib_seqlen * spec.hidden * dtype_size(act);
  CalibActivations hidden(backend, act, bytes <= kResidentShare * double(backend.free_memory()));
  const size_t row_bytes = size_t(spec.hidden) * dtype_size(embed.dtype());
  const auto* table = static_cast<const char*>(embed.data());
  for (size_t w0 = 0; w0 < windows.size(); w0 += size_t(o.batch_size)) {
    const size_t nw = std::min(windows.size() - w0, size_t(o.batch_size));
    // Rows copied in the table's dtype; the upload converts them to the activation dtype.
    HostTensor step(embed.dtype(), {int64_t(nw) * o.calib_seqlen, spec.hidden});
    auto* out = static_cast<char*>(step.mutable_data());
    for (size_t w = 0; w < nw; ++w) {
      for (int id : windows[w0 + w]) {
        if (id < 0 || id >= spec.vocab)
          fail("calibration token id ", id, " is outside the model's vocabulary");
        std::memcpy(out, table + size_t(id) * row_bytes, row_bytes);
        out += row_bytes;
      }
    }
    hidden.add_step(std::move(step));
  }
  log << "lmd: calibration: " << o.calib_samples << " x " << o.calib_seqlen << " tokens of " << file.string()
      << " (" << tokens.size() << " tokens in all), activations kept "
      << (hidden.on_device() ? "on the device" : "on the host (too large for device memory)") << ", "
      << seconds_since(t0) << " s\n";
  return hidden;
}

}  // namespace

void auto_awq(const AwqOptions& o, Backend& backend, std::ostream& log) {
  const Clock::time_point start = Clock::now();
  check_options(o);
  const ModelSpec spec = load_model_spec(o.model_dir);
  if (spec.awq.enabled)
    fail((o.model_dir / "config.json").string(),
         " already has an AWQ quantization_config; auto_awq needs 16-bit weights");
  const fs::path out_dir = output_dir(o.work_dir);
  const CheckpointWeights ckpt = load_checkpoint(o.model_dir, spec);
  ThreadPool pool(o.host_threads);

  // Every decoder layer has the same shapes: checking layer 0 rejects a bad --w-group-size before any work.
  for (const NamedLinear& l : checkpoint_linears(spec, 0, to_float_layer(ckpt.layers[0], &pool)))
    quantize_int4(l.weight, o.w_group_size, l.name, &pool);

  TempDir tmp{out_dir.parent_path() / (out_dir.filename().string() + ".tmp-" + std::to_string(getpid()))};
  fs::remove_all(tmp.path);
  fs::create_directories(tmp.path);
  ShardWriter writer(tmp.path, o.shard_bytes);
  const bool internlm2 = spec.arch == Arch::InternLM2;
  writer.add(internlm2 ? "model.tok_embeddings.weight" : "model.embed_tokens.weight",
             to_f16(ckpt.embed, pool));

  std::optional<CalibActivations> hidden;
  int64_t row_stride = 0;
  if (o.smooth) {
    hidden.emplace(calibration_inputs(o, spec, ckpt.embed, backend, log));
    if (o.search_scale) {
      const int64_t total = int64_t(o.calib_samples) * o.calib_seqlen;
      row_stride =
          std::max<int64_t>(1, (total + o.search_tokens - 1) / std::max<int64_t>(o.search_tokens, 1));
    }
  }

  for (int l = 0; l < spec.layers; ++l) {
    const Clock::time_point t0 = Clock::now();
    FloatLayer layer = to_float_layer(ckpt.layers[l], &pool);
    const double convert_s = seconds_since(t0);
    std::ostringstream detail;
    double calib_s = 0, smooth_s = 0;
    if (o.smooth) {
      const Clock::time_point t_calib = Clock::now();
      LayerInputs inputs;
      run_float_layer(backend, spec, layer, o.calib_seqlen, *hidden, &inputs, row_stride, &pool);
      calib_s = seconds_since(t_calib);
      const Clock::time_point t1 = Clock::now();
      // All scales come from the unsmoothed layer, then all are folded in (the pairs share weights).
      const std::vector<SmoothPair> pairs = smooth_pairs(spec, layer, inputs);
      std::vector<std::vector<float>> scales;
      for (const SmoothPair& pair : pairs) {
        if (o.search_scale) {
          ScaleSearch found = search_scales(backend, pair, o.w_group_size, &pool);
          detail << (scales.empty() ? "; ratios " : ", ") << pair.name << " " << found.ratio;
          scales.push_back(std::move(found.scales));
        } else {
          scales.push_back(default_scales(pair, o.w_group_size));
        }
      }
      for (size_t i = 0; i < pairs.size(); ++i) apply_smoothing(pairs[i], scales[i], &pool);
      smooth_s = seconds_since(t1);
    }
    const Clock::time_point t2 = Clock::now();
    const double written_s = writer.write_seconds();
    const std::string p = layer_prefix(l);
    writer.add(p + (internlm2 ? "attention_norm.weight" : "input_layernorm.weight"),
               HostTensor::from_f32(layer.attn_norm, {spec.hidden}, DType::F16));
    writer.add(p + (internlm2 ? "ffn_norm.weight" : "post_attention_layernorm.weight"),
               HostTensor::from_f32(layer.ffn_norm, {spec.hidden}, DType::F16));
    for (const NamedLinear& lin : checkpoint_linears(spec, l, layer))
      write_linear(writer, lin, o.w_group_size, pool);
    const double write_s = writer.write_seconds() - written_s;
    char buf[240];
    std::snprintf(
        buf, sizeof buf,
        "lmd: layer %d/%d: %.2f s (convert %.2f s, calibrate %.2f s, smooth %.2f s, quantize %.2f s, "
        "write %.2f s), RSS %.2f GiB, peak %.2f GiB",
        l + 1, spec.layers, seconds_since(t0), convert_s, calib_s, smooth_s, seconds_since(t2) - write_s,
        write_s, proc_gib("VmRSS"), proc_gib("VmHWM"));
    log << buf << detail.str() << "\n" << std::flush;
  }

  writer.add("model.norm.weight", ckpt.final_norm.to(DType::F16));
  if (!spec.tie_embeddings)
    writer.add(internlm2 ? "output.weight" : "lm_head.weight", to_f16(ckpt.lm_head, pool));
  const int shards = writer.finish();
  write_config(o.model_dir, tmp.path, o.w_group_size);
  copy_side_files(o.model_dir, tmp.path);
  if (fs::exists(out_dir)) fs::remove(out_dir);  // an empty folder (output_dir refused anything else)
  fs::rename(tmp.path, out_dir);
  tmp.keep = true;
  log << "lmd: wrote " << out_dir.string() << ": " << shards << " safetensors file"
      << (shards == 1 ? "" : "s") << ", " << std::fixed << std::setprecision(1)
      << double(writer.total_bytes()) / (1024.0 * 1024.0) << " MiB, in " << seconds_since(start) << " s\n"
      << std::defaultfloat;
}

}  // namespace lmd
