// KVCache as a composition of its parts (kv_cache.h): request validation, the thread-safety
// guards, and the calls into the quantizer table, page store, segments and policies.
#include "turboquant/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>

#include "turboquant/attention.h"
#include "turboquant/cache/eviction.h"
#include "turboquant/error.h"
#include "turboquant/thread_pool.h"
#include "kv_cache_guard.h"

namespace turboquant {

namespace {
const KVCacheConfig& validated(const KVCacheConfig& config) {
  config.validate();
  return config;
}
}  // namespace

// The table's argument validates config (before the delegated constructor runs).
KVCache::KVCache(const KVCacheConfig& config) : KVCache(config, QuantizerTable(validated(config))) {}

KVCache::KVCache(const KVCacheConfig& config, const QuantizerTable& table)
    : config_(config),
      table_(table),
      store_(table_, config_.block_tokens),
      segments_(config_.shape(), config_.segments(), config_.mixed_precision()) {
  TQ_CHECK(table_.streams() == static_cast<size_t>(config_.n_layers) * config_.n_kv_heads * 2, InvalidArgument,
           "a quantizer table of ", table_.streams(), " streams for a cache of ", config_.n_layers, " layers x ",
           config_.n_kv_heads, " KV heads");
  // Each policy gets the parts and its own group of the configuration.
  const CacheParts parts{config_.shape(), table_, store_, segments_};
  flush_ = make_flush_policy(parts, config_.mixed_precision());
  if (config_.mixed()) mixed_ = static_cast<MixedPrecisionFlush*>(flush_.get());
  aging_ = make_aging_policies(parts, config_.aging());
  for (const auto& p : aging_)
    if (auto* e = dynamic_cast<Eviction*>(p.get())) eviction_ = e;
}

void KVCache::check_layer(int layer) const {
  TQ_CHECK(layer >= 0 && layer < config_.n_layers, InvalidArgument, "layer must be in [0, ",
           config_.n_layers, "), got ", layer);
}

void KVCache::check_head(int layer, int kv_head) const {
  check_layer(layer);
  TQ_CHECK(kv_head >= 0 && kv_head < config_.n_kv_heads, InvalidArgument,
           "kv_head must be in [0, ", config_.n_kv_heads, "), got ", kv_head);
}

const Quantizer& KVCache::key_quantizer(int layer, int kv_head) const {
  check_head(layer, kv_head);
  return table_.at(index(layer, kv_head, KVRole::kKey));
}

const Quantizer& KVCache::value_quantizer(int layer, int kv_head) const {
  check_head(layer, kv_head);
  return table_.at(index(layer, kv_head, KVRole::kValue));
}

void KVCache::set_rotation(int layer, int kv_head, KVRole role, std::unique_ptr<Rotation> rotation) {
  const WriteScope guard(*this, "set_rotation");
  check_head(layer, kv_head);
  TQ_CHECK(segments_.size[static_cast<size_t>(layer)] == 0, InvalidArgument,
           "set_rotation needs an empty layer (layer ", layer, " holds ",
           segments_.size[static_cast<size_t>(layer)], " tokens)");
  table_.set_rotation(index(layer, kv_head, role), std::move(rotation));
}

HeadCodes KVCache::head_codes(int layer, int kv_head, KVRole role) const {
  return store_.head(index(layer, kv_head, role));
}

const PagedCodes& KVCache::pages(int layer, int kv_head, KVRole role) const {
  return store_[index(layer, kv_head, role)];
}

void KVCache::age(size_t l) {
  for (const auto& p : aging_) {
    const size_t dropped = p->age(l);
    if (dropped == 0) continue;
    for (const auto& other : aging_)
      if (other != p) other->front_dropped(l, dropped);
  }
}

void KVCache::cut_codes(size_t l) {
  for (const auto& p : aging_) p->cut(l, segments_.code_tokens(l), segments_.size[l]);
}

void KVCache::append(int layer, const float* keys, const float* values, size_t T) {
  const WriteScope guard(*this, "append");
  check_layer(layer);
  const auto l = static_cast<size_t>(layer);
  const size_t old = segments_.size[l];
  TQ_CHECK(config_.max_tokens == 0 || (T <= config_.max_tokens && old <= config_.max_tokens - T),
           InvalidArgument, "appending ", T, " tokens to layer ", layer, " (holding ", old,
           ") exceeds max_tokens=", config_.max_tokens);
  check_alloc(old, T);
  if (T == 0) return;
  if (config_.windowed()) return append_windowed(layer, keys, values, T);
  const auto d = static_cast<size_t>(config_.head_dim);
  try {
    // Streams (KV head × role) are independent: split them across the thread pool when the
    // batch is large enough to pay for it (a single decode token stays on this thread).
    const size_t streams = static_cast<size_t>(config_.n_kv_heads) * 2;
    parallel_for(streams, T >= 16 ? 1 : streams, [&](size_t s0, size_t s1) {
      for (size_t si = s0; si < s1; ++si) {
        const int h = static_cast<int>(si / 2);
        const KVRole role = si % 2 ? KVRole::kValue : KVRole::kKey;
        const size_t i = index(layer, h, role);
        store_.ensure(i, old + T);
        const float* x = (role == KVRole::kKey ? keys : values) + static_cast<size_t>(h) * T * d;
        store_.encode(i, old, x, T, d);  // a block is decayed only after a trim
      }
    });
  } catch (...) {
    // Codes past the old size are never read; give back the pages they took.
    for (int h = 0; h < config_.n_kv_heads; ++h)
      for (KVRole role : {KVRole::kKey, KVRole::kValue}) store_.release(index(layer, h, role), old);
    try {
      throw;
    } catch (const std::bad_alloc&) {
      throw OutOfMemory(detail::concat("out of memory appending ", T, " tokens to layer ", layer, " (holding ",
                                       old, "); the cache is unchanged"));
    }
  }
  segments_.add_codes(l, T);
  age(l);
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
  const size_t old = segments_.size[l];
  TQ_CHECK(config_.max_tokens == 0 || (n <= config_.max_tokens && old <= config_.max_tokens - n),
           InvalidArgument, "appending ", n, " tokens to layer ", layer,
           " exceeds max_tokens=", config_.max_tokens);
  check_alloc(old, n);
  TQ_CHECK(!config_.windowed() || segments_.coded[l] == old, InvalidArgument,
           "append_encoded on layer ", layer, " which holds fp16 window tokens");
  const size_t S = segments_.sink_base(l);
  TQ_CHECK(n == 0 || S == 0 || old >= config_.fp16_sinks, InvalidArgument, "append_encoded on layer ",
           layer, " whose ", config_.fp16_sinks, " fp16 sinks are not filled yet (", old, " tokens)");
  const size_t bt = config_.block_tokens;
  const size_t c0 = old - std::min(old, S);  // first code index written
  const size_t blocks = (c0 + n + bt - 1) / bt;
  flush_->check_encoded(l, c0, n, decayed, masks);
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
      store_.ensure(i, c0 + n);
      if (decayed)
        for (size_t b = c0 / bt; b < blocks; ++b)
          if ((*decayed)[s][b - c0 / bt] != 0 && !store_[i].is_decayed(b)) store_.make_decayed(i, b);
      store_.write(i, c0, n, codes[s], norms[s]);
    }
  } catch (...) {
    for (size_t s = 0; s < streams; ++s) store_.release(l * streams + s, c0);
    throw;
  }
  flush_->encoded(l, n, masks);
  segments_.add_codes(l, n);
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
  for (size_t i = 0; i < table_.streams(); ++i) {
    const size_t row = table_.at(i).code_bytes() + table_.at(i).norm_bytes();
    TQ_CHECK(blocks <= kMax / bt / row, OutOfMemory, "appending ", T, " tokens needs ", blocks,
             " pages of ", bt, " tokens × ", row, " bytes, which overflows size_t");
  }
}

