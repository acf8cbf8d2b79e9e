// Helpers shared by the cache, attention and serialization tests.
#pragma once

#include <cmath>
#include <vector>

#include "turboquant/kv_cache.h"
#include "turboquant/rng.h"

namespace turboquant::testing {

inline std::vector<float> gaussian(size_t n, uint64_t seed) {
  RandomStream rs(seed, make_stream_id(StreamPurpose::kTest, 7));
  std::vector<float> x(n);
  for (auto& v : x) v = static_cast<float>(rs.next_gaussian());
  return x;
}

// Exact attention in double of one query over rows [lo, hi] of K, V (n × d).
inline std::vector<double> exact_attention(const float* q, const float* K, const float* V, size_t d,
                                           size_t lo, size_t hi, double scale) {
  std::vector<double> s(hi - lo + 1);
  double mx = -1e300;
  for (size_t t = lo; t <= hi; ++t) {
    double a = 0;
    for (size_t j = 0; j < d; ++j) a += static_cast<double>(q[j]) * K[t * d + j];
    s[t - lo] = a * scale;
    mx = std::max(mx, s[t - lo]);
  }
  double sum = 0;
  for (auto& v : s) sum += (v = std::exp(v - mx));
  std::vector<double> o(d, 0.0);
  for (size_t t = lo; t <= hi; ++t)
    for (size_t j = 0; j < d; ++j) o[j] += s[t - lo] / sum * V[t * d + j];
  return o;
}

// The dequantized keys or values of one head (tokens [0, n)).
inline std::vector<float> decoded(const KVCache& c, int layer, int head, KVRole role) {
  const Quantizer& q = role == KVRole::kKey ? c.key_quantizer(layer, head) : c.value_quantizer(layer, head);
  const size_t n = c.size(layer);
  std::vector<uint8_t> codes(n * q.code_bytes()), norms(n * q.norm_bytes());
  c.copy_out(layer, head, role, 0, n, codes.data(), norms.data());
  std::vector<float> out(n * static_cast<size_t>(q.dim()));
  q.decode(codes.data(), norms.data(), n, out.data());
  return out;
}

inline double cosine(const std::vector<double>& a, const float* b) {
  double ab = 0, aa = 0, bb = 0;
  for (size_t j = 0; j < a.size(); ++j) {
    ab += a[j] * b[j];
    aa += a[j] * a[j];
    bb += static_cast<double>(b[j]) * b[j];
  }
  return ab / std::sqrt(aa * bb);
}

}  // namespace turboquant::testing
