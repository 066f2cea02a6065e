// How CudaBackend::attention cuts a batch into work items for the attention kernels, kept apart from the
// backend so that the standalone check (tools/attn_prefill_check.cu) runs exactly the backend's items.
#pragma once
#include <vector>

#include "kernels.h"
#include "lmd/engine/backend.h"

namespace lmd::cuda {

struct AttnPlan {
  std::vector<AttnWork> work;        // the num_decode one-token items first, then the multi-token ones
  std::vector<AttnCombine> combine;  // the num_decode_combine merges of one-token items first
  std::vector<int> blocks;           // the sequences' block lists, concatenated (AttnWork::block_off)
  int num_decode = 0;
  int num_decode_combine = 0;
  int decode_rows = 1;                  // the most rows of a one-token item
  int decode_warps = kAttnDecodeWarps;  // warps of a decode_kernel block
  int partials = 0;                     // split-K partial-result slots
};

// `sms`: multiprocessors of the device (long cache ranges are split until the grid fills them).
// `graph_stride` > 0 plans a graph step (decode only): every item gets the same number of splits (as
// many as fill the device, or as many 32-key chunks, or 256-key ones for wide decode blocks, as
// `graph_stride` blocks hold if fewer) and block lists are padded to `graph_stride` entries, so that the
// metadata keeps its sizes between steps.
// `wide_decode` lets batches whose items leave SMs idle run 16-warp decode blocks (off: 4 warps always,
// the backend's default; CudaBackend::set_wide_decode_attention).
AttnPlan plan_attention(const std::vector<SeqSlice>& seqs, int heads, int elem_bytes, const KvGeometry& g,
                        int sms, int graph_stride, bool wide_decode = false);

// Arrival counters (attn_counter_ints) that a plan for a device of `sms` multiprocessors needs at most:
// items are split only while the grid has fewer than two blocks per multiprocessor.
int64_t attn_max_counter_ints(int sms);

// A sequence's block list padded to `stride` entries with its last block.
std::vector<int> padded_blocks(const std::vector<int>& blocks, int stride);

}  // namespace lmd::cuda
