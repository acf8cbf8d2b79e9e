// ARMv8 NEON kernels (AArch64: Apple silicon, Graviton, ...): same signatures and semantics
// as kernels_scalar.cpp (codes, fwht, hadamard_rotate, row_norms and half_to_float
// bit-exact; scores, value sums and exp within fp tolerance). NEON is part of every AArch64
// CPU, so this set needs no run-time feature test and no extra compiler flags.
//
// Decoding b-bit codes: 16 coordinates occupy 2b bytes of a row (layout v1, LSB first).
// One 16-byte load of those bytes, one byte shuffle (vqtbl1q_u8) that moves the byte (b
// divides 8) or byte pair (other b) holding each index into its lane, a per-lane shift and
// a mask give the 16 indices as bytes. The centroid lookup is then, for b <= 6, four byte
// shuffles on a register table holding byte k of every centroid (vqtbl1q_u8, 16 entries;
// vqtbl2q_u8 / vqtbl4q_u8 for 32 / 64), zipped back into 16 floats (the 16-byte-table
// lookup FAISS and llama.cpp use for their 4-bit LUTs); for b = 7, 8 a load per index.
// As in kernels_avx2.cpp, the centroids decoded from a row are shared by every query of a
// GQA group.
#include "backend/cpu/bits_dispatch.h"
#include "backend/cpu/kernels.h"

#if TURBOQUANT_NEON_KERNELS
#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "turboquant/codebook.h"
#include "turboquant/packing.h"

namespace turboquant::cpu {
namespace {

// ---------------------------------------------------------------------------------------
// fwht: the first two butterfly stages inside each 4-float register (a permute and an FMA
// with a ±1 vector: the product is exact, so the one rounding is that of the scalar a+b /
// a-b), the rest across registers.
struct Signs {
  float32x4_t s1, s2;
};

inline Signs fwht_signs() {
  static constexpr float a[4] = {1.0f, -1.0f, 1.0f, -1.0f};
  static constexpr float b[4] = {1.0f, 1.0f, -1.0f, -1.0f};
  return {vld1q_f32(a), vld1q_f32(b)};
}

inline float32x4_t fwht4(float32x4_t v, Signs s) {
  v = vfmaq_f32(vrev64q_f32(v), v, s.s1);        // (x0+x1, x0-x1, x2+x3, x2-x3)
  return vfmaq_f32(vextq_f32(v, v, 2), v, s.s2);  // (y0+y2, y1+y3, y0-y2, y1-y3)
}

// Butterfly stages h = H, 2H, ... < NV across registers (compile-time bounds: everything
// unrolls and r[] stays in registers).
template <int NV, int H>
inline void fwht_stages(float32x4_t* r) {
  if constexpr (H < NV) {
#pragma GCC unroll 16
    for (int i = 0; i < NV; i += 2 * H)
#pragma GCC unroll 16
      for (int j = 0; j < H; ++j) {
        const float32x4_t a = r[i + j], b = r[i + j + H];
        r[i + j] = vaddq_f32(a, b);
        r[i + j + H] = vsubq_f32(a, b);
      }
    fwht_stages<NV, 2 * H>(r);
  }
}

// n = 4·NV <= 64 floats held in registers through all log2(n) stages.
template <int NV>
inline void fwht_regs(float* x, Signs s) {
  float32x4_t r[NV];
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) r[i] = fwht4(vld1q_f32(x + 4 * i), s);
  fwht_stages<NV, 1>(r);
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) vst1q_f32(x + 4 * i, r[i]);
}

// Stages h = 64 .. n/2 in memory (n >= 128); the last one multiplies by `scale` when given
// (sum rounded first, then the product: the scalar order).
void fwht_memory_stages(float* x, size_t n, const float* scale) {
  for (size_t h = 64; h < n; h <<= 1) {
    const bool last = 2 * h == n && scale;
    for (size_t i = 0; i < n; i += 2 * h) {
      for (size_t j = i; j < i + h; j += 4) {
        const float32x4_t a = vld1q_f32(x + j), b = vld1q_f32(x + j + h);
        float32x4_t s = vaddq_f32(a, b), t = vsubq_f32(a, b);
        if (last) {
          s = vmulq_f32(s, vld1q_f32(scale + j));
          t = vmulq_f32(t, vld1q_f32(scale + j + h));
        }
        vst1q_f32(x + j, s);
        vst1q_f32(x + j + h, t);
      }
    }
  }
}

