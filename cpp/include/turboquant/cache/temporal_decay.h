// Temporal decay, an aging policy (aging_policy.h; KVCacheConfig::decay_after / decay_bits):
// a full code block whose newest token has at least decay_after newer tokens behind it is
// re-quantized in place to decay_bits, and flagged in the page store (page_store.h).
//
// turboquant_mse codes are (‖x‖, indices of the nearest Lloyd-Max centroids of the rotated
// unit vector); the decayed block keeps the norm and the rotation and maps every b-bit index
// to the nearest decay_bits centroid of the same dimension's codebook (a 2^b-entry table),
// then repacks. No fp16/fp32 round trip happens. An outlier split (quantizer_outlier.h) is
// two such parts behind an angle: each part is mapped by its own table at its decayed width
// (decayed_split_bits), the angle bytes and the norm are copied. With norm correction the
// stored norm is ‖x‖/‖ỹ‖; it is rescaled by ‖ỹ_old‖/‖ỹ_new‖, both sums of squared centroids
// (split: cos²φ̃·‖ũ_O‖² + sin²φ̃·‖ũ_I‖²).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "turboquant/cache/aging_policy.h"

namespace turboquant {

// Code->code re-quantization of one stream's rows: bytes [0, header) are copied (an outlier
// split's angle), then each part's indices are mapped through its nearest-centroid table and
// repacked at the decayed width.
struct DecayPart {
  size_t dim = 0, from_offset = 0, to_offset = 0;
  int from_bits = 0, to_bits = 0;
  std::vector<uint8_t> lut;         // from index -> to index
  std::vector<float> from_c, to_c;  // centroids (norm correction: ‖ỹ‖ from codes)
};
struct DecayPlan {
  size_t header = 0;
  std::vector<DecayPart> parts;
  bool split = false;               // parts scaled by the split's cos φ̃ / sin φ̃
};
// The plan from a stream's quantizer to its decayed quantizer (turboquant_mse, plain or an
// outlier split; NotSupported otherwise).
DecayPlan make_decay_plan(const Quantizer& from, const Quantizer& to);

class TemporalDecay final : public AgingPolicy {
 public:
  TemporalDecay(const CacheParts& parts, const AgingConfig& config);
  size_t age(size_t l) override;
  void front_dropped(size_t l, size_t blocks) override { done_[l] -= std::min(done_[l], blocks); }
  void cut(size_t l, size_t codes, size_t size) override;

 private:
  void decay_block(size_t stream, size_t block);

  size_t decay_after_;
  std::vector<DecayPlan> plans_;  // per stream: the widths differ between heads and layers
  std::vector<size_t> done_;      // per layer: leading blocks decayed
};

}  // namespace turboquant
