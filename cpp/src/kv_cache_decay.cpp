// fp16 attention sinks and temporal decay of the KV cache (KVCacheConfig::fp16_sinks,
// decay_after / decay_bits).
//
// Sinks: the first fp16_sinks tokens of every non-fp16 layer are kept as fp16 rows
// (sinks_), the codes then hold tokens [fp16_sinks, coded) at code indices from 0.
//
// Decay: a full code block whose newest token has at least decay_after newer tokens behind
// it is re-quantized in place to decay_bits. turboquant_mse codes are (‖x‖, indices of the
// nearest Lloyd-Max centroids of the rotated unit vector); the decayed block keeps the norm
// and the rotation and maps every b-bit index to the nearest decay_bits centroid of the same
// dimension's codebook (a 2^b-entry table), then repacks. No fp16/fp32 round trip happens.
// An outlier split (quantizer_outlier.h) is two such parts behind an angle: each part is
// mapped by its own table at its decayed width (decayed_split_bits), the angle bytes and the
// norm are copied. With norm correction the stored norm is ‖x‖/‖ỹ‖; it is rescaled by
// ‖ỹ_old‖/‖ỹ_new‖, both sums of squared centroids (split: cos²φ̃·‖ũ_O‖² + sin²φ̃·‖ũ_I‖²).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#include "turboquant/error.h"
#include "turboquant/half.h"
#include "turboquant/kv_cache.h"
#include "turboquant/packing.h"
#include "turboquant/quantizer_outlier.h"
#include "kv_cache_guard.h"

