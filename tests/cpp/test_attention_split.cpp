// Split-K decode (attention.h attend_heads): chunks of a KV head's tokens run across the
// thread pool and merge with a log-sum-exp rescale; the output must not depend on the thread
// count (bit for bit) and must match exact attention over the tokens as decoded.
#include <gtest/gtest.h>

#include <cmath>
#include <optional>
#include <string>

#include "kv_test_util.h"
#include "turboquant/attention.h"
#include "turboquant/kv_cache.h"
#include "turboquant/thread_pool.h"

using namespace turboquant;
using namespace turboquant::testing;

namespace {

struct Case {
  std::string name;
  KVCacheConfig cfg;
  size_t n = 0, T_q = 1;
  std::optional<size_t> window;
  float sparse_v = 0.0f;
};

KVCacheConfig base(size_t block_tokens) {
  KVCacheConfig c;
  c.head_dim = 32;
  c.n_q_heads = 4;
  c.n_kv_heads = 2;
  c.key_bits = 3;
  c.value_bits = 3;
  c.block_tokens = block_tokens;
  c.seed = 5;
  return c;
}

std::vector<Case> cases() {
  std::vector<Case> out;
  out.push_back({"plain", base(64), 1300, 1, std::nullopt, 0.0f});           // 3 chunks, last partial
  out.push_back({"gqa_tq3_window", base(64), 1300, 3, 700, 0.0f});          // 6 rows, masked chunk
  KVCacheConfig w = base(32);
  w.fp16_sinks = 4;
  w.fp16_window = 16;
  out.push_back({"sinks_window", w, 1100, 1, std::nullopt, 0.0f});
  KVCacheConfig dc = w;
  dc.decay_after = 300;
  dc.decay_bits = 2;
  out.push_back({"sinks_window_decay", dc, 1100, 2, std::nullopt, 0.0f});
  KVCacheConfig sp = base(32);
  sp.key_bits = 2;
  sp.n_outlier_channels = 8;
  sp.outlier_bits = 4;
  sp.outlier_roles = OutlierRoles::kKeys;
  sp.fp16_sinks = 4;
  sp.fp16_window = 16;
  out.push_back({"key_split_sinks_window", sp, 1100, 1, std::nullopt, 0.0f});
  out.push_back({"sparse_v", base(64), 1300, 1, std::nullopt, 0.01f});
  return out;
}

}  // namespace

TEST(SplitDecode, ChunksFollowPagesNotThreads) {
  // 1300 tokens on 64-token pages: chunks of kSplitChunkTokens tokens, several of them.
  KVCache c(base(64));
  const size_t n = 1300, d = 32;
  const auto k = gaussian(2 * n * d, 1), v = gaussian(2 * n * d, 2), q = gaussian(4 * d, 3);
  c.append(0, k.data(), v.data(), n);
  RowMask mask = make_row_mask(n, 1, 2, AttentionOptions{});
  std::vector<float> split(2 * d), whole(2 * d), rmax(2), rsum(2);
  HeadTask t;
  t.keys = c.head_codes(0, 0, KVRole::kKey);
  t.values = c.head_codes(0, 0, KVRole::kValue);
  t.n_tokens = n;
  t.queries = q.data();
  t.mask = &mask;
  t.out = split.data();
  t.row_max = rmax.data();
  t.row_sum = rsum.data();
  attend_heads({t}, 2, 0.2f, 0.0f);
  AttentionScratch sc;
  attend_head(t.keys, t.values, n, q.data(), 2, mask, 0.2f, whole.data(), sc);
  for (size_t j = 0; j < 2 * d; ++j) EXPECT_NEAR(split[j], whole[j], 1e-5) << j;
  for (size_t r = 0; r < 2; ++r) {  // merged statistics describe the whole softmax
    EXPECT_FLOAT_EQ(rmax[r], sc.row_max[r]);
    EXPECT_NEAR(rsum[r], sc.row_sum[r], 1e-5 * sc.row_sum[r]);
  }
}

TEST(SplitDecode, ThreadCountIndependentAndExact) {
  for (const Case& cs : cases()) {
    KVCache c(cs.cfg);
    const auto d = static_cast<size_t>(cs.cfg.head_dim);
    const auto Hq = static_cast<size_t>(cs.cfg.n_q_heads), Hkv = static_cast<size_t>(cs.cfg.n_kv_heads);
    const size_t G = Hq / Hkv;
    const auto k = gaussian(Hkv * cs.n * d, 11), v = gaussian(Hkv * cs.n * d, 12);
    c.append(0, k.data(), v.data(), cs.n);
    auto q = gaussian(Hq * cs.T_q * d, 13);
    for (auto& x : q) x *= 2.0f;  // peaked enough for sparse V to skip rows
    AttentionOptions opt;
    opt.window = cs.window;
    opt.sparse_v_threshold = cs.sparse_v;
    std::vector<std::vector<float>> outs;
    for (int threads : {1, 2, 3}) {
      set_num_threads(threads);
      std::vector<float> out(q.size(), -1.0f);
      c.attend(0, q.data(), cs.T_q, out.data(), opt);
      outs.push_back(out);
    }
    set_num_threads(0);
    EXPECT_EQ(outs[0], outs[1]) << cs.name;
    EXPECT_EQ(outs[0], outs[2]) << cs.name;
    // Against exact attention over every token as decoded (sinks, codes, window); sparse V
    // against its dense result, within the skipped weight.
    std::vector<float> dense(q.size());
    if (cs.sparse_v > 0.0f) {
      AttentionOptions dopt = opt;
      dopt.sparse_v_threshold = 0.0f;
      c.attend(0, q.data(), cs.T_q, dense.data(), dopt);
      EXPECT_NE(dense, outs[0]) << cs.name << ": nothing skipped";
    }
    const size_t n = cs.n;
    for (size_t h = 0; h < Hkv; ++h) {
      std::vector<float> K(n * d), V(n * d);
      c.decode_tokens(0, static_cast<int>(h), KVRole::kKey, 0, n, K.data());
      c.decode_tokens(0, static_cast<int>(h), KVRole::kValue, 0, n, V.data());
      for (size_t g = 0; g < G; ++g)
        for (size_t t = 0; t < cs.T_q; ++t) {
          const size_t qh = h * G + g, hi = n - cs.T_q + t;
          const size_t lo = cs.window && hi + 1 > *cs.window ? hi + 1 - *cs.window : 0;
          const float* o = &outs[0][(qh * cs.T_q + t) * d];
          if (cs.sparse_v > 0.0f) {
            double err = 0;
            for (size_t j = 0; j < d; ++j) err = std::max(err, std::abs(double{o[j]} - dense[(qh * cs.T_q + t) * d + j]));
            EXPECT_LT(err, 0.05) << cs.name;
            continue;
          }
          const auto ref = exact_attention(&q[(qh * cs.T_q + t) * d], K.data(), V.data(), d, lo, hi,
                                           1.0 / std::sqrt(static_cast<double>(d)));
          for (size_t j = 0; j < d; ++j)
            ASSERT_NEAR(o[j], ref[j], 1e-4) << cs.name << " head " << qh << " t " << t << " j " << j;
        }
    }
  }
}
