// The configuration of a KV cache (kv_cache.h), in groups: the model's shape, the
// quantization of keys and values, the segments of a layer (fp16 sinks | code pages | fp16
// window), the aging policies (temporal decay, eviction), importance-routed mixed precision
// and per-head widths. Each group validates its own fields (validate(), one clear error
// naming the field); KVCacheConfig validates the groups in that order and then the rules
// that span groups. The fields stay reachable by their flat names (KVCacheConfig derives
// from every group: config.fp16_window), and each group by its name (config.segments()).
// The derived queries (windowed(), decays(), head_bits(), format_version(), ...) are the one
// definition of each rule.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "turboquant/quantizer.h"

namespace turboquant {

enum class OutlierRoles : uint32_t { kBoth = 0, kKeys = 1, kValues = 2 };

// The model's shape as the cache sees it.
struct CacheShape {
  int head_dim = 128;
  int n_layers = 1;
  int n_q_heads = 1;
  int n_kv_heads = 1;
  // The model's number of this cache's KV head 0 (0 = the cache holds the model's heads from
  // the first): head h uses the random streams of model head kv_head_offset + h
  // (quantizer_table.h). A tensor-parallel rank r of n holding KV heads [r·H/n, (r+1)·H/n)
  // of a model with H sets r·H/n. The model's head numbers must stay below 65536 (the
  // n_kv_heads limit): kv_head_offset + n_kv_heads <= 65536. Per-head lists (key_head_bits,
  // ...) index the cache's own heads. Saved in its own file section (serialize.h; not in
  // versions 1-7).
  int kv_head_offset = 0;

  void validate() const;
  int group_size() const { return n_q_heads / n_kv_heads; }
};

// How keys and values are quantized (quantizer.h).
struct KVQuantization {
  std::string key_method = "turboquant_mse";
  int key_bits = 3;
  std::string value_method = "turboquant_mse";
  int value_bits = 3;
  uint64_t seed = 0;
  RotationKind rotation = RotationKind::kAuto;
  int jl_dim = 0;               // QJL sketch size for prod/qjl; 0 means head_dim
  // Outlier split / fractional bits for keys and values (quantizer_outlier.h): the outlier
  // channels at outlier_bits (0 means bits + 1), the rest at key_bits / value_bits.
  // outlier_channels empty: the first n_outlier_channels channels.
  std::vector<int> outlier_channels;
  int n_outlier_channels = 0;
  int outlier_bits = 0;
  // Which streams get the outlier split: both (default), keys only or values only. Keys often
  // carry their energy in a few channels (RoPE pairs) while values do not.
  OutlierRoles outlier_roles = OutlierRoles::kBoth;
  // Width of the split's per-vector part angle (QuantizerConfig::split_angle_bits): 8 or 16.
  // Files before format version 4 hold 16-bit angles; 8 needs version 4.
  int split_angle_bits = 8;
  // turboquant_mse only: store ‖x‖/‖x̃‖ instead of ‖x‖ (QuantizerConfig::norm_correction), so
  // every decoded key/value has exactly its original norm. This removes the Lloyd-Max
  // shrinkage (E‖x̃‖² = 1 − D_b) per vector: scores are not systematically too small (a
  // hotter softmax) and outputs not too short, at no cost in bytes.
  bool norm_correction = false;

  void validate(int head_dim) const;
  bool has_outliers() const { return n_outlier_channels > 0 || !outlier_channels.empty(); }
  // Whether the keys (role 0) / values (role 1) get the outlier split (outlier_roles).
  bool split_role(int role) const {
    if (n_outlier_channels == 0 && outlier_channels.empty()) return false;
    return outlier_roles == OutlierRoles::kBoth || (outlier_roles == OutlierRoles::kKeys) == (role == 0);
  }
};

// Per-KV-head bit widths (adaptive bits; empty = every head at key_bits / value_bits),
// each in [1, 8], either n_kv_heads entries (KV head h of every layer stores its keys at
// key_head_bits[h] and its values at value_head_bits[h] bits) or n_layers × n_kv_heads
// entries, layer-major (entry l * n_kv_heads + h is layer l's head h: a calibrated
// per-layer, per-head profile). Rows differ in size between heads (each stream's pages,
// copy_out / append_encoded rows at its own width). outlier_head_bits (outlier split
// only): the outlier bits the same way (0 = that stream's bits + 1), overriding
// outlier_bits. Any of them needs file format version 5; a per-layer list (n_layers > 1)
// version 6. The quantizer table (quantizer_table.h) resolves them per stream.
struct HeadWidths {
  std::vector<int> key_head_bits;
  std::vector<int> value_head_bits;
  std::vector<int> outlier_head_bits;

