// fp16 recent window / fp16 layers (KVCacheConfig::fp16_window, fp16_layers) and sparse V.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>

#include "kv_test_util.h"
#include "turboquant/attention.h"
#include "turboquant/kv_cache.h"
#include "turboquant/error.h"
#include "turboquant/half.h"
#include "turboquant/serialize.h"
#include "turboquant/thread_pool.h"

using namespace turboquant;
using namespace turboquant::testing;

namespace {

KVCacheConfig window_config() {
  KVCacheConfig c;
  c.head_dim = 64;
  c.n_q_heads = 4;
  c.n_kv_heads = 2;
  c.block_tokens = 16;
  c.fp16_window = 10;
  return c;
}

// All tokens of one head as attention sees them: decoded codes, then the fp16 window.
std::vector<float> full_rows(const KVCache& c, int layer, int head, KVRole role) {
  const Quantizer& q = role == KVRole::kKey ? c.key_quantizer(layer, head) : c.value_quantizer(layer, head);
  const size_t n = c.coded_tokens(layer), d = static_cast<size_t>(q.dim());
  std::vector<uint8_t> codes(n * q.code_bytes()), norms(n * q.norm_bytes());
  c.copy_out(layer, head, role, 0, n, codes.data(), norms.data());
  std::vector<float> out(n * d);
  q.decode(codes.data(), norms.data(), n, out.data());
  for (uint16_t h : c.window(layer, head, role)) out.push_back(half_to_float(h));
  return out;
}

}  // namespace

TEST(KVWindow, ContentIndependentOfChunking) {
  const auto cfg = window_config();
  KVCache a(cfg), b(cfg);
  const size_t n = 75, d = 64;
  const auto k = gaussian(2 * n * d, 1), v = gaussian(2 * n * d, 2);
  a.append(0, k.data(), v.data(), n);
  for (size_t t = 0; t < n; ++t) {  // one token at a time, head-major per call
    std::vector<float> kt(2 * d), vt(2 * d);
    for (size_t h = 0; h < 2; ++h) {
      std::memcpy(&kt[h * d], &k[(h * n + t) * d], d * sizeof(float));
      std::memcpy(&vt[h * d], &v[(h * n + t) * d], d * sizeof(float));
    }
    b.append(0, kt.data(), vt.data(), 1);
  }
  EXPECT_EQ(a.coded_tokens(0), 64u);  // window 11 tokens: 10 < 11 <= 10 + 16
  EXPECT_EQ(b.coded_tokens(0), 64u);
  for (int h = 0; h < 2; ++h)
    for (KVRole r : {KVRole::kKey, KVRole::kValue}) EXPECT_EQ(full_rows(a, 0, h, r), full_rows(b, 0, h, r));
  EXPECT_EQ(a.memory_bytes(), b.memory_bytes());
}

TEST(KVWindow, AttentionMatchesExactOnDecodedPlusWindow) {
  const auto cfg = window_config();
  KVCache c(cfg);
  const size_t n = 61, d = 64, tq = 18;  // prefill rows span the code / window boundary
  const auto k = gaussian(2 * n * d, 3), v = gaussian(2 * n * d, 4), q = gaussian(4 * tq * d, 5);
  c.append(0, k.data(), v.data(), n);
  ASSERT_EQ(c.coded_tokens(0), 48u);
  for (size_t w : {size_t{0}, size_t{7}, size_t{30}}) {
    AttentionOptions opt;
    if (w) opt.window = w;
    std::vector<float> out(4 * tq * d);
    c.attend(0, q.data(), tq, out.data(), opt);
    for (int qh = 0; qh < 4; ++qh) {
      const auto K = full_rows(c, 0, qh / 2, KVRole::kKey), V = full_rows(c, 0, qh / 2, KVRole::kValue);
      for (size_t t = 0; t < tq; ++t) {
        const size_t hi = n - tq + t, lo = w && hi + 1 > w ? hi + 1 - w : 0;
        const auto e = exact_attention(&q[(static_cast<size_t>(qh) * tq + t) * d], K.data(), V.data(), d, lo,
                                       hi, 1.0 / 8.0);
        for (size_t j = 0; j < d; ++j)
          EXPECT_NEAR(out[(static_cast<size_t>(qh) * tq + t) * d + j], e[j], 1e-4) << "w=" << w;
      }
    }
  }
}

