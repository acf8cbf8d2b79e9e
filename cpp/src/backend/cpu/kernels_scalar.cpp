// Scalar reference kernels: the definition of correct for every SIMD variant.
#include <cmath>
#include <vector>

#include "backend/cpu/kernels.h"
#include "turboquant/half.h"
#include "turboquant/packing.h"

namespace turboquant::cpu {
namespace {

void fwht_scalar(float* x, size_t n) {
  for (size_t h = 1; h < n; h <<= 1) {
    for (size_t i = 0; i < n; i += 2 * h) {
      for (size_t j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
}

void quantize_pack_scalar(const float* y, size_t n, size_t d, const float* boundaries, int bits,
                          uint8_t* codes, size_t code_bytes) {
  std::vector<uint8_t> idx(d);
  const int levels = 1 << bits;
  for (size_t r = 0; r < n; ++r) {
    for (size_t j = 0; j < d; ++j) {
      const float v = y[r * d + j];
      int lo = 0, hi = levels - 1;  // index = number of boundaries <= v
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (v < boundaries[mid]) hi = mid; else lo = mid + 1;
      }
      idx[j] = static_cast<uint8_t>(lo);
    }
    pack_indices(idx.data(), d, bits, codes + r * code_bytes);
  }
}

void mse_scores_scalar(const float* q, size_t m, const uint8_t* codes, size_t code_bytes,
                       const float* norms, size_t n, size_t d, int bits, const float* centroids,
                       float* out, size_t out_stride) {
  std::vector<uint8_t> idx(d);
  for (size_t t = 0; t < n; ++t) {
    unpack_indices(codes + t * code_bytes, d, bits, idx.data());
    for (size_t i = 0; i < m; ++i) {
      const float* qi = q + i * d;
      float acc = 0.0f;
      for (size_t j = 0; j < d; ++j) acc += qi[j] * centroids[idx[j]];
      out[i * out_stride + t] = norms[t] * acc;
    }
  }
}

// Adds token t's decoded row, weighted by each query row's w · norm, to acc (m × d).
void accumulate_token(const float* w, size_t w_stride, size_t m, const uint8_t* codes, size_t code_bytes,
                      const float* norms, size_t t, size_t d, int bits, const float* centroids, float* acc,
                      uint8_t* idx) {
  unpack_indices(codes + t * code_bytes, d, bits, idx);
  for (size_t i = 0; i < m; ++i) {
    const float s = w[i * w_stride + t] * norms[t];
    if (s == 0.0f) continue;
    float* a = acc + i * d;
    for (size_t j = 0; j < d; ++j) a[j] += s * centroids[idx[j]];
  }
}

void mse_accumulate_scalar(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                           size_t code_bytes, const float* norms, size_t n, size_t d, int bits,
                           const float* centroids, float* acc) {
  std::vector<uint8_t> idx(d);
  for (size_t t = 0; t < n; ++t) {
    accumulate_token(w, w_stride, m, codes, code_bytes, norms, t, d, bits, centroids, acc, idx.data());
  }
}

void mse_accumulate_rows_scalar(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                                size_t code_bytes, const float* norms, size_t /*n*/, const uint32_t* rows,
                                size_t n_idx, size_t d, int bits, const float* centroids, float* acc) {
  std::vector<uint8_t> idx(d);
  for (size_t k = 0; k < n_idx; ++k) {
    const size_t t = rows[k];
    accumulate_token(w, w_stride, m, codes, code_bytes, norms, t, d, bits, centroids, acc, idx.data());
  }
}

void row_norms_scalar(const float* x, size_t n, size_t d, float* out) {
  for (size_t r = 0; r < n; ++r) {
    double s[16] = {};
    for (size_t j = 0; j < d; ++j) {
      const double v = x[r * d + j];
      s[j % 16] += v * v;  // exact product: float squares fit a double
    }
    for (size_t k = 0; k < 8; ++k) s[k] += s[k + 8];
    const double t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    out[r] = static_cast<float>(std::sqrt(t));
  }
}

void half_to_float_scalar(const uint16_t* h, size_t n, float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = half_to_float(h[i]);
}

float exp_sum_scalar(float* s, size_t n, float shift) {
  float sum = 0.0f;
  for (size_t t = 0; t < n; ++t) {
    s[t] = std::exp(s[t] - shift);
    sum += s[t];
  }
  return sum;
}

void hadamard_rotate_scalar(const float* x, size_t n, size_t d, const float* row_scale,
                            const float* pre, const float* mid, const float* post, float* y) {
  for (size_t r = 0; r < n; ++r) {
    const float* u = x + r * d;
    float* v = y + r * d;
    if (row_scale) {
      const float s = row_scale[r];
      for (size_t j = 0; j < d; ++j) v[j] = u[j] * s;
      if (pre)
        for (size_t j = 0; j < d; ++j) v[j] *= pre[j];
    } else if (pre) {
      for (size_t j = 0; j < d; ++j) v[j] = u[j] * pre[j];
    } else {
      for (size_t j = 0; j < d; ++j) v[j] = u[j];
    }
    fwht_scalar(v, d);
    for (size_t j = 0; j < d; ++j) v[j] *= mid[j];
    fwht_scalar(v, d);
    for (size_t j = 0; j < d; ++j) v[j] *= post[j];
  }
}

}  // namespace

const Kernels& scalar_kernels() {
  static const Kernels k{"scalar", fwht_scalar, quantize_pack_scalar, mse_scores_scalar,
                         mse_accumulate_scalar, mse_accumulate_rows_scalar, row_norms_scalar, half_to_float_scalar,
                         exp_sum_scalar, hadamard_rotate_scalar, f16_scores_scalar,
                         f16_accumulate_scalar};
  return k;
}

}  // namespace turboquant::cpu
