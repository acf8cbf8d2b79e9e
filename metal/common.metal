// Shared helpers of the turboquant Metal kernels: the packed-code accessor (packing.h,
// layout v1), fp16 conversion bit-identical to half.h, the threadgroup fast Walsh-Hadamard
// transform of rotation.cpp, and an exact-enough sum of squares for the norm.
//
// Every kernel body is an inline function taking its thread ids as arguments; the
// [[kernel]] entry points (Metal only) just forward to them. The same bodies compile as
// C++ through metal_compat.h (tests/cpp/test_metal_emulation.cpp) and are the mlx
// kernels' bodies (python/turboquant/metal.py), for Metal and, through cuda_compat.h, for
// CUDA. Host code must compile with math mode "safe" (no fast-math): the norm's compensated
// sums rely on IEEE rounding.
#ifndef TQ_METAL_COMMON
#define TQ_METAL_COMMON

#if defined(__METAL_VERSION__)
#include <metal_stdlib>
#elif defined(__CUDACC__)
// CUDA (mx.fast.cuda_kernel): cuda_compat.h is prepended to the header by the host.
#ifndef TQ_CUDA_COMPAT
#error "the CUDA build of the kernels needs cuda_compat.h first"
#endif
#else
#include "metal_compat.h"
#endif
using namespace metal;

// A product rounded on its own, never fused with a following add into one fma: the
// compensated sums below need it. Metal (math mode "safe") and the C++ emulation round each
// product; cuda_compat.h maps it to __fmul_rn (CUDA contracts a*b + c by default).
#ifndef TQ_MUL_RN
#define TQ_MUL_RN(a, b) ((a) * (b))
#endif

// Address spaces of the parameter block and of the small tables (rotation signs,
// centroids, boundaries): constant buffers for the native kernels; the mlx kernels
// (python/turboquant/metal.py) receive them as device arrays and define both as
// "const device".
#ifndef TQ_PARAMS
#define TQ_PARAMS constant
#endif
#ifndef TQ_TABLE
#define TQ_TABLE constant
#endif

// An array in threadgroup memory declared inside a kernel's body (the mlx kernels'
// sources declare their scratch this way). In the C++ emulation it must be one object
// shared by the threads of the group, which run as fibers of one OS thread: a static.
// (cuda_compat.h defines it as a __shared__ array.)
#if defined(TQ_THREADGROUP_ARRAY)
#elif defined(__METAL_VERSION__)
#define TQ_THREADGROUP_ARRAY(type, name, count) threadgroup type name[count]
#else
#define TQ_THREADGROUP_ARRAY(type, name, count) static thread_local type name[count]
#endif

// The one assumption shared by Metal and CUDA: SIMD groups (warps) of 32 lanes.
#define TQ_SIMD_WIDTH 32u
// Query heads of one KV head handled in one pass of the decode-attention kernel.
#define TQ_MAX_GROUP 16u
// Rounds of the randomized Hadamard rotation (rotation.h): 2, Π = H·D₂·H·D₁ ("hadamard"),
// or 1, Π = H·D₁ ("hadamard1"). A compile-time constant: the mlx kernels' header defines it
// per code store (python/turboquant/metal.py, kernel_header), so each rotation has its own
// compiled kernels; the sign tables keep 2·d entries per head either way (D₂ unused at 1).
#ifndef TQ_ROTATION_ROUNDS
#define TQ_ROTATION_ROUNDS 2u
#endif

// --- Parameters (one struct per kernel, bound as a constant buffer) ----------------------
struct TqEncodeParams {
  uint rows;        // vectors to encode (one threadgroup each)
  uint dim;         // head_dim, a power of two in [16, 512]
  uint bits;        // 1..8
  uint code_bytes;  // packed_bytes(dim, bits)
  uint norm_fp16;   // 1: norms are fp16 bits, 0: fp32
  uint norm_correction;  // 1: store ‖x‖/‖ỹ‖, ỹ the dequantized unit vector (needs centroids)
};

struct TqRotateParams {
  uint rows;
  uint dim;
};

struct TqPermuteParams {
  uint rows;           // rows of dim elements (heads x tokens)
  uint dim;            // elements per row
  uint width;          // 16-bit words per element: 1 (fp16, bf16) or 2 (fp32)
  uint rows_per_head;  // consecutive rows sharing one channel order
};

