#include "turboquant/quantizer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>

#include "backend/cpu/kernels.h"
#include "turboquant/error.h"
#include "turboquant/thread_pool.h"
#include "turboquant/half.h"
#include "turboquant/quantizer_outlier.h"

namespace turboquant {
namespace {

struct Registry {
  std::mutex mutex;
  std::map<std::string, QuantizerFactory> factories;
};
Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

void QuantizerConfig::validate() const {
  const int min_dim = split_part ? 1 : kMinDim;
  TQ_CHECK(dim >= min_dim && dim <= kMaxDim, InvalidArgument, "head_dim must be in [", min_dim, ", ",
           kMaxDim, "], got ", dim);
  TQ_CHECK(bits >= kMinBits && bits <= kMaxBits, InvalidArgument, "bits must be in [", kMinBits, ", ",
           kMaxBits, "], got ", bits);
  TQ_CHECK(jl_dim >= 0 && jl_dim <= 8 * kMaxDim, InvalidArgument, "jl_dim must be in [0, ",
           8 * kMaxDim, "] (0 means head_dim), got ", jl_dim);
  TQ_CHECK((rotation != RotationKind::kHadamard && rotation != RotationKind::kHadamard1) ||
               is_power_of_two(dim),
           InvalidArgument, to_string(rotation), " rotation needs a power-of-two head_dim, got ", dim,
           " (use rotation='dense' or 'auto')");
  TQ_CHECK(n_outlier_channels >= 0 && n_outlier_channels < dim, InvalidArgument,
           "n_outlier_channels must be in [0, head_dim - 1] = [0, ", dim - 1, "], got ", n_outlier_channels);
  TQ_CHECK(outlier_bits == 0 || (outlier_bits >= kMinBits && outlier_bits <= kMaxBits), InvalidArgument,
           "outlier_bits must be 0 (bits + 1) or in [", kMinBits, ", ", kMaxBits, "], got ", outlier_bits);
  TQ_CHECK(split_angle_bits == 8 || split_angle_bits == 16, InvalidArgument,
           "split_angle_bits must be 8 or 16, got ", split_angle_bits);
  TQ_CHECK(outlier_bits == 0 || has_outliers(), InvalidArgument,
           "outlier_bits given without outlier channels (set n_outlier_channels or outlier_channels)");
  if (!outlier_channels.empty()) {
    TQ_CHECK(n_outlier_channels == 0 || n_outlier_channels == static_cast<int>(outlier_channels.size()),
             InvalidArgument, "n_outlier_channels (", n_outlier_channels, ") disagrees with the ",
             outlier_channels.size(), " outlier_channels given");
    TQ_CHECK(static_cast<int>(outlier_channels.size()) < dim, InvalidArgument,
             "outlier_channels must leave at least one inlier channel (", outlier_channels.size(),
             " channels for head_dim ", dim, ")");
    std::vector<bool> seen(static_cast<size_t>(dim), false);
    for (int c : outlier_channels) {
      TQ_CHECK(c >= 0 && c < dim, InvalidArgument, "outlier channel ", c, " is outside [0, ", dim - 1, "]");
      TQ_CHECK(!seen[static_cast<size_t>(c)], InvalidArgument, "outlier channel ", c, " is listed twice");
      seen[static_cast<size_t>(c)] = true;
    }
  }
}

bool register_quantizer(const std::string& method, QuantizerFactory factory) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.factories[method] = std::move(factory);
  return true;
}

std::vector<std::string> registered_methods() {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  std::vector<std::string> names;
  for (const auto& [name, _] : r.factories) names.push_back(name);
  return names;
}

std::unique_ptr<Quantizer> make_quantizer(const QuantizerConfig& config) {
  config.validate();
  if (config.has_outliers()) return make_outlier_split_quantizer(config);
  QuantizerFactory factory;
  {
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.factories.find(config.method);
    if (it == r.factories.end()) {
      std::string known;
      for (const auto& [name, _] : r.factories) known += (known.empty() ? "" : ", ") + name;
      throw InvalidArgument("unknown method '" + config.method + "' (known: " + known + ")");
    }
    factory = it->second;
  }
  return factory(config);
}

size_t bytes_per_vector(const QuantizerConfig& config) {
  return make_quantizer(config)->bytes_per_vector();
}

Quantizer::Quantizer(const QuantizerConfig& config) : config_(config) {
  config_.validate();
  if (config_.jl_dim == 0) config_.jl_dim = config_.dim;
  rotation_ = Rotation::create(config_.rotation, config_.dim, config_.seed, config_.stream);
  config_.rotation = rotation_->kind();
}

Quantizer::Quantizer(const QuantizerConfig& config, std::unique_ptr<Rotation> rotation)
    : config_(config), rotation_(std::move(rotation)) {
  config_.validate();
  TQ_CHECK(rotation_ && rotation_->dim() == config_.dim, InvalidArgument,
           "rotation dim does not match head_dim ", config_.dim);
  if (config_.jl_dim == 0) config_.jl_dim = config_.dim;
}

size_t Quantizer::state_bytes() const { return rotation_->parameters().size() * sizeof(float); }

void Quantizer::set_rotation(std::unique_ptr<Rotation> rotation) {
  TQ_CHECK(rotation && rotation->dim() == dim(), InvalidArgument, "rotation must have dim ", dim());
  rotation_ = std::move(rotation);
  config_.rotation = rotation_->kind();
}

void Quantizer::share_rotation(const Quantizer& from) {
  TQ_CHECK(from.dim() == dim(), InvalidArgument, "share_rotation: dim ", from.dim(), " != ", dim());
  rotation_ = from.rotation_;
  config_.rotation = rotation_->kind();
}

float Quantizer::load_norm(const void* norms, size_t i) const {
  if (config_.norm_dtype == NormDtype::kFloat16) {
    return half_to_float(static_cast<const half_bits*>(norms)[i]);
  }
  return static_cast<const float*>(norms)[i];
}

void Quantizer::store_norm(void* norms, size_t i, float value) const {
  if (config_.norm_dtype == NormDtype::kFloat16) {
    static_cast<half_bits*>(norms)[i] = float_to_half(value);
  } else {
    static_cast<float*>(norms)[i] = value;
  }
}

void Quantizer::load_norms(const void* norms, size_t n, float* out) const {
  if (config_.norm_dtype == NormDtype::kFloat16) {
    cpu::active_kernels().half_to_float(static_cast<const uint16_t*>(norms), n, out);
  } else {
    std::memcpy(out, norms, n * sizeof(float));
  }
}

void Quantizer::encode(const float* x, size_t n, uint8_t* codes, void* norms) const {
  const auto d = static_cast<size_t>(dim());
  const auto& k = cpu::active_kernels();
  // Norms first (a non-finite input gives a non-finite norm), so that nothing is written
  // unless the whole input is valid.
  std::vector<float> norm(n);
  parallel_for(n, 4096, [&](size_t b, size_t e) { k.row_norms(x + b * d, e - b, d, norm.data() + b); });
  for (size_t r = 0; r < n; ++r) {
    if (!std::isfinite(norm[r])) {
      for (size_t j = 0; j < d; ++j)
        TQ_CHECK(std::isfinite(x[r * d + j]), InvalidArgument, "input contains NaN or Inf (vector ", r,
                 ", coordinate ", j, ")");
    }
  }
  for (size_t r = 0; r < n; ++r) {
    TQ_CHECK(config_.norm_dtype != NormDtype::kFloat16 || norm[r] <= 65504.0f, InvalidArgument,
             "vector ", r, " has norm ", norm[r],
             ", above the fp16 norm range (65504); use norm_dtype='float32'");
  }
  // Blocks of rows are independent: split them across the thread pool.
  const size_t block = 256;
  const size_t nblocks = (n + block - 1) / block;
  parallel_for(nblocks, 1, [&](size_t b0, size_t b1) {
    std::vector<float> y(block * d), inv(block);
    for (size_t bi = b0; bi < b1; ++bi) {
      const size_t r0 = bi * block;
      const size_t nb = std::min(block, n - r0);
      for (size_t r = 0; r < nb; ++r) inv[r] = norm[r0 + r] > 0.0f ? 1.0f / norm[r0 + r] : 0.0f;
      rotation_->forward_scaled(x + r0 * d, inv.data(), y.data(), nb);
      uint8_t* c = codes + r0 * code_bytes();
      quantize_rotated(y.data(), nb, c);
      if (config_.norm_correction) {
        // Store ‖x‖/‖ỹ‖ so that the decoded vector has exactly the norm of x.
        dequantize_rotated(c, nb, y.data());
        for (size_t r = 0; r < nb; ++r) {
          double s = 0.0;
          for (size_t j = 0; j < d; ++j) s += static_cast<double>(y[r * d + j]) * y[r * d + j];
          if (s > 0.0) norm[r0 + r] = static_cast<float>(norm[r0 + r] / std::sqrt(s));
        }
      }
      for (size_t r = 0; r < nb; ++r) store_norm(norms, r0 + r, norm[r0 + r]);
    }
  });
}

void Quantizer::decode(const uint8_t* codes, const void* norms, size_t n, float* out) const {
  const auto d = static_cast<size_t>(dim());
  dequantize_rotated(codes, n, out);
  rotation_->inverse(out, out, n);
  for (size_t r = 0; r < n; ++r) {
    const float s = load_norm(norms, r);
    for (size_t j = 0; j < d; ++j) out[r * d + j] *= s;
  }
}

void Quantizer::inner_products(const float* q, size_t m, const uint8_t* codes, const void* norms,
                               size_t n, float* out) const {
  const auto d = static_cast<size_t>(dim());
  for (size_t i = 0; i < m * d; ++i) {
    TQ_CHECK(std::isfinite(q[i]), InvalidArgument, "query contains NaN or Inf (query ", i / d,
             ", coordinate ", i % d, ")");
  }
  std::vector<float> state(m * query_state_floats());
  prepare_queries(q, m, state.data());
  const size_t block = 1024;
  std::vector<float> nf(block);
  for (size_t t0 = 0; t0 < n; t0 += block) {
    const size_t nb = std::min(block, n - t0);
    const auto* nbase = static_cast<const uint8_t*>(norms) + t0 * norm_bytes();
    load_norms(nbase, nb, nf.data());
    scores(state.data(), m, codes + t0 * code_bytes(), nf.data(), nb, out + t0, n);
  }
}

void Quantizer::prepare_queries(const float* q, size_t m, float* state) const {
  rotation_->forward(q, state, m);
}

// Generic hooks: dequantize a block into a small rotated-domain tile, then dot / axpy.
void Quantizer::scores(const float* state, size_t m, const uint8_t* codes, const float* norms,
                       size_t n, float* out, size_t out_stride) const {
  const auto d = static_cast<size_t>(dim());
  const size_t sf = query_state_floats();
  const size_t block = 64;
  std::vector<float> y(block * d);
  for (size_t t0 = 0; t0 < n; t0 += block) {
    const size_t nb = std::min(block, n - t0);
    dequantize_rotated(codes + t0 * code_bytes(), nb, y.data());
    for (size_t i = 0; i < m; ++i) {
      const float* qi = state + i * sf;
      for (size_t t = 0; t < nb; ++t) {
        float s = 0.0f;
        for (size_t j = 0; j < d; ++j) s += qi[j] * y[t * d + j];
        out[i * out_stride + t0 + t] = norms[t0 + t] * s;
      }
    }
  }
}

void Quantizer::accumulate(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                           const float* norms, size_t n, float* acc) const {
  const auto d = static_cast<size_t>(dim());
  const size_t block = 64;
  std::vector<float> y(block * d);
  for (size_t t0 = 0; t0 < n; t0 += block) {
    const size_t nb = std::min(block, n - t0);
    dequantize_rotated(codes + t0 * code_bytes(), nb, y.data());
    for (size_t i = 0; i < m; ++i) {
      for (size_t t = 0; t < nb; ++t) {
        const float s = w[i * w_stride + t0 + t] * norms[t0 + t];
        if (s == 0.0f) continue;
        for (size_t j = 0; j < d; ++j) acc[i * d + j] += s * y[t * d + j];
      }
    }
  }
}

void Quantizer::accumulate_rows(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                                const float* norms, size_t n, const uint32_t* idx, size_t n_idx,
                                float* acc) const {
  const size_t cb = code_bytes();
  thread_local std::vector<uint8_t> rows;
  thread_local std::vector<float> rw, rn;
  rows.resize(n_idx * cb);
  rn.resize(n_idx);
  rw.resize(m * n_idx);
  for (size_t k = 0; k < n_idx; ++k) {
    TQ_CHECK(idx[k] < n, InvalidArgument, "row index ", idx[k], " out of range [0, ", n, ")");
    std::memcpy(rows.data() + k * cb, codes + idx[k] * cb, cb);
    rn[k] = norms[idx[k]];
    for (size_t i = 0; i < m; ++i) rw[i * n_idx + k] = w[i * w_stride + idx[k]];
  }
  accumulate(rw.data(), n_idx, m, rows.data(), rn.data(), n_idx, acc);
}

}  // namespace turboquant
