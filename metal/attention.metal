// Decode attention on compressed codes (DESIGN §2), split-K over the cached tokens:
//   tq_attention_block: one threadgroup per (block of BT tokens, KV head). For the G query
//     heads of that KV head (GQA: all of them in one pass, so each code is read once) it
//     scores the block from the packed key codes with centroid lookups,
//       s[g][t] = scale · ‖k_t‖ · Σ_j (Π_K q_g)_j · c_K[idx_K(t, j)],
//     takes the block's softmax statistics m = max_t s, l = Σ_t e^(s - m), and sums values
//     in the rotated domain, acc[g][j] = Σ_t e^(s - m) · ‖v_t‖ · c_V[idx_V(t, j)].
//   tq_attention_reduce: one threadgroup per query head merges the blocks (online-softmax
//     rescaling by e^(m_b - max m)), divides by the total l and, for a hadamard value
//     rotation, applies Π_Vᵀ in threadgroup memory.
// Queries come in already rotated by Π_K (tq_rotate, or Quantizer::prepare_queries).
#ifndef TQ_METAL_ATTENTION
#define TQ_METAL_ATTENTION
#ifndef TQ_SINGLE_SOURCE
#include "common.metal"
#endif

// Threadgroup scratch (floats): G·dim (queries) + 2^k_bits + 2^v_bits (centroids) + G·BT
// (scores, then weights). nthreads: a multiple of 32.
inline uint tq_attention_scratch_floats(uint dim, uint group, uint block_tokens, uint k_bits,
                                        uint v_bits) {
  return group * dim + (1u << k_bits) + (1u << v_bits) + group * block_tokens;
}

