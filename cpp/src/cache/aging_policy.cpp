#include "turboquant/cache/aging_policy.h"

#include "turboquant/cache/eviction.h"
#include "turboquant/cache/temporal_decay.h"

namespace turboquant {

std::vector<std::unique_ptr<AgingPolicy>> make_aging_policies(const CacheParts& parts, const AgingConfig& config) {
  std::vector<std::unique_ptr<AgingPolicy>> policies;
  if (config.max_coded_tokens > 0) policies.push_back(std::make_unique<Eviction>(parts, config));
  if (config.decays()) policies.push_back(std::make_unique<TemporalDecay>(parts, config));
  return policies;
}

}  // namespace turboquant
