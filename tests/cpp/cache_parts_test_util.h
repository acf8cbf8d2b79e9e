// The cache's parts without the cache, for the tests of one part (page store, flush and
// aging policies): a small configuration and the parts a KVCache composes.
#pragma once

#include <cstdint>

#include "turboquant/cache/cache_parts.h"
#include "turboquant/cache/page_store.h"
#include "turboquant/cache/quantizer_table.h"
#include "turboquant/cache/segments.h"
#include "turboquant/kv_cache.h"

namespace turboquant::testing {

// One layer, one KV head of 32 channels, 3-bit keys and values, 8-token blocks.
inline KVCacheConfig small_cache_config(uint64_t seed) {
  KVCacheConfig c;
  c.head_dim = 32;
  c.n_kv_heads = 1;
  c.key_bits = 3;
  c.value_bits = 3;
  c.block_tokens = 8;
  c.seed = seed;
  return c;
}

// The quantizer table, page store and segments of configuration c, and the view the
// policies take of them.
struct PartsFixture {
  explicit PartsFixture(const KVCacheConfig& c)
      : config(c),
        table(config),
        store(table, c.block_tokens),
        segments(config.shape(), config.segments(), config.mixed_precision()) {}
  CacheParts view() { return CacheParts{config.shape(), table, store, segments}; }
  KVCacheConfig config;
  QuantizerTable table;
  PageStore store;
  Segments segments;
};

}  // namespace turboquant::testing
