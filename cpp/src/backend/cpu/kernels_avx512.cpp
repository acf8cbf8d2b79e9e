// AVX-512 kernels (F/BW/VL/DQ): the decode hot loops widened to 16 coordinates a register;
// everything else is the AVX2 set. Same signatures and semantics as kernels_scalar.cpp.
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq (CMake: *_avx512.cpp) and only
// called when cpu_features() reports them.
//
// Decoding b <= 4 bit codes: 16 coordinates occupy 2b <= 8 bytes of a row (layout v1), so
// two 32-bit broadcast loads (coordinates 0-7 and 8-15) and one per-lane
// variable shift put index k in the low bits of lane k; one vpermps on a register holding
// the 16-entry centroid table (replicated for b < 4, so index bits above b need no mask)
// gives the centroids. b >= 5, or d not a multiple of 16: the AVX2 kernels.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

// GCC 12 reports the deliberately undefined registers of avx512fintrin.h's
// _mm512_undefined_* (used inside _mm512_set1_*, _mm512_extractf32x8_ps, ...) as
// maybe-uninitialized once they are inlined here: a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cstring>

#include "backend/cpu/bits_dispatch.h"
#include "backend/cpu/kernels.h"
#include "turboquant/codebook.h"
#include "turboquant/packing.h"

namespace turboquant::cpu {
namespace {

template <int B>
struct Lut16 {
  __m512 table;
  __m512i shifts;
  explicit Lut16(const float* c) {
    alignas(64) float a[16];
    for (int i = 0; i < 16; ++i) a[i] = c[i & ((1 << B) - 1)];
    table = _mm512_load_ps(a);
    shifts = _mm512_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B, 0, B, 2 * B, 3 * B,
                               4 * B, 5 * B, 6 * B, 7 * B);
  }
  // Coordinates 16g..16g+15 of `row`; reads 4 bytes at row + 2gB and at row + 2gB + B
  // (the caller guarantees 8 bytes past row + 2gB are readable).
  // Coordinates 8..15 start exactly B bytes after 0..7, so both halves are 32-bit memory
  // broadcasts (load ports, no shuffle-port uop), the second one merged under a mask.
  inline __m512 load(const uint8_t* row, size_t g) const {
    const uint8_t* p = row + 2 * g * B;
    const __m512i lo = _mm512_broadcastd_epi32(_mm_loadu_si32(p));
    const __m512i both = _mm512_mask_broadcastd_epi32(lo, 0xFF00, _mm_loadu_si32(p + B));
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(both, shifts), table);
  }
};

// As in kernels_avx2.cpp: loads may run up to 8 bytes past a row, so the last rows are
// read from zero-padded scratch.
struct SafeRows {
  const uint8_t* codes;
  size_t code_bytes, first_tail;
  alignas(64) uint8_t tail[kMaxDim + 32];
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

inline __m256 fold(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
}

// Sum of each of 8 registers, as one register (lane k = sum of v[k]).
inline __m256 hsum8(const __m256* v) {
  const __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 a = _mm256_hadd_ps(s01, s23), b = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

template <int B, int MQ>
void scores_pass(const float* q, size_t d, const SafeRows& rows, const float* norms, size_t n,
                 const Lut16<B>& lut, float* out, size_t out_stride) {
  constexpr size_t TT = MQ <= 2 ? 4 : 2;
  const size_t G = d / 16;
  __m256 part[MQ][8];
  for (size_t t0 = 0; t0 < n; t0 += 8) {
    const size_t nt = std::min<size_t>(8, n - t0);
    if (nt < 8)
      for (auto& pq : part)
        for (auto& p : pq) p = _mm256_setzero_ps();
    size_t tt = 0;
    for (; tt + TT <= nt; tt += TT) {
      const uint8_t* row[TT];
      for (size_t u = 0; u < TT; ++u) row[u] = rows.row(t0 + tt + u);
      __m512 acc[MQ][TT];
      for (int i = 0; i < MQ; ++i)
        for (size_t u = 0; u < TT; ++u) acc[i][u] = _mm512_setzero_ps();
      for (size_t g = 0; g < G; ++g) {
        __m512 qv[MQ];
        for (int i = 0; i < MQ; ++i) qv[i] = _mm512_loadu_ps(q + i * d + 16 * g);
        for (size_t u = 0; u < TT; ++u) {
          const __m512 c = lut.load(row[u], g);
          for (int i = 0; i < MQ; ++i) acc[i][u] = _mm512_fmadd_ps(qv[i], c, acc[i][u]);
        }
      }
      for (int i = 0; i < MQ; ++i)
        for (size_t u = 0; u < TT; ++u) part[i][tt + u] = fold(acc[i][u]);
    }
    for (; tt < nt; ++tt) {
      const uint8_t* row = rows.row(t0 + tt);
      __m512 acc[MQ];
      for (int i = 0; i < MQ; ++i) acc[i] = _mm512_setzero_ps();
      for (size_t g = 0; g < G; ++g) {
        const __m512 c = lut.load(row, g);
        for (int i = 0; i < MQ; ++i) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i * d + 16 * g), c, acc[i]);
      }
      for (int i = 0; i < MQ; ++i) part[i][tt] = fold(acc[i]);
    }
    const __mmask8 live = static_cast<__mmask8>((1u << nt) - 1u);
    const __m256 nv = _mm256_maskz_loadu_ps(live, norms + t0);
    for (int i = 0; i < MQ; ++i)
      _mm256_mask_storeu_ps(out + i * out_stride + t0, live, _mm256_mul_ps(nv, hsum8(part[i])));
  }
}

