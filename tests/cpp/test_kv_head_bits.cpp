// Per-KV-head bit widths (KVCacheConfig::key_head_bits / value_head_bits / outlier_head_bits).
// The streams of KV head h are those of a uniform cache at head h's widths (same random
// streams), so every per-head result is checked against such a cache, exactly.
#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "corruption_test_util.h"
#include "kv_test_util.h"
#include "turboquant/error.h"
#include "turboquant/kv_cache.h"
#include "turboquant/serialize.h"

using namespace turboquant;
using namespace turboquant::testing;

namespace {
constexpr size_t kD = 32;
constexpr int kH = 3;  // KV heads
constexpr int kG = 2;  // query heads per KV head

KVCacheConfig mixed_config() {
  KVCacheConfig c;
  c.head_dim = static_cast<int>(kD);
  c.n_layers = 2;
  c.n_q_heads = kH * kG;
  c.n_kv_heads = kH;
  c.block_tokens = 4;
  c.seed = 11;
  c.key_head_bits = {2, 4, 3};
  c.value_head_bits = {3, 2, 4};
  return c;
}

// The same cache with every head at head h's widths.
KVCacheConfig uniform_for_head(const KVCacheConfig& mixed, int h) {
  KVCacheConfig c = mixed;
  c.key_bits = mixed.head_key_bits(0, h);
  c.value_bits = mixed.head_value_bits(0, h);
  c.outlier_bits = mixed.head_outlier_bits(0, h);
  c.key_head_bits.clear();
  c.value_head_bits.clear();
  c.outlier_head_bits.clear();
  return c;
}

void append_chunks(KVCache& c, int layer, const std::vector<float>& k, const std::vector<float>& v, size_t T,
                   std::initializer_list<size_t> chunks) {
  size_t t = 0;
  for (size_t n : chunks) {
    std::vector<float> kc(kH * n * kD), vc(kH * n * kD);
    for (size_t h = 0; h < kH; ++h) {
      std::copy_n(&k[(h * T + t) * kD], n * kD, &kc[h * n * kD]);
      std::copy_n(&v[(h * T + t) * kD], n * kD, &vc[h * n * kD]);
    }
    c.append(layer, kc.data(), vc.data(), n);
    t += n;
  }
  ASSERT_EQ(t, T);
}

// Fills a mixed cache and one uniform cache per head with the same tokens; checks that
// attention (decode and prefill-sized query blocks) of each head's query heads, the decoded
// tokens and the stored rows equal the uniform cache's.
void expect_heads_match_uniform(const KVCacheConfig& mixed_cfg) {
  constexpr size_t T = 37;
  const auto k = gaussian(kH * T * kD, 21), v = gaussian(kH * T * kD, 22);
  KVCache mixed(mixed_cfg);
  append_chunks(mixed, 0, k, v, T, {13, 1, 7, 16});
  for (int h = 0; h < kH; ++h) {
    KVCache uni(uniform_for_head(mixed_cfg, h));
    append_chunks(uni, 0, k, v, T, {13, 1, 7, 16});
    ASSERT_EQ(uni.code_tokens(0), mixed.code_tokens(0));
    EXPECT_EQ(mixed.key_quantizer(0, h).bits(), mixed_cfg.head_key_bits(0, h));
    EXPECT_EQ(mixed.key_quantizer(1, h).code_bytes(), uni.key_quantizer(1, h).code_bytes());
    for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
      std::vector<float> a(T * kD), b(T * kD);
      mixed.decode_tokens(0, h, role, 0, T, a.data());
      uni.decode_tokens(0, h, role, 0, T, b.data());
      EXPECT_EQ(a, b) << "head " << h;
      EXPECT_EQ(mixed.decayed_blocks(0, h, role), uni.decayed_blocks(0, h, role));
      // Raw rows at the head's own width (copy_out).
      const size_t n = mixed.code_tokens(0);
      size_t bytes = 0;
      for (size_t t = 0; t < n; ++t) bytes += mixed.block_quantizer(0, h, role, t).code_bytes();
      std::vector<uint8_t> ca(bytes), cb(bytes), na(2 * n), nb(2 * n);
      mixed.copy_out(0, h, role, 0, n, ca.data(), na.data());
      uni.copy_out(0, h, role, 0, n, cb.data(), nb.data());
      EXPECT_EQ(ca, cb);
      EXPECT_EQ(na, nb);
    }
    for (size_t Tq : {size_t{1}, size_t{20}}) {
      const auto q = gaussian(kH * kG * Tq * kD, 23 + Tq);
      std::vector<float> om(q.size()), ou(q.size());
      mixed.attend(0, q.data(), Tq, om.data());
      uni.attend(0, q.data(), Tq, ou.data());
      const size_t lo = static_cast<size_t>(h) * kG * Tq * kD, hi = lo + kG * Tq * kD;
      EXPECT_EQ(std::vector<float>(om.begin() + static_cast<std::ptrdiff_t>(lo), om.begin() + static_cast<std::ptrdiff_t>(hi)),
                std::vector<float>(ou.begin() + static_cast<std::ptrdiff_t>(lo), ou.begin() + static_cast<std::ptrdiff_t>(hi)))
          << "head " << h << ", " << Tq << " queries";
    }
  }
}
}  // namespace

