#include "turboquant/quantizer_outlier.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numbers>

#include "quantizer_test_util.h"
#include "turboquant/error.h"
#include "turboquant/rotation_block.h"

using namespace turboquant;
using namespace tqtest;

namespace {
QuantizerConfig split(const std::string& method, int d, int bits, int n_out, int out_bits, uint64_t seed = 0,
                      int angle_bits = 8) {
  auto c = config(method, d, bits, seed);
  c.n_outlier_channels = n_out;
  c.outlier_bits = out_bits;
  c.split_angle_bits = angle_bits;
  return c;
}
const int kAngleBits[] = {8, 16};
const OutlierSplitQuantizer& as_split(const Quantizer& q) { return dynamic_cast<const OutlierSplitQuantizer&>(q); }
const char* kMethods[] = {"turboquant_mse", "turboquant_prod", "qjl", "polar"};
}  // namespace

TEST(OutlierSplit, BytesAndExactBits) {
  auto q = make_quantizer(split("turboquant_mse", 128, 2, 4, 3));
  EXPECT_EQ(q->bytes_per_vector(), 36u);  // 1 (8-bit angle, the default) + 2 + 31 + 2 (norm)
  EXPECT_EQ(as_split(*q).angle_bytes(), 1u);
  auto q16 = make_quantizer(split("turboquant_mse", 128, 2, 4, 3, 0, 16));
  EXPECT_EQ(q16->bytes_per_vector(), 37u);  // 2 (16-bit angle) + 2 + 31 + 2 (norm)
  EXPECT_EQ(as_split(*q16).angle_bytes(), 2u);
  EXPECT_DOUBLE_EQ(q16->nominal_bits(), 2.03125);  // the angle is not payload
  EXPECT_DOUBLE_EQ(q->nominal_bits(), 2.03125);
  EXPECT_DOUBLE_EQ(make_quantizer(split("turboquant_mse", 128, 2, 64, 3))->nominal_bits(), 2.5);
  EXPECT_DOUBLE_EQ(make_quantizer(split("turboquant_mse", 128, 3, 64, 4))->nominal_bits(), 3.5);
  EXPECT_DOUBLE_EQ(make_quantizer(split("turboquant_mse", 128, 2, 32, 3))->nominal_bits(), 2.25);
  EXPECT_EQ(as_split(*make_quantizer(split("turboquant_mse", 64, 3, 4, 0))).outlier_bits(), 4);
  EXPECT_EQ(make_quantizer(split("turboquant_mse", 64, 8, 4, 0))->config().outlier_bits, 8);
}

TEST(OutlierSplit, RejectsBadChannels) {
  auto c = config("turboquant_mse", 32, 2);
  c.outlier_channels = {1, 1};
  EXPECT_THROW(make_quantizer(c), InvalidArgument);
  c.outlier_channels = {40};
  EXPECT_THROW(make_quantizer(c), InvalidArgument);
  c.outlier_channels = {1, 2};
  c.n_outlier_channels = 3;
  EXPECT_THROW(make_quantizer(c), InvalidArgument);
  EXPECT_THROW(make_quantizer(split("turboquant_mse", 32, 2, 32, 3)), InvalidArgument);
  auto b = config("turboquant_mse", 32, 2);
  b.outlier_bits = 3;  // without outliers
  EXPECT_THROW(make_quantizer(b), InvalidArgument);
}

TEST(OutlierSplit, CalibrationPicksLargestMeanMagnitude) {
  const int d = 32;
  auto x = unit_vectors(200, d, 1);
  for (size_t r = 0; r < 200; ++r) {
    x[r * d + 7] *= 6;
    x[r * d + 20] *= -9;
    x[r * d + 3] *= 4;
  }
  EXPECT_EQ(select_outlier_channels(x.data(), 200, d, 2), (std::vector<int>{7, 20}));
  EXPECT_EQ(select_outlier_channels(x.data(), 200, d, 3), (std::vector<int>{3, 7, 20}));
  EXPECT_THROW(select_outlier_channels(x.data(), 200, d, 0), InvalidArgument);
  EXPECT_THROW(select_outlier_channels(x.data(), 0, d, 2), InvalidArgument);
}

