// The segment plans (cache/segment_plan.h): their answers alone, and against what a
// KVCache does over random appends, attention calls, trims and truncations.
#include "turboquant/cache/segment_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <random>
#include <vector>

#include "kv_test_util.h"
#include "turboquant/error.h"
#include "turboquant/kv_cache.h"

using namespace turboquant;
using namespace turboquant::testing;

namespace {

SegmentPlan::Rules plain_rules(size_t sinks, size_t window, size_t bt) {
  SegmentPlan::Rules r;
  r.fp16_sinks = sinks;
  r.fp16_window = window;
  r.block_tokens = bt;
  r.windowed = sinks > 0 || window > 0;
  return r;
}

SegmentPlan::Rules mixed_rules() {
  auto r = plain_rules(2, 16, 8);
  r.mixed_group_blocks = 2;
  r.mixed_keep_blocks = 1;
  return r;
}

SegmentSizes sizes(size_t sinks, size_t codes, size_t window, size_t rated = 0) {
  SegmentSizes s;
  s.sinks = sinks;
  s.codes = codes;
  s.window = window;
  s.rated = rated;
  return s;
}

TEST(SegmentPlan, UnwindowedEncodesEveryToken) {
  const SegmentPlan plan(plain_rules(0, 0, 8));
  const auto p = plan.append(sizes(0, 5, 0), 7);
  EXPECT_EQ(p.direct, 7u);
  EXPECT_EQ(p.sinks + p.window + p.flushes, 0u);
  EXPECT_EQ(p.after, sizes(0, 12, 0));
  const auto c = plan.cut(p.after, 3);
  EXPECT_EQ(c.after, sizes(0, 3, 0));
  EXPECT_EQ(c.codes_released, 9u);
  EXPECT_FALSE(c.window_freed);
}

TEST(SegmentPlan, PlainFlushWholeBlocksOldestFirst) {
  const SegmentPlan plan(plain_rules(0, 8, 4));
  EXPECT_EQ(plan.window_rows(), 12u);
  // The window holds up to fp16_window + block_tokens = 12 tokens.
  EXPECT_EQ(plan.append(sizes(0, 0, 0), 12).flushes, 0u);
  auto p = plan.append(sizes(0, 0, 12), 1);  // 13 > 12: one block
  EXPECT_EQ(p.flushes, 1u);
  EXPECT_EQ(p.piece, 4u);
  EXPECT_EQ(p.after, sizes(0, 4, 9));
  p = plan.append(sizes(0, 0, 0), 30);  // 30 -> whole blocks until at most 12 remain: 5 blocks
  EXPECT_EQ(p.flushes, 5u);
  EXPECT_EQ(p.after, sizes(0, 20, 10));
  EXPECT_EQ(plan.due_flushes(sizes(0, 0, 12), 0), 0u);
  EXPECT_EQ(plan.due_flushes(sizes(0, 0, 16), 0), 1u);
  EXPECT_EQ(plan.due_flushes(sizes(0, 0, 17), 0), 2u);
}

TEST(SegmentPlan, SinksFillFirst) {
  const SegmentPlan plan(plain_rules(3, 4, 4));
  auto p = plan.append(sizes(0, 0, 0), 2);
  EXPECT_EQ(p.sinks, 2u);
  EXPECT_EQ(p.window, 0u);
  EXPECT_EQ(p.after, sizes(2, 0, 0));
  p = plan.append(p.after, 12);  // 1 sink, 11 window tokens: 11 > 8, one block
  EXPECT_EQ(p.sinks, 1u);
  EXPECT_EQ(p.window, 11u);
  EXPECT_EQ(p.flushes, 1u);
  EXPECT_EQ(p.after, sizes(3, 4, 7));
  EXPECT_EQ(plan.sizes(14, 7), sizes(3, 4, 7));
  EXPECT_EQ(plan.sizes(2, 2), sizes(2, 0, 0));
}

TEST(SegmentPlan, Fp16LayerNeverFlushes) {
  auto r = plain_rules(3, 4, 4);
  r.fp16_layer = true;
  const SegmentPlan plan(r);
  EXPECT_EQ(plan.sink_base(), 0u);
  const auto p = plan.append(sizes(0, 0, 0), 100);
  EXPECT_EQ(p.sinks, 0u);
  EXPECT_EQ(p.flushes, 0u);
  EXPECT_EQ(p.after, sizes(0, 0, 100));
}

// quiet_tokens(s) is the run of one-token appends append() itself sends to the window with
// no sink and no flush, from every layer state of a few plans (none for mixed precision).
TEST(SegmentPlan, QuietTokensAreTheAppendsWithNoSinkAndNoFlush) {
  for (const auto& r : {plain_rules(4, 8, 4), plain_rules(0, 6, 4), plain_rules(2, 0, 3),
                        plain_rules(0, 0, 4), mixed_rules()}) {
    const SegmentPlan plan(r);
    for (size_t sinks = 0; sinks <= r.fp16_sinks; ++sinks) {
      for (size_t window = 0; window <= r.fp16_window + 2 * r.block_tokens + 1; ++window) {
        if (window > 0 && sinks < plan.sink_base()) continue;  // the window waits for the sinks
        const SegmentSizes start = sizes(sinks, sinks == plan.sink_base() ? 8 : 0, window);
        size_t run = 0;
        for (SegmentSizes s = start; run < 1000; ++run) {
          const AppendPlan p = plan.append(s, 1);
          if (p.sinks != 0 || p.flushes != 0 || !r.windowed) break;
          s = p.after;
        }
        // mixed precision: none promised (a rating can make a group due at any step)
        EXPECT_EQ(plan.quiet_tokens(start), plan.mixed() ? 0u : run)
            << "sinks " << sinks << " window " << window << " mixed " << plan.mixed();
      }
    }
  }
  auto r = plain_rules(3, 4, 4);
  r.fp16_layer = true;
  EXPECT_EQ(SegmentPlan(r).quiet_tokens(sizes(0, 0, 50)), std::numeric_limits<size_t>::max());
}

TEST(SegmentPlan, MixedGroupsFlushOnceRated) {
  const SegmentPlan plan(mixed_rules());  // groups of 16 tokens, fp16_window 16
  EXPECT_EQ(plan.flush_tokens(), 16u);
  EXPECT_EQ(plan.window_rows(), 32u);
  // 2 sinks + 40 window tokens, unrated: nothing flushes.
  auto p = plan.append(sizes(2, 0, 0), 40);
  EXPECT_EQ(p.flushes, 0u);
  // Rated up to the append's end: one group (16 + 16 newer fit in 40, 32 + 16 do not).
  p = plan.append(sizes(2, 0, 40, 42), 1);
  EXPECT_EQ(p.flushes, 1u);
  EXPECT_EQ(p.after, sizes(2, 16, 25, 42));
  // Rated only partly: the groups ending within the rated tokens.
  EXPECT_EQ(plan.due_flushes(sizes(2, 0, 80, 34), 1), 2u);
  EXPECT_EQ(plan.due_flushes(sizes(2, 0, 80, 33), 1), 1u);
  // Unrated: only beyond kUnratedTokens more than the bound besides the latest append.
  const size_t bound = 16 + 16 + SegmentPlan::kUnratedTokens;
  EXPECT_EQ(plan.due_flushes(sizes(2, 0, bound + 5, 0), 6), 0u);
  EXPECT_EQ(plan.due_flushes(sizes(2, 0, bound + 5, 0), 5), 1u);
  EXPECT_EQ(plan.low_codes(48), 24u);
}

TEST(SegmentPlan, Cuts) {
  const SegmentPlan plan(mixed_rules());
  const auto s = sizes(2, 32, 20, 54);
  auto c = plan.cut(s, 60);  // no more than held: nothing
  EXPECT_EQ(c.after, s);
  c = plan.cut(s, 40);  // inside the window
  EXPECT_EQ(c.after, sizes(2, 32, 6, 40));
  EXPECT_EQ(c.window_released, 14u);
  EXPECT_FALSE(c.window_freed);
  c = plan.cut(s, 18);  // a group boundary of the codes: the window empties
  EXPECT_EQ(c.after, sizes(2, 16, 0, 18));
  EXPECT_EQ(c.codes_released, 16u);
  EXPECT_FALSE(c.splits_group);
  EXPECT_TRUE(plan.cut(s, 20).splits_group);
  EXPECT_THROW(plan.check_cut(s, 20, 0), NotSupported);
  EXPECT_NO_THROW(plan.check_cut(s, 18, 0));
  c = plan.cut(s, 1);  // into the sinks: the window's capacity goes too
  EXPECT_EQ(c.after, sizes(1, 0, 0, 1));
  EXPECT_TRUE(c.window_freed);
  EXPECT_FALSE(c.sinks_freed);
  EXPECT_FALSE(c.splits_group);
  c = plan.cut(s, 0);
  EXPECT_EQ(c.after, sizes(0, 0, 0, 0));
  EXPECT_TRUE(c.sinks_freed);
}

TEST(SegmentPlan, RefusesBadRules) {
  EXPECT_THROW(SegmentPlan(plain_rules(0, 4, 0)), InvalidArgument);
  auto r = plain_rules(0, 0, 8);
  r.fp16_window = 4;  // not windowed
  EXPECT_THROW(SegmentPlan{r}, InvalidArgument);
  r = mixed_rules();
  r.mixed_keep_blocks = 3;
  EXPECT_THROW(SegmentPlan{r}, InvalidArgument);
}

// The cache's sizes of layer l as the plan sees them.
SegmentSizes cache_sizes(const KVCache& kv, int l) {
  const SegmentPlan plan(kv.config(), static_cast<size_t>(l));
  const auto s = plan.sizes(kv.size(l), kv.coded_tokens(l), kv.rated_tokens(l));
  EXPECT_EQ(s.sinks, kv.sink_tokens(l));
  EXPECT_EQ(s.codes, kv.code_tokens(l));
  return s;
}

// Random appends, attention calls (mixed precision: they rate the window), trims and
// truncations; after each, every layer's sizes are those its plan predicted.
void follow_plans(const KVCacheConfig& c, uint64_t seed) {
  KVCache kv(c);
  std::mt19937_64 rng(seed);
  const auto d = static_cast<size_t>(c.head_dim);
  for (int step = 0; step < 60; ++step) {
    const auto op = rng() % 8;
    std::vector<SegmentSizes> expect;
    if (op < 5) {  // append to one layer
      const int l = static_cast<int>(rng() % static_cast<uint64_t>(c.n_layers));
      const size_t T = op == 0 ? 1 + rng() % 40 : 1 + rng() % 3;
      const SegmentPlan plan(c, static_cast<size_t>(l));
      const auto p = plan.append(cache_sizes(kv, l), T);
      const auto x = gaussian(static_cast<size_t>(c.n_kv_heads) * T * d, seed * 1000 + static_cast<uint64_t>(step));
      kv.append(l, x.data(), x.data(), T);
      EXPECT_EQ(cache_sizes(kv, l), p.after) << "append of " << T << " at step " << step;
      EXPECT_EQ(p.sinks + p.window + p.direct, T);
    } else if (op == 5) {  // attend: rates the window (mixed precision)
      const int l = static_cast<int>(rng() % static_cast<uint64_t>(c.n_layers));
      if (kv.size(l) == 0) continue;
      const auto q = gaussian(static_cast<size_t>(c.n_q_heads) * d, seed + static_cast<uint64_t>(step));
      std::vector<float> out(q.size());
      kv.attend(l, q.data(), 1, out.data());
      if (c.mixed()) {
        EXPECT_EQ(kv.rated_tokens(l), kv.size(l));
      }
    } else {  // trim or truncate every layer
      const bool trim = op == 6;
      const size_t n = rng() % 48;
      std::vector<SegmentSizes> before;
      bool refused = false;  // a cut of any layer splits a flush group: nothing changes
      for (int l = 0; l < c.n_layers; ++l) {
        const SegmentPlan plan(c, static_cast<size_t>(l));
        before.push_back(cache_sizes(kv, l));
        const auto cut = plan.cut(before.back(), trim ? before.back().size() - std::min(n, before.back().size()) : n);
        expect.push_back(cut.after);
        refused = refused || cut.splits_group;
      }
      if (refused) {
        if (trim) {
          EXPECT_THROW(kv.trim(n), NotSupported);
        } else {
          EXPECT_THROW(kv.truncate(n), NotSupported);
        }
        expect = before;
      } else if (trim) {
        kv.trim(n);
      } else {
        kv.truncate(n);
      }
      for (int l = 0; l < c.n_layers; ++l)
        EXPECT_EQ(cache_sizes(kv, l), expect[static_cast<size_t>(l)]) << (trim ? "trim " : "truncate ") << n;
    }
  }
}

KVCacheConfig base_config() {
  KVCacheConfig c;
  c.head_dim = 16;
  c.n_layers = 2;
  c.n_q_heads = 2;
  c.n_kv_heads = 1;
  c.key_bits = 3;
  c.value_bits = 3;
  c.block_tokens = 4;
  c.seed = 5;
  return c;
}

TEST(SegmentPlan, FollowsTheCache) {
  std::vector<KVCacheConfig> configs;
  configs.push_back(base_config());
  auto c = base_config();
  c.fp16_window = 6;
  configs.push_back(c);
  c.fp16_sinks = 3;
  configs.push_back(c);
  c.fp16_layers = {1};
  configs.push_back(c);
  c = base_config();
  c.fp16_sinks = 2;
  configs.push_back(c);
  c = base_config();
  c.key_bits = c.value_bits = 4;
  c.fp16_window = 5;
  c.fp16_sinks = 2;
  c.decay_bits = 2;
  c.mixed_group_blocks = 2;
  c.mixed_keep_blocks = 1;
  configs.push_back(c);
  for (size_t i = 0; i < configs.size(); ++i)
    for (uint64_t seed = 1; seed <= 3; ++seed) {
      SCOPED_TRACE(::testing::Message() << "config " << i << " seed " << seed);
      follow_plans(configs[i], seed);
    }
}

}  // namespace

