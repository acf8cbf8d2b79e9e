#include "turboquant/rotation.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "turboquant/error.h"
#include "turboquant/rng.h"

using namespace turboquant;

namespace {
double orthogonality_error(const Rotation& r) {
  const auto m = r.matrix();
  const auto d = static_cast<size_t>(r.dim());
  double err = 0.0;
  for (size_t i = 0; i < d; ++i)
    for (size_t j = 0; j < d; ++j) {
      double s = 0.0;
      for (size_t k = 0; k < d; ++k) s += static_cast<double>(m[i * d + k]) * m[j * d + k];
      err = std::max(err, std::abs(s - (i == j ? 1.0 : 0.0)));
    }
  return err;
}
}  // namespace

class RotationDims : public ::testing::TestWithParam<std::tuple<RotationKind, int>> {};

TEST_P(RotationDims, OrthogonalAndInvertible) {
  const auto [kind, d] = GetParam();
  auto rot = Rotation::create(kind, d, 42, 7);
  EXPECT_LT(orthogonality_error(*rot), 1e-5);
  RandomStream rs(1, 2);
  std::vector<float> x(static_cast<size_t>(3 * d)), y(x.size()), z(x.size());
  for (auto& v : x) v = static_cast<float>(rs.next_gaussian());
  rot->forward(x.data(), y.data(), 3);
  rot->inverse(y.data(), z.data(), 3);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(z[i], x[i], 1e-5);
  // In place works too.
  std::vector<float> w(x);
  rot->forward(w.data(), w.data(), 3);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(w[i], y[i], 1e-6);
}

INSTANTIATE_TEST_SUITE_P(
    All, RotationDims,
    ::testing::Values(std::make_tuple(RotationKind::kDense, 16), std::make_tuple(RotationKind::kDense, 96),
                      std::make_tuple(RotationKind::kDense, 100), std::make_tuple(RotationKind::kDense, 128),
                      std::make_tuple(RotationKind::kDense, 512), std::make_tuple(RotationKind::kHadamard, 16),
                      std::make_tuple(RotationKind::kHadamard, 64), std::make_tuple(RotationKind::kHadamard, 128),
                      std::make_tuple(RotationKind::kHadamard, 512), std::make_tuple(RotationKind::kAuto, 80),
                      std::make_tuple(RotationKind::kHadamard1, 16), std::make_tuple(RotationKind::kHadamard1, 64),
                      std::make_tuple(RotationKind::kHadamard1, 128), std::make_tuple(RotationKind::kHadamard1, 256)));

TEST(Rotation, DeterministicBySeed) {
  for (auto kind : {RotationKind::kDense, RotationKind::kHadamard, RotationKind::kHadamard1}) {
    auto a = Rotation::create(kind, 64, 5, 0), b = Rotation::create(kind, 64, 5, 0);
    auto c = Rotation::create(kind, 64, 6, 0), e = Rotation::create(kind, 64, 5, 1);
    EXPECT_EQ(a->matrix(), b->matrix());
    EXPECT_NE(a->matrix(), c->matrix());
    EXPECT_NE(a->matrix(), e->matrix());
  }
}

TEST(Rotation, AutoPicksHadamardForPowerOfTwo) {
  EXPECT_EQ(Rotation::create(RotationKind::kAuto, 128, 0, 0)->kind(), RotationKind::kHadamard);
  EXPECT_EQ(Rotation::create(RotationKind::kAuto, 96, 0, 0)->kind(), RotationKind::kDense);
  EXPECT_THROW(Rotation::create(RotationKind::kHadamard, 96, 0, 0), InvalidArgument);
  EXPECT_THROW(Rotation::create(RotationKind::kHadamard1, 96, 0, 0), InvalidArgument);
}

TEST(Rotation, Hadamard1IsOneRoundOfHadamard) {
  // Π = H·D₁/√d with D₁ the first d signs of "hadamard" for the same (seed, stream).
  const int d = 32;
  auto one = Rotation::create(RotationKind::kHadamard1, d, 3, 4);
  auto two = Rotation::create(RotationKind::kHadamard, d, 3, 4);
  EXPECT_EQ(one->kind(), RotationKind::kHadamard1);
  EXPECT_EQ(to_string(one->kind()), "hadamard1");
  EXPECT_EQ(rotation_kind_from_string("hadamard1"), RotationKind::kHadamard1);
  const auto p1 = one->parameters(), p2 = two->parameters();
  ASSERT_EQ(p1.size(), static_cast<size_t>(d));
  EXPECT_TRUE(std::equal(p1.begin(), p1.end(), p2.begin()));
  const auto m = one->matrix();
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) {
      const float h = (__builtin_popcount(static_cast<unsigned>(i & j)) % 2) ? -1.0f : 1.0f;
      EXPECT_NEAR(m[static_cast<size_t>(i * d + j)], h * p1[static_cast<size_t>(j)] / std::sqrt(32.0f), 1e-6);
    }
  // A one-hot input becomes a flat ±1/√d vector: the structured case one round is weak on.
  std::vector<float> e(static_cast<size_t>(d), 0.0f), y(static_cast<size_t>(d));
  e[5] = 1.0f;
  one->forward(e.data(), y.data(), 1);
  for (float v : y) EXPECT_NEAR(std::abs(v), 1.0f / std::sqrt(32.0f), 1e-7);
}

