#include "turboquant/quantizer_prod.h"

#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

#include "quantizer_test_util.h"
#include "turboquant/packing.h"

using namespace turboquant;
using namespace tqtest;

namespace {
const ProdQuantizer& as_prod(const Quantizer& q) { return dynamic_cast<const ProdQuantizer&>(q); }
}  // namespace

TEST(ProdQuantizer, BytesPerVector) {
  EXPECT_EQ(bytes_per_vector(config("turboquant_prod", 128, 1)), 18u);
  EXPECT_EQ(bytes_per_vector(config("turboquant_prod", 128, 2)), 36u);
  EXPECT_EQ(bytes_per_vector(config("turboquant_prod", 128, 3)), 52u);
  EXPECT_EQ(bytes_per_vector(config("turboquant_prod", 128, 4)), 68u);
  auto c = config("turboquant_prod", 128, 3);
  c.jl_dim = 60;  // 32 + 8 + 2 + 2
  EXPECT_EQ(bytes_per_vector(c), 44u);
  EXPECT_DOUBLE_EQ(make_quantizer(c)->nominal_bits(), 2.0 + 60.0 / 128.0);
}

TEST(ProdQuantizer, PackingLayout) {
  auto c = config("turboquant_prod", 32, 3, 5);
  c.jl_dim = 44;  // not a multiple of 8: the last sign byte has padding bits
  auto q = make_quantizer(c);
  const auto& p = as_prod(*q);
  ASSERT_EQ(q->code_bytes(), packed_bytes(32, 2) + packed_bytes(44, 1) + 2);
  const auto y = unit_vectors(20, 32, 3);
  std::vector<uint8_t> codes(20 * q->code_bytes());
  q->quantize_rotated(y.data(), 20, codes.data());
  const auto& cb = *p.codebook();
  const auto& s = p.sketch().matrix();
  for (size_t r = 0; r < 20; ++r) {
    const uint8_t* code = codes.data() + r * q->code_bytes();
    std::vector<float> res(32);
    double g = 0;
    for (size_t j = 0; j < 32; ++j) {
      const uint8_t idx = cb.quantize(y[r * 32 + j]);
      EXPECT_EQ(packed_index(code, j, 2), idx);
      res[j] = y[r * 32 + j] - cb.centroids[idx];
      g += static_cast<double>(res[j]) * res[j];
    }
    for (size_t k = 0; k < 44; ++k) {
      double dot = 0;
      for (size_t j = 0; j < 32; ++j) dot += static_cast<double>(s[k * 32 + j]) * res[j];
      if (std::abs(dot) > 1e-5) {
        EXPECT_EQ(packed_index(code + 8, k, 1), dot >= 0 ? 1 : 0) << k;
      }
    }
    EXPECT_EQ(code[8 + 5] >> 4, 0) << "padding bits must be zero";
    EXPECT_EQ(p.residual_norm(code), half_to_float(float_to_half(static_cast<float>(std::sqrt(g)))));
  }
}

TEST(ProdQuantizer, OneBitIsQjl) {
  auto a = make_quantizer(config("turboquant_prod", 64, 1, 3));
  auto b = make_quantizer(config("qjl", 64, 1, 3));
  const auto x = unit_vectors(30, 64, 4);
  EXPECT_EQ(encode(*a, x).codes, encode(*b, x).codes);
}

TEST(ProdQuantizer, Deterministic) {
  for (int b : {1, 2, 4}) check_deterministic(config("turboquant_prod", 96, b, 11));
}

TEST(ProdQuantizer, HooksMatchReconstruction) {
  for (int b : {1, 2, 3}) {
    auto c = config("turboquant_prod", 64, b, 2);
    check_hooks(*make_quantizer(c), 10 + static_cast<uint64_t>(b));
    c.jl_dim = 100;
    check_hooks(*make_quantizer(c), 20 + static_cast<uint64_t>(b));
  }
}

