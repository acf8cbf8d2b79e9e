#include "turboquant/cache/temporal_decay.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>

#include "turboquant/error.h"
#include "turboquant/half.h"
#include "turboquant/packing.h"
#include "turboquant/quantizer_outlier.h"

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

DecayPart decay_part(const Quantizer& from, const Quantizer& to, size_t from_offset, size_t to_offset) {
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
}
}  // namespace

DecayPlan make_decay_plan(const Quantizer& from, const Quantizer& to) {
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
  return plan;
}

TemporalDecay::TemporalDecay(const CacheParts& parts, const AgingConfig& config)
    : AgingPolicy(parts), decay_after_(config.decay_after), done_(static_cast<size_t>(parts.shape.n_layers), 0) {
  plans_.reserve(parts.table.streams());
  for (size_t s = 0; s < parts.table.streams(); ++s)
    plans_.push_back(make_decay_plan(parts.table.at(s), *parts.table.decayed(s)));
}

void TemporalDecay::cut(size_t l, size_t codes, size_t /*size*/) {
  done_[l] = std::min(done_[l], codes / parts_.store.block_tokens());
}

void TemporalDecay::decay_block(size_t i, size_t b) {
  const Quantizer& q = parts_.table.at(i);
  const Quantizer& dq = *parts_.table.decayed(i);
  const size_t bt = parts_.store.block_tokens();
  const DecayPlan& plan = plans_[i];
  const size_t cb = q.code_bytes(), dcb = dq.code_bytes();
  const bool rescale = q.config().norm_correction;  // the stream's quantizer stores ‖x‖/‖x̃‖
  std::unique_ptr<uint8_t[]> fresh(new uint8_t[bt * dcb]);
  std::vector<uint8_t> idx(static_cast<size_t>(parts_.shape.head_dim));
  const uint8_t* src = parts_.store[i].code_blocks[b].get();
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
  if (rescale) {  // norms are fp16 (the cache's streams always store fp16 norms)
    uint8_t* nb = parts_.store.norms(i, b);
    for (size_t t = 0; t < bt; ++t) {
      uint16_t h;
      std::memcpy(&h, nb + t * 2, 2);
      const float v = std::min(half_to_float(h) * ratio[t], 65504.0f);
      h = float_to_half(v);
      std::memcpy(nb + t * 2, &h, 2);
    }
  }
  parts_.store.set_decayed(i, b, std::move(fresh));
}

size_t TemporalDecay::age(size_t l) {
  const Segments& seg = parts_.segments;
  const size_t bt = parts_.store.block_tokens(), n = seg.size[l];
  const size_t base = seg.code_base(l), nc = seg.code_tokens(l);
  const size_t streams = seg.streams_per_layer;
  try {
    for (size_t b = done_[l]; b < nc / bt; ++b) {
      const size_t newest = base + (b + 1) * bt - 1;
      if (n - 1 - newest < decay_after_) break;  // later blocks are younger still
      for (size_t s = 0; s < streams; ++s)
        if (!parts_.store[l * streams + s].is_decayed(b)) decay_block(l * streams + s, b);
      done_[l] = b + 1;
    }
  } catch (const std::bad_alloc&) {
    // Every block is either fully decayed or untouched: retried on the next append.
  }
  return 0;
}

}  // namespace turboquant