void fwht_neon(float* x, size_t n) {
  const Signs s = fwht_signs();
  switch (n) {
    case 4: return fwht_regs<1>(x, s);
    case 8: return fwht_regs<2>(x, s);
    case 16: return fwht_regs<4>(x, s);
    case 32: return fwht_regs<8>(x, s);
    case 64: return fwht_regs<16>(x, s);
    default: break;
  }
  if (n < 4) return scalar_kernels().fwht(x, n);
  for (size_t i = 0; i < n; i += 64) fwht_regs<16>(x + i, s);
  fwht_memory_stages(x, n, nullptr);
}

// ---------------------------------------------------------------------------------------
// hadamard_rotate. d = 4·NV <= 64: the row stays in registers through both transforms and
// the three elementwise products (same order of roundings as the scalar).
template <int NV>
inline void hadamard_regs(const float* u, float* v, const float* rs, const float* pre, const float* mid,
                          const float* post, Signs s) {
  float32x4_t r[NV];
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) {
    r[i] = vld1q_f32(u + 4 * i);
    if (rs) r[i] = vmulq_n_f32(r[i], *rs);
    if (pre) r[i] = vmulq_f32(r[i], vld1q_f32(pre + 4 * i));
    r[i] = fwht4(r[i], s);
  }
  fwht_stages<NV, 1>(r);
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) r[i] = fwht4(vmulq_f32(r[i], vld1q_f32(mid + 4 * i)), s);
  fwht_stages<NV, 1>(r);
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) vst1q_f32(v + 4 * i, vmulq_f32(r[i], vld1q_f32(post + 4 * i)));
}

template <int NV>
void hadamard_rows(const float* x, size_t n, const float* row_scale, const float* pre, const float* mid,
                   const float* post, float* y) {
  const Signs s = fwht_signs();
  constexpr size_t d = 4 * NV;
  for (size_t r = 0; r < n; ++r)
    hadamard_regs<NV>(x + r * d, y + r * d, row_scale ? row_scale + r : nullptr, pre, mid, post, s);
}

// d >= 128: blocks of 64 in registers (the input products fused into the first block
// pass), the remaining stages in memory with the mid / post products fused into their last
// stage. Every value is rounded exactly as in the scalar order.
void hadamard_row_blocked(const float* u, float* v, size_t d, const float* rs, const float* pre,
                          const float* mid, const float* post, Signs s) {
  for (size_t b = 0; b < d; b += 64) {
    float32x4_t r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      r[i] = vld1q_f32(u + b + 4 * static_cast<size_t>(i));
      if (rs) r[i] = vmulq_n_f32(r[i], *rs);
      if (pre) r[i] = vmulq_f32(r[i], vld1q_f32(pre + b + 4 * static_cast<size_t>(i)));
      r[i] = fwht4(r[i], s);
    }
    fwht_stages<16, 1>(r);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) vst1q_f32(v + b + 4 * static_cast<size_t>(i), r[i]);
  }
  fwht_memory_stages(v, d, mid);
  for (size_t b = 0; b < d; b += 64) fwht_regs<16>(v + b, s);
  fwht_memory_stages(v, d, post);
}

void hadamard_rotate_neon(const float* x, size_t n, size_t d, const float* row_scale, const float* pre,
                          const float* mid, const float* post, float* y) {
  switch (d) {
    case 4: return hadamard_rows<1>(x, n, row_scale, pre, mid, post, y);
    case 8: return hadamard_rows<2>(x, n, row_scale, pre, mid, post, y);
    case 16: return hadamard_rows<4>(x, n, row_scale, pre, mid, post, y);
    case 32: return hadamard_rows<8>(x, n, row_scale, pre, mid, post, y);
    case 64: return hadamard_rows<16>(x, n, row_scale, pre, mid, post, y);
    default: break;
  }
  if (d < 4) return scalar_kernels().hadamard_rotate(x, n, d, row_scale, pre, mid, post, y);
  const Signs s = fwht_signs();
  for (size_t r = 0; r < n; ++r)
    hadamard_row_blocked(x + r * d, y + r * d, d, row_scale ? row_scale + r : nullptr, pre, mid, post, s);
}

// ---------------------------------------------------------------------------------------
// quantize_pack: index = number of boundaries <= v, with the scalar binary search's test
// "not v < b" (NaN lands on the last index there and here alike).
// B <= 4: one compare per boundary; each compare's all-ones (v < b) is added to
// 2^B - 1, i.e. the index is 2^B - 1 minus the boundaries above v. For ascending boundaries
// (codebook.h) this is exactly the binary search's result.
// B >= 5: the branchless binary search (one boundary load per lane and step).
template <int B>
struct Boundaries {
  float32x4_t b[B <= 4 ? (1 << B) - 1 : 1];
  const float* p;
  explicit Boundaries(const float* boundaries) : p(boundaries) {
    if constexpr (B <= 4) {
      for (int k = 0; k < (1 << B) - 1; ++k) b[k] = vdupq_n_f32(boundaries[k]);
    } else {
      b[0] = vdupq_n_f32(0.0f);
    }
  }
};

