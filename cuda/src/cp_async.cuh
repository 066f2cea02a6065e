// Asynchronous global -> shared copies (cp.async, sm_80+), which the prefill attention and the streaming
// int4 GEMV use to keep loads in flight without holding their data in registers. Each copy and wait is
// also a compiler barrier for memory, so that ordinary accesses to the shared buffers stay on their side.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace lmd::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }
// 16 bytes global -> shared, bypassing L1; `bytes` 0 writes zeros without reading `src`.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
// 16 bytes global -> shared where `pred` holds (no branch around it: the copy is predicated).
__device__ __forceinline__ void cp_async16_if(bool pred, uint32_t dst, const void* src) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %0, 0;\n @p cp.async.cg.shared.global [%1], [%2], 16;\n}\n" ::"r"(
          int(pred)),
      "r"(dst), "l"(src)
      : "memory");
}
// 8 bytes global -> shared (through L1: the .cg form copies 16 bytes only).
__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src) : "memory");
}
// Closes the group of copies issued since the last commit (possibly none).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight; the copies of the others
// are then visible to this thread (to others only after a barrier).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace lmd::cuda
