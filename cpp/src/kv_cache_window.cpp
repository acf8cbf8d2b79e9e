// The fp16 recent window of the KV cache (KVCacheConfig::fp16_window / fp16_layers): tokens
// [coded, size) of a layer are kept as fp16 rows next to the codes of [0, coded), flushed
// into codes block by block, and attention merges both parts under one softmax.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "backend/cpu/kernels.h"
#include "turboquant/attention.h"
#include "turboquant/error.h"
#include "turboquant/half.h"
#include "turboquant/kv_cache.h"
#include "turboquant/thread_pool.h"
#include "kv_cache_guard.h"

namespace turboquant {

namespace {
// Gives v a capacity of exactly cap elements, unless it holds more or already has it.
template <typename T>
void fit_capacity(std::vector<T>& v, size_t cap) {
  if (v.capacity() == cap || v.size() > cap) return;
  std::vector<T> fitted;
  fitted.reserve(cap);
  fitted.assign(v.begin(), v.end());
  v.swap(fitted);
}
}  // namespace

bool KVCache::is_fp16_layer(int layer) const {
  return std::find(config_.fp16_layers.begin(), config_.fp16_layers.end(), layer) !=
         config_.fp16_layers.end();
}

size_t KVCache::coded_tokens(int layer) const {
  check_layer(layer);
  const auto l = static_cast<size_t>(layer);
  return config_.windowed() ? coded_[l] : sizes_[l];
}

const std::vector<uint16_t>& KVCache::window(int layer, int kv_head, KVRole role) const {
  (void)key_quantizer(layer, kv_head);  // range checks
  static const std::vector<uint16_t> kEmpty;
  return config_.windowed() ? windows_[index(layer, kv_head, role)] : kEmpty;
}

// Encodes n fp32 rows into stream i at token positions [pos, pos + n) (pages must exist).
void KVCache::encode_at(size_t i, size_t pos, const float* x, size_t n) {
  PagedCodes& p = pages_[i];
  const size_t bt = config_.block_tokens;
  const auto d = static_cast<size_t>(config_.head_dim);
  for (size_t t = 0; t < n;) {
    const size_t b = (pos + t) / bt, off = (pos + t) % bt;
    const size_t c = std::min(n - t, bt - off);
    const Quantizer& q = config_.low_blocks() ? stream_block_quantizer(i, b) : *quantizers_[i];
    q.encode(x + t * d, c, p.code_blocks[b].get() + off * q.code_bytes(),
             p.norm_blocks[b].get() + off * q.norm_bytes());
    t += c;
  }
}

bool KVCache::mixed_low_block(size_t group, size_t j) const {
  const size_t R = config_.mixed_group_blocks, K = config_.mixed_keep_blocks;
  return group % 2 == 0 ? j >= K : j < R - K;
}

// The slot inside group g of the token at offset o, given the group's mask m: the kept
// tokens in position order, then the others (even groups), or the others first (odd groups).
size_t KVCache::mixed_slot(const uint64_t* m, size_t g, size_t o) const {
  size_t below = 0;  // kept tokens before offset o
  for (size_t w = 0; w < o / 64; ++w) below += static_cast<size_t>(std::popcount(m[w]));
  if (o % 64) below += static_cast<size_t>(std::popcount(m[o / 64] & ((uint64_t{1} << (o % 64)) - 1)));
  const bool kept = (m[o / 64] >> (o % 64)) & 1u;
  const size_t K = config_.mixed_keep_blocks * config_.block_tokens, L = config_.mixed_group_tokens() - K;
  const bool kept_first = g % 2 == 0;
  return kept ? (kept_first ? 0 : L) + below : (kept_first ? K : 0) + (o - below);
}

size_t KVCache::mixed_code_index(size_t l, size_t h, size_t p) const {
  const size_t F = config_.mixed_group_tokens(), g = p / F;
  const uint64_t* m = mixed_masks_[l * static_cast<size_t>(config_.n_kv_heads) + h].data() + g * mixed_mask_words();
  return g * F + mixed_slot(m, g, p % F);
}

const std::vector<uint64_t>& KVCache::mixed_masks(int layer, int kv_head) const {
  (void)key_quantizer(layer, kv_head);  // range checks
  static const std::vector<uint64_t> kEmpty;
  return config_.mixed() ? mixed_masks_[static_cast<size_t>(layer) * static_cast<size_t>(config_.n_kv_heads) +
                                        static_cast<size_t>(kv_head)]
                         : kEmpty;
}

std::vector<size_t> KVCache::mixed_positions(int layer, int kv_head) const {
  (void)key_quantizer(layer, kv_head);
  const size_t n = code_tokens(layer), ns = sink_tokens(layer);
  std::vector<size_t> pos(n);
  for (size_t p = 0; p < n; ++p)
    pos[config_.mixed() ? mixed_code_index(static_cast<size_t>(layer), static_cast<size_t>(kv_head), p) : p] = ns + p;
  return pos;
}

size_t KVCache::rated_tokens(int layer) const {
  check_layer(layer);
  if (!config_.mixed()) return 0;
  const std::lock_guard<std::mutex> lock(importance_mutex_);
  return rated_[static_cast<size_t>(layer)];
}

void KVCache::set_rated_tokens(int layer, size_t n) {
  const WriteScope guard(*this, "set_rated_tokens");
  check_layer(layer);
  TQ_CHECK(config_.mixed() || n == 0, InvalidArgument, "rated tokens ", n, " on a cache without mixed precision");
  TQ_CHECK(n <= sizes_[static_cast<size_t>(layer)], InvalidArgument, "rated tokens ", n, " exceed layer ", layer,
           "'s ", sizes_[static_cast<size_t>(layer)], " tokens");
  if (config_.mixed()) rated_[static_cast<size_t>(layer)] = n;
}

std::vector<float> KVCache::window_importance(int layer, int kv_head) const {
  (void)key_quantizer(layer, kv_head);
  if (!config_.mixed()) return {};
  const std::lock_guard<std::mutex> lock(importance_mutex_);
  return importance_[static_cast<size_t>(layer) * static_cast<size_t>(config_.n_kv_heads) +
                     static_cast<size_t>(kv_head)];
}

// Adds w[i] to the importance of the first n window tokens of one KV head.
void KVCache::note_importance(size_t l, size_t h, const float* w, size_t n) const {
  const std::lock_guard<std::mutex> lock(importance_mutex_);
  auto& imp = importance_[l * static_cast<size_t>(config_.n_kv_heads) + h];
  for (size_t i = 0; i < n; ++i) imp[i] += w[i];
}

// Mixed precision: encodes the window's oldest group of F = mixed_group_tokens() tokens. Per
// KV head, the K = mixed_keep_blocks × block_tokens most important tokens (ties: the older)
// keep the stream's bits, the rest go to decay_bits blocks; see mixed_low_block for the
// order. Every stream is encoded before any window row is dropped.
void KVCache::flush_group(size_t l) {
  const size_t bt = config_.block_tokens, F = config_.mixed_group_tokens();
  const size_t R = config_.mixed_group_blocks, K = config_.mixed_keep_blocks * bt;
  const auto d = static_cast<size_t>(config_.head_dim);
  const size_t H = static_cast<size_t>(config_.n_kv_heads), streams = H * 2;
  const size_t words = mixed_mask_words();
  const size_t c = coded_[l] - sink_base(l), g = c / F;
  std::vector<float> x(F * d);
  std::vector<size_t> order(F), rows(F);
  std::vector<std::vector<uint64_t>> masks(H, std::vector<uint64_t>(words, 0));
  try {
    for (size_t h = 0; h < H; ++h) {
      const auto& imp = importance_[l * H + h];
      for (size_t o = 0; o < F; ++o) order[o] = o;
      std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return imp[a] > imp[b]; });
      for (size_t k = 0; k < K; ++k) masks[h][order[k] / 64] |= uint64_t{1} << (order[k] % 64);
      for (size_t o = 0; o < F; ++o) rows[mixed_slot(masks[h].data(), g, o)] = o;  // code slot -> window row
      for (size_t role = 0; role < 2; ++role) {
        const size_t i = l * streams + h * 2 + role;
        PagedCodes& p = pages_[i];
        ensure_blocks(p, *quantizers_[i], c + F);
        for (size_t j = 0; j < R; ++j) {  // fresh full-width pages (trims release the rest)
          const size_t b = c / bt + j;
          if (!mixed_low_block(g, j)) continue;
          p.code_blocks[b].reset(new uint8_t[bt * decay_quantizers_[i]->code_bytes()]);
          p.decayed[b] = 1;
        }
        const uint16_t* w = windows_[i].data();
        for (size_t k = 0; k < F; ++k)
          for (size_t j = 0; j < d; ++j) x[k * d + j] = half_to_float(w[rows[k] * d + j]);
        encode_at(i, c, x.data(), F);
      }
    }
  } catch (...) {
    for (size_t s = 0; s < streams; ++s) release_blocks(pages_[l * streams + s], c);
    throw;
  }
  for (size_t s = 0; s < streams; ++s) {
    auto& w = windows_[l * streams + s];
    w.erase(w.begin(), w.begin() + static_cast<std::ptrdiff_t>(F * d));
  }
  for (size_t h = 0; h < H; ++h) {
    auto& imp = importance_[l * H + h];
    imp.erase(imp.begin(), imp.begin() + static_cast<std::ptrdiff_t>(F));
    mixed_masks_[l * H + h].insert(mixed_masks_[l * H + h].end(), masks[h].begin(), masks[h].end());
  }
  coded_[l] += F;
}

