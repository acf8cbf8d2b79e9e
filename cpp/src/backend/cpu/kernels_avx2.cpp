// AVX2 + FMA kernels: same signatures and semantics as kernels_scalar.cpp (codes bit-exact,
// scores and sums within fp tolerance). Compiled with -mavx2 -mfma -mf16c (CMake: *_avx2.cpp)
// and only called when cpu_features() reports all three.
//
// Decoding b-bit codes: 8 coordinates occupy b bytes of a row (layout v1, LSB first), so one
// 32-bit load (b <= 4) or 64-bit load (b > 4) followed by a per-lane variable shift puts
// index k in the low bits of lane k. The centroid lookup is then
//   b <= 3: one _mm256_permutevar8x32_ps on a register holding the table, replicated to 8
//           entries so the index bits above b need no masking;
//   b == 4: two permutes (low / high half of the 16-entry table) and a blend on bit 3;
//   b >= 5: _mm256_i32gather_ps from the table (L1-resident).
// The alternative, a FAISS fast-scan layout (codes of 32 tokens interleaved per coordinate,
// query-specific LUTs in registers), needs one LUT permute per (query, coordinate) instead
// of one per coordinate shared by every query of a GQA group; see bench/bench_kernels.cpp
// (BM_scores_fastscan) for the measured comparison that kept this design.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cpu/bits_dispatch.h"
#include "backend/cpu/kernels.h"
#include "turboquant/codebook.h"
#include "turboquant/packing.h"

namespace turboquant::cpu {
namespace {

// ---------------------------------------------------------------------------------------
// fwht: the first three butterfly stages inside each 8-float register (permute + FMA with a
// ±1 vector, which rounds exactly like the scalar a+b / a-b), the rest across registers.
inline __m256 fwht8(__m256 v, __m256 s1, __m256 s2, __m256 s4) {
  v = _mm256_fmadd_ps(v, s1, _mm256_permute_ps(v, 0xB1));
  v = _mm256_fmadd_ps(v, s2, _mm256_permute_ps(v, 0x4E));
  return _mm256_fmadd_ps(v, s4, _mm256_permute2f128_ps(v, v, 1));
}

// Butterfly stages h = H, 2H, ... < NV across registers, with compile-time bounds so that
// everything unrolls and r[] stays in registers.
template <int NV, int H>
inline void fwht_stages(__m256* r) {
  if constexpr (H < NV) {
#pragma GCC unroll 16
    for (int i = 0; i < NV; i += 2 * H)
#pragma GCC unroll 16
      for (int j = 0; j < H; ++j) {
        const __m256 a = r[i + j], b = r[i + j + H];
        r[i + j] = _mm256_add_ps(a, b);
        r[i + j + H] = _mm256_sub_ps(a, b);
      }
    fwht_stages<NV, 2 * H>(r);
  }
}

// n = 8·NV <= 128 held entirely in registers: all log2(n) stages without memory traffic.
template <int NV>
inline void fwht_regs(float* x, __m256 s1, __m256 s2, __m256 s4) {
  __m256 r[NV];
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) r[i] = fwht8(_mm256_loadu_ps(x + 8 * i), s1, s2, s4);
  fwht_stages<NV, 1>(r);
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(x + 8 * i, r[i]);
}

void fwht_avx2(float* x, size_t n) {
  if (n < 8) {
    scalar_kernels().fwht(x, n);
    return;
  }
  const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  const __m256 s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  const __m256 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  switch (n) {
    case 8: return fwht_regs<1>(x, s1, s2, s4);
    case 16: return fwht_regs<2>(x, s1, s2, s4);
    case 32: return fwht_regs<4>(x, s1, s2, s4);
    case 64: return fwht_regs<8>(x, s1, s2, s4);
    default: break;
  }
  // n >= 128: blocks of 128 in registers, the remaining stages across blocks in memory.
  for (size_t i = 0; i < n; i += 128) fwht_regs<16>(x + i, s1, s2, s4);
  for (size_t h = 128; h < n; h <<= 1) {
    for (size_t i = 0; i < n; i += 2 * h) {
      for (size_t j = i; j < i + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + h);
        _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
        _mm256_storeu_ps(x + j + h, _mm256_sub_ps(a, b));
      }
    }
  }
}

