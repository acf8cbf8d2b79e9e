// The segments of KVCache (cache/segments.h): appends through the fp16 sinks and window,
// the flush of window rows into codes (by the flush policy), compaction, restores of sinks
// and window (load), cuts, and decoding the stored rows of any segment.
#include <algorithm>
#include <cstring>

#include "turboquant/error.h"
#include "turboquant/half.h"
#include "turboquant/kv_cache.h"
#include "kv_cache_guard.h"

namespace turboquant {

// Quantizes what the flush policy lets go of layer l's window, then gives back what a long
// prefill took beyond the window's fixed capacity (segments.h, fit_window).
void KVCache::flush_window(size_t l, size_t keep_new) {
  if (segments_.fp16_layer[l]) return;
  flush_->flush(l, keep_new);
  segments_.fit_window(l);
  flush_->fit(l);
}

void KVCache::flush_rated(int layer) {
  const WriteScope guard(*this, "flush_rated");
  check_layer(layer);
  const auto l = static_cast<size_t>(layer);
  // Every window token counted as the latest append's: only rated groups are due.
  if (mixed_) flush_window(l, segments_.size[l] - segments_.coded[l]);
}

size_t KVCache::compact_window(int layer) {
  const WriteScope guard(*this, "compact_window");
  check_layer(layer);
  const auto l = static_cast<size_t>(layer);
  // The plan (segment_plan.h, compact) decides; the flush policy encodes the rows.
  const size_t moved = flush_->compact(l);
  if (moved > 0) age(l);
  return moved;
}

size_t KVCache::compact_window() {
  size_t moved = 0;
  for (int l = 0; l < config_.n_layers; ++l) moved += compact_window(l);
  return moved;
}

void KVCache::append_windowed(int layer, const float* keys, const float* values, size_t T) {
  const auto l = static_cast<size_t>(layer);
  const auto d = static_cast<size_t>(config_.head_dim);
  const size_t streams = segments_.streams_per_layer;
  // Convert and validate everything before touching the cache.
  std::vector<uint16_t> rows(streams * T * d);
  for (size_t s = 0; s < streams; ++s) {
    const size_t h = s / 2;
    const float* x = (s % 2 == 0 ? keys : values) + h * T * d;
    for (size_t j = 0; j < T * d; ++j) {
      const uint16_t v = float_to_half(x[j]);
      TQ_CHECK(half_is_finite(v), InvalidArgument, s % 2 == 0 ? "keys" : "values",
               " of kv head ", h, " contain a value that is not finite in fp16 (", x[j],
               ") at element ", j);
      rows[s * T * d + j] = v;
    }
  }
  const size_t old = segments_.size[l], old_coded = segments_.coded[l];
  // The plan (segment_plan.h): the first ks tokens go to the fp16 sinks (until they are
  // full), the rest to the window, whose due flushes the flush policy then takes.
  const size_t ks = segments_.plan(l).append(segments_.sizes(l), T).sinks;
  segments_.append_rows(l, rows.data(), T, ks);
  flush_->window_grown(l);
  try {
    flush_window(l, T - ks);
  } catch (...) {
    // The flush policy commits whole flushes only; drop the rows of this call that are left.
    segments_.undo_append(l, old, old_coded, ks);
    flush_->window_grown(l);  // per-token state follows the rows back
    throw;
  }
  age(l);
}

void KVCache::append_window(int layer, size_t n, const std::vector<const uint16_t*>& rows,
                            const std::vector<const float*>* importance) {
  check_layer(layer);
  TQ_CHECK(config_.windowed(), InvalidArgument, "this cache has no fp16 window");
  const auto l = static_cast<size_t>(layer);
  const auto d = static_cast<size_t>(config_.head_dim);
  const size_t streams = segments_.streams_per_layer;
  auto& sizes = segments_.size;
  TQ_CHECK(rows.size() == streams, InvalidArgument, "append_window needs ", streams, " streams");
  TQ_CHECK(sizes[l] == segments_.coded[l], InvalidArgument, "layer ", layer, " already holds window tokens");
  TQ_CHECK(n == 0 || sizes[l] >= segments_.sink_base(l), InvalidArgument, "window of layer ", layer,
           " restored before its ", segments_.sink_base(l), " fp16 sinks are full");
  flush_->check_restore(l, n, importance);
  TQ_CHECK(config_.max_tokens == 0 || sizes[l] + n <= config_.max_tokens, InvalidArgument,
           "window of ", n, " tokens exceeds max_tokens=", config_.max_tokens);
  for (size_t s = 0; s < streams; ++s) {
    const size_t j = first_nonfinite_half(rows[s], n * d);
    TQ_CHECK(j == n * d, InvalidArgument, "window row value ", j, " of stream ", s, " is not finite");
  }
  segments_.restore_window(l, n, rows);
  flush_->restore(l, n, importance);
}

void KVCache::append_sinks(int layer, size_t n, const std::vector<const uint16_t*>& rows) {
  const WriteScope guard(*this, "append_sinks");
  check_layer(layer);
  const auto l = static_cast<size_t>(layer);
  const auto d = static_cast<size_t>(config_.head_dim);
  const size_t streams = segments_.streams_per_layer;
  const size_t S = segments_.sink_base(l);
  TQ_CHECK(rows.size() == streams, InvalidArgument, "append_sinks needs ", streams, " streams");
  TQ_CHECK(segments_.size[l] == 0, InvalidArgument, "append_sinks needs an empty layer (layer ", layer, " holds ",
           segments_.size[l], " tokens)");
  TQ_CHECK(n <= S, InvalidArgument, "sinks of ", n, " tokens exceed the ", S, " fp16 sinks of layer ", layer);
  TQ_CHECK(config_.max_tokens == 0 || n <= config_.max_tokens, InvalidArgument, "sinks of ", n,
           " tokens exceed max_tokens=", config_.max_tokens);
  for (size_t s = 0; s < streams; ++s) {
    const size_t j = first_nonfinite_half(rows[s], n * d);
    TQ_CHECK(j == n * d, InvalidArgument, "sink row value ", j, " of stream ", s, " is not finite");
  }
  if (n > 0) segments_.restore_sinks(l, n, rows);
}

void KVCache::shrink_layer(size_t l, size_t new_size) {
  if (new_size >= segments_.size[l]) return;
  // The plan (segment_plan.h): a cut inside the window shortens it; below it the window
  // empties and the codes and sinks of the tokens left stay. A layer cut back into its
  // sinks (or emptied) gives its window's capacity back too, also when it held no codes
  // (its memory does not depend on where the cut started), and without sinks left theirs.
  const CutPlan cut = segments_.plan(l).cut(segments_.sizes(l), new_size);
  flush_->cut(l, new_size);
  if (new_size < segments_.coded_end(l))
    for (size_t s = 0; s < segments_.streams_per_layer; ++s)
      store_.release(l * segments_.streams_per_layer + s, cut.after.codes);
  segments_.cut(l, cut);
  cut_codes(l);
}

// An unwindowed layer holds codes only: the plan's cut keeps the first new_size (every
// layer's pages are released to their size and the aging policies told, even if uncut).
void KVCache::cut_unwindowed(size_t l, size_t new_size) {
  const CutPlan cut = segments_.plan(l).cut(segments_.sizes(l), new_size);
  segments_.cut(l, cut);
  for (size_t s = 0; s < segments_.streams_per_layer; ++s)
    store_.release(l * segments_.streams_per_layer + s, cut.after.codes);
  cut_codes(l);
}

void KVCache::decode_tokens(int layer, int kv_head, KVRole role, size_t start, size_t n, float* out) const {
  const ReadScope guard(*this, "decode");
  check_head(layer, kv_head);
  const size_t size = segments_.size[static_cast<size_t>(layer)];
  TQ_CHECK(start <= size && n <= size - start, InvalidArgument, "tokens [", start, ", ", start + n,
           ") beyond the layer's ", size, " tokens");
  const auto d = static_cast<size_t>(config_.head_dim);
  const size_t ns = sink_tokens(layer), coded = coded_tokens(layer);
  const size_t i = index(layer, kv_head, role);
  const size_t bt = config_.block_tokens;
  const PagedCodes& p = store_[i];
  for (size_t t = start; t < start + n;) {
    float* o = out + (t - start) * d;
    if (t < ns) {
      const size_t c = std::min(start + n, ns) - t;
      const auto& s = segments_.sinks[i];
      for (size_t j = 0; j < c * d; ++j) o[j] = half_to_float(s[t * d + j]);
      t += c;
    } else if (t < coded && !flush_->positional()) {  // codes not in position order: one at a time
      const size_t j = flush_->code_index(static_cast<size_t>(layer), static_cast<size_t>(kv_head), t - ns);
      const Quantizer& q = store_.block_quantizer(i, j / bt);
      q.decode(p.code_blocks[j / bt].get() + (j % bt) * q.code_bytes(),
               p.norm_blocks[j / bt].get() + (j % bt) * q.norm_bytes(), 1, o);
      t += 1;
    } else if (t < coded) {
      const size_t j0 = t - ns, b = j0 / bt, off = j0 % bt;
      const size_t c = std::min({start + n, coded, ns + (b + 1) * bt}) - t;
      const Quantizer& q = store_.block_quantizer(i, b);
      q.decode(p.code_blocks[b].get() + off * q.code_bytes(), p.norm_blocks[b].get() + off * q.norm_bytes(), c, o);
      t += c;
    } else {
      const size_t c = start + n - t;
      const auto& w = segments_.window[i];
      for (size_t j = 0; j < c * d; ++j) o[j] = half_to_float(w[(t - coded) * d + j]);
      t += c;
    }
  }
}

}  // namespace turboquant
