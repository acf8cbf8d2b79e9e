#include "turboquant/serialize.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "fixture_v3_split.h"
#include "corruption_test_util.h"
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

// The byte-at-a-time definition, against which both fast ways are checked.
uint32_t crc32c_bytewise(const uint8_t* p, size_t n, uint32_t crc) {
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int k = 0; k < 8; ++k) crc = (crc & 1u) ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
  }
  return ~crc;
}

TEST(Crc32c, TablesAndHardwareEqualTheDefinition) {
  std::vector<uint8_t> buf(1000);
  uint32_t seed = 12345;
  for (auto& b : buf) b = static_cast<uint8_t>((seed = seed * 1103515245u + 12345u) >> 16);
  const bool hw = detail::crc32c_hardware_available();
  for (size_t start : {0u, 1u, 3u, 7u}) {  // unaligned starts too
    for (size_t n = 0; n + start <= 300; n += (n < 40 ? 1 : 13)) {
      for (uint32_t prev : {0u, 0xE3069283u}) {
        const uint32_t want = crc32c_bytewise(buf.data() + start, n, prev);
        ASSERT_EQ(detail::crc32c_tables(buf.data() + start, n, prev), want) << start << " " << n;
        if (hw) {
          ASSERT_EQ(detail::crc32c_hardware(buf.data() + start, n, prev), want) << start << " " << n;
        }
        ASSERT_EQ(crc32c(buf.data() + start, n, prev), want);
      }
    }
  }
  EXPECT_EQ(detail::crc32c_tables("123456789", 9, 0), 0xE3069283u);
  if (hw) {
    EXPECT_EQ(detail::crc32c_hardware("123456789", 9, 0), 0xE3069283u);
  }
#if defined(__x86_64__)
  EXPECT_EQ(hw, static_cast<bool>(__builtin_cpu_supports("sse4.2")));
#endif
}

namespace {
std::unique_ptr<KVCache> small_cache(size_t tokens, RotationKind rotation = RotationKind::kAuto) {
  KVCacheConfig cfg;
  cfg.rotation = rotation;
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
  const auto bytes = serialize_cache(*c, true);
  auto r = deserialize_cache(bytes.data(), bytes.size());
  EXPECT_EQ(r->size(0), 5u);
  EXPECT_EQ(r->size(1), 2u);
  EXPECT_EQ(r->config().key_bits, 4);
  EXPECT_EQ(r->config().seed, 9u);
  EXPECT_EQ(r->memory_bytes(), c->memory_bytes());
  for (int l = 0; l < 2; ++l)
    for (KVRole role : {KVRole::kKey, KVRole::kValue}) EXPECT_EQ(decoded(*r, l, 0, role), decoded(*c, l, 0, role));
  EXPECT_EQ(serialize_cache(*r, true), bytes);
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
  EXPECT_EQ(serialize_cache(*r, true), serialize_cache(*c, true));
  std::remove(path.c_str());
  EXPECT_THROW(KVCache::load(path), InvalidArgument);
}

TEST(Serialize, EveryTruncationIsAFormatError) {
  const auto bytes = serialize_cache(*small_cache(3), true);
  expect_every_truncation_rejected(bytes);
}

TEST(Serialize, EveryBitFlipIsAFormatError) {
  const auto bytes = serialize_cache(*small_cache(3), true);
  ASSERT_LT(bytes.size(), 4096u);
  expect_every_byte_flip_rejected(bytes);
  auto extra = bytes;
  extra.push_back(0);
  EXPECT_THROW(deserialize_cache(extra.data(), extra.size()), FormatError);
}

TEST(Serialize, Hadamard1RoundTripsAndEveryCorruptionIsAFormatError) {
  auto c = small_cache(5, RotationKind::kHadamard1);
  EXPECT_EQ(c->key_quantizer(1, 0).rotation().kind(), RotationKind::kHadamard1);
  const auto bytes = serialize_cache(*c);
  auto r = deserialize_cache(bytes.data(), bytes.size());
  EXPECT_EQ(r->config().rotation, RotationKind::kHadamard1);
  for (int l = 0; l < 2; ++l)
    for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
      const auto& rq = role == KVRole::kKey ? r->key_quantizer(l, 0) : r->value_quantizer(l, 0);
      const auto& cq = role == KVRole::kKey ? c->key_quantizer(l, 0) : c->value_quantizer(l, 0);
      EXPECT_EQ(rq.rotation().kind(), RotationKind::kHadamard1);
      EXPECT_EQ(rq.rotation().parameters(), cq.rotation().parameters());
      EXPECT_EQ(decoded(*r, l, 0, role), decoded(*c, l, 0, role));
    }
  EXPECT_EQ(serialize_cache(*r), bytes);
  expect_every_truncation_rejected(bytes);
  expect_every_byte_flip_rejected(bytes);
}

