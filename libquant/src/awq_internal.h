// Helpers shared by the awq*.cpp files, not part of the library's interface.
#pragma once
#include <vector>

#include "lmd/core/checkpoint.h"
#include "lmd/quant/awq.h"

namespace lmd::awq_detail {

// The concatenation of linears' outputs as one dense fp32 linear (q|k|v, gate|up), the layout the
// backend's fused ops (rope_kv_write, silu_mul) expect; a missing bias among biased parts is zeros.
LinearWeight fused_dense(const std::vector<const FloatLinear*>& parts);

}  // namespace lmd::awq_detail