struct TqCentreParams {
  uint rows;           // rows of dim elements per role (heads x tokens)
  uint dim;            // elements per row
  uint rows_per_head;  // consecutive rows sharing one head's means and channel order
  uint bf16;           // the rows' 16-bit words: 0 fp16, 1 bfloat16
  uint permute;        // 1: the keys' channels in the order `order` (0: not read)
};

struct TqDequantParams {
  uint rows;
  uint dim;
  uint bits;
  uint code_bytes;
  uint norm_fp16;
  uint inverse_rotate;  // 1: decode to the original domain (Πᵀ), 0: rotated-domain tile
  uint out_fp16;        // 1: tile written as fp16 bits, 0: fp32
};

struct TqAttnParams {
  uint dim;
  uint tokens;        // cached tokens attended (T)
  uint head_stride;   // tokens between consecutive KV heads in the code/norm buffers (>= T)
  uint block_tokens;  // tokens per threadgroup (BT)
  uint num_blocks;    // ceil(T / BT)
  uint group;         // query heads per KV head (GQA ratio), <= TQ_MAX_GROUP
  uint k_bits;
  uint v_bits;
  uint k_code_bytes;
  uint v_code_bytes;
  uint norm_fp16;
  float scale;  // softmax scale applied to <q, k>
};

struct TqReduceParams {
  uint dim;
  uint num_blocks;
  uint group;
  uint inverse_rotate;  // 1: apply Π_Vᵀ (hadamard) to the output
};

// --- Packed codes (packing.h, layout v1) --------------------------------------------------
// Index j of a row: stream bits [j*bits, (j+1)*bits), LSB first, bit k in byte k/8.
inline uint tq_read_index(device const uchar* row, uint j, uint bits) {
  const uint bit = j * bits;
  const uint byte = bit >> 3u;
  const uint shift = bit & 7u;
  uint v = uint(row[byte]) >> shift;
  if (shift + bits > 8u) v |= uint(row[byte + 1u]) << (8u - shift);
  return v & ((1u << bits) - 1u);
}

// Byte k of the packed stream of `count` indices (each < 2^bits) held in `idx`.
inline uchar tq_pack_byte(threadgroup const uchar* idx, uint k, uint count, uint bits) {
  const uint first = (8u * k) / bits;
  uint out = 0u;
  for (uint j = first; j < count && j * bits < 8u * k + 8u; ++j) {
    const uint pos = j * bits;  // stream bit of index j's LSB
    const uint v = uint(idx[j]);
    out |= pos >= 8u * k ? (v << (pos - 8u * k)) : (v >> (8u * k - pos));
  }
  return uchar(out & 0xFFu);
}

// Nearest centroid: the number of boundaries <= y, by the same binary search as the CPU.
inline uint tq_quantize(float y, TQ_TABLE float* boundaries, uint bits) {
  int lo = 0, hi = int(1u << bits) - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (y < boundaries[mid]) hi = mid; else lo = mid + 1;
  }
  return uint(lo);
}

// --- fp16 bits, round to nearest even (half.h) --------------------------------------------
inline ushort tq_float_to_half_bits(float f) {
  const uint x = as_type<uint>(f);
  const uint sign = (x >> 16u) & 0x8000u;
  const uint absx = x & 0x7FFFFFFFu;
  if (absx >= 0x7F800000u) return ushort(sign | 0x7C00u | (absx > 0x7F800000u ? 0x200u : 0u));
  if (absx >= 0x477FF000u) return ushort(sign | 0x7C00u);
  if (absx < 0x38800000u) {
    if (absx < 0x33000000u) return ushort(sign);
    const uint mant = (absx & 0x7FFFFFu) | 0x800000u;
    const uint shift = 126u - (absx >> 23u);
    const uint halfway = 1u << (shift - 1u);
    uint r = mant >> shift;
    const uint rem = mant & ((1u << shift) - 1u);
    if (rem > halfway || (rem == halfway && (r & 1u) != 0u)) ++r;
    return ushort(sign | r);
  }
  uint r = (absx >> 13u) - ((127u - 15u) << 10u);
  const uint rem = absx & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u) != 0u)) ++r;
  return ushort(sign | r);
}