// While the window holds more than fp16_window + block_tokens tokens, quantizes its oldest
// block_tokens tokens into codes (mixed precision: a group of mixed_group_tokens() at a time,
// once the group is rated and fp16_window newer tokens follow it, or, unrated, when the
// window holds kMixedUnratedTokens tokens more than that besides the latest keep_new). All
// streams are encoded before any window row is dropped.
void KVCache::flush_window(int layer, size_t keep_new) {
  if (is_fp16_layer(layer)) return;
  const auto l = static_cast<size_t>(layer);
  const size_t bt = config_.block_tokens, N = config_.fp16_window;
  const auto d = static_cast<size_t>(config_.head_dim);
  const size_t streams = static_cast<size_t>(config_.n_kv_heads) * 2;
  if (config_.mixed()) {
    const size_t F = config_.mixed_group_tokens();
    for (;;) {
      const size_t end = coded_[l] + F;  // the oldest group ends here
      if (sizes_[l] < end + N) break;    // fp16_window newer tokens must follow it
      // Unrated (no attention call since): only groups older than the latest append, once
      // the window holds kMixedUnratedTokens more than its bound besides that append.
      const bool rated = rated_tokens(layer) >= end;
      if (!rated && (end + keep_new > sizes_[l] || sizes_[l] - keep_new - coded_[l] < N + F + kMixedUnratedTokens))
        break;
      flush_group(l);
    }
  }
  std::vector<float> x(bt * d);
  while (!config_.mixed() && sizes_[l] - coded_[l] > N + bt) {
    // The window is non-empty only once the sinks are full: code index = token - sinks.
    const size_t c = coded_[l] - sink_base(l);
    try {
      for (size_t s = 0; s < streams; ++s) {
        const size_t i = l * streams + s;
        ensure_blocks(pages_[i], *quantizers_[i], c + bt);
        const uint16_t* w = windows_[i].data();
        for (size_t j = 0; j < bt * d; ++j) x[j] = half_to_float(w[j]);
        encode_at(i, c, x.data(), bt);
      }
    } catch (...) {
      for (size_t s = 0; s < streams; ++s) release_blocks(pages_[l * streams + s], c);
      throw;
    }
    for (size_t s = 0; s < streams; ++s) {
      auto& w = windows_[l * streams + s];
      w.erase(w.begin(), w.begin() + static_cast<std::ptrdiff_t>(bt * d));
    }
    coded_[l] += bt;
  }
  // A long prefill passes through the window once: give back what it took beyond the
  // window's fixed capacity of (fp16_window + block_tokens) rows.
  // (Only a window that holds tokens: with fp16 sinks, a layer still filling its sinks has none.)
  for (size_t s = 0; s < streams; ++s)
    if (!windows_[l * streams + s].empty()) reserve_window(windows_[l * streams + s]);
  if (config_.mixed())  // the importance floats follow the window rows
    for (size_t h = 0; h < streams / 2; ++h) fit_capacity(importance_[l * streams / 2 + h], N + config_.mixed_group_tokens());
}

