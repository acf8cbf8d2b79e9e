#include "turboquant/quantizer_qjl.h"

#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

#include "quantizer_test_util.h"
#include "turboquant/error.h"
#include "turboquant/packing.h"

using namespace turboquant;
using namespace tqtest;

TEST(QjlQuantizer, SketchSizeAndBytes) {
  EXPECT_EQ(bytes_per_vector(config("qjl", 128, 1)), 18u);
  EXPECT_EQ(bytes_per_vector(config("qjl", 128, 3)), 50u);  // m = 3·128
  auto c = config("qjl", 128, 1);
  c.jl_dim = 100;
  auto q = make_quantizer(c);
  EXPECT_EQ(q->code_bytes(), 13u);
  EXPECT_EQ(q->config().jl_dim, 100);
  EXPECT_DOUBLE_EQ(q->nominal_bits(), 100.0 / 128.0);
  c.bits = 2;
  EXPECT_THROW(make_quantizer(c), InvalidArgument);
}

TEST(QjlQuantizer, SignsAndScaleLayout) {
  auto c = config("qjl", 24, 1, 4);
  c.jl_dim = 30;
  auto q = make_quantizer(c);
  const auto& sk = dynamic_cast<const QjlQuantizer&>(*q).sketch();
  EXPECT_FLOAT_EQ(sk.scale(), static_cast<float>(std::sqrt(std::numbers::pi / 2) / 30));
  const auto y = unit_vectors(10, 24, 1);
  std::vector<uint8_t> codes(10 * q->code_bytes());
  q->quantize_rotated(y.data(), 10, codes.data());
  for (size_t r = 0; r < 10; ++r) {
    for (size_t k = 0; k < 30; ++k) {
      double dot = 0;
      for (size_t j = 0; j < 24; ++j) dot += static_cast<double>(sk.matrix()[k * 24 + j]) * y[r * 24 + j];
      if (std::abs(dot) > 1e-5) {
        EXPECT_EQ(packed_index(codes.data() + r * 4, k, 1), dot >= 0 ? 1 : 0);
      }
    }
    EXPECT_EQ(codes[r * 4 + 3] >> 6, 0);
  }
  // The sketch matrix is the documented Philox stream, in row-major order.
  RandomStream rs(4, make_stream_id(StreamPurpose::kQjlMatrix));
  for (size_t i = 0; i < 10; ++i) EXPECT_EQ(sk.matrix()[i], static_cast<float>(rs.next_gaussian()));
}

TEST(QjlQuantizer, SignTablesMatchDirectDot) {
  QjlSketch sk(16, 37, 1, 2);
  std::vector<float> v(37);
  for (size_t k = 0; k < v.size(); ++k) v[k] = std::sin(static_cast<float>(k));
  float sum = 0;
  for (float x : v) sum += x;
  std::vector<float> tables(sk.sign_bytes() * 256);
  sk.sign_tables(v.data(), tables.data());
  uint8_t signs[5] = {0x5A, 0xFF, 0x00, 0x81, 0x1F};
  EXPECT_NEAR(sk.sign_dot_table(signs, tables.data(), sum), sk.sign_dot(signs, v.data()), 1e-4);
}

TEST(QjlQuantizer, Deterministic) { check_deterministic(config("qjl", 64, 2, 3)); }

TEST(QjlQuantizer, HooksMatchReconstruction) {
  check_hooks(*make_quantizer(config("qjl", 64, 1, 1)), 3);
  check_hooks(*make_quantizer(config("qjl", 48, 2, 1)), 4);
}

// E‖ỹ - y‖² = (π/2)(d/m) - 1/m for unit y; the estimator is unbiased over S.
TEST(QjlQuantizer, DistortionAndUnbiasedness) {
  const int d = 64;
  const auto x = unit_vectors(400, d, 8);
  for (int b : {1, 2}) {
    double got = 0;  // the expectation is over S too: average several sketches
    for (uint64_t s = 0; s < 10; ++s) {
      auto q = make_quantizer(config("qjl", d, b, s));
      got += mean_sq_error(x, decode(*q, encode(*q, x)), d) / 10;
    }
    const double m = b * d;
    const double want = std::numbers::pi / 2 * d / m - 1 / m;
    EXPECT_NEAR(got, want, 0.04 * want) << "b=" << b;
  }
  // <x, x̃> averaged over sketches: unbiased for <x, x> = 1.
  std::vector<double> err;
  const auto x1 = unit_vectors(1, d, 9);
  for (uint64_t s = 0; s < 600; ++s) {
    auto q = make_quantizer(config("qjl", d, 1, s));
    const auto e = encode(*q, x1);
    float ip;
    q->inner_products(x1.data(), 1, e.codes.data(), e.norms.data(), 1, &ip);
    err.push_back(ip - 1.0);
  }
  const auto [m, se] = mean_se(err);
  EXPECT_LT(std::abs(m), 3 * se);
}
