// The table of a cache's quantizers (cache/quantizer_table.h): widths per (layer, head, role),
// the decayed quantizers, the random streams.
#include "turboquant/cache/quantizer_table.h"

#include <gtest/gtest.h>

#include "turboquant/quantizer_outlier.h"

using namespace turboquant;

namespace {
KVCacheConfig table_config() {
  KVCacheConfig c;
  c.head_dim = 32;
  c.n_layers = 2;
  c.n_q_heads = 4;
  c.n_kv_heads = 2;
  c.key_bits = 3;
  c.value_bits = 2;
  c.seed = 5;
  return c;
}
}  // namespace

TEST(QuantizerTable, IndexIsLayerMajorThenHeadThenRole) {
  const KVCacheConfig c = table_config();
  const QuantizerTable t(c);
  EXPECT_EQ(t.streams(), 8u);
  EXPECT_EQ(t.index(0, 0, KVRole::kKey), 0u);
  EXPECT_EQ(t.index(0, 1, KVRole::kValue), 3u);
  EXPECT_EQ(t.index(1, 0, KVRole::kKey), 4u);
  for (int l = 0; l < 2; ++l)
    for (int h = 0; h < 2; ++h)
      for (KVRole role : {KVRole::kKey, KVRole::kValue})
        EXPECT_EQ(t.at(t.index(l, h, role)).config().stream,
                  kv_stream_id(static_cast<uint32_t>(l), static_cast<uint32_t>(h), role));
  EXPECT_EQ(t.decayed(0), nullptr);  // no decay, no mixed precision: no decayed quantizers
}

TEST(QuantizerTable, PerHeadAndPerLayerWidths) {
  KVCacheConfig c = table_config();
  c.key_head_bits = {2, 4};                // per KV head, every layer
  c.value_head_bits = {1, 2, 3, 4};        // per (layer, KV head)
  const QuantizerTable t(c);
  EXPECT_EQ(t.at(t.index(0, 0, KVRole::kKey)).bits(), 2);
  EXPECT_EQ(t.at(t.index(1, 1, KVRole::kKey)).bits(), 4);
  EXPECT_EQ(t.at(t.index(0, 1, KVRole::kValue)).bits(), 2);
  EXPECT_EQ(t.at(t.index(1, 0, KVRole::kValue)).bits(), 3);
}

TEST(QuantizerTable, HeadOffsetShiftsTheStreams) {
  KVCacheConfig c = table_config();
  c.kv_head_offset = 6;
  const QuantizerTable t(c);
  EXPECT_EQ(t.at(t.index(1, 1, KVRole::kValue)).config().stream, kv_stream_id(1, 7, KVRole::kValue));
}

TEST(QuantizerTable, DecayedQuantizersShareTheRotation) {
  KVCacheConfig c = table_config();
  c.decay_after = 16;
  c.decay_bits = 1;
  const QuantizerTable t(c);
  for (size_t s = 0; s < t.streams(); ++s) {
    ASSERT_NE(t.decayed(s), nullptr);
    EXPECT_EQ(t.decayed(s)->bits(), 1);
    EXPECT_EQ(t.decayed(s)->method(), t.at(s).method());
    EXPECT_EQ(&t.block(s, true), t.decayed(s));
    EXPECT_EQ(&t.block(s, false), &t.at(s));
  }
}

TEST(QuantizerTable, DecayedOutlierSplitLowersBothParts) {
  KVCacheConfig c = table_config();
  c.key_bits = 2;
  c.value_bits = 2;
  c.n_outlier_channels = 16;
  c.outlier_bits = 4;  // 16 at 4 + 16 at 2: 3 bits per coordinate
  c.decay_after = 8;
  c.decay_bits = 2;
  const QuantizerTable t(c);
  const auto& d = dynamic_cast<const OutlierSplitQuantizer&>(*t.decayed(0));
  EXPECT_EQ(d.config().bits, 1);
  EXPECT_EQ(d.config().outlier_bits, 3);
  EXPECT_EQ(decayed_split_bits(32, 2, 16, 4, 2), (std::array<int, 2>{1, 3}));
}
