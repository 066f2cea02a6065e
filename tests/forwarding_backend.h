// A Backend that hands every op to another one, for test backends that change one or two behaviours
// (how they present themselves, what a download returns) and keep the rest real.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "lmd/engine/backend.h"

namespace lmd::test {

class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(Backend& inner) : inner_(inner) {}

  DeviceKind kind() const override { return inner_.kind(); }
  std::string name() const override { return inner_.name(); }
  DType activation_dtype(DType weight_dtype) const override { return inner_.activation_dtype(weight_dtype); }
  DeviceTensor alloc(DType dtype, Shape shape) override { return inner_.alloc(dtype, std::move(shape)); }
  DeviceTensor upload(const HostTensor& host, DType dtype) override { return inner_.upload(host, dtype); }
  // download_into keeps Backend's default (through download), so that a subclass's download holds for both.
  HostTensor download(const DeviceTensor& t) override { return inner_.download(t); }
  DeviceLinear prepare_linear(const LinearWeight& w, DType compute) override {
    return inner_.prepare_linear(w, compute);
  }
  KvCacheStorage alloc_kv_cache(const KvCacheLayout& layout, DType compute) override {
    return inner_.alloc_kv_cache(layout, compute);
  }
  size_t free_memory() const override { return inner_.free_memory(); }
  void synchronize() override { inner_.synchronize(); }
  void embedding(const DeviceTensor& table, const std::vector<int>& ids, DeviceTensor& out) override {
    inner_.embedding(table, ids, out);
  }
  void rmsnorm(const DeviceTensor& x, const DeviceTensor& weight, float eps, DeviceTensor& out) override {
    inner_.rmsnorm(x, weight, eps, out);
  }
  void add_rmsnorm(DeviceTensor& residual, const DeviceTensor& x, const DeviceTensor& weight, float eps,
                   DeviceTensor& out) override {
    inner_.add_rmsnorm(residual, x, weight, eps, out);
  }
  void linear(const DeviceTensor& x, const DeviceLinear& w, DeviceTensor& out) override {
    inner_.linear(x, w, out);
  }
  void rope_kv_write(DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                     const RopeConfig& rope, KvCacheStorage& cache) override {
    inner_.rope_kv_write(qkv, batch, layer, heads, rope, cache);
  }
  void attention(const DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                 const KvCacheStorage& cache, DeviceTensor& out) override {
    inner_.attention(qkv, batch, layer, heads, cache, out);
  }
  void silu_mul(const DeviceTensor& gate_up, DeviceTensor& out) override { inner_.silu_mul(gate_up, out); }
  void gather_rows(const DeviceTensor& x, const std::vector<int>& rows, DeviceTensor& out) override {
    inner_.gather_rows(x, rows, out);
  }
  void greedy(const DeviceTensor& logits, DeviceTensor& out) override { inner_.greedy(logits, out); }
  void sample(const DeviceTensor& logits, const std::vector<SampleRow>& rows, DeviceTensor& out) override {
    inner_.sample(logits, rows, out);
  }

 protected:
  Backend& inner_;
};

}  // namespace lmd::test