TEST(SegmentPlan, CompactMovesTheWholeWindowOfAPlainLayer) {
  const SegmentPlan plain(plain_rules(4, 10, 16));
  const CompactPlan c = plain.compact(sizes(4, 32, 23));
  EXPECT_EQ(c.tokens, 23u);
  EXPECT_TRUE(c.window_freed);
  EXPECT_EQ(c.after, sizes(4, 55, 0));
  // An empty window gives its capacity back too; appends then go on from unaligned codes.
  EXPECT_TRUE(plain.compact(sizes(4, 55, 0)).window_freed);
  EXPECT_EQ(plain.compact(sizes(4, 55, 0)).tokens, 0u);
  const AppendPlan a = plain.append(c.after, 30);  // window 30 > 10 + 16: one block flushes
  EXPECT_EQ(a.flushes, 1u);
  EXPECT_EQ(a.after, sizes(4, 71, 14));
  // Mixed precision, fp16 and unwindowed layers keep what they hold.
  const SegmentPlan mixed(mixed_rules());
  EXPECT_FALSE(mixed.compact(sizes(2, 16, 20)).window_freed);
  EXPECT_EQ(mixed.compact(sizes(2, 16, 20)).after, sizes(2, 16, 20));
  auto r = plain_rules(0, 0, 16);
  r.windowed = true;
  r.fp16_layer = true;
  const SegmentPlan fp16(r);
  EXPECT_EQ(fp16.compact(sizes(0, 0, 40)).tokens, 0u);
  EXPECT_FALSE(fp16.compact(sizes(0, 0, 40)).window_freed);
  const SegmentPlan unwindowed(plain_rules(0, 0, 16));
  EXPECT_EQ(unwindowed.compact(sizes(0, 40, 0)).after, sizes(0, 40, 0));
  EXPECT_FALSE(unwindowed.compact(sizes(0, 40, 0)).window_freed);
}