// hadamard_rotate: n = 8·NV <= 128 coordinates of a row stay in registers through both
// transforms and the three elementwise products (same order of roundings as the scalar).
template <int NV>
inline void hadamard_regs(const float* u, float* v, const float* rs, const float* pre,
                          const float* mid, const float* post, __m256 s1, __m256 s2, __m256 s4) {
  __m256 r[NV];
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) {
    r[i] = _mm256_loadu_ps(u + 8 * i);
    if (rs) r[i] = _mm256_mul_ps(r[i], _mm256_broadcast_ss(rs));
    if (pre) r[i] = _mm256_mul_ps(r[i], _mm256_loadu_ps(pre + 8 * i));
    r[i] = fwht8(r[i], s1, s2, s4);
  }
  fwht_stages<NV, 1>(r);
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) r[i] = fwht8(_mm256_mul_ps(r[i], _mm256_loadu_ps(mid + 8 * i)), s1, s2, s4);
  fwht_stages<NV, 1>(r);
#pragma GCC unroll 16
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(v + 8 * i, _mm256_mul_ps(r[i], _mm256_loadu_ps(post + 8 * i)));
}

template <int NV>
void hadamard_rows(const float* x, size_t n, const float* row_scale, const float* pre,
                   const float* mid, const float* post, float* y) {
  const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  const __m256 s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  const __m256 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  constexpr size_t d = 8 * NV;
  for (size_t r = 0; r < n; ++r)
    hadamard_regs<NV>(x + r * d, y + r * d, row_scale ? row_scale + r : nullptr, pre, mid, post, s1, s2, s4);
}

void hadamard_rotate_avx2(const float* x, size_t n, size_t d, const float* row_scale,
                          const float* pre, const float* mid, const float* post, float* y) {
  switch (d) {
    case 8: return hadamard_rows<1>(x, n, row_scale, pre, mid, post, y);
    case 16: return hadamard_rows<2>(x, n, row_scale, pre, mid, post, y);
    case 32: return hadamard_rows<4>(x, n, row_scale, pre, mid, post, y);
    case 64: return hadamard_rows<8>(x, n, row_scale, pre, mid, post, y);
    case 128: return hadamard_rows<16>(x, n, row_scale, pre, mid, post, y);
    default: break;
  }
  for (size_t r = 0; r < n; ++r) {  // other sizes: the scalar order with the SIMD transform
    const float* u = x + r * d;
    float* v = y + r * d;
    for (size_t j = 0; j < d; ++j) {
      float t = row_scale ? u[j] * row_scale[r] : u[j];
      if (pre) t *= pre[j];
      v[j] = t;
    }
    fwht_avx2(v, d);
    for (size_t j = 0; j < d; ++j) v[j] *= mid[j];
    fwht_avx2(v, d);
    for (size_t j = 0; j < d; ++j) v[j] *= post[j];
  }
}

// ---------------------------------------------------------------------------------------
// quantize_pack: index = number of boundaries <= v. _CMP_NLT_UQ is "not v < b", exactly the
// scalar binary search's test, so NaN lands on the last index there and here alike.
// B <= 4: a branchless binary search, one compare per bit; the boundary to compare with
// comes from a register table indexed by the bits decided so far (one vpermd per level).
// For b distinct, increasing boundaries this is exactly the count of boundaries <= v.
template <int B>
struct BoundaryTables {
  __m256 t[B > 4 ? 1 : B];
  explicit BoundaryTables(const float* boundaries) {
    if constexpr (B <= 4) {
      for (int level = 0; level < B; ++level) {
        // Level L decides bit B-1-L; the decided bits form idx (a multiple of 2^(B-L)), the
        // boundary to test is idx + 2^(B-1-L) - 1. Tables are indexed by idx >> (B - 3) for
        // B = 4 (idx even there at every level), by idx itself for B <= 3.
        alignas(32) float a[8];
        const int half = 1 << (B - 1 - level);
        for (int i = 0; i < 8; ++i) {
          const int idx = level == 0 ? 0 : (B == 4 ? 2 * i : i);  // level 0: no bits yet
          const int k = std::min(idx + half - 1, (1 << B) - 2);
          a[i] = boundaries[k];
        }
        t[level] = _mm256_load_ps(a);
      }
    } else {
      t[0] = _mm256_setzero_ps();
    }
  }
};

