// fp16 attention sinks and temporal decay of the KV cache (kv_cache.h, cache/temporal_decay.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>

#include "corruption_test_util.h"
#include "kv_test_util.h"
#include "turboquant/error.h"
#include "turboquant/packing.h"
#include "turboquant/quantizer_outlier.h"
#include "turboquant/serialize.h"

using namespace turboquant;
using namespace turboquant::testing;

namespace {
KVCacheConfig decay_config(size_t sinks, size_t window, size_t after) {
  KVCacheConfig c;
  c.head_dim = 32;
  c.n_layers = 1;
  c.n_q_heads = 4;
  c.n_kv_heads = 2;
  c.key_bits = 3;
  c.value_bits = 3;
  c.block_tokens = 8;
  c.seed = 21;
  c.fp16_sinks = sinks;
  c.fp16_window = window;
  c.decay_after = after;
  c.decay_bits = after ? 2 : 0;
  return c;
}

void append_tokens(KVCache& c, size_t T, uint64_t seed) {
  const auto x = gaussian(2 * T * 32, seed);
  const auto y = gaussian(2 * T * 32, seed + 1000);
  c.append(0, x.data(), y.data(), T);
}

std::vector<float> all_tokens(const KVCache& c, int head, KVRole role) {
  std::vector<float> out(c.size(0) * 32);
  c.decode_tokens(0, head, role, 0, c.size(0), out.data());
  return out;
}

// memory_bytes() from the layout: quantizer state (of an empty cache), code pages at each
// block's bits, fp16 norms, sink rows and the window's fixed capacity.
size_t expected_memory(const KVCache& c, size_t empty_bytes) {
  const auto& cf = c.config();
  const size_t d = 32, bt = cf.block_tokens;
  size_t total = empty_bytes;
  for (int h = 0; h < cf.n_kv_heads; ++h)
    for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
      const PagedCodes& p = c.pages(0, h, role);
      const size_t blocks = (c.code_tokens(0) + bt - 1) / bt;
      EXPECT_EQ(p.code_blocks.size(), blocks);
      const size_t dec = c.decayed_blocks(0, h, role);
      total += dec * bt * packed_bytes(d, cf.decay_bits) + (blocks - dec) * bt * packed_bytes(d, 3);
      total += blocks * bt * 2;
      if (c.sink_tokens(0) > 0) total += cf.fp16_sinks * d * 2;
      if (c.size(0) > cf.fp16_sinks && cf.windowed()) total += (cf.fp16_window + bt) * d * 2;
    }
  return total;
}
}  // namespace

TEST(KVDecay, LutMapsEveryIndexToTheNearestLowerBitCentroid) {
  KVCache c(decay_config(0, 0, 8));
  KVCache plain(decay_config(0, 0, 0));
  append_tokens(c, 40, 5);
  append_tokens(plain, 40, 5);
  // Blocks whose newest token has >= 8 newer tokens: [0,8), [8,16), [16,24), [24,32).
  EXPECT_EQ(c.decayed_blocks(0, 0, KVRole::kKey), 4u);
  EXPECT_EQ(c.decayed_blocks(0, 1, KVRole::kValue), 4u);
  const auto& mq = dynamic_cast<const MseQuantizer&>(plain.key_quantizer(0, 0));
  const auto& small = coordinate_codebook(32, 2);
  std::vector<uint8_t> a(32), b(32);
  for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
    const PagedCodes& pd = c.pages(0, 1, role);
    const PagedCodes& pp = plain.pages(0, 1, role);
    for (size_t blk = 0; blk < 5; ++blk) {
      for (size_t t = 0; t < 8; ++t) {
        const bool dec = blk < 4;
        unpack_indices(pp.code_blocks[blk].get() + t * packed_bytes(32, 3), 32, 3, a.data());
        unpack_indices(pd.code_blocks[blk].get() + t * packed_bytes(32, dec ? 2 : 3), 32, dec ? 2 : 3,
                       b.data());
        for (size_t j = 0; j < 32; ++j) {
          if (!dec) {
            ASSERT_EQ(a[j], b[j]);
            continue;
          }
          const float x = mq.codebook().centroids[a[j]];
          float best = 1e30f;
          for (float cc : small.centroids) best = std::min(best, std::fabs(cc - x));
          ASSERT_FLOAT_EQ(std::fabs(small.centroids[b[j]] - x), best);
        }
        // Norms are untouched.
        ASSERT_EQ(std::memcmp(pd.norm_blocks[blk].get() + t * 2, pp.norm_blocks[blk].get() + t * 2, 2), 0);
      }
    }
  }
  EXPECT_EQ(c.memory_bytes(), expected_memory(c, KVCache(decay_config(0, 0, 8)).memory_bytes()));
  // Pages only (the decayed quantizers' own rotation state is counted separately above).
  EXPECT_LT(c.memory_bytes() - KVCache(decay_config(0, 0, 8)).memory_bytes(),
            plain.memory_bytes() - KVCache(decay_config(0, 0, 0)).memory_bytes());
}

