// Damaged-file checks shared by the serialization and decay tests: every truncation and
// every single-byte flip (bit 0, bit 7, all bits) of a saved cache is a FormatError.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "turboquant/error.h"
#include "turboquant/serialize.h"

namespace turboquant::testing {

inline void expect_every_truncation_rejected(const std::vector<uint8_t>& bytes) {
  for (size_t n = 0; n < bytes.size(); ++n) {
    // A copy of exactly n bytes so that AddressSanitizer sees any read past the end.
    std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_THROW(deserialize_cache(cut.data(), cut.size()), FormatError) << "length " << n;
  }
}

inline void expect_every_byte_flip_rejected(const std::vector<uint8_t>& bytes) {
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (uint8_t mask : {uint8_t{0x01}, uint8_t{0x80}, uint8_t{0xFF}}) {
      auto bad = bytes;
      bad[i] ^= mask;
      EXPECT_THROW(deserialize_cache(bad.data(), bad.size()), FormatError) << "byte " << i;
    }
  }
}

}  // namespace turboquant::testing
