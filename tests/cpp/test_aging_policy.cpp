// Aging policies (cache/aging_policy.h): temporal decay (cache/temporal_decay.h) and eviction
// (cache/eviction.h), driven on the cache's parts directly.
#include "turboquant/cache/aging_policy.h"

#include <gtest/gtest.h>

#include <vector>

#include "cache_parts_test_util.h"
#include "kv_test_util.h"
#include "turboquant/cache/eviction.h"
#include "turboquant/cache/temporal_decay.h"
#include "turboquant/error.h"

using namespace turboquant;
using namespace turboquant::testing;

namespace {
KVCacheConfig aging_config() { return small_cache_config(13); }

struct Parts : PartsFixture {
  using PartsFixture::PartsFixture;
  // Encodes n tokens into layer 0's codes (an unwindowed cache).
  void fill(size_t n) {
    const auto x = gaussian(n * 32, 17);
    for (size_t s = 0; s < 2; ++s) {
      store.ensure(s, n);
      store.encode(s, 0, x.data(), n, 32);
    }
    segments.add_codes(0, n - segments.size[0]);
  }
};
}  // namespace

TEST(Eviction, DropsTheOldestBlocksBeyondTheLimit) {
  KVCacheConfig c = aging_config();
  c.max_coded_tokens = 24;
  Parts p(c);
  p.fill(40);
  const uint8_t* third = p.store[0].code_blocks[2].get();
  Eviction e(p.view(), c.aging());
  EXPECT_EQ(e.age(0), 2u);  // 40 - 2 × 8 = 24 code tokens left
  EXPECT_EQ(p.segments.size[0], 24u);
  EXPECT_EQ(e.evicted(0), 16u);
  EXPECT_EQ(p.store[0].code_blocks.size(), 3u);
  EXPECT_EQ(p.store[0].code_blocks[0].get(), third);
  EXPECT_EQ(e.age(0), 0u);
  e.cut(0, 8, 8);
  EXPECT_EQ(e.evicted(0), 16u);
  e.cut(0, 0, 0);  // an emptied layer starts counting again
  EXPECT_EQ(e.evicted(0), 0u);
}

TEST(TemporalDecay, ReQuantizesBlocksOldEnough) {
  KVCacheConfig c = aging_config();
  c.decay_after = 8;
  c.decay_bits = 1;
  Parts p(c);
  p.fill(32);
  TemporalDecay decay(p.view(), c.aging());
  EXPECT_EQ(decay.age(0), 0u);
  // Newest tokens 7, 15, 23 have >= 8 newer tokens behind them; block 3 (newest 31) not.
  for (size_t s = 0; s < 2; ++s) EXPECT_EQ(p.store[s].decayed, (std::vector<uint8_t>{1, 1, 1, 0}));
  // The decayed codes are the nearest decay_bits centroids of the old ones: close to them.
  const Quantizer& full = p.table.at(0);
  const Quantizer& low = *p.table.decayed(0);
  std::vector<float> a(8 * 32), b(8 * 32);
  std::vector<uint8_t> fresh(8 * full.code_bytes()), fnorms(8 * full.norm_bytes());
  const auto x = gaussian(32 * 32, 17);
  full.encode(x.data(), 8, fresh.data(), fnorms.data());
  full.decode(fresh.data(), fnorms.data(), 8, a.data());
  low.decode(p.store[0].code_blocks[0].get(), p.store[0].norm_blocks[0].get(), 8, b.data());
  double dot = 0, aa = 0, bb = 0;
  for (size_t j = 0; j < a.size(); ++j) {
    dot += static_cast<double>(a[j]) * b[j];
    aa += static_cast<double>(a[j]) * a[j];
    bb += static_cast<double>(b[j]) * b[j];
  }
  EXPECT_GT(dot / std::sqrt(aa * bb), 0.7);
  // Codes cut back and blocks dropped in front move the decayed count with them.
  p.store.release(0, 8);
  p.store.release(1, 8);
  p.segments.cut(0, p.segments.plan(0).cut(p.segments.sizes(0), 8));
  decay.cut(0, 8, 8);
  p.fill(32);  // block 0 keeps its flag; blocks 1-3 are fresh full-width codes
  decay.age(0);
  for (size_t s = 0; s < 2; ++s) EXPECT_EQ(p.store.decayed_blocks(s), 3u);
}

TEST(TemporalDecay, PlanMapsEveryIndexToTheNearestCentroid) {
  KVCacheConfig c = aging_config();
  c.decay_after = 8;
  c.decay_bits = 2;
  const QuantizerTable t(c);
  const DecayPlan plan = make_decay_plan(t.at(0), *t.decayed(0));
  ASSERT_EQ(plan.parts.size(), 1u);
  EXPECT_FALSE(plan.split);
  EXPECT_EQ(plan.parts[0].lut.size(), 8u);  // 3 bits -> 2 bits
  for (size_t i = 0; i < 8; ++i) EXPECT_LT(plan.parts[0].lut[i], 4u);
  EXPECT_EQ(plan.parts[0].lut[0], 0u);
  EXPECT_EQ(plan.parts[0].lut[7], 3u);
}

TEST(AgingPolicy, MadeFromTheConfigEvictionFirst) {
  KVCacheConfig c = aging_config();
  EXPECT_TRUE(make_aging_policies(Parts(c).view(), c.aging()).empty());
  c.max_coded_tokens = 16;
  c.decay_after = 8;
  c.decay_bits = 1;
  Parts p(c);
  const auto policies = make_aging_policies(p.view(), c.aging());
  ASSERT_EQ(policies.size(), 2u);
  EXPECT_NE(dynamic_cast<Eviction*>(policies[0].get()), nullptr);
  EXPECT_NE(dynamic_cast<TemporalDecay*>(policies[1].get()), nullptr);
}