// fp16 bits to float: exact. The CUDA dialect header gives the hardware conversion
// (TQ_NATIVE_HALF_TO_FLOAT; identical results for every finite and infinite input): the
// arithmetic below, with its loop for subnormals, sat in the path of every fp16 norm and row
// load of the decode kernels.
inline float tq_half_bits_to_float(ushort h) {
#if defined(TQ_NATIVE_HALF_TO_FLOAT)
  return tq_native_half_to_float(h);
#else
  const uint sign = uint(h & 0x8000u) << 16u;
  uint e = (uint(h) >> 10u) & 0x1Fu;
  uint mant = uint(h) & 0x3FFu;
  uint bits;
  if (e == 0u) {
    if (mant == 0u) {
      bits = sign;
    } else {
      e = 127u - 15u + 1u;
      while ((mant & 0x400u) == 0u) {
        mant <<= 1u;
        --e;
      }
      mant &= 0x3FFu;
      bits = sign | (e << 23u) | (mant << 13u);
    }
  } else if (e == 0x1Fu) {
    bits = sign | 0x7F800000u | (mant << 13u);
  } else {
    bits = sign | ((e + 127u - 15u) << 23u) | (mant << 13u);
  }
  return as_type<float>(bits);
#endif
}

// A 16-bit word of fp16 (bf16 = 0) or bfloat16 (bf16 = 1) as float: exact.
inline float tq_word_to_float(ushort w, uint bf16) {
  return bf16 != 0u ? as_type<float>(uint(w) << 16u) : tq_half_bits_to_float(w);
}

