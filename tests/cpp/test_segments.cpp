// The segments (cache/segments.h): the fp16 rows and sizes of each layer, changed only by
// their own methods, each applying what a layer's plan (cache/segment_plan.h) decided.
#include "turboquant/cache/segments.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "cache_parts_test_util.h"

using namespace turboquant;
using namespace turboquant::testing;

namespace {

constexpr size_t kD = 32;  // small_cache_config's head_dim, one KV head: 2 streams

// One layer of 4 fp16 sinks, an 8-token window and 8-token blocks, plus an fp16 layer.
KVCacheConfig sink_window_config() {
  KVCacheConfig c = small_cache_config(5);
  c.n_layers = 2;
  c.fp16_sinks = 4;
  c.fp16_window = 8;
  c.fp16_layers = {1};
  return c;
}

Segments make_segments(const KVCacheConfig& c) { return Segments(c.shape(), c.segments(), c.mixed_precision()); }

// T tokens of both streams (stream-major), token t of stream s holding the value 1000·s + t
// (base added) in every coordinate.
std::vector<uint16_t> rows(size_t T, uint16_t base = 0) {
  std::vector<uint16_t> r(2 * T * kD);
  for (size_t s = 0; s < 2; ++s)
    for (size_t t = 0; t < T; ++t)
      for (size_t j = 0; j < kD; ++j) r[(s * T + t) * kD + j] = static_cast<uint16_t>(base + 1000 * s + t);
  return r;
}

// The tokens a stream's rows hold, one value per row.
std::vector<uint16_t> tokens(const std::vector<uint16_t>& v) {
  std::vector<uint16_t> t;
  for (size_t i = 0; i < v.size(); i += kD) t.push_back(v[i]);
  return t;
}

}  // namespace

TEST(Segments, EachLayerHasItsPlan) {
  const Segments seg = make_segments(sink_window_config());
  EXPECT_EQ(seg.plan(0).sink_base(), 4u);
  EXPECT_EQ(seg.plan(0).window_rows(), 16u);
  EXPECT_EQ(seg.plan(1).sink_base(), 0u);  // the fp16 layer holds no sinks
  EXPECT_EQ(seg.plan(1).due_flushes(seg.plan(1).sizes(100, 0), 100), 0u);
}

TEST(Segments, AppendFillsTheSinksThenTheWindow) {
  Segments seg = make_segments(sink_window_config());
  const auto r = rows(6);
  seg.append_rows(0, r.data(), 6, 4);
  EXPECT_EQ(seg.size[0], 6u);
  EXPECT_EQ(seg.coded[0], 4u);
  EXPECT_EQ(seg.sink_tokens(0), 4u);
  EXPECT_EQ(tokens(seg.sinks[1]), (std::vector<uint16_t>{1000, 1001, 1002, 1003}));
  EXPECT_EQ(tokens(seg.window[0]), (std::vector<uint16_t>{4, 5}));
  EXPECT_EQ(seg.sizes(0), seg.plan(0).sizes(6, 4));
}

TEST(Segments, UndoTakesBackTheRowsOfAnAppendButNotItsFlushes) {
  Segments seg = make_segments(sink_window_config());
  // Nothing flushed: the sinks of the undone append go too.
  const auto r = rows(6);
  seg.append_rows(0, r.data(), 6, 4);
  seg.undo_append(0, 0, 0, 4);
  EXPECT_EQ(seg.size[0], 0u);
  EXPECT_EQ(seg.coded[0], 0u);
  EXPECT_TRUE(seg.sinks[0].empty());
  EXPECT_TRUE(seg.window[0].empty());
  // A flush that committed stays: only the window rows after it are dropped.
  seg.append_rows(0, r.data(), 6, 4);
  const auto more = rows(20, 100);
  seg.append_rows(0, more.data(), 20, 0);  // window: 2 + 20 tokens
  seg.flushed(0, 8);                       // the oldest block became codes
  EXPECT_EQ(seg.coded[0], 12u);
  seg.undo_append(0, 6, 4, 0);
  EXPECT_EQ(seg.coded[0], 12u);
  EXPECT_EQ(seg.size[0], 12u);
  EXPECT_TRUE(seg.window[0].empty());
  EXPECT_EQ(seg.sink_tokens(0), 4u);
}

