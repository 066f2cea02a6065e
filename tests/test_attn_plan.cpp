// How the CUDA backend cuts attention into work items (cuda/src/attn_plan.cpp): host code, so it is
// checked here without a GPU. Every one-token item's splits must cover its keys exactly once, a graph
// step's plan must keep its grid for every context its block stride can hold (a replay reuses it), and
// the merges must fit the arrival counters the backend reserves.
#include "test_support.h"

#if defined(LMD_HAVE_CUDA)
#include <algorithm>
#include <map>
#include <set>
#include <tuple>

#include "attn_plan.h"

using namespace lmd;
using namespace lmd::cuda;

namespace {

constexpr int kSms = 132;  // an H100's

// Decode steps of sequences with these cached contexts, each adding one token; blocks 0, 1, ... in order.
std::vector<SeqSlice> decode_seqs(const std::vector<int>& contexts, int block_len) {
  std::vector<SeqSlice> seqs;
  int next_block = 0;
  for (size_t s = 0; s < contexts.size(); ++s) {
    SeqSlice q{int(s), 1, contexts[s], {}};
    for (int b = 0; b * block_len < contexts[s] + 1; ++b) q.blocks.push_back(next_block++);
    seqs.push_back(q);
  }
  return seqs;
}

// Checks that every (token, head range) item's splits tile [0, context + 1) in order, that partial slots
// are distinct, that an item is either merged from partial slots or written by one split that holds all
// of its keys (any others empty), and that the merges fit the counters; returns the splits per item.
std::map<std::tuple<int, int>, int> check_cover(const AttnPlan& plan, const std::vector<SeqSlice>& seqs,
                                                const KvGeometry& g) {
  std::map<std::tuple<int, int>, int> next_key, splits, direct, merged;
  std::set<int> slots;
  REQUIRE(plan.num_decode == int(plan.work.size()));
  for (const AttnWork& w : plan.work) {
    INFO("token " << w.token_begin << " heads from " << w.head_begin);
    REQUIRE(w.token_count == 1);
    const SeqSlice* seq = nullptr;
    for (const SeqSlice& q : seqs)
      if (q.token_offset == w.token_begin) seq = &q;
    REQUIRE(seq != nullptr);
    CHECK(w.first_pos == seq->context_len);
    const auto key = std::make_tuple(w.token_begin, w.head_begin);
    CHECK(w.kv_begin == next_key[key]);  // in order, no gap, no overlap (empty splits at the end)
    CHECK(w.kv_end >= w.kv_begin);
    CHECK(w.kv_end <= seq->context_len + 1);
    next_key[key] = w.kv_end;
    ++splits[key];
    if (w.partial < 0 && w.kv_end > w.kv_begin) ++direct[key];
    if (w.partial < 0) CHECK(w.combine < 0);
    if (w.partial >= 0) {
      ++merged[key];
      CHECK(slots.insert(w.partial).second);
      CHECK(w.partial < plan.partials);
      CHECK(w.combine < plan.num_decode_combine);
    }
  }
  for (const auto& [key, n] : splits) {
    INFO("token " << std::get<0>(key) << " heads from " << std::get<1>(key) << ": " << n << " splits");
    CHECK(direct[key] + (merged[key] > 0 ? 1 : 0) == 1);
    if (merged[key] > 0) CHECK(merged[key] == n);
  }
  for (const auto& [key, end] : next_key) {
    const int token = std::get<0>(key);
    for (const SeqSlice& q : seqs)
      if (q.token_offset == token) CHECK(end == q.context_len + 1);
  }
  CHECK(attn_counter_ints(plan.num_decode_combine, g) <= attn_max_counter_ints(kSms));
  return splits;
}

}  // namespace

