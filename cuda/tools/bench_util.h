// Shared by the CUDA micro-benchmarks: CUDA-event timing, the device-to-device copy bandwidth they are
// measured against (and the read-only bandwidth beside it), and random int4 (AWQ) linears.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <functional>
#include <random>
#include <vector>

#include "lmd/core/checkpoint.h"
#include "lmd/core/error.h"
#include "lmd/core/random_checkpoint.h"
#include "lmd/engine/backend.h"

namespace lmd::bench {

#define LMD_BENCH_CHECK(call)                                       \
  do {                                                              \
    const cudaError_t e = (call);                                   \
    if (e != cudaSuccess) fail(#call, ": ", cudaGetErrorString(e)); \
  } while (0)

// Median milliseconds of `reps` runs of `fn` on `stream`, after `warmup` runs.
inline double median_ms(cudaStream_t stream, int warmup, int reps, const std::function<void()>& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  cudaEvent_t start, stop;
  LMD_BENCH_CHECK(cudaEventCreate(&start));
  LMD_BENCH_CHECK(cudaEventCreate(&stop));
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    LMD_BENCH_CHECK(cudaEventRecord(start, stream));
    fn();
    LMD_BENCH_CHECK(cudaEventRecord(stop, stream));
    LMD_BENCH_CHECK(cudaEventSynchronize(stop));
    float t = 0;
    LMD_BENCH_CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Device-to-device copy of 2 GiB each way: {milliseconds, GB/s counting bytes read plus bytes written}.
inline std::pair<double, double> copy_bandwidth(Backend& be, cudaStream_t stream) {
  DeviceTensor src = be.alloc(DType::U8, {int64_t(2) << 30}), dst = be.alloc(DType::U8, {int64_t(2) << 30});
  LMD_BENCH_CHECK(cudaMemsetAsync(src.data, 1, src.nbytes(), stream));
  const double ms = median_ms(stream, 3, 20, [&] {
    LMD_BENCH_CHECK(cudaMemcpyAsync(dst.data, src.data, src.nbytes(), cudaMemcpyDeviceToDevice, stream));
  });
  return {ms, 2.0 * double(src.nbytes()) / ms / 1e6};
}

// Reads every 16-byte word of data[0, bytes) once on `stream` (read_bandwidth.cu), folding them into *out.
cudaError_t read_all(const void* data, int64_t bytes, unsigned* out, cudaStream_t stream);

// Reading 2 GiB once: {milliseconds, GB/s of bytes read}. A GEMV only reads its weights, and reads alone
// may stream faster than a copy's mix of reads and writes: the headroom a GEMV at some fraction of the
// copy rate still has.
inline std::pair<double, double> read_bandwidth(Backend& be, cudaStream_t stream) {
  DeviceTensor src = be.alloc(DType::U8, {int64_t(2) << 30}), out = be.alloc(DType::I32, {1});
  LMD_BENCH_CHECK(cudaMemsetAsync(src.data, 1, src.nbytes(), stream));
  const double ms = median_ms(stream, 3, 20, [&] {
    LMD_BENCH_CHECK(read_all(src.data, int64_t(src.nbytes()), static_cast<unsigned*>(out.data), stream));
  });
  return {ms, double(src.nbytes()) / ms / 1e6};
}

// Bytes of an AWQ linear as the checkpoint stores them: 4-bit codes, 4-bit zeros, fp16 scales.
inline double awq_bytes(int64_t in, int64_t out, int group) {
  return double(in) * out / 2 + double(in / group) * out * 2.5;
}

}  // namespace lmd::bench