// Windows of flushed layers have a capacity of exactly (fp16_window + block_tokens) rows once
// used (more only transiently inside append), so memory_bytes() is predictable.
void KVCache::reserve_window(std::vector<uint16_t>& w) const {
  const size_t flush = config_.mixed() ? config_.mixed_group_tokens() : config_.block_tokens;
  fit_capacity(w, (config_.fp16_window + flush) * static_cast<size_t>(config_.head_dim));
}

void KVCache::append_windowed(int layer, const float* keys, const float* values, size_t T) {
  const auto l = static_cast<size_t>(layer);
  const auto d = static_cast<size_t>(config_.head_dim);
  const size_t streams = static_cast<size_t>(config_.n_kv_heads) * 2;
  // Convert and validate everything before touching the cache.
  std::vector<uint16_t> rows(streams * T * d);
  for (size_t s = 0; s < streams; ++s) {
    const size_t h = s / 2;
    const float* x = (s % 2 == 0 ? keys : values) + h * T * d;
    for (size_t j = 0; j < T * d; ++j) {
      const uint16_t v = float_to_half(x[j]);
      TQ_CHECK(std::isfinite(half_to_float(v)), InvalidArgument, s % 2 == 0 ? "keys" : "values",
               " of kv head ", h, " contain a value that is not finite in fp16 (", x[j],
               ") at element ", j);
      rows[s * T * d + j] = v;
    }
  }
  const size_t old = sizes_[l], old_coded = coded_[l];
  // fp16 sinks take the first tokens of the layer (the window is empty until they are full).
  const size_t S = sink_base(l);
  const size_t ks = old < S ? std::min(T, S - old) : 0;
  if (ks > 0) {
    for (size_t s = 0; s < streams; ++s) {
      auto& v = sinks_[l * streams + s];
      v.reserve(S * d);
      v.insert(v.end(), rows.begin() + static_cast<std::ptrdiff_t>(s * T * d),
               rows.begin() + static_cast<std::ptrdiff_t>(s * T * d + ks * d));
    }
    coded_[l] = old + ks;
  }
  for (size_t s = 0; s < streams; ++s) {
    auto& w = windows_[l * streams + s];
    w.insert(w.end(), rows.begin() + static_cast<std::ptrdiff_t>(s * T * d + ks * d),
             rows.begin() + static_cast<std::ptrdiff_t>((s + 1) * T * d));
  }
  if (config_.mixed())
    for (size_t h = 0; h < static_cast<size_t>(config_.n_kv_heads); ++h)
      importance_[l * static_cast<size_t>(config_.n_kv_heads) + h].resize(
          windows_[l * streams + 2 * h].size() / d, 0.0f);
  sizes_[l] = old + T;
  try {
    // (Mixed precision: this call's tokens are not rated yet, so they stay fp16 until an
    // attention call, e.g. a prefill's own queries, has rated them.)
    flush_window(layer, T - ks);
  } catch (...) {
    // flush_window only commits whole blocks; drop the rows of this call that are left.
    if (coded_[l] == old + ks && ks > 0) {  // nothing flushed: the sinks of this call go too
      for (size_t s = 0; s < streams; ++s) sinks_[l * streams + s].resize(old * d);
      coded_[l] = old_coded;
    }
    const size_t keep = old > coded_[l] ? old - coded_[l] : 0;
    for (size_t s = 0; s < streams; ++s) windows_[l * streams + s].resize(keep * d);
    if (config_.mixed())
      for (size_t h = 0; h < streams / 2; ++h) importance_[l * streams / 2 + h].resize(keep);
    sizes_[l] = std::max(old, coded_[l]);
    throw;
  }
  if (config_.max_coded_tokens) evict_layer(l);
  if (config_.decays()) decay_layer(l);
}

