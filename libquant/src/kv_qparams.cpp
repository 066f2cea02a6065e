#include "lmd/quant/kv_qparams.h"

#include <algorithm>
#include <cmath>

#include "lmd/core/error.h"
#include "lmd/core/workspace.h"

namespace lmd {

namespace fs = std::filesystem;

std::vector<std::vector<std::array<float, 4>>> compute_kv_qparams(const KvCalibration& s, int bits,
                                                                  bool symmetric, int num_tp) {
  if (bits != 8) fail("--kv-bits ", bits, ": the static KV cache stores int8; only --kv-bits 8 is supported");
  if (num_tp < 1 || s.kv_heads % num_tp != 0)
    fail("--num-tp ", num_tp, " must divide the model's ", s.kv_heads, " KV heads");
  const int heads_per_rank = s.kv_heads / num_tp;
  const int64_t span = int64_t(heads_per_rank) * s.head_dim;  // channels of one rank
  // A constant channel range would give scale 0 and divide by zero when quantizing.
  constexpr float kMinScale = 1e-8f;
  std::vector<std::vector<std::array<float, 4>>> params(num_tp);
  for (int r = 0; r < num_tp; ++r) {
    for (int l = 0; l < s.layers; ++l) {
      std::array<float, 4> p{};
      const std::vector<float>* mins[2] = {&s.k_min[l], &s.v_min[l]};
      const std::vector<float>* maxs[2] = {&s.k_max[l], &s.v_max[l]};
      const std::vector<float>* absmaxs[2] = {&s.k_absmax[l], &s.v_absmax[l]};
      for (int kv = 0; kv < 2; ++kv) {
        const auto begin = int64_t(r) * span, end = begin + span;
        const float lo = *std::min_element(mins[kv]->begin() + begin, mins[kv]->begin() + end);
        const float hi = *std::max_element(maxs[kv]->begin() + begin, maxs[kv]->begin() + end);
        const float absmax = *std::max_element(absmaxs[kv]->begin() + begin, absmaxs[kv]->begin() + end);
        if (symmetric) {
          p[2 * kv] = std::max(absmax / float((1 << (bits - 1)) - 1), kMinScale);
          p[2 * kv + 1] = 0.f;
        } else {
          p[2 * kv] = std::max((hi - lo) / float((1 << bits) - 1), kMinScale);
          p[2 * kv + 1] = (lo + hi) / 2;
        }
      }
      params[r].push_back(p);
    }
  }
  return params;
}

void export_kv_qparams(const fs::path& work_dir, const fs::path& workspace, int bits, bool symmetric,
                       int num_tp, std::ostream& log) {
  const std::optional<fs::path> weights = find_workspace_weights(workspace);
  if (!weights)
    fail("turbomind_dir ", workspace.string(),
         " is not a workspace (no config.ini in it, in triton_models/weights or in weights; create one with "
         "`lmd convert`)");
  WorkspaceConfig config = read_workspace_config(*weights);
  const KvCalibration stats = load_kv_calibration(work_dir);
  const ModelSpec& spec = config.spec;
  if (stats.layers != spec.layers || stats.kv_heads != spec.kv_heads || stats.head_dim != spec.head_dim)
    fail("the statistics in ", work_dir.string(), " (", stats.layers, " layers, ", stats.kv_heads,
         " KV heads, head_dim ", stats.head_dim, ") do not match the workspace ", weights->string(), " (",
         spec.layers, ", ", spec.kv_heads, ", ", spec.head_dim, "): calibrate the model that was converted");
  if (num_tp != config.tensor_para_size)
    fail("--num-tp ", num_tp, " does not match tensor_para_size ", config.tensor_para_size, " in ",
         (*weights / "config.ini").string());
  const auto params = compute_kv_qparams(stats, bits, symmetric, num_tp);
  for (int r = 0; r < num_tp; ++r)
    for (int l = 0; l < spec.layers; ++l) {
      const auto& p = params[r][l];
      write_workspace_tensor(*weights, kv_scale_tensor_name(l, r),
                             HostTensor::from_f32({p.begin(), p.end()}, {4}));
    }
  config.engine.static_kv_int8 = true;
  config.engine.quant_policy = 0;
  write_workspace_config(*weights, config);
  log << "lmd: wrote " << spec.layers * num_tp << " KV int8 parameter files ("
      << (symmetric ? "symmetric" : "asymmetric") << ", " << num_tp << " rank" << (num_tp > 1 ? "s" : "")
      << ") to " << weights->string() << "; config.ini now uses static KV int8\n";
  for (int l = 0; l < spec.layers; ++l) {
    const auto& p = params[0][l];
    log << "lmd:   layer " << l << ": k scale " << p[0] << " zero " << p[1] << ", v scale " << p[2]
        << " zero " << p[3] << "\n";
  }
}

}  // namespace lmd