TEST(OutlierSplit, BlockRotationIsOrthogonalAndPermutes) {
  auto c = config("turboquant_mse", 24, 2, 3);
  c.outlier_channels = {20, 2, 9};
  auto q = make_quantizer(c);
  const auto& rot = dynamic_cast<const BlockDiagonalRotation&>(q->rotation());
  EXPECT_EQ(rot.channels()[0], 2);
  EXPECT_EQ(rot.channels()[2], 20);
  const auto m = rot.matrix();
  for (int i = 0; i < 24; ++i)
    for (int j = 0; j < 24; ++j) {
      double s = 0;
      for (int k = 0; k < 24; ++k) s += static_cast<double>(m[i * 24 + k]) * m[j * 24 + k];
      EXPECT_NEAR(s, i == j ? 1.0 : 0.0, 1e-5);
    }
  // Outlier rows only touch outlier channels.
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 24; ++k)
      if (k != 2 && k != 9 && k != 20) {
        EXPECT_EQ(m[i * 24 + k], 0.0f);
      }
  auto back = Rotation::from_parameters(rot.kind(), 24, rot.parameters());
  EXPECT_EQ(back->matrix(), m);
}

TEST(OutlierSplit, AngleWidthIsValidated) {
  for (int bad : {0, 4, 12, 32, -8}) {
    try {
      make_quantizer(split("turboquant_mse", 64, 3, 4, 4, 0, bad));
      FAIL() << bad;
    } catch (const InvalidArgument& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("split_angle_bits"), std::string::npos) << msg;
      EXPECT_NE(msg.find(std::to_string(bad)), std::string::npos) << msg;
    }
  }
}

// The 8-bit angle costs one byte less per vector and reconstructs as well as the 16-bit
// one: its error (at most (π/2)/510 rad, ≤ 0.31% of ‖x‖ per part) is far below the codes'.
TEST(OutlierSplit, EightBitAngleReconstructsLikeSixteen) {
  for (int d : {64, 128}) {
    const auto x = unit_vectors(2000, d, 21);
    for (int bits : {2, 3, 4}) {
      auto q8 = make_quantizer(split("turboquant_mse", d, bits, d / 4, bits + 1, 5, 8));
      auto q16 = make_quantizer(split("turboquant_mse", d, bits, d / 4, bits + 1, 5, 16));
      EXPECT_EQ(q8->bytes_per_vector() + 1, q16->bytes_per_vector());
      EXPECT_EQ(q8->code_bytes() + 1, q16->code_bytes());
      const double e8 = mean_sq_error(x, decode(*q8, encode(*q8, x)), d);
      const double e16 = mean_sq_error(x, decode(*q16, encode(*q16, x)), d);
      EXPECT_NEAR(e8 / e16, 1.0, 0.01) << "d=" << d << " bits=" << bits << " e8=" << e8 << " e16=" << e16;
      // The parts' codes are the same: only the angle differs.
      const auto c8 = encode(*q8, x), c16 = encode(*q16, x);
      for (size_t r = 0; r < 50; ++r)
        EXPECT_TRUE(std::equal(c8.codes.begin() + static_cast<std::ptrdiff_t>(r * q8->code_bytes() + 1),
                               c8.codes.begin() + static_cast<std::ptrdiff_t>((r + 1) * q8->code_bytes()),
                               c16.codes.begin() + static_cast<std::ptrdiff_t>(r * q16->code_bytes() + 2)));
    }
  }
}

// The code is [φ][part O code][part I code], each part coding its own unit sub-vector.
TEST(OutlierSplit, PartsCodeTheirOwnSubvectors) {
  for (int angle_bits : kAngleBits) {
  const int d = 40;
  auto c = split("turboquant_mse", d, 2, 5, 4, 3, angle_bits);
  auto q = make_quantizer(c);
  const auto& s = as_split(*q);
  const auto x = unit_vectors(10, d, 4);
  const auto e = encode(*q, x);
  for (size_t r = 0; r < 10; ++r) {
    std::vector<float> xo(5), xi(35);
    double no = 0, ni = 0;
    for (size_t j = 0; j < 5; ++j) no += static_cast<double>(x[r * d + j]) * x[r * d + j];
    for (size_t j = 5; j < 40; ++j) ni += static_cast<double>(x[r * d + j]) * x[r * d + j];
    for (size_t j = 0; j < 5; ++j) xo[j] = static_cast<float>(x[r * d + j] / std::sqrt(no));
    for (size_t j = 5; j < 40; ++j) xi[j - 5] = static_cast<float>(x[r * d + j] / std::sqrt(ni));
    const uint8_t* code = e.codes.data() + r * q->code_bytes();
    const auto ratios = s.part_ratios(code);
    // Angle step (π/2)/(2^A - 1): half a step of error at most, plus float rounding.
    const double tol = angle_bits == 16 ? 3e-5 : 0.5 * (std::numbers::pi / 2) / 255 + 1e-6;
    EXPECT_NEAR(ratios[0], std::sqrt(no), tol);
    EXPECT_NEAR(ratios[1], std::sqrt(ni), tol);
    for (size_t p = 0; p < 2; ++p) {
      const auto& part = s.part(p);
      std::vector<float> y(static_cast<size_t>(part.dim()));
      part.rotation().forward(p == 0 ? xo.data() : xi.data(), y.data(), 1);
      std::vector<uint8_t> pc(part.code_bytes());
      part.quantize_rotated(y.data(), 1, pc.data());
      const size_t off = s.angle_bytes() + (p == 0 ? 0 : s.part(0).code_bytes());
      EXPECT_EQ(std::vector<uint8_t>(code + off, code + off + part.code_bytes()), pc) << "row " << r << " part " << p;
    }
  }
  }
}

