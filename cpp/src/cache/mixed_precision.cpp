#include "turboquant/cache/mixed_precision.h"

#include <algorithm>
#include <bit>
#include <cmath>

#include "turboquant/error.h"
#include "turboquant/half.h"

namespace turboquant {

MixedPrecisionFlush::MixedPrecisionFlush(const CacheParts& parts, const MixedPrecisionConfig& config)
    : FlushPolicy(parts),
      group_blocks_(config.mixed_group_blocks),
      keep_blocks_(config.mixed_keep_blocks),
      block_tokens_(parts.store.block_tokens()),
      group_tokens_(group_blocks_ * block_tokens_),
      keep_tokens_(keep_blocks_ * block_tokens_),
      H_(static_cast<size_t>(parts.shape.n_kv_heads)) {
  masks_.resize(static_cast<size_t>(parts.shape.n_layers) * H_);
  importance_.resize(masks_.size());
  rated_.assign(static_cast<size_t>(parts.shape.n_layers), 0);
}

bool MixedPrecisionFlush::low_block(size_t g, size_t j) const {
  return g % 2 == 0 ? j >= keep_blocks_ : j < group_blocks_ - keep_blocks_;
}

size_t MixedPrecisionFlush::slot(const uint64_t* m, size_t g, size_t o) const {
  size_t below = 0;  // kept tokens before offset o
  for (size_t w = 0; w < o / 64; ++w) below += static_cast<size_t>(std::popcount(m[w]));
  if (o % 64) below += static_cast<size_t>(std::popcount(m[o / 64] & ((uint64_t{1} << (o % 64)) - 1)));
  const bool kept = (m[o / 64] >> (o % 64)) & 1u;
  const size_t K = keep_tokens_, L = group_tokens_ - K;
  const bool kept_first = g % 2 == 0;
  return kept ? (kept_first ? 0 : L) + below : (kept_first ? K : 0) + (o - below);
}

size_t MixedPrecisionFlush::code_index(size_t l, size_t h, size_t p) const {
  const size_t F = group_tokens_, g = p / F;
  const uint64_t* m = masks_[l * H_ + h].data() + g * mask_words();
  return g * F + slot(m, g, p % F);
}

size_t MixedPrecisionFlush::rated(size_t l) const {
  const std::lock_guard<std::mutex> lock(mutex_);
  return rated_[l];
}

void MixedPrecisionFlush::set_rated(size_t l, size_t n) { rated_[l] = n; }

std::vector<float> MixedPrecisionFlush::importance(size_t l, size_t h) const {
  const std::lock_guard<std::mutex> lock(mutex_);
  return importance_[l * H_ + h];
}

void MixedPrecisionFlush::attended(size_t l, size_t n) const {
  const std::lock_guard<std::mutex> lock(mutex_);
  rated_[l] = std::max(rated_[l], n);
}

// Adds w[i] to the importance of the first n window tokens of one KV head.
void MixedPrecisionFlush::rate(size_t l, size_t h, const float* w, size_t n) const {
  const std::lock_guard<std::mutex> lock(mutex_);
  auto& imp = importance_[l * H_ + h];
  for (size_t i = 0; i < n; ++i) imp[i] += w[i];
}

void MixedPrecisionFlush::window_grown(size_t l) {
  const Segments& seg = parts_.segments;
  for (size_t h = 0; h < H_; ++h)
    importance_[l * H_ + h].resize(seg.window[l * seg.streams_per_layer + 2 * h].size() / seg.head_dim, 0.0f);
}

void MixedPrecisionFlush::fit(size_t l) {
  // The importance floats follow the window rows.
  for (size_t h = 0; h < H_; ++h)
    fit_capacity(importance_[l * H_ + h], parts_.segments.plan(l).window_rows());
}

// Encodes the window's oldest group of F tokens; see the top of mixed_precision.h for the
// order. Every stream is encoded before any window row is dropped.
void MixedPrecisionFlush::flush_group(size_t l) {
  Segments& seg = parts_.segments;
  PageStore& store = parts_.store;
  const size_t bt = block_tokens_, F = group_tokens_, R = group_blocks_, K = keep_tokens_;
  const size_t d = seg.head_dim, H = H_, streams = H * 2;
  const size_t words = mask_words();
  const size_t c = seg.coded[l] - seg.sink_base(l), g = c / F;
  std::vector<float> x(F * d);
  std::vector<size_t> order(F), rows(F);
  std::vector<std::vector<uint64_t>> masks(H, std::vector<uint64_t>(words, 0));
  try {
    for (size_t h = 0; h < H; ++h) {
      const auto& imp = importance_[l * H + h];
      for (size_t o = 0; o < F; ++o) order[o] = o;
      std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return imp[a] > imp[b]; });
      for (size_t k = 0; k < K; ++k) masks[h][order[k] / 64] |= uint64_t{1} << (order[k] % 64);
      for (size_t o = 0; o < F; ++o) rows[slot(masks[h].data(), g, o)] = o;  // code slot -> window row
      for (size_t role = 0; role < 2; ++role) {
        const size_t i = l * streams + h * 2 + role;
        store.ensure(i, c + F);
        for (size_t j = 0; j < R; ++j)  // fresh full-width pages (trims release the rest)
          if (low_block(g, j)) store.make_decayed(i, c / bt + j);
        const uint16_t* w = seg.window[i].data();
        for (size_t k = 0; k < F; ++k)
          for (size_t j = 0; j < d; ++j) x[k * d + j] = half_to_float(w[rows[k] * d + j]);
        store.encode(i, c, x.data(), F, d);
      }
    }
  } catch (...) {
    for (size_t s = 0; s < streams; ++s) store.release(l * streams + s, c);
    throw;
  }
  seg.flushed(l, F);
  for (size_t h = 0; h < H; ++h) {
    auto& imp = importance_[l * H + h];
    imp.erase(imp.begin(), imp.begin() + static_cast<std::ptrdiff_t>(F));
    masks_[l * H + h].insert(masks_[l * H + h].end(), masks[h].begin(), masks[h].end());
  }
}

