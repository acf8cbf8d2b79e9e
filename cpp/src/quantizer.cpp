#include "turboquant/quantizer.h"

#include <cmath>
#include <cstring>
#include <map>
#include <mutex>

#include "turboquant/error.h"
#include "turboquant/half.h"

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
  TQ_CHECK(dim >= kMinDim && dim <= kMaxDim, InvalidArgument, "head_dim must be in [", kMinDim, ", ",
           kMaxDim, "], got ", dim);
  TQ_CHECK(bits >= kMinBits && bits <= kMaxBits, InvalidArgument, "bits must be in [", kMinBits, ", ",
           kMaxBits, "], got ", bits);
  TQ_CHECK(jl_dim >= 0 && jl_dim <= 8 * kMaxDim, InvalidArgument, "jl_dim must be in [0, ",
           8 * kMaxDim, "] (0 means head_dim), got ", jl_dim);
  TQ_CHECK(rotation != RotationKind::kHadamard || is_power_of_two(dim), InvalidArgument,
           "hadamard rotation needs a power-of-two head_dim, got ", dim,
           " (use rotation='dense' or 'auto')");
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

void Quantizer::encode(const float* x, size_t n, uint8_t* codes, void* norms) const {
  const auto d = static_cast<size_t>(dim());
  for (size_t i = 0; i < n * d; ++i) {
    if (!std::isfinite(x[i])) {
      throw InvalidArgument(detail::concat("input contains NaN or Inf (vector ", i / d,
                                           ", coordinate ", i % d, ")"));
    }
  }
  if (config_.norm_dtype == NormDtype::kFloat16) {
    for (size_t r = 0; r < n; ++r) {
      double s = 0.0;
      for (size_t j = 0; j < d; ++j) s += static_cast<double>(x[r * d + j]) * x[r * d + j];
      TQ_CHECK(std::sqrt(s) <= 65504.0, InvalidArgument, "vector ", r, " has norm ", std::sqrt(s),
               ", above the fp16 norm range (65504); use norm_dtype='float32'");
    }
  }
  encode_impl(x, n, codes, norms);
}

void Quantizer::decode(const uint8_t* codes, const void* norms, size_t n, float* out) const {
  decode_impl(codes, norms, n, out);
}

void Quantizer::inner_products(const float* q, size_t m, const uint8_t* codes, const void* norms,
                               size_t n, float* out) const {
  const auto d = static_cast<size_t>(dim());
  for (size_t i = 0; i < m * d; ++i) {
    TQ_CHECK(std::isfinite(q[i]), InvalidArgument, "query contains NaN or Inf (query ", i / d,
             ", coordinate ", i % d, ")");
  }
  inner_products_impl(q, m, codes, norms, n, out);
}

// Generic fallback: decode then take dot products, in blocks.
void Quantizer::inner_products_impl(const float* q, size_t m, const uint8_t* codes,
                                    const void* norms, size_t n, float* out) const {
  const auto d = static_cast<size_t>(dim());
  const size_t block = 256;
  std::vector<float> x(block * d);
  for (size_t t0 = 0; t0 < n; t0 += block) {
    const size_t nb = std::min(block, n - t0);
    // Norms are addressed by byte offset so the fallback works for both norm dtypes.
    const auto* nbase = static_cast<const uint8_t*>(norms) + t0 * norm_bytes();
    decode_impl(codes + t0 * code_bytes(), nbase, nb, x.data());
    for (size_t i = 0; i < m; ++i) {
      for (size_t t = 0; t < nb; ++t) {
        float s = 0.0f;
        for (size_t j = 0; j < d; ++j) s += q[i * d + j] * x[t * d + j];
        out[i * n + t0 + t] = s;
      }
    }
  }
}

}  // namespace turboquant