namespace turboquant {

namespace {
// Index i of `from` -> index of the centroid of `to` nearest to from.centroids[i].
std::vector<uint8_t> nearest_centroid_table(const Codebook& from, const Codebook& to) {
  std::vector<uint8_t> lut(from.centroids.size());
  for (size_t i = 0; i < lut.size(); ++i) {
    const float c = from.centroids[i];
    size_t best = 0;
    for (size_t j = 1; j < to.centroids.size(); ++j)
      if (std::fabs(to.centroids[j] - c) < std::fabs(to.centroids[best] - c)) best = j;
    lut[i] = static_cast<uint8_t>(best);
  }
  return lut;
}
}  // namespace

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

void KVCache::init_decay() {
  const auto decay_part = [](const Quantizer& from, const Quantizer& to, size_t from_offset, size_t to_offset) {
    const auto* f = dynamic_cast<const MseQuantizer*>(&from);
    const auto* t = dynamic_cast<const MseQuantizer*>(&to);
    TQ_CHECK(f != nullptr && t != nullptr, NotSupported, "temporal decay needs turboquant_mse quantizers");
    DecayPart part;
    part.dim = static_cast<size_t>(from.dim());
    part.from_offset = from_offset;
    part.to_offset = to_offset;
    part.from_bits = from.bits();
    part.to_bits = to.bits();
    part.lut = nearest_centroid_table(f->codebook(), t->codebook());
    part.from_c = f->codebook().centroids;
    part.to_c = t->codebook().centroids;
    return part;
  };
  decay_quantizers_.reserve(quantizers_.size());
  for (const auto& q : quantizers_) {
    QuantizerConfig c = q->config();
    if (c.has_outliers()) {  // config() holds the resolved channels and outlier_bits
      const auto bits = decayed_split_bits(c.dim, c.bits, static_cast<int>(c.outlier_channels.size()),
                                           c.outlier_bits, config_.decay_bits);
      c.bits = bits[0];
      c.outlier_bits = bits[1];
    } else {
      c.bits = config_.decay_bits;
    }
    decay_quantizers_.push_back(make_quantizer(c));
    decay_quantizers_.back()->share_rotation(*q);  // one rotation per stream in memory
  }
  // One plan per stream: the widths differ between heads with per-head bits, and between
  // layers with a per-layer, per-head list.
  for (size_t s = 0; s < quantizers_.size(); ++s) {
    const Quantizer& from = *quantizers_[s];
    const Quantizer& to = *decay_quantizers_[s];
    DecayPlan plan;
    const auto* fs = dynamic_cast<const OutlierSplitQuantizer*>(&from);
    if (fs != nullptr) {
      const auto& ts = dynamic_cast<const OutlierSplitQuantizer&>(to);
      TQ_CHECK(fs->part_offset(0) == ts.part_offset(0), NotSupported,
               "temporal decay of an outlier split needs the same angle bytes before and after");
      plan.header = fs->part_offset(0);
      plan.split = true;
      for (size_t p = 0; p < 2; ++p)
        plan.parts.push_back(decay_part(fs->part(p), ts.part(p), fs->part_offset(p), ts.part_offset(p)));
    } else {
      plan.parts.push_back(decay_part(from, to, 0, 0));
    }
    decay_plans_.push_back(std::move(plan));
  }
  decay_done_.assign(static_cast<size_t>(config_.n_layers), 0);
}

size_t KVCache::sink_base(size_t layer) const {
  if (config_.fp16_sinks == 0 || is_fp16_layer(static_cast<int>(layer))) return 0;
  return config_.fp16_sinks;
}

const Quantizer& KVCache::stream_block_quantizer(size_t stream, size_t block) const {
  return pages_[stream].is_decayed(block) ? *decay_quantizers_[stream] : *quantizers_[stream];
}

void KVCache::decay_block(size_t i, size_t b) {
  const Quantizer& q = *quantizers_[i];
  const Quantizer& dq = *decay_quantizers_[i];
  const size_t bt = config_.block_tokens;
  const DecayPlan& plan = decay_plans_[i];
  const size_t cb = q.code_bytes(), dcb = dq.code_bytes();
  const bool rescale = config_.norm_correction;
  std::unique_ptr<uint8_t[]> fresh(new uint8_t[bt * dcb]);
  std::vector<uint8_t> idx(static_cast<size_t>(config_.head_dim));
  PagedCodes& p = pages_[i];
  const uint8_t* src = p.code_blocks[b].get();
  std::vector<float> ratio(rescale ? bt : 0);  // ‖ỹ_old‖² / ‖ỹ_new‖² per token
  for (size_t t = 0; t < bt; ++t) {
    const uint8_t* row = src + t * cb;
    uint8_t* out = fresh.get() + t * dcb;
    std::memcpy(out, row, plan.header);
    std::array<float, 2> w{1.0f, 1.0f};  // squared part weights (cos²φ̃, sin²φ̃ of a split)
    if (rescale && plan.split) {
      const auto r = dynamic_cast<const OutlierSplitQuantizer&>(q).part_ratios(row);
      w = {r[0] * r[0], r[1] * r[1]};
    }
    double old_sq = 0.0, new_sq = 0.0;
    for (size_t k = 0; k < plan.parts.size(); ++k) {
      const DecayPart& part = plan.parts[k];
      unpack_indices(row + part.from_offset, part.dim, part.from_bits, idx.data());
      double o = 0.0, n = 0.0;
      for (size_t j = 0; j < part.dim; ++j) {
        if (rescale) o += static_cast<double>(part.from_c[idx[j]]) * part.from_c[idx[j]];
        idx[j] = part.lut[idx[j]];
        if (rescale) n += static_cast<double>(part.to_c[idx[j]]) * part.to_c[idx[j]];
      }
      pack_indices(idx.data(), part.dim, part.to_bits, out + part.to_offset);
      old_sq += w[k] * o;
      new_sq += w[k] * n;
    }
    if (rescale) ratio[t] = new_sq > 0.0 ? static_cast<float>(std::sqrt(old_sq / new_sq)) : 1.0f;
  }
  if (rescale) {  // norms are fp16 (KVCache streams always store fp16 norms)
    uint8_t* nb = p.norm_blocks[b].get();
    for (size_t t = 0; t < bt; ++t) {
      uint16_t h;
      std::memcpy(&h, nb + t * 2, 2);
      const float v = std::min(half_to_float(h) * ratio[t], 65504.0f);
      h = float_to_half(v);
      std::memcpy(nb + t * 2, &h, 2);
    }
  }
  p.code_blocks[b] = std::move(fresh);
  p.decayed[b] = 1;
}

void KVCache::decay_layer(size_t l) {
  const size_t bt = config_.block_tokens, n = sizes_[l];
  const size_t base = config_.windowed() ? std::min(coded_[l], sink_base(l)) : 0;
  const size_t nc = (config_.windowed() ? coded_[l] : n) - base;
  const size_t streams = static_cast<size_t>(config_.n_kv_heads) * 2;
  try {
    for (size_t b = decay_done_[l]; b < nc / bt; ++b) {
      const size_t newest = base + (b + 1) * bt - 1;
      if (n - 1 - newest < config_.decay_after) break;  // later blocks are younger still
      for (size_t s = 0; s < streams; ++s)
        if (!pages_[l * streams + s].is_decayed(b)) decay_block(l * streams + s, b);
      decay_done_[l] = b + 1;
    }
  } catch (const std::bad_alloc&) {
    // Every block is either fully decayed or untouched: retried on the next append.
  }
}

void KVCache::evict_layer(size_t l) {
  const size_t bt = config_.block_tokens, M = config_.max_coded_tokens;
  const size_t streams = static_cast<size_t>(config_.n_kv_heads) * 2;
  const size_t base = config_.windowed() ? std::min(coded_[l], sink_base(l)) : 0;
  size_t nc = (config_.windowed() ? coded_[l] : sizes_[l]) - base;
  size_t drop = 0;  // whole blocks from the front of the codes
  while (nc > M) {
    nc -= bt;
    ++drop;
  }
  if (drop == 0) return;
  for (size_t s = 0; s < streams; ++s) {
    PagedCodes& p = pages_[l * streams + s];
    const auto k = static_cast<std::ptrdiff_t>(drop);
    p.code_blocks.erase(p.code_blocks.begin(), p.code_blocks.begin() + k);
    p.norm_blocks.erase(p.norm_blocks.begin(), p.norm_blocks.begin() + k);
    if (!p.decayed.empty()) p.decayed.erase(p.decayed.begin(), p.decayed.begin() + k);
  }
  sizes_[l] -= drop * bt;
  if (config_.windowed()) coded_[l] -= drop * bt;
  if (config_.decays()) decay_done_[l] -= std::min(decay_done_[l], drop);
  evicted_[l] += drop * bt;
}

size_t KVCache::evicted_tokens(int layer) const {
  check_layer(layer);
  return evicted_[static_cast<size_t>(layer)];
}

void KVCache::set_evicted_tokens(int layer, size_t n) {
  const WriteScope guard(*this, "set_evicted_tokens");
  check_layer(layer);
  TQ_CHECK(n == 0 || config_.max_coded_tokens > 0, InvalidArgument, "evicted tokens ", n,
           " on a cache without eviction (max_coded_tokens = 0)");
  evicted_[static_cast<size_t>(layer)] = n;
}

size_t KVCache::sink_tokens(int layer) const {
  check_layer(layer);
  if (sinks_.empty()) return 0;
  return sinks_[index(layer, 0, KVRole::kKey)].size() / static_cast<size_t>(config_.head_dim);
}

const std::vector<uint16_t>& KVCache::sinks(int layer, int kv_head, KVRole role) const {
  (void)key_quantizer(layer, kv_head);  // range checks
  static const std::vector<uint16_t> kEmpty;
  return sinks_.empty() ? kEmpty : sinks_[index(layer, kv_head, role)];
}

void KVCache::append_sinks(int layer, size_t n, const std::vector<const uint16_t*>& rows) {
  const WriteScope guard(*this, "append_sinks");
  check_layer(layer);
  const auto l = static_cast<size_t>(layer);
  const auto d = static_cast<size_t>(config_.head_dim);
  const size_t streams = static_cast<size_t>(config_.n_kv_heads) * 2;
  TQ_CHECK(rows.size() == streams, InvalidArgument, "append_sinks needs ", streams, " streams");
  TQ_CHECK(sizes_[l] == 0, InvalidArgument, "append_sinks needs an empty layer (layer ", layer, " holds ",
           sizes_[l], " tokens)");
  TQ_CHECK(n <= sink_base(l), InvalidArgument, "sinks of ", n, " tokens exceed the ", sink_base(l),
           " fp16 sinks of layer ", layer);
  TQ_CHECK(config_.max_tokens == 0 || n <= config_.max_tokens, InvalidArgument, "sinks of ", n,
           " tokens exceed max_tokens=", config_.max_tokens);
  for (size_t s = 0; s < streams; ++s)
    for (size_t j = 0; j < n * d; ++j)
      TQ_CHECK(std::isfinite(half_to_float(rows[s][j])), InvalidArgument, "sink row value ", j, " of stream ", s,
               " is not finite");
  if (n == 0) return;
  for (size_t s = 0; s < streams; ++s) {
    auto& v = sinks_[l * streams + s];
    v.reserve(config_.fp16_sinks * d);
    v.assign(rows[s], rows[s] + n * d);
  }
  sizes_[l] = n;
  coded_[l] = n;
}

const Quantizer& KVCache::block_quantizer(int layer, int kv_head, KVRole role, size_t code_index) const {
  (void)key_quantizer(layer, kv_head);
  const size_t i = index(layer, kv_head, role);
  return stream_block_quantizer(i, code_index / config_.block_tokens);
}

size_t KVCache::token_bytes(int layer) const {
  check_layer(layer);
  const auto l = static_cast<size_t>(layer);
  const size_t bt = config_.block_tokens, d = static_cast<size_t>(config_.head_dim);
  const size_t codes = code_tokens(layer), fp16_rows = sizes_[l] - codes;
  const size_t streams = static_cast<size_t>(config_.n_kv_heads) * 2;
  size_t total = 0;
  for (size_t i = l * streams; i < (l + 1) * streams; ++i) {
    total += fp16_rows * d * sizeof(uint16_t);
    for (size_t b = 0; b * bt < codes; ++b)
      total += std::min(bt, codes - b * bt) * stream_block_quantizer(i, b).bytes_per_vector();
  }
  if (config_.mixed())  // the groups' masks
    for (size_t h = 0; h < streams / 2; ++h) total += mixed_masks_[l * streams / 2 + h].size() * sizeof(uint64_t);
  return total;
}

size_t KVCache::decayed_blocks(int layer, int kv_head, KVRole role) const {
  (void)key_quantizer(layer, kv_head);
  const PagedCodes& p = pages_[index(layer, kv_head, role)];
  return static_cast<size_t>(std::count(p.decayed.begin(), p.decayed.end(), uint8_t{1}));
}

void KVCache::decode_tokens(int layer, int kv_head, KVRole role, size_t start, size_t n, float* out) const {
  const ReadScope guard(*this, "decode");
  (void)key_quantizer(layer, kv_head);  // range checks
  const size_t size = sizes_[static_cast<size_t>(layer)];
  TQ_CHECK(start <= size && n <= size - start, InvalidArgument, "tokens [", start, ", ", start + n,
           ") beyond the layer's ", size, " tokens");
  const auto d = static_cast<size_t>(config_.head_dim);
  const size_t ns = sink_tokens(layer), coded = coded_tokens(layer);
  const size_t i = index(layer, kv_head, role);
  const size_t bt = config_.block_tokens;
  std::vector<uint8_t> codes, norms;
  for (size_t t = start; t < start + n;) {
    float* o = out + (t - start) * d;
    if (t < ns) {
      const size_t c = std::min(start + n, ns) - t;
      const auto& s = sinks_[i];
      for (size_t j = 0; j < c * d; ++j) o[j] = half_to_float(s[t * d + j]);
      t += c;
    } else if (t < coded && config_.mixed()) {  // codes stored by importance: one at a time
      const size_t j = mixed_code_index(static_cast<size_t>(layer), static_cast<size_t>(kv_head), t - ns);
      const Quantizer& q = stream_block_quantizer(i, j / bt);
      q.decode(pages_[i].code_blocks[j / bt].get() + (j % bt) * q.code_bytes(),
               pages_[i].norm_blocks[j / bt].get() + (j % bt) * q.norm_bytes(), 1, o);
      t += 1;
    } else if (t < coded) {
      const size_t j0 = t - ns, b = j0 / bt, off = j0 % bt;
      const size_t c = std::min({start + n, coded, ns + (b + 1) * bt}) - t;
      const Quantizer& q = stream_block_quantizer(i, b);
      q.decode(pages_[i].code_blocks[b].get() + off * q.code_bytes(),
               pages_[i].norm_blocks[b].get() + off * q.norm_bytes(), c, o);
      t += c;
    } else {
      const size_t c = start + n - t;
      const auto& w = windows_[i];
      for (size_t j = 0; j < c * d; ++j) o[j] = half_to_float(w[(t - coded) * d + j]);
      t += c;
    }
  }
}

}  // namespace turboquant
