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

namespace {
// The codes and fp16 norms of one stream's code tokens (no decay: one row size).
std::vector<uint8_t> stream_bytes(const KVCache& c, int layer, int head, KVRole role) {
  const Quantizer& q = role == KVRole::kKey ? c.key_quantizer(layer, head) : c.value_quantizer(layer, head);
  const size_t n = c.code_tokens(layer);
  std::vector<uint8_t> out(n * (q.code_bytes() + q.norm_bytes()));
  c.copy_out(layer, head, role, 0, n, out.data(), out.data() + n * q.code_bytes());
  return out;
}
}  // namespace

TEST(KVCache, KvHeadOffsetEncodesAsTheModelsHeads) {
  // A cache of heads [2, 4) of a 4-head model (a tensor-parallel rank's slice) encodes and
  // attends exactly as those heads of the whole model's cache: same streams, so the same
  // rotations, QJL matrices and outlier-split parts, bit for bit.
  const size_t d = 64, T = 37, Tq = 3;
  for (int variant = 0; variant < 3; ++variant) {
    KVCacheConfig full = small_config(8);
    full.n_kv_heads = 4;
    full.n_q_heads = 8;
    full.seed = 17;
    if (variant == 1) full.key_method = "turboquant_prod";
    if (variant == 2) {
      full.n_outlier_channels = 16;
      full.outlier_roles = OutlierRoles::kKeys;
      full.fp16_window = 8;
      full.fp16_sinks = 2;
      full.norm_correction = true;
    }
    KVCacheConfig part = full;
    part.n_kv_heads = 2;
    part.n_q_heads = 4;
    part.kv_head_offset = 2;
    KVCache whole(full), slice(part);
    EXPECT_EQ(slice.config().kv_head_offset, 2);
    const auto k = gaussian(4 * T * d, 40 + variant), v = gaussian(4 * T * d, 50 + variant);
    const auto q = gaussian(8 * Tq * d, 60 + variant);
    const size_t half = 2 * T * d;  // heads 2, 3 of the head-major K/V
    for (int l = 0; l < 2; ++l) {
      whole.append(l, k.data(), v.data(), T);
      slice.append(l, k.data() + half, v.data() + half, T);
      std::vector<float> out_whole(8 * Tq * d), out_slice(4 * Tq * d);
      whole.attend(l, q.data(), Tq, out_whole.data());
      slice.attend(l, q.data() + 4 * Tq * d, Tq, out_slice.data());  // query heads 4..7
      EXPECT_EQ(out_slice, std::vector<float>(out_whole.begin() + 4 * Tq * d, out_whole.end()))
          << "variant " << variant << " layer " << l;
      for (int h = 0; h < 2; ++h)
        for (KVRole role : {KVRole::kKey, KVRole::kValue}) {
          const Quantizer& a = role == KVRole::kKey ? slice.key_quantizer(l, h) : slice.value_quantizer(l, h);
          const Quantizer& b = role == KVRole::kKey ? whole.key_quantizer(l, 2 + h) : whole.value_quantizer(l, 2 + h);
          EXPECT_EQ(a.config().stream, b.config().stream);
          EXPECT_EQ(a.rotation().parameters(), b.rotation().parameters());
          ASSERT_GT(slice.code_tokens(l), 0u);
          EXPECT_EQ(stream_bytes(slice, l, h, role), stream_bytes(whole, l, 2 + h, role))
              << "variant " << variant << " layer " << l << " head " << h;
        }
    }
    // Without the offset the slice's head 0 would be the model's head 0: other codes.
    part.kv_head_offset = 0;
    KVCache unshifted(part);
    unshifted.append(0, k.data() + half, v.data() + half, T);
    EXPECT_NE(stream_bytes(unshifted, 0, 0, KVRole::kKey), stream_bytes(whole, 0, 2, KVRole::kKey));
  }
}

TEST(KVCache, KvHeadOffsetIsValidated) {
  KVCacheConfig c = small_config();
  for (int bad : {-1, 65535, 1 << 20}) {
    c.kv_head_offset = bad;
    EXPECT_THROW({ try { KVCache k(c); } catch (const InvalidArgument& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("kv_head_offset must be in [0, 65536 - n_kv_heads = 65534]"), std::string::npos) << what;
      EXPECT_NE(what.find("got " + std::to_string(bad)), std::string::npos) << what;
      throw; } }, InvalidArgument);
  }
  c.kv_head_offset = 65534;  // the model's heads 65534 and 65535: the last ones allowed
  KVCache last(c);
  EXPECT_EQ(last.key_quantizer(0, 1).config().stream, kv_stream_id(0, 65535, KVRole::kKey));
}
