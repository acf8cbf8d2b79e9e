// Outlier split / fractional bits (DESIGN §1; TurboQuant paper §4.3, "outlier channels"):
// the channels of x are split into an outlier set O (n_outlier_channels of them, given or
// chosen from calibration data by largest mean |x|) and the inliers I; each part is
// quantized by its own instance of the same method at its own bit width, so 32 outlier
// channels at 3 bits + 96 at 2 bits give 2.25 bits per coordinate, 64 + 64 give 2.5.
//
// Rotation: Π = diag(Π_O, Π_I)·P (rotation_block.h), P putting O first (ascending) then I.
// With y = Πx/‖x‖ = [cos φ·u_O; sin φ·u_I], u_O, u_I unit vectors and
// φ = atan2(‖x_I‖, ‖x_O‖) ∈ [0, π/2], the parts quantize u_O and u_I and the code keeps φ:
// the sub-norm ratios ‖x_O‖/‖x‖ = cos φ and ‖x_I‖/‖x‖ = sin φ as one angle of
// QuantizerConfig::split_angle_bits (8 by default, or 16). Then
// ỹ = [cos φ̃·ũ_O; sin φ̃·ũ_I] and x̃ = ‖x‖·Πᵀỹ: the base-class contract holds unchanged.
//
// Code row: [φ: k = round(φ/(π/2)·(2^A - 1)), A = split_angle_bits, as 1 byte (A = 8) or
//           a uint16 little-endian (A = 16)] [outlier part's code row] [inlier part's code row].
// An 8-bit angle is off by at most (π/2)/510 = 0.0031 rad, so each part's norm by at most
// 0.31% of ‖x‖: small next to the codes' own error (~18% at 3 bits), for one byte less.
// bytes_per_vector = A/8 + code_bytes(O) + code_bytes(I) + norm bytes. E.g. d = 128,
// turboquant_mse, 4 outliers at 3 bits + 124 at 2: 1 + 2 + 31 + 2 = 36 B (37 B with A = 16);
// nominal_bits() = (4·3 + 124·2)/128 = 2.03125 exactly.
//
// Small parts (a handful of outlier channels) are below the [16, 512] head_dim range. The
// parts are built with QuantizerConfig::split_part, which allows dim in [1, 512]: their
// codebooks come from coordinate_codebook() (codebook.h), whose Beta((d-1)/2, (d-1)/2) law
// is the exact coordinate law of a random unit vector for every d >= 2 (arcsine at 2, with
// closed-form moments; uniform at 3), and which reproduces ±1 exactly at d = 1. A part
// narrower than 16 channels always gets a dense (Haar) rotation, for which that law is
// exact: a randomized Hadamard transform of a few coordinates is far from Haar.
// Part streams: make_part_stream(stream, p) (rng.h), p = 0 outliers, 1 inliers. jl_dim, when
// given, is shared in proportion to the parts' widths (at least 1 each).
// Query state = [Πq (d) | extra floats of part O | extra floats of part I].
#pragma once

#include <array>
#include <memory>
#include <vector>

#include "turboquant/quantizer.h"

namespace turboquant {

class OutlierSplitQuantizer : public Quantizer {
 public:
  explicit OutlierSplitQuantizer(const QuantizerConfig& config);

  size_t code_bytes() const override { return angle_bytes_ + part_bytes_[0] + part_bytes_[1]; }
  double nominal_bits() const override;
  // The two parts' state (rotations, QJL matrices) plus the channel permutation.
  size_t state_bytes() const override {
    return parts_[0]->state_bytes() + parts_[1]->state_bytes() +
           (outliers_.size() + static_cast<size_t>(dim())) * sizeof(int);
  }
  // The split's rotation is derived from its parts (seeded): an installed rotation (a loaded
  // file, an artifact store) must equal it, and the parts' own rotations stay in use.
  void set_rotation(std::unique_ptr<Rotation> rotation) override;
  void share_rotation(const Quantizer& from) override;
  const Quantizer& part(size_t p) const { return *parts_[p]; }  // 0: outliers, 1: inliers
  const std::vector<int>& outlier_channels() const { return outliers_; }
  int outlier_bits() const { return parts_[0]->bits(); }
  // Bytes of the part angle at the start of each code row: split_angle_bits / 8.
  size_t angle_bytes() const { return angle_bytes_; }
  // Byte offset of part p's code row inside a split code row; the bytes before
  // part_offset(0) hold the angle (re-quantization copies them, e.g. temporal decay).
  size_t part_offset(size_t p) const { return offsets_[p]; }
  // cos φ̃, sin φ̃ of one code row.
  std::array<float, 2> part_ratios(const uint8_t* code) const;

  void quantize_rotated(const float* y, size_t n, uint8_t* codes) const override;
  void dequantize_rotated(const uint8_t* codes, size_t n, float* y) const override;
  size_t query_state_floats() const override;
  void prepare_queries(const float* q, size_t m, float* state) const override;
  void scores(const float* state, size_t m, const uint8_t* codes, const float* norms, size_t n,
              float* out, size_t out_stride) const override;
  void accumulate(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                  const float* norms, size_t n, float* acc) const override;

 private:
  struct Built;
  static Built build(const QuantizerConfig& config);
  explicit OutlierSplitQuantizer(Built built);
  // Copies the code rows of part p into a contiguous n×code_bytes(p) buffer, and the norms
  // of that part (norms[t]·cos φ̃ or ·sin φ̃).
  void gather(size_t p, const uint8_t* codes, const float* norms, size_t n, std::vector<uint8_t>& pc,
              std::vector<float>& pn) const;
  template <size_t AngleBytes>
  void gather_rows(size_t p, const uint8_t* codes, const float* norms, size_t n, uint8_t* pc, float* pn) const;
  void part_state(size_t p, const float* state, size_t m, std::vector<float>& ps) const;
  template <size_t AngleBytes>
  void part_norms(size_t p, const uint8_t* codes, const float* norms, size_t n, float* pn) const;
  template <typename Fn>
  void for_part_rows(size_t p, const uint8_t* codes, const float* norms, size_t n, std::vector<uint8_t>& pc,
                     std::vector<float>& pn, Fn&& fn) const;

  std::vector<int> outliers_;
  std::array<std::unique_ptr<Quantizer>, 2> parts_;
  std::array<size_t, 2> dims_{}, part_bytes_{}, offsets_{};
  size_t angle_bytes_ = 1;
  const std::array<float, 2>* angle_table_ = nullptr;  // 2^split_angle_bits (cos, sin) pairs
  std::array<const MseQuantizer*, 2> mse_parts_{};   // a part that is turboquant_mse, else null
};

// Builds the split for a config with has_outliers() (used by make_quantizer()).
std::unique_ptr<Quantizer> make_outlier_split_quantizer(const QuantizerConfig& config);

// The `count` channels of largest mean |x| over n calibration vectors (n×dim row-major),
// ascending; ties go to the lower channel. Throws InvalidArgument for count outside
// [1, dim - 1], n = 0 or NaN/Inf data.
std::vector<int> select_outlier_channels(const float* x, size_t n, int dim, int count);

}  // namespace turboquant