TEST(Serialize, MagicAndVersionErrorsAreClear) {
  auto bytes = serialize_cache(*small_cache(1), true);
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

namespace {
// A cache with an outlier split on its keys; angle_bits 8 needs format version 4, 16 is
// written as the oldest version that holds the rest (3 here: outlier_roles = keys).
std::unique_ptr<KVCache> split_cache(int angle_bits, size_t tokens = 5) {
  KVCacheConfig cfg;
  cfg.head_dim = 16;
  cfg.n_layers = 1;
  cfg.n_q_heads = 2;
  cfg.n_kv_heads = 1;
  cfg.key_bits = 2;
  cfg.value_bits = 3;
  cfg.block_tokens = 2;
  cfg.seed = 5;
  cfg.n_outlier_channels = 4;
  cfg.outlier_roles = OutlierRoles::kKeys;
  cfg.split_angle_bits = angle_bits;
  auto c = std::make_unique<KVCache>(cfg);
  const auto x = gaussian(tokens * 16, 80);
  c->append(0, x.data(), x.data(), tokens);
  return c;
}

// Offset of the split_angle_bits field of a version-4 file: the last 4 bytes of CONF's payload.
size_t angle_field_offset(const std::vector<uint8_t>& bytes) {
  uint64_t len = 0;
  std::memcpy(&len, bytes.data() + 16 + 4, 8);  // magic 8, version 4, flags 4, tag 4
  return 16 + 12 + static_cast<size_t>(len) - 4;
}

void refresh_conf_crc(std::vector<uint8_t>& bytes) {
  uint64_t len = 0;
  std::memcpy(&len, bytes.data() + 20, 8);
  const uint32_t crc = crc32c(bytes.data() + 16, 12 + static_cast<size_t>(len));
  std::memcpy(bytes.data() + 16 + 12 + len, &crc, 4);
}

void expect_same_cache(const KVCache& a, const KVCache& b) {
  EXPECT_EQ(a.memory_bytes(), b.memory_bytes());
  for (KVRole role : {KVRole::kKey, KVRole::kValue}) EXPECT_EQ(decoded(a, 0, 0, role), decoded(b, 0, 0, role));
  const auto q = gaussian(2 * 16, 81);
  std::vector<float> oa(32), ob(32);
  a.attend(0, q.data(), 1, oa.data());
  b.attend(0, q.data(), 1, ob.data());
  EXPECT_EQ(oa, ob);
}
}  // namespace

TEST(Serialize, EightBitSplitAngleIsVersion4AndRoundTrips) {
  auto c = split_cache(8);
  EXPECT_EQ(c->key_quantizer(0, 0).code_bytes() + 1, split_cache(16)->key_quantizer(0, 0).code_bytes());
  const auto bytes = serialize_cache(*c, true);
  ASSERT_EQ(bytes[8], 4u);
  EXPECT_EQ(bytes[angle_field_offset(bytes)], 8u);
  auto r = deserialize_cache(bytes.data(), bytes.size());
  EXPECT_EQ(r->config().split_angle_bits, 8);
  EXPECT_EQ(serialize_cache(*r, true), bytes);
  expect_same_cache(*c, *r);
  // Both keep growing identically.
  const auto x = gaussian(3 * 16, 82);
  c->append(0, x.data(), x.data(), 3);
  r->append(0, x.data(), x.data(), 3);
  EXPECT_EQ(serialize_cache(*r, true), serialize_cache(*c, true));
}

TEST(Serialize, SixteenBitSplitAngleKeepsTheOldVersions) {
  auto c = split_cache(16);
  const auto bytes = serialize_cache(*c, true);
  ASSERT_EQ(bytes[8], 3u);  // outlier_roles = keys: version 3, as before version 4 existed
  auto r = deserialize_cache(bytes.data(), bytes.size());
  EXPECT_EQ(r->config().split_angle_bits, 16);
  EXPECT_EQ(serialize_cache(*r, true), bytes);
  expect_same_cache(*c, *r);
  // Roles "both" with no other option: version 1 (16-bit), version 4 (8-bit).
  for (int angle : {16, 8}) {
    KVCacheConfig cfg = c->config();
    cfg.outlier_roles = OutlierRoles::kBoth;
    cfg.split_angle_bits = angle;
    KVCache both(cfg);
    EXPECT_EQ(serialize_cache(both, true)[8], angle == 16 ? 1u : 4u);
  }
  // Without a split the angle width is irrelevant: no version 4.
  EXPECT_EQ(serialize_cache(*small_cache(2), true)[8], 1u);
  auto plain = serialize_cache(*small_cache(2), true);
  EXPECT_EQ(deserialize_cache(plain.data(), plain.size())->config().split_angle_bits, 8);
}

TEST(Serialize, Version4EveryCorruptionIsAFormatError) {
  const auto bytes = serialize_cache(*split_cache(8, 3), true);
  ASSERT_EQ(bytes[8], 4u);
  expect_every_truncation_rejected(bytes);
  ASSERT_LT(bytes.size(), 8192u);
  expect_every_byte_flip_rejected(bytes);
}

TEST(Serialize, BadSplitAngleWidthInAFileIsAFormatError) {
  const auto bytes = serialize_cache(*split_cache(8, 3), true);
  const size_t at = angle_field_offset(bytes);
  for (uint32_t bad : {0u, 4u, 12u, 32u, 0xFFFFFFFFu}) {
    auto b = bytes;
    std::memcpy(b.data() + at, &bad, 4);
    refresh_conf_crc(b);  // a well-formed file that says something invalid
    try {
      deserialize_cache(b.data(), b.size());
      FAIL() << bad;
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find("split_angle_bits " + std::to_string(bad)), std::string::npos)
          << e.what();
    }
  }
  // 16 in a version-4 file is valid in itself but never written (version 3 holds it).
  auto b = bytes;
  const uint32_t sixteen = 16;
  std::memcpy(b.data() + at, &sixteen, 4);
  refresh_conf_crc(b);
  EXPECT_THROW(deserialize_cache(b.data(), b.size()), FormatError);
  // The unchanged file still loads (the offset and CRC helpers are right).
  auto same = bytes;
  refresh_conf_crc(same);
  EXPECT_EQ(same, bytes);
  EXPECT_NO_THROW(deserialize_cache(same.data(), same.size()));
}

