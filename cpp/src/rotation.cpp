#include "turboquant/rotation.h"

#include <Eigen/Dense>
#include <cmath>
#include <cstring>

#include "backend/cpu/kernels.h"
#include "turboquant/error.h"
#include "turboquant/rng.h"

namespace turboquant {

std::string to_string(RotationKind kind) {
  switch (kind) {
    case RotationKind::kAuto: return "auto";
    case RotationKind::kDense: return "dense";
    case RotationKind::kHadamard: return "hadamard";
    case RotationKind::kHadamard1: return "hadamard1";
  }
  return "unknown";
}

RotationKind rotation_kind_from_string(const std::string& name) {
  if (name == "auto") return RotationKind::kAuto;
  if (name == "dense") return RotationKind::kDense;
  if (name == "hadamard") return RotationKind::kHadamard;
  if (name == "hadamard1") return RotationKind::kHadamard1;
  throw InvalidArgument("rotation must be 'auto', 'dense', 'hadamard' or 'hadamard1', got '" + name + "'");
}

// The active CPU kernel set's transform (SIMD where available; bit-identical to scalar).
void fwht(float* x, size_t n) { cpu::active_kernels().fwht(x, n); }

void Rotation::forward_scaled(const float* x, const float* row_scale, float* y, size_t n) const {
  const auto d = static_cast<size_t>(dim_);
  for (size_t r = 0; r < n; ++r)
    for (size_t j = 0; j < d; ++j) y[r * d + j] = x[r * d + j] * row_scale[r];
  forward(y, y, n);
}

std::vector<float> Rotation::matrix() const {
  const auto d = static_cast<size_t>(dim_);
  // Column j of Π is Π e_j; compute Πᵀ rows = (Π e_j) then transpose.
  std::vector<float> eye(d * d, 0.0f), cols(d * d);
  for (size_t j = 0; j < d; ++j) eye[j * d + j] = 1.0f;
  forward(eye.data(), cols.data(), d);  // row j of cols = Π e_j
  std::vector<float> m(d * d);
  for (size_t i = 0; i < d; ++i)
    for (size_t j = 0; j < d; ++j) m[i * d + j] = cols[j * d + i];
  return m;
}

namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

class DenseRotation final : public Rotation {
 public:
  DenseRotation(int dim, RowMatrix m) : Rotation(dim), m_(std::move(m)) {}
  RotationKind kind() const override { return RotationKind::kDense; }

  void forward(const float* x, float* y, size_t n) const override {
    apply(x, y, n, false);
  }
  void inverse(const float* y, float* x, size_t n) const override { apply(y, x, n, true); }
  std::vector<float> parameters() const override {
    return std::vector<float>(m_.data(), m_.data() + m_.size());
  }

 private:
  void apply(const float* in, float* out, size_t n, bool transpose) const {
    const auto d = static_cast<Eigen::Index>(dim_);
    const auto rows = static_cast<Eigen::Index>(n);
    Eigen::Map<const RowMatrix> X(in, rows, d);
    // Rows: Y = X Πᵀ (forward) or X Π (inverse). A temporary handles aliasing in == out.
    RowMatrix Y = transpose ? RowMatrix(X * m_) : RowMatrix(X * m_.transpose());
    std::memcpy(out, Y.data(), sizeof(float) * n * static_cast<size_t>(dim_));
  }
  RowMatrix m_;
};

class HadamardRotation final : public Rotation {
 public:
  HadamardRotation(int dim, std::vector<float> d1, std::vector<float> d2)
      : Rotation(dim), d1_(std::move(d1)), d2_(std::move(d2)),
        scale_(1.0f / static_cast<float>(dim)), post_fwd_(d1_.size(), scale_), post_inv_(d1_.size()) {
    for (size_t j = 0; j < d1_.size(); ++j) post_inv_[j] = d1_[j] * scale_;
  }
  RotationKind kind() const override { return RotationKind::kHadamard; }

  // Π = H D₂ H D₁ with H orthonormal; the two 1/√d factors are folded into one 1/d.
  void forward(const float* x, float* y, size_t n) const override {
    cpu::active_kernels().hadamard_rotate(x, n, d1_.size(), nullptr, d1_.data(), d2_.data(),
                                          post_fwd_.data(), y);
  }
  void forward_scaled(const float* x, const float* row_scale, float* y, size_t n) const override {
    cpu::active_kernels().hadamard_rotate(x, n, d1_.size(), row_scale, d1_.data(), d2_.data(),
                                          post_fwd_.data(), y);
  }
  void inverse(const float* y, float* x, size_t n) const override {
    cpu::active_kernels().hadamard_rotate(y, n, d1_.size(), nullptr, nullptr, d2_.data(),
                                          post_inv_.data(), x);
  }
  std::vector<float> parameters() const override {
    std::vector<float> p(d1_);
    p.insert(p.end(), d2_.begin(), d2_.end());
    return p;
  }

 private:
  std::vector<float> d1_, d2_;
  float scale_;
  std::vector<float> post_fwd_, post_inv_;  // scale_ (forward) and d1_·scale_ (inverse)
};

// Π = H·D₁ / √d: one randomized Hadamard round. The fwht is the active kernel set's
// (bit-identical to scalar) and the sign/scale multiplies are plain loops, so every CPU path
// gives the same bits.
class Hadamard1Rotation final : public Rotation {
 public:
  Hadamard1Rotation(int dim, std::vector<float> d1)
      : Rotation(dim), d1_(std::move(d1)), scale_(1.0f / std::sqrt(static_cast<float>(dim))),
        post_inv_(d1_.size()) {
    for (size_t j = 0; j < d1_.size(); ++j) post_inv_[j] = d1_[j] * scale_;
  }
  RotationKind kind() const override { return RotationKind::kHadamard1; }

