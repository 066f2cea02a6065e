#include "lmd/engine/backend.h"

namespace lmd {

void Backend::add_rmsnorm_linear(DeviceTensor& residual, const DeviceTensor& x, const DeviceTensor& weight,
                                 float eps, const DeviceLinear& w, DeviceTensor& normed, DeviceTensor& out) {
  add_rmsnorm(residual, x, weight, eps, normed);
  linear(normed, w, out);
}

void Backend::silu_mul_linear(const DeviceTensor& gate_up, const DeviceLinear& w, DeviceTensor& act,
                              DeviceTensor& out) {
  silu_mul(gate_up, act);
  linear(act, w, out);
}

void Backend::rope_kv_attention(DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                                const RopeConfig& rope, KvCacheStorage& cache, DeviceTensor& out) {
  rope_kv_write(qkv, batch, layer, heads, rope, cache);
  attention(qkv, batch, layer, heads, cache, out);
}

}  // namespace lmd