// The second half of a block: w[g·BT + t] holds the scaled scores of the block's nt tokens
// (all written, after a barrier); writes the block's softmax statistics and its value sums
// in the rotated domain (cv: the value centroids in threadgroup memory). Shared by the
// plain and the split-key (split.metal) block kernels.
inline void tq_attention_block_values(device const uchar* v_codes, device const uchar* v_norms,
                                      threadgroup const float* cv, threadgroup float* w,
                                      device float* part_m, device float* part_l,
                                      device float* part_acc, uint d, uint G, uint BT, uint nt,
                                      ulong first, uint v_bits, uint v_code_bytes, uint norm_fp16,
                                      uint num_blocks, uint block, uint head, uint tid,
                                      uint nthreads) {
  const uint lane = tid % TQ_SIMD_WIDTH, simd = tid / TQ_SIMD_WIDTH;
  const uint nsimd = nthreads / TQ_SIMD_WIDTH;
  // Block softmax statistics; the weights e^(s - m)·‖v_t‖ replace the scores.
  for (uint g = simd; g < G; g += nsimd) {
    float m = -INFINITY;
    for (uint t = lane; t < nt; t += TQ_SIMD_WIDTH) m = max(m, w[g * BT + t]);
    m = simd_max(m);
    float l = 0.0f;
    for (uint t = lane; t < nt; t += TQ_SIMD_WIDTH) {
      const float e = exp(w[g * BT + t] - m);
      l += e;
      w[g * BT + t] = e * tq_load_norm(v_norms, first + t, norm_fp16);
    }
    l = simd_sum(l);
    if (lane == 0u) {
      part_m[(ulong(head) * num_blocks + block) * G + g] = m;
      part_l[(ulong(head) * num_blocks + block) * G + g] = l;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // Values in the rotated domain: one thread per coordinate, all G queries at once.
  for (uint j = tid; j < d; j += nthreads) {
    float acc[TQ_MAX_GROUP];
    for (uint g = 0u; g < G; ++g) acc[g] = 0.0f;
    for (uint t = 0u; t < nt; ++t) {
      const float c = cv[tq_read_index(v_codes + (first + t) * v_code_bytes, j, v_bits)];
      for (uint g = 0u; g < G; ++g) acc[g] += w[g * BT + t] * c;
    }
    for (uint g = 0u; g < G; ++g)
      part_acc[((ulong(head) * num_blocks + block) * G + g) * d + j] = acc[g];
  }
}

// Partial outputs, for block b of KV head h and query g of its group:
//   part_m/part_l[(h·num_blocks + b)·G + g], part_acc[((h·num_blocks + b)·G + g)·dim + j].
inline void tq_attention_block_body(device const float* q, device const uchar* k_codes,
                                    device const uchar* k_norms, device const uchar* v_codes,
                                    device const uchar* v_norms, TQ_TABLE float* k_centroids,
                                    TQ_TABLE float* v_centroids, device float* part_m,
                                    device float* part_l, device float* part_acc,
                                    TQ_PARAMS TqAttnParams& p, threadgroup float* tg, uint block,
                                    uint head, uint tid, uint nthreads) {
  const uint d = p.dim, G = p.group, BT = p.block_tokens;
  const uint t0 = block * BT;
  if (t0 >= p.tokens || G > TQ_MAX_GROUP) return;  // uniform over the threadgroup
  const uint nt = min(BT, p.tokens - t0);
  const uint nk = 1u << p.k_bits, nv = 1u << p.v_bits;
  threadgroup float* qs = tg;
  threadgroup float* ck = qs + G * d;
  threadgroup float* cv = ck + nk;
  threadgroup float* w = cv + nv;

  for (uint i = tid; i < G * d; i += nthreads) qs[i] = q[ulong(head) * G * d + i];
  for (uint i = tid; i < nk; i += nthreads) ck[i] = k_centroids[i];
  for (uint i = tid; i < nv; i += nthreads) cv[i] = v_centroids[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const uint lane = tid % TQ_SIMD_WIDTH, simd = tid / TQ_SIMD_WIDTH;
  const uint nsimd = nthreads / TQ_SIMD_WIDTH;
  const ulong first = ulong(head) * p.head_stride + t0;  // row of token t0 in the buffers

  // Scores: one simd-group per token, lanes split the coordinates.
  for (uint t = simd; t < nt; t += nsimd) {
    device const uchar* row = k_codes + (first + t) * p.k_code_bytes;
    float part[TQ_MAX_GROUP];
    for (uint g = 0u; g < G; ++g) part[g] = 0.0f;
    for (uint j = lane; j < d; j += TQ_SIMD_WIDTH) {
      const float c = ck[tq_read_index(row, j, p.k_bits)];
      for (uint g = 0u; g < G; ++g) part[g] += qs[g * d + j] * c;
    }
    const float kn = tq_load_norm(k_norms, first + t, p.norm_fp16);
    for (uint g = 0u; g < G; ++g) {
      const float s = simd_sum(part[g]);
      if (lane == 0u) w[g * BT + t] = p.scale * (kn * s);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  tq_attention_block_values(v_codes, v_norms, cv, w, part_m, part_l, part_acc, d, G, BT, nt, first,
                            p.v_bits, p.v_code_bytes, p.norm_fp16, p.num_blocks, block, head, tid,
                            nthreads);
}

// out[(h·G + g)·dim + j]: the attention output of query head h·G + g. Scratch: v[dim].
// nthreads: a power of two dividing dim.
inline void tq_attention_reduce_body(device const float* part_m, device const float* part_l,
                                     device const float* part_acc, TQ_TABLE float* v_signs,
                                     device float* out, TQ_PARAMS TqReduceParams& p,
                                     threadgroup float* v, uint g, uint head, uint tid,
                                     uint nthreads) {
  const uint d = p.dim, G = p.group, nb = p.num_blocks;
  if (g >= G) return;  // uniform over the threadgroup
  const ulong base = ulong(head) * nb * G + g;  // part_m index of block 0
  float mmax = -INFINITY;
  for (uint b = 0u; b < nb; ++b) mmax = max(mmax, part_m[base + ulong(b) * G]);
  float total = 0.0f;
  for (uint b = 0u; b < nb; ++b)
    total += part_l[base + ulong(b) * G] * exp(part_m[base + ulong(b) * G] - mmax);
  const float inv = 1.0f / total;
  for (uint j = tid; j < d; j += nthreads) {
    float a = 0.0f;
    for (uint b = 0u; b < nb; ++b)
      a += part_acc[(base + ulong(b) * G) * d + j] * exp(part_m[base + ulong(b) * G] - mmax);
    v[j] = a * inv;
  }
  if (p.inverse_rotate != 0u) tq_hadamard_inverse(v, v_signs, d, tid, nthreads);
  for (uint j = tid; j < d; j += nthreads) out[(ulong(head) * G + g) * d + j] = v[j];
}

#if defined(__METAL_VERSION__) && !defined(TQ_NO_ENTRY_POINTS)
[[kernel]] void tq_attention_block(
    device const float* q [[buffer(0)]], device const uchar* k_codes [[buffer(1)]],
    device const uchar* k_norms [[buffer(2)]], device const uchar* v_codes [[buffer(3)]],
    device const uchar* v_norms [[buffer(4)]], constant float* k_centroids [[buffer(5)]],
    constant float* v_centroids [[buffer(6)]], device float* part_m [[buffer(7)]],
    device float* part_l [[buffer(8)]], device float* part_acc [[buffer(9)]],
    constant TqAttnParams& p [[buffer(10)]], threadgroup float* tg [[threadgroup(0)]],
    uint3 tg_pos [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
    uint nthreads [[threads_per_threadgroup]]) {
  tq_attention_block_body(q, k_codes, k_norms, v_codes, v_norms, k_centroids, v_centroids, part_m,
                          part_l, part_acc, p, tg, tg_pos.x, tg_pos.y, tid, nthreads);
}

[[kernel]] void tq_attention_reduce(
    device const float* part_m [[buffer(0)]], device const float* part_l [[buffer(1)]],
    device const float* part_acc [[buffer(2)]], constant float* v_signs [[buffer(3)]],
    device float* out [[buffer(4)]], constant TqReduceParams& p [[buffer(5)]],
    uint3 tg_pos [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
    uint nthreads [[threads_per_threadgroup]]) {
  threadgroup float v[512];
  tq_attention_reduce_body(part_m, part_l, part_acc, v_signs, out, p, v, tg_pos.x, tg_pos.y, tid,
                           nthreads);
}
#endif
#endif  // TQ_METAL_ATTENTION
