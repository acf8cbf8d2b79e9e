#include "turboquant/cache/plain_flush.h"

#include "turboquant/half.h"

namespace turboquant {

void PlainFlush::flush(size_t l, size_t keep_new) {
  Segments& seg = parts_.segments;
  PageStore& store = parts_.store;
  const SegmentPlan& plan = seg.plan(l);
  const size_t bt = plan.flush_tokens();  // one block
  const size_t d = seg.head_dim, streams = seg.streams_per_layer;
  std::vector<float> x(bt * d);
  // The plan's blocks, oldest first (while the window holds more than fp16_window + bt).
  for (size_t due = plan.due_flushes(seg.sizes(l), keep_new); due > 0; --due) {
    // The window is non-empty only once the sinks are full: code index = token - sinks.
    const size_t c = seg.coded[l] - seg.sink_base(l);
    try {
      for (size_t s = 0; s < streams; ++s) {
        const size_t i = l * streams + s;
        store.ensure(i, c + bt);
        const uint16_t* w = seg.window[i].data();
        for (size_t j = 0; j < bt * d; ++j) x[j] = half_to_float(w[j]);
        store.encode(i, c, x.data(), bt, d);
      }
    } catch (...) {
      for (size_t s = 0; s < streams; ++s) store.release(l * streams + s, c);
      throw;
    }
    seg.flushed(l, bt);
  }
}

}  // namespace turboquant