template <int B>
void mse_scores_t(const float* q, size_t m, const uint8_t* codes, size_t code_bytes,
                  const float* norms, size_t n, size_t d, const float* centroids, float* out,
                  size_t out_stride) {
  const Lut16<B> lut(centroids);
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

void mse_scores_avx512(const float* q, size_t m, const uint8_t* codes, size_t code_bytes,
                       const float* norms, size_t n, size_t d, int bits, const float* centroids,
                       float* out, size_t out_stride) {
  if (bits > 4 || d % 16 != 0 || code_bytes > kMaxDim)
    return avx2_kernels().mse_scores(q, m, codes, code_bytes, norms, n, d, bits, centroids, out, out_stride);
  with_bits<4>(bits, [&]<int B>() { mse_scores_t<B>(q, m, codes, code_bytes, norms, n, d, centroids, out, out_stride); });
}

// mse_accumulate: blocks of tokens; within a block, GC groups of 16 coordinates × MQ queries
// of the accumulator stay in registers while every token of the block is added.
constexpr size_t kTokenBlock = 64;

template <int B, int MQ, int GC>
inline void accumulate_groups(size_t g0, size_t d, const uint8_t* const* rowp, const float (*sa)[4],
                              size_t na, const Lut16<B>& lut, float* acc) {
  __m512 a[MQ][GC];
  for (int i = 0; i < MQ; ++i)
    for (int c = 0; c < GC; ++c) a[i][c] = _mm512_loadu_ps(acc + i * d + 16 * (g0 + c));
  for (size_t t = 0; t < na; ++t) {
    __m512 s[MQ];
    for (int i = 0; i < MQ; ++i) s[i] = _mm512_set1_ps(sa[t][i]);
    for (int c = 0; c < GC; ++c) {
      const __m512 cv = lut.load(rowp[t], g0 + c);
      for (int i = 0; i < MQ; ++i) a[i][c] = _mm512_fmadd_ps(s[i], cv, a[i][c]);
    }
  }
  for (int i = 0; i < MQ; ++i)
    for (int c = 0; c < GC; ++c) _mm512_storeu_ps(acc + i * d + 16 * (g0 + c), a[i][c]);
}

template <int B, int MQ>
void accumulate_pass(const float* w, size_t w_stride, const SafeRows& rows, const float* norms,
                     const uint32_t* idx, size_t n, size_t d, const Lut16<B>& lut, float* acc) {
  constexpr int GC = MQ <= 2 ? 8 : 4;
  const size_t G = d / 16;
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
  }
}

template <int B>
void mse_accumulate_t(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                      size_t code_bytes, const float* norms, size_t n, const uint32_t* idx,
                      size_t n_idx, size_t d, const float* centroids, float* acc) {
  const Lut16<B> lut(centroids);
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

void mse_accumulate_avx512(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                           size_t code_bytes, const float* norms, size_t n, size_t d, int bits,
                           const float* centroids, float* acc) {
  if (bits > 4 || d % 16 != 0 || code_bytes > kMaxDim)
    return avx2_kernels().mse_accumulate(w, w_stride, m, codes, code_bytes, norms, n, d, bits, centroids, acc);
  with_bits<4>(bits, [&]<int B>() { mse_accumulate_t<B>(w, w_stride, m, codes, code_bytes, norms, n, nullptr, n, d, centroids, acc); });
}

void mse_accumulate_rows_avx512(const float* w, size_t w_stride, size_t m, const uint8_t* codes, size_t code_bytes,
                              const float* norms, size_t n, const uint32_t* idx, size_t n_idx, size_t d, int bits,
                              const float* centroids, float* acc) {
  if (bits > 4 || d % 16 != 0 || code_bytes > kMaxDim)
    return avx2_kernels().mse_accumulate_rows(w, w_stride, m, codes, code_bytes, norms, n, idx, n_idx, d, bits,
                                                 centroids, acc);
  with_bits<4>(bits, [&]<int B>() {
    mse_accumulate_t<B>(w, w_stride, m, codes, code_bytes, norms, n, idx, n_idx, d, centroids, acc);
  });
}

}  // namespace

const Kernels& avx512_kernels() {
  static const Kernels k = [] {
    Kernels t = avx2_kernels();
    t.name = "avx512";
    t.mse_scores = mse_scores_avx512;
    t.mse_accumulate = mse_accumulate_avx512;
    t.mse_accumulate_rows = mse_accumulate_rows_avx512;
    t.f16_scores = f16_scores_avx512;
    t.f16_accumulate = f16_accumulate_avx512;
    return t;
  }();
  return k;
}

}  // namespace turboquant::cpu

#endif  // x86
