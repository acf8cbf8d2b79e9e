// Block-diagonal rotation after a channel permutation: Π = diag(Π_0, Π_1, ...)·P. The
// outlier split (quantizer_outlier.h) uses it so that its rotated domain is the
// concatenation of its parts' rotated domains: y = [Π_0 x_{c_0}; Π_1 x_{c_1}], with c_p the
// channels of part p. Orthogonal as a product of orthogonal maps.
// Exported as a dense rotation (kind() == kDense, parameters() = the d×d matrix Π), so
// Rotation::from_parameters(kDense, d, parameters()) rebuilds the same map.
#pragma once

#include <memory>
#include <vector>

#include "turboquant/rotation.h"

namespace turboquant {

class BlockDiagonalRotation final : public Rotation {
 public:
  // channels: the d input channels in the order of the blocks (a permutation of 0..d-1);
  // blocks: rotations whose dims sum to d, applied to consecutive runs of `channels`.
  BlockDiagonalRotation(std::vector<int> channels, std::vector<std::unique_ptr<Rotation>> blocks);

  RotationKind kind() const override { return RotationKind::kDense; }
  void forward(const float* x, float* y, size_t n) const override;
  void inverse(const float* y, float* x, size_t n) const override;
  std::vector<float> parameters() const override { return matrix(); }

  const std::vector<int>& channels() const { return channels_; }
  size_t blocks() const { return blocks_.size(); }
  const Rotation& block(size_t i) const { return *blocks_[i]; }

 private:
  std::vector<int> channels_;
  std::vector<std::unique_ptr<Rotation>> blocks_;
};

}  // namespace turboquant
