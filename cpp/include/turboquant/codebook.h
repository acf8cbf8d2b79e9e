// Lloyd-Max scalar codebooks (TurboQuant paper, §3.1). After a random rotation each
// coordinate of a unit vector in R^d follows Beta((d-1)/2, (d-1)/2) rescaled to [-1, 1]
// (density ∝ (1 - x²)^((d-3)/2)), close to N(0, 1/d); the optimal b-bit scalar quantizer
// for that law is solved numerically by Lloyd iteration with Gauss-Legendre quadrature.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <vector>

namespace turboquant {

enum class CoordinateLaw {
  kBeta,      // exact law of one coordinate of a uniformly random unit vector in R^d
  kGaussian,  // its large-d limit, N(0, 1/d)
};

inline constexpr int kMinBits = 1;
inline constexpr int kMaxBits = 8;
inline constexpr int kMinDim = 16;
inline constexpr int kMaxDim = 512;

struct Codebook {
  int dim = 0;
  int bits = 0;
  CoordinateLaw law = CoordinateLaw::kBeta;
  std::vector<float> centroids;   // 2^bits values, ascending
  std::vector<float> boundaries;  // 2^bits - 1 midpoints between consecutive centroids
  double distortion = 0.0;        // E[(y - c(y))²] for one coordinate y under the law

  int levels() const { return 1 << bits; }
  // Expected ‖u - ũ‖² for a unit vector: d times the per-coordinate distortion.
  double vector_distortion() const { return distortion * dim; }
  // Index of the nearest centroid (binary search over the boundaries; ties go up).
  uint8_t quantize(float y) const {
    int lo = 0, hi = levels() - 1;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (y < boundaries[static_cast<size_t>(mid)]) hi = mid; else lo = mid + 1;
    }
    return static_cast<uint8_t>(lo);
  }
};

// A density on [lo, hi] for the generic solver. `scale` is its typical width (standard
// deviation), used to size quadrature panels. `moments(a, b)`, when given, returns the exact
// {∫pdf, ∫x·pdf, ∫x²·pdf} over [a, b] and replaces quadrature (for densities with
// integrable endpoint singularities, e.g. the arcsine law of a coordinate in R^2).
struct ScalarDensity {
  std::function<double(double)> pdf;
  double lo = 0.0, hi = 0.0;
  double scale = 1.0;
  std::function<std::array<double, 3>(double, double)> moments;
};

struct LloydMaxOptions {
  int max_iterations = 200;  // Newton steps (Lloyd steps as fallback)
  double tolerance = 1e-11;  // relative to density.scale, on the largest centroid move
};

// Lloyd-Max quantizer with 2^bits levels for an arbitrary density. Returns centroids,
// boundaries and the distortion (dim and law are left for the caller to fill).
Codebook solve_lloyd_max(const ScalarDensity& density, int bits, const LloydMaxOptions& = {});

// Density of one coordinate of a random unit vector in R^dim under `law` (dim >= 2; the
// Beta law at dim = 2 is the arcsine law, given with exact moments).
ScalarDensity coordinate_density(int dim, CoordinateLaw law);

// The codebook for (dim, bits, law), solved once per process and cached (thread-safe).
// Throws InvalidArgument for dim outside [16, 512] or bits outside [1, 8].
const Codebook& lloyd_max_codebook(int dim, int bits, CoordinateLaw law = CoordinateLaw::kBeta);

// The same for any dim in [1, 512]: the parts of an outlier split (quantizer_outlier.h) can
// be a few channels wide. The Beta law is exact at every dim >= 2 (arcsine at 2, uniform at
// 3); at dim = 1 a unit vector is ±1, and the codebook spreads its 2^bits centroids
// uniformly over [-1, 1] with both ends included, so ±1 is reproduced exactly
// (distortion 0). Same cache as lloyd_max_codebook.
const Codebook& coordinate_codebook(int dim, int bits, CoordinateLaw law = CoordinateLaw::kBeta);

}  // namespace turboquant
