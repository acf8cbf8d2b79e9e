// AVX-512 fp16-row kernels (kernels.h: f16_scores, f16_accumulate): as kernels_f16_avx2.cpp
// with 16 fp16 values a vcvtph2ps; a remaining 8-column block uses the AVX2 width and
// columns beyond the last multiple of 8 are scalar.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // see kernels_avx512.cpp
#endif

#include "backend/cpu/kernels.h"
#include "turboquant/half.h"

namespace turboquant::cpu {
namespace {

inline __m512 load16h(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m256 load8h(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <size_t R>
inline void score_row(const float* q, const uint16_t* r, size_t d, float* out, size_t out_stride) {
  __m512 a[R];
  for (size_t k = 0; k < R; ++k) a[k] = _mm512_setzero_ps();
  size_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m512 x = load16h(r + j);
    for (size_t k = 0; k < R; ++k) a[k] = _mm512_fmadd_ps(_mm512_loadu_ps(q + k * d + j), x, a[k]);
  }
  if (j + 8 <= d) {
    const __m512 x = _mm512_castps256_ps512(load8h(r + j));
    for (size_t k = 0; k < R; ++k)
      a[k] = _mm512_mask3_fmadd_ps(_mm512_castps256_ps512(_mm256_loadu_ps(q + k * d + j)), x, a[k], 0x00FF);
    j += 8;
  }
  for (size_t k = 0; k < R; ++k) {
    float s = _mm512_reduce_add_ps(a[k]);
    for (size_t jj = j; jj < d; ++jj) s += q[k * d + jj] * half_to_float(r[jj]);
    out[k * out_stride] = s;
  }
}

}  // namespace

void f16_scores_avx512(const float* q, size_t m, const uint16_t* rows, size_t n, size_t d, float* out,
                       size_t out_stride) {
  for (size_t t = 0; t < n; ++t) {
    const uint16_t* r = rows + t * d;
    size_t i = 0;
    for (; i + 4 <= m; i += 4) score_row<4>(q + i * d, r, d, out + i * out_stride + t, out_stride);
    switch (m - i) {
      case 3: score_row<3>(q + i * d, r, d, out + i * out_stride + t, out_stride); break;
      case 2: score_row<2>(q + i * d, r, d, out + i * out_stride + t, out_stride); break;
      case 1: score_row<1>(q + i * d, r, d, out + i * out_stride + t, out_stride); break;
      default: break;
    }
  }
}

void f16_accumulate_avx512(const float* w, size_t w_stride, size_t m, const uint16_t* rows, size_t n,
                           size_t d, float* acc) {
  size_t j = 0;
  for (; j + 64 <= d; j += 64) {
    for (size_t i = 0; i < m; ++i) {
      const float* wi = w + i * w_stride;
      float* a = acc + i * d + j;
      __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + 16), a2 = _mm512_loadu_ps(a + 32),
             a3 = _mm512_loadu_ps(a + 48);
      for (size_t t = 0; t < n; ++t) {
        if (wi[t] == 0.0f) continue;
        const __m512 wt = _mm512_set1_ps(wi[t]);
        const uint16_t* r = rows + t * d + j;
        a0 = _mm512_fmadd_ps(wt, load16h(r), a0);
        a1 = _mm512_fmadd_ps(wt, load16h(r + 16), a1);
        a2 = _mm512_fmadd_ps(wt, load16h(r + 32), a2);
        a3 = _mm512_fmadd_ps(wt, load16h(r + 48), a3);
      }
      _mm512_storeu_ps(a, a0);
      _mm512_storeu_ps(a + 16, a1);
      _mm512_storeu_ps(a + 32, a2);
      _mm512_storeu_ps(a + 48, a3);
    }
  }
  for (; j + 16 <= d; j += 16) {
    for (size_t i = 0; i < m; ++i) {
      const float* wi = w + i * w_stride;
      float* a = acc + i * d + j;
      __m512 a0 = _mm512_loadu_ps(a);
      for (size_t t = 0; t < n; ++t)
        if (wi[t] != 0.0f) a0 = _mm512_fmadd_ps(_mm512_set1_ps(wi[t]), load16h(rows + t * d + j), a0);
      _mm512_storeu_ps(a, a0);
    }
  }
  if (j + 8 <= d) {
    for (size_t i = 0; i < m; ++i) {
      const float* wi = w + i * w_stride;
      float* a = acc + i * d + j;
      __m256 a0 = _mm256_loadu_ps(a);
      for (size_t t = 0; t < n; ++t)
        if (wi[t] != 0.0f) a0 = _mm256_fmadd_ps(_mm256_set1_ps(wi[t]), load8h(rows + t * d + j), a0);
      _mm256_storeu_ps(a, a0);
    }
    j += 8;
  }
  if (j < d) {
    for (size_t t = 0; t < n; ++t)
      for (size_t i = 0; i < m; ++i) {
        const float wt = w[i * w_stride + t];
        if (wt == 0.0f) continue;
        for (size_t jj = j; jj < d; ++jj) acc[i * d + jj] += wt * half_to_float(rows[t * d + jj]);
      }
  }
}

}  // namespace turboquant::cpu

#endif  // x86
