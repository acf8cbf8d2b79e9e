// turboquant_mse: x -> (‖x‖, pack(nearest_centroid(Π x/‖x‖))). TurboQuant paper, Alg. 1.
#include <vector>

#include "backend/cpu/kernels.h"
#include "turboquant/packing.h"
#include "turboquant/quantizer.h"

namespace turboquant {

MseQuantizer::MseQuantizer(const QuantizerConfig& config)
    : Quantizer(config), codebook_(&coordinate_codebook(config.dim, config.bits, config.law)) {}

size_t MseQuantizer::code_bytes() const { return packed_bytes(static_cast<size_t>(dim()), bits()); }

void MseQuantizer::quantize_rotated(const float* y, size_t n, uint8_t* codes) const {
  cpu::active_kernels().quantize_pack(y, n, static_cast<size_t>(dim()), codebook_->boundaries.data(),
                                      bits(), codes, code_bytes());
}

void MseQuantizer::dequantize_rotated(const uint8_t* codes, size_t n, float* y) const {
  const auto d = static_cast<size_t>(dim());
  std::vector<uint8_t> idx(d);
  for (size_t r = 0; r < n; ++r) {
    unpack_indices(codes + r * code_bytes(), d, bits(), idx.data());
    for (size_t j = 0; j < d; ++j) y[r * d + j] = codebook_->centroids[idx[j]];
  }
}

// <q, x> = ‖x‖ Σ_j (Πq)_j c[idx_j]: table lookups on the codes (DESIGN §2).
void MseQuantizer::scores(const float* state, size_t m, const uint8_t* codes, const float* norms,
                          size_t n, float* out, size_t out_stride) const {
  cpu::active_kernels().mse_scores(state, m, codes, code_bytes(), norms, n,
                                   static_cast<size_t>(dim()), bits(),
                                   codebook_->centroids.data(), out, out_stride);
}

void MseQuantizer::accumulate(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                              const float* norms, size_t n, float* acc) const {
  cpu::active_kernels().mse_accumulate(w, w_stride, m, codes, code_bytes(), norms, n,
                                       static_cast<size_t>(dim()), bits(),
                                       codebook_->centroids.data(), acc);
}

void MseQuantizer::accumulate_rows(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                                   const float* norms, size_t n, const uint32_t* idx, size_t n_idx,
                                   float* acc) const {
  cpu::active_kernels().mse_accumulate_rows(w, w_stride, m, codes, code_bytes(), norms, n, idx, n_idx,
                                            static_cast<size_t>(dim()), bits(),
                                            codebook_->centroids.data(), acc);
}

namespace {
const bool kRegistered = register_quantizer(
    "turboquant_mse", [](const QuantizerConfig& c) { return std::make_unique<MseQuantizer>(c); });
}  // namespace

}  // namespace turboquant