template <int B>
inline uint32x4_t quantize4(float32x4_t v, const Boundaries<B>& bd) {
  if constexpr (B <= 4) {
    uint32x4_t idx = vdupq_n_u32((1u << B) - 1u);
#pragma GCC unroll 16
    for (int k = 0; k < (1 << B) - 1; ++k) idx = vaddq_u32(idx, vcltq_f32(v, bd.b[k]));
    return idx;
  } else {
    uint32x4_t pos = vdupq_n_u32(0);
    for (uint32_t step = 1u << (B - 1); step; step >>= 1) {
      const uint32x4_t cand = vaddq_u32(pos, vdupq_n_u32(step - 1));  // boundary index
      float32x4_t b = vdupq_n_f32(0.0f);
      b = vld1q_lane_f32(bd.p + vgetq_lane_u32(cand, 0), b, 0);
      b = vld1q_lane_f32(bd.p + vgetq_lane_u32(cand, 1), b, 1);
      b = vld1q_lane_f32(bd.p + vgetq_lane_u32(cand, 2), b, 2);
      b = vld1q_lane_f32(bd.p + vgetq_lane_u32(cand, 3), b, 3);
      pos = vaddq_u32(pos, vbicq_u32(vdupq_n_u32(step), vcltq_f32(v, b)));
    }
    return pos;
  }
}

// 16 coordinates -> 16 index bytes.
template <int B>
inline uint8x16_t quantize16(const float* v, const Boundaries<B>& bd) {
  const uint32x4_t a = quantize4<B>(vld1q_f32(v), bd), b = quantize4<B>(vld1q_f32(v + 4), bd);
  const uint32x4_t c = quantize4<B>(vld1q_f32(v + 8), bd), e = quantize4<B>(vld1q_f32(v + 12), bd);
  const uint16x8_t lo = vcombine_u16(vmovn_u32(a), vmovn_u32(b)), hi = vcombine_u16(vmovn_u32(c), vmovn_u32(e));
  return vcombine_u8(vmovn_u16(lo), vmovn_u16(hi));
}

// Packs the 16 indices of a register (bytes, each < 2^B) into two groups of 8B bits, one
// group per 64-bit lane, by three shift-or rounds (8 -> 16 -> 32 -> 64 bit fields).
template <int B>
inline uint64x2_t compact16(uint8x16_t bytes) {
  uint64x2_t x = vreinterpretq_u64_u8(bytes);
  const uint64x2_t m16 = vdupq_n_u64(0x00FF00FF00FF00FFull);
  const uint64x2_t m32 = vdupq_n_u64(0x0000FFFF0000FFFFull);
  const uint64x2_t m64 = vdupq_n_u64(0x00000000FFFFFFFFull);
  x = vorrq_u64(vandq_u64(x, m16), vshlq_n_u64(vandq_u64(vshrq_n_u64(x, 8), m16), B));
  x = vorrq_u64(vandq_u64(x, m32), vshlq_n_u64(vandq_u64(vshrq_n_u64(x, 16), m32), 2 * B));
  x = vorrq_u64(vandq_u64(x, m64), vshlq_n_u64(vshrq_n_u64(x, 32), 4 * B));
  return x;
}

inline uint8_t quantize_one(float v, const float* boundaries, int bits) {
  int lo = 0, hi = (1 << bits) - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (v < boundaries[mid]) hi = mid; else lo = mid + 1;
  }
  return static_cast<uint8_t>(lo);
}