// E‖ỹ - y‖² = E[γ²]·(π d/(2m) - 1/m) with E[γ²] the (b-1)-bit codebook's distortion: the
// QJL reconstruction γ√(π/2)/m·Sᵀs has mean r and E‖·‖² = γ²((π/2)(d/m) + (m-1)/m).
TEST(ProdQuantizer, DistortionMatchesTheory) {
  const int d = 128;
  const size_t n = 3000;
  const auto x = unit_vectors(n, d, 6);
  for (int b : {2, 3, 4}) {
    for (int m : {128, 64}) {
      auto c = config("turboquant_prod", d, b, 1);
      c.jl_dim = m;
      auto q = make_quantizer(c);
      const double got = mean_sq_error(x, decode(*q, encode(*q, x)), d);
      const double want = lloyd_max_codebook(d, b - 1).vector_distortion() *
                          (std::numbers::pi * d / (2.0 * m) - 1.0 / m);
      EXPECT_NEAR(got, want, 0.04 * want) << "b=" << b << " m=" << m;
      // TurboQuant Thm. 2: d·Var(IP error) for unit queries <= √3 π² 4^-b (for m = d).
      if (m == d) {
        EXPECT_LT(got, std::sqrt(3.0) * std::numbers::pi * std::numbers::pi * std::pow(4.0, -b));
      }
    }
  }
}

// The estimator is unbiased over the randomness of (Π, S); turboquant_mse shrinks every
// inner product by the factor 1 - D_mse (its centroids are conditional means).
TEST(ProdQuantizer, UnbiasedWhileMseIsBiased) {
  const int d = 64;
  const size_t seeds = 400, per_seed = 8;
  const double rho = 0.6;
  for (int b : {2, 3}) {
    std::vector<double> prod_err, mse_err;
    for (size_t s = 0; s < seeds; ++s) {
      const auto x = unit_vectors(per_seed, d, 1000 + s);
      const auto w = unit_vectors(per_seed, d, 5000 + s);
      std::vector<float> q(x.size());
      for (size_t i = 0; i < per_seed; ++i) {
        double xw = 0, nn = 0;
        for (int j = 0; j < d; ++j) xw += static_cast<double>(x[i * d + j]) * w[i * d + j];
        std::vector<double> o(d);
        for (int j = 0; j < d; ++j) {
          o[static_cast<size_t>(j)] = w[i * d + j] - xw * x[i * d + j];
          nn += o[static_cast<size_t>(j)] * o[static_cast<size_t>(j)];
        }
        for (int j = 0; j < d; ++j)
          q[i * d + j] = static_cast<float>(rho * x[i * d + j] + std::sqrt(1 - rho * rho) * o[static_cast<size_t>(j)] / std::sqrt(nn));
      }
      for (auto* sink : {&prod_err, &mse_err}) {
        auto quant = make_quantizer(config(sink == &prod_err ? "turboquant_prod" : "turboquant_mse", d, b, s));
        const auto e = encode(*quant, x);
        std::vector<float> ip(per_seed * per_seed);
        quant->inner_products(q.data(), per_seed, e.codes.data(), e.norms.data(), per_seed, ip.data());
        double mean = 0;
        for (size_t i = 0; i < per_seed; ++i) mean += ip[i * per_seed + i] - rho;
        sink->push_back(mean / per_seed);
      }
    }
    const auto [pm, pse] = mean_se(prod_err);
    const auto [mm, mse] = mean_se(mse_err);
    EXPECT_LT(std::abs(pm), 3 * pse) << "prod b=" << b << " mean error " << pm << " se " << pse;
    EXPECT_LT(mm, -10 * mse) << "mse b=" << b;
    const double shrink = lloyd_max_codebook(d, b).vector_distortion();
    EXPECT_NEAR(mm / rho, -shrink, 4 * mse / rho + 0.02 * shrink) << "mse b=" << b;
  }
}
