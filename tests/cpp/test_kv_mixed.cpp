// Importance-routed mixed precision (KVCacheConfig::mixed_group_blocks / mixed_keep_blocks).
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "corruption_test_util.h"
#include "kv_test_util.h"
#include "turboquant/error.h"
#include "turboquant/half.h"
#include "turboquant/serialize.h"

namespace turboquant {
namespace {

using testing::exact_attention;
using testing::gaussian;

constexpr int kD = 32;

KVCacheConfig mixed_config(int n_kv_heads = 2, int group = 3) {
  KVCacheConfig c;
  c.head_dim = kD;
  c.n_q_heads = n_kv_heads * group;
  c.n_kv_heads = n_kv_heads;
  c.key_bits = 4;
  c.value_bits = 4;
  c.block_tokens = 8;
  c.fp16_window = 16;
  c.fp16_sinks = 2;
  c.norm_correction = true;
  c.decay_bits = 2;
  c.mixed_group_blocks = 2;
  c.mixed_keep_blocks = 1;
  c.seed = 3;
  return c;
}

// Every stored token of one stream in position order, as the cache decodes it.
std::vector<float> all_tokens(const KVCache& kv, int h, KVRole role) {
  const size_t n = kv.size(0);
  std::vector<float> x(n * kD);
  kv.decode_tokens(0, h, role, 0, n, x.data());
  return x;
}

// Attention of the last T_q positions over the decoded tokens (position order), exact.
std::vector<float> reference(const KVCache& kv, const std::vector<float>& q, size_t T_q) {
  const auto& c = kv.config();
  const size_t n = kv.size(0), G = static_cast<size_t>(c.group_size());
  std::vector<float> out(q.size());
  for (int h = 0; h < c.n_kv_heads; ++h) {
    const auto K = all_tokens(kv, h, KVRole::kKey), V = all_tokens(kv, h, KVRole::kValue);
    for (size_t g = 0; g < G; ++g)
      for (size_t t = 0; t < T_q; ++t) {
        const size_t row = (static_cast<size_t>(h) * G + g) * T_q + t;
        const auto o = exact_attention(&q[row * kD], K.data(), V.data(), kD, 0, n - T_q + t,
                                       1.0 / std::sqrt(static_cast<double>(kD)));
        for (size_t j = 0; j < kD; ++j) out[row * kD + j] = static_cast<float>(o[j]);
      }
  }
  return out;
}

void append(KVCache& kv, size_t T, uint64_t seed) {
  const size_t H = static_cast<size_t>(kv.config().n_kv_heads);
  const auto k = gaussian(H * T * kD, seed), v = gaussian(H * T * kD, seed + 1);
  kv.append(0, k.data(), v.data(), T);
}

std::vector<float> attend(const KVCache& kv, size_t T_q, uint64_t seed, float gain = 2.0f) {
  auto q = gaussian(static_cast<size_t>(kv.config().n_q_heads) * T_q * kD, seed);
  for (auto& x : q) x *= gain;
  std::vector<float> out(q.size());
  kv.attend(0, q.data(), T_q, out.data());
  const auto ref = reference(kv, q, T_q);
  for (size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out[i], ref[i], 2e-4) << "element " << i;
  return out;
}

TEST(MixedPrecision, AttentionMatchesTheDecodedTokensInPositionOrder) {
  KVCache kv(mixed_config());
  append(kv, 70, 10);  // prefill: stays fp16 until the next append
  EXPECT_EQ(kv.coded_tokens(0), 2u);
  attend(kv, 70, 11);
  for (uint64_t step = 0; step < 40; ++step) {
    append(kv, 1, 100 + 2 * step);
    attend(kv, 1, 500 + step);
  }
  // 2 sinks + whole groups of 16 coded + a window of at least 16
  const size_t coded = kv.coded_tokens(0) - 2;
  EXPECT_GT(coded, 0u);
  EXPECT_EQ(coded % 16, 0u);
  EXPECT_GE(kv.window_tokens(0), 16u);
  for (int h = 0; h < 2; ++h) {
    auto pos = kv.mixed_positions(0, h);
    std::sort(pos.begin(), pos.end());
    std::vector<size_t> want(coded);
    std::iota(want.begin(), want.end(), size_t{2});
    EXPECT_EQ(pos, want) << "code indices must map onto the coded positions one to one";
    for (size_t b = 0; b < coded / 8; ++b)  // half of the blocks at decay_bits
      EXPECT_EQ(kv.pages(0, h, KVRole::kKey).is_decayed(b), b % 4 == 1 || b % 4 == 2) << "block " << b;
  }
}

TEST(MixedPrecision, KeepsTheMostAttendedTokensAtFullWidth) {
  KVCacheConfig c = mixed_config(1, 1);
  c.fp16_sinks = 0;
  KVCache kv(c);
  // 48 tokens; the query points at the keys of tokens 3, 5, 7, 11, 13, 17, 19 and 23 (the
  // first group is tokens 0..15, the second 16..31): those must keep 4 bits.
  const size_t T = 48;
  auto k = gaussian(T * kD, 1), v = gaussian(T * kD, 2);
  std::vector<float> q(kD, 0.0f);
  const std::vector<size_t> hot = {3, 5, 7, 11, 13, 17, 19, 23};
  for (size_t t : hot) {
    for (size_t j = 0; j < kD; ++j) k[t * kD + j] *= 0.1f;
    k[t * kD + 0] = 6.0f;
  }
  q[0] = 3.0f;
  kv.append(0, k.data(), v.data(), T);
  std::vector<float> out(kD);
  kv.attend(0, q.data(), 1, out.data());
  // Importance: the squared softmax weight of each token (one query row, fp16 keys).
  const auto imp = kv.window_importance(0, 0);
  ASSERT_EQ(imp.size(), T);
  std::vector<double> p(T);
  double z = 0;
  for (size_t t = 0; t < T; ++t) {
    double a = 0;
    for (size_t j = 0; j < kD; ++j) a += static_cast<double>(q[j]) * half_to_float(float_to_half(k[t * kD + j]));
    z += (p[t] = std::exp(a / std::sqrt(static_cast<double>(kD))));
  }
  for (size_t t = 0; t < T; ++t) EXPECT_NEAR(imp[t], std::pow(p[t] / z, 2), 1e-5 * std::pow(p[t] / z, 2) + 1e-9);
  for (size_t t : hot) EXPECT_GT(imp[t], 0.005f) << "token " << t;
  const auto k1 = gaussian(kD, 9);
  kv.append(0, k1.data(), k1.data(), 1);  // flushes the two groups rated above
  ASSERT_EQ(kv.coded_tokens(0), 32u);
  const auto& m = kv.mixed_masks(0, 0);
  ASSERT_EQ(m.size(), 2u);
  for (size_t t : hot) EXPECT_TRUE((m[t / 16] >> (t % 16)) & 1u) << "token " << t << " was not kept";
  EXPECT_EQ(std::popcount(m[0]), 8);
  EXPECT_EQ(std::popcount(m[1]), 8);
  // Kept tokens decode closer than the others (4 vs 2 bits).
  const auto K = all_tokens(kv, 0, KVRole::kValue);
  double err_kept = 0, err_low = 0;
  for (size_t t = 0; t < 32; ++t) {
    double e = 0;
    for (size_t j = 0; j < kD; ++j) e += std::pow(K[t * kD + j] - v[t * kD + j], 2);
    (((m[t / 16] >> (t % 16)) & 1u) ? err_kept : err_low) += e;
  }
  EXPECT_LT(err_kept * 3, err_low);
}

TEST(MixedPrecision, OnlyRatedTokensFlushUnlessTheWindowOverflows) {
  KVCache kv(mixed_config());
  append(kv, 100, 60);  // a converted cache: no attention call yet
  append(kv, 1, 61);
  EXPECT_EQ(kv.coded_tokens(0), 2u) << "unrated tokens must wait for an attention call";
  EXPECT_EQ(kv.rated_tokens(0), 0u);
  attend(kv, 1, 62);  // the first query rates all 101 tokens
  EXPECT_EQ(kv.rated_tokens(0), 101u);
  append(kv, 1, 63);
  EXPECT_EQ(kv.coded_tokens(0), 2u + 80u);  // whole groups of 16 with 16 newer tokens behind
  // Appends without attention: at most kMixedUnratedTokens unrated tokens beyond the
  // window's bound, then the oldest groups flush unrated.
  KVCache raw(mixed_config());
  const size_t big = KVCache::kMixedUnratedTokens + 100;
  append(raw, big, 64);
  EXPECT_EQ(raw.coded_tokens(0), 2u);
  append(raw, 1, 65);
  const size_t window = raw.window_tokens(0);
  EXPECT_LE(window, 16u + 16u + KVCache::kMixedUnratedTokens);
  EXPECT_GE(window, 16u + KVCache::kMixedUnratedTokens);
  attend(raw, 1, 66);
}

TEST(MixedPrecision, MemoryIsCountedExactly) {
  KVCache kv(mixed_config());
  append(kv, 100, 20);
  attend(kv, 100, 21);
  append(kv, 1, 22);
  const auto& c = kv.config();
  size_t want = 0;
  const size_t codes = kv.code_tokens(0), fp16 = kv.size(0) - codes;
  for (int h = 0; h < c.n_kv_heads; ++h) {
    for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
      const HeadCodes hc = kv.head_codes(0, h, role);
      want += codes / 2 * (hc.quantizer->bytes_per_vector() + hc.decayed->bytes_per_vector());
      want += fp16 * kD * 2;
    }
    want += kv.mixed_masks(0, h).size() * 8;
  }
  EXPECT_EQ(kv.token_bytes(0), want);
  // memory_bytes: the pages at their widths, window and sink capacity, masks, importance,
  // and the quantizers' state.
  EXPECT_GT(kv.memory_bytes(), want);
}

TEST(MixedPrecision, SaveLoadKeepsCodesMasksAndImportance) {
  KVCache kv(mixed_config());
  append(kv, 60, 30);
  attend(kv, 60, 31);
  append(kv, 3, 32);
  attend(kv, 3, 33);
  const auto bytes = serialize_cache(kv);
  auto back = deserialize_cache(bytes.data(), bytes.size());
  EXPECT_EQ(back->config().format_version(), 7u);
  EXPECT_EQ(serialize_cache(*back), bytes);
  for (int h = 0; h < 2; ++h) {
    EXPECT_EQ(back->mixed_masks(0, h), kv.mixed_masks(0, h));
    EXPECT_EQ(back->window_importance(0, h), kv.window_importance(0, h));
  }
  EXPECT_EQ(back->rated_tokens(0), kv.rated_tokens(0));
  // Both continue identically (the next flush ranks by the restored importance).
  for (KVCache* c : {&kv, back.get()}) {
    append(*c, 40, 34);
    attend(*c, 40, 35);
    append(*c, 1, 36);
  }
  EXPECT_EQ(serialize_cache(*back), serialize_cache(kv));
}

TEST(MixedPrecision, CachesWithoutCodesOrWindowRoundTrip) {
  // No groups (no masks) and an empty window (no importance): zero-length sections.
  for (size_t T : {size_t{0}, size_t{1}, size_t{2}, size_t{20}}) {
    KVCache kv(mixed_config());
    if (T > 0) append(kv, T, 70);
    const auto bytes = serialize_cache(kv);
    auto back = deserialize_cache(bytes.data(), bytes.size());
    EXPECT_EQ(serialize_cache(*back), bytes) << T << " tokens";
    EXPECT_EQ(back->size(0), T);
  }
}

TEST(MixedPrecision, CorruptedMasksAreFormatErrors) {
  KVCache kv(mixed_config(1, 1));
  append(kv, 40, 40);
  attend(kv, 40, 41);
  append(kv, 1, 42);
  ASSERT_EQ(kv.code_tokens(0), 16u);  // 2 sinks + 38 window tokens: one group flushed
  auto bytes = serialize_cache(kv);
  // The first group's mask: find its 8 bytes and set one more bit.
  const uint64_t m = kv.mixed_masks(0, 0)[0];
  auto it = std::search(bytes.begin(), bytes.end(), reinterpret_cast<const uint8_t*>(&m),
                        reinterpret_cast<const uint8_t*>(&m) + 8);
  ASSERT_NE(it, bytes.end());
  const uint64_t bad = m | (~m & (m + 1));  // one more token kept
  std::copy(reinterpret_cast<const uint8_t*>(&bad), reinterpret_cast<const uint8_t*>(&bad) + 8, it);
  // Re-seal the section that holds it (tag u32, length u64, payload, CRC32C u32), so that
  // the loader's own checks, not the CRC, must find the damage.
  const auto at = static_cast<size_t>(it - bytes.begin());
  for (size_t pos = 16; pos + 16 <= bytes.size();) {
    uint64_t len;
    std::memcpy(&len, bytes.data() + pos + 4, 8);
    if (at >= pos + 12 && at < pos + 12 + len) {
      const uint32_t crc = crc32c(bytes.data() + pos, 12 + static_cast<size_t>(len));
      std::memcpy(bytes.data() + pos + 12 + len, &crc, 4);
      break;
    }
    pos += 12 + static_cast<size_t>(len) + 4;
  }
  try {
    deserialize_cache(bytes.data(), bytes.size());
    ADD_FAILURE() << "a mask keeping 9 of 16 tokens was accepted";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("keeps 9 tokens"), std::string::npos) << e.what();
  }
  const auto good = serialize_cache(kv);
  testing::expect_every_truncation_rejected(good);
  testing::expect_every_byte_flip_rejected(good);
}

