// Programmatic dependent launch (Hopper): a kernel launched with launch_chained may be scheduled while
// the kernel before it on the stream is still running, so the gap between two kernels of a decode step
// (launch, ramp-up, tail) overlaps instead of adding up. A 7B decode step is ~290 kernels, where
// those gaps are a tenth of the step. The contract, for every kernel launched this way:
//   - it calls chain_wait() before it reads anything an earlier kernel wrote, or writes anything an
//     earlier kernel may still read (the weights, never written during a step, may be read before);
//   - it calls chain_release() once all of its blocks have started, so that the next kernel can launch.
// chain_wait() returns when the previous kernel has completed and its writes are visible; since that
// kernel waited for its own predecessor in the same way, completion is ordered along the whole stream.
#pragma once
#include <cuda_runtime.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <string_view>
#include <tuple>
#include <utility>

#include "cuda_check.h"

namespace lmd::cuda {

__device__ __forceinline__ void chain_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void chain_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether the device runs programmatic dependent launches (compute capability 9.0 and later).
inline bool chained_launch_supported() {
  static const bool supported = [] {
    int device = 0, major = 0;
    LMD_CUDA_CHECK(cudaGetDevice(&device));
    LMD_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    return major >= 9;
  }();
  return supported;
}

// Whether launches chain: on Hopper, unless LMD_CHAINED_LAUNCH=0. Measured on an H100 (docs/benchmarks.md,
// third session), chaining every decode-step kernel made the W4A16 Llama-2-7B decode graph 5% faster
// (2.777 -> 2.639 ms), the eager fp16 step 4% faster and the fp16 graph no slower (5.437 -> 5.420 ms).
// In the second session, with a different attention and int4 GEMV, the fp16 graph was 2% slower chained.
inline bool chained() {
  static const bool enabled = [] {
    const char* env = std::getenv("LMD_CHAINED_LAUNCH");
    return chained_launch_supported() && !(env != nullptr && std::string_view(env) == "0");
  }();
  return enabled;
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch when chained().
template <class... Params, class... Args>
void launch_chained(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                    Args&&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = chained() ? 1 : 0;
  LMD_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(std::forward<Args>(args))...));
}

// Blocks of `kernel` (`threads` threads, `smem` bytes of dynamic shared memory) resident per SM of the
// current device: the grid of a persistent kernel. Beyond the default 48 KB a kernel's dynamic shared
// memory needs an opt-in, which is set once per kernel and device to the most the device allows, so that
// no launch lowers another's limit. Cached: the answers are fixed.
template <class... Params>
int resident_blocks(void (*kernel)(Params...), int threads, size_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, size_t>, int> known;
  static std::set<std::pair<const void*, int>> opted_in;
  int device = 0;
  LMD_CUDA_CHECK(cudaGetDevice(&device));
  const void* fn = reinterpret_cast<const void*>(kernel);
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(fn, device, threads, smem);
  if (auto it = known.find(key); it != known.end()) return it->second;
  if (opted_in.insert({fn, device}).second) {
    int optin = 0;
    cudaFuncAttributes attr{};
    LMD_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    LMD_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    LMD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        optin - int(attr.sharedSizeBytes)));
  }
  int blocks = 0;
  LMD_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  if (blocks < 1)
    fail("a block of ", threads, " threads and ", smem, " bytes of shared memory does not fit an SM");
  return known[key] = blocks;
}

}  // namespace lmd::cuda