void KVCache::copy_out(int layer, int kv_head, KVRole role, size_t t0, size_t n, uint8_t* codes,
                       uint8_t* norms) const {
  const ReadScope guard(*this, "copy_out");
  check_head(layer, kv_head);
  const size_t held = code_tokens(layer);
  TQ_CHECK(t0 <= held && n <= held - t0, InvalidArgument, "coded tokens [", t0, ", ",
           t0 + n, ") out of range for layer ", layer);
  store_.copy_out(index(layer, kv_head, role), t0, n, codes, norms);
}

size_t KVCache::size(int layer) const {
  const ReadScope guard(*this, "size");
  check_layer(layer);
  return segments_.size[static_cast<size_t>(layer)];
}

size_t KVCache::trim(size_t n) {
  const WriteScope guard(*this, "trim");
  auto& sizes = segments_.size;
  const size_t removed = std::min(n, sizes[0]);
  for (size_t l = 0; l < sizes.size(); ++l) flush_->check_cut(l, sizes[l] - std::min(n, sizes[l]));
  if (config_.windowed()) {
    for (size_t l = 0; l < sizes.size(); ++l) shrink_layer(l, sizes[l] - std::min(n, sizes[l]));
    return removed;
  }
  for (size_t l = 0; l < sizes.size(); ++l) cut_unwindowed(l, sizes[l] - std::min(n, sizes[l]));
  return removed;
}

void KVCache::truncate(size_t length) {
  const WriteScope guard(*this, "truncate");
  auto& sizes = segments_.size;
  for (size_t l = 0; l < sizes.size(); ++l) flush_->check_cut(l, std::min(length, sizes[l]));
  if (config_.windowed()) {
    for (size_t l = 0; l < sizes.size(); ++l) shrink_layer(l, length);
    return;
  }
  for (size_t l = 0; l < sizes.size(); ++l) cut_unwindowed(l, length);
}

size_t KVCache::memory_bytes() const {
  const ReadScope guard(*this, "memory_bytes");
  size_t total = 0;
  for (size_t i = 0; i < table_.streams(); ++i) {
    total += table_.at(i).state_bytes();  // the decayed quantizers share the stream's rotation
    total += store_.page_bytes(i);
    if (config_.windowed()) total += segments_.window[i].capacity() * sizeof(uint16_t);
    if (!segments_.sinks.empty()) total += segments_.sinks[i].capacity() * sizeof(uint16_t);
  }
  return total + flush_->memory_bytes();  // mixed precision: masks and importance
}