TEST(OutlierSplit, EveryMethodSmallPartsRoundTrip) {
  for (const char* m : kMethods) {
    for (int n_out : {1, 2, 3, 4, 16}) {
      auto c = split(m, 64, 3, n_out, 4, 7);
      auto q = make_quantizer(c);
      check_hooks(*q, static_cast<uint64_t>(n_out));
      check_hooks(*make_quantizer(split(m, 64, 3, n_out, 4, 7, 16)), static_cast<uint64_t>(n_out));
      const auto x = unit_vectors(300, 64, 8);
      const double err = mean_sq_error(x, decode(*q, encode(*q, x)), 64);
      const double plain = mean_sq_error(x, decode(*make_quantizer(config(m, 64, 3, 7)), encode(*make_quantizer(config(m, 64, 3, 7)), x)), 64);
      // More bits on some channels never makes things much worse than the plain method.
      EXPECT_LT(err, 1.15 * plain) << m << " n_out=" << n_out;
    }
    for (int angle_bits : kAngleBits) check_deterministic(split(m, 64, 2, 4, 3, 5, angle_bits));
  }
}

// Outlier channels carrying most of the energy: the split spends its extra bits there and
// beats the plain quantizer at about the same storage.
TEST(OutlierSplit, HelpsWithOutlierChannels) {
  const int d = 128;
  auto x = unit_vectors(2000, d, 9);
  for (size_t r = 0; r < 2000; ++r)
    for (int j : {5, 40, 77, 100}) x[r * d + j] *= 12;
  auto c = split("turboquant_mse", d, 2, 0, 4);
  c.n_outlier_channels = 4;
  c.outlier_channels = select_outlier_channels(x.data(), 2000, d, 4);
  EXPECT_EQ(c.outlier_channels, (std::vector<int>{5, 40, 77, 100}));
  auto q = make_quantizer(c);
  auto plain = make_quantizer(config("turboquant_mse", d, 2));
  const double e_split = mean_sq_error(x, decode(*q, encode(*q, x)), d);
  const double e_plain = mean_sq_error(x, decode(*plain, encode(*plain, x)), d);
  EXPECT_LT(e_split, 0.5 * e_plain);
}

TEST(SmallDimCodebook, ExactLawsBelowHeadDimRange) {
  // d = 3: the Beta law is uniform on [-1, 1]; Lloyd-Max is the uniform quantizer.
  const auto& u = coordinate_codebook(3, 2);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(u.centroids[static_cast<size_t>(i)], -1 + (2 * i + 1) / 4.0, 1e-6);
  EXPECT_NEAR(u.distortion, (0.5 * 0.5) / 12, 1e-7);
  // d = 2: arcsine law; the 1-bit centroids are ±E|X| = ±2/π.
  const auto& a = coordinate_codebook(2, 1);
  EXPECT_NEAR(a.centroids[1], 2 / std::numbers::pi, 1e-6);
  EXPECT_NEAR(a.distortion, 0.5 - 4 / (std::numbers::pi * std::numbers::pi), 1e-6);
  // d = 1: ±1 exactly.
  const auto& one = coordinate_codebook(1, 2);
  EXPECT_EQ(one.centroids.front(), -1.0f);
  EXPECT_EQ(one.centroids.back(), 1.0f);
  EXPECT_THROW(lloyd_max_codebook(8, 3), InvalidArgument);  // head dims stay in [16, 512]
}