TEST(KVHeadBits, ValidatesLengthsAndRanges) {
  const auto expect_error = [](KVCacheConfig c, const std::string& text) {
    try {
      KVCache k(c);
      ADD_FAILURE() << "accepted: " << text;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  KVCacheConfig c = mixed_config();
  c.key_head_bits = {2, 3};
  expect_error(c, "key_head_bits must be empty, have one entry per KV head (n_kv_heads = 3) or one per layer and "
                  "KV head (n_layers * n_kv_heads = 6), got 2 entries");
  c.key_head_bits = {2, 3, 4, 2, 3, 4, 2};
  expect_error(c, "got 7 entries");
  c.key_head_bits = {2, 3, 4, 2, 9, 4};
  expect_error(c, "key_head_bits[4] must be in [1, 8], got 9");
  c = mixed_config();
  c.value_head_bits = {3, 9, 2};
  expect_error(c, "value_head_bits[1] must be in [1, 8], got 9");
  c.value_head_bits = {0, 2, 2};
  expect_error(c, "value_head_bits[0] must be in [1, 8], got 0");
  c = mixed_config();
  c.outlier_head_bits = {3, 3, 3};
  expect_error(c, "outlier_head_bits needs an outlier split");
  c.n_outlier_channels = 8;
  c.outlier_head_bits = {3, -1, 3};
  expect_error(c, "outlier_head_bits[1] must be in [0, 8] (0 means bits + 1), got -1");
  // Decay below every head's width: heads at 2 bits allow decay_bits 1 only.
  c = mixed_config();
  c.decay_after = 8;
  c.decay_bits = 2;
  expect_error(c, "decay_bits must be in [1, 1]");
  c.decay_bits = 1;
  EXPECT_NO_THROW(KVCache{c});
  // Only one role per head given: the other keeps its uniform width.
  c = mixed_config();
  c.value_head_bits.clear();
  c.value_bits = 4;
  KVCache ok(c);
  EXPECT_EQ(ok.value_quantizer(1, 2).bits(), 4);
  EXPECT_EQ(ok.key_quantizer(1, 2).bits(), 3);
  EXPECT_EQ(ok.config().format_version(), 5u);
}

TEST(KVHeadBits, MemoryAccountingIsExact) {
  KVCache c(mixed_config());
  size_t state = 0;
  for (int l = 0; l < 2; ++l)
    for (int h = 0; h < kH; ++h) state += c.key_quantizer(l, h).state_bytes() + c.value_quantizer(l, h).state_bytes();
  EXPECT_EQ(c.memory_bytes(), state);
  const auto x = gaussian(kH * 10 * kD, 31);
  c.append(0, x.data(), x.data(), 10);  // 3 pages of 4 tokens per stream
  // Row bytes: codes d·bits/8 + a 2-byte norm; key bits {2,4,3}, value bits {3,2,4}.
  size_t rows = 0;
  for (int b : {2, 4, 3, 3, 2, 4}) rows += kD * static_cast<size_t>(b) / 8 + 2;
  EXPECT_EQ(c.memory_bytes(), state + 3 * 4 * rows);
  EXPECT_EQ(c.token_bytes(0), 10 * rows);
  EXPECT_EQ(c.token_bytes(1), 0u);
  EXPECT_EQ(c.fp16_bytes(), 10u * kH * 2 * kD * 2);
  c.trim(7);
  EXPECT_EQ(c.memory_bytes(), state + 1 * 4 * rows);
  EXPECT_EQ(c.token_bytes(0), 3 * rows);
}

TEST(KVHeadBits, AttentionAndCodesEqualUniformCachesPerHead) {
  expect_heads_match_uniform(mixed_config());
}

TEST(KVHeadBits, SinksWindowAndDecayPerHead) {
  KVCacheConfig c = mixed_config();
  c.fp16_sinks = 2;
  c.fp16_window = 6;
  c.decay_after = 8;
  c.decay_bits = 1;
  c.norm_correction = true;
  expect_heads_match_uniform(c);
  KVCache mixed(c);
  const auto x = gaussian(kH * 37 * kD, 32);
  mixed.append(0, x.data(), x.data(), 37);
  EXPECT_GT(mixed.decayed_blocks(0, 1, KVRole::kKey), 0u);
}

TEST(KVHeadBits, OutlierSplitPerHead) {
  KVCacheConfig c = mixed_config();
  c.n_outlier_channels = 8;
  c.outlier_roles = OutlierRoles::kKeys;
  c.outlier_head_bits = {4, 0, 5};  // head 1: its key bits + 1
  KVCache k(c);
  EXPECT_EQ(k.key_quantizer(0, 0).code_bytes(), 1 + (8 * 4 + 24 * 2) / 8u);  // 8-bit angle
  EXPECT_EQ(k.key_quantizer(0, 1).code_bytes(), 1 + (8 * 5 + 24 * 4) / 8u);
  expect_heads_match_uniform(c);
  c.decay_after = 8;
  c.decay_bits = 1;
  expect_heads_match_uniform(c);
}

TEST(KVHeadBits, AttentionIsCloseToExact) {
  // A sanity bound on the mixed cache itself: every query head's output is near exact
  // attention over the fp32 tokens, better for the heads with more bits.
  KVCacheConfig cfg = mixed_config();
  cfg.head_dim = 64;
  cfg.key_head_bits = {2, 4, 3};
  cfg.value_head_bits = {2, 4, 3};
  KVCache c(cfg);
  constexpr size_t T = 24, d = 64;
  const auto k = gaussian(kH * T * d, 41), v = gaussian(kH * T * d, 42);
  c.append(0, k.data(), v.data(), T);
  const auto q = gaussian(kH * kG * d, 43);
  std::vector<float> out(q.size());
  c.attend(0, q.data(), 1, out.data());
  double cos_by_head[kH] = {};
  for (int h = 0; h < kH; ++h) {
    for (int g = 0; g < kG; ++g) {
      const size_t qh = static_cast<size_t>(h * kG + g);
      const auto ref = exact_attention(&q[qh * d], &k[static_cast<size_t>(h) * T * d],
                                       &v[static_cast<size_t>(h) * T * d], d, 0, T - 1, 1.0 / std::sqrt(64.0));
      cos_by_head[h] += cosine(ref, &out[qh * d]) / kG;
    }
  }
  EXPECT_GT(cos_by_head[0], 0.80);
  EXPECT_GT(cos_by_head[1], 0.99);
  EXPECT_GT(cos_by_head[2], 0.95);
  EXPECT_GT(cos_by_head[1], cos_by_head[0]);
}

TEST(KVHeadBits, AppendEncodedCopiesRowsOfEveryWidth) {
  KVCacheConfig cfg = mixed_config();
  KVCache a(cfg), b(cfg);
  constexpr size_t T = 10;
  const auto x = gaussian(kH * T * kD, 51);
  a.append(0, x.data(), x.data(), T);
  std::vector<std::vector<uint8_t>> codes(2 * kH), norms(2 * kH);
  std::vector<const uint8_t*> cp(2 * kH), np(2 * kH);
  for (int h = 0; h < kH; ++h)
    for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
      const size_t s = static_cast<size_t>(h) * 2 + static_cast<size_t>(role);
      const Quantizer& q = role == KVRole::kKey ? a.key_quantizer(0, h) : a.value_quantizer(0, h);
      codes[s].resize(T * q.code_bytes());
      norms[s].resize(T * q.norm_bytes());
      a.copy_out(0, h, role, 0, T, codes[s].data(), norms[s].data());
      cp[s] = codes[s].data();
      np[s] = norms[s].data();
    }
  b.append_encoded(0, T, cp, np);
  EXPECT_EQ(serialize_cache(a, true), serialize_cache(b, true));
}

namespace {
std::unique_ptr<KVCache> small_mixed(size_t tokens, bool windowed) {
  KVCacheConfig cfg;
  cfg.head_dim = 16;
  cfg.n_layers = 1;
  cfg.n_q_heads = 2;
  cfg.n_kv_heads = 2;
  cfg.block_tokens = 2;
  cfg.seed = 3;
  cfg.key_head_bits = {2, 4};
  cfg.value_head_bits = {3, 1};
  if (windowed) {
    cfg.fp16_sinks = 1;
    cfg.fp16_window = 2;
    cfg.decay_after = 2;
    cfg.decay_bits = 1;
    cfg.value_head_bits = {3, 2};
  }
  auto c = std::make_unique<KVCache>(cfg);
  const auto x = gaussian(2 * tokens * 16, 60);
  c->append(0, x.data(), x.data(), tokens);
  return c;
}

// Offset of the per-head fields: the last 3 lists of CONF's payload (key, value, outlier).
size_t conf_end(const std::vector<uint8_t>& bytes) {
  uint64_t len = 0;
  std::memcpy(&len, bytes.data() + 20, 8);
  return 16 + 12 + static_cast<size_t>(len);
}

void refresh_conf_crc(std::vector<uint8_t>& bytes) {
  const size_t end = conf_end(bytes);
  const uint32_t crc = crc32c(bytes.data() + 16, end - 16);
  std::memcpy(bytes.data() + end, &crc, 4);
}
}  // namespace

TEST(KVHeadBits, SerializesAsVersion5AndRoundTrips) {
  for (bool windowed : {false, true}) {
    auto c = small_mixed(9, windowed);
    const auto bytes = serialize_cache(*c, true);
    ASSERT_EQ(bytes[8], 5u);
    auto r = deserialize_cache(bytes.data(), bytes.size());
    EXPECT_EQ(r->config().key_head_bits, c->config().key_head_bits);
    EXPECT_EQ(r->config().value_head_bits, c->config().value_head_bits);
    EXPECT_TRUE(r->config().outlier_head_bits.empty());
    EXPECT_EQ(serialize_cache(*r, true), bytes);
    EXPECT_EQ(r->memory_bytes(), c->memory_bytes());
    const auto q = gaussian(2 * 16, 61);
    std::vector<float> oa(32), ob(32);
    c->attend(0, q.data(), 1, oa.data());
    r->attend(0, q.data(), 1, ob.data());
    EXPECT_EQ(oa, ob);
    // Both keep growing identically.
    const auto x = gaussian(2 * 3 * 16, 62);
    c->append(0, x.data(), x.data(), 3);
    r->append(0, x.data(), x.data(), 3);
    EXPECT_EQ(serialize_cache(*r, true), serialize_cache(*c, true));
  }
  // Without per-head widths nothing changes: the oldest version that holds the rest.
  KVCacheConfig plain = small_mixed(0, false)->config();
  plain.key_head_bits.clear();
  plain.value_head_bits.clear();
  EXPECT_EQ(serialize_cache(KVCache(plain), true)[8], 1u);
  plain.fp16_window = 2;
  EXPECT_EQ(serialize_cache(KVCache(plain), true)[8], 2u);
}

TEST(KVHeadBits, Version5EveryCorruptionIsAFormatError) {
  const auto bytes = serialize_cache(*small_mixed(3, false), true);
  ASSERT_EQ(bytes[8], 5u);
  ASSERT_LT(bytes.size(), 4096u);
  expect_every_truncation_rejected(bytes);
  expect_every_byte_flip_rejected(bytes);
}

TEST(KVHeadBits, InvalidPerHeadFieldsInAFileAreFormatErrors) {
  const auto bytes = serialize_cache(*small_mixed(3, false), true);
  // CONF ends with: u32 2, i32 2, i32 4 (keys) | u32 2, i32 3, i32 1 (values) | u32 0.
  const size_t end = conf_end(bytes), key_list = end - 4 - 12 - 12, value_list = end - 4 - 12;
  const auto get = [&](size_t at) {
    int32_t v = 0;
    std::memcpy(&v, bytes.data() + at, 4);
    return v;
  };
  ASSERT_EQ(get(key_list), 2);
  ASSERT_EQ(get(key_list + 8), 4);
  ASSERT_EQ(get(value_list + 4), 3);
  ASSERT_EQ(get(end - 4), 0);
  const auto expect_rejected = [&](size_t at, int32_t value, const std::string& text) {
    auto b = bytes;
    std::memcpy(b.data() + at, &value, 4);
    refresh_conf_crc(b);  // a well-formed file that says something invalid
    try {
      deserialize_cache(b.data(), b.size());
      ADD_FAILURE() << text;
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  expect_rejected(key_list + 8, 9, "key_head_bits[1] must be in [1, 8], got 9");
  expect_rejected(value_list + 4, 0, "value_head_bits[0] must be in [1, 8], got 0");
  expect_rejected(value_list, 3, "value_head_bits has 3 entries (must be 0 or n_kv_heads = 2)");
  expect_rejected(end - 4, 1, "outlier_head_bits has 1 entries");
  // A different (valid) width: the codes no longer fit the layer.
  expect_rejected(key_list + 8, 3, "corrupted file: layer 0 claims 3 tokens");
  // Empty lists in a version-5 file: nothing per-head, never written.
  {
    auto b = bytes;
    // 28 bytes of lists become three zero counts (12 bytes).
    b.erase(b.begin() + static_cast<std::ptrdiff_t>(key_list + 12), b.begin() + static_cast<std::ptrdiff_t>(end));
    const uint32_t zero = 0;
    for (size_t i = 0; i < 3; ++i) std::memcpy(b.data() + key_list + 4 * i, &zero, 4);
    uint64_t len = 0;
    std::memcpy(&len, b.data() + 20, 8);
    len -= 16;
    std::memcpy(b.data() + 20, &len, 8);
    refresh_conf_crc(b);
    try {
      deserialize_cache(b.data(), b.size());
      ADD_FAILURE() << "version 5 without per-head fields accepted";
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find("version 5 without per-head bit widths"), std::string::npos)
          << e.what();
    }
  }
  // The unchanged file still loads (the offsets and CRC helper are right).
  auto same = bytes;
  refresh_conf_crc(same);
  EXPECT_EQ(same, bytes);
  EXPECT_NO_THROW(deserialize_cache(same.data(), same.size()));
}

// Per-layer, per-head widths (n_layers × n_kv_heads entries, layer-major): layer l's head h
// is layer 0's head h of a cache with one width list, namely layer l's (same streams
// except for the layer index, so the check is against a cache of the same layer count).
TEST(KVHeadBits, PerLayerWidthsEqualOneListPerLayer) {
  KVCacheConfig cfg = mixed_config();  // 2 layers, 3 KV heads
  cfg.key_head_bits = {2, 4, 3, 4, 3, 2};
  cfg.value_head_bits = {3, 2, 4};      // one list for every layer
  cfg.fp16_sinks = 1;
  cfg.fp16_window = 4;
  KVCache mixed(cfg);
  EXPECT_EQ(cfg.format_version(), 6u);
  constexpr size_t T = 21;
  const auto k = gaussian(kH * T * kD, 71), v = gaussian(kH * T * kD, 72);
  for (int l = 0; l < 2; ++l) {
    KVCacheConfig one = cfg;
    one.key_head_bits.assign(cfg.key_head_bits.begin() + l * kH, cfg.key_head_bits.begin() + (l + 1) * kH);
    KVCache per_layer(one);
    EXPECT_EQ(one.format_version(), 5u);
    for (int h = 0; h < kH; ++h) {
      EXPECT_EQ(mixed.key_quantizer(l, h).bits(), cfg.key_head_bits[static_cast<size_t>(l * kH + h)]);
      EXPECT_EQ(mixed.value_quantizer(l, h).bits(), cfg.value_head_bits[static_cast<size_t>(h)]);
    }
    append_chunks(mixed, l, k, v, T, {9, 1, 11});
    append_chunks(per_layer, l, k, v, T, {9, 1, 11});
    for (size_t Tq : {size_t{1}, size_t{5}}) {
      const auto q = gaussian(kH * kG * Tq * kD, 73 + Tq);
      std::vector<float> a(q.size()), b(q.size());
      mixed.attend(l, q.data(), Tq, a.data());
      per_layer.attend(l, q.data(), Tq, b.data());
      EXPECT_EQ(a, b) << "layer " << l << ", " << Tq << " queries";
    }
  }
  // Decay is checked against the least width over every layer and head.
  cfg.decay_after = 8;
  cfg.decay_bits = 2;
  try {
    KVCache bad(cfg);
    ADD_FAILURE() << "decay_bits 2 accepted with a 2-bit head in layer 1";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("decay_bits must be in [1, 1]"), std::string::npos) << e.what();
  }
}

// Temporal decay re-quantizes each stream with its own layer's widths: a head whose width
// differs between layers decays as in a cache with that layer's list (stateful property test
// finding: the code->code plans were built from layer 0's widths for every layer).
TEST(KVHeadBits, PerLayerWidthsDecayWithTheirOwnLayersWidths) {
  KVCacheConfig cfg = mixed_config();  // 2 layers, 3 KV heads
  cfg.key_head_bits = {2, 4, 3, 4, 3, 2};
  cfg.value_head_bits = {3, 2, 4, 2, 4, 3};
  cfg.decay_after = 4;
  cfg.decay_bits = 1;
  for (int outliers : {0, 1}) {
    cfg.n_outlier_channels = outliers;
    KVCache mixed(cfg);
    constexpr size_t T = 29;
    const auto k = gaussian(kH * T * kD, 81), v = gaussian(kH * T * kD, 82);
    for (int l = 0; l < 2; ++l) {
      KVCacheConfig one = cfg;
      one.key_head_bits.assign(cfg.key_head_bits.begin() + l * kH, cfg.key_head_bits.begin() + (l + 1) * kH);
      one.value_head_bits.assign(cfg.value_head_bits.begin() + l * kH, cfg.value_head_bits.begin() + (l + 1) * kH);
      KVCache per_layer(one);
      append_chunks(mixed, l, k, v, T, {9, 1, 19});
      append_chunks(per_layer, l, k, v, T, {9, 1, 19});
      for (int h = 0; h < kH; ++h)
        for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
          ASSERT_GT(mixed.decayed_blocks(l, h, role), 0u);
          std::vector<float> a(T * kD), b(T * kD);
          mixed.decode_tokens(l, h, role, 0, T, a.data());
          per_layer.decode_tokens(l, h, role, 0, T, b.data());
          EXPECT_EQ(a, b) << "layer " << l << ", head " << h << ", outliers " << outliers;
        }
    }
  }
}

