#include "turboquant/cache/segment_plan.h"

#include <algorithm>
#include <limits>

#include "turboquant/error.h"

namespace turboquant {

SegmentPlan::SegmentPlan(const Rules& rules) : r_(rules) {
  TQ_CHECK(r_.block_tokens >= 1, InvalidArgument, "block_tokens must be >= 1, got ", r_.block_tokens);
  TQ_CHECK(r_.mixed_keep_blocks <= r_.mixed_group_blocks, InvalidArgument, "mixed_keep_blocks (", r_.mixed_keep_blocks,
           ") exceeds mixed_group_blocks (", r_.mixed_group_blocks, ")");
  TQ_CHECK(r_.windowed || (r_.fp16_sinks == 0 && r_.fp16_window == 0 && !r_.fp16_layer && !mixed()), InvalidArgument,
           "fp16 sinks, an fp16 window, an fp16 layer or mixed precision need the windowed layout");
}

namespace {
SegmentPlan::Rules rules_of(const SegmentsConfig& c, const MixedPrecisionConfig& m, size_t l) {
  SegmentPlan::Rules r;
  r.fp16_sinks = c.fp16_sinks;
  r.fp16_window = c.fp16_window;
  r.block_tokens = c.block_tokens;
  r.mixed_group_blocks = m.mixed_group_blocks;
  r.mixed_keep_blocks = m.mixed_keep_blocks;
  r.windowed = c.windowed();
  r.fp16_layer = std::find(c.fp16_layers.begin(), c.fp16_layers.end(), static_cast<int>(l)) != c.fp16_layers.end();
  return r;
}
}  // namespace

SegmentPlan::SegmentPlan(const SegmentsConfig& segments, const MixedPrecisionConfig& mixed, size_t l)
    : SegmentPlan(rules_of(segments, mixed, l)) {}

SegmentSizes SegmentPlan::sizes(size_t size, size_t coded, size_t rated) const {
  SegmentSizes s;
  if (!r_.windowed) coded = size;
  TQ_CHECK(coded <= size, InvalidArgument, "codes ending at ", coded, " past the layer's ", size, " tokens");
  s.sinks = std::min(coded, sink_base());
  s.codes = coded - s.sinks;
  s.window = size - coded;
  s.rated = rated;
  return s;
}

size_t SegmentPlan::due_flushes(const SegmentSizes& s, size_t keep_new) const {
  if (!r_.windowed || r_.fp16_layer) return 0;
  const size_t N = r_.fp16_window, P = flush_tokens();
  if (!mixed()) return s.window > N + P ? (s.window - N - P + P - 1) / P : 0;
  const size_t n = s.size();
  size_t coded = s.coded(), due = 0;
  for (;; ++due, coded += P) {
    const size_t end = coded + P;  // the oldest group ends here
    if (n < end + N) break;        // fp16_window newer tokens must follow it
    // Unrated (no attention call since): only groups older than the latest append, once
    // the window holds kUnratedTokens more than its bound besides that append.
    if (s.rated < end && (end + keep_new > n || n - keep_new - coded < N + P + kUnratedTokens)) break;
  }
  return due;
}

AppendPlan SegmentPlan::append(const SegmentSizes& s, size_t T) const {
  AppendPlan p;
  p.piece = flush_tokens();
  p.after = s;
  if (!r_.windowed) {
    p.direct = T;
    p.after.codes += T;
    return p;
  }
  // fp16 sinks take the first tokens of the layer (the window is empty until they are full).
  const size_t S = sink_base(), old = s.size();
  p.sinks = old < S ? std::min(T, S - old) : 0;
  p.window = T - p.sinks;
  p.after.sinks += p.sinks;
  p.after.window += p.window;
  p.flushes = due_flushes(p.after, p.window);
  p.after.window -= p.flushed();
  p.after.codes += p.flushed();
  return p;
}

size_t SegmentPlan::quiet_tokens(const SegmentSizes& s) const {
  if (!r_.windowed || s.size() < sink_base() || mixed()) return 0;
  if (r_.fp16_layer) return std::numeric_limits<size_t>::max();
  // due_flushes(): a plain layer flushes once its window holds more than fp16_window + P.
  const size_t cap = r_.fp16_window + flush_tokens();
  return s.window < cap ? cap - s.window : 0;
}

CutPlan SegmentPlan::cut(const SegmentSizes& s, size_t new_size) const {
  CutPlan p;
  p.after = s;
  if (new_size >= s.size()) return p;
  p.after.rated = std::min(s.rated, new_size);
  const size_t coded = s.coded(), S = sink_base();
  if (!r_.windowed) {
    p.after.codes = new_size;
  } else if (new_size >= coded) {
    p.after.window = new_size - coded;
  } else {
    p.after.sinks = std::min(new_size, S);
    p.after.codes = new_size - p.after.sinks;
    p.after.window = 0;
    p.splits_group = mixed() && new_size > S && (new_size - S) % flush_tokens() != 0;
  }
  p.sinks_released = s.sinks - p.after.sinks;
  p.codes_released = s.codes - p.after.codes;
  p.window_released = s.window - p.after.window;
  p.window_freed = r_.windowed && new_size <= S;
  p.sinks_freed = p.sinks_released > 0 && p.after.sinks == 0;
  return p;
}

CompactPlan SegmentPlan::compact(const SegmentSizes& s) const {
  CompactPlan p;
  p.after = s;
  if (!r_.windowed || r_.fp16_layer || mixed()) return p;
  p.tokens = s.window;
  p.window_freed = true;
  p.after.codes += s.window;
  p.after.window = 0;
  return p;
}

void SegmentPlan::check_cut(const SegmentSizes& s, size_t new_size, size_t layer) const {
  const size_t S = sink_base(), F = flush_tokens();
  TQ_CHECK(!cut(s, new_size).splits_group, NotSupported, "cutting layer ", layer, " to ", new_size,
           " tokens splits a mixed-precision flush group of ", F,
           " coded tokens (stored by importance, not position); cut to a length of ", S, " + a multiple of ", F,
           ", or into the fp16 window (", s.coded(), " tokens and more)");
}

size_t SegmentPlan::low_codes(size_t codes) const {
  if (!mixed()) return 0;
  const size_t F = flush_tokens();
  return codes / F * (F - r_.mixed_keep_blocks * r_.block_tokens);
}

}  // namespace turboquant