template <int B>
void quantize_pack_t(const float* y, size_t n, size_t d, const float* boundaries, uint8_t* codes,
                     size_t code_bytes) {
  const Boundaries<B> bd(boundaries);
  const size_t nbytes = packed_bytes(d, B);
  alignas(16) uint8_t idx[kMaxDim + 16];
  alignas(16) uint8_t row[kMaxDim + 16];
  if (d > kMaxDim)  // rows longer than the scratch (not an MSE code): reference
    return scalar_kernels().quantize_pack(y, n, d, boundaries, B, codes, code_bytes);
  for (size_t r = 0; r < n; ++r) {
    const float* v = y + r * d;
    size_t j = 0;
    for (; j + 16 <= d; j += 16) {
      const uint8x16_t bytes = quantize16<B>(v + j, bd);
      if constexpr (B == 8) {
        vst1q_u8(row + j, bytes);
      } else {
        const uint64x2_t packed = compact16<B>(bytes);
        // Each lane holds B bytes followed by zeros: overlapping 8-byte writes in order.
        const uint64_t l0 = vgetq_lane_u64(packed, 0), l1 = vgetq_lane_u64(packed, 1);
        std::memcpy(row + (j / 8) * B, &l0, 8);
        std::memcpy(row + (j / 8 + 1) * B, &l1, 8);
      }
    }
    if (j == d) {
      std::memcpy(codes + r * code_bytes, row, nbytes);
      continue;
    }
    // Remainder (d not a multiple of 16): indices four at a time, then the reference packer
    // for the whole row.
    if constexpr (B == 8) {
      std::memcpy(idx, row, j);
    } else {
      unpack_indices(row, j, B, idx);
    }
    for (; j + 4 <= d; j += 4) {
      const uint32x4_t q = quantize4<B>(vld1q_f32(v + j), bd);
      idx[j] = static_cast<uint8_t>(vgetq_lane_u32(q, 0));
      idx[j + 1] = static_cast<uint8_t>(vgetq_lane_u32(q, 1));
      idx[j + 2] = static_cast<uint8_t>(vgetq_lane_u32(q, 2));
      idx[j + 3] = static_cast<uint8_t>(vgetq_lane_u32(q, 3));
    }
    for (; j < d; ++j) idx[j] = quantize_one(v[j], boundaries, B);
    pack_indices(idx, d, B, codes + r * code_bytes);
  }
}

void quantize_pack_neon(const float* y, size_t n, size_t d, const float* boundaries, int bits, uint8_t* codes,
                        size_t code_bytes) {
  with_bits<8>(bits, [&]<int B>() { quantize_pack_t<B>(y, n, d, boundaries, codes, code_bytes); });
}

// ---------------------------------------------------------------------------------------
// Centroid lookup for 16 coordinates of one code row.
template <int B>
struct Lut {
  // Registers per byte plane: 16 entries (B <= 4), 32 (B = 5), 64 (B = 6); B >= 7 loads.
  static constexpr int kRegs = B <= 4 ? 1 : (B == 5 ? 2 : 4);
  static constexpr bool kByteAligned = 8 % B == 0;  // every index inside one byte
  uint8x16_t plane[4][kRegs];                        // plane[k]: byte k of every centroid
  uint8x16_t sel;                                    // byte (pair) of each coordinate
  int8x16_t shift8;                                  // kByteAligned: minus the bit offset
  uint8x16_t sel_hi;                                 // !kByteAligned: pairs of coordinates 8..15
  int16x8_t shift16;                                 // !kByteAligned: minus the bit offsets
  const float* centroids;

  explicit Lut(const float* c) : centroids(c) {
    alignas(16) uint8_t t[4][64] = {};
    const int levels = 1 << B;
    for (int i = 0; i < std::min(levels, 64); ++i) {
      uint32_t bitsv;
      std::memcpy(&bitsv, c + i, 4);
      for (int k = 0; k < 4; ++k) t[k][i] = static_cast<uint8_t>(bitsv >> (8 * k));
    }
    for (int k = 0; k < 4; ++k)
      for (int r = 0; r < kRegs; ++r) plane[k][r] = vld1q_u8(t[k] + 16 * r);
    alignas(16) uint8_t s[16], h[16];
    alignas(16) int8_t sh8[16];
    alignas(16) int16_t sh16[8];
    for (int k = 0; k < 16; ++k) {
      s[k] = static_cast<uint8_t>((B * k) / 8);
      sh8[k] = static_cast<int8_t>(-((B * k) % 8));
    }
    if constexpr (!kByteAligned) {
      // u16 lane k (k < 8) holds the two bytes from which index k (lo) or 8 + k (hi) starts.
      for (int k = 0; k < 8; ++k) {
        s[2 * k] = static_cast<uint8_t>((B * k) / 8);
        s[2 * k + 1] = static_cast<uint8_t>((B * k) / 8 + 1);
        h[2 * k] = static_cast<uint8_t>(B + (B * k) / 8);
        h[2 * k + 1] = static_cast<uint8_t>(B + (B * k) / 8 + 1);
        sh16[k] = static_cast<int16_t>(-((B * k) % 8));
      }
    } else {
      for (int k = 0; k < 16; ++k) h[k] = 0;
      for (int k = 0; k < 8; ++k) sh16[k] = 0;
    }
    sel = vld1q_u8(s);
    sel_hi = vld1q_u8(h);
    shift8 = vld1q_s8(sh8);
    shift16 = vld1q_s16(sh16);
  }

