#include "turboquant/serialize.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>

#include "kv_test_util.h"
#include "turboquant/error.h"

using namespace turboquant;
using namespace turboquant::testing;

TEST(Crc32c, StandardCheckValue) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(crc32c("", 0), 0u);
  // Continuation equals one pass.
  EXPECT_EQ(crc32c("6789", 4, crc32c("12345", 5)), 0xE3069283u);
  // RFC 3720 B.4: 32 bytes of zeros.
  std::vector<uint8_t> z(32, 0);
  EXPECT_EQ(crc32c(z.data(), z.size()), 0x8A9136AAu);
}

namespace {
std::unique_ptr<KVCache> small_cache(size_t tokens) {
  KVCacheConfig cfg;
  cfg.head_dim = 16;
  cfg.n_layers = 2;
  cfg.n_q_heads = 2;
  cfg.n_kv_heads = 1;
  cfg.key_bits = 4;
  cfg.value_bits = 2;
  cfg.block_tokens = 2;
  cfg.seed = 9;
  auto c = std::make_unique<KVCache>(cfg);
  const auto x = gaussian(tokens * 16, 70);
  c->append(0, x.data(), x.data(), tokens);
  c->append(1, x.data(), x.data(), tokens / 2);
  return c;
}
}  // namespace

TEST(Serialize, RoundTripKeepsCodesConfigAndAttention) {
  auto c = small_cache(5);
  const auto bytes = serialize_cache(*c);
  auto r = deserialize_cache(bytes.data(), bytes.size());
  EXPECT_EQ(r->size(0), 5u);
  EXPECT_EQ(r->size(1), 2u);
  EXPECT_EQ(r->config().key_bits, 4);
  EXPECT_EQ(r->config().seed, 9u);
  EXPECT_EQ(r->memory_bytes(), c->memory_bytes());
  for (int l = 0; l < 2; ++l)
    for (KVRole role : {KVRole::kKey, KVRole::kValue}) EXPECT_EQ(decoded(*r, l, 0, role), decoded(*c, l, 0, role));
  EXPECT_EQ(serialize_cache(*r), bytes);
  const auto q = gaussian(2 * 16, 71);
  std::vector<float> a(32), b(32);
  c->attend(0, q.data(), 1, a.data());
  r->attend(0, q.data(), 1, b.data());
  EXPECT_EQ(a, b);
  // The loaded cache keeps growing.
  const auto x = gaussian(16, 72);
  r->append(0, x.data(), x.data(), 1);
  EXPECT_EQ(r->size(0), 6u);
}

TEST(Serialize, FileRoundTrip) {
  auto c = small_cache(3);
  const std::string path = ::testing::TempDir() + "tq_cache_roundtrip.tqkv";
  c->save(path);
  auto r = KVCache::load(path);
  EXPECT_EQ(serialize_cache(*r), serialize_cache(*c));
  std::remove(path.c_str());
  EXPECT_THROW(KVCache::load(path), InvalidArgument);
}

TEST(Serialize, EveryTruncationIsAFormatError) {
  const auto bytes = serialize_cache(*small_cache(3));
  for (size_t n = 0; n < bytes.size(); ++n) {
    // A copy of exactly n bytes so that AddressSanitizer sees any read past the end.
    std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_THROW(deserialize_cache(cut.data(), cut.size()), FormatError) << "length " << n;
  }
}

TEST(Serialize, EveryBitFlipIsAFormatError) {
  const auto bytes = serialize_cache(*small_cache(3));
  ASSERT_LT(bytes.size(), 4096u);
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (uint8_t mask : {uint8_t{0x01}, uint8_t{0x80}, uint8_t{0xFF}}) {
      auto bad = bytes;
      bad[i] ^= mask;
      EXPECT_THROW(deserialize_cache(bad.data(), bad.size()), FormatError) << "byte " << i;
    }
  }
  auto extra = bytes;
  extra.push_back(0);
  EXPECT_THROW(deserialize_cache(extra.data(), extra.size()), FormatError);
}

TEST(Serialize, MagicAndVersionErrorsAreClear) {
  auto bytes = serialize_cache(*small_cache(1));
  auto bad = bytes;
  bad[0] = 'X';
  try {
    deserialize_cache(bad.data(), bad.size());
    FAIL();
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("bad magic"), std::string::npos);
  }
  bad = bytes;
  const uint32_t future = kCacheFormatVersion + 1;
  std::memcpy(bad.data() + 8, &future, 4);
  try {
    deserialize_cache(bad.data(), bad.size());
    FAIL();
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("newer than this library supports"), std::string::npos);
  }
}
