#include "turboquant/kv_cache.h"

#include <gtest/gtest.h>

#include "kv_test_util.h"
#include "turboquant/error.h"

using namespace turboquant;
using namespace turboquant::testing;

namespace {
KVCacheConfig small_config(size_t block_tokens = 16) {
  KVCacheConfig c;
  c.head_dim = 64;
  c.n_layers = 2;
  c.n_q_heads = 4;
  c.n_kv_heads = 2;
  c.block_tokens = block_tokens;
  return c;
}
}  // namespace

TEST(KVCache, ValidatesConfig) {
  KVCacheConfig c = small_config();
  c.head_dim = 1000;
  EXPECT_THROW({ try { KVCache k(c); } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("head_dim must be in [16, 512], got 1000"), std::string::npos);
    throw; } }, InvalidArgument);
  c = small_config();
  c.n_q_heads = 3;
  EXPECT_THROW(KVCache{c}, InvalidArgument);
  c = small_config();
  c.key_method = "nope";
  EXPECT_THROW(KVCache{c}, InvalidArgument);
  c = small_config();
  c.block_tokens = 0;
  EXPECT_THROW(KVCache{c}, InvalidArgument);
}

TEST(KVCache, PagesGrowWithoutMovingOldBlocks) {
  KVCache c(small_config(16));
  const size_t d = 64;
  const auto x = gaussian(2 * 100 * d, 1);
  c.append(0, x.data(), x.data(), 10);
  const uint8_t* first = c.pages(0, 1, KVRole::kValue).code_blocks[0].get();
  for (int i = 0; i < 9; ++i) c.append(0, x.data(), x.data(), 10);  // 100 tokens, pages of 16
  EXPECT_EQ(c.size(0), 100u);
  EXPECT_EQ(c.size(1), 0u);
  EXPECT_EQ(c.pages(0, 1, KVRole::kValue).code_blocks.size(), 7u);
  EXPECT_EQ(c.pages(0, 1, KVRole::kValue).code_blocks[0].get(), first);
}

TEST(KVCache, AppendAcrossPageBoundariesMatchesOneShotEncode) {
  // Appending token by token, in odd chunks, and in one block give identical codes.
  const size_t d = 64, T = 53;
  const auto k = gaussian(2 * T * d, 2), v = gaussian(2 * T * d, 3);
  KVCache one(small_config(7)), many(small_config(7));
  one.append(0, k.data(), v.data(), T);
  // Chunked append needs head-major slices per chunk.
  size_t t = 0;
  for (size_t chunk : {1u, 6u, 1u, 13u, 32u}) {
    std::vector<float> kc(2 * chunk * d), vc(2 * chunk * d);
    for (size_t h = 0; h < 2; ++h) {
      std::copy_n(&k[(h * T + t) * d], chunk * d, &kc[h * chunk * d]);
      std::copy_n(&v[(h * T + t) * d], chunk * d, &vc[h * chunk * d]);
    }
    many.append(0, kc.data(), vc.data(), chunk);
    t += chunk;
  }
  ASSERT_EQ(t, T);
  for (int h = 0; h < 2; ++h) {
    for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
      EXPECT_EQ(decoded(one, 0, h, role), decoded(many, 0, h, role));
    }
  }
}

TEST(KVCache, MemoryBytesIsExact) {
  KVCacheConfig cfg = small_config(16);
  cfg.key_bits = 4;
  cfg.value_bits = 2;
  KVCache c(cfg);
  size_t state = 0;
  for (int l = 0; l < 2; ++l)
    for (int h = 0; h < 2; ++h) state += c.key_quantizer(l, h).state_bytes() + c.value_quantizer(l, h).state_bytes();
  // hadamard at d=64: two sign vectors of 64 floats per stream, 8 streams.
  EXPECT_EQ(state, 8u * 2 * 64 * 4);
  EXPECT_EQ(c.memory_bytes(), state);
  const auto x = gaussian(2 * 40 * 64, 4);
  c.append(0, x.data(), x.data(), 40);  // 3 pages of 16 per stream in layer 0
  const size_t key_row = 64 * 4 / 8 + 2, value_row = 64 * 2 / 8 + 2;
  EXPECT_EQ(c.memory_bytes(), state + 2 * 3 * 16 * (key_row + value_row));
  c.append(1, x.data(), x.data(), 1);
  EXPECT_EQ(c.memory_bytes(), state + 2 * 3 * 16 * (key_row + value_row) + 2 * 16 * (key_row + value_row));
  EXPECT_EQ(c.fp16_bytes(), 41u * 2 * 2 * 64 * 2);
}

TEST(KVCache, TrimFreesPagesAndKeepsPrefix) {
  KVCache c(small_config(16));
  const auto x = gaussian(2 * 40 * 64, 5);
  c.append(0, x.data(), x.data(), 40);
  c.append(1, x.data(), x.data(), 5);
  const auto before = decoded(c, 0, 1, KVRole::kKey);
  const size_t mem = c.memory_bytes();
  EXPECT_EQ(c.trim(10), 10u);
  EXPECT_EQ(c.size(0), 30u);
  EXPECT_EQ(c.size(1), 0u);  // shorter layer trimmed to empty
  EXPECT_LT(c.memory_bytes(), mem);
  EXPECT_EQ(c.pages(0, 0, KVRole::kKey).code_blocks.size(), 2u);
  const auto after = decoded(c, 0, 1, KVRole::kKey);
  EXPECT_TRUE(std::equal(after.begin(), after.end(), before.begin()));
  EXPECT_EQ(c.trim(100), 30u);
  EXPECT_EQ(c.size(0), 0u);
  EXPECT_EQ(c.pages(0, 0, KVRole::kKey).code_blocks.size(), 0u);
}

TEST(KVCache, BadInputLeavesCacheUnchanged) {
  KVCacheConfig cfg = small_config(16);
  cfg.max_tokens = 50;
  KVCache c(cfg);
  auto x = gaussian(2 * 40 * 64, 6);
  c.append(0, x.data(), x.data(), 10);
  const size_t mem = c.memory_bytes();
  const auto before = decoded(c, 0, 0, KVRole::kKey);
  x[2 * 30 * 64 - 1] = std::nanf("");  // NaN in head 1 of a 30-token append
  EXPECT_THROW(c.append(0, x.data(), x.data(), 30), InvalidArgument);
  EXPECT_EQ(c.size(0), 10u);
  EXPECT_EQ(c.memory_bytes(), mem);
  EXPECT_EQ(decoded(c, 0, 0, KVRole::kKey), before);
  EXPECT_THROW(c.append(0, x.data(), x.data(), 41), InvalidArgument);  // max_tokens
  EXPECT_THROW(c.append(2, x.data(), x.data(), 1), InvalidArgument);   // bad layer
}

TEST(KVCache, StreamsDifferPerLayerHeadAndRole) {
  KVCache c(small_config());
  const auto p00k = c.key_quantizer(0, 0).rotation().parameters();
  EXPECT_NE(p00k, c.value_quantizer(0, 0).rotation().parameters());
  EXPECT_NE(p00k, c.key_quantizer(0, 1).rotation().parameters());
  EXPECT_NE(p00k, c.key_quantizer(1, 0).rotation().parameters());
  KVCache again(small_config());
  EXPECT_EQ(p00k, again.key_quantizer(0, 0).rotation().parameters());
  EXPECT_EQ(kv_stream_id(3, 5, KVRole::kValue), (uint64_t{3} << 24) | 11u);
}