  // The 16 indices whose codes start at p (16 bytes readable from p).
  inline uint8x16_t indices(const uint8_t* p) const {
    const uint8x16_t raw = vld1q_u8(p);
    if constexpr (B == 8) {
      return raw;
    } else if constexpr (kByteAligned) {
      const uint8x16_t x = vshlq_u8(vqtbl1q_u8(raw, sel), shift8);
      return vandq_u8(x, vdupq_n_u8(static_cast<uint8_t>((1u << B) - 1u)));
    } else {
      const uint16x8_t mask = vdupq_n_u16(static_cast<uint16_t>((1u << B) - 1u));
      const uint16x8_t lo = vandq_u16(vshlq_u16(vreinterpretq_u16_u8(vqtbl1q_u8(raw, sel)), shift16), mask);
      const uint16x8_t hi = vandq_u16(vshlq_u16(vreinterpretq_u16_u8(vqtbl1q_u8(raw, sel_hi)), shift16), mask);
      return vuzp1q_u8(vreinterpretq_u8_u16(lo), vreinterpretq_u8_u16(hi));
    }
  }

  inline uint8x16_t lookup_plane(int k, uint8x16_t idx) const {
    if constexpr (kRegs == 1) {
      return vqtbl1q_u8(plane[k][0], idx);
    } else if constexpr (kRegs == 2) {
      const uint8x16x2_t t = {{plane[k][0], plane[k][1]}};
      return vqtbl2q_u8(t, idx);
    } else {
      const uint8x16x4_t t = {{plane[k][0], plane[k][1], plane[k][2], plane[k][3]}};
      return vqtbl4q_u8(t, idx);
    }
  }

  // Centroids of coordinates 16g .. 16g+15 of `row`. Reads 16 bytes from row + 2Bg: the
  // caller guarantees they are readable (bits beyond the row are ignored).
  inline float32x4x4_t load(const uint8_t* row, size_t g) const {
    const uint8x16_t idx = indices(row + g * 2 * B);
    float32x4x4_t c;
    if constexpr (B <= 6) {
      const uint8x16_t b0 = lookup_plane(0, idx), b1 = lookup_plane(1, idx);
      const uint8x16_t b2 = lookup_plane(2, idx), b3 = lookup_plane(3, idx);
      const uint16x8_t l0 = vreinterpretq_u16_u8(vzip1q_u8(b0, b1)), l1 = vreinterpretq_u16_u8(vzip2q_u8(b0, b1));
      const uint16x8_t h0 = vreinterpretq_u16_u8(vzip1q_u8(b2, b3)), h1 = vreinterpretq_u16_u8(vzip2q_u8(b2, b3));
      c.val[0] = vreinterpretq_f32_u16(vzip1q_u16(l0, h0));
      c.val[1] = vreinterpretq_f32_u16(vzip2q_u16(l0, h0));
      c.val[2] = vreinterpretq_f32_u16(vzip1q_u16(l1, h1));
      c.val[3] = vreinterpretq_f32_u16(vzip2q_u16(l1, h1));
    } else {
      alignas(16) uint8_t ix[16];
      alignas(16) float f[16];
      vst1q_u8(ix, idx);
      for (int k = 0; k < 16; ++k) f[k] = centroids[ix[k]];
      for (int k = 0; k < 4; ++k) c.val[k] = vld1q_f32(f + 4 * k);
    }
    return c;
  }
};

// Row access that never reads past the codes buffer: rows whose 16-byte loads could run off
// its end (the last ceil(16 / code_bytes)) are copied into zero-padded scratch.
struct SafeRows {
  const uint8_t* codes;
  size_t code_bytes, first_tail;
  alignas(16) uint8_t tail[kMaxDim + 48];  // callers guarantee code_bytes <= kMaxDim
  SafeRows(const uint8_t* c, size_t cb, size_t n) : codes(c), code_bytes(cb) {
    const size_t k = std::min(n, (16 + code_bytes - 1) / code_bytes);
    first_tail = n - k;
    std::memset(tail, 0, k * code_bytes + 16);
    if (k) std::memcpy(tail, codes + first_tail * code_bytes, k * code_bytes);
  }
  inline const uint8_t* row(size_t t) const {
    return t >= first_tail ? tail + (t - first_tail) * code_bytes : codes + t * code_bytes;
  }
};

// Splits d into 16-coordinate chunks, an optional 8-coordinate half chunk and a scalar tail.
struct Chunks {
  size_t full, tail0;
  bool half;
  explicit Chunks(size_t d) : full(d / 16), tail0(0), half(d % 16 >= 8) { tail0 = 16 * full + (half ? 8 : 0); }
};