TEST(MixedPrecision, RefusesWhatWouldSeePartOfTheCodes) {
  KVCache kv(mixed_config());
  append(kv, 60, 50);
  attend(kv, 60, 51);
  append(kv, 2, 52);
  const size_t n = kv.size(0), coded = kv.coded_tokens(0);
  ASSERT_GT(coded, 2u);
  std::vector<float> q(6 * (n - coded + 2) * kD, 0.5f), out(q.size());
  EXPECT_THROW(kv.attend(0, q.data(), n - coded + 2, out.data()), NotSupported);  // older queries
  AttentionOptions sliding;
  sliding.window = 8;
  EXPECT_THROW(kv.attend(0, q.data(), 1, out.data(), sliding), NotSupported);
  const auto before = serialize_cache(kv);
  EXPECT_THROW(kv.trim(n - coded + 3), NotSupported);  // into the middle of a group
  EXPECT_EQ(serialize_cache(kv), before) << "a refused trim must leave the cache unchanged";
  EXPECT_EQ(kv.trim(n - coded + 16), n - coded + 16);  // one whole group
  EXPECT_EQ(kv.coded_tokens(0), coded - 16);
  EXPECT_EQ(kv.size(0), coded - 16);
  append(kv, 30, 53);
  attend(kv, 30, 54);
}

TEST(MixedPrecision, ConfigErrorsNameTheField) {
  const auto expect = [](KVCacheConfig c, const char* text, bool not_supported = false) {
    try {
      KVCache kv(c);
      ADD_FAILURE() << "accepted: " << text;
    } catch (const NotSupported& e) {
      EXPECT_TRUE(not_supported) << e.what();
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    } catch (const InvalidArgument& e) {
      EXPECT_FALSE(not_supported) << e.what();
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  KVCacheConfig c = mixed_config();
  c.mixed_keep_blocks = 2;
  expect(c, "mixed_keep_blocks");
  c = mixed_config();
  c.fp16_window = 0;
  expect(c, "fp16_window");
  c = mixed_config();
  c.decay_bits = 4;
  expect(c, "decay_bits");
  c = mixed_config();
  c.decay_after = 64;
  expect(c, "temporal decay", true);
  c = mixed_config();
  c.key_method = "turboquant_prod";
  c.norm_correction = false;
  expect(c, "turboquant_mse", true);
  c = mixed_config();
  c.mixed_group_blocks = 0;
  expect(c, "mixed_keep_blocks");
}

}  // namespace
}  // namespace turboquant