TEST(Rotation, Hadamard1BitExactAcrossKernelPaths) {
  // forward() equals the scalar definition bit for bit (fwht is bit-identical on every
  // kernel set), and forward_scaled() equals the separate multiply then forward().
  const int d = 128;
  auto rot = Rotation::create(RotationKind::kHadamard1, d, 11, 2);
  const auto s = rot->parameters();
  RandomStream rs(7, 8);
  std::vector<float> x(static_cast<size_t>(4 * d)), y(x.size()), ref(x.size()), ys(x.size());
  for (auto& v : x) v = static_cast<float>(rs.next_gaussian());
  rot->forward(x.data(), y.data(), 4);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (size_t r = 0; r < 4; ++r) {
    float* v = ref.data() + r * d;
    for (size_t j = 0; j < static_cast<size_t>(d); ++j) v[j] = x[r * d + j] * s[j];
    for (size_t h = 1; h < static_cast<size_t>(d); h *= 2)  // scalar fwht
      for (size_t i = 0; i < static_cast<size_t>(d); i += 2 * h)
        for (size_t j = i; j < i + h; ++j) {
          const float a = v[j], b = v[j + h];
          v[j] = a + b;
          v[j + h] = a - b;
        }
    for (size_t j = 0; j < static_cast<size_t>(d); ++j) v[j] *= scale;
  }
  EXPECT_EQ(y, ref);
  const std::vector<float> row_scale = {0.5f, 3.0f, -1.25f, 7.0f};
  std::vector<float> xs(x);
  for (size_t r = 0; r < 4; ++r)
    for (size_t j = 0; j < static_cast<size_t>(d); ++j) xs[r * d + j] *= row_scale[r];
  rot->forward(xs.data(), ref.data(), 4);
  rot->forward_scaled(x.data(), row_scale.data(), ys.data(), 4);
  EXPECT_EQ(ys, ref);
}

TEST(Rotation, ParametersRoundTrip) {
  for (auto kind : {RotationKind::kDense, RotationKind::kHadamard, RotationKind::kHadamard1}) {
    auto a = Rotation::create(kind, 32, 9, 0);
    const auto p = a->parameters();
    auto b = Rotation::from_parameters(kind, 32, p);
    EXPECT_EQ(a->matrix(), b->matrix());
  }
  std::vector<float> bad(64, 0.5f);
  EXPECT_THROW(Rotation::from_parameters(RotationKind::kHadamard, 32, bad), FormatError);
  EXPECT_THROW(Rotation::from_parameters(RotationKind::kHadamard1, 32, std::vector<float>(32, 0.5f)),
               FormatError);
  EXPECT_THROW(Rotation::from_parameters(RotationKind::kHadamard1, 32, std::vector<float>(64, 1.0f)),
               FormatError);  // hadamard's D₁ and D₂ are not a hadamard1
  std::vector<float> not_orth(32 * 32, 1.0f);
  EXPECT_THROW(Rotation::from_parameters(RotationKind::kDense, 32, not_orth), FormatError);
}

TEST(Rotation, FwhtMatchesDefinition) {
  // H_4 rows: ++++, +-+-, ++--, +--+
  float x[4] = {1, 2, 3, 4};
  fwht(x, 4);
  EXPECT_FLOAT_EQ(x[0], 10);
  EXPECT_FLOAT_EQ(x[1], -2);
  EXPECT_FLOAT_EQ(x[2], -4);
  EXPECT_FLOAT_EQ(x[3], 0);
}

TEST(Rotation, CoordinatesFollowTheLaw) {
  // A one-hot input is spread over all coordinates with variance 1/d.
  for (auto kind : {RotationKind::kDense, RotationKind::kHadamard}) {
    const int d = 256;
    double s2 = 0.0, s4 = 0.0;
    int count = 0;
    for (uint64_t seed = 0; seed < 50; ++seed) {
      auto rot = Rotation::create(kind, d, seed, 0);
      std::vector<float> e(static_cast<size_t>(d), 0.0f), y(static_cast<size_t>(d));
      e[static_cast<size_t>(seed % d)] = 1.0f;
      rot->forward(e.data(), y.data(), 1);
      for (float v : y) {
        s2 += v * v;
        s4 += static_cast<double>(v) * v * v * v;
        ++count;
      }
    }
    EXPECT_NEAR(s2 / count * d, 1.0, 1e-3);
    // Kurtosis of a Gaussian is 3 (a flat ±1/√d vector would give 1).
    EXPECT_NEAR((s4 / count) / ((s2 / count) * (s2 / count)), 3.0, 0.3) << to_string(kind);
  }
}
