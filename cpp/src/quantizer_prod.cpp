// turboquant_prod: (b-1)-bit turboquant_mse + 1-bit QJL on the residual. TurboQuant Alg. 2.
#include "turboquant/quantizer_prod.h"

#include <cmath>
#include <cstring>

#include "backend/cpu/kernels.h"
#include "turboquant/half.h"
#include "turboquant/packing.h"

namespace turboquant {

ProdQuantizer::ProdQuantizer(const QuantizerConfig& config)
    : Quantizer(config),
      mse_bits_(config_.bits - 1),
      codebook_(mse_bits_ ? &coordinate_codebook(config_.dim, mse_bits_, config_.law) : nullptr),
      sign_offset_(mse_bits_ ? packed_bytes(static_cast<size_t>(config_.dim), mse_bits_) : 0),
      sketch_(config_.dim, config_.jl_dim, config_.seed, config_.stream) {}

double ProdQuantizer::nominal_bits() const {
  return mse_bits_ + static_cast<double>(sketch_.sketch_dim()) / dim();
}

float ProdQuantizer::residual_norm(const uint8_t* code) const {
  if (!mse_bits_) return 1.0f;
  half_bits h;
  std::memcpy(&h, code + sign_offset_ + sketch_.sign_bytes(), sizeof h);
  return half_to_float(h);
}

void ProdQuantizer::quantize_rotated(const float* y, size_t n, uint8_t* codes) const {
  const auto d = static_cast<size_t>(dim());
  const size_t cb = code_bytes();
  if (!mse_bits_) {
    for (size_t r = 0; r < n; ++r) sketch_.signs(y + r * d, codes + r * cb);
    return;
  }
  cpu::active_kernels().quantize_pack(y, n, d, codebook_->boundaries.data(), mse_bits_, codes, cb);
  std::vector<uint8_t> idx(d);
  std::vector<float> res(d);
  for (size_t r = 0; r < n; ++r) {
    uint8_t* code = codes + r * cb;
    unpack_indices(code, d, mse_bits_, idx.data());
    double g = 0.0;
    for (size_t j = 0; j < d; ++j) {
      res[j] = y[r * d + j] - codebook_->centroids[idx[j]];
      g += static_cast<double>(res[j]) * res[j];
    }
    sketch_.signs(res.data(), code + sign_offset_);
    const half_bits h = float_to_half(static_cast<float>(std::sqrt(g)));
    std::memcpy(code + sign_offset_ + sketch_.sign_bytes(), &h, sizeof h);
  }
}

void ProdQuantizer::dequantize_rotated(const uint8_t* codes, size_t n, float* y) const {
  const auto d = static_cast<size_t>(dim());
  const auto sm = static_cast<size_t>(sketch_.sketch_dim());
  const size_t cb = code_bytes();
  std::vector<uint8_t> idx(d);
  std::vector<float> z(sm);
  for (size_t r = 0; r < n; ++r) {
    const uint8_t* code = codes + r * cb;
    float* yr = y + r * d;
    if (mse_bits_) {
      unpack_indices(code, d, mse_bits_, idx.data());
      for (size_t j = 0; j < d; ++j) yr[j] = codebook_->centroids[idx[j]];
    } else {
      std::fill(yr, yr + d, 0.0f);
    }
    const float c = residual_norm(code) * sketch_.scale();
    const uint8_t* s = code + sign_offset_;
    for (size_t k = 0; k < sm; ++k) z[k] = ((s[k / 8] >> (k % 8)) & 1u) ? c : -c;
    sketch_.add_transpose(z.data(), yr);
  }
}

size_t ProdQuantizer::query_state_floats() const {
  return static_cast<size_t>(dim()) + static_cast<size_t>(sketch_.sketch_dim());
}

void ProdQuantizer::prepare_queries(const float* q, size_t m, float* state) const {
  sketch_.prepare_queries(*rotation_, q, m, state);
}

void ProdQuantizer::scores(const float* state, size_t m, const uint8_t* codes, const float* norms,
                           size_t n, float* out, size_t out_stride) const {
  const auto d = static_cast<size_t>(dim());
  const size_t sf = query_state_floats();
  const size_t cb = code_bytes();
  std::vector<float> gammas;
  if (mse_bits_) {
    // MSE stage through the shared kernel: it reads the first A bytes of each row.
    std::vector<float> qp(m * d);
    for (size_t i = 0; i < m; ++i) std::memcpy(qp.data() + i * d, state + i * sf, d * sizeof(float));
    cpu::active_kernels().mse_scores(qp.data(), m, codes, cb, norms, n, d, mse_bits_,
                                     codebook_->centroids.data(), out, out_stride);
    gammas.resize(n);
    for (size_t t = 0; t < n; ++t) gammas[t] = residual_norm(codes + t * cb);
  }
  qjl_scores(sketch_, state, sf, d, m, codes, cb, sign_offset_, norms,
             mse_bits_ ? gammas.data() : nullptr, n, out, out_stride, mse_bits_ != 0);
}

void ProdQuantizer::accumulate(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                               const float* norms, size_t n, float* acc) const {
  const auto d = static_cast<size_t>(dim());
  const size_t cb = code_bytes();
  std::vector<float> gammas;
  if (mse_bits_) {
    cpu::active_kernels().mse_accumulate(w, w_stride, m, codes, cb, norms, n, d, mse_bits_,
                                         codebook_->centroids.data(), acc);
    gammas.resize(n);
    for (size_t t = 0; t < n; ++t) gammas[t] = residual_norm(codes + t * cb);
  }
  qjl_accumulate(sketch_, w, w_stride, m, codes, cb, sign_offset_, norms,
                 mse_bits_ ? gammas.data() : nullptr, n, acc);
}

namespace {
const bool kRegistered = register_quantizer(
    "turboquant_prod", [](const QuantizerConfig& c) { return std::make_unique<ProdQuantizer>(c); });
}  // namespace

}  // namespace turboquant
