// Decode attention on compressed codes (DESIGN §2), split-K over the cached tokens:
//   tq_attention_block: one threadgroup per (block of tiles of BT tokens, KV head). For the G query
//     heads of that KV head (GQA: all of them in one pass, so each code is read once) it
//     scores the block from the packed key codes with centroid lookups,
//       s[g][t] = scale · ‖k_t‖ · Σ_j (Π_K q_g)_j · c_K[idx_K(t, j)],
//     takes the block's softmax statistics m = max_t s, l = Σ_t e^(s - m), and sums values
//     in the rotated domain, acc[g][j] = Σ_t e^(s - m) · ‖v_t‖ · c_V[idx_V(t, j)], tile by
//     tile with online rescaling (a block holds one tile, or several at long contexts).
//   tq_attention_reduce: one threadgroup per query head merges the blocks (softmax
//     rescaling by e^(m_b - max m)), divides by the total l and, for a hadamard value
//     rotation, applies Π_Vᵀ in threadgroup memory.
// Queries come in already rotated by Π_K (tq_rotate, or Quantizer::prepare_queries).
#ifndef TQ_METAL_ATTENTION
#define TQ_METAL_ATTENTION
#ifndef TQ_SINGLE_SOURCE
#include "common.metal"
#endif

// Threadgroup scratch (floats): G·dim (queries) + 2^k_bits + 2^v_bits (centroids) + G·BT
// (a tile's scores, then weights) + G·dim (the running value sums) + 3·G (the running max,
// sum and rescale factor of each query). nthreads: a multiple of 32.
inline uint tq_attention_scratch_floats(uint dim, uint group, uint block_tokens, uint k_bits,
                                        uint v_bits) {
  return 2u * group * dim + (1u << k_bits) + (1u << v_bits) + group * block_tokens + 3u * group;
}

// A threadgroup covers tiles [tile0, tile1) of the ceil(T / BT) tiles of BT tokens: the
// num_blocks threadgroups of a KV head share them evenly (one tile each when num_blocks =
// ceil(T / BT); fewer, longer blocks keep the partials small at long contexts).
inline uint tq_tiles_per_block(uint tokens, uint BT, uint num_blocks) {
  const uint ntiles = (tokens + BT - 1u) / BT;
  return (ntiles + num_blocks - 1u) / num_blocks;
}

// The running softmax state of a block before its first tile: stats = [m (G), l (G), c (G)],
// acc[g·dim + j] = 0 (each thread owns the coordinates j = tid + k·nthreads).
inline void tq_attention_state_init(threadgroup float* stats, threadgroup float* acc, uint d,
                                    uint G, uint tid, uint nthreads) {
  for (uint g = tid; g < G; g += nthreads) {
    stats[g] = 0.0f;
    stats[G + g] = 0.0f;
    stats[2u * G + g] = 0.0f;
  }
  for (uint j = tid; j < d; j += nthreads)
    for (uint g = 0u; g < G; ++g) acc[g * d + j] = 0.0f;
}

