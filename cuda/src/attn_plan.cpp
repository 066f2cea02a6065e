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
                        int sms, int graph_stride, bool wide_decode) {
  if (heads % g.kv_heads != 0) fail("CUDA attention: ", heads, " heads over ", g.kv_heads, " KV heads");
  const int group = heads / g.kv_heads, max_rows = attn_max_rows(g.head_dim);
  const int head_chunk = std::min(group, max_rows), tokens_per_item = std::max(1, max_rows / head_chunk);
  constexpr int kMinKeysPerSplit = 128;  // 4-warp blocks: 4 rounds of 8 keys a warp
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
  const int64_t num_decode_items =
      std::count_if(items.begin(), items.end(), [](const Item& it) { return it.token_count == 1; });
  const bool decode_v2 = attn_decode_v2(elem_bytes, g);
  // A batch whose one-token items x KV heads leave SMs idle (batch 1 to a few sequences) runs the decode
  // kernel in blocks of kAttnDecodeWideWarps warps: a 128-key context is then one block per KV head that
  // merges its warps in shared memory, where 4-warp blocks needed several splits merged through global
  // memory (a fence, an arrival counter and a re-read of the partial slots on the critical path). Such
  // blocks are split until there is about one per SM, and only past kWideKeysPerSplit keys (so that an
  // unsplit item takes each warp at most two rounds of loads).
  plan.decode_warps = wide_decode && decode_v2 && num_decode_items * g.kv_heads < sms ? kAttnDecodeWideWarps
                                                                                      : kAttnDecodeWarps;
  const bool wide = plan.decode_warps == kAttnDecodeWideWarps;
  constexpr int kWideKeysPerSplit = 256, kWideChunk = 128;
  const int want_wide = int(std::max<int64_t>(1, sms / base_blocks));

  // A graph step keeps the grid and the metadata sizes of its shape: every item gets the same splits
  // (`want`, but no more than the 32-key chunks, or wide chunks, that the most keys its stride of blocks
  // holds make; splits past the context are empty and merge as nothing), and block lists are padded to
  // the stride. (With `want` at any context, a 128-token InternLM2-1.8B decode ran 264 attention blocks a
  // layer, 224 of them empty, each still taking part in its merge.)
  const bool graph = graph_stride > 0;
  const int capacity = graph_stride * g.block_len;
  std::vector<int> block_off(seqs.size());
  for (size_t s = 0; s < seqs.size(); ++s) {
    block_off[s] = int(plan.blocks.size());
    const std::vector<int> list = graph ? padded_blocks(seqs[s].blocks, graph_stride) : seqs[s].blocks;
    plan.blocks.insert(plan.blocks.end(), list.begin(), list.end());
  }
  for (const Item& it : items) {
    const SeqSlice& q = seqs[it.seq];
    const bool wide_item = wide && it.token_count == 1;
    const int unit = wide_item ? kWideChunk : 32;  // splits are cut in multiples of this many keys
    int splits = 1;
    if (!it.whole && graph) {
      splits = wide_item ? std::clamp((capacity + kWideKeysPerSplit - 1) / kWideKeysPerSplit, 1, want_wide)
                         : std::clamp((capacity + 31) / 32, 1, want);
    } else if (!it.whole) {
      splits = wide_item ? std::clamp((it.kv_len + kWideKeysPerSplit - 1) / kWideKeysPerSplit, 1, want_wide)
                         : std::clamp((it.kv_len + kMinKeysPerSplit - 1) / kMinKeysPerSplit, 1, want);
    }
    const int chunk = ((it.kv_len + splits - 1) / splits + unit - 1) / unit * unit;
    if (!graph) splits = (it.kv_len + chunk - 1) / chunk;
    // A wide graph item whose keys all fall in its first split is written by that split alone, as an
    // unsplit item: its other splits are empty and do nothing. Its merge and partial slots stay reserved
    // for the graph's later steps. (4-warp items keep the plan they were measured with.)
    const bool direct = wide_item && splits > 1 && chunk >= it.kv_len;
    const bool own_slot = splits > 1 && !direct;
    const int first_pos = q.context_len + (it.token_begin - q.token_offset),
              combine = int(plan.combine.size());
    if (splits > 1)
      plan.combine.push_back(
          {it.token_begin, it.token_count, it.head_begin, it.head_count, plan.partials, splits});
    for (int s = 0; s < splits; ++s)
      plan.work.push_back({it.token_begin, it.token_count, it.head_begin, it.head_count, first_pos,
                           block_off[it.seq], std::min(it.kv_len, s * chunk),
                           std::min(it.kv_len, (s + 1) * chunk), own_slot ? plan.partials + s : -1,
                           own_slot ? combine : -1});
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
