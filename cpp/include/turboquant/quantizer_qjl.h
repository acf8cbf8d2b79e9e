// QJL: the 1-bit quantized Johnson-Lindenstrauss sketch (Zandieh et al., "QJL: 1-Bit
// Quantized JL Transform for KV Cache Quantization", 2024; TurboQuant paper, Def. 1).
// A vector r ∈ R^d is stored as the m signs s = sign(S r), S ∈ R^{m×d} with i.i.d. N(0, 1)
// entries; for any q,  E[ √(π/2)/m · ‖r‖ · <S q, s> ] = <q, r>  (unbiased), with variance
// at most (π/2)·‖q‖²‖r‖²/m. DESIGN §1 "qjl" and the residual stage of "turboquant_prod".
//
// S is drawn from RandomStream(seed, stream ^ make_stream_id(StreamPurpose::kQjlMatrix))
// (rng.h), row-major, m·d Gaussians in order: the same seed gives the same S everywhere.
// Sign bits are packed with packing.h (1 bit per sketch row, LSB first); bit k = 1 means
// S_k·r >= 0, i.e. s_k = +1 (zero counts as positive).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "turboquant/quantizer.h"

namespace turboquant {

class QjlSketch {
 public:
  QjlSketch(int dim, int sketch_dim, uint64_t seed, uint64_t stream);

  int dim() const { return dim_; }
  int sketch_dim() const { return m_; }
  size_t sign_bytes() const { return sign_bytes_; }
  // The estimator's scale √(π/2)/m.
  float scale() const { return scale_; }
  const std::vector<float>& matrix() const { return s_; }  // m×d, row-major

  // Packed signs of S r for one vector r (dim floats) into sign_bytes() bytes.
  void signs(const float* r, uint8_t* out) const;
  // sq = S q for one vector q (dim floats -> m floats).
  void project(const float* q, float* sq) const;
  // Query states [Πq_i, S·Πq_i] (dim + m floats each) for m queries: the layout shared by
  // qjl and turboquant_prod.
  void prepare_queries(const Rotation& rotation, const float* q, size_t count, float* state) const;
  // out += Sᵀ z for one sketch-domain vector z (m floats -> dim floats).
  void add_transpose(const float* z, float* out) const;
  // Σ_k s_k v_k for packed signs and a sketch-domain vector v.
  float sign_dot(const uint8_t* signs, const float* v) const;
  // Per-query tables for many sign dot products (FAISS fast-scan style): for each byte g of
  // the signs, tables[g*256 + c] = Σ_{bit k of c set} v[8g + k]; then
  // <s, v> = 2 Σ_g tables[g*256 + byte_g] - Σ_k v_k (sign_dot_table). sign_bytes()*256 floats.
  void sign_tables(const float* v, float* tables) const;
  float sign_dot_table(const uint8_t* signs, const float* tables, float v_sum) const;

 private:
  int dim_, m_;
  size_t sign_bytes_;
  float scale_;
  std::vector<float> s_;
};

// `qjl` (DESIGN §1): the sign sketch of the rotated unit vector y, m = jl_dim. The `bits`
// of the config set m = bits·dim when jl_dim is 0 (so `bits` is the storage per coordinate,
// 1 by default in the papers); an explicit jl_dim needs bits = 1.
// Code row: packed_bytes(m, 1) sign bytes. Estimator <q, x> ≈ ‖x‖·√(π/2)/m·<S Πq, s>;
// query state = [Πq (dim), S Πq (m)]. Bytes at d = 128, m = 128, fp16 norm: 16 + 2 = 18.
class QjlQuantizer : public Quantizer {
 public:
  explicit QjlQuantizer(const QuantizerConfig& config);
  size_t code_bytes() const override { return sketch_.sign_bytes(); }
  double nominal_bits() const override;
  // Rotation plus the m×d QJL matrix S.
  size_t state_bytes() const override {
    return Quantizer::state_bytes() + sketch_.matrix().size() * sizeof(float);
  }
  const QjlSketch& sketch() const { return sketch_; }

  void quantize_rotated(const float* y, size_t n, uint8_t* codes) const override;
  void dequantize_rotated(const uint8_t* codes, size_t n, float* y) const override;
  size_t query_state_floats() const override;
  void prepare_queries(const float* q, size_t m, float* state) const override;
  void scores(const float* state, size_t m, const uint8_t* codes, const float* norms, size_t n,
              float* out, size_t out_stride) const override;
  void accumulate(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                  const float* norms, size_t n, float* acc) const override;

 private:
  static QuantizerConfig resolve(QuantizerConfig config);
  QjlSketch sketch_;
};

// Shared by qjl and turboquant_prod: the QJL term of scores() for n code rows with the
// signs at byte `sign_offset` of each row: out[i*out_stride + t] (+)= weight_t·<s_t, S q'_i>,
// weight_t = norms[t]·scale·gamma_t (gamma = 1 when `gammas` is null).
void qjl_scores(const QjlSketch& sketch, const float* state, size_t state_floats, size_t sq_offset,
                size_t m, const uint8_t* codes, size_t code_bytes, size_t sign_offset,
                const float* norms, const float* gammas, size_t n, float* out, size_t out_stride,
                bool add);
// The QJL term of accumulate(): acc_i += Sᵀ Σ_t w_it·norms[t]·scale·gamma_t·s_t.
void qjl_accumulate(const QjlSketch& sketch, const float* w, size_t w_stride, size_t m,
                    const uint8_t* codes, size_t code_bytes, size_t sign_offset, const float* norms,
                    const float* gammas, size_t n, float* acc);

}  // namespace turboquant