// Scores of TT tokens for MQ queries (MQ × TT independent FMA chains).
template <int B, int MQ, int TT>
inline void score_tokens(const float* q, size_t d, const Chunks& ch, const uint8_t* const* row, const float* norms,
                         const Lut<B>& lut, float* out, size_t out_stride) {
  float32x4_t acc[MQ][TT];
  for (int i = 0; i < MQ; ++i)
    for (int u = 0; u < TT; ++u) acc[i][u] = vdupq_n_f32(0.0f);
  for (size_t g = 0; g < ch.full; ++g) {
    for (int u = 0; u < TT; ++u) {
      const float32x4x4_t c = lut.load(row[u], g);
      for (int i = 0; i < MQ; ++i) {
        const float* qi = q + static_cast<size_t>(i) * d + 16 * g;
        acc[i][u] = vfmaq_f32(acc[i][u], vld1q_f32(qi), c.val[0]);
        acc[i][u] = vfmaq_f32(acc[i][u], vld1q_f32(qi + 4), c.val[1]);
        acc[i][u] = vfmaq_f32(acc[i][u], vld1q_f32(qi + 8), c.val[2]);
        acc[i][u] = vfmaq_f32(acc[i][u], vld1q_f32(qi + 12), c.val[3]);
      }
    }
  }
  if (ch.half) {
    for (int u = 0; u < TT; ++u) {
      const float32x4x4_t c = lut.load(row[u], ch.full);
      for (int i = 0; i < MQ; ++i) {
        const float* qi = q + static_cast<size_t>(i) * d + 16 * ch.full;
        acc[i][u] = vfmaq_f32(acc[i][u], vld1q_f32(qi), c.val[0]);
        acc[i][u] = vfmaq_f32(acc[i][u], vld1q_f32(qi + 4), c.val[1]);
      }
    }
  }
  for (int u = 0; u < TT; ++u) {
    for (int i = 0; i < MQ; ++i) {
      float s = vaddvq_f32(acc[i][u]);
      for (size_t j = ch.tail0; j < d; ++j) s += q[static_cast<size_t>(i) * d + j] * lut.centroids[packed_index(row[u], j, B)];
      out[static_cast<size_t>(i) * out_stride + static_cast<size_t>(u)] = norms[u] * s;
    }
  }
}

template <int B, int MQ>
void scores_pass(const float* q, size_t d, const SafeRows& rows, const float* norms, size_t n, const Lut<B>& lut,
                 float* out, size_t out_stride) {
  constexpr int TT = MQ == 1 ? 4 : 2;
  const Chunks ch(d);
  size_t t = 0;
  for (; t + TT <= n; t += TT) {
    const uint8_t* row[TT];
    for (int u = 0; u < TT; ++u) row[u] = rows.row(t + static_cast<size_t>(u));
    score_tokens<B, MQ, TT>(q, d, ch, row, norms + t, lut, out + t, out_stride);
  }
  for (; t < n; ++t) {
    const uint8_t* row[1] = {rows.row(t)};
    score_tokens<B, MQ, 1>(q, d, ch, row, norms + t, lut, out + t, out_stride);
  }
}

template <int B>
void mse_scores_t(const float* q, size_t m, const uint8_t* codes, size_t code_bytes, const float* norms, size_t n,
                  size_t d, const float* centroids, float* out, size_t out_stride) {
  const Lut<B> lut(centroids);
  const SafeRows rows(codes, code_bytes, n);
  size_t i = 0;
  for (; i + 4 <= m; i += 4) scores_pass<B, 4>(q + i * d, d, rows, norms, n, lut, out + i * out_stride, out_stride);
  switch (m - i) {
    case 3: scores_pass<B, 3>(q + i * d, d, rows, norms, n, lut, out + i * out_stride, out_stride); break;
    case 2: scores_pass<B, 2>(q + i * d, d, rows, norms, n, lut, out + i * out_stride, out_stride); break;
    case 1: scores_pass<B, 1>(q + i * d, d, rows, norms, n, lut, out + i * out_stride, out_stride); break;
    default: break;
  }
}

void mse_scores_neon(const float* q, size_t m, const uint8_t* codes, size_t code_bytes, const float* norms, size_t n,
                     size_t d, int bits, const float* centroids, float* out, size_t out_stride) {
  if (code_bytes > kMaxDim)  // wider rows than any MSE code (SafeRows scratch): reference
    return scalar_kernels().mse_scores(q, m, codes, code_bytes, norms, n, d, bits, centroids, out, out_stride);
  with_bits<8>(bits, [&]<int B>() { mse_scores_t<B>(q, m, codes, code_bytes, norms, n, d, centroids, out, out_stride); });
}

// ---------------------------------------------------------------------------------------
// mse_accumulate: blocks of tokens; within a block, one chunk of 16 coordinates × MQ queries
// of the accumulator stays in registers while every token of the block is added.
constexpr size_t kTokenBlock = 64;

