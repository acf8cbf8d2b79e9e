#include "turboquant/quantizer_polar.h"

#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

#include "quantizer_test_util.h"
#include "turboquant/packing.h"

using namespace turboquant;
using namespace tqtest;

namespace {
const PolarQuantizer& as_polar(const Quantizer& q) { return dynamic_cast<const PolarQuantizer&>(q); }
constexpr double kPi = std::numbers::pi;
}  // namespace

TEST(PolarQuantizer, BitLayoutAndBytes) {
  EXPECT_EQ(bytes_per_vector(config("polar", 128, 1)), 18u);
  EXPECT_EQ(bytes_per_vector(config("polar", 128, 2)), 34u);
  EXPECT_EQ(bytes_per_vector(config("polar", 128, 3)), 50u);
  EXPECT_EQ(bytes_per_vector(config("polar", 128, 4)), 66u);
  auto q = make_quantizer(config("polar", 128, 3));
  const auto& p = as_polar(*q);
  EXPECT_EQ(p.level1_bits(), 4);
  EXPECT_EQ(p.higher_bits(), 2);
  EXPECT_EQ(p.angles(), 127u);
  EXPECT_DOUBLE_EQ(q->nominal_bits(), (64.0 * 4 + 63.0 * 2) / 128.0);
  auto odd = make_quantizer(config("polar", 17, 3));
  EXPECT_EQ(as_polar(*odd).angles(), 16u);
  EXPECT_EQ(odd->code_bytes(), packed_bytes(8, 4) + packed_bytes(8, 2));
}

TEST(PolarQuantizer, LevelOneCodebookIsUniform) {
  for (int b : {1, 3, 5}) {
    const auto& cb = polar_circle_codebook(b);
    const int l = 1 << b;
    for (int i = 0; i < l; ++i) EXPECT_NEAR(cb.centroids[static_cast<size_t>(i)], (i + 0.5) * 2 * kPi / l, 1e-5);
    EXPECT_NEAR(cb.distortion, std::pow(2 * kPi / l, 2) / 12, 1e-6);
  }
}

TEST(PolarQuantizer, AngleCodebooksFollowTheirLaws) {
  // k = 1 + 1 pairs of radii: density sin 2ψ, mean π/4, variance π²/16 - 1/2.
  const auto& cb = polar_angle_codebook(2, 2, false, 1);
  EXPECT_NEAR(cb.centroids[0] + cb.centroids[1], kPi / 2, 1e-6);
  // Large k: ≈ N(π/4, 1/(2(ka + kb))); the 1-bit Lloyd-Max of a Gaussian is ±σ√(2/π).
  const auto& big = polar_angle_codebook(256, 256, false, 1);
  const double sigma = 1.0 / std::sqrt(2.0 * 512);
  EXPECT_NEAR(big.centroids[1] - kPi / 4, sigma * std::sqrt(2 / kPi), 0.01 * sigma);
  // Signed carried coordinate: symmetric about 0.
  const auto& sg = polar_angle_codebook(16, 1, true, 2);
  EXPECT_NEAR(sg.centroids[0], -sg.centroids[3], 1e-6);
}

TEST(PolarQuantizer, PackingLayoutAngles) {
  auto q = make_quantizer(config("polar", 16, 3, 1));
  const auto& p = as_polar(*q);
  const auto y = unit_vectors(5, 16, 2);
  std::vector<uint8_t> codes(5 * q->code_bytes());
  q->quantize_rotated(y.data(), 5, codes.data());
  const auto& c1 = polar_circle_codebook(4);
  for (size_t r = 0; r < 5; ++r) {
    for (size_t i = 0; i < 8; ++i) {
      double psi = std::atan2(y[r * 16 + 2 * i + 1], y[r * 16 + 2 * i]);
      if (psi < 0) psi += 2 * kPi;
      EXPECT_EQ(packed_index(codes.data() + r * q->code_bytes(), i, 4), c1.quantize(static_cast<float>(psi)));
    }
    // First level-2 angle: atan2(r(y2, y3), r(y0, y1)), 2-bit index after the level-1 bytes.
    const double ra = std::hypot(y[r * 16 + 0], y[r * 16 + 1]), rb = std::hypot(y[r * 16 + 2], y[r * 16 + 3]);
    const auto& c2 = *p.nodes()[8].codebook;
    EXPECT_EQ(packed_index(codes.data() + r * q->code_bytes() + 4, 0, 2),
              c2.quantize(static_cast<float>(std::atan2(rb, ra))));
  }
}

TEST(PolarQuantizer, DistortionMatchesPrediction) {
  const auto x = unit_vectors(3000, 128, 3);
  for (int b = 2; b <= 6; ++b) {
    auto q = make_quantizer(config("polar", 128, b, 1));
    const double got = mean_sq_error(x, decode(*q, encode(*q, x)), 128);
    const double want = as_polar(*q).predicted_distortion();
    EXPECT_NEAR(got, want, 0.06 * want) << "b=" << b;
    EXPECT_LT(got, std::sqrt(3.0) * kPi / 2 * std::pow(4.0, -b)) << "b=" << b;
    EXPECT_GT(got, std::pow(4.0, -b));
  }
}

TEST(PolarQuantizer, AnyDimRoundTrips) {
  for (int d : {16, 17, 33, 100}) {
    auto q = make_quantizer(config("polar", d, 8, 1));
    const auto x = unit_vectors(50, d, 4);
    EXPECT_LT(mean_sq_error(x, decode(*q, encode(*q, x)), d), 2e-4) << d;
  }
}

TEST(PolarQuantizer, Deterministic) { check_deterministic(config("polar", 64, 3, 2)); }

TEST(PolarQuantizer, HooksMatchReconstruction) {
  check_hooks(*make_quantizer(config("polar", 64, 3, 1)), 5);
  check_hooks(*make_quantizer(config("polar", 37, 1, 1)), 6);
}
