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
  int num_blocks = 0;  // threadgroups per KV head (blocks of several tiles); 0: one per tile
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

// The key split (split.metal): keys split into channels [0, dim/2) (bits0) and the rest
// (bits1), each half with its own hadamard rotation. signs: D₁ of both halves then D₂ of
// both (2·dim floats); centroids / boundaries: the outlier half's table then the inlier
// half's; angles: (cos, sin) per angle code (2^angle_bits pairs); angle_bounds: cos² of the
// rounding boundaries as (hi, lo) pairs (2^angle_bits - 1 of them).
struct SplitTables {
  int dim = 128;
  int bits0 = 4, bits1 = 2;
  int angle_bits = 8;
  const float* signs = nullptr;
  const float* centroids = nullptr;
  const float* boundaries = nullptr;
  const float* angles = nullptr;
  const float* angle_bounds = nullptr;
  size_t code_bytes() const;
};

// tq_split_encode: rows × dim floats -> rows × code_bytes() codes, rows norms.
void split_encode(const SplitTables& t, const float* x, size_t rows, bool norm_fp16,
                  bool norm_correction, uint8_t* codes, void* norms, unsigned threads);

// tq_split_dequantize: decoded rows (inverse_rotate) or the rotated-domain tile, fp32.
void split_dequantize(const SplitTables& t, const uint8_t* codes, const void* norms, size_t rows,
                      bool norm_fp16, bool inverse_rotate, float* out, unsigned threads);

// tq_split_rotate: y = diag(Π_O, Π_I) x.
void split_rotate(const SplitTables& t, const float* x, size_t rows, float* y, unsigned threads);

// tq_split_attention_block + tq_attention_reduce. p.k_bits / p.k_centroids are ignored (the
// split tables hold the key halves'), p.q_rotated is diag(Π_O, Π_I) q, p.k_codes split rows.
void split_decode_attention(const SplitTables& t, const AttentionProblem& p, float* out,
                            unsigned block_threads, unsigned reduce_threads);

// tq_split_angle (one thread's function, no grid): the angle code of the part sums of
// squares s0 = h0 + l0, s1 = h1 + l1 against the boundary table of 2^angle_bits - 1 pairs.
unsigned split_angle_code(float h0, float l0, float h1, float l1, const float* angle_bounds,
                          int angle_bits);

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