TEST(KVWindow, Fp16LayersNeverFlushAndRoundTrip) {
  auto cfg = window_config();
  cfg.n_layers = 2;
  cfg.fp16_layers = {1};
  KVCache c(cfg);
  const size_t n = 40, d = 64;
  const auto k = gaussian(2 * n * d, 6), v = gaussian(2 * n * d, 7);
  c.append(0, k.data(), v.data(), n);
  c.append(1, k.data(), v.data(), n);
  EXPECT_EQ(c.coded_tokens(1), 0u);
  EXPECT_EQ(c.window_tokens(1), n);
  EXPECT_EQ(c.coded_tokens(0), 16u);
  const auto bytes = serialize_cache(c);
  auto back = deserialize_cache(bytes.data(), bytes.size());
  for (int l = 0; l < 2; ++l)
    for (int h = 0; h < 2; ++h)
      for (KVRole r : {KVRole::kKey, KVRole::kValue}) EXPECT_EQ(full_rows(c, l, h, r), full_rows(*back, l, h, r));
  EXPECT_LE(back->memory_bytes(), c.memory_bytes());
  for (size_t cut : {bytes.size() - 20, bytes.size() / 2 + 7}) {
    std::vector<uint8_t> bad(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(cut));
    EXPECT_THROW(deserialize_cache(bad.data(), bad.size()), FormatError);
  }
}

TEST(KVWindow, BadInputLeavesCacheUnchanged) {
  KVCache c(window_config());
  const size_t d = 64;
  const auto k = gaussian(2 * 5 * d, 8);
  c.append(0, k.data(), k.data(), 5);
  const size_t mem = c.memory_bytes();
  auto bad = k;
  bad[17] = 1e9f;  // overflows fp16
  EXPECT_THROW(c.append(0, bad.data(), k.data(), 5), InvalidArgument);
  EXPECT_EQ(c.size(0), 5u);
  EXPECT_EQ(c.memory_bytes(), mem);
  auto cfg = window_config();
  cfg.fp16_layers = {1};
  EXPECT_THROW(KVCache{cfg}, InvalidArgument);
}

TEST(Half, FirstNonfiniteIsTheFirstInfOrNan) {
  std::vector<half_bits> h(70);
  for (size_t j = 0; j < h.size(); ++j) h[j] = float_to_half(static_cast<float>(j) - 30.5f);
  h[3] = 0x7BFFu;  // the largest finite fp16
  h[4] = 0x0001u;  // the smallest subnormal
  EXPECT_EQ(first_nonfinite_half(h.data(), h.size()), h.size());
  EXPECT_EQ(first_nonfinite_half(h.data(), 0), 0u);
  for (const half_bits bad : {half_bits{0x7C00u}, half_bits{0xFC00u}, half_bits{0x7E00u}, half_bits{0xFFFFu}}) {
    for (const size_t at : {size_t{0}, size_t{33}, size_t{69}}) {
      auto g = h;
      g[at] = bad;
      EXPECT_EQ(first_nonfinite_half(g.data(), g.size()), at);
      if (at < 69) {
        g[69] = bad;
        EXPECT_EQ(first_nonfinite_half(g.data(), g.size()), at);  // the first of two
      }
      EXPECT_EQ(half_is_finite(bad), false);
    }
  }
  // The bit test agrees with converting for every fp16 value.
  for (uint32_t v = 0; v <= 0xFFFFu; ++v)
    ASSERT_EQ(half_is_finite(static_cast<half_bits>(v)), std::isfinite(half_to_float(static_cast<half_bits>(v)))) << v;
}