template <int B, int MQ, int NR>  // NR registers of the chunk: 4 (16 coordinates) or 2 (8)
inline void accumulate_chunk(size_t g, size_t d, const uint8_t* const* rowp, const float (*sa)[4], size_t na,
                             const Lut<B>& lut, float* acc) {
  float32x4_t a[MQ][NR];
  for (int i = 0; i < MQ; ++i)
    for (int r = 0; r < NR; ++r) a[i][r] = vld1q_f32(acc + static_cast<size_t>(i) * d + 16 * g + 4 * static_cast<size_t>(r));
  for (size_t t = 0; t < na; ++t) {
    const float32x4x4_t c = lut.load(rowp[t], g);
    for (int i = 0; i < MQ; ++i)
      for (int r = 0; r < NR; ++r) a[i][r] = vfmaq_n_f32(a[i][r], c.val[r], sa[t][i]);
  }
  for (int i = 0; i < MQ; ++i)
    for (int r = 0; r < NR; ++r) vst1q_f32(acc + static_cast<size_t>(i) * d + 16 * g + 4 * static_cast<size_t>(r), a[i][r]);
}

template <int B, int MQ>
void accumulate_pass(const float* w, size_t w_stride, const SafeRows& rows, const float* norms,
                     const uint32_t* idx, size_t n, size_t d, const Lut<B>& lut, float* acc) {
  const Chunks ch(d);
  const uint8_t* rowp[kTokenBlock];
  float sa[kTokenBlock][4];
  for (size_t t0 = 0; t0 < n; t0 += kTokenBlock) {
    const size_t nt = std::min(kTokenBlock, n - t0);
    size_t na = 0;  // tokens with a non-zero weight for some query (masked ones are skipped)
    for (size_t t = 0; t < nt; ++t) {
      const size_t tok = idx ? idx[t0 + t] : t0 + t;  // sparse V lists the rows to add
      bool any = false;
      for (int i = 0; i < MQ; ++i) {
        sa[na][i] = w[static_cast<size_t>(i) * w_stride + tok] * norms[tok];
        any |= sa[na][i] != 0.0f;
      }
      if (any) rowp[na++] = rows.row(tok);
    }
    if (!na) continue;
    for (size_t g = 0; g < ch.full; ++g) accumulate_chunk<B, MQ, 4>(g, d, rowp, sa, na, lut, acc);
    if (ch.half) accumulate_chunk<B, MQ, 2>(ch.full, d, rowp, sa, na, lut, acc);
    for (size_t j = ch.tail0; j < d; ++j)
      for (size_t t = 0; t < na; ++t) {
        const float c = lut.centroids[packed_index(rowp[t], j, B)];
        for (int i = 0; i < MQ; ++i) acc[static_cast<size_t>(i) * d + j] += sa[t][i] * c;
      }
  }
}

template <int B>
void mse_accumulate_t(const float* w, size_t w_stride, size_t m, const uint8_t* codes, size_t code_bytes,
                      const float* norms, size_t n, const uint32_t* idx, size_t n_idx, size_t d,
                      const float* centroids, float* acc) {
  const Lut<B> lut(centroids);
  const SafeRows rows(codes, code_bytes, n);
  size_t i = 0;
  for (; i + 4 <= m; i += 4) accumulate_pass<B, 4>(w + i * w_stride, w_stride, rows, norms, idx, n_idx, d, lut, acc + i * d);
  switch (m - i) {
    case 3: accumulate_pass<B, 3>(w + i * w_stride, w_stride, rows, norms, idx, n_idx, d, lut, acc + i * d); break;
    case 2: accumulate_pass<B, 2>(w + i * w_stride, w_stride, rows, norms, idx, n_idx, d, lut, acc + i * d); break;
    case 1: accumulate_pass<B, 1>(w + i * w_stride, w_stride, rows, norms, idx, n_idx, d, lut, acc + i * d); break;
    default: break;
  }
}

void mse_accumulate_neon(const float* w, size_t w_stride, size_t m, const uint8_t* codes, size_t code_bytes,
                         const float* norms, size_t n, size_t d, int bits, const float* centroids, float* acc) {
  if (code_bytes > kMaxDim)
    return scalar_kernels().mse_accumulate(w, w_stride, m, codes, code_bytes, norms, n, d, bits, centroids, acc);
  with_bits<8>(bits, [&]<int B>() { mse_accumulate_t<B>(w, w_stride, m, codes, code_bytes, norms, n, nullptr, n, d, centroids, acc); });
}