TEST(KVHeadBits, PerLayerWidthsSerializeAsVersion6) {
  KVCacheConfig cfg = mixed_config();
  cfg.key_head_bits = {2, 4, 3, 4, 3, 2};
  KVCache c(cfg);
  const auto x = gaussian(kH * 9 * kD, 81);
  c.append(0, x.data(), x.data(), 9);
  c.append(1, x.data(), x.data(), 9);
  const auto bytes = serialize_cache(c, true);
  ASSERT_EQ(bytes[8], 6u);
  auto r = deserialize_cache(bytes.data(), bytes.size());
  EXPECT_EQ(r->config().key_head_bits, cfg.key_head_bits);
  EXPECT_EQ(serialize_cache(*r, true), bytes);
  for (int l = 0; l < 2; ++l)
    for (int h = 0; h < kH; ++h) EXPECT_EQ(r->key_quantizer(l, h).bits(), c.key_quantizer(l, h).bits());
  ASSERT_LT(bytes.size(), 8192u);
  expect_every_truncation_rejected(bytes);
  expect_every_byte_flip_rejected(bytes);
  // The same bytes labelled version 5 (whose lists have n_kv_heads entries) are refused.
  auto v5 = bytes;
  v5[8] = 5;  // the file header carries no CRC: the version-5 reader judges the lists
  try {
    deserialize_cache(v5.data(), v5.size());
    ADD_FAILURE() << "a per-layer list accepted in a version-5 file";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("key_head_bits has 6 entries (must be 0 or n_kv_heads = 3)"),
              std::string::npos)
        << e.what();
  }
}