  void forward(const float* x, float* y, size_t n) const override {
    const size_t d = d1_.size();
    for (size_t r = 0; r < n; ++r) {
      float* v = y + r * d;
      for (size_t j = 0; j < d; ++j) v[j] = x[r * d + j] * d1_[j];
      fwht(v, d);
      for (size_t j = 0; j < d; ++j) v[j] *= scale_;
    }
  }
  void inverse(const float* y, float* x, size_t n) const override {
    const size_t d = d1_.size();
    for (size_t r = 0; r < n; ++r) {
      float* v = x + r * d;
      if (v != y + r * d) std::memcpy(v, y + r * d, sizeof(float) * d);
      fwht(v, d);
      for (size_t j = 0; j < d; ++j) v[j] *= post_inv_[j];
    }
  }
  std::vector<float> parameters() const override { return d1_; }

 private:
  std::vector<float> d1_;
  float scale_;
  std::vector<float> post_inv_;  // d1_·scale_
};

void check_dim(int dim) {
  // dim 1 (Π = ±1) serves the one-channel parts of an outlier split.
  TQ_CHECK(dim >= 1 && dim <= 4096, InvalidArgument, "rotation dim must be in [1, 4096], got ", dim);
}

}  // namespace

std::unique_ptr<Rotation> Rotation::create(RotationKind kind, int dim, uint64_t seed,
                                           uint64_t stream) {
  check_dim(dim);
  if (kind == RotationKind::kAuto) kind = is_power_of_two(dim) ? RotationKind::kHadamard : RotationKind::kDense;
  const auto d = static_cast<size_t>(dim);
  if (kind == RotationKind::kHadamard || kind == RotationKind::kHadamard1) {
    TQ_CHECK(is_power_of_two(dim), InvalidArgument, to_string(kind),
             " rotation needs a power-of-two dim, got ", dim, " (use rotation='dense' or 'auto')");
    // Stream purpose bits are replaced so that a dense and a hadamard rotation of the same
    // (seed, stream) never share random numbers. hadamard1 keeps D₁ of hadamard.
    RandomStream rs(seed, stream ^ make_stream_id(StreamPurpose::kHadamardSigns));
    std::vector<float> d1(d), d2(d);
    for (auto& s : d1) s = rs.next_sign();
    if (kind == RotationKind::kHadamard1) return std::make_unique<Hadamard1Rotation>(dim, std::move(d1));
    for (auto& s : d2) s = rs.next_sign();
    return std::make_unique<HadamardRotation>(dim, std::move(d1), std::move(d2));
  }
  RandomStream rs(seed, stream ^ make_stream_id(StreamPurpose::kDenseRotation));
  Eigen::MatrixXd g(dim, dim);
  for (Eigen::Index i = 0; i < dim; ++i)
    for (Eigen::Index j = 0; j < dim; ++j) g(i, j) = rs.next_gaussian();
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(g);
  Eigen::MatrixXd q = qr.householderQ();
  const Eigen::MatrixXd r = qr.matrixQR().triangularView<Eigen::Upper>();
  for (Eigen::Index j = 0; j < dim; ++j)
    if (r(j, j) < 0) q.col(j) *= -1.0;  // Haar measure (Mezzadri 2007)
  RowMatrix m = q.cast<float>();
  return std::make_unique<DenseRotation>(dim, std::move(m));
}

std::unique_ptr<Rotation> Rotation::from_parameters(RotationKind kind, int dim,
                                                    std::span<const float> params) {
  check_dim(dim);
  const auto d = static_cast<size_t>(dim);
  for (float v : params) TQ_CHECK(std::isfinite(v), FormatError, "rotation parameters contain NaN/Inf");
  if (kind == RotationKind::kHadamard) {
    TQ_CHECK(is_power_of_two(dim), FormatError, "hadamard rotation needs a power-of-two dim, got ", dim);
    TQ_CHECK(params.size() == 2 * d, FormatError, "hadamard rotation expects ", 2 * d,
             " sign parameters, got ", params.size());
    for (float v : params) TQ_CHECK(v == 1.0f || v == -1.0f, FormatError, "hadamard signs must be +1 or -1");
    return std::make_unique<HadamardRotation>(dim, std::vector<float>(params.begin(), params.begin() + dim),
                                              std::vector<float>(params.begin() + dim, params.end()));
  }
  if (kind == RotationKind::kHadamard1) {
    TQ_CHECK(is_power_of_two(dim), FormatError, "hadamard1 rotation needs a power-of-two dim, got ", dim);
    TQ_CHECK(params.size() == d, FormatError, "hadamard1 rotation expects ", d, " sign parameters, got ",
             params.size());
    for (float v : params) TQ_CHECK(v == 1.0f || v == -1.0f, FormatError, "hadamard1 signs must be +1 or -1");
    return std::make_unique<Hadamard1Rotation>(dim, std::vector<float>(params.begin(), params.end()));
  }
  TQ_CHECK(kind == RotationKind::kDense, InvalidArgument,
           "from_parameters needs 'dense', 'hadamard' or 'hadamard1'");
  TQ_CHECK(params.size() == d * d, FormatError, "dense rotation expects ", d * d, " values, got ", params.size());
  RowMatrix m = Eigen::Map<const RowMatrix>(params.data(), dim, dim);
  const double err = (m * m.transpose() - RowMatrix::Identity(dim, dim)).cwiseAbs().maxCoeff();
  TQ_CHECK(err < 1e-4, FormatError, "dense rotation matrix is not orthogonal (max |ΠΠᵀ - I| = ", err, ")");
  return std::make_unique<DenseRotation>(dim, std::move(m));
}

}  // namespace turboquant
