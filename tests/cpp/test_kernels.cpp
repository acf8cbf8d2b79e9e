// Every usable kernel set against the scalar reference: codes bit-exact, scores and value
// sums within fp tolerance, for all bit widths, several head dims and token counts that are
// not multiples of the SIMD block sizes.
#include <gtest/gtest.h>

#include <cmath>
#include <algorithm>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/cpu/kernels.h"
#include "turboquant/backend.h"
#include "turboquant/codebook.h"
#include "turboquant/error.h"
#include "turboquant/half.h"
#include "turboquant/packing.h"
#include "turboquant/thread_pool.h"

namespace turboquant::cpu {
namespace {

std::vector<float> gaussian(size_t count, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> v(count);
  for (auto& x : v) x = dist(gen);
  return v;
}

std::vector<uint8_t> random_codes(size_t n, size_t d, int bits, uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<uint8_t> idx(d), codes(n * packed_bytes(d, bits));
  for (size_t t = 0; t < n; ++t) {
    for (auto& i : idx) i = static_cast<uint8_t>(gen() & ((1u << bits) - 1u));
    pack_indices(idx.data(), d, bits, codes.data() + t * packed_bytes(d, bits));
  }
  return codes;
}

const size_t kDims[] = {16, 64, 96, 128, 256, 40, 20};  // 40, 20: not multiples of 32, 8
const size_t kTokens[] = {1, 37, 133};
const size_t kQueries[] = {1, 4, 7};

TEST(Kernels, ScalarIsAlwaysUsableAndFirst) {
  const auto all = usable_kernels();
  ASSERT_FALSE(all.empty());
  EXPECT_STREQ(all.front()->name, "scalar");
  // Every usable set is an available target and vice versa.
  const auto avail = available_simd_targets();
  ASSERT_EQ(all.size(), avail.size());
  for (size_t i = 0; i < all.size(); ++i) EXPECT_EQ(avail[i], all[i]->name);
}

TEST(Kernels, SimdSetOfThisArchitectureIsUsable) {
  // The SIMD set every CPU of the architecture has must be compiled in and usable, so that
  // the comparisons below cover it (and the default dispatch picks it).
  std::vector<std::string> names;
  for (const auto* k : usable_kernels()) names.emplace_back(k->name);
#if defined(__aarch64__)
  ASSERT_TRUE(std::find(names.begin(), names.end(), "neon") != names.end()) << "no neon kernels on AArch64";
  EXPECT_EQ(names.back(), "neon");
  EXPECT_TRUE(cpu_features().neon);
#elif defined(__x86_64__)
  if (cpu_features().avx2 && cpu_features().fma && cpu_features().f16c) {
    EXPECT_TRUE(std::find(names.begin(), names.end(), "avx2") != names.end());
  }
#endif
}

TEST(Kernels, FwhtBitExact) {
  for (const auto* k : usable_kernels()) {
    for (size_t n : {1, 2, 4, 8, 16, 64, 128, 512}) {
      auto a = gaussian(n, 7u + static_cast<uint32_t>(n));
      auto b = a;
      scalar_kernels().fwht(a.data(), n);
      k->fwht(b.data(), n);
      for (size_t j = 0; j < n; ++j) ASSERT_EQ(a[j], b[j]) << k->name << " n=" << n << " j=" << j;
    }
  }
}

TEST(Kernels, HadamardRotateBitExact) {
  // The fused rotation against the scalar one, with and without the per-row scale and the
  // first diagonal, out of place and in place.
  for (const auto* k : usable_kernels()) {
    for (size_t d : {1, 2, 8, 16, 32, 64, 128, 256, 512}) {
      const size_t n = 5;
      const auto x = gaussian(n * d, 11u + static_cast<uint32_t>(d));
      const auto rs = gaussian(n, 12u), pre = gaussian(d, 13u), mid = gaussian(d, 14u), post = gaussian(d, 15u);
      for (int variant = 0; variant < 4; ++variant) {
        const float* r = variant & 1 ? rs.data() : nullptr;
        const float* p = variant & 2 ? pre.data() : nullptr;
        std::vector<float> a(n * d), b(n * d), c = x;
        scalar_kernels().hadamard_rotate(x.data(), n, d, r, p, mid.data(), post.data(), a.data());
        k->hadamard_rotate(x.data(), n, d, r, p, mid.data(), post.data(), b.data());
        k->hadamard_rotate(c.data(), n, d, r, p, mid.data(), post.data(), c.data());
        for (size_t j = 0; j < n * d; ++j) {
          ASSERT_EQ(a[j], b[j]) << k->name << " d=" << d << " variant=" << variant << " j=" << j;
          ASSERT_EQ(a[j], c[j]) << k->name << " in place, d=" << d << " variant=" << variant;
        }
      }
      // The reference itself: post ⊙ H(mid ⊙ H(pre ⊙ (x·s))) spelled out with fwht.
      std::vector<float> ref(x.begin(), x.begin() + static_cast<std::ptrdiff_t>(d)), got(d);
      for (size_t j = 0; j < d; ++j) ref[j] = ref[j] * rs[0] * pre[j];
      scalar_kernels().fwht(ref.data(), d);
      for (size_t j = 0; j < d; ++j) ref[j] *= mid[j];
      scalar_kernels().fwht(ref.data(), d);
      for (size_t j = 0; j < d; ++j) ref[j] *= post[j];
      k->hadamard_rotate(x.data(), 1, d, rs.data(), pre.data(), mid.data(), post.data(), got.data());
      for (size_t j = 0; j < d; ++j) ASSERT_EQ(ref[j], got[j]) << k->name << " d=" << d;
    }
  }
}

TEST(Kernels, RowNormsBitExact) {
  for (const auto* k : usable_kernels()) {
    for (size_t d : kDims) {
      const size_t n = 19;
      const auto x = gaussian(n * d, 3u, 10.0f);
      std::vector<float> a(n), b(n);
      scalar_kernels().row_norms(x.data(), n, d, a.data());
      k->row_norms(x.data(), n, d, b.data());
      for (size_t r = 0; r < n; ++r) ASSERT_EQ(a[r], b[r]) << k->name << " d=" << d;
      // A non-finite input gives a non-finite norm.
      auto bad = x;
      bad[5 * d + d - 1] = std::nanf("");
      bad[7 * d] = INFINITY;
      k->row_norms(bad.data(), n, d, b.data());
      EXPECT_FALSE(std::isfinite(b[5])) << k->name;
      EXPECT_FALSE(std::isfinite(b[7])) << k->name;
      EXPECT_TRUE(std::isfinite(b[6])) << k->name;
    }
  }
}

TEST(Kernels, QuantizePackBitExact) {
  for (const auto* k : usable_kernels()) {
    for (int bits = 1; bits <= 8; ++bits) {
      for (size_t d : kDims) {
        const Codebook& cb = lloyd_max_codebook(static_cast<int>(d), bits, CoordinateLaw::kBeta);
        const size_t n = 37;
        auto y = gaussian(n * d, 11u + static_cast<uint32_t>(bits), 1.0f / std::sqrt(static_cast<float>(d)));
        // Values exactly on boundaries, beyond the extremes, and NaN must agree too.
        y[0] = cb.boundaries[0];
        y[1] = cb.boundaries.back();
        y[2] = 10.0f;
        y[3] = -10.0f;
        y[4] = std::nanf("");
        y[d + 3] = cb.boundaries[cb.boundaries.size() / 2];
        const size_t cbytes = packed_bytes(d, bits) + 3;  // a row stride wider than the payload
        std::vector<uint8_t> a(n * cbytes, 0xAB), b(n * cbytes, 0xAB);
        scalar_kernels().quantize_pack(y.data(), n, d, cb.boundaries.data(), bits, a.data(), cbytes);
        k->quantize_pack(y.data(), n, d, cb.boundaries.data(), bits, b.data(), cbytes);
        ASSERT_EQ(a, b) << k->name << " bits=" << bits << " d=" << d;
      }
    }
  }
}

TEST(Kernels, ScoresMatchScalar) {
  for (const auto* k : usable_kernels()) {
    for (int bits = 1; bits <= 8; ++bits) {
      for (size_t d : kDims) {
        const Codebook& cb = lloyd_max_codebook(static_cast<int>(d), bits, CoordinateLaw::kBeta);
        for (size_t n : kTokens) {
          for (size_t m : kQueries) {
            const size_t cbytes = packed_bytes(d, bits);
            const auto codes = random_codes(n, d, bits, static_cast<uint32_t>(n * 31 + d + static_cast<size_t>(bits)));
            const auto q = gaussian(m * d, 5u);
            auto norms = gaussian(n, 9u);
            for (auto& v : norms) v = std::fabs(v) + 0.5f;
            const size_t stride = n + 5;
            std::vector<float> a(m * stride, -1.0f), b(m * stride, -1.0f);
            scalar_kernels().mse_scores(q.data(), m, codes.data(), cbytes, norms.data(), n, d, bits,
                                        cb.centroids.data(), a.data(), stride);
            k->mse_scores(q.data(), m, codes.data(), cbytes, norms.data(), n, d, bits,
                          cb.centroids.data(), b.data(), stride);
            for (size_t i = 0; i < m; ++i) {
              for (size_t t = 0; t < stride; ++t) {
                if (t >= n) {  // outside the output rows: untouched
                  ASSERT_EQ(b[i * stride + t], -1.0f) << k->name;
                  continue;
                }
                const float ref = a[i * stride + t];
                ASSERT_NEAR(b[i * stride + t], ref, 1e-5f * (1.0f + std::fabs(ref)) + 1e-5f)
                    << k->name << " bits=" << bits << " d=" << d << " n=" << n << " m=" << m << " i=" << i
                    << " t=" << t;
              }
            }
          }
        }
      }
    }
  }
}

TEST(Kernels, AccumulateMatchesScalar) {
  for (const auto* k : usable_kernels()) {
    for (int bits = 1; bits <= 8; ++bits) {
      for (size_t d : kDims) {
        const Codebook& cb = lloyd_max_codebook(static_cast<int>(d), bits, CoordinateLaw::kBeta);
        for (size_t n : kTokens) {
          for (size_t m : kQueries) {
            const size_t cbytes = packed_bytes(d, bits);
            const auto codes = random_codes(n, d, bits, static_cast<uint32_t>(n * 17 + d + static_cast<size_t>(bits)));
            const size_t ws = n + 3;
            auto w = gaussian(m * ws, 13u);
            for (size_t t = 0; t < n; t += 5) w[t] = 0.0f;  // masked tokens of query 0
            auto norms = gaussian(n, 2u);
            const auto init = gaussian(m * d, 4u);
            auto a = init, b = init;
            scalar_kernels().mse_accumulate(w.data(), ws, m, codes.data(), cbytes, norms.data(), n, d, bits,
                                            cb.centroids.data(), a.data());
            k->mse_accumulate(w.data(), ws, m, codes.data(), cbytes, norms.data(), n, d, bits,
                              cb.centroids.data(), b.data());
            for (size_t j = 0; j < m * d; ++j)
              ASSERT_NEAR(b[j], a[j], 2e-5f * (1.0f + std::fabs(a[j])) * std::sqrt(static_cast<float>(n)))
                  << k->name << " bits=" << bits << " d=" << d << " n=" << n << " m=" << m << " j=" << j;
          }
        }
      }
    }
  }
}

// Sparse V's row-list entry: scalar = the dense scalar sum with the unlisted rows' weights
// zeroed (same order, so the same bits), and every variant = scalar. Lists include the last
// rows (read from SafeRows' padded tail in SIMD sets) and the empty list.
TEST(Kernels, AccumulateRowsMatchesScalar) {
  for (const auto* k : usable_kernels()) {
    for (int bits = 1; bits <= 8; ++bits) {
      for (size_t d : kDims) {
        const Codebook& cb = lloyd_max_codebook(static_cast<int>(d), bits, CoordinateLaw::kBeta);
        for (size_t n : kTokens) {
          for (size_t m : {size_t{1}, size_t{3}, size_t{4}, size_t{7}}) {
            const size_t cbytes = packed_bytes(d, bits);
            const auto codes = random_codes(n, d, bits, static_cast<uint32_t>(n * 19 + d + static_cast<size_t>(bits)));
            const size_t ws = n + 3;
            const auto w = gaussian(m * ws, 15u);
            const auto norms = gaussian(n, 3u);
            const auto init = gaussian(m * d, 4u);
            std::mt19937 gen(static_cast<uint32_t>(n + 7 * m + d));
            for (int keep_pct : {0, 30, 100}) {
              std::vector<uint32_t> idx;
              for (size_t t = 0; t < n; ++t)
                if (t + 1 == n ? keep_pct > 0 : static_cast<int>(gen() % 100) < keep_pct)
                  idx.push_back(static_cast<uint32_t>(t));
              auto wz = w;  // the dense sum of the same rows
              for (size_t t = 0, kk = 0; t < n; ++t) {
                if (kk < idx.size() && idx[kk] == t) { ++kk; continue; }
                for (size_t i = 0; i < m; ++i) wz[i * ws + t] = 0.0f;
              }
              auto ref = init, a = init, b = init;
              scalar_kernels().mse_accumulate(wz.data(), ws, m, codes.data(), cbytes, norms.data(), n, d, bits,
                                              cb.centroids.data(), ref.data());
              scalar_kernels().mse_accumulate_rows(w.data(), ws, m, codes.data(), cbytes, norms.data(), n,
                                                   idx.data(), idx.size(), d, bits, cb.centroids.data(), a.data());
              k->mse_accumulate_rows(w.data(), ws, m, codes.data(), cbytes, norms.data(), n, idx.data(), idx.size(),
                                     d, bits, cb.centroids.data(), b.data());
              ASSERT_EQ(a, ref) << "scalar row list != dense sum bits=" << bits << " d=" << d << " n=" << n;
              if (idx.empty()) {
                ASSERT_EQ(b, init) << k->name;
              }
              for (size_t j = 0; j < m * d; ++j)
                ASSERT_NEAR(b[j], a[j], 2e-5f * (1.0f + std::fabs(a[j])) * std::sqrt(static_cast<float>(n)))
                    << k->name << " bits=" << bits << " d=" << d << " n=" << n << " m=" << m << " kept="
                    << idx.size() << " j=" << j;
            }
          }
        }
      }
    }
  }
}

TEST(Kernels, RowsWiderThanAnyCodeStillMatch) {
  // A row stride above kMaxDim bytes (codes embedded in wider records) takes the reference
  // path in SIMD sets; results must not change.
  const size_t d = 128, n = 9, m = 2, stride = 700;
  const int bits = 3;
  const Codebook& cb = lloyd_max_codebook(static_cast<int>(d), bits, CoordinateLaw::kBeta);
  const auto packed = random_codes(n, d, bits, 77u);
  std::vector<uint8_t> codes(n * stride, 0x5A);
  for (size_t t = 0; t < n; ++t)
    std::copy_n(packed.begin() + static_cast<std::ptrdiff_t>(t * packed_bytes(d, bits)), packed_bytes(d, bits),
                codes.begin() + static_cast<std::ptrdiff_t>(t * stride));
  const auto q = gaussian(m * d, 6u);
  const std::vector<float> norms(n, 1.5f);
  for (const auto* k : usable_kernels()) {
    std::vector<float> a(m * n), b(m * n), acc_a(m * d, 0.0f), acc_b(m * d, 0.0f);
    scalar_kernels().mse_scores(q.data(), m, codes.data(), stride, norms.data(), n, d, bits, cb.centroids.data(), a.data(), n);
    k->mse_scores(q.data(), m, codes.data(), stride, norms.data(), n, d, bits, cb.centroids.data(), b.data(), n);
    for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-5f * (1.0f + std::fabs(a[i]))) << k->name;
    scalar_kernels().mse_accumulate(a.data(), n, m, codes.data(), stride, norms.data(), n, d, bits, cb.centroids.data(), acc_a.data());
    k->mse_accumulate(a.data(), n, m, codes.data(), stride, norms.data(), n, d, bits, cb.centroids.data(), acc_b.data());
    for (size_t i = 0; i < acc_a.size(); ++i) ASSERT_NEAR(acc_a[i], acc_b[i], 1e-4f * (1.0f + std::fabs(acc_a[i]))) << k->name;
  }
}

TEST(Kernels, HalfToFloatExactForEveryValue) {
  std::vector<uint16_t> h(65536 + 5);
  for (size_t i = 0; i < h.size(); ++i) h[i] = static_cast<uint16_t>(i);
  for (const auto* k : usable_kernels()) {
    std::vector<float> a(h.size()), b(h.size());
    scalar_kernels().half_to_float(h.data(), h.size(), a.data());
    k->half_to_float(h.data(), h.size(), b.data());
    for (size_t i = 0; i < h.size(); ++i) {
      if (std::isnan(a[i])) {
        ASSERT_TRUE(std::isnan(b[i])) << k->name << " " << i;
      } else {
        ASSERT_EQ(a[i], b[i]) << k->name << " " << i;
      }
    }
  }
}

TEST(Kernels, ExpSumMatchesStdExp) {
  for (const auto* k : usable_kernels()) {
    for (size_t n : {0, 1, 7, 8, 33, 1000}) {
      auto s = gaussian(n, 21u, 20.0f);
      float mx = -INFINITY;
      for (float v : s) mx = std::max(mx, v);
      auto a = s, b = s;
      const float sa = scalar_kernels().exp_sum(a.data(), n, mx);
      const float sb = k->exp_sum(b.data(), n, mx);
      EXPECT_NEAR(sb, sa, 1e-5f * (1.0f + sa)) << k->name << " n=" << n;
      for (size_t t = 0; t < n; ++t)
        ASSERT_NEAR(b[t], a[t], 1e-6f * a[t] + 1e-30f) << k->name << " n=" << n << " t=" << t << " x=" << s[t] - mx;
    }
  }
}

std::vector<uint16_t> half_rows(size_t count, uint32_t seed) {
  const auto x = gaussian(count, seed, 2.0f);
  std::vector<uint16_t> h(count);
  for (size_t i = 0; i < count; ++i) h[i] = float_to_half(x[i]);
  return h;
}

// fp16 rows (sinks / window): every head dim of kDims plus 100 (a 4-column tail after the
// 8-wide blocks), row counts and query counts off the SIMD block sizes.
const size_t kF16Dims[] = {64, 128, 96, 100, 40, 20, 16, 256};
const size_t kF16Queries[] = {1, 2, 3, 4, 5, 7, 16};

TEST(Kernels, F16ScoresMatchScalar) {
  for (const auto* k : usable_kernels()) {
    for (size_t d : kF16Dims) {
      for (size_t n : {size_t{1}, size_t{7}, size_t{37}, size_t{133}}) {
        for (size_t m : kF16Queries) {
          const auto rows = half_rows(n * d, static_cast<uint32_t>(n * 31 + d));
          const auto q = gaussian(m * d, static_cast<uint32_t>(m + d));
          const size_t stride = n + 5;
          std::vector<float> a(m * stride, -7.0f), b(m * stride, -7.0f);
          scalar_kernels().f16_scores(q.data(), m, rows.data(), n, d, a.data(), stride);
          k->f16_scores(q.data(), m, rows.data(), n, d, b.data(), stride);
          for (size_t i = 0; i < m; ++i) {
            for (size_t t = 0; t < n; ++t) {
              double exact = 0, mag = 0;
              for (size_t j = 0; j < d; ++j) {
                const double p = static_cast<double>(q[i * d + j]) * half_to_float(rows[t * d + j]);
                exact += p;
                mag += std::fabs(p);
              }
              const double tol = 1e-6 * mag * static_cast<double>(d) + 1e-6;
              ASSERT_NEAR(a[i * stride + t], exact, tol) << "scalar d=" << d;
              ASSERT_NEAR(b[i * stride + t], exact, tol)
                  << k->name << " d=" << d << " n=" << n << " m=" << m << " i=" << i << " t=" << t;
            }
            for (size_t t = n; t < stride; ++t) ASSERT_EQ(b[i * stride + t], -7.0f) << k->name << " wrote past n";
          }
        }
      }
    }
  }
}

TEST(Kernels, F16AccumulateMatchesScalar) {
  for (const auto* k : usable_kernels()) {
    for (size_t d : kF16Dims) {
      for (size_t n : {size_t{1}, size_t{7}, size_t{37}, size_t{133}}) {
        for (size_t m : kF16Queries) {
          const auto rows = half_rows(n * d, static_cast<uint32_t>(n * 13 + d));
          const size_t ws = n + 3;
          auto w = gaussian(m * ws, static_cast<uint32_t>(m * 7 + n));
          for (auto& x : w) x = std::fabs(x);
          for (size_t t = 0; t < n; t += 3) w[t] = 0.0f;  // skipped rows of query 0 (sparse V)
          const auto init = gaussian(m * d, 4u);
          auto a = init, b = init;
          scalar_kernels().f16_accumulate(w.data(), ws, m, rows.data(), n, d, a.data());
          k->f16_accumulate(w.data(), ws, m, rows.data(), n, d, b.data());
          for (size_t i = 0; i < m; ++i)
            for (size_t j = 0; j < d; ++j) {
              double mag = std::fabs(init[i * d + j]);
              for (size_t t = 0; t < n; ++t) mag += std::fabs(w[i * ws + t] * half_to_float(rows[t * d + j]));
              ASSERT_NEAR(b[i * d + j], a[i * d + j], 1e-6 * mag * static_cast<double>(n) + 1e-6)
                  << k->name << " d=" << d << " n=" << n << " m=" << m << " i=" << i << " j=" << j;
            }
        }
      }
    }
  }
}

TEST(Kernels, ActiveHonoursTurboquantSimd) {
  // active_kernels() is fixed at first use; the variable itself is checked per target by
  // tests/python/test_kernels.py in fresh processes. Here: the active set is usable and is
  // the one the variable names when set.
  const char* env = std::getenv("TURBOQUANT_SIMD");
  const auto all = usable_kernels();
  if (env && *env) {
    EXPECT_EQ(std::string(active_kernels().name), env);
  } else {
    EXPECT_EQ(&active_kernels(), all.back());
  }
}

TEST(ThreadPool, CoversRangeOnceAndPropagatesErrors) {
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    EXPECT_EQ(get_num_threads(), threads);
    std::vector<int> hits(1000, 0);
    parallel_for(hits.size(), 7, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i) hits[i] += 1;
      // Nested calls run inline and still cover their range.
      parallel_for(3, 1, [&](size_t nb, size_t ne) { EXPECT_EQ(ne - nb, 3u); });
    });
    for (int h : hits) ASSERT_EQ(h, 1);
    EXPECT_THROW(parallel_for(100, 1, [](size_t, size_t e) {
                   if (e > 50) throw std::runtime_error("boom");
                 }),
                 std::runtime_error);
  }
  EXPECT_THROW(set_num_threads(-1), InvalidArgument);
  set_num_threads(0);
  EXPECT_GE(get_num_threads(), 1);
}

}  // namespace
}  // namespace turboquant::cpu
