#include "lmd/engine/block_pool.h"

#include "lmd/core/error.h"

namespace lmd {

BlockPool::BlockPool(int num_blocks) : total_(num_blocks) {
  free_.reserve(num_blocks);
  // Hand out low ids first so that a short run touches the start of the pool.
  for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

bool BlockPool::allocate(int n, std::vector<int>& blocks) {
  if (n > free_count()) return false;
  for (int i = 0; i < n; ++i) {
    blocks.push_back(free_.back());
    free_.pop_back();
  }
  return true;
}

void BlockPool::release(std::vector<int>& blocks) {
  for (int b : blocks) {
    if (b < 0 || b >= total_) fail("KV block ", b, " is not part of the pool of ", total_);
    free_.push_back(b);
  }
  blocks.clear();
}

}  // namespace lmd
