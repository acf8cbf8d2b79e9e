// polar: PolarQuant (Han et al., "PolarQuant: Quantizing KV Caches with Polar
// Transformation", 2025; DESIGN §1). After the rotation, the unit vector y is rewritten in
// recursive polar coordinates over a binary tree of pairs, and only the angles are stored.
//
// Tree: level 1 pairs (y_0, y_1), (y_2, y_3), ...; level ℓ+1 pairs consecutive level-ℓ
// nodes; an odd node out is carried up unchanged (so any d works; for d = 2^L this is the
// paper's L-level transform). A pair (a, b) becomes its radius √(a² + b²) and its angle
//   level 1:  ψ = atan2(y_{2i+1}, y_{2i}) ∈ [0, 2π), uniform (both are signed coordinates)
//   higher:   ψ = atan2(r_b, r_a) ∈ [0, π/2]. With k_a, k_b coordinates under the two
//             children, sin²ψ ~ Beta(k_b/2, k_a/2), i.e. density
//             2·sin^{k_b-1}ψ·cos^{k_a-1}ψ / B(k_a/2, k_b/2), concentrating at π/4 (equal
//             k) with variance ≈ 1/(2(k_a + k_b)). The carried odd coordinate of an odd d
//             is signed: its angle lies in [-π/2, π/2], density cos^{k_a-1}ψ / B(k_a/2, 1/2).
// The angles of one uniformly random unit vector are independent with exactly these laws,
// so each (k_a, k_b) gets its own Lloyd-Max codebook (solve_lloyd_max on that density).
// The final radius is ‖y‖ = 1 (the norm of x is stored apart), so nothing else is kept.
//
// Bits. An angle error δ at a node of radius r moves y by ≈ r·δ, and E[r²] = k/d for a
// node over k coordinates, so every level contributes about its angle codebook's
// distortion, while level 1 has d/2 angles and the variance of a uniform angle (π²/3) vs
// ≈ 1/(4k) above. The bit allocation that balances this gives level 1 two more bits than
// the others (the paper uses 4 and 2):  bits = b -> level 1: b1 = b + 1, higher: bh = b - 1
// (b = 8: 8 and 8, as one index is at most a byte). bh = 0 (b = 1) stores no higher angle
// and decodes each one as its mean.
//
// Code row: [level-1 indices: packed_bytes(⌊d/2⌋, b1)] [higher-level indices in tree order,
// level 2 first: packed_bytes(d - 1 - ⌊d/2⌋, bh)], each part in packing.h layout v1.
// nominal bits per coordinate = (⌊d/2⌋·b1 + (d - 1 - ⌊d/2⌋)·bh) / d; at d = 128:
// b=2: 64·3 + 63·1 = 255 bits -> 24 + 8 = 32 B (+2 norm = 34), b=3: 64·4 + 63·2 -> 32 + 16 =
// 48 B (+2 = 50), b=4: 64·5 + 63·3 -> 40 + 24 = 64 B (+2 = 66): the same bytes as mse.
// d = 1 (a one-channel part of an outlier split): one sign bit, one byte.
#pragma once

#include <vector>

#include "turboquant/quantizer.h"

namespace turboquant {

class PolarQuantizer : public Quantizer {
 public:
  explicit PolarQuantizer(const QuantizerConfig& config);
  size_t code_bytes() const override { return level1_bytes_ + higher_bytes_; }
  double nominal_bits() const override;
  int level1_bits() const { return b1_; }
  int higher_bits() const { return bh_; }
  size_t angles() const { return nodes_.size(); }
  // First-order prediction of E‖y - ỹ‖²: Σ over angles of (k/d)·(angle codebook distortion).
  double predicted_distortion() const;

  void quantize_rotated(const float* y, size_t n, uint8_t* codes) const override;
  void dequantize_rotated(const uint8_t* codes, size_t n, float* y) const override;

  // One merge of the tree: children a, b (node ids: 0..d-1 leaves, then parents) -> parent.
  struct Node {
    int a, b, parent;
    int ka, kb;         // coordinates under each child
    int level;          // 1 for pairs of coordinates
    bool b_signed;      // b is the carried signed coordinate of an odd d (level >= 2)
    const Codebook* codebook;  // null for a 0-bit higher angle
    float mean;         // decoded angle of a 0-bit higher angle
  };
  const std::vector<Node>& nodes() const { return nodes_; }

 private:
  int b1_, bh_;
  size_t n_level1_ = 0, n_higher_ = 0;
  size_t level1_bytes_, higher_bytes_;
  std::vector<Node> nodes_;  // level-1 nodes first, then in merge (tree) order
  int root_;
};

// Lloyd-Max codebook of a higher-level PolarQuant angle (cached, thread-safe).
const Codebook& polar_angle_codebook(int ka, int kb, bool b_signed, int bits);
// Lloyd-Max codebook of a level-1 angle, uniform on [0, 2π) (its optimum is uniform).
const Codebook& polar_circle_codebook(int bits);

}  // namespace turboquant
