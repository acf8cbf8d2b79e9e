// The compressed KV cache (DESIGN §2-§3): for every layer and KV head, keys and values are
// stored as fp16 sinks | quantizer codes plus fp16 norms | an fp16 recent window (the
// segments of cache/segments.h). Keys and values have independent methods and bit widths.
// Attention is answered from the codes by attention.h and merged with the fp16 rows under
// one softmax; fp16 K/V are never rebuilt from the codes.
//
// KVCache is a composition of parts, each in its own file under cache/:
//   config.h           the configuration in groups (shape, quantization, head widths,
//                      segments, aging, mixed precision), each validated on its own;
//   quantizer_table.h  the quantizers per (layer, KV head, role), their widths, the
//                      decayed quantizers and the random-stream scheme;
//   page_store.h       the code pages of every stream, each block at its own width;
//   segments.h         the sinks | codes | window layout of each layer;
//   flush_policy.h     what moves window tokens into codes: plain_flush.h,
//                      mixed_precision.h (importance-routed);
//   aging_policy.h     what happens to old codes: temporal_decay.h, eviction.h.
// The cache validates requests, keeps the thread-safety rule below, and calls the parts;
// attention walks the segments without knowing which policy produced them.
//
// Thread safety: readers (attend, size, memory_bytes, fp16_bytes, copy_out, save) may run
// concurrently from any number of threads. Mutators (append, append_encoded, trim, truncate,
// compact_window, set_rotation) need exclusive access: a mutator that overlaps any other guarded call on the
// same cache, or a reader that overlaps a mutator, throws ConcurrentAccess before touching
// anything (a checked flag, never a silent data race). Callers that share a cache between
// threads serialize mutation themselves (e.g. one writer thread, or a lock around append).
// With mixed precision, attend also adds to the window tokens' importance and the layer's
// rated count, under a lock of their own, so concurrent attends stay safe.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "turboquant/attention.h"
#include "turboquant/cache/aging_policy.h"
#include "turboquant/cache/config.h"
#include "turboquant/cache/flush_policy.h"
#include "turboquant/cache/mixed_precision.h"
#include "turboquant/cache/page_store.h"
#include "turboquant/cache/quantizer_table.h"
#include "turboquant/cache/segments.h"
#include "turboquant/quantizer.h"

namespace turboquant {

class Eviction;

class KVCache {
 public:
  explicit KVCache(const KVCacheConfig& config);
  // Mixed precision: how many fp16 window tokens a layer holds at most without attention
  // calls before its oldest groups are flushed unrated.
  static constexpr size_t kMixedUnratedTokens = MixedPrecisionFlush::kUnratedTokens;

  const KVCacheConfig& config() const { return config_; }
  int head_dim() const { return config_.head_dim; }

  // Appends T tokens to one layer: keys and values are n_kv_heads × T × head_dim fp32
  // (head-major). Validates everything first; on error the cache is unchanged.
  void append(int layer, const float* keys, const float* values, size_t T);
  // Mixed precision: flushes the window groups of one layer that attention calls have rated
  // since its last append (an append flushes only groups rated before it, so a long append
  // would otherwise hold its rated tokens as fp16 rows until the next one); tokens not yet
  // rated stay. Nothing to do without mixed precision (a plain window flushes in append).
  void flush_rated(int layer);

  // Compaction (a prompt parked in a prompt-cache store): moves the whole fp16 window of one
  // layer into codes, its last block partial, and gives the window's memory back, so that
  // memory_bytes() drops by the window's capacity less the codes' bytes; the fp16 sinks
  // stay. Returns the tokens moved. Later appends go to a new window as usual and its
  // flushes fill the codes on from where they end (not a block boundary); cuts, attention
  // and save/load work as on any layer. A mixed-precision layer (codes stored by importance
  // in whole groups) and an fp16 layer keep their windows: 0, nothing changes. On an
  // exception (out of memory) the layer is unchanged. The aging policies then run as after
  // an append. The overload without a layer compacts every layer (each all or nothing) and
  // returns the tokens moved in all of them.
  size_t compact_window(int layer);
  size_t compact_window();

  // Attention of T_q queries per query head over the layer's tokens. queries and out are
  // n_q_heads × T_q × head_dim. The queries are the LAST T_q positions of the layer:
  // query t (0-based) sits at position size - T_q + t and, when causal, sees keys
  // [0, size - T_q + t]; with a window w only the last w of those. Non-causal queries see
  // every key (the last w with a window). Query heads of one KV head are processed
  // together (GQA), so its codes are read once per call.
  void attend(int layer, const float* queries, size_t T_q, float* out,
              const AttentionOptions& options = {}) const;
  // Throws what attend(layer, queries, T_q, ...) would throw for bad arguments, and does
  // nothing else (attend_batch checks every row this way before any row runs).
  void check_attend(int layer, const float* queries, size_t T_q, const AttentionOptions& options = {}) const;

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
  // An independent cache equal to load(save()) of this one, made through the same bytes in
  // memory but sharing this cache's quantizers (their rotations are not made again).
  std::unique_ptr<KVCache> copy() const;
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
  // A cache of config whose quantizers are table's (copy(): config is the one table was built for).
  KVCache(const KVCacheConfig& config, const QuantizerTable& table);
  size_t index(int layer, int kv_head, KVRole role) const { return table_.index(layer, kv_head, role); }
  void check_layer(int layer) const;
  void check_head(int layer, int kv_head) const;
  void check_alloc(size_t old, size_t tokens) const;  // throws OutOfMemory on overflow
  // Segments (kv_cache_segments.cpp): appends through the fp16 sinks and window, flushes,
  // cuts a layer back.
  void append_windowed(int layer, const float* keys, const float* values, size_t T);
  void flush_window(size_t layer, size_t keep_new);
  void shrink_layer(size_t layer, size_t new_size);
  void cut_unwindowed(size_t layer, size_t new_size);  // the cut of a layer without segments
  void age(size_t layer);            // runs the aging policies after an append
  void cut_codes(size_t layer);      // tells the aging policies that codes were cut
  // Attention over the segments (kv_cache_attend.cpp).
  void attend_segments(int layer, const float* queries, size_t T_q, float* out,
                       const AttentionOptions& options) const;
  class ReadScope;   // RAII guards of the thread-safety rule above (kv_cache_guard.h)
  class WriteScope;

  KVCacheConfig config_;
  QuantizerTable table_;
  PageStore store_;
  Segments segments_;
  std::unique_ptr<FlushPolicy> flush_;                 // moves window rows into codes (plain or mixed)
  std::vector<std::unique_ptr<AgingPolicy>> aging_;    // in the order they run
  MixedPrecisionFlush* mixed_ = nullptr;               // flush_, with mixed precision
  Eviction* eviction_ = nullptr;                       // in aging_, with eviction
  mutable std::atomic<size_t> readers_{0};             // guarded readers in progress
  mutable std::atomic<bool> writer_{false};            // a mutator in progress
};

}  // namespace turboquant