// One tile of a block: w[g·BT + t] holds the scaled scores of its nt tokens (all written,
// after a barrier). Online softmax (flash decoding): the running max m moves to the tile's if
// larger, the running sum l and the value sums (rotated domain) are rescaled by
// c = e^(m_old - m_new), and the tile's weights e^(s - m)·‖v_t‖ replace its scores. Ends
// with a barrier (the next tile overwrites w). Shared by the plain and the split-key
// (split.metal) block kernels.
inline void tq_attention_tile_values(device const uchar* v_codes, device const uchar* v_norms,
                                     threadgroup const float* cv, threadgroup float* w,
                                     threadgroup float* stats, threadgroup float* acc, uint d,
                                     uint G, uint BT, uint nt, ulong first, bool first_tile,
                                     uint v_bits, uint v_code_bytes, uint norm_fp16, uint tid,
                                     uint nthreads) {
  const uint lane = tid % TQ_SIMD_WIDTH, simd = tid / TQ_SIMD_WIDTH;
  const uint nsimd = nthreads / TQ_SIMD_WIDTH;
  for (uint g = simd; g < G; g += nsimd) {
    const float m_old = stats[g], l_old = stats[G + g];  // read before the lanes sync below
    float m = -INFINITY;
    for (uint t = lane; t < nt; t += TQ_SIMD_WIDTH) m = max(m, w[g * BT + t]);
    m = simd_max(m);
    const float m_new = first_tile ? m : max(m_old, m);
    float l = 0.0f;
    for (uint t = lane; t < nt; t += TQ_SIMD_WIDTH) {
      const float e = exp(w[g * BT + t] - m_new);
      l += e;
      w[g * BT + t] = e * tq_load_norm(v_norms, first + t, norm_fp16);
    }
    l = simd_sum(l);
    if (lane == 0u) {
      const float c = first_tile ? 0.0f : exp(m_old - m_new);
      stats[g] = m_new;
      stats[G + g] = l_old * c + l;
      stats[2u * G + g] = c;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // Values in the rotated domain: one thread per coordinate, all G queries at once.
  for (uint j = tid; j < d; j += nthreads) {
    float a[TQ_MAX_GROUP];
    for (uint g = 0u; g < G; ++g) a[g] = acc[g * d + j] * stats[2u * G + g];
    for (uint t = 0u; t < nt; ++t) {
      const float c = cv[tq_read_index(v_codes + (first + t) * v_code_bytes, j, v_bits)];
      for (uint g = 0u; g < G; ++g) a[g] += w[g * BT + t] * c;
    }
    for (uint g = 0u; g < G; ++g) acc[g * d + j] = a[g];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// The block's partial outputs from its running state (after the last tile's barrier):
//   part_m/part_l[(h·num_blocks + b)·G + g], part_acc[((h·num_blocks + b)·G + g)·dim + j].
inline void tq_attention_block_finish(threadgroup const float* stats, threadgroup const float* acc,
                                      device float* part_m, device float* part_l,
                                      device float* part_acc, uint d, uint G, uint num_blocks,
                                      uint block, uint head, uint tid, uint nthreads) {
  const ulong base = (ulong(head) * num_blocks + block) * G;
  for (uint g = tid; g < G; g += nthreads) {
    part_m[base + g] = stats[g];
    part_l[base + g] = stats[G + g];
  }
  for (uint j = tid; j < d; j += nthreads)
    for (uint g = 0u; g < G; ++g) part_acc[(base + g) * d + j] = acc[g * d + j];
}

// Block b of KV head h: the tiles tq_tiles_per_block assigns it, scored from the packed key
// codes with centroid lookups, merged by online softmax; partial outputs as
// tq_attention_block_finish writes them (tq_attention_reduce merges the blocks).
inline void tq_attention_block_body(device const float* q, device const uchar* k_codes,
                                    device const uchar* k_norms, device const uchar* v_codes,
                                    device const uchar* v_norms, TQ_TABLE float* k_centroids,
                                    TQ_TABLE float* v_centroids, device float* part_m,
                                    device float* part_l, device float* part_acc,
                                    TQ_PARAMS TqAttnParams& p, threadgroup float* tg, uint block,
                                    uint head, uint tid, uint nthreads) {
  const uint d = p.dim, G = p.group, BT = p.block_tokens;
  const uint per = tq_tiles_per_block(p.tokens, BT, p.num_blocks);
  const uint tile0 = block * per;
  if (tile0 * BT >= p.tokens || G > TQ_MAX_GROUP) return;  // uniform over the threadgroup
  const uint tile1 = min(tile0 + per, (p.tokens + BT - 1u) / BT);
  const uint nk = 1u << p.k_bits, nv = 1u << p.v_bits;
  threadgroup float* qs = tg;
  threadgroup float* ck = qs + G * d;
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
    tq_attention_tile_values(v_codes, v_norms, cv, w, stats, acc, d, G, BT, nt, first,
                             tile == tile0, p.v_bits, p.v_code_bytes, p.norm_fp16, tid, nthreads);
  }
  tq_attention_block_finish(stats, acc, part_m, part_l, part_acc, d, G, p.num_blocks, block, head,
                            tid, nthreads);
}

// Scratch of the reduce kernel (floats): the output row (dim <= 512), the blocks' weights
// e^(m_b - max m) when there are at most TQ_REDUCE_CACHED_BLOCKS blocks, 32 partials, and
// the slices' sums of a threadgroup of more threads than dim (tq_reduce_slices: at most
// 1024 threads).
#define TQ_REDUCE_CACHED_BLOCKS 1024u
#define TQ_REDUCE_SLICE_FLOATS 1024u
#define TQ_REDUCE_GROUP_FLOATS (512u + TQ_REDUCE_CACHED_BLOCKS + 32u + TQ_REDUCE_SLICE_FLOATS)

// A reduce threadgroup of nthreads > d threads works in S = nthreads / d slices: thread tid
// takes coordinate tid % d of slice tid / d, and each slice sums its own share of the blocks
// (or rows), in the same order as one slice would; slice 0 then adds the others' sums in
// slice order. With nthreads <= d there is one slice (threads take coordinates tid, tid +
// nthreads, ...), and the sums are those of the single-slice loop. Both are powers of two, and
// slices need d >= 32: a simd-group's lanes stay in one slice (the rotation's shuffles).
struct TqReduceSlices {
  uint count;  // S
  uint slice;  // this thread's slice
  uint j0;     // its first coordinate
  uint jstep;  // and the step between its coordinates
};

inline TqReduceSlices tq_reduce_slices(uint d, uint tid, uint nthreads) {
  TqReduceSlices s;
  if (nthreads > d) {
    s.count = nthreads / d;
    s.slice = tid / d;
    s.j0 = tid % d;
    s.jstep = d;
  } else {
    s.count = 1u;
    s.slice = 0u;
    s.j0 = tid;
    s.jstep = nthreads;
  }
  return s;
}

// [lo, hi): slice `slice` of `count`'s share of n items (contiguous, in order).
inline uint tq_slice_begin(uint n, uint slice, uint count) {
  return uint((ulong(n) * slice) / count);
}

// Where a thread's sum x for coordinate j goes: v[j] with one slice, else its slice's row of
// part (added up by tq_reduce_slices_add).
inline void tq_reduce_slices_put(threadgroup float* v, threadgroup float* part, TqReduceSlices s,
                                 uint d, uint j, float x) {
  if (s.count == 1u) {
    v[j] = x;
  } else {
    part[s.slice * d + j] = x;
  }
}

// Σ_s part[s·d + j], in slice order.
inline float tq_reduce_slice_sum(threadgroup const float* part, TqReduceSlices s, uint d,
                                 uint j) {
  float x = part[j];
  for (uint t = 1u; t < s.count; ++t) x += part[t * d + j];
  return x;
}

// v[j] = Σ_s part[s·d + j] for the coordinates of slice 0 (slice order), after the slices
// wrote their sums to part; returns after a barrier (v is set for every thread).
inline void tq_reduce_slices_add(threadgroup float* v, threadgroup const float* part,
                                 TqReduceSlices s, uint d) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (s.slice == 0u) {
    for (uint j = s.j0; j < d; j += s.jstep) v[j] = tq_reduce_slice_sum(part, s, d, j);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// tq_reduce_slices_add for two vectors at once (one pair of barriers): v from part, w from
// part2.
inline void tq_reduce_slices_add2(threadgroup float* v, threadgroup const float* part,
                                  threadgroup float* w, threadgroup const float* part2,
                                  TqReduceSlices s, uint d) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (s.slice == 0u) {
    for (uint j = s.j0; j < d; j += s.jstep) {
      v[j] = tq_reduce_slice_sum(part, s, d, j);
      w[j] = tq_reduce_slice_sum(part2, s, d, j);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// max (op 0) or sum (op 1) of x over the threadgroup; red: ceil(nthreads / 32) floats. Every
// thread gets the result; red may be reused after the call.
inline float tq_group_reduce(float x, uint op, threadgroup float* red, uint tid, uint nthreads) {
  x = op == 0u ? simd_max(x) : simd_sum(x);
  if (tid % TQ_SIMD_WIDTH == 0u) red[tid / TQ_SIMD_WIDTH] = x;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint nsimd = (nthreads + TQ_SIMD_WIDTH - 1u) / TQ_SIMD_WIDTH;
  float r = red[0];
  for (uint s = 1u; s < nsimd; ++s) r = op == 0u ? max(r, red[s]) : r + red[s];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return r;
}

// The blocks of query head h·G + g merged, unnormalised: v[j] = Σ_b acc_b[j]·e^(m_b - M)
// (rotated domain) with M = max_b m_b, returned with M in mmax and Σ_b l_b·e^(m_b - M) in
// lsum. The threads share the blocks' statistics (max, then weights and total), then each
// sums its coordinates over the blocks. tg: TQ_REDUCE_GROUP_FLOATS floats (v first).
inline void tq_attention_reduce_blocks(device const float* part_m, device const float* part_l,
                                       device const float* part_acc, uint d, uint G, uint nb,
                                       threadgroup float* tg, uint g, uint head, uint tid,
                                       uint nthreads, thread float& mmax, thread float& lsum) {
  threadgroup float* v = tg;
  threadgroup float* eb = tg + 512u;
  threadgroup float* red = eb + TQ_REDUCE_CACHED_BLOCKS;
  const bool cached = nb <= TQ_REDUCE_CACHED_BLOCKS;
  const ulong base = ulong(head) * nb * G + g;  // part_m index of block 0
  float m = -INFINITY;
  for (uint b = tid; b < nb; b += nthreads) m = max(m, part_m[base + ulong(b) * G]);
  mmax = tq_group_reduce(m, 0u, red, tid, nthreads);
  float l = 0.0f;
  for (uint b = tid; b < nb; b += nthreads) {
    const float e = exp(part_m[base + ulong(b) * G] - mmax);
    if (cached) eb[b] = e;
    l += part_l[base + ulong(b) * G] * e;
  }
  lsum = tq_group_reduce(l, 1u, red, tid, nthreads);  // barrier: eb is set
  // Each slice sums its own run of blocks (tq_reduce_slices): more loads in flight.
  const TqReduceSlices sl = tq_reduce_slices(d, tid, nthreads);
  threadgroup float* part = red + 32u;
  const uint b0 = tq_slice_begin(nb, sl.slice, sl.count);
  const uint b1 = tq_slice_begin(nb, sl.slice + 1u, sl.count);
  for (uint j = sl.j0; j < d; j += sl.jstep) {
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;  // four independent chains of loads
    uint b = b0;
    for (; b + 4u <= b1; b += 4u) {
      const ulong r = (base + ulong(b) * G) * d + j, s = ulong(G) * d;
      const float e0 = cached ? eb[b] : exp(part_m[base + ulong(b) * G] - mmax);
      const float e1 = cached ? eb[b + 1u] : exp(part_m[base + ulong(b + 1u) * G] - mmax);
      const float e2 = cached ? eb[b + 2u] : exp(part_m[base + ulong(b + 2u) * G] - mmax);
      const float e3 = cached ? eb[b + 3u] : exp(part_m[base + ulong(b + 3u) * G] - mmax);
      a0 += part_acc[r] * e0;
      a1 += part_acc[r + s] * e1;
      a2 += part_acc[r + 2u * s] * e2;
      a3 += part_acc[r + 3u * s] * e3;
    }
    for (; b < b1; ++b) {
      const float e = cached ? eb[b] : exp(part_m[base + ulong(b) * G] - mmax);
      a0 += part_acc[(base + ulong(b) * G) * d + j] * e;
    }
    tq_reduce_slices_put(v, part, sl, d, j, (a0 + a1) + (a2 + a3));
  }
  if (sl.count > 1u) tq_reduce_slices_add(v, part, sl, d);
}

// out[(h·G + g)·dim + j]: the attention output of query head h·G + g: the merged blocks
// divided by the total weight and, for a hadamard value rotation, rotated back by Π_Vᵀ.
// tg: TQ_REDUCE_GROUP_FLOATS floats. nthreads: a power of two, at most 1024 (more than dim:
// slices, tq_reduce_slices).
inline void tq_attention_reduce_body(device const float* part_m, device const float* part_l,
                                     device const float* part_acc, TQ_TABLE float* v_signs,
                                     device float* out, TQ_PARAMS TqReduceParams& p,
                                     threadgroup float* tg, uint g, uint head, uint tid,
                                     uint nthreads) {
  const uint d = p.dim, G = p.group;
  if (g >= G) return;  // uniform over the threadgroup
  threadgroup float* v = tg;
  float mmax, lsum;
  tq_attention_reduce_blocks(part_m, part_l, part_acc, d, G, p.num_blocks, tg, g, head, tid,
                             nthreads, mmax, lsum);
  const float inv = 1.0f / lsum;
  for (uint j = tid; j < d; j += nthreads) v[j] = v[j] * inv;
  if (p.inverse_rotate != 0u) tq_hadamard_inverse_simd(v, v_signs, d, tid, nthreads);
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
  threadgroup float tg[TQ_REDUCE_GROUP_FLOATS];
  tq_attention_reduce_body(part_m, part_l, part_acc, v_signs, out, p, tg, tg_pos.x, tg_pos.y, tid,
                           nthreads);
}
#endif
#endif  // TQ_METAL_ATTENTION
