// Helpers shared by the awq*.cpp files, not part of the library's interface.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "lmd/core/checkpoint.h"
#include "lmd/engine/thread_pool.h"
#include "lmd/quant/awq.h"

namespace lmd::awq_detail {

// The concatenation of linears' outputs as one dense fp32 linear (q|k|v, gate|up), the layout the
// backend's fused ops (rope_kv_write, silu_mul) expect; a missing bias among biased parts is zeros.
LinearWeight fused_dense(const std::vector<const FloatLinear*>& parts);

// fn(begin, end) over disjoint chunks of [0, n): on `pool`'s threads, or on this thread when null.
inline void for_chunks(ThreadPool* pool, int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (pool) {
    pool->parallel_for(n, fn);
  } else if (n > 0) {
    fn(0, n);
  }
}

// Elements [begin, begin + count) of a float tensor (fp32, fp16, bf16) as fp32 into `out`.
void copy_as_f32(const HostTensor& t, int64_t begin, int64_t count, float* out);
// fp32 copy of a float tensor (fp32, fp16, bf16), converted on `pool`'s threads.
std::vector<float> to_f32(const HostTensor& t, ThreadPool* pool);

}  // namespace lmd::awq_detail