// The groups the segment plan lets go (rated, with fp16_window newer tokens after them, or
// unrated beyond kUnratedTokens; segment_plan.h), oldest first.
void MixedPrecisionFlush::flush(size_t l, size_t keep_new) {
  const Segments& seg = parts_.segments;
  for (size_t due = seg.plan(l).due_flushes(seg.sizes(l, rated(l)), keep_new); due > 0; --due)
    flush_group(l);
}

void MixedPrecisionFlush::check_restore(size_t /*l*/, size_t n, const std::vector<const float*>* importance) const {
  // A restored window may hold the tokens of the latest append besides its usual bound.
  TQ_CHECK(importance == nullptr || importance->size() == H_, InvalidArgument, "append_window needs ", H_,
           " importance streams");
  if (importance)
    for (size_t h = 0; h < H_; ++h)
      for (size_t j = 0; j < n; ++j)
        TQ_CHECK(std::isfinite((*importance)[h][j]) && (*importance)[h][j] >= 0.0f, InvalidArgument,
                 "importance ", j, " of KV head ", h, " is not a finite number >= 0");
}

void MixedPrecisionFlush::restore(size_t l, size_t n, const std::vector<const float*>* importance) {
  for (size_t h = 0; h < H_; ++h) {
    auto& imp = importance_[l * H_ + h];
    imp.assign(n, 0.0f);
    if (importance) std::copy((*importance)[h], (*importance)[h] + n, imp.begin());
  }
}

// A layer cut back to new_size tokens must keep whole flush groups of codes (they are
// stored by importance, not position). Checked for every layer before any change.
void MixedPrecisionFlush::check_cut(size_t l, size_t new_size) const {
  const Segments& seg = parts_.segments;
  seg.plan(l).check_cut(seg.sizes(l), new_size, l);
}