TEST_CASE("attention plans: splits cover every key once, and a graph step's grid holds for its stride") {
  struct Shape {
    int heads, kv_heads, head_dim, block_len;
  };
  // Llama-2-7B (MHA), InternLM2-1.8B (GQA 2, 64-token blocks), GQA 8 over one KV head; 4-warp decode
  // blocks always, then with wide blocks allowed: batches of up to 3 sequences run them on all three
  // shapes, the 8-sequence one 4-warp blocks on Llama-2-7B.
  std::vector<int> eight;
  for (int i = 0; i < 8; ++i) eight.push_back(i * 301 % 900);
  for (bool wide_decode : {false, true})
    for (const Shape& sh : {Shape{32, 32, 128, 16}, Shape{16, 8, 128, 64}, Shape{8, 1, 64, 32}}) {
      const KvGeometry g{2, sh.kv_heads, sh.head_dim, sh.block_len, 0, 0};
      for (const std::vector<int>& contexts :
           {std::vector<int>{0}, {127}, {128}, {700}, {4000}, {100, 37, 0}, {2000, 3}, eight}) {
        INFO((wide_decode ? "wide allowed, " : "") << sh.heads << "/" << sh.kv_heads << " heads, blocks of "
                                                   << sh.block_len << ", contexts from " << contexts[0]);
        const std::vector<SeqSlice> seqs = decode_seqs(contexts, sh.block_len);
        size_t max_blocks = 1;
        for (const SeqSlice& q : seqs) max_blocks = std::max(max_blocks, q.blocks.size());
        const int stride = int(std::bit_ceil(max_blocks));

        // Eager: every split holds keys.
        const AttnPlan eager = plan_attention(seqs, sh.heads, 2, g, kSms, 0, wide_decode);
        check_cover(eager, seqs, g);
        for (const AttnWork& w : eager.work) CHECK(w.kv_end > w.kv_begin);
        const bool wide = wide_decode && int(seqs.size()) * sh.kv_heads < kSms;
        CHECK(eager.decode_warps == (wide ? kAttnDecodeWideWarps : kAttnDecodeWarps));
        // Wide blocks: no split below 256 keys, and splits of whole 128-key rounds (bar the last).
        for (const AttnWork& w : eager.work) {
          if (!wide) continue;
          if (w.first_pos + 1 <= 256) CHECK(w.partial < 0);
          if (w.kv_end < w.first_pos + 1) CHECK((w.kv_end - w.kv_begin) % 128 == 0);
        }

        // Graph: the same work-item count at every context up to the stride's capacity, whose plans all
        // cover their keys; no more splits than 32-key chunks of that capacity, and the splits holding
        // keys cut as the device-filling count cuts them (32 keys each, once it is that large).
        const AttnPlan graph = plan_attention(seqs, sh.heads, 2, g, kSms, stride, wide_decode);
        CHECK(graph.decode_warps == eager.decode_warps);
        const auto splits = check_cover(graph, seqs, g);
        const int capacity = stride * sh.block_len;
        for (const auto& [key, n] : splits) CHECK(n <= (capacity + 31) / 32);
        for (const AttnWork& w : graph.work)
          if (w.kv_end > w.kv_begin && w.kv_end < w.first_pos + 1) CHECK((w.kv_end - w.kv_begin) % 32 == 0);
        std::vector<SeqSlice> grown = seqs;
        for (int step = 0; step < 3; ++step) {
          for (SeqSlice& q : grown) q.context_len = std::min(q.context_len + 37, capacity - 1);
          for (SeqSlice& q : grown)
            while (int(q.blocks.size()) * sh.block_len < q.context_len + 1)
              q.blocks.push_back(q.blocks.back() + 1);
          const AttnPlan later = plan_attention(grown, sh.heads, 2, g, kSms, stride, wide_decode);
          check_cover(later, grown, g);
          CHECK(later.work.size() == graph.work.size());
          CHECK(later.combine.size() == graph.combine.size());
          CHECK(later.blocks.size() == graph.blocks.size());
          CHECK(later.partials == graph.partials);
          CHECK(later.decode_warps == graph.decode_warps);
        }
      }
    }
}

TEST_CASE("attention plans: long contexts split until the grid fills the device") {
  // One Llama-2-7B sequence at 8000 tokens in a graph of 512 blocks of 16: its 32 KV heads leave SMs idle,
  // so it runs wide blocks, 4 splits of them to have about one a SM; InternLM2-1.8B's 8 KV heads take 16.
  const std::vector<SeqSlice> seqs = decode_seqs({8000}, 16);
  const KvGeometry llama{2, 32, 128, 16, 0, 0}, internlm2{2, 8, 128, 16, 0, 0};
  const AttnPlan llama_plan = plan_attention(seqs, 32, 2, llama, kSms, 512, true);
  CHECK(llama_plan.decode_warps == kAttnDecodeWideWarps);
  CHECK(llama_plan.work.size() == 4);
  CHECK(plan_attention(seqs, 16, 2, internlm2, kSms, 512, true).work.size() == 16);
  // Without wide blocks (the default), 4-warp blocks, 9 splits for the 2 a SM they aim at.
  const AttnPlan narrow = plan_attention(seqs, 32, 2, llama, kSms, 512);
  CHECK(narrow.decode_warps == kAttnDecodeWarps);
  CHECK(narrow.work.size() == 9);
  // Eight Llama-2-7B sequences (256 blocks a split) run 4-warp blocks, split to two blocks a SM (2 ways).
  const std::vector<SeqSlice> batch = decode_seqs(std::vector<int>(8, 8000), 16);
  const AttnPlan batch_plan = plan_attention(batch, 32, 2, llama, kSms, 512, true);
  CHECK(batch_plan.decode_warps == kAttnDecodeWarps);
  CHECK(batch_plan.work.size() == 8 * 2);
  // InternLM2-1.8B at 100 tokens, in a graph of 8 blocks of 16 (128 keys): one wide block a KV head,
  // unsplit, rather than 4 splits of 32 keys merged through the partial slots.
  const std::vector<SeqSlice> short_seq = decode_seqs({100}, 16);
  const AttnPlan one = plan_attention(short_seq, 16, 2, internlm2, kSms, 8, true);
  REQUIRE(one.work.size() == 1);
  CHECK(one.work[0].partial < 0);
  CHECK(one.combine.empty());
  // The same in a graph of 64 blocks (1024 keys: 4 splits), whose later steps may fill them: the first
  // split holds all 101 keys and writes the output, the other three are empty and do nothing.
  const AttnPlan direct = plan_attention(short_seq, 16, 2, internlm2, kSms, 64, true);
  REQUIRE(direct.work.size() == 4);
  CHECK(direct.work[0].kv_end == 101);
  for (const AttnWork& w : direct.work) CHECK(w.partial < 0);
  CHECK(direct.combine.size() == 1);
  CHECK(direct.partials == 4);
  // At 300 keys the first two splits hold keys (128 + 128 + 44: three), merged through their slots.
  const AttnPlan merged = plan_attention(decode_seqs({299}, 16), 16, 2, internlm2, kSms, 64, true);
  REQUIRE(merged.work.size() == 4);
  for (const AttnWork& w : merged.work) CHECK(w.partial >= 0);
  CHECK(merged.work[2].kv_end - merged.work[2].kv_begin == 44);
}
#endif
