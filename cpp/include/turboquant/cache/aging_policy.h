// Aging policies of a KV cache: what happens to code blocks as they grow old. Two exist:
//   temporal_decay.h  re-quantizes old blocks in place at fewer bits (decay_after);
//   eviction.h        drops the oldest blocks beyond max_coded_tokens (StreamingLLM-like).
// After each append the cache calls age() of every policy in turn (eviction first); a
// policy that drops blocks from the front of the codes returns their count and the cache
// tells the others (front_dropped), so policies know nothing of each other. Policies work
// on the cache's parts (cache_parts.h).
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "turboquant/cache/cache_parts.h"

namespace turboquant {

class AgingPolicy {
 public:
  explicit AgingPolicy(const CacheParts& parts) : parts_(parts) {}
  virtual ~AgingPolicy() = default;
  AgingPolicy(const AgingPolicy&) = delete;
  AgingPolicy& operator=(const AgingPolicy&) = delete;

  // Ages layer l's codes after an append; returns the number of code blocks it dropped from
  // the front of every stream of the layer.
  virtual size_t age(size_t l) = 0;
  // Another policy dropped the first `blocks` code blocks of layer l.
  virtual void front_dropped(size_t /*l*/, size_t /*blocks*/) {}
  // Layer l was cut back: it holds `codes` code tokens of `size` tokens.
  virtual void cut(size_t /*l*/, size_t /*codes*/, size_t /*size*/) {}

 protected:
  CacheParts parts_;
};

// The aging policies a configuration asks for, in the order they run (eviction, decay).
std::vector<std::unique_ptr<AgingPolicy>> make_aging_policies(const CacheParts& parts, const AgingConfig& config);

}  // namespace turboquant
