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

  // Outlier split / fractional bits (quantizer_outlier.h): when n_outlier_channels > 0 or
  // outlier_channels is non-empty, make_quantizer() builds an OutlierSplitQuantizer: the
  // outlier channels at outlier_bits (0 means bits + 1), the rest at bits, both by `method`.
  // outlier_channels empty: the first n_outlier_channels channels (select_outlier_channels()
  // picks them from calibration data instead).
  std::vector<int> outlier_channels;
  int n_outlier_channels = 0;
  int outlier_bits = 0;
  // Width of the split's per-vector part angle φ (quantizer_outlier.h): 8 (255 steps over
  // [0, π/2], one byte) or 16 (65535 steps, two bytes: the format of files before v4).
  int split_angle_bits = 8;
  // Set by the outlier split on its two parts only: allows dim in [1, kMaxDim].
  bool split_part = false;

  bool has_outliers() const { return n_outlier_channels > 0 || !outlier_channels.empty(); }

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
  // Bits per coordinate of the quantized payload alone (indices, angles, sign bits), without
  // per-vector scalars (norm, residual norm, split angle) and byte padding: `bits` for
  // turboquant_mse, the exact weighted mean for an outlier split (e.g. 2.25, 2.5).
  virtual double nominal_bits() const { return static_cast<double>(bits()); }

  // --- What a method implements: the rotated domain (DESIGN §1). -----------------------
  // y: n unit vectors already rotated (y = Π x/‖x‖), n×dim -> n code rows.
  virtual void quantize_rotated(const float* y, size_t n, uint8_t* codes) const = 0;
  // The reconstruction ỹ of each code row in the rotated domain (n×dim); the decoded
  // vector is x̃ = ‖x‖·Πᵀ ỹ, and <q, x> is estimated by ‖x‖·<Πq, ỹ>.
  virtual void dequantize_rotated(const uint8_t* codes, size_t n, float* y) const = 0;

  // --- Whole vectors: normalise, rotate, quantize, store the norm. ----------------------
  // Validates the input (finite values, fp16 norm range) before writing anything.
  // x: n×dim fp32 row-major. codes: n×code_bytes(). norms: n × norm_bytes() raw bytes.
  void encode(const float* x, size_t n, uint8_t* codes, void* norms) const;
  // out: n×dim fp32.
  void decode(const uint8_t* codes, const void* norms, size_t n, float* out) const;
  // out[i*n + t] = estimate of <q_i, x_t> for m queries and n encoded vectors.
  void inner_products(const float* q, size_t m, const uint8_t* codes, const void* norms,
                      size_t n, float* out) const;

  // --- Attention hooks (DESIGN §2): work on codes, never on rebuilt vectors. ------------
  // A query's state is Πq (dim floats) unless a method needs more (e.g. S·Πq for QJL);
  // every method keeps Πq as the first dim floats of its state, extra floats after.
  virtual size_t query_state_floats() const { return static_cast<size_t>(dim()); }
  virtual void prepare_queries(const float* q, size_t m, float* state) const;
  // out[i*out_stride + t] = ‖x_t‖·<state_i, ỹ_t>, with norms given as fp32 (one per row).
  virtual void scores(const float* state, size_t m, const uint8_t* codes, const float* norms,
                      size_t n, float* out, size_t out_stride) const;
  // acc[i*dim + j] += Σ_t w[i*w_stride + t]·‖x_t‖·ỹ_t[j]: value sums in the rotated domain.
  virtual void accumulate(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                          const float* norms, size_t n, float* acc) const;
  // accumulate over the listed rows idx[0..n_idx) of the n rows only (sparse V; each
  // idx[k] < n): w, codes and norms are indexed by row exactly as in accumulate. The base
  // gathers the listed rows and calls accumulate; turboquant_mse runs a row-list kernel.
  virtual void accumulate_rows(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                               const float* norms, size_t n, const uint32_t* idx, size_t n_idx,
                               float* acc) const;
  // acc (m×dim, rotated domain) <- Πᵀ acc: once per attention call.
  void finish_rotated(float* acc, size_t m) const { rotation_->inverse(acc, acc, m); }

  // Bytes of the quantizer's own state (rotation parameters; methods with more state, such
  // as a QJL matrix, override and add theirs): what a cache pays per quantizer it owns.
  virtual size_t state_bytes() const;
  // Replaces Π, e.g. by one loaded from an artifact store; must have this dim.
  virtual void set_rotation(std::unique_ptr<Rotation> rotation);
  // Uses from's rotation object instead of its own (same dim; an outlier split: the same
  // channels, part by part), e.g. a cache's fewer-bit quantizer of a stream sharing the
  // stream's rotation, so that it is held once.
  virtual void share_rotation(const Quantizer& from);

  float load_norm(const void* norms, size_t i) const;
  void store_norm(void* norms, size_t i, float value) const;
  void load_norms(const void* norms, size_t n, float* out) const;

 protected:
  // For a method that builds its own rotation (the outlier split's block-diagonal one).
  Quantizer(const QuantizerConfig& config, std::unique_ptr<Rotation> rotation);

  QuantizerConfig config_;
  std::shared_ptr<Rotation> rotation_;  // shared only through share_rotation
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

  void quantize_rotated(const float* y, size_t n, uint8_t* codes) const override;
  void dequantize_rotated(const uint8_t* codes, size_t n, float* y) const override;
  void scores(const float* state, size_t m, const uint8_t* codes, const float* norms, size_t n,
              float* out, size_t out_stride) const override;
  void accumulate(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                  const float* norms, size_t n, float* acc) const override;
  void accumulate_rows(const float* w, size_t w_stride, size_t m, const uint8_t* codes,
                       const float* norms, size_t n, const uint32_t* idx, size_t n_idx,
                       float* acc) const override;

 private:
  const Codebook* codebook_;
};

}  // namespace turboquant
