// The CPU reference backend: plain C++, fp32 activations and accumulation, weights kept in their
// checkpoint dtype (converted row by row as they are used), a small thread pool. Every CUDA kernel is
// tested against it.
#pragma once
#include <memory>

#include "lmd/engine/backend.h"
#include "lmd/engine/thread_pool.h"

namespace lmd {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads = 0);

  DeviceKind kind() const override { return DeviceKind::CPU; }
  std::string name() const override;
  DType activation_dtype(DType) const override { return DType::F32; }

  DeviceTensor alloc(DType dtype, Shape shape) override;
  DeviceTensor upload(const HostTensor& host, DType dtype) override;
  HostTensor download(const DeviceTensor& t) override;
  void download_into(const DeviceTensor& t, HostTensor& dst) override;
  DeviceLinear prepare_linear(const LinearWeight& w, DType compute) override;
  KvCacheStorage alloc_kv_cache(const KvCacheLayout& layout, DType compute) override;
  size_t free_memory() const override;

  void embedding(const DeviceTensor& table, const std::vector<int>& ids, DeviceTensor& out) override;
  void rmsnorm(const DeviceTensor& x, const DeviceTensor& weight, float eps, DeviceTensor& out) override;
  void add_rmsnorm(DeviceTensor& residual, const DeviceTensor& x, const DeviceTensor& weight, float eps,
                   DeviceTensor& out) override;
  void linear(const DeviceTensor& x, const DeviceLinear& w, DeviceTensor& out) override;
  void rope_kv_write(DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                     const RopeConfig& rope, KvCacheStorage& cache) override;
  void attention(const DeviceTensor& qkv, const BatchLayout& batch, int layer, int heads,
                 const KvCacheStorage& cache, DeviceTensor& out) override;
  void silu_mul(const DeviceTensor& gate_up, DeviceTensor& out) override;
  void gather_rows(const DeviceTensor& x, const std::vector<int>& rows, DeviceTensor& out) override;
  void greedy(const DeviceTensor& logits, DeviceTensor& out) override;
  void sample(const DeviceTensor& logits, const std::vector<SampleRow>& rows, DeviceTensor& out) override;

 private:
  ThreadPool pool_;
};

}  // namespace lmd
