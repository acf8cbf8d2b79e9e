// The compressed KV cache (DESIGN §2-§3): for every layer and KV head, keys and values are
// stored only as quantizer codes plus fp16 norms, in paged blocks of `block_tokens` tokens
// (codes and norms in separate arrays; growing the cache allocates new blocks and never
// moves old ones). Keys and values have independent methods and bit widths. Attention is
// answered from the codes by attention.h; fp16 K/V are never rebuilt.
//
// Random streams: the quantizer of (layer, kv_head, role) uses
//   stream = make_stream_id(StreamPurpose{0}, layer, 2*(kv_head_offset + kv_head) + role),
// role 0 = key, 1 = value, which each quantizer further xors with its own purpose (rotation,
// QJL), see rng.h. kv_head_offset (0 unless the cache holds a slice of a model's KV heads,
// e.g. one tensor-parallel rank's) makes head h draw the streams of the model's head
// kv_head_offset + h, so a slice encodes exactly as the same heads of a whole-model cache.
//
// Thread safety: readers (attend, size, memory_bytes, fp16_bytes, copy_out, save) may run
// concurrently from any number of threads. Mutators (append, append_encoded, trim, truncate,
// set_rotation) need exclusive access: a mutator that overlaps any other guarded call on the
// same cache, or a reader that overlaps a mutator, throws ConcurrentAccess before touching
// anything (a checked flag, never a silent data race). Callers that share a cache between
// threads serialize mutation themselves (e.g. one writer thread, or a lock around append).
// With mixed precision, attend also adds to the window tokens' importance and the layer's
// rated count, under a lock of their own, so concurrent attends stay safe.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "turboquant/quantizer.h"

