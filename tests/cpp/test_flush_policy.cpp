// Flush policies (cache/flush_policy.h): plain (cache/plain_flush.h) and importance-routed
// mixed precision (cache/mixed_precision.h), driven on the cache's parts directly.
#include "turboquant/cache/flush_policy.h"

#include <gtest/gtest.h>

#include <bit>
#include <vector>

#include "cache_parts_test_util.h"
#include "kv_test_util.h"
#include "turboquant/cache/mixed_precision.h"
#include "turboquant/cache/plain_flush.h"
#include "turboquant/error.h"
#include "turboquant/half.h"

using namespace turboquant;
using namespace turboquant::testing;

namespace {
KVCacheConfig window_config() {
  KVCacheConfig c = small_cache_config(9);
  c.fp16_window = 8;
  return c;
}

struct Parts : PartsFixture {
  using PartsFixture::PartsFixture;
  // Appends n fp16-rounded rows to layer 0's window (both streams); returns them as fp32.
  std::vector<float> grow(size_t n, uint64_t seed) {
    const size_t d = segments.head_dim;
    const auto x = gaussian(n * d, seed);
    std::vector<float> rounded(n * d);
    std::vector<uint16_t> rows(2 * n * d);
    for (size_t s = 0; s < 2; ++s)
      for (size_t j = 0; j < n * d; ++j) {
        rows[s * n * d + j] = float_to_half(x[j]);
        rounded[j] = half_to_float(rows[s * n * d + j]);
      }
    segments.append_rows(0, rows.data(), n, 0);
    return rounded;
  }
};
}  // namespace

TEST(PlainFlush, MovesTheOldestBlocksInPositionOrder) {
  Parts p(window_config());
  PlainFlush flush(p.view());
  EXPECT_EQ(p.segments.plan(0).flush_tokens(), 8u);
  const auto x = p.grow(30, 1);
  flush.flush(0, 30);
  // The window keeps at most fp16_window + block_tokens = 16 rows: 30 -> 2 blocks flushed.
  EXPECT_EQ(p.segments.coded[0], 16u);
  EXPECT_EQ(p.segments.window[0].size(), 14u * 32);
  const Quantizer& q = p.table.at(0);
  std::vector<uint8_t> codes(16 * q.code_bytes()), norms(16 * q.norm_bytes());
  p.store.copy_out(0, 0, 16, codes.data(), norms.data());
  std::vector<uint8_t> direct(codes.size()), dnorms(norms.size());
  q.encode(x.data(), 16, direct.data(), dnorms.data());
  EXPECT_EQ(codes, direct);
  EXPECT_TRUE(flush.positional());
  EXPECT_EQ(flush.code_index(0, 0, 5), 5u);
  // No state of its own: no masks accepted, no refusals.
  const std::vector<const uint64_t*> masks(1, nullptr);
  EXPECT_THROW(flush.check_encoded(0, 0, 8, nullptr, &masks), InvalidArgument);
  EXPECT_NO_THROW(flush.check_attend(0, 30, 1, size_t{3}, true));
}

TEST(MixedPrecisionFlush, KeepsTheMostImportantTokensAtFullWidth) {
  KVCacheConfig c = window_config();
  c.key_bits = 4;
  c.value_bits = 4;
  c.mixed_group_blocks = 2;
  c.mixed_keep_blocks = 1;
  c.decay_bits = 2;
  Parts p(c);
  MixedPrecisionFlush flush(p.view(), c.mixed_precision());
  EXPECT_EQ(p.segments.plan(0).flush_tokens(), 16u);
  p.grow(24, 2);
  flush.window_grown(0);
  ASSERT_EQ(flush.importance(0, 0).size(), 24u);
  flush.flush(0, 24);  // unrated: nothing flushes
  EXPECT_EQ(p.segments.coded[0], 0u);
  // Rate the odd tokens of the first group above the even ones.
  std::vector<float> w(24, 0.0f);
  for (size_t t = 1; t < 16; t += 2) w[t] = 1.0f;
  flush.attended(0, 24);
  flush.rate(0, 0, w.data(), 24);
  EXPECT_EQ(flush.rated(0), 24u);
  flush.flush(0, 0);
  ASSERT_EQ(p.segments.coded[0], 16u);
  ASSERT_EQ(flush.masks(0, 0).size(), flush.mask_words());
  EXPECT_EQ(flush.masks(0, 0)[0], 0xAAAAu);  // the odd tokens kept
  EXPECT_EQ(std::popcount(flush.masks(0, 0)[0]), 8);
  // Group 0 holds the kept tokens first (full width), then the others (decay_bits).
  EXPECT_FALSE(p.store[0].is_decayed(0));
  EXPECT_TRUE(p.store[0].is_decayed(1));
  EXPECT_FALSE(flush.positional());
  EXPECT_EQ(flush.code_index(0, 0, 1), 0u);  // token 1 is the first kept one
  EXPECT_EQ(flush.code_index(0, 0, 0), 8u);  // token 0 the first of the others
  EXPECT_EQ(flush.importance(0, 0).size(), 8u);
  // Refusals: a sliding window, causal queries older than a code, a cut inside a group.
  EXPECT_THROW(flush.check_attend(0, 24, 1, size_t{4}, true), NotSupported);
  EXPECT_THROW(flush.check_attend(0, 24, 20, std::nullopt, true), NotSupported);
  EXPECT_NO_THROW(flush.check_attend(0, 24, 1, std::nullopt, true));
  EXPECT_THROW(flush.check_cut(0, 10), NotSupported);
  EXPECT_NO_THROW(flush.check_cut(0, 16));
  EXPECT_NO_THROW(flush.check_cut(0, 0));
  EXPECT_EQ(flush.layer_bytes(0), flush.mask_words() * 8);
}

TEST(FlushPolicy, MadeFromTheConfig) {
  Parts plain(window_config());
  EXPECT_NE(dynamic_cast<PlainFlush*>(make_flush_policy(plain.view(), plain.config.mixed_precision()).get()), nullptr);
  KVCacheConfig c = window_config();
  c.mixed_group_blocks = 2;
  c.mixed_keep_blocks = 1;
  c.decay_bits = 2;
  Parts mixed(c);
  EXPECT_NE(dynamic_cast<MixedPrecisionFlush*>(make_flush_policy(mixed.view(), c.mixed_precision()).get()), nullptr);
}