// A file written before version 4 existed loads with 16-bit angles, bit-identically, and this
// library writes the same bytes for the same cache configured with split_angle_bits = 16.
TEST(Serialize, FileFromBeforeVersion4LoadsWithSixteenBitAngles) {
  const std::vector<uint8_t> fixture(std::begin(kFixtureV3Split), std::end(kFixtureV3Split));
  ASSERT_EQ(fixture[8], 3u);
  auto r = deserialize_cache(fixture.data(), fixture.size());
  EXPECT_EQ(r->config().split_angle_bits, 16);
  EXPECT_EQ(r->config().outlier_roles, OutlierRoles::kKeys);
  EXPECT_EQ(r->size(0), 5u);
  EXPECT_EQ(serialize_cache(*r, true), fixture);
  auto same = split_cache(16);
  EXPECT_EQ(serialize_cache(*same, true), fixture);
  expect_same_cache(*r, *same);
  // Every corruption of it is still detected.
  for (size_t i = 0; i < fixture.size(); ++i) {
    auto bad = fixture;
    bad[i] ^= 0x01;
    EXPECT_THROW(deserialize_cache(bad.data(), bad.size()), FormatError) << "byte " << i;
  }
}

// Version 8, the section container: what save() writes. One section per configured feature
// (serialize.h); the same cache written as a legacy file loads to the same cache.
namespace {
std::unique_ptr<KVCache> featured_cache(bool split, bool head_bits) {
  KVCacheConfig cfg;
  cfg.head_dim = 16;
  cfg.n_layers = 1;
  cfg.n_q_heads = 2;
  cfg.n_kv_heads = 2;
  cfg.key_bits = 3;
  cfg.value_bits = 2;
  cfg.block_tokens = 2;
  cfg.seed = 4;
  cfg.fp16_window = 3;
  cfg.fp16_sinks = 1;
  cfg.decay_after = 4;
  cfg.decay_bits = 1;
  cfg.norm_correction = !split;
  if (split) {
    cfg.n_outlier_channels = 4;
    cfg.outlier_roles = OutlierRoles::kKeys;
    cfg.decay_after = 0;
    cfg.decay_bits = 0;
  }
  if (head_bits) cfg.value_head_bits = {2, 3};
  auto c = std::make_unique<KVCache>(cfg);
  const auto x = gaussian(2 * 11 * 16, 90);
  c->append(0, x.data(), x.data(), 11);
  return c;
}
}  // namespace