template <int B>
inline __m256i quantize8(__m256 v, const BoundaryTables<B>& bt, const float* boundaries) {
  if constexpr (B <= 4) {
    (void)boundaries;
    __m256i idx = _mm256_setzero_si256();
    for (int level = 0; level < B; ++level) {
      const __m256i sel = B == 4 ? _mm256_srli_epi32(idx, 1) : idx;
      const __m256 b = level == 0 ? bt.t[0] : _mm256_permutevar8x32_ps(bt.t[level], sel);
      const __m256i ge = _mm256_castps_si256(_mm256_cmp_ps(v, b, _CMP_NLT_UQ));
      idx = _mm256_or_si256(idx, _mm256_and_si256(ge, _mm256_set1_epi32(1 << (B - 1 - level))));
    }
    return idx;
  } else {
    (void)bt;
    __m256i pos = _mm256_setzero_si256();  // branchless binary search, one gather a step
    for (int step = 1 << (B - 1); step; step >>= 1) {
      const __m256i stepv = _mm256_set1_epi32(step);
      const __m256i cand = _mm256_add_epi32(pos, stepv);
      const __m256 b = _mm256_i32gather_ps(boundaries, _mm256_sub_epi32(cand, _mm256_set1_epi32(1)), 4);
      pos = _mm256_add_epi32(pos, _mm256_and_si256(stepv, _mm256_castps_si256(_mm256_cmp_ps(v, b, _CMP_NLT_UQ))));
    }
    return pos;
  }
}

// Packs 32 indices (bytes, each < 2^B) held in a register into 4 groups of 8B bits, one
// group per 64-bit lane, by three shift-or rounds (8 -> 16 -> 32 -> 64 bit fields).
template <int B>
inline __m256i compact32(__m256i x) {
  const __m128i b1 = _mm_cvtsi32_si128(B), b2 = _mm_cvtsi32_si128(2 * B), b4 = _mm_cvtsi32_si128(4 * B);
  const __m256i m16 = _mm256_set1_epi64x(0x00FF00FF00FF00FFLL);
  const __m256i m32 = _mm256_set1_epi64x(0x0000FFFF0000FFFFLL);
  const __m256i m64 = _mm256_set1_epi64x(0x00000000FFFFFFFFLL);
  x = _mm256_or_si256(_mm256_and_si256(x, m16), _mm256_sll_epi64(_mm256_and_si256(_mm256_srli_epi64(x, 8), m16), b1));
  x = _mm256_or_si256(_mm256_and_si256(x, m32), _mm256_sll_epi64(_mm256_and_si256(_mm256_srli_epi64(x, 16), m32), b2));
  x = _mm256_or_si256(_mm256_and_si256(x, m64), _mm256_sll_epi64(_mm256_srli_epi64(x, 32), b4));
  return x;
}