void mse_accumulate_rows_neon(const float* w, size_t w_stride, size_t m, const uint8_t* codes, size_t code_bytes,
                              const float* norms, size_t n, const uint32_t* idx, size_t n_idx, size_t d, int bits,
                              const float* centroids, float* acc) {
  if (code_bytes > kMaxDim)
    return scalar_kernels().mse_accumulate_rows(w, w_stride, m, codes, code_bytes, norms, n, idx, n_idx, d, bits,
                                                 centroids, acc);
  with_bits<8>(bits, [&]<int B>() {
    mse_accumulate_t<B>(w, w_stride, m, codes, code_bytes, norms, n, idx, n_idx, d, centroids, acc);
  });
}

// ---------------------------------------------------------------------------------------
// row_norms: the scalar reference's 16 double partial sums are the lanes of eight
// registers, added and folded in the same order, so the result is bit-identical (b·b is
// exact in double, so the fused multiply-add rounds once, like the scalar add).
void row_norms_neon(const float* x, size_t n, size_t d, float* out) {
  for (size_t r = 0; r < n; ++r) {
    const float* v = x + r * d;
    float64x2_t a[8];
    for (auto& e : a) e = vdupq_n_f64(0.0);
    size_t j = 0;
    for (; j + 16 <= d; j += 16) {
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const float32x4_t f = vld1q_f32(v + j + 4 * static_cast<size_t>(k));
        const float64x2_t lo = vcvt_f64_f32(vget_low_f32(f)), hi = vcvt_high_f64_f32(f);
        a[2 * k] = vfmaq_f64(a[2 * k], lo, lo);
        a[2 * k + 1] = vfmaq_f64(a[2 * k + 1], hi, hi);
      }
    }
    double s[16];
    for (int k = 0; k < 8; ++k) vst1q_f64(s + 2 * k, a[k]);
    for (; j < d; ++j) {
      const double t = v[j];
      s[j % 16] += t * t;
    }
    for (size_t k = 0; k < 8; ++k) s[k] += s[k + 8];
    const double t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    out[r] = static_cast<float>(std::sqrt(t));
  }
}

// ---------------------------------------------------------------------------------------
void half_to_float_neon(const uint16_t* h, size_t n, float* out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const float16x8_t v = vreinterpretq_f16_u16(vld1q_u16(h + i));
    vst1q_f32(out + i, vcvt_f32_f16(vget_low_f16(v)));
    vst1q_f32(out + i + 4, vcvt_high_f32_f16(v));
  }
  if (i < n) scalar_kernels().half_to_float(h + i, n - i, out + i);
}

// exp(x) for x in about [-87, 88]: range reduction x = k ln2 + r, degree-6 polynomial for
// e^r (Cephes expf coefficients, as kernels_avx2.cpp), 2^k built in the exponent bits.
inline float32x4_t exp4(float32x4_t x) {
  x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.3f)), vdupq_n_f32(88.3f));
  const float32x4_t k = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
  float32x4_t r = vfmsq_f32(x, k, vdupq_n_f32(0.693359375f));
  r = vfmsq_f32(r, k, vdupq_n_f32(-2.12194440e-4f));
  float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
  p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
  p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
  p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
  p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
  p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(k), vdupq_n_s32(127)), 23);
  return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

float exp_sum_neon(float* s, size_t n, float shift) {
  const float32x4_t sh = vdupq_n_f32(shift);
  float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
  size_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const float32x4_t e0 = exp4(vsubq_f32(vld1q_f32(s + t), sh));
    const float32x4_t e1 = exp4(vsubq_f32(vld1q_f32(s + t + 4), sh));
    vst1q_f32(s + t, e0);
    vst1q_f32(s + t + 4, e1);
    acc0 = vaddq_f32(acc0, e0);
    acc1 = vaddq_f32(acc1, e1);
  }
  float sum = vaddvq_f32(vaddq_f32(acc0, acc1));
  for (; t < n; t += 4) {
    alignas(16) float tmp[4];
    for (size_t k = 0; k < 4; ++k) tmp[k] = t + k < n ? s[t + k] - shift : -100.0f;
    vst1q_f32(tmp, exp4(vld1q_f32(tmp)));
    for (size_t k = 0; k < 4 && t + k < n; ++k) {
      s[t + k] = tmp[k];
      sum += tmp[k];
    }
  }
  return sum;
}

}  // namespace

const Kernels& neon_kernels() {
  static const Kernels k{"neon", fwht_neon, quantize_pack_neon, mse_scores_neon, mse_accumulate_neon,
                         mse_accumulate_rows_neon,
                         row_norms_neon, half_to_float_neon, exp_sum_neon, hadamard_rotate_neon,
                         f16_scores_neon, f16_accumulate_neon};
  return k;
}

}  // namespace turboquant::cpu

#endif  // TURBOQUANT_NEON_KERNELS
