#include "turboquant/attention.h"
#include "turboquant/kv_cache.h"

#include <gtest/gtest.h>

#include <optional>

#include "kv_test_util.h"
#include "turboquant/error.h"

using namespace turboquant;
using namespace turboquant::testing;

namespace {

double max_abs_diff(const std::vector<double>& a, const float* b) {
  double m = 0;
  for (size_t j = 0; j < a.size(); ++j) m = std::max(m, std::abs(a[j] - b[j]));
  return m;
}

// Checks every query row of a (possibly GQA, prefill, windowed) attend against exact fp64
// attention on the dequantized K/V of its KV head.
void check_against_dequantized(const KVCacheConfig& cfg, size_t n, size_t T_q, bool causal,
                               std::optional<size_t> window, uint64_t seed) {
  KVCache c(cfg);
  const auto d = static_cast<size_t>(cfg.head_dim);
  const auto Hkv = static_cast<size_t>(cfg.n_kv_heads), Hq = static_cast<size_t>(cfg.n_q_heads);
  const auto k = gaussian(Hkv * n * d, seed), v = gaussian(Hkv * n * d, seed + 1);
  c.append(0, k.data(), v.data(), n);
  const auto q = gaussian(Hq * T_q * d, seed + 2);
  std::vector<float> out(q.size());
  AttentionOptions opt;
  opt.causal = causal;
  opt.window = window;
  c.attend(0, q.data(), T_q, out.data(), opt);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (size_t h = 0; h < Hkv; ++h) {
    const auto K = decoded(c, 0, static_cast<int>(h), KVRole::kKey);
    const auto V = decoded(c, 0, static_cast<int>(h), KVRole::kValue);
    for (size_t g = 0; g < Hq / Hkv; ++g) {
      const size_t qh = h * (Hq / Hkv) + g;
      for (size_t t = 0; t < T_q; ++t) {
        const size_t hi = causal ? n - T_q + t : n - 1;
        const size_t lo = window && hi + 1 > *window ? hi + 1 - *window : 0;
        const auto ref = exact_attention(&q[(qh * T_q + t) * d], K.data(), V.data(), d, lo, hi, scale);
        EXPECT_LT(max_abs_diff(ref, &out[(qh * T_q + t) * d]), 1e-4)
            << "head " << qh << " query " << t << " n=" << n << " T_q=" << T_q;
      }
    }
  }
}

}  // namespace

TEST(Attention, DecodeEqualsExactAttentionOnDequantizedKV) {
  for (int bits : {2, 3, 4}) {
    KVCacheConfig cfg;
    cfg.key_bits = bits;
    cfg.value_bits = bits;
    check_against_dequantized(cfg, 1024, 1, true, std::nullopt, 10 + static_cast<uint64_t>(bits));
  }
}

TEST(Attention, CosineToOriginalAttention) {
  // Gaussian keys/values, d=128, 1K tokens, one query, scale 1/sqrt(d), averaged over queries.
  const size_t d = 128, n = 1024;
  const auto k = gaussian(n * d, 20), v = gaussian(n * d, 21);
  for (auto [bits, floor] : {std::pair{4, 0.985}, std::pair{3, 0.95}}) {
    KVCacheConfig cfg;
    cfg.key_bits = bits;
    cfg.value_bits = bits;
    KVCache c(cfg);
    c.append(0, k.data(), v.data(), n);
    double mean = 0;
    const int trials = 16;
    for (int i = 0; i < trials; ++i) {
      const auto q = gaussian(d, 100 + static_cast<uint64_t>(i));
      std::vector<float> out(d);
      c.attend(0, q.data(), 1, out.data());
      const auto ref = exact_attention(q.data(), k.data(), v.data(), d, 0, n - 1, 1.0 / std::sqrt(double(d)));
      const double cs = cosine(ref, out.data());
      EXPECT_GE(cs, floor - 0.02) << "bits " << bits << " query " << i;
      mean += cs / trials;
    }
    EXPECT_GE(mean, floor) << "bits " << bits;
    std::printf("bits %d: mean cosine to fp32 attention %.4f\n", bits, mean);
  }
}

