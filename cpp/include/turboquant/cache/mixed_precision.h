// Importance-routed mixed precision, a flush policy (flush_policy.h; KVCacheConfig::
// mixed_group_blocks). Each window token sums the squared softmax weights that the query
// rows of its KV head gave it while it was fp16 (its importance: a token's share of the
// output error that its quantization error would cause; the attention over the window
// reports them through rate()). The window is flushed in groups of F = mixed_group_blocks ×
// block_tokens tokens: per KV head, the K = mixed_keep_blocks × block_tokens most important
// tokens of the group (ties: the older) keep the stream's bits, the others are encoded at
// decay_bits (the decayed quantizer of quantizer_table.h; per-block flags in the page store).
//
// Codes are stored in that order, not by position: inside a group the kept tokens in
// position order, then the others (even groups), or the others first (odd groups, so that
// blocks of one width meet across groups). One mask per group and KV head (bit o: token
// sink_tokens + g·F + o kept) maps them back. Attention over codes needs no position, since
// every coded token is older than every query; so only tokens that an attention call has
// rated are flushed (an append's tokens wait for the attention call that follows), unless a
// layer is appended to without attention calls: beyond kUnratedTokens unrated tokens
// besides the latest append's, the oldest groups flush unrated (in position order). A
// sliding window or causal queries older than a coded token are refused, and so is a cut
// that splits a group. When groups flush and what a cut keeps are the segment plan's rules
// (segment_plan.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "turboquant/cache/flush_policy.h"
#include "turboquant/cache/segment_plan.h"

namespace turboquant {

class MixedPrecisionFlush final : public FlushPolicy {
 public:
  // How many fp16 window tokens a layer holds at most without attention calls before its
  // oldest groups are flushed unrated (the segment plan's rule).
  static constexpr size_t kUnratedTokens = SegmentPlan::kUnratedTokens;

  MixedPrecisionFlush(const CacheParts& parts, const MixedPrecisionConfig& config);

  void flush(size_t l, size_t keep_new) override;
  void window_grown(size_t l) override;
  void fit(size_t l) override;
  void check_restore(size_t l, size_t n, const std::vector<const float*>* importance) const override;
  void restore(size_t l, size_t n, const std::vector<const float*>* importance) override;
  void check_cut(size_t l, size_t new_size) const override;
  void cut(size_t l, size_t new_size) override;
  void check_attend(size_t l, size_t n, size_t T_q, const std::optional<size_t>& window,
                    bool causal) const override;
  bool rates_window() const override { return true; }
  void attended(size_t l, size_t n) const override;
  void rate(size_t l, size_t kv_head, const float* w, size_t n) const override;
  bool positional() const override { return false; }
  size_t code_index(size_t l, size_t kv_head, size_t position) const override;
  void check_encoded(size_t l, size_t c0, size_t n, const std::vector<const uint8_t*>* decayed,
                     const std::vector<const uint64_t*>* masks) const override;
  void encoded(size_t l, size_t n, const std::vector<const uint64_t*>* masks) override;
  size_t memory_bytes() const override;
  size_t layer_bytes(size_t l) const override;

  // uint64 words per group mask.
  size_t mask_words() const { return (group_tokens_ + 63) / 64; }
  // The groups' masks of (layer, KV head), mask_words() per group.
  const std::vector<uint64_t>& masks(size_t l, size_t kv_head) const { return masks_[l * H_ + kv_head]; }
  // The importance of each window token of (layer, KV head).
  std::vector<float> importance(size_t l, size_t kv_head) const;
  // The leading tokens of a layer that attention calls have rated (its size at the last
  // attend), and its restore (load).
  size_t rated(size_t l) const;
  void set_rated(size_t l, size_t n);

 private:
  void flush_group(size_t l);
  // The slot inside group g of the token at offset o, given the group's mask m.
  size_t slot(const uint64_t* m, size_t g, size_t o) const;
  // Whether block j of group g holds decay_bits codes.
  bool low_block(size_t g, size_t j) const;

  size_t group_blocks_, keep_blocks_;                   // MixedPrecisionConfig's
  size_t block_tokens_, group_tokens_, keep_tokens_;    // a group's tokens and its kept ones
  size_t H_;                                            // KV heads
  std::vector<std::vector<uint64_t>> masks_;            // [layer][kv_head]: kept-token masks
  mutable std::vector<std::vector<float>> importance_;  // [layer][kv_head]: per window token
  mutable std::vector<size_t> rated_;                   // [layer]: size at the last attend
  mutable std::mutex mutex_;                            // attend calls update importance_, rated_
};

}  // namespace turboquant