namespace turboquant {

enum class OutlierRoles : uint32_t { kBoth = 0, kKeys = 1, kValues = 2 };

struct KVCacheConfig {
  int head_dim = 128;
  int n_layers = 1;
  int n_q_heads = 1;
  int n_kv_heads = 1;
  std::string key_method = "turboquant_mse";
  int key_bits = 3;
  std::string value_method = "turboquant_mse";
  int value_bits = 3;
  uint64_t seed = 0;
  RotationKind rotation = RotationKind::kAuto;
  int jl_dim = 0;               // QJL sketch size for prod/qjl; 0 means head_dim
  size_t block_tokens = 256;    // tokens per page
  size_t max_tokens = 0;        // per layer; 0 means unbounded
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
  // Temporal decay (0 = off): once at least decay_after tokens follow a full coded block's
  // newest token, the block is re-quantized in place from key_bits / value_bits to decay_bits
  // (turboquant_mse only: a code->code table maps every centroid index to the nearest
  // decay_bits centroid; rotation unchanged, so no fp16 round trip). Other methods are
  // refused with NotSupported. Norms are kept, except with norm_correction, where each is
  // rescaled by ‖ỹ_old‖/‖ỹ_new‖ (both computed from the codes) so decoded vectors keep their
  // norm. Outlier-split streams (quantizer_outlier.h) decay part by part: both parts drop by
  // decay_reference_bits() - decay_bits bits (floor 1 bit), angle and norm copied, so a
  // split of 64 channels at 4 bits + 64 at 2 (3 bits per coordinate) decays to 2 bits as
  // 3 + 1. decay_bits must be in [1, the smallest reference bits of the two roles).
  size_t decay_after = 0;
  int decay_bits = 0;
  // Eviction (StreamingLLM-like, 0 = off): while a layer holds more than max_coded_tokens
  // code tokens, its oldest code block (right after the sinks) is dropped. The layer's
  // size() then counts the stored tokens only (sinks + codes + window, in order) and
  // evicted_tokens(layer) how many were dropped; positions (RoPE) are the caller's. Must be
  // 0 or at least block_tokens.
  size_t max_coded_tokens = 0;
  // Per-KV-head bit widths (adaptive bits; empty = every head at key_bits / value_bits),
  // each in [1, 8], either n_kv_heads entries (KV head h of every layer stores its keys at
  // key_head_bits[h] and its values at value_head_bits[h] bits) or n_layers × n_kv_heads
  // entries, layer-major (entry l * n_kv_heads + h is layer l's head h: a calibrated
  // per-layer, per-head profile). Rows differ in size between heads (each stream's pages,
  // copy_out / append_encoded rows at its own width). outlier_head_bits (outlier split
  // only): the outlier bits the same way (0 = that stream's bits + 1), overriding
  // outlier_bits. Any of them needs file format version 5; a per-layer list (n_layers > 1)
  // version 6.
  std::vector<int> key_head_bits;
  std::vector<int> value_head_bits;
  std::vector<int> outlier_head_bits;
  // Importance-routed mixed precision (0 = off; needs fp16_window > 0, turboquant_mse, no
  // temporal decay or eviction). Each window token sums the squared softmax weights that the
  // query rows of its KV head gave it while it was fp16 (its importance: a token's share of
  // the output error that its quantization error would cause). The window is
  // flushed in groups of mixed_group_blocks blocks: per KV head, the mixed_keep_blocks ×
  // block_tokens most important tokens of the group keep the stream's bits, the others are
  // encoded at decay_bits (the decayed quantizer: same rotation, fewer bits; per-block flags
  // as for decay), so a group of 2 blocks keeping 1 at 4 bits over 2 averages 3 bits. Codes
  // are stored in that order, not by position (mixed_order maps them back): attention over
  // codes needs no position, since every coded token is older than every query. For that,
  // only tokens that an attend call has seen are flushed (an append's tokens wait for the
  // attention call that follows, so a prefill's own queries rate it, and a converted cache
  // is rated by its first query) — unless a layer is appended to without attention calls:
  // beyond kMixedUnratedTokens unrated tokens besides the latest append's, the oldest
  // groups flush unrated (in position order) — and attend refuses a sliding
  // window or causal queries older than a coded token (NotSupported). Trimming into the
  // codes must cut at a group boundary. Needs file format version 7.
  size_t mixed_group_blocks = 0;
  size_t mixed_keep_blocks = 0;
  // The model's number of this cache's KV head 0 (0 = the cache holds the model's heads from
  // the first): head h uses the random streams of model head kv_head_offset + h (see the top
  // of this file). A tensor-parallel rank r of n holding KV heads [r·H/n, (r+1)·H/n) of a
  // model with H sets r·H/n. The model's head numbers must stay below 65536 (the n_kv_heads
  // limit): kv_head_offset + n_kv_heads <= 65536. Per-head lists (key_head_bits, ...) index
  // the cache's own heads. Saved in its own file section (serialize.h; not in versions 1-7).
  int kv_head_offset = 0;

