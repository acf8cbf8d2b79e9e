#include "turboquant/cache/config.h"

#include <algorithm>
#include <utility>

#include "turboquant/cache/quantizer_table.h"
#include "turboquant/error.h"

namespace turboquant {

void CacheShape::validate() const {
  TQ_CHECK(head_dim >= kMinDim && head_dim <= kMaxDim, InvalidArgument, "head_dim must be in [",
           kMinDim, ", ", kMaxDim, "], got ", head_dim);
  TQ_CHECK(n_layers >= 1 && n_layers <= (1 << 16), InvalidArgument,
           "n_layers must be in [1, 65536], got ", n_layers);
  TQ_CHECK(n_kv_heads >= 1 && n_kv_heads <= (1 << 16), InvalidArgument,
           "n_kv_heads must be in [1, 65536], got ", n_kv_heads);
  TQ_CHECK(kv_head_offset >= 0 && kv_head_offset <= (1 << 16) - n_kv_heads, InvalidArgument,
           "kv_head_offset must be in [0, 65536 - n_kv_heads = ", (1 << 16) - n_kv_heads,
           "] (the model's KV head numbers kv_head_offset .. kv_head_offset + n_kv_heads - 1 stay below "
           "65536), got ", kv_head_offset);
  TQ_CHECK(n_q_heads >= 1 && n_q_heads <= (1 << 20), InvalidArgument,
           "n_q_heads must be in [1, 1048576], got ", n_q_heads);
  TQ_CHECK(n_q_heads % n_kv_heads == 0, InvalidArgument, "n_q_heads (", n_q_heads,
           ") must be a multiple of n_kv_heads (", n_kv_heads, ")");
  TQ_CHECK(static_cast<int64_t>(n_layers) * n_kv_heads <= (int64_t{1} << 20), InvalidArgument,
           "n_layers * n_kv_heads must be at most 1048576, got ", n_layers, " * ", n_kv_heads);
}

void KVQuantization::validate(int head_dim) const {
  TQ_CHECK(key_bits >= kMinBits && key_bits <= kMaxBits, InvalidArgument, "key_bits must be in [",
           kMinBits, ", ", kMaxBits, "], got ", key_bits);
  TQ_CHECK(value_bits >= kMinBits && value_bits <= kMaxBits, InvalidArgument,
           "value_bits must be in [", kMinBits, ", ", kMaxBits, "], got ", value_bits);
  TQ_CHECK(jl_dim >= 0 && jl_dim <= 8 * kMaxDim, InvalidArgument, "jl_dim must be in [0, ",
           8 * kMaxDim, "] (0 means head_dim), got ", jl_dim);
  TQ_CHECK(n_outlier_channels >= 0 && n_outlier_channels < head_dim, InvalidArgument,
           "n_outlier_channels must be in [0, ", head_dim - 1, "], got ", n_outlier_channels);
  TQ_CHECK(outlier_bits >= 0 && outlier_bits <= kMaxBits, InvalidArgument,
           "outlier_bits must be in [0, ", kMaxBits, "] (0 means bits + 1), got ", outlier_bits);
  TQ_CHECK(static_cast<uint32_t>(outlier_roles) <= 2, InvalidArgument,
           "outlier_roles must be both, keys or values");
  TQ_CHECK(split_angle_bits == 8 || split_angle_bits == 16, InvalidArgument,
           "split_angle_bits must be 8 or 16, got ", split_angle_bits);
  TQ_CHECK(!norm_correction || (key_method == "turboquant_mse" && value_method == "turboquant_mse"),
           InvalidArgument, "norm_correction needs turboquant_mse keys and values, got ", key_method,
           " / ", value_method);
}

void HeadWidths::validate(const CacheShape& shape, bool has_outliers) const {
  const size_t per_layer = static_cast<size_t>(shape.n_layers) * static_cast<size_t>(shape.n_kv_heads);
  for (const auto& [v, name] : {std::pair{&key_head_bits, "key_head_bits"},
                                 std::pair{&value_head_bits, "value_head_bits"},
                                 std::pair{&outlier_head_bits, "outlier_head_bits"}}) {
    if (v->empty()) continue;
    TQ_CHECK(v->size() == static_cast<size_t>(shape.n_kv_heads) || v->size() == per_layer, InvalidArgument, name,
             " must be empty, have one entry per KV head (n_kv_heads = ", shape.n_kv_heads,
             ") or one per layer and KV head (n_layers * n_kv_heads = ", per_layer, "), got ", v->size(),
             " entries");
    const bool outl = v == &outlier_head_bits;
    for (size_t i = 0; i < v->size(); ++i)
      TQ_CHECK((*v)[i] >= (outl ? 0 : kMinBits) && (*v)[i] <= kMaxBits, InvalidArgument, name, "[", i,
               "] must be in [", outl ? 0 : kMinBits, ", ", kMaxBits, "]", outl ? " (0 means bits + 1)" : "",
               ", got ", (*v)[i]);
  }
  TQ_CHECK(outlier_head_bits.empty() || has_outliers, InvalidArgument,
           "outlier_head_bits needs an outlier split (n_outlier_channels or outlier_channels)");
}

void SegmentsConfig::validate(int n_layers) const {
  TQ_CHECK(block_tokens >= 1 && block_tokens <= (size_t{1} << 20), InvalidArgument,
           "block_tokens must be in [1, 1048576], got ", block_tokens);
  TQ_CHECK(fp16_window <= (size_t{1} << 24), InvalidArgument, "fp16_window must be in [0, 16777216], got ",
           fp16_window);
  for (int l : fp16_layers)
    TQ_CHECK(l >= 0 && l < n_layers, InvalidArgument, "fp16_layers entry ", l, " is not a layer in [0, ",
             n_layers, ")");
  TQ_CHECK(fp16_sinks <= (size_t{1} << 24), InvalidArgument, "fp16_sinks must be in [0, 16777216], got ",
           fp16_sinks);
  TQ_CHECK(max_tokens == 0 || fp16_sinks <= max_tokens, InvalidArgument, "fp16_sinks (", fp16_sinks,
           ") exceeds max_tokens (", max_tokens, ")");
}

void AgingConfig::validate(size_t block_tokens) const {
  TQ_CHECK(decay_after <= (size_t{1} << 40), InvalidArgument, "decay_after must be in [0, 2^40], got ",
           decay_after);
  TQ_CHECK(max_coded_tokens == 0 || (max_coded_tokens >= block_tokens && max_coded_tokens <= (size_t{1} << 40)),
           InvalidArgument, "max_coded_tokens must be 0 (off) or in [block_tokens = ", block_tokens,
           ", 2^40], got ", max_coded_tokens);
}

void MixedPrecisionConfig::validate(const SegmentsConfig& segments, const AgingConfig& aging) const {
  if (!mixed()) {
    TQ_CHECK(mixed_keep_blocks == 0, InvalidArgument, "mixed_keep_blocks (", mixed_keep_blocks,
             ") is set but mixed_group_blocks is 0 (mixed precision off)");
    return;
  }
  const size_t bt = segments.block_tokens;
  TQ_CHECK(mixed_keep_blocks >= 1 && mixed_keep_blocks < mixed_group_blocks, InvalidArgument,
           "mixed_keep_blocks must be in [1, mixed_group_blocks - 1 = ", mixed_group_blocks - 1, "], got ",
           mixed_keep_blocks);
  TQ_CHECK(mixed_group_blocks <= 4096 && mixed_group_blocks * bt <= 4096, InvalidArgument,
           "a mixed-precision flush group (mixed_group_blocks × block_tokens) must hold at most 4096 tokens, got ",
           mixed_group_blocks, " × ", bt);
  TQ_CHECK(segments.fp16_window > 0, InvalidArgument,
           "mixed precision (mixed_group_blocks) needs an fp16 window (fp16_window > 0): token importance is "
           "measured while tokens are fp16");
  TQ_CHECK(aging.decay_after == 0 && aging.max_coded_tokens == 0, NotSupported,
           "mixed precision does not combine with temporal decay (decay_after) or eviction (max_coded_tokens)");
}

void KVCacheConfig::validate() const {
  CacheShape::validate();
  KVQuantization::validate(head_dim);
  HeadWidths::validate(shape(), has_outliers());
  SegmentsConfig::validate(n_layers);
  AgingConfig::validate(block_tokens);
  MixedPrecisionConfig::validate(segments(), aging());
  // decay_bits spans the groups: its range depends on every stream's width.
  if (!low_blocks()) {
    TQ_CHECK(decay_bits == 0, InvalidArgument, "decay_bits (", decay_bits,
             ") is set but decay_after is 0 (temporal decay off); set decay_after > 0 or decay_bits = 0");
  } else {
    // Reference bits of each role: its bits, or for an outlier split its nominal bits rounded
    // down (decay_reference_bits).
    const int n_o = outlier_channels.empty() ? n_outlier_channels : static_cast<int>(outlier_channels.size());
    // With per-head bits: the least over every (layer, head).
    int lo = kMaxBits + 1;
    for (int l = 0; l < n_layers; ++l)
      for (int h = 0; h < n_kv_heads; ++h)
        for (int role = 0; role < 2; ++role) {
          const int b = head_bits(l, h, role);
          lo = std::min(lo, split_role(role) ? decay_reference_bits(head_dim, b, n_o, head_outlier_bits(l, h)) : b);
        }
    TQ_CHECK(decay_bits >= kMinBits && decay_bits < lo, InvalidArgument, "decay_bits must be in [", kMinBits,
             ", ", lo - 1, "] (fewer than the streams' bits per coordinate, at least ", lo,
             " with an outlier split counted as its nominal bits rounded down",
             per_head_bits() ? ", the least over the per-head widths" : "", "), got ", decay_bits);
    for (const std::string* m : {&key_method, &value_method})
      TQ_CHECK(*m == "turboquant_mse", NotSupported,
               mixed() ? "mixed precision (mixed_group_blocks) needs turboquant_mse keys and values; got method '"
                       : "temporal decay (decay_after) needs turboquant_mse keys and values (re-quantization "
                         "by a code->code table); got method '",
               *m, "'");
  }
}

}  // namespace turboquant