TEST(Serialize, ContainerRoundTripsAndMatchesTheLegacyFile) {
  for (bool split : {false, true})
    for (bool head_bits : {false, true}) {
      auto c = featured_cache(split, head_bits);
      const auto bytes = serialize_cache(*c);
      ASSERT_EQ(bytes[8], kCacheFormatVersion);
      auto r = deserialize_cache(bytes.data(), bytes.size());
      EXPECT_EQ(serialize_cache(*r), bytes);
      const auto legacy = serialize_cache(*c, true);
      EXPECT_EQ(legacy[8], c->config().format_version());
      auto l = deserialize_cache(legacy.data(), legacy.size());
      EXPECT_EQ(serialize_cache(*l), bytes);  // the legacy file re-saves as the same container
      const size_t n = c->size(0);
      ASSERT_EQ(r->size(0), n);
      ASSERT_EQ(l->size(0), n);
      for (int h = 0; h < 2; ++h)
        for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
          std::vector<float> want(n * 16), got_r(n * 16), got_l(n * 16);
          c->decode_tokens(0, h, role, 0, n, want.data());
          r->decode_tokens(0, h, role, 0, n, got_r.data());
          l->decode_tokens(0, h, role, 0, n, got_l.data());
          EXPECT_EQ(got_r, want);
          EXPECT_EQ(got_l, want);
        }
    }
}

TEST(Serialize, ContainerEveryCorruptionIsAFormatError) {
  const auto bytes = serialize_cache(*featured_cache(false, true));
  ASSERT_EQ(bytes[8], kCacheFormatVersion);
  expect_every_truncation_rejected(bytes);
  ASSERT_LT(bytes.size(), 8192u);
  expect_every_byte_flip_rejected(bytes);
}

namespace {
std::unique_ptr<KVCache> offset_cache(int kv_head_offset, bool window) {
  KVCacheConfig cfg;
  cfg.head_dim = 16;
  cfg.n_layers = 2;
  cfg.n_q_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.key_method = "turboquant_prod";  // a QJL matrix drawn from the stream too
  cfg.key_bits = 3;
  cfg.value_bits = 2;
  cfg.block_tokens = 2;
  cfg.seed = 5;
  cfg.kv_head_offset = kv_head_offset;
  if (window) cfg.fp16_window = 3;
  auto c = std::make_unique<KVCache>(cfg);
  const auto x = gaussian(2 * 9 * 16, 95);
  c->append(0, x.data(), x.data(), 9);
  c->append(1, x.data(), x.data(), 9);
  return c;
}

bool has_tag(const std::vector<uint8_t>& bytes, const char* tag) {
  return std::search(bytes.begin(), bytes.end(), tag, tag + 4) != bytes.end();
}
}  // namespace

TEST(Serialize, KvHeadOffsetRoundTripsInItsOwnSection) {
  for (bool window : {false, true}) {
    auto c = offset_cache(3, window);
    const auto bytes = serialize_cache(*c);
    EXPECT_TRUE(has_tag(bytes, "KVHO"));
    auto r = deserialize_cache(bytes.data(), bytes.size());
    EXPECT_EQ(r->config().kv_head_offset, 3);
    EXPECT_EQ(serialize_cache(*r), bytes);
    const auto q = gaussian(4 * 16, 96);
    for (int l = 0; l < 2; ++l) {
      for (int h = 0; h < 2; ++h)
        for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
          const size_t n = c->size(l);
          std::vector<float> want(n * 16), got(n * 16);
          c->decode_tokens(l, h, role, 0, n, want.data());
          r->decode_tokens(l, h, role, 0, n, got.data());
          EXPECT_EQ(got, want);
          const Quantizer& a = role == KVRole::kKey ? r->key_quantizer(l, h) : r->value_quantizer(l, h);
          EXPECT_EQ(a.config().stream, kv_stream_id(static_cast<uint32_t>(l), static_cast<uint32_t>(3 + h), role));
        }
      std::vector<float> a(4 * 16), b(4 * 16);
      c->attend(l, q.data(), 1, a.data());
      r->attend(l, q.data(), 1, b.data());
      EXPECT_EQ(a, b);
    }
    // The reloaded cache keeps encoding with the model's heads' streams.
    const auto x = gaussian(2 * 16, 97);
    c->append(0, x.data(), x.data(), 1);
    r->append(0, x.data(), x.data(), 1);
    EXPECT_EQ(serialize_cache(*r), serialize_cache(*c));
    // Versions 1-7 cannot hold the offset: a legacy save refuses rather than drop it.
    EXPECT_THROW({ try { (void)serialize_cache(*c, true); } catch (const NotSupported& e) {
      EXPECT_NE(std::string(e.what()).find("kv_head_offset 3"), std::string::npos) << e.what();
      throw; } }, NotSupported);
  }
  // Offset 0 writes no section: the file is the one of before the option.
  const auto plain = serialize_cache(*offset_cache(0, false));
  EXPECT_FALSE(has_tag(plain, "KVHO"));
  auto p = deserialize_cache(plain.data(), plain.size());
  EXPECT_EQ(p->config().kv_head_offset, 0);
}