void KVCache::append_window(int layer, size_t n, const std::vector<const uint16_t*>& rows,
                            const std::vector<const float*>* importance) {
  check_layer(layer);
  TQ_CHECK(config_.windowed(), InvalidArgument, "this cache has no fp16 window");
  const auto l = static_cast<size_t>(layer);
  const auto d = static_cast<size_t>(config_.head_dim);
  const size_t streams = static_cast<size_t>(config_.n_kv_heads) * 2;
  TQ_CHECK(rows.size() == streams, InvalidArgument, "append_window needs ", streams, " streams");
  TQ_CHECK(sizes_[l] == coded_[l], InvalidArgument, "layer ", layer, " already holds window tokens");
  TQ_CHECK(n == 0 || sizes_[l] >= sink_base(l), InvalidArgument, "window of layer ", layer,
           " restored before its ", sink_base(l), " fp16 sinks are full");
  const size_t H = static_cast<size_t>(config_.n_kv_heads);
  if (config_.mixed()) {
    // A restored window may hold the tokens of the latest append besides its usual bound.
    TQ_CHECK(importance == nullptr || importance->size() == H, InvalidArgument, "append_window needs ", H,
             " importance streams");
    if (importance)
      for (size_t h = 0; h < H; ++h)
        for (size_t j = 0; j < n; ++j)
          TQ_CHECK(std::isfinite((*importance)[h][j]) && (*importance)[h][j] >= 0.0f, InvalidArgument,
                   "importance ", j, " of KV head ", h, " is not a finite number >= 0");
  } else {
    TQ_CHECK(importance == nullptr, InvalidArgument, "window importance given but this cache has no mixed precision");
    TQ_CHECK(is_fp16_layer(layer) || n <= config_.fp16_window + config_.block_tokens, InvalidArgument,
             "window of ", n, " tokens exceeds fp16_window + block_tokens = ",
             config_.fp16_window + config_.block_tokens);
  }
  TQ_CHECK(config_.max_tokens == 0 || sizes_[l] + n <= config_.max_tokens, InvalidArgument,
           "window of ", n, " tokens exceeds max_tokens=", config_.max_tokens);
  for (size_t s = 0; s < streams; ++s)
    for (size_t j = 0; j < n * d; ++j)
      TQ_CHECK(std::isfinite(half_to_float(rows[s][j])), InvalidArgument, "window row value ", j,
               " of stream ", s, " is not finite");
  for (size_t s = 0; s < streams; ++s) {
    auto& w = windows_[l * streams + s];
    w.assign(rows[s], rows[s] + n * d);
    if (!is_fp16_layer(layer) && n > 0) reserve_window(w);
  }
  if (config_.mixed())
    for (size_t h = 0; h < H; ++h) {
      auto& imp = importance_[l * H + h];
      imp.assign(n, 0.0f);
      if (importance) std::copy((*importance)[h], (*importance)[h] + n, imp.begin());
    }
  sizes_[l] += n;
}