TEST(KVWindow, RestoredRowsThatAreNotFiniteAreRefusedByIndex) {
  auto cfg = window_config();
  cfg.fp16_sinks = 2;
  KVCache c(cfg);
  const size_t d = 64, streams = 4;
  std::vector<std::vector<half_bits>> rows(streams, std::vector<half_bits>(3 * d, float_to_half(0.25f)));
  std::vector<const half_bits*> p(streams);
  for (size_t s = 0; s < streams; ++s) p[s] = rows[s].data();
  const auto refused = [](const auto& call, const std::string& message) {
    try {
      call();
    } catch (const InvalidArgument& e) {
      return std::string(e.what()).find(message) != std::string::npos;
    }
    return false;
  };
  rows[2][70] = 0x7C00u;  // +Inf in the second sink row of stream 2
  EXPECT_TRUE(refused([&] { c.append_sinks(0, 2, p); }, "sink row value 70 of stream 2 is not finite"));
  EXPECT_EQ(c.size(0), 0u);
  rows[2][70] = float_to_half(0.25f);
  c.append_sinks(0, 2, p);
  rows[3][5] = 0x7E00u;  // NaN in the first window row of stream 3
  EXPECT_TRUE(refused([&] { c.append_window(0, 3, p); }, "window row value 5 of stream 3 is not finite"));
  EXPECT_EQ(c.size(0), 2u);
  rows[3][5] = float_to_half(0.25f);
  c.append_window(0, 3, p);
  EXPECT_EQ(c.size(0), 5u);
}

TEST(SparseV, ZeroIsDenseAndSkipsOnlySmallWeights) {
  KVCacheConfig cfg;
  cfg.head_dim = 64;
  cfg.n_q_heads = 2;
  cfg.block_tokens = 32;
  KVCache c(cfg);
  const size_t n = 300, d = 64;
  const auto k = gaussian(n * d, 9), v = gaussian(n * d, 10);
  auto q = gaussian(2 * d, 11);
  for (auto& x : q) x *= 3.0f;
  c.append(0, k.data(), v.data(), n);
  std::vector<float> dense(2 * d), zero(2 * d), sparse(2 * d);
  c.attend(0, q.data(), 1, dense.data());
  AttentionOptions opt;
  opt.sparse_v_threshold = 0.0f;
  c.attend(0, q.data(), 1, zero.data(), opt);
  EXPECT_EQ(dense, zero);
  opt.sparse_v_threshold = 0.02f;
  c.attend(0, q.data(), 1, sparse.data(), opt);
  EXPECT_NE(dense, sparse);
  const auto K = decoded(c, 0, 0, KVRole::kKey), V = decoded(c, 0, 0, KVRole::kValue);
  for (size_t h = 0; h < 2; ++h) {
    std::vector<double> p(n);
    double mx = -1e300, sum = 0, bound = 0, err = 0;
    for (size_t t = 0; t < n; ++t) {
      double s = 0;
      for (size_t j = 0; j < d; ++j) s += static_cast<double>(q[h * d + j]) * K[t * d + j];
      mx = std::max(mx, p[t] = s / 8.0);
    }
    for (auto& x : p) sum += (x = std::exp(x - mx));
    for (size_t t = 0; t < n; ++t) {
      if (p[t] >= 0.02) continue;  // p[t] is relative to the max weight here
      double vn = 0;
      for (size_t j = 0; j < d; ++j) vn += static_cast<double>(V[t * d + j]) * V[t * d + j];
      bound += p[t] / sum * std::sqrt(vn);
    }
    for (size_t j = 0; j < d; ++j) err += std::pow(static_cast<double>(sparse[h * d + j]) - dense[h * d + j], 2);
    EXPECT_LE(std::sqrt(err), bound + 1e-5);
    EXPECT_GT(bound, 0.0);
  }
  opt.sparse_v_threshold = 1.0f;
  EXPECT_THROW(c.attend(0, q.data(), 1, sparse.data(), opt), InvalidArgument);
  opt.sparse_v_threshold = std::nanf("");
  EXPECT_THROW(c.attend(0, q.data(), 1, sparse.data(), opt), InvalidArgument);
}