size_t KVCache::fp16_bytes() const {
  const ReadScope guard(*this, "fp16_bytes");
  size_t tokens = 0;
  for (size_t s : segments_.size) tokens += s;
  return tokens * static_cast<size_t>(config_.n_kv_heads) * 2 * static_cast<size_t>(config_.head_dim) * 2;
}

size_t KVCache::token_bytes(int layer) const {
  check_layer(layer);
  const auto l = static_cast<size_t>(layer);
  const size_t d = static_cast<size_t>(config_.head_dim);
  const size_t codes = code_tokens(layer), fp16_rows = segments_.size[l] - codes;
  const size_t streams = segments_.streams_per_layer;
  size_t total = 0;
  for (size_t i = l * streams; i < (l + 1) * streams; ++i)
    total += fp16_rows * d * sizeof(uint16_t) + store_.code_bytes(i, codes);
  return total + flush_->layer_bytes(l);  // mixed precision: the groups' masks
}

bool KVCache::is_fp16_layer(int layer) const {
  return std::find(config_.fp16_layers.begin(), config_.fp16_layers.end(), layer) !=
         config_.fp16_layers.end();
}

size_t KVCache::coded_tokens(int layer) const {
  check_layer(layer);
  return segments_.coded_end(static_cast<size_t>(layer));
}

size_t KVCache::sink_tokens(int layer) const {
  check_layer(layer);
  return segments_.sink_tokens(static_cast<size_t>(layer));
}

const std::vector<uint16_t>& KVCache::window(int layer, int kv_head, KVRole role) const {
  check_head(layer, kv_head);
  static const std::vector<uint16_t> kEmpty;
  return config_.windowed() ? segments_.window[index(layer, kv_head, role)] : kEmpty;
}

const std::vector<uint16_t>& KVCache::sinks(int layer, int kv_head, KVRole role) const {
  check_head(layer, kv_head);
  static const std::vector<uint16_t> kEmpty;
  return segments_.sinks.empty() ? kEmpty : segments_.sinks[index(layer, kv_head, role)];
}

const Quantizer& KVCache::block_quantizer(int layer, int kv_head, KVRole role, size_t code_index) const {
  check_head(layer, kv_head);
  return store_.block_quantizer(index(layer, kv_head, role), code_index / config_.block_tokens);
}

size_t KVCache::decayed_blocks(int layer, int kv_head, KVRole role) const {
  check_head(layer, kv_head);
  return store_.decayed_blocks(index(layer, kv_head, role));
}

size_t KVCache::evicted_tokens(int layer) const {
  check_layer(layer);
  return eviction_ ? eviction_->evicted(static_cast<size_t>(layer)) : 0;
}

void KVCache::set_evicted_tokens(int layer, size_t n) {
  const WriteScope guard(*this, "set_evicted_tokens");
  check_layer(layer);
  TQ_CHECK(n == 0 || config_.max_coded_tokens > 0, InvalidArgument, "evicted tokens ", n,
           " on a cache without eviction (max_coded_tokens = 0)");
  if (eviction_) eviction_->set_evicted(static_cast<size_t>(layer), n);
}

const std::vector<uint64_t>& KVCache::mixed_masks(int layer, int kv_head) const {
  check_head(layer, kv_head);
  static const std::vector<uint64_t> kEmpty;
  return mixed_ ? mixed_->masks(static_cast<size_t>(layer), static_cast<size_t>(kv_head)) : kEmpty;
}

std::vector<size_t> KVCache::mixed_positions(int layer, int kv_head) const {
  check_head(layer, kv_head);
  const size_t n = code_tokens(layer), ns = sink_tokens(layer);
  std::vector<size_t> pos(n);
  for (size_t p = 0; p < n; ++p)
    pos[flush_->code_index(static_cast<size_t>(layer), static_cast<size_t>(kv_head), p)] = ns + p;
  return pos;
}

size_t KVCache::rated_tokens(int layer) const {
  check_layer(layer);
  return mixed_ ? mixed_->rated(static_cast<size_t>(layer)) : 0;
}

void KVCache::set_rated_tokens(int layer, size_t n) {
  const WriteScope guard(*this, "set_rated_tokens");
  check_layer(layer);
  TQ_CHECK(config_.mixed() || n == 0, InvalidArgument, "rated tokens ", n, " on a cache without mixed precision");
  const size_t size = segments_.size[static_cast<size_t>(layer)];
  TQ_CHECK(n <= size, InvalidArgument, "rated tokens ", n, " exceed layer ", layer, "'s ", size, " tokens");
  if (mixed_) mixed_->set_rated(static_cast<size_t>(layer), n);
}

std::vector<float> KVCache::window_importance(int layer, int kv_head) const {
  check_head(layer, kv_head);
  return mixed_ ? mixed_->importance(static_cast<size_t>(layer), static_cast<size_t>(kv_head))
                : std::vector<float>{};
}

}  // namespace turboquant