TEST(Segments, FlushedDropsTheOldestWindowRows) {
  Segments seg = make_segments(sink_window_config());
  const auto r = rows(24);
  seg.append_rows(0, r.data(), 24, 4);
  seg.flushed(0, 8);
  EXPECT_EQ(seg.coded[0], 12u);
  EXPECT_EQ(seg.size[0], 24u);
  EXPECT_EQ(tokens(seg.window[1]).front(), 1012u);
  EXPECT_EQ(seg.window[1].size(), 12u * kD);
}

TEST(Segments, FittedWindowsHoldThePlansRows) {
  Segments seg = make_segments(sink_window_config());
  const auto r = rows(30);
  seg.append_rows(0, r.data(), 30, 4);
  seg.append_rows(1, r.data(), 30, 0);
  seg.flushed(0, 16);
  seg.fit_window(0);
  seg.fit_window(1);
  EXPECT_EQ(seg.window[0].capacity(), seg.plan(0).window_rows() * kD);
  EXPECT_EQ(seg.window[0].size(), 10u * kD);
  EXPECT_GE(seg.window[2].capacity(), 30u * kD);  // an fp16 layer's window is unbounded
  EXPECT_EQ(seg.window[2].size(), 30u * kD);
}

TEST(Segments, CutsFollowThePlan) {
  Segments seg = make_segments(sink_window_config());
  const auto r = rows(24);
  seg.append_rows(0, r.data(), 24, 4);
  seg.flushed(0, 8);  // sinks 4 | codes 8 | window 12
  // Inside the window: it shortens.
  seg.cut(0, seg.plan(0).cut(seg.sizes(0), 20));
  EXPECT_EQ(seg.size[0], 20u);
  EXPECT_EQ(seg.coded[0], 12u);
  EXPECT_EQ(seg.window[0].size(), 8u * kD);
  // Into the codes: the window empties, keeping its capacity.
  seg.fit_window(0);
  seg.cut(0, seg.plan(0).cut(seg.sizes(0), 10));
  EXPECT_EQ(seg.size[0], 10u);
  EXPECT_EQ(seg.coded[0], 10u);
  EXPECT_TRUE(seg.window[0].empty());
  EXPECT_EQ(seg.window[0].capacity(), seg.plan(0).window_rows() * kD);
  // Into the sinks: the window gives its capacity back; to empty, the sinks theirs.
  seg.cut(0, seg.plan(0).cut(seg.sizes(0), 2));
  EXPECT_EQ(seg.sink_tokens(0), 2u);
  EXPECT_EQ(seg.window[0].capacity(), 0u);
  seg.cut(0, seg.plan(0).cut(seg.sizes(0), 0));
  EXPECT_EQ(seg.size[0], 0u);
  EXPECT_EQ(seg.sinks[0].capacity(), 0u);
}

TEST(Segments, CodesAddedAndDropped) {
  Segments seg = make_segments(sink_window_config());
  const auto r = rows(4);
  seg.append_rows(0, r.data(), 4, 4);
  seg.add_codes(0, 16);  // encoded codes after the full sinks
  EXPECT_EQ(seg.size[0], 20u);
  EXPECT_EQ(seg.coded[0], 20u);
  EXPECT_EQ(seg.code_tokens(0), 16u);
  seg.codes_dropped(0, 8);  // eviction of the oldest block
  EXPECT_EQ(seg.size[0], 12u);
  EXPECT_EQ(seg.code_tokens(0), 8u);
  // Unwindowed: every token is a code.
  Segments plain = make_segments(small_cache_config(5));
  plain.add_codes(0, 9);
  EXPECT_EQ(plain.coded_end(0), 9u);
  plain.cut(0, plain.plan(0).cut(plain.sizes(0), 3));
  EXPECT_EQ(plain.size[0], 3u);
}

TEST(Segments, RestoresSinksAndWindow) {
  Segments seg = make_segments(sink_window_config());
  const auto s = rows(4), w = rows(5, 50);
  seg.restore_sinks(0, 4, {s.data(), s.data() + 4 * kD});
  EXPECT_EQ(seg.size[0], 4u);
  EXPECT_EQ(seg.coded[0], 4u);
  seg.restore_window(0, 5, {w.data(), w.data() + 5 * kD});
  EXPECT_EQ(seg.size[0], 9u);
  EXPECT_EQ(tokens(seg.window[1]), (std::vector<uint16_t>{1050, 1051, 1052, 1053, 1054}));
  EXPECT_EQ(seg.window[0].capacity(), seg.plan(0).window_rows() * kD);
}
