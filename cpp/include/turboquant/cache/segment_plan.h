// The bookkeeping rules of a layer's segments (segments.h) as plans, data-free: given the
// sizes of a layer's segments, where an append's tokens go (sinks, window, or codes) and
// which window tokens then flush into codes (whole pieces, oldest first: blocks of the
// plain flush, groups of mixed precision), what a cut keeps and releases, and what a
// compaction (a layer parked in a prompt-cache store) moves into codes. The cache
// (kv_cache_segments.cpp, kv_cache.cpp) and its flush policies (plain_flush.h,
// mixed_precision.h) apply these plans to their data, and a store that keeps its bytes
// elsewhere (the mlx store of python/turboquant/mlx_metal.py) asks the same plans through
// the bindings (_core.SegmentPlan), so each rule exists once. Aging (temporal decay,
// eviction) is not planned here: it works on the codes after an append.
#pragma once

#include <cstddef>

#include "turboquant/cache/config.h"

namespace turboquant {

// The segments of one layer: its first `sinks` tokens are fp16 sinks, the next `codes`
// tokens codes, the last `window` tokens the fp16 window. rated (mixed precision): the
// leading tokens of the layer that attention calls have rated.
struct SegmentSizes {
  size_t sinks = 0;
  size_t codes = 0;
  size_t window = 0;
  size_t rated = 0;

  size_t size() const { return sinks + codes + window; }
  size_t coded() const { return sinks + codes; }  // end of the codes
  bool operator==(const SegmentSizes&) const = default;
};

// An append of T tokens: the first `sinks` go to the fp16 sinks, the other `window` to the
// fp16 window (windowed layout) or, `direct`, straight into codes (unwindowed); then the
// window's oldest `flushes` pieces of `piece` tokens flush into codes, oldest first.
struct AppendPlan {
  size_t sinks = 0;
  size_t window = 0;
  size_t direct = 0;
  size_t flushes = 0;
  size_t piece = 0;
  SegmentSizes after;

  size_t flushed() const { return flushes * piece; }
};

// A cut of a layer back to after.size() tokens: the sizes kept, the tokens released from
// each segment, whether the window gives its capacity back (a cut back into the sinks, or
// to empty: memory does not depend on where the cut started) and whether the sinks do (no
// sink left). splits_group (mixed precision): the cut would split a flush group of codes,
// which are stored by importance, not position; such a cut is refused (check_cut).
struct CutPlan {
  SegmentSizes after;
  size_t sinks_released = 0;
  size_t codes_released = 0;
  size_t window_released = 0;
  bool window_freed = false;
  bool sinks_freed = false;
  bool splits_group = false;
};

// A compaction of a layer: its whole fp16 window, a partial flush piece included, becomes
// codes (`tokens` of them, after the codes it holds) and the window gives its capacity back.
// The sinks stay fp16. window_freed: the layer compacts (an empty window gives its capacity
// back too); false for a layer that keeps its window (see SegmentPlan::compact).
struct CompactPlan {
  size_t tokens = 0;
  bool window_freed = false;
  SegmentSizes after;
};

class SegmentPlan {
 public:
  // How many fp16 window tokens a mixed-precision layer holds at most without attention
  // calls (besides the latest append's) before its oldest groups flush unrated.
  static constexpr size_t kUnratedTokens = 4096;

  // What the rules read of a configuration, for one layer.
  struct Rules {
    size_t fp16_sinks = 0;
    size_t fp16_window = 0;
    size_t block_tokens = 256;
    size_t mixed_group_blocks = 0;  // 0: the plain flush
    size_t mixed_keep_blocks = 0;
    bool windowed = false;    // sinks, window or fp16 layers exist (SegmentsConfig::windowed)
    bool fp16_layer = false;  // the layer is held entirely as fp16 rows (never flushed)
  };

  explicit SegmentPlan(const Rules& rules);
  // The plan of layer l of a cache with these segments and mixed precision settings, or
  // with this configuration.
  SegmentPlan(const SegmentsConfig& segments, const MixedPrecisionConfig& mixed, size_t l);
  SegmentPlan(const KVCacheConfig& config, size_t l) : SegmentPlan(config.segments(), config.mixed_precision(), l) {}

  const Rules& rules() const { return r_; }
  bool windowed() const { return r_.windowed; }
  bool mixed() const { return r_.mixed_group_blocks > 0; }
  // The sinks the layer holds when full: fp16_sinks, or 0 for an fp16 layer.
  size_t sink_base() const { return r_.fp16_layer ? 0 : r_.fp16_sinks; }
  // Tokens one flush moves: block_tokens, or a mixed-precision group's.
  size_t flush_tokens() const { return r_.block_tokens * (mixed() ? r_.mixed_group_blocks : 1); }
  // Rows a flushed window holds at most (more only transiently inside an append, or unrated
  // with mixed precision): its capacity once used.
  size_t window_rows() const { return r_.fp16_window + flush_tokens(); }

  // The segments of a layer holding `size` tokens whose codes end at `coded` (size when
  // unwindowed): the sinks held are those filled so far.
  SegmentSizes sizes(size_t size, size_t coded, size_t rated = 0) const;
  // An append of T tokens to a layer of sizes s.
  AppendPlan append(const SegmentSizes& s, size_t T) const;
  // How many one-token appends in a row, from a layer of sizes s, each go to the window
  // with no sink filled and no flush (a decode step's usual append): 0 before the sinks are
  // full and for mixed precision (its flushes wait on ratings); SIZE_MAX for an fp16 layer.
  size_t quiet_tokens(const SegmentSizes& s) const;
  // The flushes due in a layer of sizes s whose latest append added keep_new window
  // tokens (already in s.window): a plain layer flushes its oldest blocks while the window
  // holds more than fp16_window + block_tokens tokens; a mixed-precision group flushes once
  // it is rated and fp16_window newer tokens follow it, or, unrated, once the window holds
  // kUnratedTokens tokens more than that besides the latest keep_new.
  size_t due_flushes(const SegmentSizes& s, size_t keep_new) const;
  // A cut of a layer of sizes s back to new_size tokens (nothing when it holds no more): a
  // cut inside the window shortens it; below it, the window empties and the codes and sinks
  // of the tokens left stay (later tokens go to the window).
  CutPlan cut(const SegmentSizes& s, size_t new_size) const;
  // A compaction of a layer of sizes s (a prompt parked in a store, which will be extended
  // or cut later, rarely attended as it is): a plain-flush layer moves its whole window
  // into codes, the codes then ending at an arbitrary position (later flushes go on from
  // there). A mixed-precision layer keeps its window (its codes are stored by importance in
  // whole groups, and a window token is only flushed once rated), and so does an fp16 layer
  // (it has no codes) and an unwindowed one (no window).
  CompactPlan compact(const SegmentSizes& s) const;
  // Throws NotSupported (naming layer `layer`) for a cut that splits a flush group.
  void check_cut(const SegmentSizes& s, size_t new_size, size_t layer) const;
  // Of `codes` code tokens of a mixed-precision layer (whole groups), those at the low width.
  size_t low_codes(size_t codes) const;

 private:
  Rules r_;
};

}  // namespace turboquant