template <int B>
void quantize_pack_avx2_t(const float* y, size_t n, size_t d, const float* boundaries,
                          uint8_t* codes, size_t code_bytes) {
  const BoundaryTables<B> bv(boundaries);
  const size_t nbytes = packed_bytes(d, B);
  alignas(32) uint8_t idx[kMaxDim + 32];
  alignas(32) uint8_t row[kMaxDim + 16];
  alignas(32) uint64_t lanes[4];
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (size_t r = 0; r < n; ++r) {
    const float* v = y + r * d;
    size_t j = 0;
    for (; j + 32 <= d; j += 32) {
      const __m256i a = quantize8<B>(_mm256_loadu_ps(v + j), bv, boundaries);
      const __m256i b = quantize8<B>(_mm256_loadu_ps(v + j + 8), bv, boundaries);
      const __m256i c = quantize8<B>(_mm256_loadu_ps(v + j + 16), bv, boundaries);
      const __m256i e = quantize8<B>(_mm256_loadu_ps(v + j + 24), bv, boundaries);
      const __m256i bytes = _mm256_permutevar8x32_epi32(
          _mm256_packus_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, e)), order);
      if constexpr (B == 8) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + j), bytes);
      } else {
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), compact32<B>(bytes));
        // Each lane holds B bytes followed by zeros: overlapping 8-byte writes in order.
        for (size_t k = 0; k < 4; ++k) std::memcpy(row + (j / 8 + k) * B, &lanes[k], 8);
      }
    }
    if (j == d) {
      std::memcpy(codes + r * code_bytes, row, nbytes);
      continue;
    }
    // Remainder (d not a multiple of 32): indices one register at a time, then the
    // reference packer for the whole row.
    if constexpr (B == 8) {
      for (size_t k = 0; k < j; ++k) idx[k] = row[k];
    } else {
      unpack_indices(row, j, B, idx);
    }
    for (; j + 8 <= d; j += 8) {
      alignas(32) int32_t t[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(t), quantize8<B>(_mm256_loadu_ps(v + j), bv, boundaries));
      for (size_t k = 0; k < 8; ++k) idx[j + k] = static_cast<uint8_t>(t[k]);
    }
    for (; j < d; ++j) {
      int lo = 0, hi = (1 << B) - 1;
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (v[j] < boundaries[mid]) hi = mid; else lo = mid + 1;
      }
      idx[j] = static_cast<uint8_t>(lo);
    }
    pack_indices(idx, d, B, codes + r * code_bytes);
  }
}

void quantize_pack_avx2(const float* y, size_t n, size_t d, const float* boundaries, int bits,
                        uint8_t* codes, size_t code_bytes) {
  with_bits<8>(bits, [&]<int B>() { quantize_pack_avx2_t<B>(y, n, d, boundaries, codes, code_bytes); });
}

// ---------------------------------------------------------------------------------------
// Centroid lookup for 8 coordinates of one code row.
template <int B>
struct Lut {
  __m256 t0, t1;
  __m256i shifts, mask;
  const float* centroids;
  explicit Lut(const float* c) : centroids(c) {
    alignas(32) float a[8], b[8];
    for (int i = 0; i < 8; ++i) {
      a[i] = B <= 3 ? c[i & ((1 << B) - 1)] : (B == 4 ? c[i] : 0.0f);
      b[i] = B == 4 ? c[8 + i] : 0.0f;
    }
    t0 = _mm256_load_ps(a);
    t1 = _mm256_load_ps(b);
    if constexpr (B <= 4) {
      shifts = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
    } else {
      shifts = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 0, B, 2 * B, 3 * B);
    }
    mask = _mm256_set1_epi32((1 << B) - 1);
  }
  // Coordinates 8g..8g+7 of `row`. Reads up to 4 (B <= 4) or 8 bytes from row + g*B: the
  // caller guarantees they are readable (bits beyond the group are ignored).
  inline __m256 load(const uint8_t* row, size_t g) const {
    const uint8_t* p = row + g * B;
    if constexpr (B <= 4) {
      uint32_t w;
      std::memcpy(&w, p, 4);
      const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), shifts);
      if constexpr (B <= 3) {
        return _mm256_permutevar8x32_ps(t0, idx);
      } else {
        const __m256 lo = _mm256_permutevar8x32_ps(t0, idx), hi = _mm256_permutevar8x32_ps(t1, idx);
        return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
      }
    } else {
      uint64_t w;
      std::memcpy(&w, p, 8);
      const auto lo = static_cast<int>(static_cast<uint32_t>(w));
      const auto hi = static_cast<int>(static_cast<uint32_t>(w >> (4 * B)));
      const __m256i idx = _mm256_and_si256(
          _mm256_srlv_epi32(_mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi), shifts), mask);
      return _mm256_i32gather_ps(centroids, idx, 4);
    }
  }
};