TEST(Attention, PrefillCausalWindowGqaAcrossPages) {
  KVCacheConfig cfg;
  cfg.head_dim = 64;
  cfg.n_q_heads = 6;
  cfg.n_kv_heads = 2;
  cfg.key_bits = 4;
  cfg.value_bits = 2;
  for (size_t bt : {size_t{1}, size_t{7}, size_t{64}}) {
    cfg.block_tokens = bt;
    check_against_dequantized(cfg, 97, 5, true, std::nullopt, 30);      // hooks path (m = 15)
    check_against_dequantized(cfg, 97, 40, true, std::nullopt, 31);     // GEMM path
    check_against_dequantized(cfg, 97, 40, true, size_t{9}, 32);        // sliding window
    check_against_dequantized(cfg, 97, 3, true, size_t{1}, 33);         // window of one
    check_against_dequantized(cfg, 97, 12, false, std::nullopt, 34);    // non-causal
    check_against_dequantized(cfg, 97, 12, false, size_t{20}, 35);      // non-causal window
  }
}

TEST(Attention, GemmAndHookPathsAgree) {
  KVCacheConfig cfg;
  cfg.block_tokens = 50;
  KVCache c(cfg);
  const size_t d = 128, n = 300, m = 24;
  const auto k = gaussian(n * d, 40), v = gaussian(n * d, 41), q = gaussian(m * d, 42);
  c.append(0, k.data(), v.data(), n);
  RowMask mask;
  for (size_t i = 0; i < m; ++i) {
    mask.hi.push_back(n - m + i);
    mask.lo.push_back(i * 5);
  }
  std::vector<float> a(m * d), b(m * d);
  AttentionScratch s;
  const auto K = c.head_codes(0, 0, KVRole::kKey), V = c.head_codes(0, 0, KVRole::kValue);
  attend_head(K, V, n, q.data(), m, mask, 0.1f, a.data(), s, true, false);
  attend_head(K, V, n, q.data(), m, mask, 0.1f, b.data(), s, false, true);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-5);
}

TEST(Attention, RejectsBadCalls) {
  KVCache c(KVCacheConfig{});
  std::vector<float> q(128 * 2, 0.5f), out(q.size());
  EXPECT_THROW(c.attend(0, q.data(), 1, out.data()), InvalidArgument);  // empty cache
  const auto k = gaussian(128, 50);
  c.append(0, k.data(), k.data(), 1);
  EXPECT_THROW(c.attend(0, q.data(), 2, out.data()), InvalidArgument);  // more queries than tokens
  q[3] = std::nanf("");
  EXPECT_THROW(c.attend(0, q.data(), 1, out.data()), InvalidArgument);
  AttentionOptions opt;
  opt.window = 0;
  q[3] = 0.0f;
  EXPECT_THROW(c.attend(0, q.data(), 1, out.data(), opt), InvalidArgument);
}

TEST(Attention, SingleTokenReturnsItsValue) {
  KVCache c(KVCacheConfig{});
  const auto k = gaussian(128, 60), v = gaussian(128, 61), q = gaussian(128, 62);
  c.append(0, k.data(), v.data(), 1);
  std::vector<float> out(128);
  c.attend(0, q.data(), 1, out.data());
  const auto V = decoded(c, 0, 0, KVRole::kValue);
  for (size_t j = 0; j < 128; ++j) EXPECT_NEAR(out[j], V[j], 1e-5);
}

TEST(Attention, EveryRegisteredMethodMatchesItsDequantizedAttention) {
  // The compressed-domain hooks of every method (and the GEMM path on its dequantized
  // tiles) must equal exact attention on what the method reconstructs.
  for (const auto& method : registered_methods()) {
    int bits = 0;
    for (int b : {3, 2, 1}) {
      QuantizerConfig qc;
      qc.method = method;
      qc.dim = 64;
      qc.bits = b;
      try {
        make_quantizer(qc);
        bits = b;
        break;
      } catch (const InvalidArgument&) {
      }
    }
    ASSERT_GT(bits, 0) << method << " builds at no bit width in {1, 2, 3}";
    KVCacheConfig cfg;
    cfg.head_dim = 64;
    cfg.n_q_heads = 2;
    cfg.key_method = cfg.value_method = method;
    cfg.key_bits = cfg.value_bits = bits;
    cfg.block_tokens = 32;
    SCOPED_TRACE(method);
    check_against_dequantized(cfg, 150, 1, true, std::nullopt, 80);   // hooks
    check_against_dequantized(cfg, 150, 20, true, size_t{64}, 81);    // GEMM, windowed
  }
}
