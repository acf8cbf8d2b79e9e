#include "turboquant/cache/eviction.h"

namespace turboquant {

Eviction::Eviction(const CacheParts& parts)
    : AgingPolicy(parts), evicted_(static_cast<size_t>(parts.config.n_layers), 0) {}

size_t Eviction::age(size_t l) {
  Segments& seg = parts_.segments;
  const size_t bt = parts_.config.block_tokens, M = parts_.config.max_coded_tokens;
  size_t nc = seg.code_tokens(l);
  size_t drop = 0;  // whole blocks from the front of the codes
  while (nc > M) {
    nc -= bt;
    ++drop;
  }
  if (drop == 0) return 0;
  for (size_t s = 0; s < seg.streams_per_layer; ++s) parts_.store.drop_front(l * seg.streams_per_layer + s, drop);
  seg.size[l] -= drop * bt;
  if (seg.windowed) seg.coded[l] -= drop * bt;
  evicted_[l] += drop * bt;
  return drop;
}

void Eviction::cut(size_t l, size_t /*codes*/, size_t size) {
  if (size == 0) evicted_[l] = 0;
}

}  // namespace turboquant
