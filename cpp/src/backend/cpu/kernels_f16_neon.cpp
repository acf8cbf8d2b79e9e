// NEON fp16-row kernels (kernels.h: f16_scores, f16_accumulate), as kernels_f16_avx2.cpp:
// 4 fp16 values a vcvt_f32_f16, FMA into fp32; scores keep up to 4 queries in registers so
// each fp16 row is converted once per 4 queries; the value sum keeps a 16-column strip of
// one query's accumulator in registers across all rows. Columns beyond the last multiple of
// 4: scalar.
#include "backend/cpu/kernels.h"

#if TURBOQUANT_NEON_KERNELS
#include <arm_neon.h>

#include "turboquant/half.h"

namespace turboquant::cpu {
namespace {

inline float32x4_t load4h(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

template <size_t R>
inline void score_row(const float* q, const uint16_t* r, size_t d, float* out, size_t out_stride) {
  float32x4_t a[R];
  for (size_t k = 0; k < R; ++k) a[k] = vdupq_n_f32(0.0f);
  size_t j = 0;
  for (; j + 4 <= d; j += 4) {
    const float32x4_t x = load4h(r + j);
    for (size_t k = 0; k < R; ++k) a[k] = vfmaq_f32(a[k], vld1q_f32(q + k * d + j), x);
  }
  for (size_t k = 0; k < R; ++k) {
    float s = vaddvq_f32(a[k]);
    for (size_t jj = j; jj < d; ++jj) s += q[k * d + jj] * half_to_float(r[jj]);
    out[k * out_stride] = s;
  }
}

}  // namespace

void f16_scores_neon(const float* q, size_t m, const uint16_t* rows, size_t n, size_t d, float* out,
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

void f16_accumulate_neon(const float* w, size_t w_stride, size_t m, const uint16_t* rows, size_t n,
                         size_t d, float* acc) {
  size_t j = 0;
  for (; j + 16 <= d; j += 16) {
    for (size_t i = 0; i < m; ++i) {
      const float* wi = w + i * w_stride;
      float* a = acc + i * d + j;
      float32x4_t a0 = vld1q_f32(a), a1 = vld1q_f32(a + 4), a2 = vld1q_f32(a + 8), a3 = vld1q_f32(a + 12);
      for (size_t t = 0; t < n; ++t) {
        if (wi[t] == 0.0f) continue;
        const float32x4_t wt = vdupq_n_f32(wi[t]);
        const uint16_t* r = rows + t * d + j;
        a0 = vfmaq_f32(a0, wt, load4h(r));
        a1 = vfmaq_f32(a1, wt, load4h(r + 4));
        a2 = vfmaq_f32(a2, wt, load4h(r + 8));
        a3 = vfmaq_f32(a3, wt, load4h(r + 12));
      }
      vst1q_f32(a, a0);
      vst1q_f32(a + 4, a1);
      vst1q_f32(a + 8, a2);
      vst1q_f32(a + 12, a3);
    }
  }
  for (; j + 4 <= d; j += 4) {
    for (size_t i = 0; i < m; ++i) {
      const float* wi = w + i * w_stride;
      float* a = acc + i * d + j;
      float32x4_t a0 = vld1q_f32(a);
      for (size_t t = 0; t < n; ++t)
        if (wi[t] != 0.0f) a0 = vfmaq_f32(a0, vdupq_n_f32(wi[t]), load4h(rows + t * d + j));
      vst1q_f32(a, a0);
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

#endif  // TURBOQUANT_NEON_KERNELS
