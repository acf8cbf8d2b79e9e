// The one source of randomness: Philox4x32-10 (Salmon et al., "Parallel random numbers:
// as easy as 1, 2, 3", SC'11), a counter-based generator. Every random quantity in
// turboquant (rotation matrices, Hadamard signs, QJL matrices) is a pure function of
// (seed, stream, index), so it is identical on every platform and independent of order.
//
// Scheme (versioned with the file format; changing it changes every code):
//   key     = seed (64 bits: low word k0, high word k1)
//   counter = (index low, index high, stream low, stream high), 128 bits
//   one Philox call yields 4 uint32 words; RandomStream consumes them in order.
//   uniform double in (0,1): (u64 >> 11) * 2^-53 + 2^-54 from two consecutive words
//   gaussian: Box-Muller on two uniforms, computed in double (both outputs used)
//   sign: lowest bit of a word (1 -> +1, 0 -> -1)
// Stream ids name the purpose and the (layer, head) they serve: see make_stream_id().
#pragma once

#include <array>
#include <cstdint>

namespace turboquant {

inline constexpr int kRngSchemeVersion = 1;

enum class StreamPurpose : uint32_t {
  kDenseRotation = 1,
  kHadamardSigns = 2,
  kQjlMatrix = 3,
  kTest = 0xFF,
};

// stream = purpose << 48 | layer << 24 | head (layer and head < 2^24).
constexpr uint64_t make_stream_id(StreamPurpose purpose, uint32_t layer = 0, uint32_t head = 0) {
  return (static_cast<uint64_t>(purpose) << 48) | (static_cast<uint64_t>(layer & 0xFFFFFFu) << 24) |
         static_cast<uint64_t>(head & 0xFFFFFFu);
}

// The parts of an outlier split (quantizer_outlier.h) draw from their own streams: part p
// (0 = outliers, 1 = inliers) sets bits 56..63 of the stream id to p + 1. Purposes stay
// below 2^8, so part streams never collide with each other or with the whole quantizer's.
constexpr uint64_t make_part_stream(uint64_t stream, uint32_t part) {
  return (stream & 0x00FFFFFFFFFFFFFFull) | (static_cast<uint64_t>((part + 1) & 0xFFu) << 56);
}

std::array<uint32_t, 4> philox4x32_10(uint64_t key, uint64_t stream, uint64_t index);

class RandomStream {
 public:
  RandomStream(uint64_t seed, uint64_t stream) : seed_(seed), stream_(stream) {}

  uint32_t next_u32();
  uint64_t next_u64();
  double next_uniform();   // in (0, 1), never 0 or 1
  double next_gaussian();  // N(0, 1)
  float next_sign();       // +1.0f or -1.0f

 private:
  uint64_t seed_, stream_;
  uint64_t block_index_ = 0;
  std::array<uint32_t, 4> block_{};
  int used_ = 4;
  bool has_spare_ = false;
  double spare_ = 0.0;
};

}  // namespace turboquant