// The rated tokens, the window's importance and the groups' masks follow the plan's cut.
void MixedPrecisionFlush::cut(size_t l, size_t new_size) {
  const Segments& seg = parts_.segments;
  const CutPlan cut = seg.plan(l).cut(seg.sizes(l, rated_[l]), new_size);
  rated_[l] = cut.after.rated;
  for (size_t h = 0; h < H_; ++h) {
    importance_[l * H_ + h].resize(cut.after.window);
    if (new_size < seg.coded[l])
      masks_[l * H_ + h].resize(cut.after.codes / group_tokens_ * mask_words());
  }
}

void MixedPrecisionFlush::check_attend(size_t l, size_t n, size_t T_q, const std::optional<size_t>& window,
                                       bool causal) const {
  // Coded tokens are stored by importance, not position: no query may see part of them.
  TQ_CHECK(!window || *window >= n, NotSupported, "a sliding window (", *window,
           ") over a mixed-precision cache (its codes are not in position order); use mixed precision on "
           "full-attention layers");
  const size_t c = parts_.segments.coded[l];
  TQ_CHECK(!causal || c <= parts_.segments.sink_base(l) || n - T_q + 1 >= c, NotSupported,
           "causal queries at positions from ", n - T_q, " see only part of the ", c, " coded tokens of layer ", l,
           " (mixed precision stores them by importance); attend after each append with its queries");
}

void MixedPrecisionFlush::check_encoded(size_t /*l*/, size_t c0, size_t n, const std::vector<const uint8_t*>* decayed,
                                        const std::vector<const uint64_t*>* masks) const {
  const size_t bt = block_tokens_, F = group_tokens_, words = mask_words(), H = H_;
  TQ_CHECK(masks != nullptr && decayed != nullptr, InvalidArgument,
           "append_encoded on a mixed-precision cache needs the groups' masks and block flags");
  TQ_CHECK(masks->size() == H, InvalidArgument, "append_encoded needs ", H, " mask streams (one per KV head)");
  TQ_CHECK(c0 % F == 0 && n % F == 0, InvalidArgument, "append_encoded on a mixed-precision cache takes whole "
           "flush groups of ", F, " tokens (layer at code ", c0, ", ", n, " tokens given)");
  const size_t keep = keep_tokens_;
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
      for (size_t j = 0; j < group_blocks_; ++j)
        for (size_t role = 0; role < 2; ++role) {
          const size_t b = (c0 + g * F) / bt + j;
          TQ_CHECK((*decayed)[h * 2 + role][b - c0 / bt] == (low_block(c0 / F + g, j) ? 1 : 0), InvalidArgument,
                   "block flag of block ", b, " of stream ", h * 2 + role,
                   " does not match the mixed-precision layout");
        }
    }
}

void MixedPrecisionFlush::encoded(size_t l, size_t n, const std::vector<const uint64_t*>* masks) {
  const size_t F = group_tokens_, words = mask_words();
  for (size_t h = 0; h < H_; ++h)
    masks_[l * H_ + h].insert(masks_[l * H_ + h].end(), (*masks)[h], (*masks)[h] + n / F * words);
}

size_t MixedPrecisionFlush::memory_bytes() const {
  // The groups' masks (1 bit per token and KV head) and the window's importance floats.
  size_t total = 0;
  for (const auto& v : masks_) total += v.capacity() * sizeof(uint64_t);
  for (const auto& v : importance_) total += v.capacity() * sizeof(float);
  return total;
}

size_t MixedPrecisionFlush::layer_bytes(size_t l) const {
  size_t total = 0;
  for (size_t h = 0; h < H_; ++h) total += masks_[l * H_ + h].size() * sizeof(uint64_t);
  return total;
}

}  // namespace turboquant
