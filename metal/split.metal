// The key split on the GPU (OutlierSplitQuantizer, quantizer_outlier.h; the mlx-lm cache's
// default "key split"): each key x is split into its first d/2 channels (the outlier part O,
// put first by the caller's channel order) and the other d/2 (the inlier part I), each part
// with its own hadamard rotation Π_p and codebook at its own bit width:
//   y = diag(Π_O, Π_I)·x/‖x‖ = [cos φ·u_O; sin φ·u_I],  φ = atan2(‖y_I‖, ‖y_O‖),
// code row = [φ as k = round(φ/(π/2)·(2^A - 1)), A = 8 (1 byte) or 16 (uint16 LE)]
//            [packed indices of u_O at bits0] [packed indices of u_I at bits1],
// norm = ‖x‖ (or ‖x‖/‖ỹ‖ with norm correction, ỹ = [cos φ̃·c_O[idx]; sin φ̃·c_I[idx]]).
// Bit-identical to the CPU (Quantizer::encode of an OutlierSplitQuantizer): the two part
// rotations are one blocked FWHT (stages h < d/2 only, which is exactly two transforms of
// d/2), the part norms are compensated sums as the CPU's double sums, and the angle code is
// decided by comparing against the rounding boundaries instead of evaluating atan2:
// lround(φ/(π/2)·top) counts the boundaries t_j = (j + 1/2)·(π/2)/top with φ >= t_j, and
// φ >= t_j  <=>  s_O <= (s_O + s_I)·cos² t_j  (s_p = ‖y_p‖²), evaluated in double-float with
// cos² t_j from a table (hi, lo) the host computes in double. A float atan2 gives the first
// guess; the boundary tests correct it. The kernel can differ from the CPU only when φ lies
// within ~2^-44 (relative) of a boundary, where the CPU's own double rounding decides.
// Tables: angles[2k], angles[2k+1] = (cos, sin) of angle code k as the CPU's float table
// (quantizer_outlier.cpp angle_table), angle_bounds[2j], [2j+1] = cos² t_j as hi + lo.
// The angle tables are device buffers (65536 entries at A = 16). Used by the mlx path
// (python/turboquant/metal.py); the native backend does not hold split keys, so this file has
// no [[kernel]] entry points and is not part of its embedded source.
// Signs: D₁ of both parts (d floats: O then I), then D₂ of both parts (d floats).
// Centroids / boundaries: the outlier part's table, then the inlier part's.
#ifndef TQ_SINGLE_SOURCE
#include "common.metal"
#include "attention.metal"
#endif

struct TqSplitParams {
  uint rows;
  uint dim;         // head_dim d, a power of two in [32, 512]
  uint part_dim;    // d/2: the outlier part is channels [0, d/2), the inlier part the rest
  uint bits0;       // outlier part's bits
  uint bits1;       // inlier part's bits
  uint part_bytes0; // packed_bytes(d/2, bits0)
  uint part_bytes1;
  uint angle_bytes; // 1 (8-bit angle) or 2 (16-bit)
  uint code_bytes;  // angle_bytes + part_bytes0 + part_bytes1
  uint norm_fp16;
  uint norm_correction;  // encode: store ‖x‖/‖ỹ‖
  uint inverse_rotate;   // dequantize: 1 decoded rows, 0 rotated-domain tile
  uint out_fp16;         // dequantize: tile as fp16 bits
};

// Decode attention with split keys: TqAttnParams' fields (k_bits = bits0, k_code_bytes = the
// whole split row) followed by the split's.
struct TqSplitAttnParams {
  uint dim;
  uint tokens;
  uint head_stride;
  uint block_tokens;
  uint num_blocks;
  uint group;
  uint k_bits;        // outlier part's bits
  uint v_bits;
  uint k_code_bytes;  // split row: angle + both parts
  uint v_code_bytes;
  uint norm_fp16;
  float scale;
  uint part_dim;
  uint k_bits1;       // inlier part's bits
  uint k_part_bytes0;
  uint angle_bytes;
};