// Rows are read with loads that may run up to 8 bytes past a row's packed bytes. That stays
// inside the buffer except for the last ceil(8 / code_bytes) rows (short rows: b = 1,
// d = 16 is 2 bytes), which are copied into zero-padded scratch.
struct SafeRows {
  const uint8_t* codes;
  size_t code_bytes, first_tail;
  alignas(32) uint8_t tail[kMaxDim + 32];  // callers guarantee code_bytes <= kMaxDim
  SafeRows(const uint8_t* c, size_t cb, size_t n) : codes(c), code_bytes(cb) {
    const size_t k = std::min(n, (8 + code_bytes - 1) / code_bytes);
    first_tail = n - k;
    std::memset(tail, 0, k * code_bytes + 16);
    if (k) std::memcpy(tail, codes + first_tail * code_bytes, k * code_bytes);
  }
  inline const uint8_t* row(size_t t) const {
    return t >= first_tail ? tail + (t - first_tail) * code_bytes : codes + t * code_bytes;
  }
};

// Sum of each of 8 registers, as one register (lane k = sum of v[k]).
inline __m256 hsum8(const __m256* v) {
  const __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 a = _mm256_hadd_ps(s01, s23), b = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// mse_scores for MQ (1..4) queries sharing each decoded group of centroids. TT tokens are
// decoded side by side so that MQ×TT independent FMA chains hide the FMA latency; the
// per-token partial sums are reduced 8 tokens at a time (hsum8).
template <int B, int MQ>
void scores_pass(const float* q, size_t d, const SafeRows& rows, const float* norms, size_t n,
                 const Lut<B>& lut, float* out, size_t out_stride) {
  constexpr size_t TT = MQ == 1 ? 4 : 2;
  const size_t G = d / 8;
  alignas(32) __m256 part[MQ][8];
  for (size_t t0 = 0; t0 < n; t0 += 8) {
    const size_t nt = std::min<size_t>(8, n - t0);
    if (nt < 8)
      for (auto& pq : part)
        for (auto& p : pq) p = _mm256_setzero_ps();
    size_t tt = 0;
    for (; tt + TT <= nt; tt += TT) {
      const uint8_t* row[TT];
      for (size_t u = 0; u < TT; ++u) row[u] = rows.row(t0 + tt + u);
      __m256 acc[MQ][TT];
      for (int i = 0; i < MQ; ++i)
        for (size_t u = 0; u < TT; ++u) acc[i][u] = _mm256_setzero_ps();
      for (size_t g = 0; g < G; ++g) {
        __m256 qv[MQ];
        for (int i = 0; i < MQ; ++i) qv[i] = _mm256_loadu_ps(q + i * d + 8 * g);
        for (size_t u = 0; u < TT; ++u) {
          const __m256 c = lut.load(row[u], g);
          for (int i = 0; i < MQ; ++i) acc[i][u] = _mm256_fmadd_ps(qv[i], c, acc[i][u]);
        }
      }
      for (size_t j = 8 * G; j < d; ++j)
        for (size_t u = 0; u < TT; ++u) {
          const float c = lut.centroids[packed_index(row[u], j, B)];
          for (int i = 0; i < MQ; ++i)
            acc[i][u] = _mm256_add_ps(acc[i][u], _mm256_setr_ps(q[i * d + j] * c, 0, 0, 0, 0, 0, 0, 0));
        }
      for (int i = 0; i < MQ; ++i)
        for (size_t u = 0; u < TT; ++u) part[i][tt + u] = acc[i][u];
    }
    for (; tt < nt; ++tt) {
      const uint8_t* row = rows.row(t0 + tt);
      __m256 acc[MQ];
      for (int i = 0; i < MQ; ++i) acc[i] = _mm256_setzero_ps();
      for (size_t g = 0; g < G; ++g) {
        const __m256 c = lut.load(row, g);
        for (int i = 0; i < MQ; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * d + 8 * g), c, acc[i]);
      }
      for (size_t j = 8 * G; j < d; ++j) {
        const float c = lut.centroids[packed_index(row, j, B)];
        for (int i = 0; i < MQ; ++i) acc[i] = _mm256_add_ps(acc[i], _mm256_setr_ps(q[i * d + j] * c, 0, 0, 0, 0, 0, 0, 0));
      }
      for (int i = 0; i < MQ; ++i) part[i][tt] = acc[i];
    }
    __m256 nv;
    if (nt == 8) {
      nv = _mm256_loadu_ps(norms + t0);
    } else {
      alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (size_t k = 0; k < nt; ++k) tmp[k] = norms[t0 + k];
      nv = _mm256_load_ps(tmp);
    }
    for (int i = 0; i < MQ; ++i) {
      const __m256 s = _mm256_mul_ps(nv, hsum8(part[i]));
      if (nt == 8) {
        _mm256_storeu_ps(out + i * out_stride + t0, s);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, s);
        for (size_t k = 0; k < nt; ++k) out[i * out_stride + t0 + k] = tmp[k];
      }
    }
  }
}

