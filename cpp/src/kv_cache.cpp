#include "turboquant/kv_cache.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>

#include "turboquant/attention.h"
#include "turboquant/error.h"
#include "turboquant/rng.h"
#include "turboquant/thread_pool.h"
#include "kv_cache_guard.h"

namespace turboquant {

void KVCacheConfig::validate() const {
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
  TQ_CHECK(key_bits >= kMinBits && key_bits <= kMaxBits, InvalidArgument, "key_bits must be in [",
           kMinBits, ", ", kMaxBits, "], got ", key_bits);
  TQ_CHECK(value_bits >= kMinBits && value_bits <= kMaxBits, InvalidArgument,
           "value_bits must be in [", kMinBits, ", ", kMaxBits, "], got ", value_bits);
  const size_t per_layer = static_cast<size_t>(n_layers) * static_cast<size_t>(n_kv_heads);
  for (const auto& [v, name] : {std::pair{&key_head_bits, "key_head_bits"},
                                 std::pair{&value_head_bits, "value_head_bits"},
                                 std::pair{&outlier_head_bits, "outlier_head_bits"}}) {
    if (v->empty()) continue;
    TQ_CHECK(v->size() == static_cast<size_t>(n_kv_heads) || v->size() == per_layer, InvalidArgument, name,
             " must be empty, have one entry per KV head (n_kv_heads = ", n_kv_heads,
             ") or one per layer and KV head (n_layers * n_kv_heads = ", per_layer, "), got ", v->size(),
             " entries");
    const bool outl = v == &outlier_head_bits;
    for (size_t i = 0; i < v->size(); ++i)
      TQ_CHECK((*v)[i] >= (outl ? 0 : kMinBits) && (*v)[i] <= kMaxBits, InvalidArgument, name, "[", i,
               "] must be in [", outl ? 0 : kMinBits, ", ", kMaxBits, "]", outl ? " (0 means bits + 1)" : "",
               ", got ", (*v)[i]);
  }
  TQ_CHECK(outlier_head_bits.empty() || has_outliers(), InvalidArgument,
           "outlier_head_bits needs an outlier split (n_outlier_channels or outlier_channels)");
  TQ_CHECK(block_tokens >= 1 && block_tokens <= (size_t{1} << 20), InvalidArgument,
           "block_tokens must be in [1, 1048576], got ", block_tokens);
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
  TQ_CHECK(fp16_window <= (size_t{1} << 24), InvalidArgument, "fp16_window must be in [0, 16777216], got ",
           fp16_window);
  for (int l : fp16_layers)
    TQ_CHECK(l >= 0 && l < n_layers, InvalidArgument, "fp16_layers entry ", l, " is not a layer in [0, ",
             n_layers, ")");
  TQ_CHECK(fp16_sinks <= (size_t{1} << 24), InvalidArgument, "fp16_sinks must be in [0, 16777216], got ",
           fp16_sinks);
  TQ_CHECK(max_tokens == 0 || fp16_sinks <= max_tokens, InvalidArgument, "fp16_sinks (", fp16_sinks,
           ") exceeds max_tokens (", max_tokens, ")");
  TQ_CHECK(decay_after <= (size_t{1} << 40), InvalidArgument, "decay_after must be in [0, 2^40], got ",
           decay_after);
  TQ_CHECK(max_coded_tokens == 0 || (max_coded_tokens >= block_tokens && max_coded_tokens <= (size_t{1} << 40)),
           InvalidArgument, "max_coded_tokens must be 0 (off) or in [block_tokens = ", block_tokens,
           ", 2^40], got ", max_coded_tokens);
  if (mixed()) {
    TQ_CHECK(mixed_keep_blocks >= 1 && mixed_keep_blocks < mixed_group_blocks, InvalidArgument,
             "mixed_keep_blocks must be in [1, mixed_group_blocks - 1 = ", mixed_group_blocks - 1, "], got ",
             mixed_keep_blocks);
    TQ_CHECK(mixed_group_blocks <= 4096 && mixed_group_tokens() <= 4096, InvalidArgument,
             "a mixed-precision flush group (mixed_group_blocks × block_tokens) must hold at most 4096 tokens, got ",
             mixed_group_blocks, " × ", block_tokens);
    TQ_CHECK(fp16_window > 0, InvalidArgument,
             "mixed precision (mixed_group_blocks) needs an fp16 window (fp16_window > 0): token importance is "
             "measured while tokens are fp16");
    TQ_CHECK(decay_after == 0 && max_coded_tokens == 0, NotSupported,
             "mixed precision does not combine with temporal decay (decay_after) or eviction (max_coded_tokens)");
  } else {
    TQ_CHECK(mixed_keep_blocks == 0, InvalidArgument, "mixed_keep_blocks (", mixed_keep_blocks,
             ") is set but mixed_group_blocks is 0 (mixed precision off)");
  }
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

uint64_t kv_stream_id(uint32_t layer, uint32_t kv_head, KVRole role) {
  return make_stream_id(static_cast<StreamPurpose>(0), layer,
                        2 * kv_head + static_cast<uint32_t>(role));
}

KVCache::KVCache(const KVCacheConfig& config) : config_(config) {
  config_.validate();
  const size_t streams = static_cast<size_t>(config_.n_layers) * config_.n_kv_heads * 2;
  quantizers_.reserve(streams);
  for (int l = 0; l < config_.n_layers; ++l) {
    for (int h = 0; h < config_.n_kv_heads; ++h) {
      for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
        QuantizerConfig q;
        q.method = role == KVRole::kKey ? config_.key_method : config_.value_method;
        q.bits = config_.head_bits(l, h, static_cast<int>(role));
        q.dim = config_.head_dim;
        q.seed = config_.seed;
        q.stream = kv_stream_id(static_cast<uint32_t>(l), static_cast<uint32_t>(config_.kv_head_offset + h), role);
        q.rotation = config_.rotation;
        q.jl_dim = config_.jl_dim;
        q.norm_dtype = NormDtype::kFloat16;
        if (config_.split_role(static_cast<int>(role))) {
          q.outlier_channels = config_.outlier_channels;
          q.n_outlier_channels = config_.n_outlier_channels;
          q.outlier_bits = config_.head_outlier_bits(l, h);
          q.split_angle_bits = config_.split_angle_bits;
        }
        q.norm_correction = config_.norm_correction;
        quantizers_.push_back(make_quantizer(q));
      }
    }
  }
  pages_.resize(streams);
  sizes_.assign(static_cast<size_t>(config_.n_layers), 0);
  if (config_.windowed()) {
    coded_.assign(static_cast<size_t>(config_.n_layers), 0);
    windows_.resize(streams);
  }
  if (config_.fp16_sinks > 0) sinks_.resize(streams);
  if (config_.low_blocks()) init_decay();
  if (config_.mixed()) {
    mixed_masks_.resize(static_cast<size_t>(config_.n_layers) * static_cast<size_t>(config_.n_kv_heads));
    importance_.resize(mixed_masks_.size());
    rated_.assign(static_cast<size_t>(config_.n_layers), 0);
  }
  evicted_.assign(static_cast<size_t>(config_.n_layers), 0);
}

size_t KVCache::index(int layer, int kv_head, KVRole role) const {
  return (static_cast<size_t>(layer) * config_.n_kv_heads + static_cast<size_t>(kv_head)) * 2 +
         static_cast<size_t>(role);
}

void KVCache::check_layer(int layer) const {
  TQ_CHECK(layer >= 0 && layer < config_.n_layers, InvalidArgument, "layer must be in [0, ",
           config_.n_layers, "), got ", layer);
}

const Quantizer& KVCache::key_quantizer(int layer, int kv_head) const {
  check_layer(layer);
  TQ_CHECK(kv_head >= 0 && kv_head < config_.n_kv_heads, InvalidArgument,
           "kv_head must be in [0, ", config_.n_kv_heads, "), got ", kv_head);
  return *quantizers_[index(layer, kv_head, KVRole::kKey)];
}

const Quantizer& KVCache::value_quantizer(int layer, int kv_head) const {
  check_layer(layer);
  TQ_CHECK(kv_head >= 0 && kv_head < config_.n_kv_heads, InvalidArgument,
           "kv_head must be in [0, ", config_.n_kv_heads, "), got ", kv_head);
  return *quantizers_[index(layer, kv_head, KVRole::kValue)];
}

void KVCache::set_rotation(int layer, int kv_head, KVRole role, std::unique_ptr<Rotation> rotation) {
  const WriteScope guard(*this, "set_rotation");
  (void)key_quantizer(layer, kv_head);  // range checks
  TQ_CHECK(sizes_[static_cast<size_t>(layer)] == 0, InvalidArgument,
           "set_rotation needs an empty layer (layer ", layer, " holds ",
           sizes_[static_cast<size_t>(layer)], " tokens)");
  const size_t i = index(layer, kv_head, role);
  quantizers_[i]->set_rotation(std::move(rotation));
  if (config_.low_blocks()) decay_quantizers_[i]->share_rotation(*quantizers_[i]);
}

HeadCodes KVCache::head_codes(int layer, int kv_head, KVRole role) const {
  const size_t i = index(layer, kv_head, role);
  return HeadCodes{quantizers_[i].get(), &pages_[i], config_.block_tokens,
                   config_.low_blocks() ? decay_quantizers_[i].get() : nullptr};
}

const PagedCodes& KVCache::pages(int layer, int kv_head, KVRole role) const {
  return pages_[index(layer, kv_head, role)];
}

void KVCache::ensure_blocks(PagedCodes& p, const Quantizer& q, size_t tokens) {
  const size_t bt = config_.block_tokens;
  const size_t need = (tokens + bt - 1) / bt;
  while (p.code_blocks.size() < need) {
    p.code_blocks.emplace_back(new uint8_t[bt * q.code_bytes()]);
    p.norm_blocks.emplace_back(new uint8_t[bt * q.norm_bytes()]);
    if (config_.low_blocks()) p.decayed.push_back(0);
  }
}

void KVCache::release_blocks(PagedCodes& p, size_t tokens) {
  const size_t bt = config_.block_tokens;
  const size_t keep = (tokens + bt - 1) / bt;
  if (p.code_blocks.size() > keep) {
    p.code_blocks.resize(keep);
    p.norm_blocks.resize(keep);
    if (p.decayed.size() > keep) p.decayed.resize(keep);
  }
}

void KVCache::append(int layer, const float* keys, const float* values, size_t T) {
  const WriteScope guard(*this, "append");
  check_layer(layer);
  const auto l = static_cast<size_t>(layer);
  const size_t old = sizes_[l];
  TQ_CHECK(config_.max_tokens == 0 || (T <= config_.max_tokens && old <= config_.max_tokens - T),
           InvalidArgument, "appending ", T, " tokens to layer ", layer, " (holding ", old,
           ") exceeds max_tokens=", config_.max_tokens);
  check_alloc(old, T);
  if (T == 0) return;
  if (config_.windowed()) return append_windowed(layer, keys, values, T);
  const auto d = static_cast<size_t>(config_.head_dim);
  const size_t bt = config_.block_tokens;
  try {
    // Streams (KV head × role) are independent: split them across the thread pool when the
    // batch is large enough to pay for it (a single decode token stays on this thread).
    const size_t streams = static_cast<size_t>(config_.n_kv_heads) * 2;
    parallel_for(streams, T >= 16 ? 1 : streams, [&](size_t s0, size_t s1) {
      for (size_t si = s0; si < s1; ++si) {
        const int h = static_cast<int>(si / 2);
        const KVRole role = si % 2 ? KVRole::kValue : KVRole::kKey;
        const size_t i = index(layer, h, role);
        PagedCodes& p = pages_[i];
        ensure_blocks(p, *quantizers_[i], old + T);
        const float* x = (role == KVRole::kKey ? keys : values) + static_cast<size_t>(h) * T * d;
        for (size_t t = 0; t < T;) {
          const size_t pos = old + t;
          const size_t b = pos / bt, off = pos % bt;
          const size_t n = std::min(T - t, bt - off);
          const Quantizer& q = stream_block_quantizer(i, b);  // decayed only after a trim
          q.encode(x + t * d, n, p.code_blocks[b].get() + off * q.code_bytes(),
                   p.norm_blocks[b].get() + off * q.norm_bytes());
          t += n;
        }
      }
    });
  } catch (...) {
    // Codes past the old size are never read; give back the pages they took.
    for (int h = 0; h < config_.n_kv_heads; ++h)
      for (KVRole role : {KVRole::kKey, KVRole::kValue}) release_blocks(pages_[index(layer, h, role)], old);
    try {
      throw;
    } catch (const std::bad_alloc&) {
      throw OutOfMemory(detail::concat("out of memory appending ", T, " tokens to layer ", layer, " (holding ",
                                       old, "); the cache is unchanged"));
    }
  }
  sizes_[l] = old + T;
  if (config_.max_coded_tokens) evict_layer(l);
  if (config_.decays()) decay_layer(l);
}

void KVCache::append_encoded(int layer, size_t n, const std::vector<const uint8_t*>& codes,
                             const std::vector<const uint8_t*>& norms,
                             const std::vector<const uint8_t*>* decayed,
                             const std::vector<const uint64_t*>* masks) {
  const WriteScope guard(*this, "append_encoded");
  check_layer(layer);
  const size_t streams = static_cast<size_t>(config_.n_kv_heads) * 2;
  TQ_CHECK(codes.size() == streams && norms.size() == streams, InvalidArgument,
           "append_encoded needs ", streams, " code and norm streams");
  const auto l = static_cast<size_t>(layer);
  const size_t old = sizes_[l];
  TQ_CHECK(config_.max_tokens == 0 || (n <= config_.max_tokens && old <= config_.max_tokens - n),
           InvalidArgument, "appending ", n, " tokens to layer ", layer,
           " exceeds max_tokens=", config_.max_tokens);
  check_alloc(old, n);
  TQ_CHECK(!config_.windowed() || coded_[l] == old, InvalidArgument,
           "append_encoded on layer ", layer, " which holds fp16 window tokens");
  TQ_CHECK(n == 0 || sink_base(l) == 0 || old >= config_.fp16_sinks, InvalidArgument, "append_encoded on layer ",
           layer, " whose ", config_.fp16_sinks, " fp16 sinks are not filled yet (", old, " tokens)");
  const size_t bt = config_.block_tokens;
  const size_t c0 = old - std::min(old, sink_base(l));  // first code index written
  const size_t blocks = (c0 + n + bt - 1) / bt;
  const size_t H = static_cast<size_t>(config_.n_kv_heads);
  const size_t F = config_.mixed_group_tokens(), words = mixed_mask_words();
  if (config_.mixed()) {
    TQ_CHECK(masks != nullptr && decayed != nullptr, InvalidArgument,
             "append_encoded on a mixed-precision cache needs the groups' masks and block flags");
    TQ_CHECK(masks->size() == H, InvalidArgument, "append_encoded needs ", H, " mask streams (one per KV head)");
    TQ_CHECK(c0 % F == 0 && n % F == 0, InvalidArgument, "append_encoded on a mixed-precision cache takes whole "
             "flush groups of ", F, " tokens (layer at code ", c0, ", ", n, " tokens given)");
    const size_t keep = config_.mixed_keep_blocks * bt;
    for (size_t h = 0; h < H; ++h)
      for (size_t g = 0; g < n / F; ++g) {
        size_t bits = 0;
        for (size_t w = 0; w < words; ++w) {
          uint64_t word = (*masks)[h][g * words + w];
          const size_t valid = std::min<size_t>(64, F - w * 64);
          TQ_CHECK(valid == 64 || (word >> valid) == 0, InvalidArgument, "mask of group ", g, " of KV head ", h,
                   " has bits beyond the group's ", F, " tokens");
          bits += static_cast<size_t>(std::popcount(word));
        }
        TQ_CHECK(bits == keep, InvalidArgument, "mask of group ", g, " of KV head ", h, " keeps ", bits,
                 " tokens (must be mixed_keep_blocks × block_tokens = ", keep, ")");
        for (size_t j = 0; j < config_.mixed_group_blocks; ++j)
          for (size_t role = 0; role < 2; ++role) {
            const size_t b = (c0 + g * F) / bt + j;
            TQ_CHECK((*decayed)[h * 2 + role][b - c0 / bt] == (mixed_low_block(c0 / F + g, j) ? 1 : 0),
                     InvalidArgument, "block flag of block ", b, " of stream ", h * 2 + role,
                     " does not match the mixed-precision layout");
          }
      }
  } else {
    TQ_CHECK(masks == nullptr, InvalidArgument, "mixed-precision masks given but this cache has no mixed precision");
  }
  if (decayed) {
    TQ_CHECK(config_.low_blocks(), InvalidArgument, "block decay flags given but this cache has no decay");
    TQ_CHECK(decayed->size() == streams, InvalidArgument, "append_encoded needs ", streams, " decay flag streams");
    TQ_CHECK(c0 % bt == 0, InvalidArgument, "append_encoded with decay flags needs a block-aligned layer");
    for (size_t s = 0; s < streams; ++s)
      for (size_t b = c0 / bt; b < blocks; ++b)
        TQ_CHECK((*decayed)[s][b - c0 / bt] <= 1, InvalidArgument, "decay flag of block ", b, " is ",
                 static_cast<int>((*decayed)[s][b - c0 / bt]), " (must be 0 or 1)");
  }
  try {
  for (size_t s = 0; s < streams; ++s) {
    const size_t i = l * streams + s;
    PagedCodes& p = pages_[i];
    ensure_blocks(p, *quantizers_[i], c0 + n);
    if (decayed) {
      for (size_t b = c0 / bt; b < blocks; ++b) {
        if ((*decayed)[s][b - c0 / bt] == 0 || p.is_decayed(b)) continue;
        p.code_blocks[b].reset(new uint8_t[bt * decay_quantizers_[i]->code_bytes()]);
        p.decayed[b] = 1;
      }
    }
    size_t cat = 0, nat = 0;  // byte offsets into codes[s] / norms[s]
    for (size_t t = 0; t < n;) {
      const size_t pos = c0 + t;
      const size_t b = pos / bt, off = pos % bt;
      const size_t c = std::min(n - t, bt - off);
      const Quantizer& q = stream_block_quantizer(i, b);
      std::memcpy(p.code_blocks[b].get() + off * q.code_bytes(), codes[s] + cat, c * q.code_bytes());
      std::memcpy(p.norm_blocks[b].get() + off * q.norm_bytes(), norms[s] + nat, c * q.norm_bytes());
      cat += c * q.code_bytes();
      nat += c * q.norm_bytes();
      t += c;
    }
  }
  } catch (...) {
    for (size_t s = 0; s < streams; ++s) release_blocks(pages_[l * streams + s], c0);
    throw;
  }
  if (config_.mixed())
    for (size_t h = 0; h < H; ++h)
      mixed_masks_[l * H + h].insert(mixed_masks_[l * H + h].end(), (*masks)[h], (*masks)[h] + n / F * words);
  sizes_[l] = old + n;
  if (config_.windowed()) coded_[l] = old + n;
}

void KVCache::check_alloc(size_t old, size_t T) const {
  // Every size below is computed without wrapping: a request whose page bytes (or fp32
  // input, n_kv_heads × T × head_dim × 4) do not fit size_t fails before any allocation.
  constexpr size_t kMax = std::numeric_limits<size_t>::max();
  const auto d = static_cast<size_t>(config_.head_dim);
  const auto H = static_cast<size_t>(config_.n_kv_heads);
  const size_t bt = config_.block_tokens;
  TQ_CHECK(T <= kMax / 2 - old && T <= kMax / (H * d * sizeof(float)), OutOfMemory, "appending ", T,
           " tokens to a layer holding ", old, " overflows size_t (", H, " heads × ", d,
           " dims); the request cannot be allocated");
  const size_t blocks = (old + T + bt - 1) / bt;
  for (const auto& q : quantizers_) {
    const size_t row = q->code_bytes() + q->norm_bytes();
    TQ_CHECK(blocks <= kMax / bt / row, OutOfMemory, "appending ", T, " tokens needs ", blocks,
             " pages of ", bt, " tokens × ", row, " bytes, which overflows size_t");
  }
}

void KVCache::copy_out(int layer, int kv_head, KVRole role, size_t t0, size_t n, uint8_t* codes,
                       uint8_t* norms) const {
  const ReadScope guard(*this, "copy_out");
  check_layer(layer);
  TQ_CHECK(kv_head >= 0 && kv_head < config_.n_kv_heads, InvalidArgument,
           "kv_head must be in [0, ", config_.n_kv_heads, "), got ", kv_head);
  const size_t held = code_tokens(layer);
  TQ_CHECK(t0 <= held && n <= held - t0, InvalidArgument, "coded tokens [", t0, ", ",
           t0 + n, ") out of range for layer ", layer);
  const size_t i = index(layer, kv_head, role);
  const PagedCodes& p = pages_[i];
  const size_t bt = config_.block_tokens;
  size_t cat = 0, nat = 0;
  for (size_t t = 0; t < n;) {
    const size_t pos = t0 + t;
    const size_t b = pos / bt, off = pos % bt;
    const size_t c = std::min(n - t, bt - off);
    const Quantizer& q = stream_block_quantizer(i, b);
    std::memcpy(codes + cat, p.code_blocks[b].get() + off * q.code_bytes(), c * q.code_bytes());
    std::memcpy(norms + nat, p.norm_blocks[b].get() + off * q.norm_bytes(), c * q.norm_bytes());
    cat += c * q.code_bytes();
    nat += c * q.norm_bytes();
    t += c;
  }
}

size_t KVCache::size(int layer) const {
  const ReadScope guard(*this, "size");
  check_layer(layer);
  return sizes_[static_cast<size_t>(layer)];
}

// Mixed precision: a layer cut back to new_size tokens must keep whole flush groups of codes
// (they are stored by importance, not position). Checked for every layer before any change.
void KVCache::check_mixed_cut(size_t l, size_t new_size) const {
  if (!config_.mixed() || new_size >= coded_[l] || new_size <= sink_base(l)) return;
  const size_t F = config_.mixed_group_tokens();
  TQ_CHECK((new_size - sink_base(l)) % F == 0, NotSupported, "cutting layer ", l, " to ", new_size,
           " tokens splits a mixed-precision flush group of ", F, " coded tokens (stored by importance, not "
           "position); cut to a length of ", sink_base(l), " + a multiple of ", F, ", or into the fp16 window (",
           coded_[l], " tokens and more)");
}

size_t KVCache::trim(size_t n) {
  const WriteScope guard(*this, "trim");
  const size_t removed = std::min(n, sizes_[0]);
  for (size_t l = 0; l < sizes_.size(); ++l) check_mixed_cut(l, sizes_[l] - std::min(n, sizes_[l]));
  if (config_.windowed()) {
    for (size_t l = 0; l < sizes_.size(); ++l) shrink_layer(l, sizes_[l] - std::min(n, sizes_[l]));
    return removed;
  }
  for (int l = 0; l < config_.n_layers; ++l) {
    const auto li = static_cast<size_t>(l);
    sizes_[li] -= std::min(n, sizes_[li]);
    for (int h = 0; h < config_.n_kv_heads; ++h)
      for (KVRole role : {KVRole::kKey, KVRole::kValue}) release_blocks(pages_[index(l, h, role)], sizes_[li]);
    if (config_.decays()) decay_done_[li] = std::min(decay_done_[li], sizes_[li] / config_.block_tokens);
    if (sizes_[li] == 0) evicted_[li] = 0;
  }
  return removed;
}

void KVCache::truncate(size_t length) {
  const WriteScope guard(*this, "truncate");
  for (size_t l = 0; l < sizes_.size(); ++l) check_mixed_cut(l, std::min(length, sizes_[l]));
  if (config_.windowed()) {
    for (size_t l = 0; l < sizes_.size(); ++l) shrink_layer(l, length);
    return;
  }
  for (int l = 0; l < config_.n_layers; ++l) {
    const auto li = static_cast<size_t>(l);
    sizes_[li] = std::min(length, sizes_[li]);
    for (int h = 0; h < config_.n_kv_heads; ++h)
      for (KVRole role : {KVRole::kKey, KVRole::kValue}) release_blocks(pages_[index(l, h, role)], sizes_[li]);
    if (config_.decays()) decay_done_[li] = std::min(decay_done_[li], sizes_[li] / config_.block_tokens);
    if (sizes_[li] == 0) evicted_[li] = 0;
  }
}

size_t KVCache::memory_bytes() const {
  const ReadScope guard(*this, "memory_bytes");
  size_t total = 0;
  for (size_t i = 0; i < quantizers_.size(); ++i) {
    const Quantizer& q = *quantizers_[i];
    total += q.state_bytes();
    const PagedCodes& p = pages_[i];
    if (config_.low_blocks()) {
      const Quantizer& dq = *decay_quantizers_[i];  // shares the stream's rotation
      for (size_t b = 0; b < p.code_blocks.size(); ++b)
        total += config_.block_tokens * (p.is_decayed(b) ? dq.code_bytes() : q.code_bytes());
    } else {
      total += p.code_blocks.size() * config_.block_tokens * q.code_bytes();
    }
    total += p.norm_blocks.size() * config_.block_tokens * q.norm_bytes();
    if (config_.windowed()) total += windows_[i].capacity() * sizeof(uint16_t);
    if (!sinks_.empty()) total += sinks_[i].capacity() * sizeof(uint16_t);
  }
  // Mixed precision: the groups' masks (1 bit per token and KV head) and the window's
  // importance floats are data too.
  for (const auto& v : mixed_masks_) total += v.capacity() * sizeof(uint64_t);
  for (const auto& v : importance_) total += v.capacity() * sizeof(float);
  return total;
}

size_t KVCache::fp16_bytes() const {
  const ReadScope guard(*this, "fp16_bytes");
  size_t tokens = 0;
  for (size_t s : sizes_) tokens += s;
  return tokens * static_cast<size_t>(config_.n_kv_heads) * 2 * static_cast<size_t>(config_.head_dim) * 2;
}

void KVCache::attend(int layer, const float* queries, size_t T_q, float* out,
                     const AttentionOptions& options) const {
  const ReadScope guard(*this, "attend");
  check_layer(layer);
  const size_t n = sizes_[static_cast<size_t>(layer)];
  TQ_CHECK(T_q >= 1, InvalidArgument, "attend needs at least one query");
  TQ_CHECK(n > 0, InvalidArgument, "attend on an empty cache: layer ", layer,
           " holds no tokens (append keys and values first)");
  TQ_CHECK(T_q <= n, InvalidArgument, "attend got ", T_q, " queries per head but layer ", layer,
           " holds only ", n, " tokens (queries are the last positions of the cache)");
  TQ_CHECK(!options.window || *options.window >= 1, InvalidArgument, "window must be >= 1");
  const auto d = static_cast<size_t>(config_.head_dim);
  const float scale = options.scale ? *options.scale : 1.0f / std::sqrt(static_cast<float>(d));
  TQ_CHECK(std::isfinite(scale), InvalidArgument, "scale must be finite, got ", scale);
  for (size_t i = 0; i < static_cast<size_t>(config_.n_q_heads) * T_q * d; ++i) {
    TQ_CHECK(std::isfinite(queries[i]), InvalidArgument, "queries contain NaN or Inf (element ", i, ")");
  }
  TQ_CHECK(options.sparse_v_threshold >= 0.0f && options.sparse_v_threshold < 1.0f, InvalidArgument,
           "sparse_v_threshold must be in [0, 1), got ", options.sparse_v_threshold);
  if (config_.mixed()) {
    // Coded tokens are stored by importance, not position: no query may see part of them.
    TQ_CHECK(!options.window || *options.window >= n, NotSupported, "a sliding window (", *options.window,
             ") over a mixed-precision cache (its codes are not in position order); use mixed precision on "
             "full-attention layers");
    const size_t c = coded_[static_cast<size_t>(layer)];
    TQ_CHECK(!options.causal || c <= sink_base(static_cast<size_t>(layer)) || n - T_q + 1 >= c, NotSupported, "causal queries at positions from ", n - T_q,
             " see only part of the ", c, " coded tokens of layer ", layer,
             " (mixed precision stores them by importance); attend after each append with its queries");
  }
  if (config_.windowed()) return attend_windowed(layer, queries, T_q, out, options);
  const auto G = static_cast<size_t>(config_.group_size());
  const size_t m = G * T_q;
  const RowMask mask = make_row_mask(n, T_q, G, options);
  // KV heads (and, for decode, chunks of their tokens) split across the thread pool.
  // Query head h*G + g, position t is row t*G + g of KV head h; with G = 1 or T_q = 1 that is
  // already the caller's layout, so queries and outputs are used in place.
  const auto H = static_cast<size_t>(config_.n_kv_heads);
  const bool in_place = G == 1 || T_q == 1;
  std::vector<float> q, o;
  if (!in_place) {
    q.resize(H * m * d);
    o.resize(H * m * d);
    for (size_t h = 0; h < H; ++h)
      for (size_t g = 0; g < G; ++g)
        for (size_t t = 0; t < T_q; ++t)
          std::memcpy(&q[(h * m + t * G + g) * d], queries + ((h * G + g) * T_q + t) * d, d * sizeof(float));
  }
  std::vector<HeadTask> tasks(H);
  for (size_t h = 0; h < H; ++h) {
    HeadTask& task = tasks[h];
    task.keys = head_codes(layer, static_cast<int>(h), KVRole::kKey);
    task.values = head_codes(layer, static_cast<int>(h), KVRole::kValue);
    task.n_tokens = n;
    task.queries = in_place ? queries + h * m * d : &q[h * m * d];
    task.mask = &mask;
    task.out = in_place ? out + h * m * d : &o[h * m * d];
  }
  attend_heads(tasks, m, scale, options.sparse_v_threshold);
  if (!in_place) {
    for (size_t h = 0; h < H; ++h)
      for (size_t g = 0; g < G; ++g)
        for (size_t t = 0; t < T_q; ++t)
          std::memcpy(out + ((h * G + g) * T_q + t) * d, &o[(h * m + t * G + g) * d], d * sizeof(float));
  }
}

}  // namespace turboquant