void KVCache::shrink_layer(size_t l, size_t new_size) {
  if (new_size >= sizes_[l]) return;
  const auto d = static_cast<size_t>(config_.head_dim);
  const size_t streams = static_cast<size_t>(config_.n_kv_heads) * 2;
  if (config_.mixed()) {
    rated_[l] = std::min(rated_[l], new_size);
    const size_t H = streams / 2, keep = new_size >= coded_[l] ? new_size - coded_[l] : 0;
    for (size_t h = 0; h < H; ++h) {
      importance_[l * H + h].resize(keep);
      if (new_size < coded_[l]) {
        const size_t codes = new_size - std::min(new_size, sink_base(l));
        mixed_masks_[l * H + h].resize(codes / config_.mixed_group_tokens() * mixed_mask_words());
      }
    }
  }
  // A layer cut back into its sinks (or emptied) gives its window's capacity back too, also
  // when it held no codes: its memory does not depend on where the cut started.
  const bool into_sinks = new_size <= sink_base(l);
  if (new_size >= coded_[l]) {
    for (size_t s = 0; s < streams; ++s) {
      windows_[l * streams + s].resize((new_size - coded_[l]) * d);
      if (into_sinks) std::vector<uint16_t>().swap(windows_[l * streams + s]);
    }
  } else {
    const size_t ns = std::min(new_size, sink_base(l));  // sinks kept
    for (size_t s = 0; s < streams; ++s) {
      windows_[l * streams + s].clear();
      if (into_sinks) std::vector<uint16_t>().swap(windows_[l * streams + s]);
      release_blocks(pages_[l * streams + s], new_size - ns);
      if (!sinks_.empty() && sinks_[l * streams + s].size() > ns * d) {
        auto& v = sinks_[l * streams + s];
        v.resize(ns * d);
        if (ns == 0) std::vector<uint16_t>().swap(v);  // an empty layer holds no sink rows
      }
    }
    coded_[l] = new_size;
    if (config_.decays()) decay_done_[l] = std::min(decay_done_[l], (new_size - ns) / config_.block_tokens);
  }
  sizes_[l] = new_size;
  if (new_size == 0) evicted_[l] = 0;
}

