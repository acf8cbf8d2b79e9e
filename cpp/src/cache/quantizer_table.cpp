#include "turboquant/cache/quantizer_table.h"

#include <algorithm>

#include "turboquant/rng.h"

namespace turboquant {

uint64_t kv_stream_id(uint32_t layer, uint32_t kv_head, KVRole role) {
  return make_stream_id(static_cast<StreamPurpose>(0), layer,
                        2 * kv_head + static_cast<uint32_t>(role));
}

int decay_reference_bits(int head_dim, int bits, int n_outliers, int outlier_bits) {
  if (n_outliers <= 0) return bits;
  const int ob = outlier_bits ? outlier_bits : std::min(bits + 1, kMaxBits);
  return (n_outliers * ob + (head_dim - n_outliers) * bits) / head_dim;
}

std::array<int, 2> decayed_split_bits(int head_dim, int bits, int n_outliers, int outlier_bits, int decay_bits) {
  const int ob = outlier_bits ? outlier_bits : std::min(bits + 1, kMaxBits);
  const int drop = decay_reference_bits(head_dim, bits, n_outliers, outlier_bits) - decay_bits;
  return {std::max(kMinBits, bits - drop), std::max(kMinBits, ob - drop)};
}

QuantizerTable::QuantizerTable(const KVCacheConfig& config) : n_kv_heads_(static_cast<size_t>(config.n_kv_heads)) {
  const size_t streams = static_cast<size_t>(config.n_layers) * config.n_kv_heads * 2;
  full_.reserve(streams);
  for (int l = 0; l < config.n_layers; ++l) {
    for (int h = 0; h < config.n_kv_heads; ++h) {
      for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
        QuantizerConfig q;
        q.method = role == KVRole::kKey ? config.key_method : config.value_method;
        q.bits = config.head_bits(l, h, static_cast<int>(role));
        q.dim = config.head_dim;
        q.seed = config.seed;
        q.stream = kv_stream_id(static_cast<uint32_t>(l), static_cast<uint32_t>(config.kv_head_offset + h), role);
        q.rotation = config.rotation;
        q.jl_dim = config.jl_dim;
        q.norm_dtype = NormDtype::kFloat16;
        if (config.split_role(static_cast<int>(role))) {
          q.outlier_channels = config.outlier_channels;
          q.n_outlier_channels = config.n_outlier_channels;
          q.outlier_bits = config.head_outlier_bits(l, h);
          q.split_angle_bits = config.split_angle_bits;
        }
        q.norm_correction = config.norm_correction;
        full_.push_back(make_quantizer(q));
      }
    }
  }
  if (!config.low_blocks()) return;
  decayed_.reserve(full_.size());
  for (const auto& q : full_) {
    QuantizerConfig c = q->config();
    if (c.has_outliers()) {  // config() holds the resolved channels and outlier_bits
      const auto bits = decayed_split_bits(c.dim, c.bits, static_cast<int>(c.outlier_channels.size()),
                                           c.outlier_bits, config.decay_bits);
      c.bits = bits[0];
      c.outlier_bits = bits[1];
    } else {
      c.bits = config.decay_bits;
    }
    decayed_.push_back(make_quantizer(c));
    decayed_.back()->share_rotation(*q);  // one rotation per stream in memory
  }
}

void QuantizerTable::set_rotation(size_t stream, std::unique_ptr<Rotation> rotation) {
  // config() holds the resolved settings: the same quantizer, built again, for this table alone
  if (full_[stream].use_count() > 1) full_[stream] = make_quantizer(full_[stream]->config());
  full_[stream]->set_rotation(std::move(rotation));
  if (decayed_.empty()) return;
  if (decayed_[stream].use_count() > 1) decayed_[stream] = make_quantizer(decayed_[stream]->config());
  decayed_[stream]->share_rotation(*full_[stream]);
}

}  // namespace turboquant
