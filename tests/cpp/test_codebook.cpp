#include "turboquant/codebook.h"

#include <gtest/gtest.h>

#include <cmath>

#include "turboquant/error.h"

using namespace turboquant;

namespace {
// Unit-variance values of the Gaussian codebook: scale by √d.
double unit(const Codebook& cb, double v) { return v * std::sqrt(static_cast<double>(cb.dim)); }
}  // namespace

TEST(Codebook, GaussianMatchesMaxTable) {
  // Max (1960) / Lloyd: unit-variance Gaussian optimal quantizers.
  const auto& b1 = lloyd_max_codebook(128, 1, CoordinateLaw::kGaussian);
  EXPECT_NEAR(unit(b1, b1.centroids[1]), 0.7979, 5e-5);
  EXPECT_NEAR(unit(b1, b1.centroids[0]), -0.7979, 5e-5);
  EXPECT_NEAR(b1.vector_distortion(), 0.3634, 5e-5);

  const auto& b2 = lloyd_max_codebook(128, 2, CoordinateLaw::kGaussian);
  EXPECT_NEAR(unit(b2, b2.centroids[2]), 0.4528, 5e-5);
  EXPECT_NEAR(unit(b2, b2.centroids[3]), 1.5104, 5e-5);
  EXPECT_NEAR(unit(b2, b2.centroids[0]), -1.5104, 5e-5);
  EXPECT_NEAR(b2.vector_distortion(), 0.1175, 5e-5);

  // Max's 1960 table gives 0.03454 and 0.009497; solving the same equations in closed form
  // (erf, double precision, to convergence) gives 0.0345478 and 0.0095010: the table's last
  // digit carries its rounding. We check both: the table to 0.05%, the exact value to 1e-7.
  const double d3 = lloyd_max_codebook(128, 3, CoordinateLaw::kGaussian).vector_distortion();
  const double d4 = lloyd_max_codebook(128, 4, CoordinateLaw::kGaussian).vector_distortion();
  EXPECT_NEAR(d3, 0.03454, 0.0005 * 0.03454);
  EXPECT_NEAR(d4, 0.009497, 0.0005 * 0.009497);
  EXPECT_NEAR(d3, 0.0345478, 1e-7);
  EXPECT_NEAR(d4, 0.0095010, 1e-7);
}

TEST(Codebook, ExactLawIsSlightlyBelowGaussian) {
  const double expected[] = {0.361, 0.116, 0.0340, 0.0093};
  for (int b = 1; b <= 4; ++b) {
    const auto& beta = lloyd_max_codebook(128, b, CoordinateLaw::kBeta);
    const auto& gauss = lloyd_max_codebook(128, b, CoordinateLaw::kGaussian);
    EXPECT_LT(beta.vector_distortion(), gauss.vector_distortion()) << "b=" << b;
    EXPECT_NEAR(beta.vector_distortion(), expected[b - 1], 0.01 * expected[b - 1]) << "b=" << b;
  }
}

TEST(Codebook, WithinPaperBounds) {
  // TurboQuant Thm 1: 4^-b <= D_mse <= (√3 π / 2) 4^-b.
  for (int d : {16, 64, 100, 128, 256, 512}) {
    for (int b = 1; b <= 8; ++b) {
      const auto& cb = lloyd_max_codebook(d, b);
      const double lower = std::pow(4.0, -b), upper = std::sqrt(3.0) * M_PI / 2.0 * lower;
      EXPECT_LE(cb.vector_distortion(), upper) << "d=" << d << " b=" << b;
      // The lower bound is for the best possible quantizer; small d sits a bit below it.
      if (d >= 64) {
        EXPECT_GE(cb.vector_distortion(), 0.9 * lower) << "d=" << d << " b=" << b;
      }
    }
  }
}

TEST(Codebook, SymmetricSortedAndMidpointBoundaries) {
  for (int b = 1; b <= 8; ++b) {
    const auto& cb = lloyd_max_codebook(64, b);
    ASSERT_EQ(cb.centroids.size(), static_cast<size_t>(1 << b));
    ASSERT_EQ(cb.boundaries.size(), static_cast<size_t>((1 << b) - 1));
    for (size_t i = 0; i < cb.centroids.size(); ++i) {
      EXPECT_NEAR(cb.centroids[i], -cb.centroids[cb.centroids.size() - 1 - i], 1e-6);
      if (i > 0) {
        EXPECT_LT(cb.centroids[i - 1], cb.centroids[i]);
        EXPECT_NEAR(cb.boundaries[i - 1], 0.5f * (cb.centroids[i - 1] + cb.centroids[i]), 1e-6);
      }
    }
  }
}

TEST(Codebook, QuantizeIsNearestCentroid) {
  const auto& cb = lloyd_max_codebook(128, 3);
  for (float y = -0.5f; y <= 0.5f; y += 0.001f) {
    const uint8_t i = cb.quantize(y);
    for (size_t k = 0; k < cb.centroids.size(); ++k) {
      EXPECT_LE(std::abs(y - cb.centroids[i]), std::abs(y - cb.centroids[k]) + 1e-7f);
    }
  }
}

TEST(Codebook, CachedPerDimAndBits) {
  EXPECT_EQ(&lloyd_max_codebook(128, 3), &lloyd_max_codebook(128, 3));
  EXPECT_NE(&lloyd_max_codebook(128, 3), &lloyd_max_codebook(64, 3));
}

TEST(Codebook, RejectsBadArguments) {
  EXPECT_THROW(lloyd_max_codebook(8, 3), InvalidArgument);
  EXPECT_THROW(lloyd_max_codebook(1000, 3), InvalidArgument);
  EXPECT_THROW(lloyd_max_codebook(128, 0), InvalidArgument);
  EXPECT_THROW(lloyd_max_codebook(128, 9), InvalidArgument);
  try {
    lloyd_max_codebook(1000, 3);
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("1000"), std::string::npos);
  }
}