TEST(KVDecay, SinksWindowDecayAttentionMatchesExactOverDecodedTokens) {
  KVCache c(decay_config(3, 10, 12));
  const size_t empty = KVCache(decay_config(3, 10, 12)).memory_bytes();
  uint64_t seed = 100;
  for (size_t T : {1, 1, 2, 1, 30, 1, 1, 1, 5, 64, 1}) {
    append_tokens(c, T, seed++);
    EXPECT_EQ(c.sink_tokens(0), std::min<size_t>(c.size(0), 3));
    EXPECT_EQ(c.memory_bytes(), expected_memory(c, empty));
    const size_t n = c.size(0);
    for (size_t T_q : {size_t{1}, std::min<size_t>(n, 9)}) {  // decode hooks and GEMM (2*9 >= 16 rows)
      for (bool causal : {true, false}) {
        AttentionOptions o;
        o.causal = causal;
        if (T_q > 1) o.window = 20;
        const auto q = gaussian(4 * T_q * 32, seed + 7);
        std::vector<float> out(4 * T_q * 32);
        c.attend(0, q.data(), T_q, out.data(), o);
        for (int qh = 0; qh < 4; ++qh) {
          const auto K = all_tokens(c, qh / 2, KVRole::kKey);
          const auto V = all_tokens(c, qh / 2, KVRole::kValue);
          for (size_t t = 0; t < T_q; ++t) {
            const size_t hi = causal ? n - T_q + t : n - 1;
            const size_t lo = o.window && hi + 1 > *o.window ? hi + 1 - *o.window : 0;
            const auto ref = exact_attention(&q[(qh * T_q + t) * 32], K.data(), V.data(), 32, lo, hi,
                                             1.0 / std::sqrt(32.0));
            for (size_t j = 0; j < 32; ++j)
              ASSERT_NEAR(out[(qh * T_q + t) * 32 + j], ref[j], 2e-4) << "n " << n << " T_q " << T_q;
          }
        }
      }
    }
  }
  EXPECT_GT(c.decayed_blocks(0, 0, KVRole::kKey), 0u);
}

TEST(KVDecay, TrimAcrossSinksCodesAndDecayedBlocks) {
  KVCache c(decay_config(3, 6, 10));
  const size_t empty = KVCache(decay_config(3, 6, 10)).memory_bytes();
  append_tokens(c, 70, 1);
  const auto before = all_tokens(c, 1, KVRole::kValue);
  for (size_t cut : {3, 5, 9, 17, 20, 32}) {
    const size_t n = c.size(0);
    c.trim(cut);
    ASSERT_EQ(c.size(0), n - std::min(n, cut));
    EXPECT_EQ(c.sink_tokens(0), std::min<size_t>(c.size(0), 3));
    const auto now = all_tokens(c, 1, KVRole::kValue);
    ASSERT_TRUE(std::equal(now.begin(), now.end(), before.begin()));
    EXPECT_EQ(c.memory_bytes(), expected_memory(c, empty));
  }
  EXPECT_EQ(c.size(0), 0u);
  EXPECT_EQ(c.memory_bytes(), empty);
  append_tokens(c, 40, 2);  // grows again
  EXPECT_EQ(c.sink_tokens(0), 3u);
  EXPECT_EQ(c.memory_bytes(), expected_memory(c, empty));
}

