// The segments of a KV cache's layers. A layer's tokens are, in order:
//   fp16 sinks [0, sink_tokens) | codes [sink_tokens, coded) | fp16 window [coded, size)
// The sinks (fp16_sinks, StreamingLLM) stay fp16 forever; the codes live in the page store
// (page_store.h, code index j = token sink_tokens + j unless the flush policy stores them
// in another order); the window (fp16_window, KIVI) holds the recent tokens as fp16 until a
// flush policy (flush_policy.h) moves them into codes. A cache with neither sinks nor
// window nor fp16 layers is "unwindowed": every token is a code, coded == size.
// This is plain state; the rules that move tokens between segments are the policies'.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "turboquant/cache/config.h"

namespace turboquant {

struct Segments {
  explicit Segments(const KVCacheConfig& config);

  bool windowed = false;          // sinks, window or fp16 layers exist (coded is tracked)
  size_t head_dim = 0;
  size_t streams_per_layer = 0;   // 2 × n_kv_heads; stream s of layer l is l × this + s
  size_t fp16_sinks = 0;
  std::vector<uint8_t> fp16_layer;                // per layer: 1 = held entirely as fp16 rows
  std::vector<size_t> size;                       // tokens per layer
  std::vector<size_t> coded;                      // end of the codes per layer (windowed only)
  std::vector<std::vector<uint16_t>> window;      // fp16 rows per stream (windowed only)
  std::vector<std::vector<uint16_t>> sinks;       // fp16 rows per stream (fp16_sinks > 0 only)

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
