// AVX2 + F16C fp16-row kernels (kernels.h: f16_scores, f16_accumulate): 8 fp16 values a
// vcvtph2ps, FMA into fp32. Scores keep up to 4 queries in registers so each fp16 row is
// converted once per 4 queries; the value sum keeps a 32-column strip of one query's
// accumulator in registers across all rows. Columns beyond the last multiple of 8: scalar.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include "backend/cpu/kernels.h"
#include "turboquant/half.h"

namespace turboquant::cpu {
namespace {

inline __m256 load8h(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R queries (rows q + k*d) against one fp16 row r.
template <size_t R>
inline void score_row(const float* q, const uint16_t* r, size_t d, float* out, size_t out_stride) {
  __m256 a[R];
  for (size_t k = 0; k < R; ++k) a[k] = _mm256_setzero_ps();
  size_t j = 0;
  for (; j + 8 <= d; j += 8) {
    const __m256 x = load8h(r + j);
    for (size_t k = 0; k < R; ++k) a[k] = _mm256_fmadd_ps(_mm256_loadu_ps(q + k * d + j), x, a[k]);
  }
  for (size_t k = 0; k < R; ++k) {
    float s = hsum(a[k]);
    for (size_t jj = j; jj < d; ++jj) s += q[k * d + jj] * half_to_float(r[jj]);
    out[k * out_stride] = s;
  }
}

}  // namespace

void f16_scores_avx2(const float* q, size_t m, const uint16_t* rows, size_t n, size_t d, float* out,
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

void f16_accumulate_avx2(const float* w, size_t w_stride, size_t m, const uint16_t* rows, size_t n,
                         size_t d, float* acc) {
  size_t j = 0;
  for (; j + 32 <= d; j += 32) {
    for (size_t i = 0; i < m; ++i) {
      const float* wi = w + i * w_stride;
      float* a = acc + i * d + j;
      __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8), a2 = _mm256_loadu_ps(a + 16),
             a3 = _mm256_loadu_ps(a + 24);
      for (size_t t = 0; t < n; ++t) {
        if (wi[t] == 0.0f) continue;
        const __m256 wt = _mm256_set1_ps(wi[t]);
        const uint16_t* r = rows + t * d + j;
        a0 = _mm256_fmadd_ps(wt, load8h(r), a0);
        a1 = _mm256_fmadd_ps(wt, load8h(r + 8), a1);
        a2 = _mm256_fmadd_ps(wt, load8h(r + 16), a2);
        a3 = _mm256_fmadd_ps(wt, load8h(r + 24), a3);
      }
      _mm256_storeu_ps(a, a0);
      _mm256_storeu_ps(a + 8, a1);
      _mm256_storeu_ps(a + 16, a2);
      _mm256_storeu_ps(a + 24, a3);
    }
  }
  for (; j + 8 <= d; j += 8) {
    for (size_t i = 0; i < m; ++i) {
      const float* wi = w + i * w_stride;
      float* a = acc + i * d + j;
      __m256 a0 = _mm256_loadu_ps(a);
      for (size_t t = 0; t < n; ++t)
        if (wi[t] != 0.0f) a0 = _mm256_fmadd_ps(_mm256_set1_ps(wi[t]), load8h(rows + t * d + j), a0);
      _mm256_storeu_ps(a, a0);
    }
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
