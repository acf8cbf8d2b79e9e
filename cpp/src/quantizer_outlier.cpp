// Outlier split: two parts of one method at two bit widths under a block-diagonal rotation.
#include "turboquant/quantizer_outlier.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>
#include <numeric>

#include "backend/cpu/kernels.h"
#include "turboquant/error.h"
#include "turboquant/rng.h"
#include "turboquant/rotation_block.h"

namespace turboquant {

namespace {
constexpr double kHalfPi = std::numbers::pi / 2.0;

// (cos φ, sin φ) of every angle code of `bits` bits, as floats: the attention paths read a
// part ratio per token, and a table lookup is several times cheaper than a double sincos.
template <int Bits>
const std::array<float, 2>* angle_table() {
  static const std::vector<std::array<float, 2>> table = [] {
    constexpr unsigned top = (1u << Bits) - 1;
    std::vector<std::array<float, 2>> t(top + 1);
    for (unsigned k = 1; k < top; ++k) {
      const double phi = k * (kHalfPi / top);
      t[k] = {static_cast<float>(std::cos(phi)), static_cast<float>(std::sin(phi))};
    }
    t[0] = {1.0f, 0.0f};
    t[top] = {0.0f, 1.0f};
    return t;
  }();
  return table.data();
}

template <size_t AngleBytes>
inline unsigned read_angle(const uint8_t* code) {
  if constexpr (AngleBytes == 1) {
    return code[0];
  } else {
    return static_cast<unsigned>(code[0]) | (static_cast<unsigned>(code[1]) << 8);
  }
}

RotationKind part_rotation(RotationKind requested, int dim) {
  if (dim < kMinDim) return RotationKind::kDense;  // Hadamard of a few coordinates is far from Haar
  if (requested == RotationKind::kDense || !is_power_of_two(dim)) return RotationKind::kDense;
  return requested == RotationKind::kHadamard1 ? RotationKind::kHadamard1 : RotationKind::kHadamard;
}
}  // namespace

struct OutlierSplitQuantizer::Built {
  QuantizerConfig config;
  std::vector<int> outliers;
  std::array<std::unique_ptr<Quantizer>, 2> parts;
  std::unique_ptr<Rotation> rotation;
};

OutlierSplitQuantizer::Built OutlierSplitQuantizer::build(const QuantizerConfig& config) {
  config.validate();
  TQ_CHECK(config.has_outliers(), InvalidArgument, "outlier split needs outlier channels");
  OutlierSplitQuantizer::Built b;
  b.config = config;
  const int d = config.dim;
  if (!config.outlier_channels.empty()) {
    b.outliers = config.outlier_channels;
  } else {
    b.outliers.resize(static_cast<size_t>(config.n_outlier_channels));
    std::iota(b.outliers.begin(), b.outliers.end(), 0);
  }
  std::sort(b.outliers.begin(), b.outliers.end());
  b.config.outlier_channels = b.outliers;
  b.config.n_outlier_channels = static_cast<int>(b.outliers.size());
  const int outlier_bits = config.outlier_bits ? config.outlier_bits : std::min(config.bits + 1, kMaxBits);
  b.config.outlier_bits = outlier_bits;

  std::vector<int> channels = b.outliers;
  std::vector<bool> is_outlier(static_cast<size_t>(d), false);
  for (int c : b.outliers) is_outlier[static_cast<size_t>(c)] = true;
  for (int c = 0; c < d; ++c)
    if (!is_outlier[static_cast<size_t>(c)]) channels.push_back(c);

  const std::array<int, 2> dims{static_cast<int>(b.outliers.size()), d - static_cast<int>(b.outliers.size())};
  const std::array<int, 2> bits{outlier_bits, config.bits};
  std::vector<std::unique_ptr<Rotation>> blocks;
  for (size_t p = 0; p < 2; ++p) {
    QuantizerConfig pc;
    pc.method = config.method;
    pc.dim = dims[p];
    pc.bits = bits[p];
    pc.seed = config.seed;
    pc.stream = make_part_stream(config.stream, static_cast<uint32_t>(p));
    pc.rotation = part_rotation(config.rotation, dims[p]);
    pc.norm_dtype = NormDtype::kFloat32;  // unused: a part's norm is ‖x‖·cos φ or ·sin φ
    pc.jl_dim = config.jl_dim == 0
                    ? 0
                    : std::max(1, static_cast<int>(std::lround(static_cast<double>(config.jl_dim) * dims[p] / d)));
    pc.law = config.law;
    pc.split_part = true;
    b.parts[p] = make_quantizer(pc);
    const auto params = b.parts[p]->rotation().parameters();
    blocks.push_back(Rotation::from_parameters(b.parts[p]->rotation().kind(), dims[p], params));
  }
  b.rotation = std::make_unique<BlockDiagonalRotation>(std::move(channels), std::move(blocks));
  return b;
}

OutlierSplitQuantizer::OutlierSplitQuantizer(const QuantizerConfig& config)
    : OutlierSplitQuantizer(build(config)) {}

OutlierSplitQuantizer::OutlierSplitQuantizer(Built built)
    : Quantizer(built.config, std::move(built.rotation)),
      outliers_(std::move(built.outliers)),
      parts_(std::move(built.parts)) {
  for (size_t p = 0; p < 2; ++p) {
    dims_[p] = static_cast<size_t>(parts_[p]->dim());
    part_bytes_[p] = parts_[p]->code_bytes();
  }
  angle_bytes_ = static_cast<size_t>(config_.split_angle_bits / 8);
  angle_table_ = config_.split_angle_bits == 8 ? angle_table<8>() : angle_table<16>();
  offsets_ = {angle_bytes_, angle_bytes_ + part_bytes_[0]};
  for (size_t p = 0; p < 2; ++p) mse_parts_[p] = dynamic_cast<const MseQuantizer*>(parts_[p].get());
}

double OutlierSplitQuantizer::nominal_bits() const {
  return (parts_[0]->nominal_bits() * static_cast<double>(dims_[0]) +
          parts_[1]->nominal_bits() * static_cast<double>(dims_[1])) / dim();
}

std::array<float, 2> OutlierSplitQuantizer::part_ratios(const uint8_t* code) const {
  return angle_table_[angle_bytes_ == 1 ? read_angle<1>(code) : read_angle<2>(code)];
}

void OutlierSplitQuantizer::quantize_rotated(const float* y, size_t n, uint8_t* codes) const {
  const auto d = static_cast<size_t>(dim());
  const size_t cb = code_bytes();
  std::array<std::vector<float>, 2> u{std::vector<float>(n * dims_[0]), std::vector<float>(n * dims_[1])};
  std::array<std::vector<uint8_t>, 2> pc{std::vector<uint8_t>(n * part_bytes_[0]),
                                         std::vector<uint8_t>(n * part_bytes_[1])};
  for (size_t r = 0; r < n; ++r) {
    std::array<double, 2> norm{0.0, 0.0};
    size_t off = 0;
    for (size_t p = 0; p < 2; ++p) {
      for (size_t j = 0; j < dims_[p]; ++j) norm[p] += static_cast<double>(y[r * d + off + j]) * y[r * d + off + j];
      norm[p] = std::sqrt(norm[p]);
      const double inv = norm[p] > 0.0 ? 1.0 / norm[p] : 0.0;
      for (size_t j = 0; j < dims_[p]; ++j) u[p][r * dims_[p] + j] = static_cast<float>(y[r * d + off + j] * inv);
      off += dims_[p];
    }
    const double phi = std::atan2(norm[1], norm[0]);  // [0, π/2]
    const long top = angle_bytes_ == 1 ? 255L : 65535L;
    const auto k = static_cast<unsigned>(std::clamp(std::lround(phi / kHalfPi * static_cast<double>(top)), 0L, top));
    codes[r * cb] = static_cast<uint8_t>(k & 0xFFu);
    if (angle_bytes_ == 2) codes[r * cb + 1] = static_cast<uint8_t>(k >> 8);
  }
  for (size_t p = 0; p < 2; ++p) {
    parts_[p]->quantize_rotated(u[p].data(), n, pc[p].data());
    for (size_t r = 0; r < n; ++r)
      std::memcpy(codes + r * cb + offsets_[p], pc[p].data() + r * part_bytes_[p], part_bytes_[p]);
  }
}

template <size_t AngleBytes>
void OutlierSplitQuantizer::gather_rows(size_t p, const uint8_t* codes, const float* norms, size_t n, uint8_t* pc,
                                        float* pn) const {
  const size_t cb = code_bytes(), pb = part_bytes_[p], off = offsets_[p];
  const std::array<float, 2>* table = angle_table_;
  for (size_t t = 0; t < n; ++t) {
    const uint8_t* code = codes + t * cb;
    std::memcpy(pc + t * pb, code + off, pb);
    pn[t] = (norms ? norms[t] : 1.0f) * table[read_angle<AngleBytes>(code)][p];
  }
}

void OutlierSplitQuantizer::gather(size_t p, const uint8_t* codes, const float* norms, size_t n,
                                   std::vector<uint8_t>& pc, std::vector<float>& pn) const {
  pc.resize(n * part_bytes_[p]);
  pn.resize(n);
  // One branch per call on the angle width; the per-token loop is specialised.
  if (angle_bytes_ == 1) {
    gather_rows<1>(p, codes, norms, n, pc.data(), pn.data());
  } else {
    gather_rows<2>(p, codes, norms, n, pc.data(), pn.data());
  }
}

void OutlierSplitQuantizer::dequantize_rotated(const uint8_t* codes, size_t n, float* y) const {
  const auto d = static_cast<size_t>(dim());
  std::vector<uint8_t> pc;
  std::vector<float> pn, py;
  size_t off = 0;
  for (size_t p = 0; p < 2; ++p) {
    gather(p, codes, nullptr, n, pc, pn);
    py.resize(n * dims_[p]);
    parts_[p]->dequantize_rotated(pc.data(), n, py.data());
    for (size_t r = 0; r < n; ++r)
      for (size_t j = 0; j < dims_[p]; ++j) y[r * d + off + j] = pn[r] * py[r * dims_[p] + j];
    off += dims_[p];
  }
}

size_t OutlierSplitQuantizer::query_state_floats() const {
  return static_cast<size_t>(dim()) + (parts_[0]->query_state_floats() - dims_[0]) +
         (parts_[1]->query_state_floats() - dims_[1]);
}

void OutlierSplitQuantizer::prepare_queries(const float* q, size_t m, float* state) const {
  const auto d = static_cast<size_t>(dim());
  const size_t sf = query_state_floats();
  const auto& channels = static_cast<const BlockDiagonalRotation&>(*rotation_).channels();
  std::array<size_t, 2> extra_off{d, d + parts_[0]->query_state_floats() - dims_[0]};
  size_t off = 0;
  std::vector<float> pq, ps;
  for (size_t p = 0; p < 2; ++p) {
    const size_t psf = parts_[p]->query_state_floats();
    pq.resize(m * dims_[p]);
    ps.resize(m * psf);
    for (size_t i = 0; i < m; ++i)
      for (size_t j = 0; j < dims_[p]; ++j) pq[i * dims_[p] + j] = q[i * d + static_cast<size_t>(channels[off + j])];
    parts_[p]->prepare_queries(pq.data(), m, ps.data());
    for (size_t i = 0; i < m; ++i) {
      std::copy_n(ps.data() + i * psf, dims_[p], state + i * sf + off);
      std::copy_n(ps.data() + i * psf + dims_[p], psf - dims_[p], state + i * sf + extra_off[p]);
    }
    off += dims_[p];
  }
}

void OutlierSplitQuantizer::part_state(size_t p, const float* state, size_t m, std::vector<float>& ps) const {
  const auto d = static_cast<size_t>(dim());
  const size_t sf = query_state_floats();
  const size_t psf = parts_[p]->query_state_floats();
  const size_t off = p == 0 ? 0 : dims_[0];
  const size_t extra = p == 0 ? d : d + parts_[0]->query_state_floats() - dims_[0];
  ps.resize(m * psf);
  for (size_t i = 0; i < m; ++i) {
    std::copy_n(state + i * sf + off, dims_[p], ps.data() + i * psf);
    std::copy_n(state + i * sf + extra, psf - dims_[p], ps.data() + i * psf + dims_[p]);
  }
}

namespace {
// Per-thread buffers of the attention hooks, which run once per page and KV head: reused
// instead of allocated on every call (the parts never call back into a split).
struct SplitScratch {
  std::vector<uint8_t> pc;
  std::vector<float> pn, ps, tmp, pacc;
};
SplitScratch& split_scratch() {
  thread_local SplitScratch s;
  return s;
}
}  // namespace

// Part norms only (norms[t]·cos φ̃ or ·sin φ̃), for kernels that read part codes in place.
template <size_t AngleBytes>
void OutlierSplitQuantizer::part_norms(size_t p, const uint8_t* codes, const float* norms, size_t n,
                                       float* pn) const {
  const size_t cb = code_bytes();
  const std::array<float, 2>* table = angle_table_;
  for (size_t t = 0; t < n; ++t) pn[t] = (norms ? norms[t] : 1.0f) * table[read_angle<AngleBytes>(codes + t * cb)][p];
}

// Runs fn(part codes, code stride, part norms, rows) over part p of n code rows. A
// turboquant_mse part is read in place (the kernels take a row stride): all rows but the
// last directly, the last from a zero-padded copy, since the kernels may load a few bytes
// past a row's packed part and the page buffer ends with that row. Other methods get
// contiguous copies (gather).
template <typename Fn>
void OutlierSplitQuantizer::for_part_rows(size_t p, const uint8_t* codes, const float* norms, size_t n,
                                          std::vector<uint8_t>& pc, std::vector<float>& pn, Fn&& fn) const {
  if (!mse_parts_[p] || n == 0) {
    gather(p, codes, norms, n, pc, pn);
    fn(pc.data(), part_bytes_[p], pn.data(), size_t{0}, n);
    return;
  }
  const size_t cb = code_bytes();
  pn.resize(n);
  if (angle_bytes_ == 1) {
    part_norms<1>(p, codes, norms, n, pn.data());
  } else {
    part_norms<2>(p, codes, norms, n, pn.data());
  }
  if (n > 1) fn(codes + offsets_[p], cb, pn.data(), size_t{0}, n - 1);
  // The kernels' own tail copy reads the view's row, part offset + cb bytes from pc.data();
  // their loads stay in that copy. 2·cb + 32 zeroed bytes cover both.
  pc.assign(2 * cb + 32, 0);
  std::memcpy(pc.data(), codes + (n - 1) * cb, cb);
  fn(pc.data() + offsets_[p], cb, pn.data() + n - 1, n - 1, size_t{1});
}

void OutlierSplitQuantizer::scores(const float* state, size_t m, const uint8_t* codes, const float* norms,
                                   size_t n, float* out, size_t out_stride) const {
  SplitScratch& sc = split_scratch();
  auto &pc = sc.pc;
  auto &pn = sc.pn, &ps = sc.ps, &tmp = sc.tmp;
  tmp.resize(m * n);
  for (size_t p = 0; p < 2; ++p) {
    part_state(p, state, m, ps);
    // Part 0 writes the scores, part 1 goes to tmp and is added.
    float* dst = p == 0 ? out : tmp.data();
    const size_t dst_stride = p == 0 ? out_stride : n;
    for_part_rows(p, codes, norms, n, pc, pn, [&](const uint8_t* c, size_t stride, const float* nr, size_t t0, size_t nt) {
      if (mse_parts_[p]) {
        const MseQuantizer& q = *mse_parts_[p];
        cpu::active_kernels().mse_scores(ps.data(), m, c, stride, nr, nt, dims_[p], q.bits(),
                                         q.codebook().centroids.data(), dst + t0, dst_stride);
      } else {
        parts_[p]->scores(ps.data(), m, c, nr, nt, dst + t0, dst_stride);
      }
    });
    if (p == 1)
      for (size_t i = 0; i < m; ++i)
        for (size_t t = 0; t < n; ++t) out[i * out_stride + t] += tmp[i * n + t];
  }
}

void OutlierSplitQuantizer::accumulate(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                                       const float* norms, size_t n, float* acc) const {
  const auto d = static_cast<size_t>(dim());
  SplitScratch& sc = split_scratch();
  auto &pc = sc.pc;
  auto &pn = sc.pn, &pacc = sc.pacc;
  size_t off = 0;
  for (size_t p = 0; p < 2; ++p) {
    pacc.assign(m * dims_[p], 0.0f);
    for_part_rows(p, codes, norms, n, pc, pn, [&](const uint8_t* c, size_t stride, const float* nr, size_t t0, size_t nt) {
      if (mse_parts_[p]) {
        const MseQuantizer& q = *mse_parts_[p];
        cpu::active_kernels().mse_accumulate(w + t0, w_stride, m, c, stride, nr, nt, dims_[p], q.bits(),
                                             q.codebook().centroids.data(), pacc.data());
      } else {
        parts_[p]->accumulate(w + t0, w_stride, m, c, nr, nt, pacc.data());
      }
    });
    for (size_t i = 0; i < m; ++i)
      for (size_t j = 0; j < dims_[p]; ++j) acc[i * d + off + j] += pacc[i * dims_[p] + j];
    off += dims_[p];
  }
}

std::unique_ptr<Quantizer> make_outlier_split_quantizer(const QuantizerConfig& config) {
  return std::make_unique<OutlierSplitQuantizer>(config);
}

std::vector<int> select_outlier_channels(const float* x, size_t n, int dim, int count) {
  TQ_CHECK(dim >= 2 && dim <= kMaxDim, InvalidArgument, "head_dim must be in [2, ", kMaxDim, "], got ", dim);
  TQ_CHECK(count >= 1 && count < dim, InvalidArgument, "outlier channel count must be in [1, ", dim - 1,
           "], got ", count);
  TQ_CHECK(n >= 1, InvalidArgument, "calibration data needs at least one vector");
  const auto d = static_cast<size_t>(dim);
  std::vector<double> mean(d, 0.0);
  for (size_t i = 0; i < n * d; ++i) {
    TQ_CHECK(std::isfinite(x[i]), InvalidArgument, "calibration data contains NaN or Inf (vector ", i / d,
             ", channel ", i % d, ")");
    mean[i % d] += std::abs(static_cast<double>(x[i]));
  }
  std::vector<int> order(d);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return mean[static_cast<size_t>(a)] > mean[static_cast<size_t>(b)];
  });
  order.resize(static_cast<size_t>(count));
  std::sort(order.begin(), order.end());
  return order;
}

void OutlierSplitQuantizer::set_rotation(std::unique_ptr<Rotation> rotation) {
  TQ_CHECK(rotation && rotation->dim() == dim(), InvalidArgument, "rotation must have dim ", dim());
  const auto mine = rotation_->matrix();
  const auto theirs = rotation->matrix();
  float worst = 0.0f;
  for (size_t i = 0; i < mine.size(); ++i) worst = std::max(worst, std::abs(mine[i] - theirs[i]));
  TQ_CHECK(worst <= 1e-5f, InvalidArgument,
           "an outlier split derives its rotation from its seed and channels; the given rotation "
           "differs from it (max |difference| = ", worst, ")");
}

void OutlierSplitQuantizer::share_rotation(const Quantizer& from) {
  const auto* f = dynamic_cast<const OutlierSplitQuantizer*>(&from);
  TQ_CHECK(f != nullptr && f->outliers_ == outliers_ && f->dim() == dim(), InvalidArgument,
           "share_rotation: an outlier split shares the rotation of a split of the same channels only");
  for (size_t p = 0; p < 2; ++p) parts_[p]->share_rotation(*f->parts_[p]);
  rotation_ = f->rotation_;
}

}  // namespace turboquant
