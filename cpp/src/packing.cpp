#include "turboquant/packing.h"

#include <cstring>

namespace turboquant {

void pack_indices(const uint8_t* indices, size_t count, int bits, uint8_t* out) {
  const size_t nbytes = packed_bytes(count, bits);
  if (bits == 8) {
    std::memcpy(out, indices, count);
    return;
  }
  uint64_t acc = 0;
  unsigned filled = 0;
  size_t o = 0;
  const uint64_t mask = (1u << bits) - 1u;
  for (size_t j = 0; j < count; ++j) {
    acc |= (static_cast<uint64_t>(indices[j]) & mask) << filled;
    filled += static_cast<unsigned>(bits);
    while (filled >= 8) {
      out[o++] = static_cast<uint8_t>(acc);
      acc >>= 8;
      filled -= 8;
    }
  }
  if (o < nbytes) out[o++] = static_cast<uint8_t>(acc);
}

void unpack_indices(const uint8_t* packed, size_t count, int bits, uint8_t* indices) {
  if (bits == 8) {
    std::memcpy(indices, packed, count);
    return;
  }
  uint64_t acc = 0;
  unsigned filled = 0;
  size_t i = 0;
  const uint64_t mask = (1u << bits) - 1u;
  for (size_t j = 0; j < count; ++j) {
    while (filled < static_cast<unsigned>(bits)) {
      acc |= static_cast<uint64_t>(packed[i++]) << filled;
      filled += 8;
    }
    indices[j] = static_cast<uint8_t>(acc & mask);
    acc >>= bits;
    filled -= static_cast<unsigned>(bits);
  }
}

}  // namespace turboquant
