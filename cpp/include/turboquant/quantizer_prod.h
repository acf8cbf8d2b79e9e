// turboquant_prod: unbiased inner products at b bits (TurboQuant paper, Alg. 2; DESIGN §1).
// Stage 1 is turboquant_mse at b-1 bits on the rotated unit vector y; stage 2 is QJL
// (quantizer_qjl.h) on the residual r = y - c[idx], whose norm γ = ‖r‖ is kept:
//   <q, x> ≈ ‖x‖·( <q', c[idx]> + γ·√(π/2)/m·<S q', s> ),  q' = Πq, s = sign(S r),
// unbiased for every q (E over S), with variance ≤ (π/2)·γ²‖q‖²/m. The reconstruction
// ỹ = c[idx] + γ·√(π/2)/m·Sᵀs makes the generic <q', ỹ> equal that estimator.
// bits = 1: no MSE stage, QJL on y itself (γ = ‖y‖ = 1, not stored): the `qjl` quantizer.
//
// Code row (byte offsets), m = jl_dim (0 means head_dim), b' = bits - 1:
//   [0, A)        MSE indices, packing.h layout v1, A = packed_bytes(d, b')   (b' >= 1)
//   [A, A + B)    QJL signs, 1 bit per sketch row, B = packed_bytes(m, 1)
//   [A + B, +2)   γ as IEEE fp16, little-endian                               (b' >= 1)
// Bytes per vector with fp16 norm at d = m = 128: b=1: 16+2 = 18, b=2: 16+16+2+2 = 36,
// b=3: 32+16+2+2 = 52, b=4: 48+16+2+2 = 68.
// Query state = [Πq (d), S Πq (m)]: S q' is computed once per query, not per token.
#pragma once

#include "turboquant/quantizer_qjl.h"

namespace turboquant {

class ProdQuantizer : public Quantizer {
 public:
  explicit ProdQuantizer(const QuantizerConfig& config);
  size_t code_bytes() const override { return sign_offset_ + sketch_.sign_bytes() + (mse_bits_ ? 2 : 0); }
  double nominal_bits() const override;
  // Rotation plus the m×d QJL matrix S.
  size_t state_bytes() const override {
    return Quantizer::state_bytes() + sketch_.matrix().size() * sizeof(float);
  }
  int mse_bits() const { return mse_bits_; }
  const Codebook* codebook() const { return codebook_; }  // null when bits = 1
  const QjlSketch& sketch() const { return sketch_; }
  // γ of one code row (1 when bits = 1).
  float residual_norm(const uint8_t* code) const;

  void quantize_rotated(const float* y, size_t n, uint8_t* codes) const override;
  void dequantize_rotated(const uint8_t* codes, size_t n, float* y) const override;
  size_t query_state_floats() const override;
  void prepare_queries(const float* q, size_t m, float* state) const override;
  void scores(const float* state, size_t m, const uint8_t* codes, const float* norms, size_t n,
              float* out, size_t out_stride) const override;
  void accumulate(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                  const float* norms, size_t n, float* acc) const override;

 private:
  int mse_bits_;
  const Codebook* codebook_ = nullptr;
  size_t sign_offset_;
  QjlSketch sketch_;
};

}  // namespace turboquant
