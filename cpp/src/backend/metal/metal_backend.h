// The Metal backend (DESIGN §3 "Backend"): the kernels of metal/*.metal driven through
// metal-cpp on Apple silicon. Built only when CMake's TURBOQUANT_METAL is ON (Apple); the
// kernel logic is verified everywhere by the emulation tests (tests/cpp/
// test_metal_emulation.cpp), the host code below only on a Mac.
//
// Memory: Apple GPUs share memory with the CPU. allocate_shared() returns a CPU pointer
// into an MTLBuffer (storage mode shared); every operation binds such memory directly
// (no copy). Other memory (NumPy arrays, std::vector) is staged through a temporary
// shared buffer, which copies: long-lived data such as the KV cache must be allocated
// with allocate_shared().
//
// Numerics: codes, norms, decoded vectors and rotated queries are bit-identical to the
// CPU reference; decode attention agrees within fp32 rounding (other summation order).
// What the kernels do not cover runs on the CPU reference instead (methods other than
// turboquant_mse, dense rotations for encode/decode).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace turboquant {
class Quantizer;
}

namespace turboquant::metal {

// The kernel sources (common.metal, encode, dequantize, attention), embedded at build
// time by cmake/embed_metal.cmake.
std::string_view kernel_source();

// True when this build has the Metal backend and a Metal device exists.
bool available();

struct DecodeAttentionArgs {
  const Quantizer* keys = nullptr;    // turboquant_mse quantizers of the keys and values
  const Quantizer* values = nullptr;  // (same norm dtype)
  const float* queries = nullptr;     // kv_heads × group × dim, original domain
  size_t kv_heads = 1;
  size_t group = 1;  // query heads per KV head (GQA), at most 16
  size_t tokens = 0;
  size_t head_stride = 0;            // rows between KV heads in the code/norm buffers
  const uint8_t* k_codes = nullptr;  // kv_heads × head_stride rows of code_bytes
  const void* k_norms = nullptr;
  const uint8_t* v_codes = nullptr;
  const void* v_norms = nullptr;
  float scale = 1.0f;  // softmax scale
};

class MetalBackend {
 public:
  // The process-wide backend; throws NotSupported when no Metal device exists.
  static MetalBackend& instance();
  ~MetalBackend();
  MetalBackend(const MetalBackend&) = delete;
  MetalBackend& operator=(const MetalBackend&) = delete;

  std::string device_name() const;

  // Unified memory: a CPU pointer the GPU reads and writes in place. Zero-filled.
  void* allocate_shared(size_t bytes);
  void free_shared(void* ptr);

  // Quantizer::encode on the GPU (same validation, same bytes out).
  void encode(const Quantizer& q, const float* x, size_t n, uint8_t* codes, void* norms);
  // Quantizer::decode (inverse_rotate) or the rotated-domain tile ‖x‖·c[idx], fp32 or fp16.
  void dequantize(const Quantizer& q, const uint8_t* codes, const void* norms, size_t n,
                  bool inverse_rotate, bool out_fp16, void* out);
  // out: (kv_heads·group) × dim attention outputs in the original domain.
  void decode_attention(const DecodeAttentionArgs& args, float* out);

 private:
  MetalBackend();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace turboquant::metal
