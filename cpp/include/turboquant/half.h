// IEEE 754 binary16 <-> binary32 conversion, round to nearest even, in portable C++ so
// that stored norms are bit-identical on every platform (F16C, NEON and Metal agree).
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>

namespace turboquant {

using half_bits = uint16_t;

inline float half_to_float(half_bits h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3FFu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  return std::bit_cast<float>(bits);
}

// Whether fp16 bits hold a finite value (exponent field not all ones).
inline bool half_is_finite(half_bits h) { return (h & 0x7C00u) != 0x7C00u; }

// Index of the first non-finite value of n fp16 values, or n when all are finite. The
// all-finite case (every call but a refused one) is one branch-free pass.
inline size_t first_nonfinite_half(const half_bits* h, size_t n) {
  unsigned bad = 0;
  for (size_t j = 0; j < n; ++j) bad |= static_cast<unsigned>((h[j] & 0x7C00u) == 0x7C00u);
  if (bad == 0) return n;
  size_t j = 0;
  while (half_is_finite(h[j])) ++j;
  return j;
}

inline half_bits float_to_half(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7FFFFFFFu;
  if (absx >= 0x7F800000u) {  // Inf or NaN
    return static_cast<half_bits>(sign | 0x7C00u | (absx > 0x7F800000u ? 0x200u : 0u));
  }
  if (absx >= 0x477FF000u) return static_cast<half_bits>(sign | 0x7C00u);  // overflow -> Inf
  if (absx < 0x38800000u) {  // subnormal or zero in half
    if (absx < 0x33000000u) return static_cast<half_bits>(sign);  // rounds to 0
    const uint32_t mant = (absx & 0x7FFFFFu) | 0x800000u;
    const int shift = 126 - static_cast<int>(absx >> 23);  // 14..24
    const uint32_t halfway = 1u << (shift - 1);
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return static_cast<half_bits>(sign | r);
  }
  uint32_t r = ((absx >> 13) - ((127 - 15) << 10));
  const uint32_t rem = absx & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return static_cast<half_bits>(sign | r);
}

}  // namespace turboquant
