// turboquant_mse: x -> (‖x‖, pack(nearest_centroid(Π x/‖x‖))). TurboQuant paper, Alg. 1.
#include <cmath>
#include <vector>

#include "turboquant/error.h"
#include "turboquant/packing.h"
#include "turboquant/quantizer.h"

namespace turboquant {

MseQuantizer::MseQuantizer(const QuantizerConfig& config)
    : Quantizer(config), codebook_(&lloyd_max_codebook(config.dim, config.bits, config.law)) {}

size_t MseQuantizer::code_bytes() const { return packed_bytes(static_cast<size_t>(dim()), bits()); }

void MseQuantizer::quantize_rotated(const float* y, size_t n, uint8_t* codes) const {
  const auto d = static_cast<size_t>(dim());
  std::vector<uint8_t> idx(d);
  for (size_t r = 0; r < n; ++r) {
    for (size_t j = 0; j < d; ++j) idx[j] = codebook_->quantize(y[r * d + j]);
    pack_indices(idx.data(), d, bits(), codes + r * code_bytes());
  }
}

void MseQuantizer::dequantize_rotated(const uint8_t* codes, size_t n, float* y) const {
  const auto d = static_cast<size_t>(dim());
  std::vector<uint8_t> idx(d);
  for (size_t r = 0; r < n; ++r) {
    unpack_indices(codes + r * code_bytes(), d, bits(), idx.data());
    for (size_t j = 0; j < d; ++j) y[r * d + j] = codebook_->centroids[idx[j]];
  }
}

void MseQuantizer::encode_impl(const float* x, size_t n, uint8_t* codes, void* norms) const {
  const auto d = static_cast<size_t>(dim());
  const size_t block = 64;
  std::vector<float> y(block * d), c(d);
  for (size_t r0 = 0; r0 < n; r0 += block) {
    const size_t nb = std::min(block, n - r0);
    std::vector<float> norm(nb);
    for (size_t r = 0; r < nb; ++r) {
      double s = 0.0;
      for (size_t j = 0; j < d; ++j) s += static_cast<double>(x[(r0 + r) * d + j]) * x[(r0 + r) * d + j];
      norm[r] = static_cast<float>(std::sqrt(s));
      const float inv = norm[r] > 0.0f ? 1.0f / norm[r] : 0.0f;
      for (size_t j = 0; j < d; ++j) y[r * d + j] = x[(r0 + r) * d + j] * inv;
    }
    rotation_->forward(y.data(), y.data(), nb);
    quantize_rotated(y.data(), nb, codes + r0 * code_bytes());
    for (size_t r = 0; r < nb; ++r) {
      float stored = norm[r];
      if (config_.norm_correction && norm[r] > 0.0f) {
        // Store ‖x‖/‖c[idx]‖ so that the decoded vector has exactly the norm of x.
        dequantize_rotated(codes + (r0 + r) * code_bytes(), 1, c.data());
        double cn = 0.0;
        for (size_t j = 0; j < d; ++j) cn += static_cast<double>(c[j]) * c[j];
        stored = static_cast<float>(norm[r] / std::sqrt(cn));
      }
      store_norm(norms, r0 + r, stored);
    }
  }
}

void MseQuantizer::decode_impl(const uint8_t* codes, const void* norms, size_t n, float* out) const {
  const auto d = static_cast<size_t>(dim());
  dequantize_rotated(codes, n, out);
  rotation_->inverse(out, out, n);
  for (size_t r = 0; r < n; ++r) {
    const float s = load_norm(norms, r);
    for (size_t j = 0; j < d; ++j) out[r * d + j] *= s;
  }
}

// Scores in the rotated domain: <q, x> = ‖x‖ Σ_j (Πq)_j c[idx_j]; Π is applied to q once.
void MseQuantizer::inner_products_impl(const float* q, size_t m, const uint8_t* codes,
                                       const void* norms, size_t n, float* out) const {
  const auto d = static_cast<size_t>(dim());
  std::vector<float> qr(q, q + m * d);
  rotation_->forward(qr.data(), qr.data(), m);
  std::vector<uint8_t> idx(d);
  const auto& cent = codebook_->centroids;
  for (size_t t = 0; t < n; ++t) {
    unpack_indices(codes + t * code_bytes(), d, bits(), idx.data());
    const float s = load_norm(norms, t);
    for (size_t i = 0; i < m; ++i) {
      float acc = 0.0f;
      const float* qi = qr.data() + i * d;
      for (size_t j = 0; j < d; ++j) acc += qi[j] * cent[idx[j]];
      out[i * n + t] = s * acc;
    }
  }
}

namespace {
const bool kRegistered = register_quantizer(
    "turboquant_mse", [](const QuantizerConfig& c) { return std::make_unique<MseQuantizer>(c); });
}  // namespace

}  // namespace turboquant