// A layer of sinks and window rows only (no codes yet) cut back to its sinks, or a layer
// with a window and no sinks emptied, gives the window's capacity back, as one holding codes
// does (stateful property test finding).
TEST(KVDecay, TrimIntoTheSinksOfALayerWithoutCodesReleasesTheWindow) {
  for (size_t sinks : {3, 0}) {
    KVCacheConfig cfg = decay_config(sinks, 1, 0);
    cfg.block_tokens = 1;
    KVCache c(cfg);
    const size_t empty = KVCache(cfg).memory_bytes();
    append_tokens(c, sinks + 2, 3);
    ASSERT_EQ(c.code_tokens(0), 0u);
    ASSERT_EQ(c.window_tokens(0), 2u);
    c.trim(2);
    EXPECT_EQ(c.size(0), sinks);
    EXPECT_EQ(c.memory_bytes(), expected_memory(c, empty)) << "sinks " << sinks;
    if (sinks == 0) {
      EXPECT_EQ(c.memory_bytes(), empty);
    }
    append_tokens(c, 4, 4);  // the window is reserved again
    EXPECT_EQ(c.memory_bytes(), expected_memory(c, empty)) << "sinks " << sinks;
  }
}

TEST(KVDecay, FileRoundTripAndEveryCorruptionIsAFormatError) {
  KVCacheConfig cfg = decay_config(1, 2, 2);
  cfg.head_dim = 16;
  cfg.n_kv_heads = 1;
  cfg.n_q_heads = 1;
  cfg.block_tokens = 2;
  cfg.max_coded_tokens = 6;  // eviction too: every v3 field is covered
  KVCache c(cfg);
  const auto x = gaussian(13 * 16, 3);
  c.append(0, x.data(), x.data(), 13);
  ASSERT_GT(c.decayed_blocks(0, 0, KVRole::kKey), 0u);
  ASSERT_GT(c.evicted_tokens(0), 0u);
  const auto bytes = serialize_cache(c, true);
  ASSERT_EQ(bytes[8], 3u);
  auto r = deserialize_cache(bytes.data(), bytes.size());
  EXPECT_EQ(serialize_cache(*r, true), bytes);
  EXPECT_EQ(r->memory_bytes(), c.memory_bytes());
  EXPECT_EQ(r->sink_tokens(0), 1u);
  EXPECT_EQ(r->evicted_tokens(0), c.evicted_tokens(0));
  EXPECT_EQ(r->decayed_blocks(0, 0, KVRole::kValue), c.decayed_blocks(0, 0, KVRole::kValue));
  expect_every_truncation_rejected(bytes);
  ASSERT_LT(bytes.size(), 4096u);
  expect_every_byte_flip_rejected(bytes);
  // Both caches keep growing identically.
  const auto y = gaussian(5 * 16, 4);
  c.append(0, y.data(), y.data(), 5);
  r->append(0, y.data(), y.data(), 5);
  EXPECT_EQ(serialize_cache(*r, true), serialize_cache(c, true));
}

TEST(KVDecay, BadArgumentsAreRefused) {
  auto cfg = decay_config(0, 0, 8);
  cfg.decay_bits = 3;
  EXPECT_THROW(KVCache{cfg}, InvalidArgument);
  cfg.decay_bits = 0;
  EXPECT_THROW(KVCache{cfg}, InvalidArgument);
  cfg = decay_config(0, 0, 0);
  cfg.decay_bits = 2;
  EXPECT_THROW(KVCache{cfg}, InvalidArgument);
  cfg = decay_config(0, 0, 8);
  cfg.key_method = "turboquant_prod";
  EXPECT_THROW(KVCache{cfg}, NotSupported);
  cfg = decay_config(0, 0, 8);
  cfg.n_outlier_channels = 16;  // keys 16 channels at 1 bit + 16 at 3: 2 bits, so not above 2
  cfg.key_bits = 1;
  cfg.outlier_bits = 3;
  cfg.outlier_roles = OutlierRoles::kKeys;
  EXPECT_THROW(KVCache{cfg}, InvalidArgument);
  cfg = decay_config(5, 0, 0);
  cfg.max_tokens = 4;
  EXPECT_THROW(KVCache{cfg}, InvalidArgument);
  cfg = decay_config(2, 0, 0);
  cfg.max_coded_tokens = 7;  // below block_tokens
  EXPECT_THROW(KVCache{cfg}, InvalidArgument);
}

