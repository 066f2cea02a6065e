// Bookkeeping for the paged KV cache: which of the pool's blocks are free. The memory itself is a
// KvCacheStorage owned by the backend; sequences hold lists of block ids.
#pragma once
#include <vector>

namespace lmd {

class BlockPool {
 public:
  explicit BlockPool(int num_blocks);
  int total() const { return total_; }
  int free_count() const { return static_cast<int>(free_.size()); }
  int used_count() const { return total_ - free_count(); }
  // Appends n blocks to `blocks`; returns false (allocating nothing) when fewer than n are free.
  bool allocate(int n, std::vector<int>& blocks);
  void release(std::vector<int>& blocks);  // returns them to the pool and clears the list

 private:
  int total_;
  std::vector<int> free_;
};

// Blocks needed to hold `tokens` tokens.
inline int blocks_for(int tokens, int block_len) { return (tokens + block_len - 1) / block_len; }

}  // namespace lmd
