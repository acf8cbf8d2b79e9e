#include "turboquant/cache/eviction.h"

namespace turboquant {

Eviction::Eviction(const CacheParts& parts, const AgingConfig& config)
    : AgingPolicy(parts),
      max_coded_tokens_(config.max_coded_tokens),
      evicted_(static_cast<size_t>(parts.shape.n_layers), 0) {}

size_t Eviction::age(size_t l) {
  Segments& seg = parts_.segments;
  const size_t bt = parts_.store.block_tokens(), M = max_coded_tokens_;
  size_t nc = seg.code_tokens(l);
  size_t drop = 0;  // whole blocks from the front of the codes
  while (nc > M) {
    nc -= bt;
    ++drop;
  }
  if (drop == 0) return 0;
  for (size_t s = 0; s < seg.streams_per_layer; ++s) parts_.store.drop_front(l * seg.streams_per_layer + s, drop);
  seg.codes_dropped(l, drop * bt);
  evicted_[l] += drop * bt;
  return drop;
}

void Eviction::cut(size_t l, size_t /*codes*/, size_t size) {
  if (size == 0) evicted_[l] = 0;
}

}  // namespace turboquant