  void validate(const CacheShape& shape, bool has_outliers) const;
  bool per_head_bits() const {
    return !key_head_bits.empty() || !value_head_bits.empty() || !outlier_head_bits.empty();
  }
};

// The segments of a layer (segments.h): pages of codes, an fp16 window and fp16 sinks.
struct SegmentsConfig {
  size_t block_tokens = 256;    // tokens per page
  size_t max_tokens = 0;        // per layer; 0 means unbounded
  // fp16 recent window (KIVI-style): the most recent tokens of every layer / KV head are kept
  // as fp16 (0 = off). Once a layer's window holds more than fp16_window + block_tokens
  // tokens, its oldest block_tokens tokens are quantized into codes, so at least fp16_window
  // recent tokens stay exact. Codes are those of the fp16-rounded tokens, so the content is
  // the same however the tokens were split into append() calls.
  size_t fp16_window = 0;
  // Layers stored entirely in fp16 (an unbounded window: never flushed into codes).
  std::vector<int> fp16_layers;
  // fp16 attention sinks (StreamingLLM / KVQuant): the first fp16_sinks tokens of every
  // (non-fp16) layer stay fp16 forever; codes then hold [fp16_sinks, coded) and the recent
  // window [coded, size). 0 = off. Implies the windowed layout (a window of at most
  // fp16_window + block_tokens tokens, 0 + block_tokens when fp16_window is 0).
  size_t fp16_sinks = 0;

  void validate(int n_layers) const;
  bool windowed() const { return fp16_window > 0 || !fp16_layers.empty() || fp16_sinks > 0; }
};

// The aging policies (aging_policy.h).
struct AgingConfig {
  // Temporal decay (0 = off): once at least decay_after tokens follow a full coded block's
  // newest token, the block is re-quantized in place from key_bits / value_bits to decay_bits
  // (turboquant_mse only: a code->code table maps every centroid index to the nearest
  // decay_bits centroid; rotation unchanged, so no fp16 round trip). Other methods are
  // refused with NotSupported. Norms are kept, except with norm_correction, where each is
  // rescaled by ‖ỹ_old‖/‖ỹ_new‖ (both computed from the codes) so decoded vectors keep their
  // norm. Outlier-split streams (quantizer_outlier.h) decay part by part: both parts drop by
  // decay_reference_bits() - decay_bits bits (floor 1 bit), angle and norm copied, so a
  // split of 64 channels at 4 bits + 64 at 2 (3 bits per coordinate) decays to 2 bits as
  // 3 + 1. decay_bits must be in [1, the smallest reference bits of the two roles). Mixed
  // precision encodes its low tokens at decay_bits too.
  size_t decay_after = 0;
  int decay_bits = 0;
  // Eviction (StreamingLLM-like, 0 = off): while a layer holds more than max_coded_tokens
  // code tokens, its oldest code block (right after the sinks) is dropped. The layer's
  // size() then counts the stored tokens only (sinks + codes + window, in order) and
  // evicted_tokens(layer) how many were dropped; positions (RoPE) are the caller's. Must be
  // 0 or at least block_tokens.
  size_t max_coded_tokens = 0;