  // Throws InvalidArgument naming the first bad field (NotSupported for decay of a method
  // that has no code->code table).
  void validate() const;
  int group_size() const { return n_q_heads / n_kv_heads; }
  bool windowed() const { return fp16_window > 0 || !fp16_layers.empty() || fp16_sinks > 0; }
  // Whether the keys (role 0) / values (role 1) get the outlier split (outlier_roles).
  bool split_role(int role) const {
    if (n_outlier_channels == 0 && outlier_channels.empty()) return false;
    return outlier_roles == OutlierRoles::kBoth || (outlier_roles == OutlierRoles::kKeys) == (role == 0);
  }
  bool decays() const { return decay_after > 0; }
  bool mixed() const { return mixed_group_blocks > 0; }
  // Whether blocks may hold decay_bits codes (temporal decay or mixed precision).
  bool low_blocks() const { return decays() || mixed(); }
  size_t mixed_group_tokens() const { return mixed_group_blocks * block_tokens; }
  // The widths of layer l's KV head h (per-head overrides, else key_bits / value_bits /
  // outlier_bits).
  int head_key_bits(int l, int h) const { return pick(key_head_bits, l, h, key_bits); }
  int head_value_bits(int l, int h) const { return pick(value_head_bits, l, h, value_bits); }
  int head_bits(int l, int h, int role) const { return role == 0 ? head_key_bits(l, h) : head_value_bits(l, h); }
  int head_outlier_bits(int l, int h) const { return pick(outlier_head_bits, l, h, outlier_bits); }
  bool per_head_bits() const {
    return !key_head_bits.empty() || !value_head_bits.empty() || !outlier_head_bits.empty();
  }
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
  bool has_outliers() const { return n_outlier_channels > 0 || !outlier_channels.empty(); }
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

// Temporal decay of an outlier split (KVCacheConfig::decay_after): the stream's reference
// bits, floor(nominal bits per coordinate) = floor((n_o·outlier_bits + (d - n_o)·bits) / d),
// outlier_bits 0 meaning bits + 1 (n_outliers 0: a plain stream, its bits); and the
// decayed widths {inlier bits, outlier bits}: both parts drop by reference - decay_bits,
// floor 1 bit.
int decay_reference_bits(int head_dim, int bits, int n_outliers, int outlier_bits);
std::array<int, 2> decayed_split_bits(int head_dim, int bits, int n_outliers, int outlier_bits,
                                      int decay_bits);

enum class KVRole : uint32_t { kKey = 0, kValue = 1 };
uint64_t kv_stream_id(uint32_t layer, uint32_t kv_head, KVRole role);

// The pages of one (layer, kv_head, role): block b holds tokens [b*bt, (b+1)*bt).
struct PagedCodes {
  std::vector<std::unique_ptr<uint8_t[]>> code_blocks;  // bt × code_bytes each
  std::vector<std::unique_ptr<uint8_t[]>> norm_blocks;  // bt × norm_bytes each (fp16)
  // Temporal decay only (empty otherwise): 1 where the block holds decay_bits codes
  // (bt × the decayed quantizer's code_bytes), 0 where it holds the stream's own bits.
  std::vector<uint8_t> decayed;
  bool is_decayed(size_t b) const { return b < decayed.size() && decayed[b] != 0; }
};

// A read-only view of one head's codes for the attention kernels.
struct HeadCodes {
  const Quantizer* quantizer = nullptr;
  const PagedCodes* pages = nullptr;
  size_t block_tokens = 0;
  // Quantizer of decayed blocks (pages->decayed): same method and rotation, fewer bits.
  const Quantizer* decayed = nullptr;
  const Quantizer& block_quantizer(size_t b) const {
    return pages->is_decayed(b) ? *decayed : *quantizer;
  }
};

struct AttentionOptions {
  bool causal = true;
  std::optional<float> scale;     // default 1/sqrt(head_dim)
  std::optional<size_t> window;   // sliding window: a query sees at most the last w keys
  // fp16 sinks (KVCacheConfig::fp16_sinks) stay visible to every query whatever the window:
  // a query sees its causal sinks plus the last `window` tokens (mlx-lm's RotatingKVCache
  // `keep` tokens, StreamingLLM). With eviction the stored tokens after the sinks are the
  // most recent ones, so the window counts them, not positions.
  bool sinks_visible = false;
  // Sparse V (0 = dense): on each page, value rows whose softmax weight exp(s - m) is below
  // sparse_v_threshold are skipped in the value sum, where m is the query's running maximum
  // score so far (online softmax). m never exceeds the final maximum, so every skipped row has
  // weight < threshold × (the query's maximum weight); the normalisation still sums all
  // weights. Error: |o - o_dense| <= Σ_skipped p_i |v_i| (p normalised). Applies to the
  // decode path (fewer than kGemmMinRows query rows per KV head) and to the fp16 window; the
  // prefill GEMM path stays dense (its pages serve many rows, so almost no row is skippable).
  // Coded pages: a value row is skipped for all query rows of the KV head when every one of
  // them weights it below the threshold (it is decoded once for all of them), and kept with
  // every row's exact weight otherwise, so the bound above holds for each query row; the
  // value sum decodes only the kept rows (Quantizer::accumulate_rows), and a page with none
  // costs its key scores only. The fp16 window drops each (row, token) weight on its own.
  float sparse_v_threshold = 0.0f;
};

class KVCache {
 public:
  explicit KVCache(const KVCacheConfig& config);
  // Mixed precision: how many fp16 window tokens a layer holds at most without attention
  // calls before its oldest groups are flushed unrated.
  static constexpr size_t kMixedUnratedTokens = 4096;

