// Encode (turboquant_mse, hadamard rotation): x -> (pack(nearest_centroid(Π x/‖x‖)), ‖x‖),
// or with norm_correction ‖x‖/‖ỹ‖ (ỹ = c[idx], the dequantized unit vector, as
// Quantizer::encode with QuantizerConfig::norm_correction). One threadgroup per vector. Bit-identical to the CPU path (Quantizer::encode with
// MseQuantizer): same norm (compensated sum, see common.metal), the same FWHT stage order,
// the same boundary search and packing.h layout v1; norms stored as fp16 bits or fp32.
// Also: tq_rotate, Π applied to query rows (the decode-attention query state).
#ifndef TQ_SINGLE_SOURCE
#include "common.metal"
#endif

// Threadgroup scratch: v[dim] floats, idx[dim] bytes, red[64] floats. nthreads: a power of
// two dividing dim (the host uses min(dim, 256)).
inline void tq_encode_body(device const float* x, device uchar* codes, device uchar* norms,
                           TQ_TABLE float* signs, TQ_TABLE float* boundaries,
                           TQ_TABLE float* centroids, TQ_PARAMS TqEncodeParams& p,
                           threadgroup float* v,
                           threadgroup uchar* idx, threadgroup float* red, uint row, uint tid,
                           uint nthreads) {
  if (row >= p.rows) return;  // uniform over the threadgroup
  const uint d = p.dim;
  device const float* xr = x + ulong(row) * d;
  for (uint j = tid; j < d; j += nthreads) v[j] = xr[j];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float norm = tq_group_norm(v, d, tid, nthreads, red);
  const float inv = norm > 0.0f ? 1.0f / norm : 0.0f;
  for (uint j = tid; j < d; j += nthreads) v[j] = v[j] * inv;
  tq_hadamard_forward(v, signs, d, tid, nthreads);
  for (uint j = tid; j < d; j += nthreads) idx[j] = uchar(tq_quantize(v[j], boundaries, p.bits));
  threadgroup_barrier(mem_flags::mem_threadgroup);
  device uchar* out = codes + ulong(row) * p.code_bytes;
  for (uint k = tid; k < p.code_bytes; k += nthreads) out[k] = tq_pack_byte(idx, k, d, p.bits);
  float stored = norm;
  if (p.norm_correction != 0u) {  // uniform over the threadgroup
    // Each thread overwrites only its own coordinates of v (the ones it quantized).
    for (uint j = tid; j < d; j += nthreads) v[j] = centroids[idx[j]];
    float hi = 0.0f, lo = 0.0f;
    tq_group_sum_squares(v, d, tid, nthreads, red, hi, lo);
    stored = tq_div_sqrt(norm, hi, lo);
  }
  if (tid == 0u) tq_store_norm(norms, row, stored, p.norm_fp16);
}

// y = Π x for rows of x (queries before decode attention). Scratch: v[dim].
inline void tq_rotate_body(device const float* x, device float* y, TQ_TABLE float* signs,
                           TQ_PARAMS TqRotateParams& p, threadgroup float* v, uint row, uint tid,
                           uint nthreads) {
  if (row >= p.rows) return;
  const uint d = p.dim;
  for (uint j = tid; j < d; j += nthreads) v[j] = x[ulong(row) * d + j];
  tq_hadamard_forward(v, signs, d, tid, nthreads);
  for (uint j = tid; j < d; j += nthreads) y[ulong(row) * d + j] = v[j];
}

// The key split's per-head channel order (the mlx cache's keys and queries, in their own
// dtype, as 16-bit words): dst[r][c] = src[r][order[head(r)][c]], each element p.width words.
// One thread per destination word (item = threadgroup * nthreads + tid), so the writes are
// coalesced; the host keeps rows * dim * width below 2^32.
inline void tq_permute_body(device const ushort* src, device ushort* dst, TQ_TABLE uint* order,
                            TQ_PARAMS TqPermuteParams& p, uint group, uint tid, uint nthreads) {
  const uint row_words = p.dim * p.width;
  const uint item = group * nthreads + tid;
  if (item >= p.rows * row_words) return;
  const uint row = item / row_words;
  const uint j = item - row * row_words;
  const uint c = j / p.width;
  const uint from = order[(row / p.rows_per_head) * p.dim + c] * p.width + (j - c * p.width);
  dst[item] = src[row * row_words + from];
}

// A decode step's new K/V rows as the GPU store's fp16 window keeps them (the mlx cache's
// centring, channel order and rounding in one launch): for row r (head r / rows_per_head)
// and channel c,
//   k_out[r][c] = fp16(float(k[r][order[head][c]]) - k_mean[head][c])   (order: p.permute)
//   v_out[r][c] = fp16(float(v[r][c]) - v_mean[head][c]),
// with the key mean already in the channel order. One float32 subtraction and one rounding
// to nearest even, as mlx's astype(float32) - mean then astype(float16): the same bits. The
// rows come as 16-bit words of fp16 or bfloat16 (p.bf16). One thread per output element of
// either role (item = threadgroup * nthreads + tid < 2 * rows * dim).

inline void tq_centre_body(device const ushort* k, device const ushort* v,
                           device const float* k_mean, device const float* v_mean,
                           TQ_TABLE uint* order, device ushort* k_out, device ushort* v_out,
                           TQ_PARAMS TqCentreParams& p, uint group, uint tid, uint nthreads) {
  const uint n = p.rows * p.dim;
  const uint item = group * nthreads + tid;
  if (item >= 2u * n) return;
  const bool key = item < n;
  const uint e = key ? item : item - n;
  const uint row = e / p.dim;
  const uint c = e - row * p.dim;
  const uint m = (row / p.rows_per_head) * p.dim + c;  // the head's mean of channel c
  if (key) {
    const uint from = p.permute != 0u ? order[m] : c;
    k_out[e] = tq_float_to_half_bits(tq_word_to_float(k[row * p.dim + from], p.bf16) - k_mean[m]);
  } else {
    v_out[e] = tq_float_to_half_bits(tq_word_to_float(v[e], p.bf16) - v_mean[m]);
  }
}

#if defined(__METAL_VERSION__) && !defined(TQ_NO_ENTRY_POINTS)
[[kernel]] void tq_encode(device const float* x [[buffer(0)]], device uchar* codes [[buffer(1)]],
                          device uchar* norms [[buffer(2)]], constant float* signs [[buffer(3)]],
                          constant float* boundaries [[buffer(4)]],
                          constant TqEncodeParams& p [[buffer(5)]],
                          constant float* centroids [[buffer(6)]],
                          uint3 tg_pos [[threadgroup_position_in_grid]],
                          uint tid [[thread_index_in_threadgroup]],
                          uint nthreads [[threads_per_threadgroup]]) {
  threadgroup float v[512];
  threadgroup uchar idx[512];
  threadgroup float red[64];
  tq_encode_body(x, codes, norms, signs, boundaries, centroids, p, v, idx, red, tg_pos.x, tid,
                 nthreads);
}

[[kernel]] void tq_rotate(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                          constant float* signs [[buffer(2)]],
                          constant TqRotateParams& p [[buffer(3)]],
                          uint3 tg_pos [[threadgroup_position_in_grid]],
                          uint tid [[thread_index_in_threadgroup]],
                          uint nthreads [[threads_per_threadgroup]]) {
  threadgroup float v[512];
  tq_rotate_body(x, y, signs, p, v, tg_pos.x, tid, nthreads);
}
#endif
