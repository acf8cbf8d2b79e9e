// The segments of a KV cache's layers. A layer's tokens are, in order:
//   fp16 sinks [0, sink_tokens) | codes [sink_tokens, coded) | fp16 window [coded, size)
// The sinks (fp16_sinks, StreamingLLM) stay fp16 forever; the codes live in the page store
// (page_store.h, code index j = token sink_tokens + j unless the flush policy stores them
// in another order); the window (fp16_window, KIVI) holds the recent tokens as fp16 until a
// flush policy (flush_policy.h) moves them into codes. A cache with neither sinks nor
// window nor fp16 layers is "unwindowed": every token is a code, coded == size.
//
// Segments owns the fp16 rows and the sizes, and is the one place that changes them: the
// methods below apply what a layer's plan (segment_plan.h) decided, an append's rows, a
// flush that turned the oldest window rows into codes, a cut, a restore, an eviction. When
// to flush and what a cut keeps are the plan's; which window rows become which codes the
// flush policy's; the bytes of the codes the page store's. The members stay readable (the
// attention and the policies read the rows); only these methods write them.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "turboquant/cache/config.h"
#include "turboquant/cache/segment_plan.h"

namespace turboquant {

struct Segments {
  Segments(const CacheShape& shape, const SegmentsConfig& config, const MixedPrecisionConfig& mixed);

  bool windowed = false;          // sinks, window or fp16 layers exist (coded is tracked)
  size_t head_dim = 0;
  size_t streams_per_layer = 0;   // 2 × n_kv_heads; stream s of layer l is l × this + s
  size_t fp16_sinks = 0;
  std::vector<uint8_t> fp16_layer;                // per layer: 1 = held entirely as fp16 rows
  std::vector<size_t> size;                       // tokens per layer
  std::vector<size_t> coded;                      // end of the codes per layer (windowed only)
  std::vector<std::vector<uint16_t>> window;      // fp16 rows per stream (windowed only)
  std::vector<std::vector<uint16_t>> sinks;       // fp16 rows per stream (fp16_sinks > 0 only)

  // The rules of layer l (segment_plan.h), and the sizes of its segments in the plan's terms.
  const SegmentPlan& plan(size_t l) const { return plans_[l]; }
  SegmentSizes sizes(size_t l, size_t rated = 0) const { return plans_[l].sizes(size[l], coded_end(l), rated); }
  // The sinks a layer holds when full: fp16_sinks, or 0 for fp16 layers.
  size_t sink_base(size_t l) const { return fp16_sinks == 0 || fp16_layer[l] ? 0 : fp16_sinks; }
  // End of the codes (size when unwindowed).
  size_t coded_end(size_t l) const { return windowed ? coded[l] : size[l]; }
  // Position of code index 0 (the sinks held, as far as they are filled).
  size_t code_base(size_t l) const { return windowed ? std::min(coded[l], sink_base(l)) : 0; }
  // Code tokens of a layer.
  size_t code_tokens(size_t l) const { return coded_end(l) - code_base(l); }
  size_t sink_tokens(size_t l) const {
    return sinks.empty() ? 0 : sinks[l * streams_per_layer].size() / head_dim;
  }

  // --- Changes (windowed layers unless said otherwise) --------------------------------------
  // Appends T tokens' fp16 rows (rows: streams_per_layer × T × head_dim, stream-major) to
  // layer l: the first `to_sinks` to the sinks, the rest to the window.
  void append_rows(size_t l, const uint16_t* rows, size_t T, size_t to_sinks);
  // Takes back what append_rows added to a layer that held old_size tokens with its codes
  // ending at old_coded, after the flushes that did commit (a flush moves the window's
  // oldest rows into codes: those stay codes).
  void undo_append(size_t l, size_t old_size, size_t old_coded, size_t to_sinks);
  // The window's oldest `tokens` rows were encoded into codes: drop them from the window.
  void flushed(size_t l, size_t tokens);
  // A compaction (segment_plan.h, CompactPlan) encoded the window's `tokens` rows, all it
  // held, into codes: the window empties and gives its capacity back (a later append
  // allocates it again).
  void compacted(size_t l, size_t tokens);
  // Gives every non-empty window of layer l a capacity of exactly the plan's window_rows()
  // (a flushed window's fixed size, so that memory_bytes() is predictable).
  void fit_window(size_t l);
  // Restores a layer's window (n rows per stream) / its sinks into an empty layer (load);
  // the caller has validated the counts and the values.
  void restore_window(size_t l, size_t n, const std::vector<const uint16_t*>& rows);
  void restore_sinks(size_t l, size_t n, const std::vector<const uint16_t*>& rows);
  // n more code tokens at the end of layer l (codes appended directly: unwindowed appends,
  // encoded appends); a windowed layer must hold no window tokens.
  void add_codes(size_t l, size_t n);
  // Applies a cut of layer l (the plan's CutPlan): window and sinks shortened or freed,
  // sizes set. The page store releases the codes.
  void cut(size_t l, const CutPlan& plan);
  // Eviction dropped the first `tokens` code tokens of layer l.
  void codes_dropped(size_t l, size_t tokens);

 private:
  std::vector<SegmentPlan> plans_;  // per layer
};

// Gives v a capacity of exactly cap elements, unless it holds more or already has it (the
// window rows of a flushed layer, so that memory_bytes() is predictable).
template <typename T>
void fit_capacity(std::vector<T>& v, size_t cap) {
  if (v.capacity() == cap || v.size() > cap) return;
  std::vector<T> fitted;
  fitted.reserve(cap);
  fitted.assign(v.begin(), v.end());
  v.swap(fitted);
}

}  // namespace turboquant
