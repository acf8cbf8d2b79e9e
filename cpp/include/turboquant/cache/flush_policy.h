// Flush policies of a KV cache: what moves a layer's fp16 window tokens into code pages
// (segments.h), and in which order and at which width they are stored there. Two exist:
//   plain_flush.h      the oldest block_tokens tokens at the stream's bits, in position order;
//   mixed_precision.h  importance-routed mixed precision, groups of blocks in which the most
//                      attended tokens keep the stream's bits and the rest decay_bits.
// A policy works on the cache's parts (cache_parts.h) and is told about appends, attention
// calls, cuts and restores through the hooks below, whose defaults are those of a policy
// that stores codes in position order and keeps no state of its own. Policies know nothing
// of each other nor of the aging policies (aging_policy.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "turboquant/cache/cache_parts.h"

namespace turboquant {

class FlushPolicy {
 public:
  explicit FlushPolicy(const CacheParts& parts) : parts_(parts) {}
  virtual ~FlushPolicy() = default;
  FlushPolicy(const FlushPolicy&) = delete;
  FlushPolicy& operator=(const FlushPolicy&) = delete;

  // Moves the window tokens of layer l (not an fp16 layer) that the policy lets go into
  // codes; keep_new: the number of tokens the latest append added. Commits whole flushes
  // only: on an exception every flush before it stands and nothing of the failing one.
  virtual void flush(size_t l, size_t keep_new) = 0;

  // Compaction (segment_plan.h, CompactPlan; a prompt parked in a store): moves the whole
  // window of layer l into codes, a partial piece included, and gives the window's memory
  // back; returns the tokens moved. All or nothing: on an exception the layer is unchanged.
  // The default keeps the window (returns 0): a policy whose codes are not in position
  // order (mixed precision) cannot take a partial group.
  virtual size_t compact(size_t /*l*/) { return 0; }

  // The window of layer l grew (an append): per-token state follows its rows.
  virtual void window_grown(size_t /*l*/) {}
  // After a flush: capacities of per-token state fitted like the window's.
  virtual void fit(size_t /*l*/) {}
  // Validates / installs the per-token state of a restored window of n tokens (load).
  virtual void check_restore(size_t l, size_t n, const std::vector<const float*>* importance) const;
  virtual void restore(size_t /*l*/, size_t /*n*/, const std::vector<const float*>* /*importance*/) {}
  // Cutting layer l back to new_size tokens: check_cut refuses a cut the layout cannot
  // take (before anything changes, for every layer), cut updates the policy's state.
  virtual void check_cut(size_t /*l*/, size_t /*new_size*/) const {}
  virtual void cut(size_t /*l*/, size_t /*new_size*/) {}

  // Attention: refuses queries the stored order cannot answer; rates_window says whether
  // the attention over the window reports each window token's squared softmax weights
  // (summed over the KV head's query rows) through rate(), after attended(l, n).
  virtual void check_attend(size_t /*l*/, size_t /*n*/, size_t /*T_q*/, const std::optional<size_t>& /*window*/,
                            bool /*causal*/) const {}
  virtual bool rates_window() const { return false; }
  virtual void attended(size_t /*l*/, size_t /*n*/) const {}
  virtual void rate(size_t /*l*/, size_t /*kv_head*/, const float* /*w*/, size_t /*n*/) const {}

  // Code order: whether code index j holds the (j+1)-th code token by position; if not,
  // code_index maps a code position to its index.
  virtual bool positional() const { return true; }
  virtual size_t code_index(size_t /*l*/, size_t /*kv_head*/, size_t position) const { return position; }

  // Encoded tokens appended to a layer whose first code index written is c0 (load, copies):
  // check_encoded validates the policy's side data (masks), encoded stores it.
  virtual void check_encoded(size_t l, size_t c0, size_t n, const std::vector<const uint8_t*>* decayed,
                             const std::vector<const uint64_t*>* masks) const;
  virtual void encoded(size_t /*l*/, size_t /*n*/, const std::vector<const uint64_t*>* /*masks*/) {}

  // Bytes of the policy's own data: all of it (memory_bytes) and one layer's (token_bytes).
  virtual size_t memory_bytes() const { return 0; }
  virtual size_t layer_bytes(size_t /*l*/) const { return 0; }

 protected:
  CacheParts parts_;
};

// The flush policy of a configuration: mixed precision when mixed_group_blocks > 0, else plain.
// (How many tokens one flush moves, and when, are the segments' plan's: segment_plan.h.)
std::unique_ptr<FlushPolicy> make_flush_policy(const CacheParts& parts, const MixedPrecisionConfig& mixed);

}  // namespace turboquant