  const KVCacheConfig& config() const { return config_; }
  int head_dim() const { return config_.head_dim; }

  // Appends T tokens to one layer: keys and values are n_kv_heads × T × head_dim fp32
  // (head-major). Validates everything first; on error the cache is unchanged.
  void append(int layer, const float* keys, const float* values, size_t T);

  // Attention of T_q queries per query head over the layer's tokens. queries and out are
  // n_q_heads × T_q × head_dim. The queries are the LAST T_q positions of the layer:
  // query t (0-based) sits at position size - T_q + t and, when causal, sees keys
  // [0, size - T_q + t]; with a window w only the last w of those. Non-causal queries see
  // every key (the last w with a window). Query heads of one KV head are processed
  // together (GQA), so its codes are read once per call.
  void attend(int layer, const float* queries, size_t T_q, float* out,
              const AttentionOptions& options = {}) const;

  size_t size(int layer = 0) const;
  // Removes the last n tokens of every layer (fewer when a layer is shorter); frees pages
  // no longer needed. Returns the number removed from layer 0.
  size_t trim(size_t n);
  // Truncates every layer to at most `length` tokens.
  void truncate(size_t length);

  // Every byte this cache allocated for data: code and norm pages (each block at its own
  // bits with decay), fp16 sink and window rows (capacity), and the quantizers' own state
  // (rotations, QJL matrices; the decayed quantizers share their stream's rotation). Bookkeeping (vectors of
  // pointers, decay flags) is not counted.
  size_t memory_bytes() const;
  // Bytes the same tokens would take as fp16 K and V.
  size_t fp16_bytes() const;
  // Bytes holding the stored tokens of one layer, all heads, keys and values: codes at each
  // block's own width (decayed blocks at theirs), fp16 norms, and 2·head_dim per fp16 sink or
  // window row. Unlike memory_bytes(): no quantizer state, no unused page or window slack.
  size_t token_bytes(int layer) const;

  const Quantizer& key_quantizer(int layer, int kv_head) const;
  const Quantizer& value_quantizer(int layer, int kv_head) const;
  // Replaces a quantizer's rotation (artifact stores); only while the cache is empty.
  void set_rotation(int layer, int kv_head, KVRole role, std::unique_ptr<Rotation> rotation);

