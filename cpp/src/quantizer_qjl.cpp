// qjl: x -> (‖x‖, sign(S Π x/‖x‖)). QJL paper, Alg. 1; TurboQuant paper, Def. 1.
#include "turboquant/quantizer_qjl.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <numbers>

#include "turboquant/error.h"
#include "turboquant/packing.h"
#include "turboquant/rng.h"

namespace turboquant {

QjlSketch::QjlSketch(int dim, int sketch_dim, uint64_t seed, uint64_t stream)
    : dim_(dim), m_(sketch_dim), sign_bytes_(packed_bytes(static_cast<size_t>(sketch_dim), 1)),
      scale_(static_cast<float>(std::sqrt(std::numbers::pi / 2.0) / sketch_dim)) {
  TQ_CHECK(dim >= 1 && sketch_dim >= 1, InvalidArgument, "QJL needs dim >= 1 and jl_dim >= 1, got ",
           dim, " and ", sketch_dim);
  RandomStream rs(seed, stream ^ make_stream_id(StreamPurpose::kQjlMatrix));
  s_.resize(static_cast<size_t>(m_) * static_cast<size_t>(dim_));
  for (auto& v : s_) v = static_cast<float>(rs.next_gaussian());
}

void QjlSketch::signs(const float* r, uint8_t* out) const {
  const auto d = static_cast<size_t>(dim_);
  std::memset(out, 0, sign_bytes_);
  for (size_t k = 0; k < static_cast<size_t>(m_); ++k) {
    const float* row = s_.data() + k * d;
    float acc = 0.0f;
    for (size_t j = 0; j < d; ++j) acc += row[j] * r[j];
    if (acc >= 0.0f) out[k / 8] = static_cast<uint8_t>(out[k / 8] | (1u << (k % 8)));
  }
}

void QjlSketch::project(const float* q, float* sq) const {
  const auto d = static_cast<size_t>(dim_);
  for (size_t k = 0; k < static_cast<size_t>(m_); ++k) {
    const float* row = s_.data() + k * d;
    float acc = 0.0f;
    for (size_t j = 0; j < d; ++j) acc += row[j] * q[j];
    sq[k] = acc;
  }
}

void QjlSketch::add_transpose(const float* z, float* out) const {
  const auto d = static_cast<size_t>(dim_);
  for (size_t k = 0; k < static_cast<size_t>(m_); ++k) {
    const float zk = z[k];
    if (zk == 0.0f) continue;
    const float* row = s_.data() + k * d;
    for (size_t j = 0; j < d; ++j) out[j] += zk * row[j];
  }
}

float QjlSketch::sign_dot(const uint8_t* signs, const float* v) const {
  float acc = 0.0f;
  for (size_t k = 0; k < static_cast<size_t>(m_); ++k) {
    acc += ((signs[k / 8] >> (k % 8)) & 1u) ? v[k] : -v[k];
  }
  return acc;
}

void QjlSketch::sign_tables(const float* v, float* tables) const {
  const auto m = static_cast<size_t>(m_);
  for (size_t g = 0; g < sign_bytes_; ++g) {
    float* t = tables + g * 256;
    t[0] = 0.0f;
    for (unsigned c = 1; c < 256; ++c) {
      const unsigned low = static_cast<unsigned>(std::countr_zero(c));
      const size_t k = 8 * g + low;
      t[c] = t[c & (c - 1)] + (k < m ? v[k] : 0.0f);
    }
  }
}

float QjlSketch::sign_dot_table(const uint8_t* signs, const float* tables, float v_sum) const {
  float acc = 0.0f;
  for (size_t g = 0; g < sign_bytes_; ++g) acc += tables[g * 256 + signs[g]];
  return 2.0f * acc - v_sum;
}

void qjl_scores(const QjlSketch& sketch, const float* state, size_t state_floats, size_t sq_offset,
                size_t m, const uint8_t* codes, size_t code_bytes, size_t sign_offset,
                const float* norms, const float* gammas, size_t n, float* out, size_t out_stride,
                bool add) {
  const auto sm = static_cast<size_t>(sketch.sketch_dim());
  // Tables pay off once a query meets more code rows than a table has entries per byte/8.
  const bool use_tables = n >= 32;
  std::vector<float> tables(use_tables ? sketch.sign_bytes() * 256 : 0);
  for (size_t i = 0; i < m; ++i) {
    const float* sq = state + i * state_floats + sq_offset;
    float v_sum = 0.0f;
    if (use_tables) {
      sketch.sign_tables(sq, tables.data());
      for (size_t k = 0; k < sm; ++k) v_sum += sq[k];
    }
    float* o = out + i * out_stride;
    for (size_t t = 0; t < n; ++t) {
      const uint8_t* s = codes + t * code_bytes + sign_offset;
      const float dot = use_tables ? sketch.sign_dot_table(s, tables.data(), v_sum) : sketch.sign_dot(s, sq);
      const float w = norms[t] * sketch.scale() * (gammas ? gammas[t] : 1.0f);
      o[t] = add ? o[t] + w * dot : w * dot;
    }
  }
}

void qjl_accumulate(const QjlSketch& sketch, const float* w, size_t w_stride, size_t m,
                    const uint8_t* codes, size_t code_bytes, size_t sign_offset, const float* norms,
                    const float* gammas, size_t n, float* acc) {
  const auto sm = static_cast<size_t>(sketch.sketch_dim());
  const auto d = static_cast<size_t>(sketch.dim());
  std::vector<float> z(sm);
  for (size_t i = 0; i < m; ++i) {
    std::fill(z.begin(), z.end(), 0.0f);
    bool any = false;
    for (size_t t = 0; t < n; ++t) {
      const float c = w[i * w_stride + t] * norms[t] * sketch.scale() * (gammas ? gammas[t] : 1.0f);
      if (c == 0.0f) continue;
      any = true;
      const uint8_t* s = codes + t * code_bytes + sign_offset;
      for (size_t k = 0; k < sm; ++k) z[k] += ((s[k / 8] >> (k % 8)) & 1u) ? c : -c;
    }
    if (any) sketch.add_transpose(z.data(), acc + i * d);
  }
}

// --- qjl -----------------------------------------------------------------------------------

QuantizerConfig QjlQuantizer::resolve(QuantizerConfig config) {
  if (config.jl_dim == 0) {
    config.jl_dim = config.bits * config.dim;
  } else {
    TQ_CHECK(config.bits == 1, InvalidArgument, "qjl: give either bits (sketch size m = bits * head_dim) or ",
             "jl_dim with bits = 1, got bits = ", config.bits, " and jl_dim = ", config.jl_dim);
  }
  return config;
}

QjlQuantizer::QjlQuantizer(const QuantizerConfig& config)
    : Quantizer(resolve(config)),
      sketch_(config_.dim, config_.jl_dim, config_.seed, config_.stream) {}

double QjlQuantizer::nominal_bits() const {
  return static_cast<double>(sketch_.sketch_dim()) / dim();
}

void QjlQuantizer::quantize_rotated(const float* y, size_t n, uint8_t* codes) const {
  const auto d = static_cast<size_t>(dim());
  for (size_t r = 0; r < n; ++r) sketch_.signs(y + r * d, codes + r * code_bytes());
}

void QjlQuantizer::dequantize_rotated(const uint8_t* codes, size_t n, float* y) const {
  const auto d = static_cast<size_t>(dim());
  const auto sm = static_cast<size_t>(sketch_.sketch_dim());
  std::vector<float> z(sm);
  for (size_t r = 0; r < n; ++r) {
    const uint8_t* s = codes + r * code_bytes();
    for (size_t k = 0; k < sm; ++k) z[k] = ((s[k / 8] >> (k % 8)) & 1u) ? sketch_.scale() : -sketch_.scale();
    std::fill(y + r * d, y + (r + 1) * d, 0.0f);
    sketch_.add_transpose(z.data(), y + r * d);
  }
}

size_t QjlQuantizer::query_state_floats() const {
  return static_cast<size_t>(dim()) + static_cast<size_t>(sketch_.sketch_dim());
}

void QjlQuantizer::prepare_queries(const float* q, size_t m, float* state) const {
  sketch_.prepare_queries(*rotation_, q, m, state);
}

void QjlSketch::prepare_queries(const Rotation& rotation, const float* q, size_t count,
                                float* state) const {
  const auto d = static_cast<size_t>(dim_);
  const size_t sf = d + static_cast<size_t>(m_);
  for (size_t i = 0; i < count; ++i) {
    float* st = state + i * sf;
    rotation.forward(q + i * d, st, 1);
    project(st, st + d);
  }
}

void QjlQuantizer::scores(const float* state, size_t m, const uint8_t* codes, const float* norms,
                          size_t n, float* out, size_t out_stride) const {
  qjl_scores(sketch_, state, query_state_floats(), static_cast<size_t>(dim()), m, codes, code_bytes(), 0,
             norms, nullptr, n, out, out_stride, false);
}

void QjlQuantizer::accumulate(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                              const float* norms, size_t n, float* acc) const {
  qjl_accumulate(sketch_, w, w_stride, m, codes, code_bytes(), 0, norms, nullptr, n, acc);
}

namespace {
const bool kRegistered = register_quantizer(
    "qjl", [](const QuantizerConfig& c) { return std::make_unique<QjlQuantizer>(c); });
}  // namespace

}  // namespace turboquant
