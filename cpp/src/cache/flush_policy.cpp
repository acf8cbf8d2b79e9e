#include "turboquant/cache/flush_policy.h"

#include "turboquant/cache/mixed_precision.h"
#include "turboquant/cache/plain_flush.h"
#include "turboquant/error.h"

namespace turboquant {

void FlushPolicy::check_restore(size_t l, size_t n, const std::vector<const float*>* importance) const {
  const size_t rows = parts_.segments.plan(l).window_rows();
  TQ_CHECK(importance == nullptr, InvalidArgument, "window importance given but this cache has no mixed precision");
  TQ_CHECK(parts_.segments.fp16_layer[l] || n <= rows, InvalidArgument, "window of ", n,
           " tokens exceeds fp16_window + block_tokens = ", rows);
}

void FlushPolicy::check_encoded(size_t /*l*/, size_t /*c0*/, size_t /*n*/,
                                const std::vector<const uint8_t*>* /*decayed*/,
                                const std::vector<const uint64_t*>* masks) const {
  TQ_CHECK(masks == nullptr, InvalidArgument, "mixed-precision masks given but this cache has no mixed precision");
}

std::unique_ptr<FlushPolicy> make_flush_policy(const CacheParts& parts, const MixedPrecisionConfig& mixed) {
  if (mixed.mixed()) return std::make_unique<MixedPrecisionFlush>(parts, mixed);
  return std::make_unique<PlainFlush>(parts);
}

}  // namespace turboquant
