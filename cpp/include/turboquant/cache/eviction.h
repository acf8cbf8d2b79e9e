// Eviction, an aging policy (aging_policy.h; KVCacheConfig::max_coded_tokens): while a layer
// holds more than max_coded_tokens code tokens, its oldest code block (right after the
// sinks) is dropped. The layer's size then counts the stored tokens only (sinks + codes +
// window, in order) and evicted() how many were dropped; positions (RoPE) are the caller's.
#pragma once

#include <cstddef>
#include <vector>

#include "turboquant/cache/aging_policy.h"

namespace turboquant {

class Eviction final : public AgingPolicy {
 public:
  Eviction(const CacheParts& parts, const AgingConfig& config);
  size_t age(size_t l) override;
  void cut(size_t l, size_t codes, size_t size) override;

  // Tokens of a layer dropped since it was empty, and its restore (load).
  size_t evicted(size_t l) const { return evicted_[l]; }
  void set_evicted(size_t l, size_t n) { evicted_[l] = n; }

 private:
  size_t max_coded_tokens_;
  std::vector<size_t> evicted_;  // per layer
};

}  // namespace turboquant