template <int B>
void mse_scores_t(const float* q, size_t m, const uint8_t* codes, size_t code_bytes,
                  const float* norms, size_t n, size_t d, const float* centroids, float* out,
                  size_t out_stride) {
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

void mse_scores_avx2(const float* q, size_t m, const uint8_t* codes, size_t code_bytes,
                     const float* norms, size_t n, size_t d, int bits, const float* centroids,
                     float* out, size_t out_stride) {
  if (code_bytes > kMaxDim)  // wider rows than any MSE code (SafeRows scratch): reference
    return scalar_kernels().mse_scores(q, m, codes, code_bytes, norms, n, d, bits, centroids, out, out_stride);
  with_bits<8>(bits, [&]<int B>() { mse_scores_t<B>(q, m, codes, code_bytes, norms, n, d, centroids, out, out_stride); });
}

// ---------------------------------------------------------------------------------------
// mse_accumulate: blocks of tokens; within a block, GC groups of 8 coordinates × MQ queries
// of the accumulator stay in registers while every token of the block is added.
constexpr size_t kTokenBlock = 64;

template <int B, int MQ, int GC>
inline void accumulate_groups(size_t g0, size_t d, const uint8_t* const* rowp, const float (*sa)[4],
                              size_t na, const Lut<B>& lut, float* acc) {
  __m256 a[MQ][GC];
  for (int i = 0; i < MQ; ++i)
    for (int c = 0; c < GC; ++c) a[i][c] = _mm256_loadu_ps(acc + i * d + 8 * (g0 + c));
  for (size_t t = 0; t < na; ++t) {
    __m256 s[MQ];
    for (int i = 0; i < MQ; ++i) s[i] = _mm256_broadcast_ss(&sa[t][i]);
    for (int c = 0; c < GC; ++c) {
      const __m256 cv = lut.load(rowp[t], g0 + c);
      for (int i = 0; i < MQ; ++i) a[i][c] = _mm256_fmadd_ps(s[i], cv, a[i][c]);
    }
  }
  for (int i = 0; i < MQ; ++i)
    for (int c = 0; c < GC; ++c) _mm256_storeu_ps(acc + i * d + 8 * (g0 + c), a[i][c]);
}

template <int B, int MQ>
void accumulate_pass(const float* w, size_t w_stride, const SafeRows& rows, const float* norms,
                     const uint32_t* idx, size_t n, size_t d, const Lut<B>& lut, float* acc) {
  constexpr int GC = MQ == 1 ? 8 : (MQ == 2 ? 4 : 2);
  const size_t G = d / 8;
  const uint8_t* rowp[kTokenBlock];
  float sa[kTokenBlock][4];
  for (size_t t0 = 0; t0 < n; t0 += kTokenBlock) {
    const size_t nt = std::min(kTokenBlock, n - t0);
    size_t na = 0;  // tokens with a non-zero weight for some query (masked ones are skipped)
    for (size_t t = 0; t < nt; ++t) {
      const size_t tok = idx ? idx[t0 + t] : t0 + t;  // sparse V lists the rows to add
      bool any = false;
      for (int i = 0; i < MQ; ++i) {
        sa[na][i] = w[i * w_stride + tok] * norms[tok];
        any |= sa[na][i] != 0.0f;
      }
      if (any) rowp[na++] = rows.row(tok);
    }
    if (!na) continue;
    size_t g = 0;
    for (; g + GC <= G; g += GC) accumulate_groups<B, MQ, GC>(g, d, rowp, sa, na, lut, acc);
    for (; g < G; ++g) accumulate_groups<B, MQ, 1>(g, d, rowp, sa, na, lut, acc);
    for (size_t j = 8 * G; j < d; ++j)
      for (size_t t = 0; t < na; ++t) {
        const float c = lut.centroids[packed_index(rowp[t], j, B)];
        for (int i = 0; i < MQ; ++i) acc[i * d + j] += sa[t][i] * c;
      }
  }
}

template <int B>
void mse_accumulate_t(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                      size_t code_bytes, const float* norms, size_t n, const uint32_t* idx,
                      size_t n_idx, size_t d, const float* centroids, float* acc) {
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

void mse_accumulate_avx2(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                         size_t code_bytes, const float* norms, size_t n, size_t d, int bits,
                         const float* centroids, float* acc) {
  if (code_bytes > kMaxDim)
    return scalar_kernels().mse_accumulate(w, w_stride, m, codes, code_bytes, norms, n, d, bits, centroids, acc);
  with_bits<8>(bits, [&]<int B>() { mse_accumulate_t<B>(w, w_stride, m, codes, code_bytes, norms, n, nullptr, n, d, centroids, acc); });
}

void mse_accumulate_rows_avx2(const float* w, size_t w_stride, size_t m, const uint8_t* codes, size_t code_bytes,
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
// row_norms: the scalar reference's 16 double partial sums are the lanes of four
// registers (four independent add chains), added and folded in the same order, so the
// result is bit-identical.
void row_norms_avx2(const float* x, size_t n, size_t d, float* out) {
  for (size_t r = 0; r < n; ++r) {
    const float* v = x + r * d;
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd(), a2 = _mm256_setzero_pd(), a3 = _mm256_setzero_pd();
    size_t j = 0;
    for (; j + 16 <= d; j += 16) {
      const __m256d b0 = _mm256_cvtps_pd(_mm_loadu_ps(v + j)), b1 = _mm256_cvtps_pd(_mm_loadu_ps(v + j + 4));
      const __m256d b2 = _mm256_cvtps_pd(_mm_loadu_ps(v + j + 8)), b3 = _mm256_cvtps_pd(_mm_loadu_ps(v + j + 12));
      // b·b is exact in double (24-bit mantissas), so the fused multiply-add rounds once,
      // exactly like the scalar add of the exact square.
      a0 = _mm256_fmadd_pd(b0, b0, a0);
      a1 = _mm256_fmadd_pd(b1, b1, a1);
      a2 = _mm256_fmadd_pd(b2, b2, a2);
      a3 = _mm256_fmadd_pd(b3, b3, a3);
    }
    alignas(32) double s[16];
    _mm256_store_pd(s, a0);
    _mm256_store_pd(s + 4, a1);
    _mm256_store_pd(s + 8, a2);
    _mm256_store_pd(s + 12, a3);
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
void half_to_float_avx2(const uint16_t* h, size_t n, float* out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  if (i < n) scalar_kernels().half_to_float(h + i, n - i, out + i);
}

// exp(x) for x in about [-87, 88]: range reduction x = k ln2 + r, degree-6 polynomial
// for e^r (Cephes expf coefficients), 2^k built in the exponent bits.
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

float exp_sum_avx2(float* s, size_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  size_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), sh));
    _mm256_storeu_ps(s + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  if (t < n) {
    alignas(32) float tmp[8];
    for (size_t k = 0; k < 8; ++k) tmp[k] = t + k < n ? s[t + k] - shift : -100.0f;
    const __m256 e = exp256(_mm256_load_ps(tmp));
    _mm256_store_ps(tmp, e);
    for (size_t k = 0; t + k < n; ++k) {
      s[t + k] = tmp[k];
      acc = _mm256_add_ps(acc, _mm256_setr_ps(tmp[k], 0, 0, 0, 0, 0, 0, 0));
    }
  }
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}

}  // namespace

const Kernels& avx2_kernels() {
  static const Kernels k{"avx2", fwht_avx2, quantize_pack_avx2, mse_scores_avx2,
                         mse_accumulate_avx2, mse_accumulate_rows_avx2, row_norms_avx2, half_to_float_avx2,
                         exp_sum_avx2, hadamard_rotate_avx2, f16_scores_avx2, f16_accumulate_avx2};
  return k;
}

}  // namespace turboquant::cpu

#endif  // x86
