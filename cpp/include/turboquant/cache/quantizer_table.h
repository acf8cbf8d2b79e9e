// The table of a KV cache's quantizers: one per (layer, KV head, role), at the width that
// the configuration gives that stream (key_bits / value_bits, or the per-head and per-layer
// widths of KVCacheConfig::key_head_bits ...), and, when blocks may hold fewer bits
// (temporal decay, mixed precision), one decayed quantizer per stream: the same method and
// rotation at decay_bits (an outlier split: both parts lowered, decayed_split_bits).
//
// Random streams: the quantizer of (layer, kv_head, role) uses
//   stream = make_stream_id(StreamPurpose{0}, layer, 2*(kv_head_offset + kv_head) + role),
// role 0 = key, 1 = value, which each quantizer further xors with its own purpose (rotation,
// QJL), see rng.h. kv_head_offset (0 unless the cache holds a slice of a model's KV heads,
// e.g. one tensor-parallel rank's) makes head h draw the streams of the model's head
// kv_head_offset + h, so a slice encodes exactly as the same heads of a whole-model cache.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "turboquant/cache/config.h"
#include "turboquant/quantizer.h"

namespace turboquant {

enum class KVRole : uint32_t { kKey = 0, kValue = 1 };
uint64_t kv_stream_id(uint32_t layer, uint32_t kv_head, KVRole role);

// Temporal decay of an outlier split (KVCacheConfig::decay_after): the stream's reference
// bits, floor(nominal bits per coordinate) = floor((n_o·outlier_bits + (d - n_o)·bits) / d),
// outlier_bits 0 meaning bits + 1 (n_outliers 0: a plain stream, its bits); and the
// decayed widths {inlier bits, outlier bits}: both parts drop by reference - decay_bits,
// floor 1 bit.
int decay_reference_bits(int head_dim, int bits, int n_outliers, int outlier_bits);
std::array<int, 2> decayed_split_bits(int head_dim, int bits, int n_outliers, int outlier_bits,
                                      int decay_bits);

class QuantizerTable {
 public:
  // config must be valid (KVCacheConfig::validate).
  explicit QuantizerTable(const KVCacheConfig& config);

  // Stream index of (layer, kv_head, role): layer-major, then KV head, then role.
  size_t index(int layer, int kv_head, KVRole role) const {
    return (static_cast<size_t>(layer) * n_kv_heads_ + static_cast<size_t>(kv_head)) * 2 + static_cast<size_t>(role);
  }
  size_t streams() const { return full_.size(); }
  const Quantizer& at(size_t stream) const { return *full_[stream]; }
  // The decayed quantizer of a stream, or nullptr when no block may decay.
  const Quantizer* decayed(size_t stream) const { return decayed_.empty() ? nullptr : decayed_[stream].get(); }
  // The quantizer of a block holding decayed (or full-width) codes.
  const Quantizer& block(size_t stream, bool decayed) const { return decayed ? *decayed_[stream] : *full_[stream]; }
  // Replaces a stream's rotation; its decayed quantizer keeps sharing it. A quantizer
  // this table shares with a copy is replaced by a new one (the copy keeps the old).
  void set_rotation(size_t stream, std::unique_ptr<Rotation> rotation);

  // A copy shares the quantizers (immutable but for set_rotation, which does not change a
  // shared one): KVCache::copy builds none, so no rotation or QJL matrix is made again.
  QuantizerTable(const QuantizerTable&) = default;
  QuantizerTable& operator=(const QuantizerTable&) = delete;

 private:
  size_t n_kv_heads_;
  std::vector<std::shared_ptr<Quantizer>> full_;     // [layer][kv_head][role]
  std::vector<std::shared_ptr<Quantizer>> decayed_;  // same indexing; empty without low blocks
};

}  // namespace turboquant