TEST(Serialize, KvHeadOffsetEveryCorruptionIsAFormatError) {
  const auto bytes = serialize_cache(*offset_cache(1, true));
  expect_every_truncation_rejected(bytes);
  ASSERT_LT(bytes.size(), 16384u);
  expect_every_byte_flip_rejected(bytes);
}

// KVCache::copy: the cache load(save()) gives (same file bytes, decoded tokens, attention,
// decay and split included), sharing the source's quantizers until a rotation is replaced.
TEST(Serialize, CopyEqualsTheFileRoundTripAndSharesQuantizers) {
  for (bool split : {false, true}) {
    auto c = featured_cache(split, true);
    const auto bytes = serialize_cache(*c);
    auto d = c->copy();
    EXPECT_EQ(serialize_cache(*d), bytes);
    EXPECT_EQ(d->memory_bytes(), c->memory_bytes());
    EXPECT_EQ(&d->key_quantizer(0, 1), &c->key_quantizer(0, 1));  // shared, not built again
    const auto q = gaussian(2 * 3 * 16, 91);
    std::vector<float> a(q.size()), b(q.size());
    c->attend(0, q.data(), 3, a.data());
    d->attend(0, q.data(), 3, b.data());
    EXPECT_EQ(a, b);
    // Independent: the copy grows (decaying and flushing its window), the source stays.
    const auto x = gaussian(2 * 9 * 16, 92);
    d->append(0, x.data(), x.data(), 9);
    EXPECT_EQ(serialize_cache(*c), bytes);
    c->append(0, x.data(), x.data(), 9);
    EXPECT_EQ(serialize_cache(*c), serialize_cache(*d));
  }
  // A rotation replaced in the copy (an empty cache: set_rotation needs an empty layer) is
  // the copy's alone; the source keeps its quantizer and rotation. With decay (a decayed
  // quantizer sharing the rotation) and with the key split (the outlier split's quantizer).
  for (bool split : {false, true}) {
    KVCacheConfig cfg;
    cfg.head_dim = 16;
    cfg.n_q_heads = 2;
    cfg.n_kv_heads = 1;
    cfg.block_tokens = 2;
    if (split) {
      cfg.n_outlier_channels = 4;
      cfg.outlier_roles = OutlierRoles::kKeys;
    } else {
      cfg.decay_after = 4;
      cfg.decay_bits = 1;
    }
    const KVRole role = split ? KVRole::kKey : KVRole::kValue;
    KVCache src(cfg);
    const auto before = serialize_cache(src);
    auto cp = src.copy();
    const auto quantizer = [role](const KVCache& c) -> const Quantizer* {
      return role == KVRole::kKey ? &c.key_quantizer(0, 0) : &c.value_quantizer(0, 0);
    };
    const Quantizer* shared = quantizer(src);
    ASSERT_EQ(quantizer(*cp), shared);
    const auto rotation = [&] {
      if (!split) return Rotation::create(RotationKind::kDense, 16, 123, 7);
      // an outlier split takes only the rotation its seed and channels give: its own, again
      const Rotation& r = src.key_quantizer(0, 0).rotation();
      return Rotation::from_parameters(r.kind(), 16, r.parameters());
    };
    const auto want = rotation()->parameters();
    cp->set_rotation(0, 0, role, rotation());
    EXPECT_NE(quantizer(*cp), shared);
    EXPECT_EQ(quantizer(src), shared);
    EXPECT_EQ(serialize_cache(src), before);
    EXPECT_EQ(quantizer(*cp)->rotation().parameters(), want);
    if (!split) {
      EXPECT_NE(quantizer(src)->rotation().parameters(), want);
    }
    // The copy's quantizers follow its new rotation: equal to a fresh cache given it.
    KVCache fresh(cfg);
    fresh.set_rotation(0, 0, role, rotation());
    const auto x = gaussian(6 * 16, 93);
    cp->append(0, x.data(), x.data(), 6);
    fresh.append(0, x.data(), x.data(), 6);
    EXPECT_EQ(serialize_cache(*cp), serialize_cache(fresh));
  }
}
