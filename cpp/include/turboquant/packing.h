// Dense bit packing of b-bit indices (DESIGN §1 "Packing"). This header is the single
// definition of the code layout; every kernel (CPU, SIMD, Metal) follows it.
//
// Layout version 1: a vector of `count` indices of `bits` bits each is one little-endian
// bit stream. Index j occupies stream bits [j*bits, (j+1)*bits), least significant bit
// first; stream bit k is bit (k % 8) of byte k / 8. The stream is padded with zero bits to
// a whole byte: packed_bytes(count, bits) = ceil(count * bits / 8). No per-vector padding
// beyond that byte boundary. Example, bits = 3: byte0 = i0 | i1 << 3 | (i2 & 3) << 6.
#pragma once

#include <cstddef>
#include <cstdint>

namespace turboquant {

inline constexpr int kPackingVersion = 1;

constexpr size_t packed_bytes(size_t count, int bits) {
  return (count * static_cast<size_t>(bits) + 7) / 8;
}

// Packs count indices (each < 2^bits, bits in 1..8) into packed_bytes(count, bits) bytes.
void pack_indices(const uint8_t* indices, size_t count, int bits, uint8_t* out);

// Inverse of pack_indices.
void unpack_indices(const uint8_t* packed, size_t count, int bits, uint8_t* indices);

// Index j of a packed stream, without unpacking the rest (reference accessor).
inline uint8_t packed_index(const uint8_t* packed, size_t j, int bits) {
  const size_t bit = j * static_cast<size_t>(bits);
  const size_t byte = bit / 8;
  const unsigned shift = static_cast<unsigned>(bit % 8);
  unsigned v = packed[byte] >> shift;
  if (shift + static_cast<unsigned>(bits) > 8) v |= static_cast<unsigned>(packed[byte + 1]) << (8 - shift);
  return static_cast<uint8_t>(v & ((1u << bits) - 1u));
}

}  // namespace turboquant
