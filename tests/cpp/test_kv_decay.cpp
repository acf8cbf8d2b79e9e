// fp16 attention sinks and temporal decay of the KV cache (kv_cache.h, kv_cache_decay.cpp).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>

#include "kv_test_util.h"
#include "turboquant/error.h"
#include "turboquant/packing.h"
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
  const auto bytes = serialize_cache(c);
  ASSERT_EQ(bytes[8], 3u);
  auto r = deserialize_cache(bytes.data(), bytes.size());
  EXPECT_EQ(serialize_cache(*r), bytes);
  EXPECT_EQ(r->memory_bytes(), c.memory_bytes());
  EXPECT_EQ(r->sink_tokens(0), 1u);
  EXPECT_EQ(r->evicted_tokens(0), c.evicted_tokens(0));
  EXPECT_EQ(r->decayed_blocks(0, 0, KVRole::kValue), c.decayed_blocks(0, 0, KVRole::kValue));
  for (size_t n = 0; n < bytes.size(); ++n) {
    std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_THROW(deserialize_cache(cut.data(), cut.size()), FormatError) << "length " << n;
  }
  ASSERT_LT(bytes.size(), 4096u);
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (uint8_t mask : {uint8_t{0x01}, uint8_t{0x80}, uint8_t{0xFF}}) {
      auto bad = bytes;
      bad[i] ^= mask;
      EXPECT_THROW(deserialize_cache(bad.data(), bad.size()), FormatError) << "byte " << i;
    }
  }
  // Both caches keep growing identically.
  const auto y = gaussian(5 * 16, 4);
  c.append(0, y.data(), y.data(), 5);
  r->append(0, y.data(), y.data(), 5);
  EXPECT_EQ(serialize_cache(*r), serialize_cache(c));
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
  cfg.n_outlier_channels = 4;
  EXPECT_THROW(KVCache{cfg}, NotSupported);
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
  EXPECT_EQ(serialize_cache(plain)[8], 1u);
  KVCache win(decay_config(0, 4, 0));
  append_tokens(win, 9, 3);
  EXPECT_EQ(serialize_cache(win)[8], 2u);
  EXPECT_EQ(win.sink_tokens(0), 0u);
  EXPECT_EQ(win.code_tokens(0), win.coded_tokens(0));
}