void KVCache::attend_windowed(int layer, const float* queries, size_t T_q, float* out,
                              const AttentionOptions& options) const {
  const auto l = static_cast<size_t>(layer);
  const size_t n = sizes_[l], c = coded_[l];
  const size_t ns = sinks_.empty() ? 0 : sinks_[l * static_cast<size_t>(config_.n_kv_heads) * 2].size() /
                                             static_cast<size_t>(config_.head_dim);
  const auto d = static_cast<size_t>(config_.head_dim);
  const float scale = options.scale ? *options.scale : 1.0f / std::sqrt(static_cast<float>(d));
  const auto G = static_cast<size_t>(config_.group_size());
  const size_t m = G * T_q;
  const float thr = options.sparse_v_threshold;
  const RowMask mask = make_row_mask(n, T_q, G, options);  // over all n tokens
  // Codes hold tokens [ns, c) at code indices [0, c - ns). Rows that see at least one of them
  // form a contiguous range [ra, rb) (lo and hi are non-decreasing).
  size_t ra = 0, rb = 0;
  if (c > ns) {
    while (ra < m && mask.hi[ra] < ns) ++ra;
    rb = ra;
    while (rb < m && mask.lo[rb] < c) ++rb;
  }
  const size_t mc = rb - ra;
  RowMask cmask;
  cmask.lo.resize(mc);
  cmask.hi.resize(mc);
  for (size_t r = 0; r < mc; ++r) {
    cmask.lo[r] = std::max(mask.lo[ra + r], ns) - ns;
    cmask.hi[r] = std::min(mask.hi[ra + r], c - 1) - ns;
  }

  // fp16 tokens: the sinks [0, ns) then the window [c, n), indexed as one array of nf rows
  // (read in place as fp16 by the f16 kernels). Query rows go in chunks of kRowChunk: the
  // chunk's scores cover the union of its rows' visible fp16 rows, each row masked after.
  const size_t nw = n - c, nf = ns + nw;
  const auto& kernels = cpu::active_kernels();
  constexpr size_t kRowChunk = 16;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // Visible fp16 rows of query row r: sinks [sa, sb) and window [wa, wb) (fp16-array
  // indices; the window part is empty when wa >= wb).
  const auto sink_range = [&](size_t r) {
    const size_t a = options.sinks_visible ? 0 : std::min(mask.lo[r], ns);
    return std::pair<size_t, size_t>{a, std::min(mask.hi[r] + 1, ns)};
  };
  const auto window_range = [&](size_t r) {
    const size_t wa = ns + std::max(mask.lo[r], c) - c;
    const size_t wb = mask.hi[r] + 1 > c ? ns + mask.hi[r] + 1 - c : ns;
    return std::pair<size_t, size_t>{wa, std::max(wa, wb)};
  };
  // Queries in row order (row t*G + g of KV head h), all heads.
  const auto H = static_cast<size_t>(config_.n_kv_heads);
  std::vector<float> qall(H * m * d);
  for (size_t h = 0; h < H; ++h)
    for (size_t g = 0; g < G; ++g)
      for (size_t t = 0; t < T_q; ++t)
        std::memcpy(&qall[(h * m + t * G + g) * d], queries + ((h * G + g) * T_q + t) * d, d * sizeof(float));
  // The coded part of every head first (split-K across the pool like attend()): normalised
  // outputs and the rows' softmax max / sum, merged with the fp16 part below.
  std::vector<float> ocall(H * mc * d), cmax(H * mc), csum(H * mc);
  if (mc > 0) {
    std::vector<HeadTask> tasks(H);
    for (size_t h = 0; h < H; ++h) {
      HeadTask& task = tasks[h];
      task.keys = head_codes(layer, static_cast<int>(h), KVRole::kKey);
      task.values = head_codes(layer, static_cast<int>(h), KVRole::kValue);
      task.n_tokens = c - ns;
      task.queries = &qall[(h * m + ra) * d];
      task.mask = &cmask;
      task.out = &ocall[h * mc * d];
      task.row_max = &cmax[h * mc];
      task.row_sum = &csum[h * mc];
    }
    attend_heads(tasks, mc, scale, thr);
  }
  // KV heads are independent (own buffers): split across the thread pool like attend().
  const bool rate = config_.mixed() && nw > 0;  // mixed precision: window tokens' importance
  if (config_.mixed()) {
    const std::lock_guard<std::mutex> lock(importance_mutex_);
    rated_[l] = std::max(rated_[l], n);
  }
  parallel_for(H, 1, [&](size_t h0, size_t h1) {
    std::vector<float> s(kRowChunk * nf), acc(kRowChunk * d), z(kRowChunk), imp(rate ? nw : 0);
    for (size_t h = h0; h < h1; ++h) {
      std::fill(imp.begin(), imp.end(), 0.0f);
      const float* q = &qall[h * m * d];
      const float* oc = ocall.data() + h * mc * d;  // mc may be 0
      const float* row_max = cmax.data() + h * mc;
      const float* row_sum = csum.data() + h * mc;
      const size_t ik = index(layer, static_cast<int>(h), KVRole::kKey);
      const size_t iv = index(layer, static_cast<int>(h), KVRole::kValue);
      const uint16_t* ksink = ns > 0 ? sinks_[ik].data() : nullptr;
      const uint16_t* vsink = ns > 0 ? sinks_[iv].data() : nullptr;
      // Window row ns + i is windows_[..] row i.
      const uint16_t* kwin = nw > 0 ? windows_[ik].data() : nullptr;
      const uint16_t* vwin = nw > 0 ? windows_[iv].data() : nullptr;
      for (size_t r0 = 0; r0 < m; r0 += kRowChunk) {
        const size_t r1 = std::min(m, r0 + kRowChunk), mr = r1 - r0;
        // Rows are sorted by position: the union of their ranges runs from the first row's
        // start to the last row's end.
        const size_t usa = sink_range(r0).first, usb = sink_range(r1 - 1).second;
        const size_t uwa = window_range(r0).first, uwb = window_range(r1 - 1).second;
        if (usb > usa) kernels.f16_scores(&q[r0 * d], mr, ksink + usa * d, usb - usa, d, s.data() + usa, nf);
        if (uwb > uwa)
          kernels.f16_scores(&q[r0 * d], mr, kwin + (uwa - ns) * d, uwb - uwa, d, s.data() + uwa, nf);
        std::fill(acc.begin(), acc.begin() + static_cast<std::ptrdiff_t>(mr * d), 0.0f);
        for (size_t r = r0; r < r1; ++r) {
          float* sr = s.data() + (r - r0) * nf;
          const auto [sa, sb] = sink_range(r);
          const auto [wa, wb] = window_range(r);
          float mf = kNegInf;
          for (const auto& [a, b] : {std::pair{sa, sb}, std::pair{wa, wb}})
            for (size_t t = a; t < b; ++t) {
              sr[t] *= scale;
              mf = std::max(mf, sr[t]);
            }
          const bool has_c = r >= ra && r < rb;
          const float mcx = has_c ? row_max[r - ra] : kNegInf;
          const float M = std::max(mf, mcx);
          float zr = 0.0f;
          float* ar = acc.data() + (r - r0) * d;
          if (has_c) {
            const float f = row_sum[r - ra] * std::exp(mcx - M);
            zr += f;
            for (size_t j = 0; j < d; ++j) ar[j] = f * oc[(r - ra) * d + j];
          }
          // Weights exp(s - M) on the visible rows, 0 on the rest of the chunk's union.
          for (size_t t = usa; t < sa; ++t) sr[t] = 0.0f;
          for (size_t t = sb; t < usb; ++t) sr[t] = 0.0f;
          for (size_t t = uwa; t < wa; ++t) sr[t] = 0.0f;
          for (size_t t = wb; t < uwb; ++t) sr[t] = 0.0f;
          for (const auto& [a, b] : {std::pair{sa, sb}, std::pair{wa, wb}})
            if (b > a) zr += kernels.exp_sum(sr + a, b - a, M);
          if (rate && zr > 0.0f)  // importance: Σ over query rows of the squared weight
            for (size_t t = wa; t < wb; ++t) imp[t - ns] += (sr[t] / zr) * (sr[t] / zr);
          if (thr > 0.0f)  // sparse V: the weight still counts in the normalisation
            for (const auto& [a, b] : {std::pair{sa, sb}, std::pair{wa, wb}})
              for (size_t t = a; t < b; ++t)
                if (sr[t] < thr) sr[t] = 0.0f;
          z[r - r0] = zr;
        }
        if (usb > usa) kernels.f16_accumulate(s.data() + usa, nf, mr, vsink + usa * d, usb - usa, d, acc.data());
        if (uwb > uwa)
          kernels.f16_accumulate(s.data() + uwa, nf, mr, vwin + (uwa - ns) * d, uwb - uwa, d, acc.data());
        for (size_t r = r0; r < r1; ++r) {
          const float inv = z[r - r0] > 0.0f ? 1.0f / z[r - r0] : 0.0f;
          const size_t t = r / G, qh = h * G + r % G;
          for (size_t j = 0; j < d; ++j) out[(qh * T_q + t) * d + j] = acc[(r - r0) * d + j] * inv;
        }
      }
      if (rate) note_importance(l, h, imp.data(), nw);
    }
  });
}

}  // namespace turboquant
