// Random orthogonal rotations Π (TurboQuant paper §2; DESIGN §1 "Rotation"). Rotating a
// unit vector by Π makes every coordinate follow the same known law, whatever the input.
//   dense:    Haar-random orthogonal matrix, QR of a seeded Gaussian matrix with the signs
//             of R's diagonal moved into Q (Mezzadri 2007). O(d²) per vector.
//   hadamard: Π = H·D₂·H·D₁ with H the orthonormal Walsh-Hadamard matrix and D₁, D₂ random
//             ±1 diagonals. O(d log d), in place. Needs d a power of two; for other d,
//             RotationKind::kAuto picks dense and an explicit kHadamard is an error.
//   hadamard1: Π = H·D₁, one round (D₁ = the first d signs "hadamard" draws for the same
//             seed and stream). Lower MSE on real K/V, weaker on structured inputs (a
//             one-hot input becomes a flat ±1/√d vector); docs/rotation.md has the numbers.
//             Same power-of-two rule as kHadamard; kAuto never picks it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace turboquant {

// The values are the codes files record (serialize.h): append, never renumber.
enum class RotationKind { kAuto, kDense, kHadamard, kHadamard1 };

std::string to_string(RotationKind kind);
RotationKind rotation_kind_from_string(const std::string& name);  // "auto"|"dense"|"hadamard"|"hadamard1"
constexpr bool is_power_of_two(int d) { return d > 0 && (d & (d - 1)) == 0; }

// In-place unnormalised fast Walsh-Hadamard transform of n = 2^k values.
void fwht(float* x, size_t n);

class Rotation {
 public:
  virtual ~Rotation() = default;
  int dim() const { return dim_; }
  virtual RotationKind kind() const = 0;

  // y_i = Π x_i for n row vectors (x and y may alias for in-place use).
  virtual void forward(const float* x, float* y, size_t n) const = 0;
  // x_i = Πᵀ y_i (the inverse, Π being orthogonal).
  virtual void inverse(const float* y, float* x, size_t n) const = 0;
  // y_i = Π (x_i · row_scale[i]) (the product rounded first, as a separate multiply before
  // forward() would); Hadamard fuses it into its transform. x and y may alias.
  virtual void forward_scaled(const float* x, const float* row_scale, float* y, size_t n) const;
  // Π as a dense row-major d×d matrix (for export, tests, and reference implementations).
  std::vector<float> matrix() const;
  // The parameters that define Π: the d×d matrix (dense), D₁ then D₂ signs (hadamard) or
  // the D₁ signs (hadamard1).
  virtual std::vector<float> parameters() const = 0;

  // Built from (seed, stream): the same arguments give the same Π on every platform.
  static std::unique_ptr<Rotation> create(RotationKind kind, int dim, uint64_t seed,
                                          uint64_t stream);
  // Rebuilt from parameters() (artifact stores, saved caches); validates them.
  static std::unique_ptr<Rotation> from_parameters(RotationKind kind, int dim,
                                                   std::span<const float> params);

 protected:
  explicit Rotation(int dim) : dim_(dim) {}
  int dim_;
};

}  // namespace turboquant
