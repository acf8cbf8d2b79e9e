// Launchers that run the Metal kernel bodies of metal/*.metal on the emulated GPU of
// metal/metal_compat.h (see metal_emulation.cpp). Plain C++ types only, so that tests
// never see the compatibility macros.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace turboquant::metal_emu {

// tq_encode: rows × dim floats -> rows × code_bytes codes, rows norms (fp16 bits or fp32).
// signs: D₁ then D₂ (Rotation::parameters()); boundaries: 2^bits - 1 floats. With
// norm_correction the stored norm is ‖x‖/‖ỹ‖ (centroids: 2^bits floats, else unused).
void encode(const float* x, size_t rows, int dim, int bits, const float* signs,
            const float* boundaries, bool norm_fp16, uint8_t* codes, void* norms,
            unsigned threads, const float* centroids = nullptr, bool norm_correction = false);

// tq_rotate: y = Π x, rows × dim.
void rotate(const float* x, size_t rows, int dim, const float* signs, float* y,
            unsigned threads);

// tq_dequantize: out rows × dim, fp32 or fp16 bits.
void dequantize(const uint8_t* codes, const void* norms, size_t rows, int dim, int bits,
                const float* centroids, const float* signs, bool norm_fp16, bool inverse_rotate,
                bool out_fp16, void* out, unsigned threads);

struct AttentionProblem {
  int dim = 128;
  int tokens = 0;
  int head_stride = 0;  // tokens per KV head in the buffers (>= tokens)
  int kv_heads = 1;
  int group = 1;  // query heads per KV head
  int block_tokens = 64;
  int k_bits = 3, v_bits = 3;
  bool norm_fp16 = true;
  float scale = 1.0f;
  const float* q_rotated = nullptr;  // kv_heads × group × dim, Π_K q
  const uint8_t* k_codes = nullptr;  // kv_heads × head_stride rows
  const void* k_norms = nullptr;
  const uint8_t* v_codes = nullptr;
  const void* v_norms = nullptr;
  const float* k_centroids = nullptr;
  const float* v_centroids = nullptr;
  const float* v_signs = nullptr;  // hadamard value rotation; null: output stays rotated
};

// tq_attention_block + tq_attention_reduce: out is (kv_heads·group) × dim.
void decode_attention(const AttentionProblem& p, float* out, unsigned block_threads,
                      unsigned reduce_threads);

// Direct access to the emulator for tests of the compatibility layer itself.
void run_grid(unsigned groups_x, unsigned threads,
              const std::function<void(unsigned group, unsigned tid)>& body);
float emu_simd_sum(float v);
float emu_simd_max(float v);
float emu_simd_shuffle_xor(float v, unsigned mask);
float emu_simd_broadcast(float v, unsigned lane);
float emu_simd_prefix_exclusive_sum(float v);
void emu_threadgroup_barrier();

}  // namespace turboquant::metal_emu