// Sparse V on coded pages with GQA 3 (two query positions: 6 rows per KV head, the decode
// path), for every method as the value method: skipping a value row only when all rows of
// its KV head are below the threshold keeps each query row within the documented bound
// Σ_{p_t < thr·max p} p_t ‖v_t‖, and a threshold that skips rows changes the output.
TEST(SparseV, GqaBoundHoldsPerQueryRowForEveryValueMethod) {
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
    ASSERT_GT(bits, 0) << method;
    SCOPED_TRACE(method);
    KVCacheConfig cfg;
    cfg.head_dim = 64;
    cfg.n_q_heads = 6;
    cfg.n_kv_heads = 2;
    cfg.block_tokens = 32;
    cfg.value_method = method;
    cfg.value_bits = bits;
    KVCache c(cfg);
    const size_t n = 300, d = 64, T_q = 2, G = 3;
    const auto k = gaussian(2 * n * d, 31), v = gaussian(2 * n * d, 32);
    auto q = gaussian(6 * T_q * d, 33);
    for (auto& x : q) x *= 4.0f;  // peaked softmax
    c.append(0, k.data(), v.data(), n);
    const float thr = 0.01f;
    std::vector<float> dense(6 * T_q * d), sparse(6 * T_q * d);
    c.attend(0, q.data(), T_q, dense.data());
    AttentionOptions opt;
    opt.sparse_v_threshold = thr;
    c.attend(0, q.data(), T_q, sparse.data(), opt);
    EXPECT_NE(dense, sparse);
    for (int kvh = 0; kvh < 2; ++kvh) {
      const auto K = decoded(c, 0, kvh, KVRole::kKey), V = decoded(c, 0, kvh, KVRole::kValue);
      for (size_t g = 0; g < G; ++g) {
        const size_t qh = static_cast<size_t>(kvh) * G + g;
        for (size_t t = 0; t < T_q; ++t) {
          const float* qr = &q[(qh * T_q + t) * d];
          const size_t len = n - T_q + t + 1;  // causal
          std::vector<double> p(len);
          double mx = -1e300, sum = 0, bound = 0, err = 0;
          for (size_t i = 0; i < len; ++i) {
            double s = 0;
            for (size_t j = 0; j < d; ++j) s += static_cast<double>(qr[j]) * K[i * d + j];
            mx = std::max(mx, p[i] = s / 8.0);
          }
          for (auto& x : p) sum += (x = std::exp(x - mx));
          for (size_t i = 0; i < len; ++i) {
            if (p[i] >= thr) continue;  // relative to the max weight (p[max] = 1)
            double vn = 0;
            for (size_t j = 0; j < d; ++j) vn += static_cast<double>(V[i * d + j]) * V[i * d + j];
            bound += p[i] / sum * std::sqrt(vn);
          }
          const size_t o = (qh * T_q + t) * d;
          for (size_t j = 0; j < d; ++j) err += std::pow(static_cast<double>(sparse[o + j]) - dense[o + j], 2);
          EXPECT_LE(std::sqrt(err), bound + 1e-4) << "query head " << qh << " t " << t;
        }
      }
    }
  }
}

// Quantizer::accumulate_rows (the kernel for turboquant_mse, gather + accumulate for the
// others) equals accumulate with the unlisted rows' weights set to zero.
TEST(SparseV, AccumulateRowsEqualsZeroedWeightsForEveryMethod) {
  for (const auto& method : registered_methods()) {
    for (int bits : {1, 2, 3, 4}) {
      QuantizerConfig qc;
      qc.method = method;
      qc.dim = 64;
      qc.bits = bits;
      std::unique_ptr<Quantizer> qz;
      try {
        qz = make_quantizer(qc);
      } catch (const InvalidArgument&) {
        continue;
      }
      SCOPED_TRACE(method + " bits " + std::to_string(bits));
      const size_t n = 70, m = 3, d = 64;
      const auto x = gaussian(n * d, 41);
      std::vector<uint8_t> codes(n * qz->code_bytes()), raw(n * qz->norm_bytes());
      qz->encode(x.data(), n, codes.data(), raw.data());
      std::vector<float> norms(n);
      qz->load_norms(raw.data(), n, norms.data());
      auto w = gaussian(m * n, 42);
      std::vector<uint32_t> idx;
      for (uint32_t t = 0; t < n; ++t)
        if (t % 3 == 0 || t == n - 1) idx.push_back(t);
      auto wz = w;
      for (size_t t = 0; t < n; ++t)
        if (t % 3 != 0 && t != n - 1)
          for (size_t i = 0; i < m; ++i) wz[i * n + t] = 0.0f;
      std::vector<float> a(m * d, 0.5f), b(m * d, 0.5f);
      qz->accumulate(wz.data(), n, m, codes.data(), norms.data(), n, a.data());
      qz->accumulate_rows(w.data(), n, m, codes.data(), norms.data(), n, idx.data(), idx.size(), b.data());
      for (size_t j = 0; j < m * d; ++j) ASSERT_NEAR(b[j], a[j], 1e-4f * (1.0f + std::fabs(a[j]))) << j;
    }
  }
}

