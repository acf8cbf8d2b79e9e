// Dequantize to a tile (prefill): codes + norms -> ‖x‖·c[idx] in the rotated domain, or
// the decoded vector ‖x‖·Πᵀ c[idx] (inverse_rotate, hadamard), as fp32 or fp16 bits. One
// threadgroup per row. With inverse_rotate the result is bit-identical to Quantizer::decode.
#ifndef TQ_SINGLE_SOURCE
#include "common.metal"
#endif

// Scratch: v[dim] floats. nthreads: a power of two dividing dim.
inline void tq_dequantize_body(device const uchar* codes, device const uchar* norms,
                               TQ_TABLE float* centroids, TQ_TABLE float* signs,
                               device uchar* out, TQ_PARAMS TqDequantParams& p,
                               threadgroup float* v, uint row, uint tid, uint nthreads) {
  if (row >= p.rows) return;  // uniform over the threadgroup
  const uint d = p.dim;
  device const uchar* code = codes + ulong(row) * p.code_bytes;
  for (uint j = tid; j < d; j += nthreads) v[j] = centroids[tq_read_index(code, j, p.bits)];
  if (p.inverse_rotate != 0u) tq_hadamard_inverse(v, signs, d, tid, nthreads);
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

// tq_dequantize_body on a simd-group per row (d = 32·E), the row in registers: same values,
// bit for bit.
template <uint E>
inline void tq_dequantize_lanes(device const uchar* codes, device const uchar* norms,
                                TQ_TABLE float* centroids, TQ_TABLE float* signs,
                                device uchar* out, TQ_PARAMS TqDequantParams& p, uint row,
                                uint out_row, uint lane) {
  const uint d = p.dim;
  device const uchar* code = codes + ulong(row) * p.code_bytes;
  float x[E];
  TQ_UNROLL for (uint e = 0u; e < E; ++e) {
    x[e] = centroids[tq_read_index(code, lane + TQ_SIMD_WIDTH * e, p.bits)];
  }
  if (p.inverse_rotate != 0u) tq_hadamard_inverse_lanes<E>(x, signs, d, d, lane);
  tq_store_row_lanes<E>(out, x, tq_load_norm(norms, row, p.norm_fp16), ulong(out_row) * d, lane,
                        p.out_fp16);
}

// Code row `row` to output row `out_row` by tq_dequantize_lanes<dim / 32>; signs: its head's.
inline void tq_dequantize_row(device const uchar* codes, device const uchar* norms,
                              TQ_TABLE float* centroids, TQ_TABLE float* s, device uchar* out,
                              TQ_PARAMS TqDequantParams& p, uint row, uint out_row, uint lane) {
  switch (p.dim / TQ_SIMD_WIDTH) {
    case 1u: tq_dequantize_lanes<1u>(codes, norms, centroids, s, out, p, row, out_row, lane); break;
    case 2u: tq_dequantize_lanes<2u>(codes, norms, centroids, s, out, p, row, out_row, lane); break;
    case 4u: tq_dequantize_lanes<4u>(codes, norms, centroids, s, out, p, row, out_row, lane); break;
    case 8u: tq_dequantize_lanes<8u>(codes, norms, centroids, s, out, p, row, out_row, lane); break;
    case 16u:
      tq_dequantize_lanes<16u>(codes, norms, centroids, s, out, p, row, out_row, lane);
      break;
    default: break;
  }
}

// Dequantize with several rows per threadgroup: simd-group s of threadgroup `group` takes row
// group·(nthreads/32) + s, whose head's signs start at signs + (row / rows_per_head)·2·dim.
// dim/32 must be 1, 2, 4, 8 or 16 (the host takes tq_dequantize_body otherwise).
inline void tq_dequantize_rows_body(device const uchar* codes, device const uchar* norms,
                                    TQ_TABLE float* centroids, TQ_TABLE float* signs,
                                    device uchar* out, TQ_PARAMS TqDequantParams& p,
                                    uint rows_per_head, uint group, uint tid, uint nthreads) {
  const uint row = group * (nthreads / TQ_SIMD_WIDTH) + tid / TQ_SIMD_WIDTH;
  if (row >= p.rows) return;  // uniform over the simd-group
  const uint lane = tid % TQ_SIMD_WIDTH;
  tq_dequantize_row(codes, norms, centroids, signs + ulong(row / rows_per_head) * 2u * p.dim, out,
                    p, row, row, lane);
}

// tq_dequantize_rows_body writing the whole prefill tile (tq_tile_fp16_row), fp16 bits
// (p.out_fp16 = 1); tile = (rows_per_head, nb, na).
inline void tq_dequantize_tile_body(device const uchar* codes, device const uchar* norms,
                                    TQ_TABLE float* centroids, TQ_TABLE float* signs,
                                    device const ushort* before, device const ushort* after,
                                    device uchar* out, TQ_PARAMS TqDequantParams& p,
                                    uint rows_per_head, uint nb, uint na, uint group, uint tid,
                                    uint nthreads) {
  const uint r = group * (nthreads / TQ_SIMD_WIDTH) + tid / TQ_SIMD_WIDTH;
  const uint n = rows_per_head;
  if (n == 0u || r >= (p.rows / n) * (nb + n + na)) return;  // uniform over the simd-group
  const uint lane = tid % TQ_SIMD_WIDTH;
  uint row = 0u;
  if (tq_tile_fp16_row(before, after, out, p.dim, n, nb, na, r, lane, row)) return;
  tq_dequantize_row(codes, norms, centroids, signs + ulong(row / n) * 2u * p.dim, out, p, row, r,
                    lane);
}

#if defined(__METAL_VERSION__) && !defined(TQ_NO_ENTRY_POINTS)
[[kernel]] void tq_dequantize(device const uchar* codes [[buffer(0)]],
                              device const uchar* norms [[buffer(1)]],
                              constant float* centroids [[buffer(2)]],
                              constant float* signs [[buffer(3)]], device uchar* out [[buffer(4)]],
                              constant TqDequantParams& p [[buffer(5)]],
                              uint3 tg_pos [[threadgroup_position_in_grid]],
                              uint tid [[thread_index_in_threadgroup]],
                              uint nthreads [[threads_per_threadgroup]]) {
  threadgroup float v[512];
  tq_dequantize_body(codes, norms, centroids, signs, out, p, v, tg_pos.x, tid, nthreads);
}
#endif