  HeadCodes head_codes(int layer, int kv_head, KVRole role) const;
  // fp16 window (config.fp16_window / fp16_layers): tokens [coded_tokens, size) of a layer
  // are held as fp16 rows (window_tokens × head_dim) per stream; [0, coded_tokens) as codes.
  size_t coded_tokens(int layer) const;
  size_t window_tokens(int layer) const { return size(layer) - coded_tokens(layer); }
  const std::vector<uint16_t>& window(int layer, int kv_head, KVRole role) const;
  bool is_fp16_layer(int layer) const;
  // Restores a layer's window (load): n fp16 rows per stream i = 2*kv_head + role; the layer
  // must hold no window tokens. Validates the count against the window limits.
  // importance (mixed precision only, optional): n finite floats >= 0 per KV head.
  void append_window(int layer, size_t n, const std::vector<const uint16_t*>& rows,
                     const std::vector<const float*>* importance = nullptr);
  const PagedCodes& pages(int layer, int kv_head, KVRole role) const;
  // fp16 attention sinks: tokens [0, sink_tokens) of a layer are fp16 rows (sink_tokens ×
  // head_dim per stream); the codes hold tokens [sink_tokens, coded_tokens), i.e.
  // code_tokens = coded_tokens - sink_tokens of them, code index j being token
  // sink_tokens + j (code indices are those of copy_out / append_encoded / pages).
  size_t sink_tokens(int layer) const;
  size_t code_tokens(int layer) const { return coded_tokens(layer) - sink_tokens(layer); }
  const std::vector<uint16_t>& sinks(int layer, int kv_head, KVRole role) const;
  // Restores a layer's sinks (load): n <= fp16_sinks rows per stream into an empty layer.
  void append_sinks(int layer, size_t n, const std::vector<const uint16_t*>& rows);
  // The decoded tokens [start, start + n) of one stream (sinks and window as stored, codes
  // dequantized at their block's bits), n × head_dim fp32.
  void decode_tokens(int layer, int kv_head, KVRole role, size_t start, size_t n, float* out) const;
  // Quantizer of code index t's block in one stream (its code_bytes: bytes per token).
  const Quantizer& block_quantizer(int layer, int kv_head, KVRole role, size_t code_index) const;
  // Tokens of a layer dropped by eviction (max_coded_tokens) since it was empty.
  size_t evicted_tokens(int layer) const;
  // Restores a layer's eviction count (load).
  void set_evicted_tokens(int layer, size_t n);
  // Number of decayed blocks of one stream.
  size_t decayed_blocks(int layer, int kv_head, KVRole role) const;
  // Mixed precision: which tokens of each flush group of one (layer, KV head) kept the
  // stream's bits, as a bit mask per group (bit o of group g: token sink_tokens + g·F + o,
  // F = mixed_group_tokens(); mixed_mask_words() uint64 words per group). Inside a group the
  // codes hold the kept tokens in position order, then the others (even groups), or the
  // others first (odd groups, so that blocks of one width meet across groups).
  const std::vector<uint64_t>& mixed_masks(int layer, int kv_head) const;
  size_t mixed_mask_words() const { return (config_.mixed_group_tokens() + 63) / 64; }
  // The position of every code index of one (layer, KV head) (code_tokens entries).
  std::vector<size_t> mixed_positions(int layer, int kv_head) const;
  // Mixed precision: the importance (sum of squared softmax weights so far) of each window
  // token of one (layer, KV head), window_tokens entries.
  std::vector<float> window_importance(int layer, int kv_head) const;
  // Mixed precision: the leading tokens of a layer that attention calls have rated (its
  // size at the last attend), and its restore (load; at most the layer's size).
  size_t rated_tokens(int layer) const;
  void set_rated_tokens(int layer, size_t n);

  // Serialization (serialize.h defines the file format).
  // The file of serialize.h: version 8, or with `legacy` the oldest of versions 1-7 that
  // expresses the cache.
  void save(const std::string& path, bool legacy = false) const;
  static std::unique_ptr<KVCache> load(const std::string& path);
  // Raw page access used by serialization: copies code indices [t0, t0+n) of one stream;
  // with temporal decay, each token's row has its block's code_bytes (rows are packed).
  void copy_out(int layer, int kv_head, KVRole role, size_t t0, size_t n, uint8_t* codes,
                uint8_t* norms) const;
  // Appends n already-encoded tokens to one layer (load, copies between caches): codes[i]
  // and norms[i] for stream i = 2*kv_head + role, each n rows of that stream's row size.
  // decayed (temporal decay only): per stream, one 0/1 flag per block of the layer's codes
  // after this append (the layer must then end on a block boundary or hold no codes);
  // rows of flagged blocks have the decayed quantizer's code_bytes.
  // masks (mixed precision, required there): per KV head, the groups' masks as mixed_masks
  // gives them (each with mixed_keep_blocks × block_tokens bits set); n and the layer's codes
  // must be whole groups, and the decay flags those the masks imply.
  void append_encoded(int layer, size_t n, const std::vector<const uint8_t*>& codes,
                      const std::vector<const uint8_t*>& norms,
                      const std::vector<const uint8_t*>* decayed = nullptr,
                      const std::vector<const uint64_t*>* masks = nullptr);

