// Scalar reference of the fp16-row kernels (kernels.h: f16_scores, f16_accumulate): attention
// over the cache's fp16 sinks and recent window, read in place as fp16.
#include "backend/cpu/kernels.h"
#include "turboquant/half.h"

namespace turboquant::cpu {

void f16_scores_scalar(const float* q, size_t m, const uint16_t* rows, size_t n, size_t d, float* out,
                       size_t out_stride) {
  for (size_t t = 0; t < n; ++t) {
    const uint16_t* r = rows + t * d;
    for (size_t i = 0; i < m; ++i) {
      const float* qi = q + i * d;
      float acc = 0.0f;
      for (size_t j = 0; j < d; ++j) acc += qi[j] * half_to_float(r[j]);
      out[i * out_stride + t] = acc;
    }
  }
}

void f16_accumulate_scalar(const float* w, size_t w_stride, size_t m, const uint16_t* rows, size_t n,
                           size_t d, float* acc) {
  for (size_t t = 0; t < n; ++t) {
    const uint16_t* r = rows + t * d;
    for (size_t i = 0; i < m; ++i) {
      const float wt = w[i * w_stride + t];
      if (wt == 0.0f) continue;
      float* a = acc + i * d;
      for (size_t j = 0; j < d; ++j) a[j] += wt * half_to_float(r[j]);
    }
  }
}

}  // namespace turboquant::cpu