// f as a 16-bit word of fp16 (bf16 = 0) or bfloat16 (bf16 = 1), rounded to nearest even as
// mlx's astype rounds (a NaN stays a quiet NaN).
inline ushort tq_float_to_word(float f, uint bf16) {
  if (bf16 == 0u) return tq_float_to_half_bits(f);
  const uint x = as_type<uint>(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return ushort((x >> 16u) | 0x40u);
  return ushort((x + 0x7FFFu + ((x >> 16u) & 1u)) >> 16u);
}

// Norm i of a norm buffer holding fp16 bits or fp32 values.
inline float tq_load_norm(device const uchar* norms, ulong i, uint fp16) {
  return fp16 != 0u ? tq_half_bits_to_float(((device const ushort*)norms)[i])
                    : ((device const float*)norms)[i];
}

inline void tq_store_norm(device uchar* norms, uint i, float value, uint fp16) {
  if (fp16 != 0u) {
    ((device ushort*)norms)[i] = tq_float_to_half_bits(value);
  } else {
    ((device float*)norms)[i] = value;
  }
}

#ifndef TQ_UNROLL
#if defined(__CUDACC__) || defined(__METAL_VERSION__)
#define TQ_UNROLL _Pragma("unroll")
#else
#define TQ_UNROLL
#endif
#endif

// --- Fast Walsh-Hadamard transform in threadgroup memory -----------------------------------
// v holds d = 2^k floats; thread tid of nthreads (a power of two dividing d) owns the
// elements j = tid + e*nthreads. Unnormalised, stages h = 1, 2, 4, ... in the order of
// rotation.cpp fwht(), so the result is bit-identical to the CPU's: stages h < 32 run in
// registers across the simd-group (partner j ^ h is lane ^ h), the rest in threadgroup
// memory. Called by every thread of the group (it contains barriers).
inline void tq_fwht(threadgroup float* v, uint d, uint tid, uint nthreads) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint lane = tid % TQ_SIMD_WIDTH;
  const uint hreg = min(min(TQ_SIMD_WIDTH, nthreads), d);
  for (uint j = tid; j < d; j += nthreads) {
    float x = v[j];
    for (uint h = 1u; h < hreg; h <<= 1u) {
      const float other = simd_shuffle_xor(x, ushort(h));
      x = (lane & h) != 0u ? other - x : x + other;
    }
    v[j] = x;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint h = hreg; h < d; h <<= 1u) {
    for (uint b = tid; b < d / 2u; b += nthreads) {
      const uint i = ((b & ~(h - 1u)) << 1u) | (b & (h - 1u));
      const float a = v[i], c = v[i + h];
      v[i] = a + c;
      v[i + h] = a - c;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// 1/√d for d = 2^k, as the CPU's hadamard1 computes it (1.0f / std::sqrt(float(d))) without
// a square root: 2^-(k/2), times float(1/√2) when k is odd (both roundings of the CPU's
// quotient are exact scalings of that constant by powers of two).
inline float tq_inv_sqrt_pow2(uint d) {
  float s = 1.0f;
  for (; d >= 4u; d >>= 2u) s *= 0.5f;
  return d == 2u ? s * 0.70710677f : s;
}

// The scale after the transforms of a rotation over n = 2^k coordinates: 1/n for two rounds
// (the two orthonormal 1/√n folded into one), 1/√n for one.
inline float tq_rotation_scale(uint n) {
  return TQ_ROTATION_ROUNDS == 2u ? 1.0f / float(n) : tq_inv_sqrt_pow2(n);
}

// y = Π v for Π = H·D₂·H·D₁ with orthonormal H (rotation.h, "hadamard"), or Π = H·D₁ when
// TQ_ROTATION_ROUNDS is 1 ("hadamard1"); signs = D₁ then D₂ (Rotation::parameters()). In
// place in v; same operation order as the CPU.
inline void tq_hadamard_forward(threadgroup float* v, TQ_TABLE float* signs, uint d,
                                uint tid, uint nthreads) {
  for (uint j = tid; j < d; j += nthreads) v[j] = v[j] * signs[j];
  tq_fwht(v, d, tid, nthreads);
  if (TQ_ROTATION_ROUNDS == 2u) {
    for (uint j = tid; j < d; j += nthreads) v[j] *= signs[d + j];
    tq_fwht(v, d, tid, nthreads);
  }
  const float scale = tq_rotation_scale(d);
  for (uint j = tid; j < d; j += nthreads) v[j] *= scale;
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// x = Πᵀ y, in place in v.
inline void tq_hadamard_inverse(threadgroup float* v, TQ_TABLE float* signs, uint d,
                                uint tid, uint nthreads) {
  tq_fwht(v, d, tid, nthreads);
  if (TQ_ROTATION_ROUNDS == 2u) {
    for (uint j = tid; j < d; j += nthreads) v[j] *= signs[d + j];
    tq_fwht(v, d, tid, nthreads);
  }
  const float scale = tq_rotation_scale(d);
  for (uint j = tid; j < d; j += nthreads) v[j] *= signs[j] * scale;
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// --- The same transforms on one row in registers: a simd-group per row ------------------
// Lane `lane` of a simd-group holds elements j = lane + 32·e of a row, e < E (d = 32·E), so
// a row needs no threadgroup memory and no barrier, and a threadgroup holds several rows.
// Unnormalised FWHT over blocks of `block` = 2^k >= 32 consecutive elements (block = d: the
// whole row), stages h = 1, 2, 4, ... in the order of rotation.cpp fwht(), so the values are
// bit-identical to tq_fwht's and tq_fwht_blocks': stages h < 32 across the lanes (partner
// lane ^ h), the rest within a lane (element e with e + h/32). Simd-group-uniform.
template <uint E>
inline void tq_fwht_lanes(thread float* x, uint block, uint lane) {
  TQ_UNROLL for (uint e = 0u; e < E; ++e) {
    TQ_UNROLL for (uint h = 1u; h < TQ_SIMD_WIDTH; h <<= 1u) {
      const float other = simd_shuffle_xor(x[e], ushort(h));
      x[e] = (lane & h) != 0u ? other - x[e] : x[e] + other;
    }
  }
  const uint per_block = block / TQ_SIMD_WIDTH;  // a block's elements in one lane
  TQ_UNROLL for (uint h = 1u; h < E; h <<= 1u) {
    if (h < per_block) {
      TQ_UNROLL for (uint e = 0u; e < E; ++e) {
        if ((e & h) == 0u) {
          const float a = x[e], c = x[e + h];
          x[e] = a + c;
          x[e + h] = a - c;
        }
      }
    }
  }
}

// x = Πᵀ y of a row in registers over blocks of `block` coordinates: tq_hadamard_inverse's
// operations in its order (block = d), or tq_hadamard_inverse_blocks' (split.metal).
template <uint E>
inline void tq_hadamard_inverse_lanes(thread float* x, TQ_TABLE float* signs, uint d, uint block,
                                      uint lane) {
  tq_fwht_lanes<E>(x, block, lane);
  if (TQ_ROTATION_ROUNDS == 2u) {
    TQ_UNROLL for (uint e = 0u; e < E; ++e) x[e] *= signs[d + lane + TQ_SIMD_WIDTH * e];
    tq_fwht_lanes<E>(x, block, lane);
  }
  const float scale = tq_rotation_scale(block);
  TQ_UNROLL for (uint e = 0u; e < E; ++e) x[e] *= signs[lane + TQ_SIMD_WIDTH * e] * scale;
}

// tq_hadamard_inverse of the vector v (d = 32·E floats in threadgroup memory) by one
// simd-group in registers: bit-identical, without the threadgroup's barriers between stages.
template <uint E>
inline void tq_hadamard_inverse_row(threadgroup float* v, TQ_TABLE float* signs, uint lane) {
  float x[E];
  TQ_UNROLL for (uint e = 0u; e < E; ++e) x[e] = v[lane + TQ_SIMD_WIDTH * e];
  tq_hadamard_inverse_lanes<E>(x, signs, TQ_SIMD_WIDTH * E, TQ_SIMD_WIDTH * E, lane);
  TQ_UNROLL for (uint e = 0u; e < E; ++e) v[lane + TQ_SIMD_WIDTH * e] = x[e];
}

// tq_hadamard_inverse (same values, same barrier contract) by the first simd-group alone for
// d = 64, 128 or 256, the other threads waiting at the barriers; other d: tq_hadamard_inverse.
inline void tq_hadamard_inverse_simd(threadgroup float* v, TQ_TABLE float* signs, uint d,
                                     uint tid, uint nthreads) {
  if (nthreads < TQ_SIMD_WIDTH || (d != 64u && d != 128u && d != 256u)) {
    tq_hadamard_inverse(v, signs, d, tid, nthreads);
    return;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid < TQ_SIMD_WIDTH) {
    if (d == 64u) {
      tq_hadamard_inverse_row<2u>(v, signs, tid);
    } else if (d == 128u) {
      tq_hadamard_inverse_row<4u>(v, signs, tid);
    } else {
      tq_hadamard_inverse_row<8u>(v, signs, tid);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// Stores ‖x‖·x of a row in registers (lane's elements j = lane + 32·e) as fp32 or fp16 bits.
template <uint E>
inline void tq_store_row_lanes(device uchar* out, thread const float* x, float n, ulong first,
                               uint lane, uint fp16) {
  TQ_UNROLL for (uint e = 0u; e < E; ++e) {
    const float value = x[e] * n;
    const ulong j = first + lane + TQ_SIMD_WIDTH * e;
    if (fp16 != 0u) {
      ((device ushort*)out)[j] = tq_float_to_half_bits(value);
    } else {
      ((device float*)out)[j] = value;
    }
  }
}

// A prefill tile with its fp16 rows: per head h, `nb` rows of `before` (the fp16 sinks), the
// head's n = rows_per_head code rows dequantized, then `na` rows of `after` (the fp16 window),
// one tile row per simd-group: row r of head r / (nb + n + na). A row of `before` or
// `after` (fp16 bits, (heads, nb or na, dim)) is copied as it is; returns false and sets
// code_row for a code row.
inline bool tq_tile_fp16_row(device const ushort* before, device const ushort* after,
                             device uchar* out, uint d, uint n, uint nb, uint na, uint r,
                             uint lane, thread uint& code_row) {
  const uint per = nb + n + na, h = r / per, t = r % per;
  device const ushort* src;
  if (t < nb) {
    src = before + (ulong(h) * nb + t) * d;
  } else if (t >= nb + n) {
    src = after + (ulong(h) * na + (t - nb - n)) * d;
  } else {
    code_row = h * n + (t - nb);
    return false;
  }
  for (uint j = lane; j < d; j += TQ_SIMD_WIDTH) ((device ushort*)out)[ulong(r) * d + j] = src[j];
  return true;
}

// --- Compensated ("double-float") sums --------------------------------------------------
// The CPU sums squares in double; the GPU has no double, so the sum is carried as an
// unevaluated pair hi + lo (Knuth two-sum, exact products by fma) and the square root is
// corrected once: the norm then rounds like the CPU's except within ~2^-40 of a tie.
inline void tq_two_sum(thread float& hi, thread float& lo, float b_hi, float b_lo) {
  const float s = hi + b_hi;
  const float bb = s - hi;
  const float err = (hi - (s - bb)) + (b_hi - bb);
  const float l = lo + b_lo + err;
  hi = s + l;
  lo = l - (hi - s);
}

inline float tq_norm_from_sum(float hi, float lo) {
  if (hi == 0.0f || !isfinite(hi)) return hi;  // zero vector; NaN/Inf inputs stay visible
  float r = sqrt(hi);
  const float resid = fma(-r, r, hi) + lo;
  r = r + resid / (2.0f * r);
  return r;
}

// n / sqrt(hi + lo) rounded once to float, like the CPU's float(n / sqrt(double s)): the
// square root and the quotient are each corrected by one residual step (fma), so the
// result differs from the CPU's only within ~2^-40 of a rounding tie. hi == 0 (the CPU's
// s == 0) leaves n as it is.
inline float tq_div_sqrt(float n, float hi, float lo) {
  if (!(hi > 0.0f)) return n;
  const float r = sqrt(hi);
  const float rl = (fma(-r, r, hi) + lo) / (2.0f * r);  // sqrt(hi + lo) ≈ r + rl
  const float q = n / r;
  const float e = fma(-q, r, n) - TQ_MUL_RN(q, rl);  // n - q·(r + rl)
  return q + e / r;
}

// Sum of squares of v[0..d) over the threadgroup as a pair hi + lo, returned to every
// thread. red: scratch of 2 * ceil(nthreads / 32) floats.
inline void tq_group_sum_squares(threadgroup const float* v, uint d, uint tid, uint nthreads,
                                 threadgroup float* red, thread float& out_hi,
                                 thread float& out_lo) {
  float hi = 0.0f, lo = 0.0f;
  for (uint j = tid; j < d; j += nthreads) {
    const float x = v[j];
    const float p = TQ_MUL_RN(x, x);
    tq_two_sum(hi, lo, p, fma(x, x, -p));
  }
  // Only lanes that exist take part (a group of 16 threads is a 16-lane simd-group).
  for (uint off = min(TQ_SIMD_WIDTH, nthreads) / 2u; off >= 1u; off >>= 1u) {
    const float oh = simd_shuffle_xor(hi, ushort(off));
    const float ol = simd_shuffle_xor(lo, ushort(off));
    // Lanes pair up symmetrically; combine in lane order so both get the same pair.
    if ((tid % TQ_SIMD_WIDTH) & off) {
      float h2 = oh, l2 = ol;
      tq_two_sum(h2, l2, hi, lo);
      hi = h2;
      lo = l2;
    } else {
      tq_two_sum(hi, lo, oh, ol);
    }
  }
  const uint nsimd = (nthreads + TQ_SIMD_WIDTH - 1u) / TQ_SIMD_WIDTH;
  if (tid % TQ_SIMD_WIDTH == 0u) {
    red[2u * (tid / TQ_SIMD_WIDTH)] = hi;
    red[2u * (tid / TQ_SIMD_WIDTH) + 1u] = lo;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float th = red[0], tl = red[1];
  for (uint s = 1u; s < nsimd; ++s) tq_two_sum(th, tl, red[2u * s], red[2u * s + 1u]);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out_hi = th;
  out_lo = tl;
}

// ‖v[0..d)‖ over the threadgroup (rounded like the CPU's row_norms), to every thread.
inline float tq_group_norm(threadgroup const float* v, uint d, uint tid, uint nthreads,
                           threadgroup float* red) {
  float hi = 0.0f, lo = 0.0f;
  tq_group_sum_squares(v, d, tid, nthreads, red, hi, lo);
  return tq_norm_from_sum(hi, lo);
}

#endif  // TQ_METAL_COMMON