TEST(KVDecay, DefaultsWriteTheOldFormats) {
  KVCache plain(decay_config(0, 0, 0));
  append_tokens(plain, 9, 3);
  EXPECT_EQ(serialize_cache(plain, true)[8], 1u);
  KVCache win(decay_config(0, 4, 0));
  append_tokens(win, 9, 3);
  EXPECT_EQ(serialize_cache(win, true)[8], 2u);
  EXPECT_EQ(win.sink_tokens(0), 0u);
  EXPECT_EQ(win.code_tokens(0), win.coded_tokens(0));
}

// Outlier split keys (the mlx-lm "key split"): 16 channels at 4 bits + 16 at 2 = 3 bits per
// coordinate, decaying to 2 as 3 + 1; values plain 3 -> 2.
namespace {
KVCacheConfig split_decay_config(size_t sinks, size_t window, size_t after, bool norm_correction) {
  KVCacheConfig c = decay_config(sinks, window, after);
  c.key_bits = 2;
  c.outlier_bits = 4;
  c.n_outlier_channels = 16;
  c.outlier_roles = OutlierRoles::kKeys;
  c.norm_correction = norm_correction;
  return c;
}
}  // namespace

TEST(KVDecay, SplitReferenceBitsAndDecayedWidths) {
  EXPECT_EQ(decay_reference_bits(32, 2, 16, 4), 3);
  EXPECT_EQ(decay_reference_bits(32, 3, 0, 0), 3);
  EXPECT_EQ(decay_reference_bits(128, 2, 4, 0), 2);  // 4 at 3 + 124 at 2 = 2.03 bits
  EXPECT_EQ(decayed_split_bits(32, 2, 16, 4, 2), (std::array<int, 2>{1, 3}));
  EXPECT_EQ(decayed_split_bits(32, 2, 16, 4, 1), (std::array<int, 2>{1, 2}));  // floor at 1 bit
  EXPECT_EQ(decayed_split_bits(128, 3, 32, 0, 2), (std::array<int, 2>{2, 3}));
  KVCache c(split_decay_config(0, 0, 8, false));
  const auto& k = dynamic_cast<const OutlierSplitQuantizer&>(*c.head_codes(0, 0, KVRole::kKey).decayed);
  EXPECT_EQ(k.part(0).bits(), 3);
  EXPECT_EQ(k.part(1).bits(), 1);
  EXPECT_EQ(c.head_codes(0, 1, KVRole::kValue).decayed->bits(), 2);
}

TEST(KVDecay, SplitPartsMapThroughTheirTablesAngleAndNormCopied) {
  KVCache c(split_decay_config(0, 0, 8, false));
  KVCache plain(split_decay_config(0, 0, 0, false));
  append_tokens(c, 40, 5);
  append_tokens(plain, 40, 5);
  ASSERT_EQ(c.decayed_blocks(0, 1, KVRole::kKey), 4u);
  const auto& from = dynamic_cast<const OutlierSplitQuantizer&>(plain.key_quantizer(0, 1));
  const auto& to = dynamic_cast<const OutlierSplitQuantizer&>(*c.head_codes(0, 1, KVRole::kKey).decayed);
  const size_t angle = from.part_offset(0);
  ASSERT_EQ(to.part_offset(0), angle);
  const size_t full = from.code_bytes(), small = to.code_bytes();
  ASSERT_EQ(small, angle + packed_bytes(16, 3) + packed_bytes(16, 1));
  const PagedCodes& pd = c.pages(0, 1, KVRole::kKey);
  const PagedCodes& pp = plain.pages(0, 1, KVRole::kKey);
  std::vector<uint8_t> a(16), b(16);
  for (size_t blk = 0; blk < 5; ++blk)
    for (size_t t = 0; t < 8; ++t) {
      const bool dec = blk < 4;
      const uint8_t* rp = pp.code_blocks[blk].get() + t * full;
      const uint8_t* rd = pd.code_blocks[blk].get() + t * (dec ? small : full);
      ASSERT_EQ(std::memcmp(pd.norm_blocks[blk].get() + t * 2, pp.norm_blocks[blk].get() + t * 2, 2), 0);
      if (!dec) {
        ASSERT_EQ(std::memcmp(rp, rd, full), 0);
        continue;
      }
      ASSERT_EQ(std::memcmp(rp, rd, angle), 0);  // the angle
      for (size_t p = 0; p < 2; ++p) {
        const auto& fc = dynamic_cast<const MseQuantizer&>(from.part(p)).codebook().centroids;
        const auto& tc = dynamic_cast<const MseQuantizer&>(to.part(p)).codebook().centroids;
        unpack_indices(rp + from.part_offset(p), 16, from.part(p).bits(), a.data());
        unpack_indices(rd + to.part_offset(p), 16, to.part(p).bits(), b.data());
        for (size_t j = 0; j < 16; ++j) {
          float best = 1e30f;
          for (float cc : tc) best = std::min(best, std::fabs(cc - fc[a[j]]));
          ASSERT_FLOAT_EQ(std::fabs(tc[b[j]] - fc[a[j]]), best) << "part " << p;
        }
      }
    }
  // Memory: every block at its own code bytes (keys: split rows; values: packed indices).
  const size_t empty = KVCache(split_decay_config(0, 0, 8, false)).memory_bytes();
  size_t want = empty;
  for (int h = 0; h < 2; ++h) {
    want += 4 * 8 * small + 1 * 8 * full + 5 * 8 * 2;
    want += 4 * 8 * packed_bytes(32, 2) + 1 * 8 * packed_bytes(32, 3) + 5 * 8 * 2;
  }
  EXPECT_EQ(c.memory_bytes(), want);
}

