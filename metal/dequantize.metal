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
