#include "turboquant/quantizer.h"

#include <gtest/gtest.h>

#include <cmath>

#include "turboquant/error.h"
#include "turboquant/half.h"
#include "turboquant/rng.h"

using namespace turboquant;

namespace {
std::vector<float> random_unit_vectors(size_t n, int d, uint64_t seed) {
  RandomStream rs(seed, make_stream_id(StreamPurpose::kTest));
  std::vector<float> x(n * static_cast<size_t>(d));
  for (size_t r = 0; r < n; ++r) {
    double s = 0;
    for (int j = 0; j < d; ++j) {
      x[r * d + j] = static_cast<float>(rs.next_gaussian());
      s += x[r * d + j] * x[r * d + j];
    }
    for (int j = 0; j < d; ++j) x[r * d + j] = static_cast<float>(x[r * d + j] / std::sqrt(s));
  }
  return x;
}

QuantizerConfig mse_config(int d, int bits, uint64_t seed = 0) {
  QuantizerConfig c;
  c.method = "turboquant_mse";
  c.dim = d;
  c.bits = bits;
  c.seed = seed;
  return c;
}
}  // namespace

TEST(MseQuantizer, DistortionMatchesCodebook) {
  const int d = 128;
  const size_t n = 20000;
  const auto x = random_unit_vectors(n, d, 1);
  for (int b = 1; b <= 4; ++b) {
    for (auto rot : {RotationKind::kHadamard, RotationKind::kDense}) {
      auto cfg = mse_config(d, b);
      cfg.rotation = rot;
      auto q = make_quantizer(cfg);
      std::vector<uint8_t> codes(n * q->code_bytes());
      std::vector<half_bits> norms(n);
      q->encode(x.data(), n, codes.data(), norms.data());
      std::vector<float> y(x.size());
      q->decode(codes.data(), norms.data(), n, y.data());
      double err = 0;
      for (size_t i = 0; i < x.size(); ++i) err += (x[i] - y[i]) * (x[i] - y[i]);
      err /= static_cast<double>(n);
      const double predicted = lloyd_max_codebook(d, b).vector_distortion();
      EXPECT_NEAR(err, predicted, 0.02 * predicted) << "b=" << b << " " << to_string(rot);
    }
  }
}

TEST(MseQuantizer, BytesPerVector) {
  EXPECT_EQ(bytes_per_vector(mse_config(128, 2)), 34u);
  EXPECT_EQ(bytes_per_vector(mse_config(128, 3)), 50u);
  EXPECT_EQ(bytes_per_vector(mse_config(128, 4)), 66u);
  auto c = mse_config(100, 3);
  c.norm_dtype = NormDtype::kFloat32;
  EXPECT_EQ(bytes_per_vector(c), 38u + 4u);
}

TEST(MseQuantizer, DeterministicBySeed) {
  const auto x = random_unit_vectors(50, 64, 2);
  auto a = make_quantizer(mse_config(64, 3, 7)), b = make_quantizer(mse_config(64, 3, 7));
  auto c = make_quantizer(mse_config(64, 3, 8));
  std::vector<uint8_t> ca(50 * a->code_bytes()), cb(ca.size()), cc(ca.size());
  std::vector<half_bits> na(50), nb(50), nc(50);
  a->encode(x.data(), 50, ca.data(), na.data());
  b->encode(x.data(), 50, cb.data(), nb.data());
  c->encode(x.data(), 50, cc.data(), nc.data());
  EXPECT_EQ(ca, cb);
  EXPECT_EQ(na, nb);
  EXPECT_NE(ca, cc);
}

TEST(MseQuantizer, InnerProductsMatchDecodedDotProducts) {
  const int d = 96;  // non-power-of-two: dense rotation
  const size_t n = 40, m = 3;
  auto x = random_unit_vectors(n, d, 3);
  for (auto& v : x) v *= 3.0f;
  const auto q = random_unit_vectors(m, d, 4);
  auto quant = make_quantizer(mse_config(d, 3));
  std::vector<uint8_t> codes(n * quant->code_bytes());
  std::vector<half_bits> norms(n);
  quant->encode(x.data(), n, codes.data(), norms.data());
  std::vector<float> dec(n * d), ip(m * n);
  quant->decode(codes.data(), norms.data(), n, dec.data());
  quant->inner_products(q.data(), m, codes.data(), norms.data(), n, ip.data());
  for (size_t i = 0; i < m; ++i)
    for (size_t t = 0; t < n; ++t) {
      double s = 0;
      for (int j = 0; j < d; ++j) s += q[i * d + j] * dec[t * d + j];
      EXPECT_NEAR(ip[i * n + t], s, 1e-4);
    }
}

TEST(MseQuantizer, NormCorrectionKeepsNorm) {
  const int d = 64;
  auto x = random_unit_vectors(20, d, 5);
  auto cfg = mse_config(d, 2);
  cfg.norm_correction = true;
  cfg.norm_dtype = NormDtype::kFloat32;
  auto q = make_quantizer(cfg);
  std::vector<uint8_t> codes(20 * q->code_bytes());
  std::vector<float> norms(20), y(x.size());
  q->encode(x.data(), 20, codes.data(), norms.data());
  q->decode(codes.data(), norms.data(), 20, y.data());
  for (size_t r = 0; r < 20; ++r) {
    double s = 0;
    for (int j = 0; j < d; ++j) s += y[r * d + j] * y[r * d + j];
    EXPECT_NEAR(std::sqrt(s), 1.0, 1e-5);
  }
}

TEST(MseQuantizer, ZeroVectorAndErrors) {
  auto q = make_quantizer(mse_config(32, 3));
  std::vector<float> x(32, 0.0f), y(32, 1.0f);
  std::vector<uint8_t> codes(q->code_bytes());
  half_bits norm = 0;
  q->encode(x.data(), 1, codes.data(), &norm);
  q->decode(codes.data(), &norm, 1, y.data());
  for (float v : y) EXPECT_EQ(v, 0.0f);
  x[3] = NAN;
  EXPECT_THROW(q->encode(x.data(), 1, codes.data(), &norm), InvalidArgument);
  x[3] = 1e6f;
  EXPECT_THROW(q->encode(x.data(), 1, codes.data(), &norm), InvalidArgument);  // fp16 norm overflow
  auto bad = mse_config(32, 3);
  bad.method = "nope";
  EXPECT_THROW(make_quantizer(bad), InvalidArgument);
  bad = mse_config(8, 3);
  EXPECT_THROW(make_quantizer(bad), InvalidArgument);
  bad = mse_config(128, 0);
  EXPECT_THROW(make_quantizer(bad), InvalidArgument);
}