 private:
  size_t index(int layer, int kv_head, KVRole role) const;
  void check_layer(int layer) const;
  void ensure_blocks(PagedCodes& p, const Quantizer& q, size_t tokens);
  void release_blocks(PagedCodes& p, size_t tokens);
  void encode_at(size_t stream, size_t pos, const float* x, size_t n);
  void flush_window(int layer, size_t keep_new = 0);
  void flush_group(size_t layer);        // mixed precision: one group of the window
  void note_importance(size_t layer, size_t kv_head, const float* w, size_t n) const;
  void reserve_window(std::vector<uint16_t>& w) const;
  void append_windowed(int layer, const float* keys, const float* values, size_t T);
  void shrink_layer(size_t layer, size_t new_size);
  void attend_windowed(int layer, const float* queries, size_t T_q, float* out,
                       const AttentionOptions& options) const;
  void check_alloc(size_t old, size_t tokens) const;  // throws OutOfMemory on overflow
  size_t sink_base(size_t layer) const;   // fp16_sinks, or 0 for fp16 layers
  const Quantizer& stream_block_quantizer(size_t stream, size_t block) const;
  void decay_layer(size_t layer);         // re-quantizes the blocks old enough (decay)
  void decay_block(size_t stream, size_t block);
  void init_decay();
  void evict_layer(size_t layer);         // drops the oldest code blocks (max_coded_tokens)
  class ReadScope;   // RAII guards of the thread-safety rule above (kv_cache.cpp)
  class WriteScope;

  KVCacheConfig config_;
  std::vector<std::unique_ptr<Quantizer>> quantizers_;  // [layer][kv_head][role]
  std::vector<PagedCodes> pages_;                       // same indexing
  std::vector<size_t> sizes_;                           // tokens per layer
  std::vector<size_t> coded_;                           // of which held as codes
  std::vector<std::vector<uint16_t>> windows_;          // fp16 rows, same indexing as pages_
  std::vector<std::vector<uint16_t>> sinks_;            // fp16 sink rows (fp16_sinks > 0)
  std::vector<std::unique_ptr<Quantizer>> decay_quantizers_;  // decay_bits, same indexing
  // Code->code re-quantization of one role's rows (the same for every stream of the role):
  // bytes [0, header) are copied (an outlier split's angle), then each part's indices are
  // mapped through its nearest-centroid table and repacked at the decayed width.
  struct DecayPart {
    size_t dim = 0, from_offset = 0, to_offset = 0;
    int from_bits = 0, to_bits = 0;
    std::vector<uint8_t> lut;                  // from index -> to index
    std::vector<float> from_c, to_c;           // centroids (norm correction: ‖ỹ‖ from codes)
  };
  struct DecayPlan {
    size_t header = 0;
    std::vector<DecayPart> parts;
    bool split = false;                        // parts scaled by the split's cos φ̃ / sin φ̃
  };
  std::vector<DecayPlan> decay_plans_;                  // per stream, same indexing as pages_
  std::vector<size_t> decay_done_;                      // per layer: leading blocks decayed
  std::vector<size_t> evicted_;                         // per layer: tokens evicted
  std::vector<std::vector<uint64_t>> mixed_masks_;      // [layer][kv_head]: kept-token masks
  size_t mixed_code_index(size_t layer, size_t kv_head, size_t code_pos) const;  // position -> index
  size_t mixed_slot(const uint64_t* group_mask, size_t group, size_t offset) const;
  bool mixed_low_block(size_t group, size_t block_in_group) const;
  void check_mixed_cut(size_t layer, size_t new_size) const;
  mutable std::vector<std::vector<float>> importance_;  // [layer][kv_head]: per window token
  mutable std::vector<size_t> rated_;                   // [layer]: size at the last attend
  mutable std::mutex importance_mutex_;                 // attend calls update importance_, rated_
  mutable std::atomic<size_t> readers_{0};              // guarded readers in progress
  mutable std::atomic<bool> writer_{false};             // a mutator in progress
};

}  // namespace turboquant
