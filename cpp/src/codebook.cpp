#include "turboquant/codebook.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <numbers>
#include <tuple>

#include "turboquant/error.h"

namespace turboquant {
namespace {

constexpr int kGaussPoints = 20;

struct GaussLegendre {
  std::array<double, kGaussPoints> x{}, w{};
  GaussLegendre() {  // Newton iteration on P_n (Numerical Recipes gauleg), on [-1, 1]
    const int n = kGaussPoints;
    for (int i = 0; i < (n + 1) / 2; ++i) {
      double z = std::cos(std::numbers::pi * (i + 0.75) / (n + 0.5)), pp = 0.0;
      for (int it = 0; it < 100; ++it) {
        double p1 = 1.0, p2 = 0.0;
        for (int j = 0; j < n; ++j) {
          const double p3 = p2;
          p2 = p1;
          p1 = ((2.0 * j + 1.0) * z * p2 - j * p3) / (j + 1.0);
        }
        pp = n * (z * p1 - p2) / (z * z - 1.0);
        const double z1 = z;
        z = z1 - p1 / pp;
        if (std::abs(z - z1) < 1e-15) break;
      }
      x[static_cast<size_t>(i)] = -z;
      x[static_cast<size_t>(n - 1 - i)] = z;
      w[static_cast<size_t>(i)] = w[static_cast<size_t>(n - 1 - i)] = 2.0 / ((1.0 - z * z) * pp * pp);
    }
  }
};

const GaussLegendre& gauss_legendre() {
  static const GaussLegendre gl;
  return gl;
}

struct Moments {
  double m0 = 0.0, m1 = 0.0, m2 = 0.0;  // ∫f, ∫x f, ∫x² f
};

// Composite Gauss-Legendre over panels no wider than scale/4.
Moments integrate(const ScalarDensity& d, double a, double b) {
  Moments m;
  if (!(b > a)) return m;
  if (d.moments) {
    const auto e = d.moments(a, b);
    m.m0 = e[0];
    m.m1 = e[1];
    m.m2 = e[2];
    return m;
  }
  const auto& gl = gauss_legendre();
  const double panel = d.scale / 4.0;
  const int panels = std::max(1, static_cast<int>(std::ceil((b - a) / panel)));
  const double h = (b - a) / panels;
  for (int p = 0; p < panels; ++p) {
    const double lo = a + p * h, mid = lo + 0.5 * h;
    for (int k = 0; k < kGaussPoints; ++k) {
      const double x = mid + 0.5 * h * gl.x[static_cast<size_t>(k)];
      const double fw = d.pdf(x) * gl.w[static_cast<size_t>(k)] * 0.5 * h;
      m.m0 += fw;
      m.m1 += fw * x;
      m.m2 += fw * x * x;
    }
  }
  return m;
}

}  // namespace

Codebook solve_lloyd_max(const ScalarDensity& density, int bits, const LloydMaxOptions& opt) {
  TQ_CHECK(bits >= kMinBits && bits <= kMaxBits, InvalidArgument, "bits must be in [", kMinBits,
           ", ", kMaxBits, "], got ", bits);
  TQ_CHECK(density.hi > density.lo && density.scale > 0, InvalidArgument,
           "density needs lo < hi and scale > 0");
  const int levels = 1 << bits;
  const auto L = static_cast<size_t>(levels);

  // Initial centroids from the high-resolution optimum (Panter & Dite 1951): point density
  // ∝ pdf^(1/3), i.e. centroids at the (i + 1/2)/L quantiles of pdf^(1/3). Lloyd then needs
  // few iterations even at 8 bits.
  const int table = 8192;
  std::vector<double> grid(table + 1), cdf(table + 1, 0.0);
  ScalarDensity compander = density;
  compander.pdf = [&density](double x) { return std::cbrt(density.pdf(x)); };
  compander.moments = nullptr;  // exact moments belong to pdf, not to its cube root
  double total = 0.0;
  for (int i = 0; i <= table; ++i) grid[static_cast<size_t>(i)] = density.lo + (density.hi - density.lo) * i / table;
  for (int i = 0; i < table; ++i) {
    const double a = grid[static_cast<size_t>(i)], b = grid[static_cast<size_t>(i + 1)];
    cdf[static_cast<size_t>(i + 1)] = cdf[static_cast<size_t>(i)] + integrate(compander, a, b).m0;
    total += integrate(density, a, b).m0;
  }
  const double ctotal = cdf.back();
  TQ_CHECK(total > 0 && std::isfinite(total), InvalidArgument, "density has no mass on [lo, hi]");
  std::vector<double> c(L);
  for (size_t i = 0; i < L; ++i) {
    const double target = ctotal * (static_cast<double>(i) + 0.5) / levels;
    const auto it = std::lower_bound(cdf.begin(), cdf.end(), target);
    const size_t k = std::clamp<size_t>(static_cast<size_t>(it - cdf.begin()), 1, static_cast<size_t>(table));
    const double f = (target - cdf[k - 1]) / std::max(cdf[k] - cdf[k - 1], 1e-300);
    c[i] = grid[k - 1] + f * (grid[k] - grid[k - 1]);
  }

  // Lloyd's fixed point c = g(c), g_i = E[X | t_{i-1} < X < t_i], t_i = (c_i + c_{i+1})/2,
  // solved by Newton's method: the Jacobian of c - g(c) is tridiagonal, since
  // ∂g_i/∂t_i = f(t_i)(t_i - g_i)/M0_i and ∂g_i/∂t_{i-1} = f(t_{i-1})(g_i - t_{i-1})/M0_i.
  // A step that would break the ordering is halved; plain Lloyd steps are the fallback.
  std::vector<double> t(L + 1), g(L), r(L), lower(L), diag(L), upper(L), delta(L);
  auto evaluate = [&](const std::vector<double>& cc) {
    t[0] = density.lo;
    t[L] = density.hi;
    for (size_t i = 1; i < L; ++i) t[i] = 0.5 * (cc[i - 1] + cc[i]);
    double worst = 0.0;
    for (size_t i = 0; i < L; ++i) {
      const Moments m = integrate(density, t[i], t[i + 1]);
      const double m0 = std::max(m.m0, 1e-300);
      g[i] = m.m0 > 1e-300 ? m.m1 / m0 : cc[i];
      r[i] = cc[i] - g[i];
      worst = std::max(worst, std::abs(r[i]));
      const double fa = i > 0 ? density.pdf(t[i]) * (g[i] - t[i]) / m0 : 0.0;
      const double fb = i + 1 < L ? density.pdf(t[i + 1]) * (t[i + 1] - g[i]) / m0 : 0.0;
      // d g_i/d c_{i-1} = fa/2, d g_i/d c_i = (fa + fb)/2, d g_i/d c_{i+1} = fb/2.
      lower[i] = -0.5 * fa;
      diag[i] = 1.0 - 0.5 * (fa + fb);
      upper[i] = -0.5 * fb;
    }
    return worst;
  };
  const double tol = opt.tolerance * density.scale;
  for (int iter = 0; iter < opt.max_iterations; ++iter) {
    const double worst = evaluate(c);
    if (worst < tol) break;
    // Thomas algorithm for J δ = -r.
    std::vector<double> cp(L), dp(L);
    bool ok = true;
    for (size_t i = 0; i < L; ++i) {
      const double den = diag[i] - (i > 0 ? lower[i] * cp[i - 1] : 0.0);
      if (std::abs(den) < 1e-300) { ok = false; break; }
      cp[i] = upper[i] / den;
      dp[i] = (-r[i] - (i > 0 ? lower[i] * dp[i - 1] : 0.0)) / den;
    }
    if (ok) {
      delta[L - 1] = dp[L - 1];
      for (size_t i = L - 1; i-- > 0;) delta[i] = dp[i] - cp[i] * delta[i + 1];
    }
    std::vector<double> trial(L);
    double step = 1.0;
    bool accepted = false;
    for (int half = 0; ok && half < 30 && !accepted; ++half, step *= 0.5) {
      accepted = true;
      for (size_t i = 0; i < L; ++i) {
        trial[i] = c[i] + step * delta[i];
        if (!(trial[i] > density.lo && trial[i] < density.hi) || (i > 0 && !(trial[i] > trial[i - 1]))) {
          accepted = false;
          break;
        }
      }
    }
    if (accepted) {
      c = trial;
    } else {
      c = g;  // Lloyd step
    }
  }

  Codebook cb;
  cb.bits = bits;
  double dist = 0.0;
  t[0] = density.lo;
  t[L] = density.hi;
  for (size_t i = 1; i < L; ++i) t[i] = 0.5 * (c[i - 1] + c[i]);
  for (size_t i = 0; i < L; ++i) {
    const Moments m = integrate(density, t[i], t[i + 1]);
    dist += m.m2 - 2.0 * c[i] * m.m1 + c[i] * c[i] * m.m0;
  }
  cb.distortion = dist / total;
  cb.centroids.assign(c.begin(), c.end());
  for (size_t i = 1; i < L; ++i) cb.boundaries.push_back(static_cast<float>(t[i]));
  return cb;
}

ScalarDensity coordinate_density(int dim, CoordinateLaw law) {
  TQ_CHECK(dim >= 2, InvalidArgument, "dim must be >= 2, got ", dim);
  const double sigma = 1.0 / std::sqrt(static_cast<double>(dim));
  ScalarDensity d;
  d.scale = sigma;
  if (law == CoordinateLaw::kGaussian) {
    d.lo = -16.0 * sigma;
    d.hi = 16.0 * sigma;
    const double norm = 1.0 / (sigma * std::sqrt(2.0 * std::numbers::pi));
    d.pdf = [sigma, norm](double x) { return norm * std::exp(-0.5 * (x / sigma) * (x / sigma)); };
  } else if (dim == 2) {
    // Arcsine law 1/(π√(1 - x²)): singular at ±1, so its moments are given in closed form.
    d.lo = -1.0;
    d.hi = 1.0;
    d.pdf = [](double x) {
      const double s = 1.0 - x * x;
      return s > 0.0 ? 1.0 / (std::numbers::pi * std::sqrt(s)) : 0.0;
    };
    d.moments = [](double a, double b) {
      a = std::clamp(a, -1.0, 1.0);
      b = std::clamp(b, -1.0, 1.0);
      const double pi = std::numbers::pi;
      const double sa = std::sqrt(std::max(0.0, 1.0 - a * a)), sb = std::sqrt(std::max(0.0, 1.0 - b * b));
      const double m0 = (std::asin(b) - std::asin(a)) / pi;
      const double m1 = (sa - sb) / pi;
      const double m2 = 0.5 * ((std::asin(b) - b * sb) - (std::asin(a) - a * sa)) / pi;
      return std::array<double, 3>{m0, m1, m2};
    };
  } else {
    // (1 - x²)^((d-3)/2) / B((d-1)/2, 1/2) on [-1, 1]; beyond 16σ the mass is < 1e-50.
    const double half = std::min(1.0, 16.0 * sigma);
    d.lo = -half;
    d.hi = half;
    const double n = static_cast<double>(dim);
    const double log_c = std::lgamma(n / 2.0) - 0.5 * std::log(std::numbers::pi) - std::lgamma((n - 1.0) / 2.0);
    const double power = (n - 3.0) / 2.0;
    d.pdf = [log_c, power](double x) {
      const double s = 1.0 - x * x;
      if (s <= 0.0) return 0.0;
      return std::exp(log_c + power * std::log(s));
    };
  }
  return d;
}

const Codebook& lloyd_max_codebook(int dim, int bits, CoordinateLaw law) {
  TQ_CHECK(dim >= kMinDim && dim <= kMaxDim, InvalidArgument, "head_dim must be in [", kMinDim,
           ", ", kMaxDim, "], got ", dim);
  return coordinate_codebook(dim, bits, law);
}

namespace {
// dim = 1: a unit "vector" is ±1. Centroids spread over [-1, 1] with both ends included.
Codebook one_dim_codebook(int bits) {
  Codebook cb;
  cb.bits = bits;
  const int levels = 1 << bits;
  for (int i = 0; i < levels; ++i) cb.centroids.push_back(static_cast<float>(-1.0 + 2.0 * i / (levels - 1)));
  for (int i = 1; i < levels; ++i)
    cb.boundaries.push_back(0.5f * (cb.centroids[static_cast<size_t>(i - 1)] + cb.centroids[static_cast<size_t>(i)]));
  cb.distortion = 0.0;
  return cb;
}
}  // namespace

const Codebook& coordinate_codebook(int dim, int bits, CoordinateLaw law) {
  TQ_CHECK(dim >= 1 && dim <= kMaxDim, InvalidArgument, "dim must be in [1, ", kMaxDim, "], got ", dim);
  TQ_CHECK(bits >= kMinBits && bits <= kMaxBits, InvalidArgument, "bits must be in [", kMinBits,
           ", ", kMaxBits, "], got ", bits);
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int>, std::unique_ptr<Codebook>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = cache[{dim, bits, static_cast<int>(law)}];
  if (!slot) {
    auto cb = std::make_unique<Codebook>(dim == 1 ? one_dim_codebook(bits)
                                                  : solve_lloyd_max(coordinate_density(dim, law), bits));
    cb->dim = dim;
    cb->law = law;
    slot = std::move(cb);
  }
  return *slot;
}

}  // namespace turboquant
