#include "turboquant/cache/plain_flush.h"

#include "turboquant/half.h"

namespace turboquant {

void PlainFlush::encode_window(size_t l, size_t c, size_t n) {
  Segments& seg = parts_.segments;
  PageStore& store = parts_.store;
  const size_t d = seg.head_dim, streams = seg.streams_per_layer;
  std::vector<float> x;
  try {
    x.resize(n * d);
    for (size_t s = 0; s < streams; ++s) {
      const size_t i = l * streams + s;
      store.ensure(i, c + n);
      const uint16_t* w = seg.window[i].data();
      for (size_t j = 0; j < n * d; ++j) x[j] = half_to_float(w[j]);
      // The store writes any code index: a block begun by an earlier compaction (or a cut)
      // is filled on from its row c % block_tokens.
      store.encode(i, c, x.data(), n, d);
    }
  } catch (...) {
    for (size_t s = 0; s < streams; ++s) store.release(l * streams + s, c);
    throw;
  }
}

void PlainFlush::flush(size_t l, size_t keep_new) {
  Segments& seg = parts_.segments;
  const SegmentPlan& plan = seg.plan(l);
  const size_t bt = plan.flush_tokens();  // one block
  // The plan's blocks, oldest first (while the window holds more than fp16_window + bt).
  for (size_t due = plan.due_flushes(seg.sizes(l), keep_new); due > 0; --due) {
    // The window is non-empty only once the sinks are full: code index = token - sinks.
    encode_window(l, seg.coded[l] - seg.sink_base(l), bt);
    seg.flushed(l, bt);
  }
}

size_t PlainFlush::compact(size_t l) {
  Segments& seg = parts_.segments;
  const CompactPlan plan = seg.plan(l).compact(seg.sizes(l));
  if (!plan.window_freed) return 0;
  if (plan.tokens > 0) encode_window(l, seg.coded[l] - seg.sink_base(l), plan.tokens);
  seg.compacted(l, plan.tokens);
  return plan.tokens;
}

}  // namespace turboquant
