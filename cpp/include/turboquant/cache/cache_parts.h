// The parts of a KV cache that its policies (flush_policy.h, aging_policy.h) read and
// change; all are owned by the cache (kv_cache.h), which hands every policy this view and,
// to its constructor, the policy's own group of the configuration (config.h): no policy
// sees the others' settings. The segments carry their own rules (each layer's plan).
#pragma once

#include "turboquant/cache/config.h"
#include "turboquant/cache/page_store.h"
#include "turboquant/cache/quantizer_table.h"
#include "turboquant/cache/segments.h"

namespace turboquant {

struct CacheParts {
  const CacheShape& shape;
  const QuantizerTable& table;
  PageStore& store;
  Segments& segments;
};

}  // namespace turboquant