// The windowed path splits KV heads across the thread pool: every head's output is its own,
// so 1, 2 and 3 threads give the same bits (4 KV heads, GQA 2, decode and a causal prefill).
TEST(KVWindow, AttendIndependentOfThreadCount) {
  KVCacheConfig cfg = window_config();
  cfg.n_q_heads = 8;
  cfg.n_kv_heads = 4;
  KVCache c(cfg);
  const size_t n = 70, d = 64;
  const auto k = gaussian(4 * n * d, 21), v = gaussian(4 * n * d, 22);
  c.append(0, k.data(), v.data(), n);
  ASSERT_GT(c.coded_tokens(0), 0u);
  ASSERT_LT(c.coded_tokens(0), n);
  for (size_t tq : {size_t{1}, size_t{5}}) {
    const auto q = gaussian(8 * tq * d, 23 + static_cast<uint64_t>(tq));
    std::vector<std::vector<float>> outs;
    for (int threads : {1, 2, 3}) {
      set_num_threads(threads);
      std::vector<float> out(8 * tq * d, -1.0f);
      c.attend(0, q.data(), tq, out.data());
      outs.push_back(out);
    }
    set_num_threads(0);
    for (float x : outs[0]) ASSERT_TRUE(std::isfinite(x));
    EXPECT_EQ(outs[0], outs[1]) << "T_q=" << tq;
    EXPECT_EQ(outs[0], outs[2]) << "T_q=" << tq;
  }
}

// AttentionOptions::sinks_visible: every query sees the fp16 sinks plus the last `window`
// stored tokens (mlx-lm's RotatingKVCache keep tokens), also after eviction dropped pages.
TEST(KVWindow, SinksVisibleWithWindowAndEviction) {
  KVCacheConfig cfg;
  cfg.head_dim = 64;
  cfg.n_q_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.block_tokens = 4;
  cfg.fp16_sinks = 3;
  cfg.fp16_window = 2;
  cfg.max_coded_tokens = 12;
  KVCache c(cfg);
  const size_t d = 64, w = 6;
  size_t seed = 10;
  for (size_t T : {size_t{2}, size_t{9}, size_t{1}, size_t{14}, size_t{1}, size_t{5}}) {
    const auto k = gaussian(2 * T * d, seed++), v = gaussian(2 * T * d, seed++);
    c.append(0, k.data(), v.data(), T);
    const size_t n = c.size(0), ns = c.sink_tokens(0);
    const auto q = gaussian(4 * T * d, seed++);
    for (bool visible : {true, false}) {
      AttentionOptions opt;
      opt.window = w;
      opt.sinks_visible = visible;
      std::vector<float> out(4 * T * d);
      c.attend(0, q.data(), T, out.data(), opt);
      for (int qh = 0; qh < 4; ++qh) {
        std::vector<float> K(n * d), V(n * d);
        c.decode_tokens(0, qh / 2, KVRole::kKey, 0, n, K.data());
        c.decode_tokens(0, qh / 2, KVRole::kValue, 0, n, V.data());
        for (size_t t = 0; t < T; ++t) {
          const size_t hi = n - T + t, lo = hi + 1 > w ? hi + 1 - w : 0;
          std::vector<float> Ks, Vs;  // the visible rows, in order
          for (size_t r = 0; r <= hi; ++r)
            if (r >= lo || (visible && r < ns)) {
              Ks.insert(Ks.end(), &K[r * d], &K[r * d] + d);
              Vs.insert(Vs.end(), &V[r * d], &V[r * d] + d);
            }
          const auto e = exact_attention(&q[(static_cast<size_t>(qh) * T + t) * d], Ks.data(), Vs.data(), d, 0,
                                         Ks.size() / d - 1, 1.0 / 8.0);
          for (size_t j = 0; j < d; ++j)
            EXPECT_NEAR(out[(static_cast<size_t>(qh) * T + t) * d + j], e[j], 1e-4) << "T=" << T << " t=" << t;
        }
      }
    }
  }
  EXPECT_GT(c.evicted_tokens(0), 0u);
  EXPECT_EQ(c.sink_tokens(0), 3u);
}
