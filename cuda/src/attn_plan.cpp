#include "attn_plan.h"

#include <algorithm>

#include "lmd/core/error.h"

namespace lmd::cuda {

int64_t attn_max_counter_ints(int sms) {
  // Merges x KV heads < 2 sms (see `want` in plan_attention), a counter per row of a merge.
  return int64_t(2) * sms * kAttnMaxRows;
}

std::vector<int> padded_blocks(const std::vector<int>& blocks, int stride) {
  std::vector<int> out(blocks);
  out.resize(std::max<size_t>(stride, blocks.size()), blocks.empty() ? 0 : blocks.back());
  return out;
}

AttnPlan plan_attention(const std::vector<SeqSlice>& seqs, int heads, int elem_bytes, const KvGeometry& g,
                        int sms, int graph_stride) {
  if (heads % g.kv_heads != 0) fail("CUDA attention: ", heads, " heads over ", g.kv_heads, " KV heads");
  const int group = heads / g.kv_heads, max_rows = attn_max_rows(g.head_dim);
  const int head_chunk = std::min(group, max_rows), tokens_per_item = std::max(1, max_rows / head_chunk);
  constexpr int kMinKeysPerSplit = 128;  // 4 warps x one 32-key tile each
  // Multi-token items of the tensor-core prefill kernel hold the whole group's heads for up to
  // kAttnPrefillRows / group tokens, and are never split: a prompt has enough of them to fill the grid.
  // A sequence's tokens are spread evenly over its items, so that none is left with a sliver of rows.
  const bool prefill_v3 = graph_stride == 0 && attn_prefill_v3(elem_bytes, g, heads);
  const int prefill_tokens = kAttnPrefillRows / group;

  struct Item {
    int seq, token_begin, token_count, head_begin, head_count, kv_len;
    bool whole;  // never split
  };
  std::vector<Item> items;
  for (int s = 0; s < int(seqs.size()); ++s) {
    const SeqSlice& q = seqs[s];
    if (prefill_v3 && q.num_new > 1) {
      const int n = (q.num_new + prefill_tokens - 1) / prefill_tokens;
      for (int i = 0; i < n; ++i) {
        const int begin = q.num_new * i / n, end = q.num_new * (i + 1) / n;
        items.push_back({s, q.token_offset + begin, end - begin, 0, group, q.context_len + end, true});
      }
      continue;
    }
    for (int t = 0; t < q.num_new; t += tokens_per_item)
      for (int h = 0; h < group; h += head_chunk) {
        const int count = std::min(tokens_per_item, q.num_new - t);
        items.push_back({s, q.token_offset + t, count, h, std::min(head_chunk, group - h),
                         q.context_len + t + count, false});
      }
  }
  // One-token items first, and so their merges: they run the decode kernel, which merges its own splits;
  // the rest run the general or prefill kernel.
  std::stable_partition(items.begin(), items.end(), [](const Item& it) { return it.token_count == 1; });
  AttnPlan plan;
  if (items.empty()) return plan;
  // Split long cache ranges until the grid holds about two blocks per SM (decode needs this; prefill
  // usually has enough items already). Items are split only while items x KV heads < 2 sms, which bounds
  // the merges' arrival counters (attn_max_counter_ints).
  const int64_t base_blocks = int64_t(items.size()) * g.kv_heads;
  const int want = int(std::max<int64_t>(1, (2 * sms + base_blocks - 1) / base_blocks));

  // A graph step keeps the grid and the metadata sizes of its shape: every item gets `want` splits, but
  // no more than the 32-key chunks that the most keys its stride of blocks holds make (splits past the
  // context are empty and merge as nothing; those past that many never hold a key while the graph
  // serves), and block lists are padded to the stride. Splits are cut in multiples of 32 keys, so the
  // ones holding keys are the same either way. (With `want` at any context, a 128-token InternLM2-1.8B
  // decode ran 264 attention blocks a layer, 224 of them empty, each still taking part in its merge.)
  const bool graph = graph_stride > 0;
  const int graph_splits = std::clamp((graph_stride * g.block_len + 31) / 32, 1, want);
  std::vector<int> block_off(seqs.size());
  for (size_t s = 0; s < seqs.size(); ++s) {
    block_off[s] = int(plan.blocks.size());
    const std::vector<int> list = graph ? padded_blocks(seqs[s].blocks, graph_stride) : seqs[s].blocks;
    plan.blocks.insert(plan.blocks.end(), list.begin(), list.end());
  }
  for (const Item& it : items) {
    const SeqSlice& q = seqs[it.seq];
    int splits = it.whole ? 1
                 : graph  ? graph_splits
                          : std::clamp((it.kv_len + kMinKeysPerSplit - 1) / kMinKeysPerSplit, 1, want);
    const int chunk = ((it.kv_len + splits - 1) / splits + 31) / 32 * 32;
    if (!graph) splits = (it.kv_len + chunk - 1) / chunk;
    const int first_pos = q.context_len + (it.token_begin - q.token_offset),
              combine = int(plan.combine.size());
    if (splits > 1)
      plan.combine.push_back(
          {it.token_begin, it.token_count, it.head_begin, it.head_count, plan.partials, splits});
    for (int s = 0; s < splits; ++s)
      plan.work.push_back({it.token_begin, it.token_count, it.head_begin, it.head_count, first_pos,
                           block_off[it.seq], std::min(it.kv_len, s * chunk),
                           std::min(it.kv_len, (s + 1) * chunk), splits > 1 ? plan.partials + s : -1,
                           splits > 1 ? combine : -1});
    if (splits > 1) plan.partials += splits;
    if (it.token_count == 1) {
      plan.num_decode = int(plan.work.size());
      plan.num_decode_combine = int(plan.combine.size());
      plan.decode_rows = std::max(plan.decode_rows, it.head_count);
    }
  }
  // Prefill items by decreasing cache range: a causal item's cost grows with its position, so the
  // longest start first and the grid's last wave is made of short ones.
  if (prefill_v3)
    std::stable_sort(
        plan.work.begin() + plan.num_decode, plan.work.end(),
        [](const AttnWork& a, const AttnWork& b) { return a.kv_end - a.kv_begin > b.kv_end - b.kv_begin; });
  return plan;
}

}  // namespace lmd::cuda
