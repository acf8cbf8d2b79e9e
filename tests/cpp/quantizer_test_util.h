// Helpers shared by the per-method quantizer tests.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <vector>

#include "turboquant/half.h"
#include "turboquant/quantizer.h"
#include "turboquant/rng.h"

namespace tqtest {

using namespace turboquant;

inline std::vector<float> unit_vectors(size_t n, int d, uint64_t seed) {
  RandomStream rs(seed, make_stream_id(StreamPurpose::kTest, 7));
  std::vector<float> x(n * static_cast<size_t>(d));
  for (size_t r = 0; r < n; ++r) {
    double s = 0;
    for (int j = 0; j < d; ++j) {
      x[r * d + j] = static_cast<float>(rs.next_gaussian());
      s += static_cast<double>(x[r * d + j]) * x[r * d + j];
    }
    for (int j = 0; j < d; ++j) x[r * d + j] = static_cast<float>(x[r * d + j] / std::sqrt(s));
  }
  return x;
}

inline QuantizerConfig config(const std::string& method, int d, int bits, uint64_t seed = 0) {
  QuantizerConfig c;
  c.method = method;
  c.dim = d;
  c.bits = bits;
  c.seed = seed;
  return c;
}

struct Encoded {
  std::vector<uint8_t> codes;
  std::vector<half_bits> norms;
};

inline Encoded encode(const Quantizer& q, const std::vector<float>& x) {
  const size_t n = x.size() / static_cast<size_t>(q.dim());
  Encoded e{std::vector<uint8_t>(n * q.code_bytes()), std::vector<half_bits>(n)};
  q.encode(x.data(), n, e.codes.data(), e.norms.data());
  return e;
}

inline std::vector<float> decode(const Quantizer& q, const Encoded& e) {
  const size_t n = e.norms.size();
  std::vector<float> y(n * static_cast<size_t>(q.dim()));
  q.decode(e.codes.data(), e.norms.data(), n, y.data());
  return y;
}

inline double mean_sq_error(const std::vector<float>& a, const std::vector<float>& b, int d) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
  return s / static_cast<double>(a.size() / static_cast<size_t>(d));
}

// The attention hooks agree with the reconstruction: scores = ‖x‖<Πq, ỹ>, inner_products =
// <q, x̃>, accumulate = Σ w‖x‖ỹ (rotated domain), and finish_rotated brings it back.
inline void check_hooks(const Quantizer& q, uint64_t seed) {
  const int d = q.dim();
  const auto ud = static_cast<size_t>(d);
  const size_t n = 70, m = 3;  // n > 32: the table path of the QJL scores too
  auto x = unit_vectors(n, d, seed);
  for (size_t i = 0; i < x.size(); ++i) x[i] *= 1.0f + static_cast<float>(i / ud % 5);
  const auto queries = unit_vectors(m, d, seed + 1);
  const auto e = encode(q, x);
  const auto dec = decode(q, e);
  std::vector<float> ip(m * n);
  q.inner_products(queries.data(), m, e.codes.data(), e.norms.data(), n, ip.data());
  for (size_t i = 0; i < m; ++i)
    for (size_t t = 0; t < n; ++t) {
      double s = 0;
      for (size_t j = 0; j < ud; ++j) s += static_cast<double>(queries[i * ud + j]) * dec[t * ud + j];
      ASSERT_NEAR(ip[i * n + t], s, 2e-4 * (1 + std::abs(s))) << q.method() << " i=" << i << " t=" << t;
    }
  // accumulate + finish_rotated == Σ_t w_t x̃_t.
  std::vector<float> norms(n), w(m * n), acc(m * ud, 0.0f);
  q.load_norms(e.norms.data(), n, norms.data());
  RandomStream rs(seed, make_stream_id(StreamPurpose::kTest, 8));
  for (auto& v : w) v = static_cast<float>(rs.next_uniform());
  q.accumulate(w.data(), n, m, e.codes.data(), norms.data(), n, acc.data());
  q.finish_rotated(acc.data(), m);
  for (size_t i = 0; i < m; ++i)
    for (size_t j = 0; j < ud; ++j) {
      double s = 0;
      for (size_t t = 0; t < n; ++t) s += static_cast<double>(w[i * n + t]) * dec[t * ud + j];
      ASSERT_NEAR(acc[i * ud + j], s, 1e-3 * (1 + std::abs(s))) << q.method() << " i=" << i << " j=" << j;
    }
  // The first dim floats of a query state are Πq.
  std::vector<float> state(m * q.query_state_floats()), rq(m * ud);
  q.prepare_queries(queries.data(), m, state.data());
  q.rotation().forward(queries.data(), rq.data(), m);
  for (size_t i = 0; i < m; ++i)
    for (size_t j = 0; j < ud; ++j) ASSERT_NEAR(state[i * q.query_state_floats() + j], rq[i * ud + j], 1e-5);
}

inline void check_deterministic(const QuantizerConfig& c, size_t n = 40) {
  const auto x = unit_vectors(n, c.dim, 99);
  auto a = make_quantizer(c), b = make_quantizer(c);
  auto c2 = c;
  c2.seed = c.seed + 1;
  auto other = make_quantizer(c2);
  const auto ea = encode(*a, x), eb = encode(*b, x), eo = encode(*other, x);
  EXPECT_EQ(ea.codes, eb.codes);
  EXPECT_EQ(ea.norms, eb.norms);
  EXPECT_NE(ea.codes, eo.codes);
}

// Mean and standard error of per-sample values.
inline std::pair<double, double> mean_se(const std::vector<double>& v) {
  double m = 0, s = 0;
  for (double x : v) m += x;
  m /= static_cast<double>(v.size());
  for (double x : v) s += (x - m) * (x - m);
  return {m, std::sqrt(s / static_cast<double>(v.size() - 1) / static_cast<double>(v.size()))};
}

}  // namespace tqtest
