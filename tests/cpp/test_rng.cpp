#include "turboquant/rng.h"

#include <gtest/gtest.h>

#include <cmath>

#include "turboquant/half.h"

using namespace turboquant;

TEST(Rng, PhiloxKnownAnswer) {
  // Random123 known-answer test for philox4x32_10: counter 0, key 0.
  const auto r = philox4x32_10(0, 0, 0);
  EXPECT_EQ(r[0], 0x6627e8d5u);
  EXPECT_EQ(r[1], 0xe169c58du);
  EXPECT_EQ(r[2], 0xbc57ac4cu);
  EXPECT_EQ(r[3], 0x9b00dbd8u);
}

TEST(Rng, StreamsAreIndependentAndDeterministic) {
  RandomStream a(1, 0), b(1, 0), c(1, 1);
  int same = 0;
  for (int i = 0; i < 100; ++i) {
    const uint32_t x = a.next_u32();
    EXPECT_EQ(x, b.next_u32());
    same += (x == c.next_u32());
  }
  EXPECT_LT(same, 3);
}

TEST(Rng, GaussianMoments) {
  RandomStream rs(11, 0);
  double s = 0, s2 = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const double g = rs.next_gaussian();
    s += g;
    s2 += g * g;
  }
  EXPECT_NEAR(s / n, 0.0, 0.01);
  EXPECT_NEAR(s2 / n, 1.0, 0.01);
}

TEST(Half, RoundTripAndRounding) {
  for (float v : {0.0f, 1.0f, -2.5f, 65504.0f, 6.1035156e-05f, 5.9604645e-08f, 0.1f, 1234.5f}) {
    const float back = half_to_float(float_to_half(v));
    EXPECT_NEAR(back, v, std::abs(v) * 1e-3 + 1e-7) << v;
  }
  EXPECT_EQ(float_to_half(1.0f), 0x3C00);
  EXPECT_EQ(float_to_half(-2.0f), 0xC000);
  EXPECT_EQ(float_to_half(65504.0f), 0x7BFF);
  EXPECT_EQ(float_to_half(1e6f), 0x7C00);
  EXPECT_TRUE(std::isnan(half_to_float(float_to_half(NAN))));
  // Every half value survives a round trip through float.
  for (uint32_t h = 0; h < 0x7C00; ++h) {
    EXPECT_EQ(float_to_half(half_to_float(static_cast<half_bits>(h))), h);
  }
}
