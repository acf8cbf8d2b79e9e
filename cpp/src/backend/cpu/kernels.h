// The CPU hot loops behind one table of function pointers (Highway/FAISS style): the
// scalar reference is always compiled; SIMD variants (kernels_avx2.cpp, kernels_neon.cpp,
// ...) have the same signatures and are selected at run time from CPU features. Every
// variant is tested against the scalar one (tests/cpp/test_kernels.cpp).
//
// Conventions: codes are packed per packing.h (layout v1), row-major, `code_bytes` bytes a
// row; norms are fp32 (callers convert a block of stored fp16 norms first); `centroids`
// has 2^bits entries and `boundaries` 2^bits - 1 (codebook.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace turboquant::cpu {

struct Kernels {
  const char* name;
  // In-place unnormalised fast Walsh-Hadamard transform of n = 2^k floats.
  void (*fwht)(float* x, size_t n);
  // n rotated unit vectors (n×d) -> nearest-centroid indices, packed (n rows of code_bytes).
  void (*quantize_pack)(const float* y, size_t n, size_t d, const float* boundaries, int bits,
                        uint8_t* codes, size_t code_bytes);
  // out[i*out_stride + t] = norms[t] * Σ_j q[i*d + j] * centroids[idx_tj], i < m, t < n.
  void (*mse_scores)(const float* q, size_t m, const uint8_t* codes, size_t code_bytes,
                     const float* norms, size_t n, size_t d, int bits, const float* centroids,
                     float* out, size_t out_stride);
  // acc[i*d + j] += Σ_t w[i*w_stride + t] * norms[t] * centroids[idx_tj].
  void (*mse_accumulate)(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                         size_t code_bytes, const float* norms, size_t n, size_t d, int bits,
                         const float* centroids, float* acc);
  // Sparse V: mse_accumulate over the listed rows only, idx[k] < n (increasing):
  //   acc[i*d + j] += Σ_k w[i*w_stride + idx[k]] * norms[idx[k]] * centroids[idx_{idx[k] j}],
  // k < n_idx; w, norms and codes are indexed by row as in mse_accumulate (no gathering),
  // and the work is proportional to n_idx.
  void (*mse_accumulate_rows)(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                              size_t code_bytes, const float* norms, size_t n, const uint32_t* idx,
                              size_t n_idx, size_t d, int bits, const float* centroids, float* acc);
  // out[r] = sqrt(Σ_j x[r*d + j]²) for n rows, accumulated in double in a fixed order
  // (16 partial sums, lane j % 16, folded to 8 and combined pairwise) so every variant gives the same bits;
  // NaN/Inf anywhere in a row gives a non-finite norm.
  void (*row_norms)(const float* x, size_t n, size_t d, float* out);
  // out[i] = the fp16 value h[i] as fp32 (exact; stored norms are fp16).
  void (*half_to_float)(const uint16_t* h, size_t n, float* out);
  // s[t] = exp(s[t] - shift) for t < n (arguments <= 0 in softmax); returns Σ s[t].
  // SIMD variants use a polynomial exp within 2 ulp of std::exp.
  float (*exp_sum)(float* s, size_t n, float shift);
  // The Hadamard rotation's two transforms fused, for n rows of d = 2^k:
  //   y[r] = post ⊙ H(mid ⊙ H(pre ⊙ (x[r] · row_scale[r])))
  // with each product rounded on its own in that order (row_scale / pre may be null:
  // skipped), so every variant gives the same bits. x and y may alias.
  void (*hadamard_rotate)(const float* x, size_t n, size_t d, const float* row_scale,
                          const float* pre, const float* mid, const float* post, float* y);
  // fp16 rows (the cache's fp16 sinks and recent window; rows: n×d fp16 bits, row-major):
  //   out[i*out_stride + t] = Σ_j q[i*d + j]·h(rows[t*d + j]),  i < m, t < n;
  // each variant sums in its own order (agreement within fp tolerance, not bits).
  void (*f16_scores)(const float* q, size_t m, const uint16_t* rows, size_t n, size_t d,
                     float* out, size_t out_stride);
  //   acc[i*d + j] += Σ_t w[i*w_stride + t]·h(rows[t*d + j]); zero weights are skipped.
  void (*f16_accumulate)(const float* w, size_t w_stride, size_t m, const uint16_t* rows,
                         size_t n, size_t d, float* acc);
};

// The fp16-row kernels of each variant (kernels_f16*.cpp), for the tables above.
void f16_scores_scalar(const float* q, size_t m, const uint16_t* rows, size_t n, size_t d, float* out,
                       size_t out_stride);
void f16_accumulate_scalar(const float* w, size_t w_stride, size_t m, const uint16_t* rows, size_t n,
                           size_t d, float* acc);
#if defined(__x86_64__) || defined(__i386__)
void f16_scores_avx2(const float* q, size_t m, const uint16_t* rows, size_t n, size_t d, float* out,
                     size_t out_stride);
void f16_accumulate_avx2(const float* w, size_t w_stride, size_t m, const uint16_t* rows, size_t n,
                         size_t d, float* acc);
void f16_scores_avx512(const float* q, size_t m, const uint16_t* rows, size_t n, size_t d, float* out,
                       size_t out_stride);
void f16_accumulate_avx512(const float* w, size_t w_stride, size_t m, const uint16_t* rows, size_t n,
                           size_t d, float* acc);
#endif

const Kernels& scalar_kernels();
#if defined(__x86_64__) || defined(__i386__)
const Kernels& avx2_kernels();  // needs avx2 + fma + f16c (kernels_avx2.cpp)
// needs the above + avx512f/bw/vl/dq (kernels_avx512.cpp; kernels it does not widen are
// the AVX2 ones)
const Kernels& avx512_kernels();
#endif
// ARMv8 NEON (kernels_neon.cpp): AArch64, little-endian (Apple silicon, Graviton, ...),
// where NEON is always present.
#if defined(__aarch64__) && defined(__ARM_NEON) && defined(__BYTE_ORDER__) && \
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define TURBOQUANT_NEON_KERNELS 1
const Kernels& neon_kernels();
void f16_scores_neon(const float* q, size_t m, const uint16_t* rows, size_t n, size_t d, float* out,
                     size_t out_stride);
void f16_accumulate_neon(const float* w, size_t w_stride, size_t m, const uint16_t* rows, size_t n,
                         size_t d, float* acc);
#else
#define TURBOQUANT_NEON_KERNELS 0
#endif
// The best kernel set for this CPU, or the one named by TURBOQUANT_SIMD ("scalar", ...).
const Kernels& active_kernels();
// Every kernel set compiled in and usable on this CPU (for tests and benchmarks).
std::vector<const Kernels*> usable_kernels();

}  // namespace turboquant::cpu