// The FWHT of rotation.cpp on each aligned block of `block` elements of v (d = 2^k floats,
// block a power of two dividing d): the stages h < block of the full transform. Same
// thread layout and operation order as tq_fwht (which is block = d), so each block's result
// is bit-identical to the CPU's transform of that block alone.
inline void tq_fwht_blocks(threadgroup float* v, uint d, uint block, uint tid, uint nthreads) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint lane = tid % TQ_SIMD_WIDTH;
  const uint hreg = min(min(TQ_SIMD_WIDTH, nthreads), block);
  for (uint j = tid; j < d; j += nthreads) {
    float x = v[j];
    for (uint h = 1u; h < hreg; h <<= 1u) {
      const float other = simd_shuffle_xor(x, ushort(h));
      x = (lane & h) != 0u ? other - x : x + other;
    }
    v[j] = x;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint h = hreg; h < block; h <<= 1u) {
    for (uint b = tid; b < d / 2u; b += nthreads) {
      const uint i = ((b & ~(h - 1u)) << 1u) | (b & (h - 1u));
      const float a = v[i], c = v[i + h];
      v[i] = a + c;
      v[i + h] = a - c;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// y = diag(Π_O, Π_I)·v in place (tq_hadamard_forward per block of `block` channels).
inline void tq_hadamard_forward_blocks(threadgroup float* v, TQ_TABLE float* signs, uint d,
                                       uint block, uint tid, uint nthreads) {
  for (uint j = tid; j < d; j += nthreads) v[j] = v[j] * signs[j];
  tq_fwht_blocks(v, d, block, tid, nthreads);
  if (TQ_ROTATION_ROUNDS == 2u) {
    for (uint j = tid; j < d; j += nthreads) v[j] *= signs[d + j];
    tq_fwht_blocks(v, d, block, tid, nthreads);
  }
  const float scale = tq_rotation_scale(block);
  for (uint j = tid; j < d; j += nthreads) v[j] *= scale;
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// x = diag(Π_O, Π_I)ᵀ·v in place.
inline void tq_hadamard_inverse_blocks(threadgroup float* v, TQ_TABLE float* signs, uint d,
                                       uint block, uint tid, uint nthreads) {
  tq_fwht_blocks(v, d, block, tid, nthreads);
  if (TQ_ROTATION_ROUNDS == 2u) {
    for (uint j = tid; j < d; j += nthreads) v[j] *= signs[d + j];
    tq_fwht_blocks(v, d, block, tid, nthreads);
  }
  const float scale = tq_rotation_scale(block);
  for (uint j = tid; j < d; j += nthreads) v[j] *= signs[j] * scale;
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// φ >= t_j, i.e. s0 <= (s0 + s1)·cos² t_j, for s0 = h0 + l0 and the total th + tl, in
// double-float arithmetic.
inline bool tq_angle_at_least(float h0, float l0, float th, float tl,
                              device const float* bounds, uint j) {
  const float ch = bounds[2u * j], cl = bounds[2u * j + 1u];
  const float ph = TQ_MUL_RN(th, ch);
  // total·cos² t_j = ph + pl
  const float pl = fma(th, ch, -ph) + (TQ_MUL_RN(th, cl) + TQ_MUL_RN(tl, ch));
  const float s = ph - h0;  // two-sum of ph and -h0
  const float bb = s - ph;
  const float err = (ph - (s - bb)) + (-h0 - bb);
  return s + ((err + pl) - l0) >= 0.0f;
}

// The angle code of the part sums of squares s0 = h0 + l0 (outliers), s1 = h1 + l1 (inliers):
// the CPU's clamp(lround(atan2(√s1, √s0)/(π/2)·top), 0, top), top = 2^A - 1.
inline uint tq_split_angle(float h0, float l0, float h1, float l1, device const float* bounds,
                           uint top) {
  if (!isfinite(h0) || !isfinite(h1)) return 0u;  // NaN/Inf input: the caller refuses the row
  if (!(h0 > 0.0f) && !(h1 > 0.0f)) return 0u;    // atan2(0, 0) = 0
  float th = h0, tl = l0;
  tq_two_sum(th, tl, h1, l1);
  const float guess = atan2(sqrt(h1), sqrt(h0)) * (float(top) / 1.57079632679489662f);
  uint k = uint(min(max(floor(guess + 0.5f), 0.0f), float(top)));
  while (k > 0u && !tq_angle_at_least(h0, l0, th, tl, bounds, k - 1u)) --k;
  while (k < top && tq_angle_at_least(h0, l0, th, tl, bounds, k)) ++k;
  return k;
}

// row: a key row's first bytes, in device or threadgroup memory.
template <class P>
inline uint tq_split_read_angle(P row, uint angle_bytes) {
  return angle_bytes == 1u ? uint(row[0]) : (uint(row[0]) | (uint(row[1]) << 8u));
}

// Encode one key per threadgroup. Scratch: v[dim] floats, idx[dim] bytes, red[64] floats.
// nthreads: a power of two dividing dim.
inline void tq_split_encode_body(device const float* x, device uchar* codes, device uchar* norms,
                                 TQ_TABLE float* signs, TQ_TABLE float* boundaries,
                                 TQ_TABLE float* centroids, device const float* angles,
                                 device const float* angle_bounds, TQ_PARAMS TqSplitParams& p,
                                 threadgroup float* v, threadgroup uchar* idx,
                                 threadgroup float* red, uint row, uint tid, uint nthreads) {
  if (row >= p.rows) return;  // uniform over the threadgroup
  const uint d = p.dim, pd = p.part_dim;
  device const float* xr = x + ulong(row) * d;
  for (uint j = tid; j < d; j += nthreads) v[j] = xr[j];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float norm = tq_group_norm(v, d, tid, nthreads, red);
  const float inv = norm > 0.0f ? 1.0f / norm : 0.0f;
  for (uint j = tid; j < d; j += nthreads) v[j] = v[j] * inv;
  tq_hadamard_forward_blocks(v, signs, d, pd, tid, nthreads);
  float h0 = 0.0f, l0 = 0.0f, h1 = 0.0f, l1 = 0.0f;
  tq_group_sum_squares(v, pd, tid, nthreads, red, h0, l0);
  tq_group_sum_squares(v + pd, pd, tid, nthreads, red, h1, l1);
  // u_p = y_p/‖y_p‖ (the CPU's float(y·(1/√s_p)) in double), quantized by part p's codebook.
  const uint nb0 = (1u << p.bits0) - 1u;
  for (uint j = tid; j < d; j += nthreads) {
    const bool inl = j >= pd;
    const float u = inl ? tq_div_sqrt(v[j], h1, l1) : tq_div_sqrt(v[j], h0, l0);
    idx[j] = uchar(inl ? tq_quantize(u, boundaries + nb0, p.bits1)
                       : tq_quantize(u, boundaries, p.bits0));
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint k = tq_split_angle(h0, l0, h1, l1, angle_bounds, p.angle_bytes == 1u ? 255u : 65535u);
  device uchar* out = codes + ulong(row) * p.code_bytes;
  if (tid == 0u) {
    out[0] = uchar(k & 0xFFu);
    if (p.angle_bytes == 2u) out[1] = uchar(k >> 8u);
  }
  device uchar* out0 = out + p.angle_bytes;
  device uchar* out1 = out0 + p.part_bytes0;
  for (uint b = tid; b < p.part_bytes0; b += nthreads) out0[b] = tq_pack_byte(idx, b, pd, p.bits0);
  for (uint b = tid; b < p.part_bytes1; b += nthreads)
    out1[b] = tq_pack_byte(idx + pd, b, d - pd, p.bits1);
  float stored = norm;
  if (p.norm_correction != 0u) {  // uniform over the threadgroup
    // ỹ = [cos φ̃·c_O[idx]; sin φ̃·c_I[idx]]; each thread overwrites only its own coordinates.
    const float cs = angles[2u * k], sn = angles[2u * k + 1u];
    const uint nc0 = 1u << p.bits0;
    for (uint j = tid; j < d; j += nthreads)
      v[j] = j >= pd ? sn * centroids[nc0 + idx[j]] : cs * centroids[idx[j]];
    float hi = 0.0f, lo = 0.0f;
    tq_group_sum_squares(v, d, tid, nthreads, red, hi, lo);
    stored = tq_div_sqrt(norm, hi, lo);
  }
  if (tid == 0u) tq_store_norm(norms, row, stored, p.norm_fp16);
}

// Decoded rows ‖x‖·diag(Π_O, Π_I)ᵀ·ỹ (inverse_rotate: bit-identical to Quantizer::decode) or
// the rotated-domain tile ‖x‖·ỹ. Scratch: v[dim]. nthreads: a power of two dividing dim.
inline void tq_split_dequantize_body(device const uchar* codes, device const uchar* norms,
                                     TQ_TABLE float* centroids, TQ_TABLE float* signs,
                                     device const float* angles, device uchar* out,
                                     TQ_PARAMS TqSplitParams& p, threadgroup float* v, uint row,
                                     uint tid, uint nthreads) {
  if (row >= p.rows) return;  // uniform over the threadgroup
  const uint d = p.dim, pd = p.part_dim;
  device const uchar* code = codes + ulong(row) * p.code_bytes;
  const uint k = tq_split_read_angle(code, p.angle_bytes);
  const float cs = angles[2u * k], sn = angles[2u * k + 1u];
  device const uchar* c0 = code + p.angle_bytes;
  device const uchar* c1 = c0 + p.part_bytes0;
  const uint nc0 = 1u << p.bits0;
  for (uint j = tid; j < d; j += nthreads)
    v[j] = j >= pd ? sn * centroids[nc0 + tq_read_index(c1, j - pd, p.bits1)]
                   : cs * centroids[tq_read_index(c0, j, p.bits0)];
  if (p.inverse_rotate != 0u) tq_hadamard_inverse_blocks(v, signs, d, pd, tid, nthreads);
  const float n = tq_load_norm(norms, row, p.norm_fp16);
  for (uint j = tid; j < d; j += nthreads) {
    const float value = v[j] * n;
    if (p.out_fp16 != 0u) {
      ((device ushort*)out)[ulong(row) * d + j] = tq_float_to_half_bits(value);
    } else {
      ((device float*)out)[ulong(row) * d + j] = value;
    }
  }
}

// tq_split_dequantize_body on a simd-group per row (d = 32·E, part_dim >= 32), the row in
// registers: same values, bit for bit.
template <uint E>
inline void tq_split_dequantize_lanes(device const uchar* codes, device const uchar* norms,
                                      TQ_TABLE float* centroids, TQ_TABLE float* signs,
                                      device const float* angles, device uchar* out,
                                      TQ_PARAMS TqSplitParams& p, uint row, uint out_row,
                                      uint lane) {
  const uint d = p.dim, pd = p.part_dim;
  device const uchar* code = codes + ulong(row) * p.code_bytes;
  const uint k = tq_split_read_angle(code, p.angle_bytes);
  const float cs = angles[2u * k], sn = angles[2u * k + 1u];
  device const uchar* c0 = code + p.angle_bytes;
  device const uchar* c1 = c0 + p.part_bytes0;
  const uint nc0 = 1u << p.bits0;
  float x[E];
  TQ_UNROLL for (uint e = 0u; e < E; ++e) {
    const uint j = lane + TQ_SIMD_WIDTH * e;
    x[e] = j >= pd ? sn * centroids[nc0 + tq_read_index(c1, j - pd, p.bits1)]
                   : cs * centroids[tq_read_index(c0, j, p.bits0)];
  }
  if (p.inverse_rotate != 0u) tq_hadamard_inverse_lanes<E>(x, signs, d, pd, lane);
  tq_store_row_lanes<E>(out, x, tq_load_norm(norms, row, p.norm_fp16), ulong(out_row) * d, lane,
                        p.out_fp16);
}

// Code row `row` to output row `out_row` by tq_split_dequantize_lanes<dim / 32>.
inline void tq_split_dequantize_row(device const uchar* codes, device const uchar* norms,
                                    TQ_TABLE float* centroids, TQ_TABLE float* s,
                                    device const float* angles, device uchar* out,
                                    TQ_PARAMS TqSplitParams& p, uint row, uint out_row,
                                    uint lane) {
  switch (p.dim / TQ_SIMD_WIDTH) {
    case 2u:
      tq_split_dequantize_lanes<2u>(codes, norms, centroids, s, angles, out, p, row, out_row, lane);
      break;
    case 4u:
      tq_split_dequantize_lanes<4u>(codes, norms, centroids, s, angles, out, p, row, out_row, lane);
      break;
    case 8u:
      tq_split_dequantize_lanes<8u>(codes, norms, centroids, s, angles, out, p, row, out_row, lane);
      break;
    case 16u:
      tq_split_dequantize_lanes<16u>(codes, norms, centroids, s, angles, out, p, row, out_row,
                                     lane);
      break;
    default: break;
  }
}

// tq_dequantize_rows_body for split keys (part_dim = dim/2 >= 32; dim/32 of 2, 4, 8 or 16).
inline void tq_split_dequantize_rows_body(device const uchar* codes, device const uchar* norms,
                                          TQ_TABLE float* centroids, TQ_TABLE float* signs,
                                          device const float* angles, device uchar* out,
                                          TQ_PARAMS TqSplitParams& p, uint rows_per_head,
                                          uint group, uint tid, uint nthreads) {
  const uint row = group * (nthreads / TQ_SIMD_WIDTH) + tid / TQ_SIMD_WIDTH;
  if (row >= p.rows) return;  // uniform over the simd-group
  tq_split_dequantize_row(codes, norms, centroids,
                          signs + ulong(row / rows_per_head) * 2u * p.dim, angles, out, p, row,
                          row, tid % TQ_SIMD_WIDTH);
}

// tq_dequantize_tile_body for split keys.
inline void tq_split_dequantize_tile_body(device const uchar* codes, device const uchar* norms,
                                          TQ_TABLE float* centroids, TQ_TABLE float* signs,
                                          device const float* angles,
                                          device const ushort* before, device const ushort* after,
                                          device uchar* out, TQ_PARAMS TqSplitParams& p,
                                          uint rows_per_head, uint nb, uint na, uint group,
                                          uint tid, uint nthreads) {
  const uint r = group * (nthreads / TQ_SIMD_WIDTH) + tid / TQ_SIMD_WIDTH;
  const uint n = rows_per_head;
  if (n == 0u || r >= (p.rows / n) * (nb + n + na)) return;  // uniform over the simd-group
  const uint lane = tid % TQ_SIMD_WIDTH;
  uint row = 0u;
  if (tq_tile_fp16_row(before, after, out, p.dim, n, nb, na, r, lane, row)) return;
  tq_split_dequantize_row(codes, norms, centroids, signs + ulong(row / n) * 2u * p.dim, angles,
                          out, p, row, r, lane);
}

// y = diag(Π_O, Π_I)·x for query rows (the decode-attention query state). Scratch: v[dim].
inline void tq_split_rotate_body(device const float* x, device float* y, TQ_TABLE float* signs,
                                 TQ_PARAMS TqSplitParams& p, threadgroup float* v, uint row,
                                 uint tid, uint nthreads) {
  if (row >= p.rows) return;
  const uint d = p.dim;
  for (uint j = tid; j < d; j += nthreads) v[j] = x[ulong(row) * d + j];
  tq_hadamard_forward_blocks(v, signs, d, p.part_dim, tid, nthreads);
  for (uint j = tid; j < d; j += nthreads) y[ulong(row) * d + j] = v[j];
}

// Threadgroup scratch (floats): tq_attention_scratch_floats' with both parts' centroids.
inline uint tq_split_attention_scratch_floats(uint dim, uint group, uint block_tokens,
                                              uint k_bits0, uint k_bits1, uint v_bits) {
  return tq_attention_scratch_floats(dim, group, block_tokens, k_bits0, v_bits) + (1u << k_bits1);
}

// tq_attention_block_body with split keys: s[g][t] = scale·‖k_t‖·(cos φ̃_t·⟨q_O, c_O[idx]⟩ +
// sin φ̃_t·⟨q_I, c_I[idx]⟩), q rotated by diag(Π_O, Π_I) (tq_split_rotate_body); values and
// the partial outputs as tq_attention_block_body's (tq_attention_reduce merges them).
inline void tq_split_attention_block_body(
    device const float* q, device const uchar* k_codes, device const uchar* k_norms,
    device const uchar* v_codes, device const uchar* v_norms, TQ_TABLE float* k_centroids,
    TQ_TABLE float* v_centroids, device const float* angles, device float* part_m,
    device float* part_l, device float* part_acc, TQ_PARAMS TqSplitAttnParams& p,
    threadgroup float* tg, uint block, uint head, uint tid, uint nthreads) {
  const uint d = p.dim, G = p.group, BT = p.block_tokens, pd = p.part_dim;
  const uint per = tq_tiles_per_block(p.tokens, BT, p.num_blocks);
  const uint tile0 = block * per;
  if (tile0 * BT >= p.tokens || G > TQ_MAX_GROUP) return;  // uniform over the threadgroup
  const uint tile1 = min(tile0 + per, (p.tokens + BT - 1u) / BT);
  const uint nk = (1u << p.k_bits) + (1u << p.k_bits1), nv = 1u << p.v_bits;
  threadgroup float* qs = tg;
  threadgroup float* ck = qs + G * d;  // outlier part's centroids, then the inlier part's
  threadgroup float* ck1 = ck + (1u << p.k_bits);
  threadgroup float* cv = ck + nk;
  threadgroup float* w = cv + nv;
  threadgroup float* acc = w + G * BT;
  threadgroup float* stats = acc + G * d;

  for (uint i = tid; i < G * d; i += nthreads) qs[i] = q[ulong(head) * G * d + i];
  for (uint i = tid; i < nk; i += nthreads) ck[i] = k_centroids[i];
  for (uint i = tid; i < nv; i += nthreads) cv[i] = v_centroids[i];
  tq_attention_state_init(stats, acc, d, G, tid, nthreads);
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const uint lane = tid % TQ_SIMD_WIDTH, simd = tid / TQ_SIMD_WIDTH;
  const uint nsimd = nthreads / TQ_SIMD_WIDTH;
  for (uint tile = tile0; tile < tile1; ++tile) {
    const uint t0 = tile * BT;
    const uint nt = min(BT, p.tokens - t0);
    const ulong first = ulong(head) * p.head_stride + t0;
    for (uint t = simd; t < nt; t += nsimd) {
      device const uchar* row = k_codes + (first + t) * p.k_code_bytes;
      const uint k = tq_split_read_angle(row, p.angle_bytes);
      device const uchar* r0 = row + p.angle_bytes;
      device const uchar* r1 = r0 + p.k_part_bytes0;
      float part0[TQ_MAX_GROUP], part1[TQ_MAX_GROUP];
      for (uint g = 0u; g < G; ++g) part0[g] = part1[g] = 0.0f;
      for (uint j = lane; j < pd; j += TQ_SIMD_WIDTH) {
        const float c0 = ck[tq_read_index(r0, j, p.k_bits)];
        const float c1 = ck1[tq_read_index(r1, j, p.k_bits1)];
        for (uint g = 0u; g < G; ++g) {
          part0[g] += qs[g * d + j] * c0;
          part1[g] += qs[g * d + pd + j] * c1;
        }
      }
      const float kn = tq_load_norm(k_norms, first + t, p.norm_fp16);
      const float cs = angles[2u * k], sn = angles[2u * k + 1u];
      for (uint g = 0u; g < G; ++g) {
        const float s0 = simd_sum(part0[g]);
        const float s1 = simd_sum(part1[g]);
        if (lane == 0u) w[g * BT + t] = p.scale * (kn * (cs * s0 + sn * s1));
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    tq_attention_tile_values(v_codes, v_norms, cv, w, stats, acc, d, G, BT, nt, first,
                             tile == tile0, p.v_bits, p.v_code_bytes, p.norm_fp16, tid, nthreads);
  }
  tq_attention_block_finish(stats, acc, part_m, part_l, part_acc, d, G, p.num_blocks, block, head,
                            tid, nthreads);
}