TEST(KVDecay, SplitDecayAttentionMatchesExactOverDecodedTokensAndFileRoundTrip) {
  for (bool nc : {false, true}) {
    KVCache c(split_decay_config(3, 10, 12, nc));
    KVCache ref(split_decay_config(3, 10, 0, nc));  // same codes, never decayed
    uint64_t seed = 300;
    for (size_t T : {1, 2, 30, 1, 5, 64, 1}) {
      const auto x = gaussian(2 * T * 32, seed);
      const auto y = gaussian(2 * T * 32, seed + 1000);
      c.append(0, x.data(), y.data(), T);
      ref.append(0, x.data(), y.data(), T);
      ++seed;
    }
    ASSERT_GT(c.decayed_blocks(0, 0, KVRole::kKey), 0u);
    const size_t n = c.size(0);
    for (size_t T_q : {size_t{1}, size_t{9}}) {
      const auto q = gaussian(4 * T_q * 32, seed + 7);
      std::vector<float> out(4 * T_q * 32);
      c.attend(0, q.data(), T_q, out.data());
      for (int qh = 0; qh < 4; ++qh) {
        const auto K = all_tokens(c, qh / 2, KVRole::kKey);
        const auto V = all_tokens(c, qh / 2, KVRole::kValue);
        for (size_t t = 0; t < T_q; ++t) {
          const auto e = exact_attention(&q[(qh * T_q + t) * 32], K.data(), V.data(), 32, 0, n - T_q + t,
                                         1.0 / std::sqrt(32.0));
          for (size_t j = 0; j < 32; ++j) ASSERT_NEAR(out[(qh * T_q + t) * 32 + j], e[j], 2e-4);
        }
      }
    }
    // Norm correction: a decayed key keeps the norm of its undecayed decode (fp16 norms).
    const auto K = all_tokens(c, 1, KVRole::kKey), K0 = all_tokens(ref, 1, KVRole::kKey);
    double worst = 0.0;
    for (size_t t = 3; t < 3 + 8 * c.decayed_blocks(0, 1, KVRole::kKey); ++t) {
      double a = 0.0, b = 0.0;
      for (size_t j = 0; j < 32; ++j) {
        a += static_cast<double>(K[t * 32 + j]) * K[t * 32 + j];
        b += static_cast<double>(K0[t * 32 + j]) * K0[t * 32 + j];
      }
      worst = std::max(worst, std::fabs(std::sqrt(a / b) - 1.0));
    }
    if (nc)
      EXPECT_LT(worst, 2e-3);
    else
      EXPECT_GT(worst, 1e-2);  // plain decay shrinks (Lloyd-Max) and the test can tell
    const auto bytes = serialize_cache(c, true);
    auto r = deserialize_cache(bytes.data(), bytes.size());
    EXPECT_EQ(serialize_cache(*r, true), bytes);
    EXPECT_EQ(r->memory_bytes(), c.memory_bytes());
    EXPECT_EQ(all_tokens(*r, 1, KVRole::kKey), K);
  }
}
