#include "turboquant/packing.h"

#include <gtest/gtest.h>

#include "turboquant/rng.h"

using namespace turboquant;

TEST(Packing, RoundTripEveryWidthAndOddCounts) {
  RandomStream rs(3, 0);
  for (int bits = 1; bits <= 8; ++bits) {
    for (size_t count : {1u, 3u, 7u, 17u, 63u, 64u, 65u, 127u, 128u, 129u, 511u}) {
      std::vector<uint8_t> idx(count), back(count);
      for (auto& v : idx) v = static_cast<uint8_t>(rs.next_u32() & ((1u << bits) - 1));
      std::vector<uint8_t> packed(packed_bytes(count, bits) + 1, 0xAB);
      pack_indices(idx.data(), count, bits, packed.data());
      EXPECT_EQ(packed.back(), 0xAB) << "wrote past packed_bytes";
      unpack_indices(packed.data(), count, bits, back.data());
      EXPECT_EQ(idx, back) << "bits=" << bits << " count=" << count;
      for (size_t j = 0; j < count; ++j) ASSERT_EQ(packed_index(packed.data(), j, bits), idx[j]);
    }
  }
}

TEST(Packing, SizesAreDense) {
  EXPECT_EQ(packed_bytes(128, 3), 48u);
  EXPECT_EQ(packed_bytes(128, 2), 32u);
  EXPECT_EQ(packed_bytes(128, 4), 64u);
  EXPECT_EQ(packed_bytes(7, 3), 3u);
  EXPECT_EQ(packed_bytes(1, 1), 1u);
}

TEST(Packing, LayoutIsLsbFirst) {
  const uint8_t idx[3] = {5, 3, 6};  // 101, 011, 110 -> bits: 101 110 01|1 (LSB first)
  uint8_t out[2] = {0, 0};
  pack_indices(idx, 3, 3, out);
  EXPECT_EQ(out[0], static_cast<uint8_t>(5 | (3 << 3) | ((6 & 3) << 6)));
  EXPECT_EQ(out[1], static_cast<uint8_t>(6 >> 2));
}
