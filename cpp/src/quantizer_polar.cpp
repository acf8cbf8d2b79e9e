// polar: recursive polar transform of the rotated unit vector, Lloyd-Max angle codebooks
// per level. PolarQuant paper, §3-4; layout and bit allocation in quantizer_polar.h.
#include "turboquant/quantizer_polar.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <numbers>
#include <tuple>

#include "turboquant/error.h"
#include "turboquant/packing.h"

namespace turboquant {
namespace {

constexpr double kPi = std::numbers::pi;

ScalarDensity angle_density(int ka, int kb, bool b_signed) {
  ScalarDensity d;
  const double a = ka, b = kb;
  if (b_signed) {
    // ψ = atan2(v, r_a), v ~ N(0, 1) signed: cos^{ka-1}ψ / B(ka/2, 1/2) on [-π/2, π/2].
    const double log_norm = -(std::lgamma(a / 2) + std::lgamma(0.5) - std::lgamma(a / 2 + 0.5));
    const double sigma = 1.0 / std::sqrt(a);
    d.scale = std::min(sigma, kPi / 4);
    d.lo = std::max(-kPi / 2, -20.0 * sigma);
    d.hi = std::min(kPi / 2, 20.0 * sigma);
    d.pdf = [log_norm, a](double x) {
      const double c = std::cos(x);
      if (c <= 0.0) return 0.0;
      return std::exp(log_norm + (a - 1) * std::log(c));
    };
  } else {
    // sin²ψ ~ Beta(kb/2, ka/2): 2 sin^{kb-1}ψ cos^{ka-1}ψ / B(ka/2, kb/2) on [0, π/2].
    const double log_norm = std::log(2.0) - (std::lgamma(a / 2) + std::lgamma(b / 2) - std::lgamma((a + b) / 2));
    const double sigma = 1.0 / std::sqrt(2.0 * (a + b));
    const double center = std::atan(std::sqrt(b / a));
    d.scale = std::min(sigma, kPi / 4);
    d.lo = std::max(0.0, center - 20.0 * sigma);
    d.hi = std::min(kPi / 2, center + 20.0 * sigma);
    d.pdf = [log_norm, a, b](double x) {
      const double s = std::sin(x), c = std::cos(x);
      if (s <= 0.0 || c <= 0.0) return 0.0;
      return std::exp(log_norm + (b - 1) * std::log(s) + (a - 1) * std::log(c));
    };
  }
  return d;
}

// Mean and variance of a density by composite Simpson (for 0-bit angles).
std::pair<double, double> mean_variance(const ScalarDensity& d) {
  const int n = 20000;
  const double h = (d.hi - d.lo) / n;
  double m0 = 0, m1 = 0, m2 = 0;
  for (int i = 0; i <= n; ++i) {
    const double x = d.lo + h * i;
    const double w = (i == 0 || i == n) ? 1.0 : (i % 2 ? 4.0 : 2.0);
    const double f = d.pdf(x) * w;
    m0 += f;
    m1 += f * x;
    m2 += f * x * x;
  }
  const double mean = m1 / m0;
  return {mean, m2 / m0 - mean * mean};
}

struct AngleStats {
  std::unique_ptr<Codebook> codebook;
  double mean = 0, variance = 0;
};

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

const AngleStats& angle_stats(int ka, int kb, bool b_signed, int bits) {
  static std::map<std::tuple<int, int, bool, int>, std::unique_ptr<AngleStats>> cache;
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto& slot = cache[{ka, kb, b_signed, bits}];
  if (!slot) {
    auto s = std::make_unique<AngleStats>();
    const ScalarDensity d = angle_density(ka, kb, b_signed);
    std::tie(s->mean, s->variance) = mean_variance(d);
    if (bits > 0) {
      s->codebook = std::make_unique<Codebook>(solve_lloyd_max(d, bits));
      s->codebook->dim = ka + kb;
    }
    slot = std::move(s);
  }
  return *slot;
}

void check_bits(int bits) {
  TQ_CHECK(bits >= kMinBits && bits <= kMaxBits, InvalidArgument, "bits must be in [", kMinBits, ", ",
           kMaxBits, "], got ", bits);
}

}  // namespace

const Codebook& polar_angle_codebook(int ka, int kb, bool b_signed, int bits) {
  check_bits(bits);
  TQ_CHECK(ka >= 1 && kb >= 1 && ka + kb <= 2 * kMaxDim, InvalidArgument, "polar angle needs ka, kb >= 1, got ",
           ka, ", ", kb);
  return *angle_stats(ka, kb, b_signed, bits).codebook;
}

const Codebook& polar_circle_codebook(int bits) {
  check_bits(bits);
  static std::map<int, std::unique_ptr<Codebook>> cache;
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto& slot = cache[bits];
  if (!slot) {
    ScalarDensity d;
    d.lo = 0.0;
    d.hi = 2.0 * kPi;
    d.scale = 2.0 * kPi / std::sqrt(12.0);
    d.pdf = [](double) { return 1.0 / (2.0 * kPi); };
    slot = std::make_unique<Codebook>(solve_lloyd_max(d, bits));
    slot->dim = 2;
  }
  return *slot;
}

PolarQuantizer::PolarQuantizer(const QuantizerConfig& config) : Quantizer(config) {
  const int b = config_.bits;
  b1_ = b < kMaxBits ? b + 1 : kMaxBits;
  bh_ = b < kMaxBits ? b - 1 : kMaxBits;
  const int d = config_.dim;
  if (d == 1) {  // a one-channel part: a unit "vector" is its sign
    level1_bytes_ = 1;
    higher_bytes_ = 0;
    root_ = 0;
    return;
  }
  struct Item {
    int id, k;
    bool signed_leaf;
  };
  std::vector<Item> level;
  for (int j = 0; j < d; ++j) level.push_back({j, 1, true});
  int next_id = d;
  for (int lv = 1; level.size() > 1; ++lv) {
    std::vector<Item> next;
    for (size_t i = 0; i < level.size(); i += 2) {
      if (i + 1 == level.size()) {
        next.push_back(level[i]);  // odd node out: carried up unchanged
        continue;
      }
      const Item& a = level[i];
      const Item& bb = level[i + 1];
      TQ_CHECK(lv == 1 || !a.signed_leaf, InvalidArgument, "polar tree: signed node on the left");
      Node n{a.id, bb.id, next_id++, a.k, bb.k, lv, lv > 1 && bb.signed_leaf, nullptr, 0.0f};
      if (lv == 1) {
        n.codebook = &polar_circle_codebook(b1_);
        ++n_level1_;
      } else {
        const AngleStats& st = angle_stats(a.k, bb.k, n.b_signed, bh_);
        n.codebook = st.codebook.get();
        n.mean = static_cast<float>(st.mean);
        ++n_higher_;
      }
      nodes_.push_back(n);
      next.push_back({n.parent, a.k + bb.k, false});
    }
    level = std::move(next);
  }
  root_ = level[0].id;
  level1_bytes_ = packed_bytes(n_level1_, b1_);
  higher_bytes_ = bh_ > 0 ? packed_bytes(n_higher_, bh_) : 0;
}

double PolarQuantizer::nominal_bits() const {
  if (dim() == 1) return 1.0;
  return (static_cast<double>(n_level1_) * b1_ + static_cast<double>(n_higher_) * bh_) / dim();
}

double PolarQuantizer::predicted_distortion() const {
  double s = 0.0;
  for (const Node& n : nodes_) {
    const double dist = n.codebook ? n.codebook->distortion : angle_stats(n.ka, n.kb, n.b_signed, 0).variance;
    s += static_cast<double>(n.ka + n.kb) / dim() * dist;
  }
  return s;
}

void PolarQuantizer::quantize_rotated(const float* y, size_t n, uint8_t* codes) const {
  const auto d = static_cast<size_t>(dim());
  const size_t cb = code_bytes();
  if (d == 1) {
    for (size_t r = 0; r < n; ++r) codes[r * cb] = y[r] >= 0.0f ? 1 : 0;
    return;
  }
  std::vector<float> val(2 * d);
  std::vector<uint8_t> i1(n_level1_), ih(n_higher_);
  for (size_t r = 0; r < n; ++r) {
    std::copy(y + r * d, y + (r + 1) * d, val.begin());
    size_t k1 = 0, kh = 0;
    for (const Node& nd : nodes_) {
      const float a = val[static_cast<size_t>(nd.a)], b = val[static_cast<size_t>(nd.b)];
      float psi = std::atan2(b, a);
      if (nd.level == 1) {
        if (psi < 0.0f) psi += static_cast<float>(2.0 * kPi);
        i1[k1++] = nd.codebook->quantize(psi);
      } else {
        ih[kh++] = nd.codebook ? nd.codebook->quantize(psi) : 0;
      }
      val[static_cast<size_t>(nd.parent)] = std::sqrt(a * a + b * b);
    }
    uint8_t* code = codes + r * cb;
    pack_indices(i1.data(), n_level1_, b1_, code);
    if (bh_ > 0) pack_indices(ih.data(), n_higher_, bh_, code + level1_bytes_);
  }
}

void PolarQuantizer::dequantize_rotated(const uint8_t* codes, size_t n, float* y) const {
  const auto d = static_cast<size_t>(dim());
  const size_t cb = code_bytes();
  if (d == 1) {
    for (size_t r = 0; r < n; ++r) y[r] = (codes[r * cb] & 1u) ? 1.0f : -1.0f;
    return;
  }
  std::vector<float> val(2 * d);
  std::vector<uint8_t> i1(n_level1_), ih(n_higher_, 0);
  for (size_t r = 0; r < n; ++r) {
    const uint8_t* code = codes + r * cb;
    unpack_indices(code, n_level1_, b1_, i1.data());
    if (bh_ > 0) unpack_indices(code + level1_bytes_, n_higher_, bh_, ih.data());
    val[static_cast<size_t>(root_)] = 1.0f;
    size_t k1 = n_level1_, kh = n_higher_;
    for (auto it = nodes_.rbegin(); it != nodes_.rend(); ++it) {
      const Node& nd = *it;
      const float psi = nd.level == 1 ? nd.codebook->centroids[i1[--k1]]
                        : nd.codebook ? nd.codebook->centroids[ih[--kh]]
                                      : (--kh, nd.mean);
      const float rr = val[static_cast<size_t>(nd.parent)];
      val[static_cast<size_t>(nd.a)] = rr * std::cos(psi);
      val[static_cast<size_t>(nd.b)] = rr * std::sin(psi);
    }
    std::copy(val.begin(), val.begin() + static_cast<std::ptrdiff_t>(d), y + r * d);
  }
}

namespace {
const bool kRegistered = register_quantizer(
    "polar", [](const QuantizerConfig& c) { return std::make_unique<PolarQuantizer>(c); });
}  // namespace

}  // namespace turboquant
