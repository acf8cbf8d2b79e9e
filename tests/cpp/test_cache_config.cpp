// The grouped cache configuration (cache/config.h): each group validates its own fields
// with an error naming the field; KVCacheConfig validates the groups and decay_bits.
#include "turboquant/cache/config.h"

#include <gtest/gtest.h>

#include <string>

#include "turboquant/error.h"

using namespace turboquant;

namespace {
// The message of the exception E that f throws ("" when it throws none).
template <typename E, typename F>
std::string error_of(F f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(CacheConfig, GroupsAreViewsOfOneConfig) {
  KVCacheConfig c;
  c.fp16_window = 64;
  c.decay_after = 100;
  c.key_head_bits = {2, 3};
  EXPECT_EQ(c.segments().fp16_window, 64u);
  EXPECT_TRUE(c.segments().windowed());
  EXPECT_TRUE(c.aging().decays());
  EXPECT_TRUE(c.head_widths().per_head_bits());
  EXPECT_FALSE(c.mixed_precision().mixed());
  EXPECT_EQ(c.shape().group_size(), 1);
  EXPECT_EQ(c.quantization().key_method, "turboquant_mse");
}

TEST(CacheConfig, EachGroupNamesItsBadField) {
  CacheShape shape;
  shape.n_q_heads = 3;
  shape.n_kv_heads = 2;
  EXPECT_NE(error_of<InvalidArgument>([&] { shape.validate(); }).find("n_q_heads (3)"), std::string::npos);

  KVQuantization q;
  q.split_angle_bits = 12;
  EXPECT_NE(error_of<InvalidArgument>([&] { q.validate(128); }).find("split_angle_bits"), std::string::npos);
  q = KVQuantization{};
  q.n_outlier_channels = 128;
  EXPECT_NE(error_of<InvalidArgument>([&] { q.validate(128); }).find("n_outlier_channels"), std::string::npos);

  HeadWidths w;
  w.value_head_bits = {3, 3, 3};
  CacheShape two_heads;
  two_heads.n_q_heads = 2;
  two_heads.n_kv_heads = 2;
  EXPECT_NE(error_of<InvalidArgument>([&] { w.validate(two_heads, false); }).find("value_head_bits"),
            std::string::npos);
  w = HeadWidths{};
  w.outlier_head_bits = {4, 4};
  EXPECT_NE(error_of<InvalidArgument>([&] { w.validate(two_heads, false); }).find("outlier_head_bits"),
            std::string::npos);

  SegmentsConfig s;
  s.fp16_layers = {3};
  EXPECT_NE(error_of<InvalidArgument>([&] { s.validate(2); }).find("fp16_layers"), std::string::npos);
  s = SegmentsConfig{};
  s.block_tokens = 0;
  EXPECT_NE(error_of<InvalidArgument>([&] { s.validate(2); }).find("block_tokens"), std::string::npos);

  AgingConfig a;
  a.max_coded_tokens = 8;
  EXPECT_NE(error_of<InvalidArgument>([&] { a.validate(256); }).find("max_coded_tokens"), std::string::npos);

  MixedPrecisionConfig m;
  m.mixed_group_blocks = 2;
  m.mixed_keep_blocks = 1;
  EXPECT_NE(error_of<InvalidArgument>([&] { m.validate(SegmentsConfig{}, AgingConfig{}); }).find("fp16_window"),
            std::string::npos);
  SegmentsConfig windowed;
  windowed.fp16_window = 16;
  windowed.block_tokens = 16;
  AgingConfig evicting;
  evicting.max_coded_tokens = 64;
  EXPECT_NE(error_of<NotSupported>([&] { m.validate(windowed, evicting); }).find("max_coded_tokens"),
            std::string::npos);
  EXPECT_NO_THROW(m.validate(windowed, AgingConfig{}));
}

TEST(CacheConfig, DecayBitsSpanTheGroups) {
  KVCacheConfig c;
  c.head_dim = 64;
  c.n_kv_heads = 2;
  c.n_q_heads = 2;
  c.decay_after = 32;
  c.decay_bits = 2;
  c.key_head_bits = {4, 2};  // the least width bounds decay_bits
  EXPECT_NE(error_of<InvalidArgument>([&] { c.validate(); }).find("decay_bits must be in [1, 1]"), std::string::npos);
  c.decay_bits = 1;
  EXPECT_NO_THROW(c.validate());
  c.decay_after = 0;
  EXPECT_NE(error_of<InvalidArgument>([&] { c.validate(); }).find("decay_bits (1) is set"), std::string::npos);
}
