// The quantizer interface shared by every method (DESIGN §1 "Methods"), and the registry
// that builds one by name. A quantizer turns n vectors of dimension d into
//   codes: n rows of code_bytes() bytes (the method's packed payload), and
//   norms: n scalars ‖x‖ (fp16 by default, or fp32),
// kept as two arrays so that a cache can store them separately. Each method lives in its
// own file (cpp/src/quantizer_<method>.cpp) and registers itself here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "turboquant/codebook.h"
#include "turboquant/rotation.h"

namespace turboquant {

enum class NormDtype { kFloat16, kFloat32 };
inline size_t norm_bytes(NormDtype t) { return t == NormDtype::kFloat16 ? 2 : 4; }

struct QuantizerConfig {
  std::string method = "turboquant_mse";
  int dim = 128;
  int bits = 3;
  uint64_t seed = 0;
  uint64_t stream = 0;  // layer/head sub-stream, see rng.h make_stream_id()
  RotationKind rotation = RotationKind::kAuto;
  NormDtype norm_dtype = NormDtype::kFloat16;
  bool norm_correction = false;
  int jl_dim = 0;  // QJL sketch size m for turboquant_prod / qjl; 0 means m = dim
  CoordinateLaw law = CoordinateLaw::kBeta;

  // Throws InvalidArgument naming the first bad field.
  void validate() const;
};

class Quantizer {
 public:
  explicit Quantizer(const QuantizerConfig& config);
  virtual ~Quantizer() = default;

  const QuantizerConfig& config() const { return config_; }
  const std::string& method() const { return config_.method; }
  int dim() const { return config_.dim; }
  int bits() const { return config_.bits; }
  NormDtype norm_dtype() const { return config_.norm_dtype; }
  const Rotation& rotation() const { return *rotation_; }

  virtual size_t code_bytes() const = 0;  // packed payload per vector
  size_t norm_bytes() const { return turboquant::norm_bytes(config_.norm_dtype); }
  size_t bytes_per_vector() const { return code_bytes() + norm_bytes(); }
  // Stored bits per coordinate, norm included: 8 * bytes_per_vector() / dim.
  double effective_bits() const { return 8.0 * static_cast<double>(bytes_per_vector()) / dim(); }

  // Validates the input (finite values) before writing anything, then encodes.
  // x: n×dim fp32 row-major. codes: n×code_bytes(). norms: n × norm_bytes() raw bytes.
  void encode(const float* x, size_t n, uint8_t* codes, void* norms) const;
  // out: n×dim fp32.
  void decode(const uint8_t* codes, const void* norms, size_t n, float* out) const;
  // out[i*n + t] = estimate of <q_i, x_t> for m queries and n encoded vectors.
  void inner_products(const float* q, size_t m, const uint8_t* codes, const void* norms,
                      size_t n, float* out) const;

  float load_norm(const void* norms, size_t i) const;
  void store_norm(void* norms, size_t i, float value) const;

 protected:
  virtual void encode_impl(const float* x, size_t n, uint8_t* codes, void* norms) const = 0;
  virtual void decode_impl(const uint8_t* codes, const void* norms, size_t n,
                           float* out) const = 0;
  virtual void inner_products_impl(const float* q, size_t m, const uint8_t* codes,
                                   const void* norms, size_t n, float* out) const;

  QuantizerConfig config_;
  std::unique_ptr<Rotation> rotation_;
};

using QuantizerFactory = std::function<std::unique_ptr<Quantizer>(const QuantizerConfig&)>;

// Registers a method; returns true so it can initialise a namespace-scope constant.
bool register_quantizer(const std::string& method, QuantizerFactory factory);
std::vector<std::string> registered_methods();
// Builds a quantizer; throws InvalidArgument for an unknown method or bad config.
std::unique_ptr<Quantizer> make_quantizer(const QuantizerConfig& config);

// Exact bytes per vector (codes + norm) of a method at (dim, bits).
size_t bytes_per_vector(const QuantizerConfig& config);

// --- turboquant_mse (DESIGN §1): rotate, nearest Lloyd-Max centroid per coordinate, pack.
class MseQuantizer : public Quantizer {
 public:
  explicit MseQuantizer(const QuantizerConfig& config);
  size_t code_bytes() const override;
  const Codebook& codebook() const { return *codebook_; }

  // Rotated-domain helpers shared with the other methods and the attention kernels:
  // y (n×dim, already rotated, unit norm) -> packed indices; and back to centroids.
  void quantize_rotated(const float* y, size_t n, uint8_t* codes) const;
  void dequantize_rotated(const uint8_t* codes, size_t n, float* y) const;

 protected:
  void encode_impl(const float* x, size_t n, uint8_t* codes, void* norms) const override;
  void decode_impl(const uint8_t* codes, const void* norms, size_t n, float* out) const override;
  void inner_products_impl(const float* q, size_t m, const uint8_t* codes, const void* norms,
                           size_t n, float* out) const override;

 private:
  const Codebook* codebook_;
};

}  // namespace turboquant