  // decay_bits is checked by KVCacheConfig::validate (its range depends on the widths).
  void validate(size_t block_tokens) const;
  bool decays() const { return decay_after > 0; }
};

// Importance-routed mixed precision (mixed_precision.h; 0 = off; needs fp16_window > 0,
// turboquant_mse, no temporal decay or eviction). Each window token sums the squared softmax
// weights that the query rows of its KV head gave it while it was fp16 (its importance: a
// token's share of the output error that its quantization error would cause). The window is
// flushed in groups of mixed_group_blocks blocks: per KV head, the mixed_keep_blocks ×
// block_tokens most important tokens of the group keep the stream's bits, the others are
// encoded at decay_bits (the decayed quantizer: same rotation, fewer bits; per-block flags
// as for decay), so a group of 2 blocks keeping 1 at 4 bits over 2 averages 3 bits. Codes
// are stored in that order, not by position (the group masks map them back): attention over
// codes needs no position, since every coded token is older than every query. For that,
// only tokens that an attend call has seen are flushed (an append's tokens wait for the
// attention call that follows, so a prefill's own queries rate it, and a converted cache
// is rated by its first query) — unless a layer is appended to without attention calls:
// beyond kMixedUnratedTokens unrated tokens besides the latest append's, the oldest
// groups flush unrated (in position order) — and attend refuses a sliding
// window or causal queries older than a coded token (NotSupported). Trimming into the
// codes must cut at a group boundary. Needs file format version 7.
struct MixedPrecisionConfig {
  size_t mixed_group_blocks = 0;
  size_t mixed_keep_blocks = 0;

  void validate(const SegmentsConfig& segments, const AgingConfig& aging) const;
  bool mixed() const { return mixed_group_blocks > 0; }
};

struct KVCacheConfig : CacheShape, KVQuantization, HeadWidths, SegmentsConfig, AgingConfig, MixedPrecisionConfig {
  const CacheShape& shape() const { return *this; }
  const KVQuantization& quantization() const { return *this; }
  const HeadWidths& head_widths() const { return *this; }
  const SegmentsConfig& segments() const { return *this; }
  const AgingConfig& aging() const { return *this; }
  const MixedPrecisionConfig& mixed_precision() const { return *this; }

  // Validates every group in the order above, then decay_bits (InvalidArgument naming the
  // first bad field; NotSupported for decay or mixed precision of a method that has no
  // code->code table).
  void validate() const;
  // Whether blocks may hold decay_bits codes (temporal decay or mixed precision).
  bool low_blocks() const { return decays() || mixed(); }
  size_t mixed_group_tokens() const { return mixed_group_blocks * block_tokens; }
  // The widths of layer l's KV head h (per-head overrides, else key_bits / value_bits /
  // outlier_bits).
  int head_key_bits(int l, int h) const { return pick(key_head_bits, l, h, key_bits); }
  int head_value_bits(int l, int h) const { return pick(value_head_bits, l, h, value_bits); }
  int head_bits(int l, int h, int role) const { return role == 0 ? head_key_bits(l, h) : head_value_bits(l, h); }
  int head_outlier_bits(int l, int h) const { return pick(outlier_head_bits, l, h, outlier_bits); }
  // Whether a per-head list has one entry per (layer, KV head) of more than one layer.
  bool per_layer_head_bits() const {
    const auto per_layer = [&](const std::vector<int>& v) {
      return n_layers > 1 && v.size() == static_cast<size_t>(n_layers) * static_cast<size_t>(n_kv_heads);
    };
    return per_layer(key_head_bits) || per_layer(value_head_bits) || per_layer(outlier_head_bits);
  }
  // Whether the file format version 3 is needed (sinks, decay, eviction, norm correction or
  // outlier roles other than both).
  bool v3() const {
    return fp16_sinks > 0 || decay_after > 0 || max_coded_tokens > 0 || norm_correction ||
           outlier_roles != OutlierRoles::kBoth;
  }
  // Whether the file format version 4 is needed: an outlier split whose part angle is not
  // the 16 bits that versions 1-3 imply.
  bool v4() const { return has_outliers() && split_angle_bits != 16; }
  // The oldest of the file format versions before the section container (1-7) that can
  // express this configuration: what a legacy save writes (serialize.h).
  uint32_t format_version() const {
    return mixed() ? 7u : per_layer_head_bits() ? 6u : per_head_bits() ? 5u : v4() ? 4u : v3() ? 3u : windowed() ? 2u : 1u;
  }

 private:
  int pick(const std::vector<int>& v, int l, int h, int otherwise) const {
    if (v.empty()) return otherwise;
    const size_t i = v.size() == static_cast<size_t>(n_kv_heads)
                         ? static_cast<size_t>(h)
                         : static_cast<size_t>(l) * static_cast<size_t>(n_kv_heads) + static_cast<size_t>(h);
    return v[i];
  }
};

}  // namespace turboquant
