// Decode attention on compressed codes, register-tiled (the fast path of tq_attention_block
// and tq_split_attention_block: same partial outputs, merged by tq_attention_reduce):
//   one threadgroup per (block of tokens, KV head), as those kernels' blocks
//   (tq_tiles_per_block). It rotates the G raw queries itself (Π_K q: tq_hadamard_forward, or
//   per half for split keys), so no query-rotation launch is needed. Then L = D / C
//   consecutive lanes form a "stream" that takes one token at a time: each lane owns C
//   coordinates of the G queries and of the G running value sums, in registers; it unpacks
//   its C key indices from one 64-bit word (its C·bits bits are whole bytes), scores them
//   against its coordinates, the L lanes add their partial scores by butterfly, and each
//   stream keeps its own online softmax (running max m, sum l, value sums acc). The streams
//   of a simd-group, then the simd-groups (through threadgroup memory), are merged by the
//   same online-softmax rule, and the block's (m, l, acc) is written as
//   tq_attention_block_finish writes it.
// Split keys (SPLIT, split.metal's row: angle code, then the outlier half's indices at KB0
// bits, then the inlier half's at KB1): lanes [0, L/2) of a stream hold the outlier half,
// the others the inlier half; a lane's partial score is weighted by cos φ̃ or sin φ̃ of the
// token's angle code before the butterfly.
// Compile-time shape: D (head_dim), GM (query heads per pass, >= the group), C (coordinates
// per lane; C·bits a multiple of 8 and at most 64 for each of KB0, KB1, VB), U (tokens a
// stream loads at once, their loads in flight together). Every
// simd-group function runs in simd-group-uniform control flow (a stream whose token is past
// the block's end still takes part in the butterflies).
#ifndef TQ_METAL_ATTENTION_FAST
#define TQ_METAL_ATTENTION_FAST
#ifndef TQ_SINGLE_SOURCE
#include "attention.metal"
#include "split.metal"
#endif

// Threadgroup scratch (floats): the codebooks (tables = 2^KB0 [+ 2^KB1] + 2^VB), then the
// queries (GM·D) or, once they are in registers, the states of simd-groups 1.. for the merge.
inline uint tq_attention_fast_scratch_floats(uint dim, uint gm, uint tables, uint nthreads) {
  const uint queries = gm * dim;
  const uint merge = (nthreads / TQ_SIMD_WIDTH - 1u) * gm * (dim + 2u);
  return tables + (queries > merge ? queries : merge);
}

// The staged variant adds two stage buffers of R x nthreads words after that.
inline uint tq_attention_staged_scratch_floats(uint dim, uint gm, uint tables, uint nthreads,
                                               uint r) {
  return tq_attention_fast_scratch_floats(dim, gm, tables, nthreads) + 2u * r * nthreads;
}

// Weights of an online-softmax merge of states with maxima m and mo: the new max mn and the
// factors e^(m - mn), e^(mo - mn); a state that saw no token (max -inf) weighs 0.
inline void tq_softmax_merge_weights(float m, float mo, thread float& mn, thread float& a,
                                     thread float& b) {
  mn = max(m, mo);
  a = m == -INFINITY ? 0.0f : exp(m - mn);
  b = mo == -INFINITY ? 0.0f : exp(mo - mn);
}

// One token of a stream: the lane's C key indices (kw) scored against its query
// coordinates, the L lanes' partial scores added by butterfly (every lane of the simd-group
// takes part, live or not), then, for a live token, the stream's online softmax and value
// sums updated with the lane's C value indices (vw). kn, vn: the token's norms; f: the split
// angle's weight of this lane's half (1 for plain keys).
template <uint L, uint GM, uint C, uint VB, uint SPLIT>
inline void tq_fast_token(ulong kw, ulong vw, float kn, float vn, float f, bool live, uint kb,
                          uint kmask, threadgroup const float* ckl, threadgroup const float* cv,
                          thread float (&qr)[GM][C], thread float (&m)[GM], thread float (&l)[GM],
                          thread float (&acc)[GM][C]) {
  float dot[GM];
  TQ_UNROLL for (uint g = 0u; g < GM; ++g) { dot[g] = 0.0f; }
  TQ_UNROLL for (uint c = 0u; c < C; ++c) {
    const float cent = ckl[uint(kw >> (c * kb)) & kmask];
    TQ_UNROLL for (uint g = 0u; g < GM; ++g) { dot[g] += qr[g][c] * cent; }
  }
  if (SPLIT != 0u) {
    TQ_UNROLL for (uint g = 0u; g < GM; ++g) { dot[g] *= f; }
  }
  TQ_UNROLL for (uint off = L / 2u; off >= 1u; off >>= 1u) {
    TQ_UNROLL for (uint g = 0u; g < GM; ++g) { dot[g] += simd_shuffle_xor(dot[g], ushort(off)); }
  }
  if (!live) return;
  float pv[GM];
  TQ_UNROLL for (uint g = 0u; g < GM; ++g) {
    const float sc = dot[g] * kn;
    if (sc > m[g]) {  // a new running max: rescale the state
      const float c = exp(m[g] - sc);
      l[g] *= c;
      TQ_UNROLL for (uint j = 0u; j < C; ++j) { acc[g][j] *= c; }
      m[g] = sc;
    }
    const float e = exp(sc - m[g]);
    l[g] += e;
    pv[g] = e * vn;
  }
  TQ_UNROLL for (uint c = 0u; c < C; ++c) {
    const float cent = cv[uint(vw >> (c * VB)) & ((1u << VB) - 1u)];
    TQ_UNROLL for (uint g = 0u; g < GM; ++g) { acc[g][c] += pv[g] * cent; }
  }
}

// The n <= MAXB bytes at p (device or threadgroup memory) as one little-endian word: a
// lane's code indices.
template <uint MAXB, class P>
inline ulong tq_lane_word(P p, uint n) {
  ulong w = 0ul;
  TQ_UNROLL for (uint b = 0u; b < MAXB; ++b) {
    if (b < n) w |= ulong(p[b]) << (8u * b);
  }
  return w;
}

// A lane's place in the register-tiled kernels: its stream's sub-lane, the key half it holds
// (split keys), that half's bits, index mask, centroids and byte offset within a key row.
struct TqFastLane {
  uint sub, stream, streams, first_stream, hi, kb, kmask, k_lane_bytes, k_offset;
  threadgroup const float* ckl;
};

// The common start of the register-tiled kernels: the codebooks and the GM x C query
// registers (the G raw queries rotated in threadgroup memory, scaled), the state cleared.
// Returns the lane's place; qs = the query scratch (later the merge's).
template <uint D, uint GM, uint C, uint KB0, uint KB1, uint VB, uint SPLIT>
inline TqFastLane tq_fast_setup(device const float* q, TQ_TABLE float* k_signs,
                                TQ_TABLE float* k_centroids, TQ_TABLE float* v_centroids,
                                TQ_PARAMS TqSplitAttnParams& p, threadgroup float* tg,
                                threadgroup float* qs, uint head, uint tid, uint nthreads,
                                thread float (&qr)[GM][C], thread float (&m)[GM],
                                thread float (&l)[GM], thread float (&acc)[GM][C]) {
  constexpr uint L = D / C;
  constexpr uint NK0 = 1u << KB0, NK1 = SPLIT != 0u ? 1u << KB1 : 0u, NV = 1u << VB;
  const uint G = p.group;
  threadgroup float* ck = tg;  // outlier (or only) part's centroids, then the inlier part's
  threadgroup float* cv = tg + NK0 + NK1;
  for (uint i = tid; i < NK0 + NK1; i += nthreads) ck[i] = k_centroids[i];
  for (uint i = tid; i < NV; i += nthreads) cv[i] = v_centroids[i];
  for (uint i = tid; i < G * D; i += nthreads) qs[i] = q[ulong(head) * G * D + i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint g = 0u; g < G; ++g) {
    if (SPLIT != 0u) {
      tq_hadamard_forward_blocks(qs + g * D, k_signs, D, D / 2u, tid, nthreads);
    } else {
      tq_hadamard_forward(qs + g * D, k_signs, D, tid, nthreads);
    }
  }
  TqFastLane ln;
  const uint lane = tid % TQ_SIMD_WIDTH;
  ln.sub = lane % L;
  ln.stream = tid / L;
  ln.streams = nthreads / L;
  ln.first_stream = (tid / TQ_SIMD_WIDTH) * (TQ_SIMD_WIDTH / L);  // of this simd-group
  ln.hi = SPLIT != 0u && ln.sub >= L / 2u ? 1u : 0u;
  ln.kb = ln.hi != 0u ? KB1 : KB0;
  ln.kmask = (1u << ln.kb) - 1u;
  ln.ckl = ck + (ln.hi != 0u ? NK0 : 0u);
  ln.k_lane_bytes = C * ln.kb / 8u;
  ln.k_offset = SPLIT != 0u ? p.angle_bytes + (ln.hi != 0u ? (D / 2u) * KB0 / 8u +
                                                                 (ln.sub - L / 2u) * ln.k_lane_bytes
                                                           : ln.sub * ln.k_lane_bytes)
                            : ln.sub * ln.k_lane_bytes;
  TQ_UNROLL for (uint g = 0u; g < GM; ++g) {
    TQ_UNROLL for (uint c = 0u; c < C; ++c) {
      qr[g][c] = g < G ? p.scale * qs[g * D + ln.sub * C + c] : 0.0f;
    }
  }
  TQ_UNROLL for (uint g = 0u; g < GM; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
    TQ_UNROLL for (uint c = 0u; c < C; ++c) { acc[g][c] = 0.0f; }
  }
  return ln;
}

// The common end: the streams of each simd-group (lanes sub, sub + L, ...), then the
// simd-groups (1.. through the scratch qs), merged by the online-softmax rule; simd-group
// 0's first stream writes the block's (m, l, acc) as tq_attention_block_finish writes it.
template <uint D, uint GM, uint C>
inline void tq_fast_finish(thread float (&m)[GM], thread float (&l)[GM],
                           thread float (&acc)[GM][C], uint G, uint sub, threadgroup float* qs,
                           device float* part_m, device float* part_l, device float* part_acc,
                           uint num_blocks, uint block, uint head, uint tid, uint nthreads) {
  constexpr uint L = D / C;
  const uint lane = tid % TQ_SIMD_WIDTH;
  TQ_UNROLL for (uint off = L; off < TQ_SIMD_WIDTH; off <<= 1u) {
    TQ_UNROLL for (uint g = 0u; g < GM; ++g) {
      const float mo = simd_shuffle_xor(m[g], ushort(off));
      const float lo = simd_shuffle_xor(l[g], ushort(off));
      float mn, a, b;
      tq_softmax_merge_weights(m[g], mo, mn, a, b);
      m[g] = mn;
      l[g] = l[g] * a + lo * b;
      TQ_UNROLL for (uint c = 0u; c < C; ++c) {
        acc[g][c] = acc[g][c] * a + simd_shuffle_xor(acc[g][c], ushort(off)) * b;
      }
    }
  }
  const uint simd = tid / TQ_SIMD_WIDTH, nsimd = nthreads / TQ_SIMD_WIDTH;
  threadgroup_barrier(mem_flags::mem_threadgroup);  // everyone is done with the scratch
  if (simd > 0u && lane < L) {
    threadgroup float* st = qs + (simd - 1u) * GM * (D + 2u);
    TQ_UNROLL for (uint g = 0u; g < GM; ++g) {
      if (g >= G) break;
      if (sub == 0u) {
        st[g] = m[g];
        st[GM + g] = l[g];
      }
      TQ_UNROLL for (uint c = 0u; c < C; ++c) { st[2u * GM + g * D + sub * C + c] = acc[g][c]; }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (simd != 0u || lane >= L) return;
  for (uint w = 1u; w < nsimd; ++w) {
    threadgroup const float* st = qs + (w - 1u) * GM * (D + 2u);
    TQ_UNROLL for (uint g = 0u; g < GM; ++g) {
      if (g >= G) break;
      float mn, a, b;
      tq_softmax_merge_weights(m[g], st[g], mn, a, b);
      m[g] = mn;
      l[g] = l[g] * a + st[GM + g] * b;
      TQ_UNROLL for (uint c = 0u; c < C; ++c) {
        acc[g][c] = acc[g][c] * a + st[2u * GM + g * D + sub * C + c] * b;
      }
    }
  }
  const ulong base = (ulong(head) * num_blocks + block) * G;
  TQ_UNROLL for (uint g = 0u; g < GM; ++g) {
    if (g >= G) break;
    if (sub == 0u) {
      part_m[base + g] = m[g];
      part_l[base + g] = l[g];
    }
    TQ_UNROLL for (uint c = 0u; c < C; ++c) { part_acc[(base + g) * D + sub * C + c] = acc[g][c]; }
  }
}

// Whether this instance serves the launch's shape, and the block's token range; false for a
// block past the end (uniform over the threadgroup).
template <uint D, uint GM, uint KB0, uint KB1, uint VB, uint SPLIT>
inline bool tq_fast_range(TQ_PARAMS TqSplitAttnParams& p, uint block, thread uint& t_begin,
                          thread uint& t_end) {
  const uint BT = p.block_tokens;
  const uint per = tq_tiles_per_block(p.tokens, BT, p.num_blocks);
  const uint tile0 = block * per;
  if (tile0 * BT >= p.tokens || p.group > GM || p.dim != D || p.k_bits != KB0 ||
      p.v_bits != VB || (SPLIT != 0u && (p.k_bits1 != KB1 || p.part_dim != D / 2u)))
    return false;
  t_begin = tile0 * BT;
  t_end = min((tile0 + per) * BT, p.tokens);
  return true;
}

#define TQ_FAST_STATIC_CHECKS()                                                                \
  static_assert(D % C == 0u && D / C <= TQ_SIMD_WIDTH, "a stream is at most one simd-group"); \
  static_assert((C * KB0) % 8u == 0u && (C * KB1) % 8u == 0u && (C * VB) % 8u == 0u,          \
                "a lane's indices are whole bytes");                                           \
  static_assert(C * KB0 <= 64u && C * KB1 <= 64u && C * VB <= 64u,                              \
                "a lane's indices fit one 64-bit word");                                       \
  static_assert(SPLIT == 0u || (D / C) % 2u == 0u, "split keys: half of a stream per half")

// p: the split parameter block (its first words are TqAttnParams'); for plain keys part_dim =
// dim, k_bits1 = k_bits, angle_bytes = 0. angles: the split's (cos, sin) table (unused plain).
template <uint D, uint GM, uint C, uint KB0, uint KB1, uint VB, uint SPLIT, uint U>
inline void tq_attention_fast_block_body(device const float* q, TQ_TABLE float* k_signs,
                                         device const uchar* k_codes, device const uchar* k_norms,
                                         device const uchar* v_codes, device const uchar* v_norms,
                                         TQ_TABLE float* k_centroids, TQ_TABLE float* v_centroids,
                                         device const float* angles, device float* part_m,
                                         device float* part_l, device float* part_acc,
                                         TQ_PARAMS TqSplitAttnParams& p, threadgroup float* tg,
                                         uint block, uint head, uint tid, uint nthreads) {
  TQ_FAST_STATIC_CHECKS();
  constexpr uint L = D / C;  // lanes per stream
  constexpr uint VCB = D * VB / 8u;  // value code bytes of a row
  constexpr uint NK0 = 1u << KB0, NK1 = SPLIT != 0u ? 1u << KB1 : 0u, NV = 1u << VB;
  uint t_begin = 0u, t_end = 0u;
  if (!tq_fast_range<D, GM, KB0, KB1, VB, SPLIT>(p, block, t_begin, t_end)) return;
  threadgroup float* cv = tg + NK0 + NK1;
  threadgroup float* qs = cv + NV;
  float qr[GM][C], m[GM], l[GM], acc[GM][C];
  const TqFastLane ln = tq_fast_setup<D, GM, C, KB0, KB1, VB, SPLIT>(
      q, k_signs, k_centroids, v_centroids, p, tg, qs, head, tid, nthreads, qr, m, l, acc);

  const ulong row0 = ulong(head) * p.head_stride;
  // U tokens per stream and step: their codes are all requested before the first is scored
  // (U loads in flight per lane). The simd-group runs while its first stream (the one with
  // the most tokens) has a token.
  for (uint t0 = t_begin; t0 + ln.first_stream < t_end; t0 += U * ln.streams) {
    ulong kw[U], vw[U];
    float kn[U], vn[U], f[U];
    bool live[U];
    TQ_UNROLL for (uint u = 0u; u < U; ++u) {
      const uint t = t0 + u * ln.streams + ln.stream;
      live[u] = t < t_end;
      kw[u] = 0ul;
      vw[u] = 0ul;
      kn[u] = vn[u] = 0.0f;
      f[u] = 1.0f;
      if (live[u]) {
        const ulong r = row0 + t;
        device const uchar* krow = k_codes + r * p.k_code_bytes;
        device const uchar* vp = v_codes + r * VCB + ln.sub * (C * VB / 8u);
        kw[u] = tq_lane_word<C * (KB0 > KB1 ? KB0 : KB1) / 8u>(krow + ln.k_offset, ln.k_lane_bytes);
        vw[u] = tq_lane_word<C * VB / 8u>(vp, C * VB / 8u);
        kn[u] = tq_load_norm(k_norms, r, p.norm_fp16);
        vn[u] = tq_load_norm(v_norms, r, p.norm_fp16);
        if (SPLIT != 0u) f[u] = angles[2u * tq_split_read_angle(krow, p.angle_bytes) + ln.hi];
      }
    }
    TQ_UNROLL for (uint u = 0u; u < U; ++u) {
      tq_fast_token<L, GM, C, VB, SPLIT>(kw[u], vw[u], kn[u], vn[u], f[u], live[u], ln.kb,
                                         ln.kmask, ln.ckl, cv, qr, m, l, acc);
    }
  }
  tq_fast_finish<D, GM, C>(m, l, acc, p.group, ln.sub, qs, part_m, part_l, part_acc,
                           p.num_blocks, block, head, tid, nthreads);
}

// --- The staged variant ----------------------------------------------------------------------
// The same streams and per-token arithmetic, but the codes reach the lanes through
// threadgroup memory: the threadgroup copies each tile of TT tokens (key rows, value rows, key
// norms, value norms: four runs of whole 4-byte words) with consecutive threads reading
// consecutive words, R words per thread held in registers, and the copy of the next tile is
// in flight while the streams score the current one (two stage buffers). A lane then reads
// its bytes from threadgroup memory. The host picks it where the tiles' words are aligned:
// TT divides the attention tile (block_tokens) and the head stride, TT is a multiple of 4,
// and R x nthreads words hold a tile (tq_fast_stage_words).

inline uint tq_fast_stage_words(uint tt, uint k_code_bytes, uint v_code_bytes, uint norm_fp16) {
  const uint nb = norm_fp16 != 0u ? 2u : 4u;
  return tt * (k_code_bytes + v_code_bytes + 2u * nb) / 4u;
}

template <uint TT, uint R>
inline void tq_fast_stage_load(thread uint (&w)[R], device const uchar* k_codes,
                               device const uchar* v_codes, device const uchar* k_norms,
                               device const uchar* v_norms, ulong r0, uint kcb, uint vcb,
                               uint nb, uint tid, uint nthreads) {
  const uint kwn = TT * kcb / 4u, vwn = TT * vcb / 4u, nwn = TT * nb / 4u;
  device const uint* kp = (device const uint*)(k_codes + r0 * kcb);
  device const uint* vp = (device const uint*)(v_codes + r0 * vcb);
  device const uint* knp = (device const uint*)(k_norms + r0 * nb);
  device const uint* vnp = (device const uint*)(v_norms + r0 * nb);
  TQ_UNROLL for (uint r = 0u; r < R; ++r) {
    uint i = tid + r * nthreads;
    uint x = 0u;
    if (i < kwn) {
      x = kp[i];
    } else if ((i -= kwn) < vwn) {
      x = vp[i];
    } else if ((i -= vwn) < nwn) {
      x = knp[i];
    } else if ((i -= nwn) < nwn) {
      x = vnp[i];
    }
    w[r] = x;
  }
}

template <uint D, uint GM, uint C, uint KB0, uint KB1, uint VB, uint SPLIT, uint TT, uint R>
inline void tq_attention_staged_block_body(device const float* q, TQ_TABLE float* k_signs,
                                           device const uchar* k_codes,
                                           device const uchar* k_norms,
                                           device const uchar* v_codes,
                                           device const uchar* v_norms,
                                           TQ_TABLE float* k_centroids,
                                           TQ_TABLE float* v_centroids, device const float* angles,
                                           device float* part_m, device float* part_l,
                                           device float* part_acc, TQ_PARAMS TqSplitAttnParams& p,
                                           threadgroup float* tg, uint block, uint head, uint tid,
                                           uint nthreads) {
  TQ_FAST_STATIC_CHECKS();
  static_assert(TT % 4u == 0u, "a tile's runs are whole words");
  constexpr uint L = D / C;
  constexpr uint VCB = D * VB / 8u;
  constexpr uint NK0 = 1u << KB0, NK1 = SPLIT != 0u ? 1u << KB1 : 0u, NV = 1u << VB;
  uint t_begin = 0u, t_end = 0u;
  if (!tq_fast_range<D, GM, KB0, KB1, VB, SPLIT>(p, block, t_begin, t_end)) return;
  threadgroup float* cv = tg + NK0 + NK1;
  threadgroup float* qs = cv + NV;
  const uint merge = (nthreads / TQ_SIMD_WIDTH - 1u) * GM * (D + 2u);
  threadgroup uint* stage = (threadgroup uint*)(qs + (GM * D > merge ? GM * D : merge));
  const uint sw = R * nthreads;  // words of one stage buffer
  float qr[GM][C], m[GM], l[GM], acc[GM][C];
  const TqFastLane ln = tq_fast_setup<D, GM, C, KB0, KB1, VB, SPLIT>(
      q, k_signs, k_centroids, v_centroids, p, tg, qs, head, tid, nthreads, qr, m, l, acc);

  const uint kcb = p.k_code_bytes, nb = p.norm_fp16 != 0u ? 2u : 4u;
  const ulong row0 = ulong(head) * p.head_stride;
  uint w[R];
  tq_fast_stage_load<TT, R>(w, k_codes, v_codes, k_norms, v_norms, row0 + t_begin, kcb, VCB, nb,
                            tid, nthreads);
  TQ_UNROLL for (uint r = 0u; r < R; ++r) { stage[tid + r * nthreads] = w[r]; }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint per_stream = (TT + ln.streams - 1u) / ln.streams;
  uint buf = 0u;
  for (uint t0 = t_begin; t0 < t_end; t0 += TT) {
    const bool next = t0 + TT < t_end;
    if (next) {  // uniform: the next tile's words in flight during this tile's arithmetic
      tq_fast_stage_load<TT, R>(w, k_codes, v_codes, k_norms, v_norms, row0 + t0 + TT, kcb, VCB,
                                nb, tid, nthreads);
    }
    threadgroup const uchar* sb = (threadgroup const uchar*)(stage + buf * sw);
    threadgroup const uchar* svc = sb + TT * kcb;
    threadgroup const uchar* skn = svc + TT * VCB;
    threadgroup const uchar* svn = skn + TT * nb;
    for (uint j = 0u; j < per_stream; ++j) {
      const uint tt = ln.stream + j * ln.streams;
      const bool live = tt < TT && t0 + tt < t_end;
      ulong kw = 0ul, vw = 0ul;
      float kn = 0.0f, vn = 0.0f, f = 1.0f;
      if (live) {
        threadgroup const uchar* krow = sb + tt * kcb;
        threadgroup const uchar* vp = svc + tt * VCB + ln.sub * (C * VB / 8u);
        kw = tq_lane_word<C * (KB0 > KB1 ? KB0 : KB1) / 8u>(krow + ln.k_offset, ln.k_lane_bytes);
        vw = tq_lane_word<C * VB / 8u>(vp, C * VB / 8u);
        if (nb == 2u) {
          kn = tq_half_bits_to_float(((threadgroup const ushort*)skn)[tt]);
          vn = tq_half_bits_to_float(((threadgroup const ushort*)svn)[tt]);
        } else {
          kn = ((threadgroup const float*)skn)[tt];
          vn = ((threadgroup const float*)svn)[tt];
        }
        if (SPLIT != 0u) {
          f = angles[2u * tq_split_read_angle(krow, p.angle_bytes) + ln.hi];
        }
      }
      tq_fast_token<L, GM, C, VB, SPLIT>(kw, vw, kn, vn, f, live, ln.kb, ln.kmask, ln.ckl, cv, qr,
                                         m, l, acc);
    }
    if (next) {
      TQ_UNROLL for (uint r = 0u; r < R; ++r) { stage[(1u - buf) * sw + tid + r * nthreads] = w[r]; }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    buf = 1u - buf;
  }
  tq_fast_finish<D, GM, C>(m, l, acc, p.group, ln.sub, qs, part_m, part_l, part_acc,
                           p.num_blocks, block, head, tid, nthreads);
}

// --- The reduce, merged with attention over fp16 rows ---------------------------------------
// The decode step of a cache that keeps some tokens as fp16 rows (sinks, recent window):
// tq_attention_reduce's merge of the code blocks, then two sets of fp16 rows (a, b) under the
// same softmax, in one launch: out = (Σ_codes + Σ_rows e^(s - M)·v) / (L_codes + Σ_rows e^(s - M)).
// Rows are fp16 bits, (kv_heads, stride, dim) per set, the first `rows` of each head used;
// q holds the original-domain queries (kv_heads·G, dim), fp32.
struct TqReduceRowsParams {
  uint dim;
  uint num_blocks;      // code blocks (0: no codes)
  uint group;
  uint inverse_rotate;  // 1: apply Π_Vᵀ (hadamard) to the code part
  uint rows_a;
  uint stride_a;
  uint rows_b;
  uint stride_b;
  float scale;
};

#define TQ_REDUCE_ROWS_CHUNK 128u
#define TQ_REDUCE_ROWS_BATCH 8u
#define TQ_REDUCE_SCORE_BATCH 4u
// The rows' scratch after the reduce's: the chunk's weights, the first chunk's row sums (dim
// <= 512) and their slices' sums.
#define TQ_REDUCE_ROWS_FLOATS \
  (TQ_REDUCE_GROUP_FLOATS + TQ_REDUCE_ROWS_CHUNK + 512u + TQ_REDUCE_SLICE_FLOATS)

// Two sets of fp16 rows of one KV head read as one: rows [0, na) of set a, then set b's.
struct TqRowSets {
  device const ushort* a;
  device const ushort* b;
  ulong first_a;  // the head's first row in each set
  ulong first_b;
  uint na;
  uint d;
};

inline device const ushort* tq_row(TqRowSets s, uint r) {
  return r < s.na ? s.a + (s.first_a + r) * s.d : s.b + (s.first_b + (r - s.na)) * s.d;
}

// sc[i] = scale · q·k(r0 + i) for i < n, a simd-group a row (simd, simd + nsimd, ...), four at
// a time so that their loads are in flight together (each row's sum in the same order as
// alone). Returns the maximum of the scores this thread's simd-group wrote (-inf if none).
inline float tq_score_rows(device const float* qrow, TqRowSets k, uint r0, uint n, float scale,
                           threadgroup float* sc, uint lane, uint simd, uint nsimd) {
  float mloc = -INFINITY;
  for (uint r = simd; r < n; r += TQ_REDUCE_SCORE_BATCH * nsimd) {
    float s[TQ_REDUCE_SCORE_BATCH];
    TQ_UNROLL for (uint u = 0u; u < TQ_REDUCE_SCORE_BATCH; ++u) {
      const uint rr = r + u * nsimd;  // uniform over the simd-group
      s[u] = 0.0f;
      if (rr < n) {
        device const ushort* kr = tq_row(k, r0 + rr);
        for (uint j = lane; j < k.d; j += TQ_SIMD_WIDTH) {
          s[u] += qrow[j] * tq_half_bits_to_float(kr[j]);
        }
      }
    }
    TQ_UNROLL for (uint u = 0u; u < TQ_REDUCE_SCORE_BATCH; ++u) {
      const uint rr = r + u * nsimd;
      const float t = simd_sum(s[u]) * scale;
      if (rr < n) {
        mloc = max(mloc, t);
        if (lane == 0u) sc[rr] = t;
      }
    }
  }
  return mloc;
}

// acc + Σ_{i in [q0, q1)} w[i] · v(r0 + i)[j], in row order, eight rows' loads in flight
// before their products (a row at a time, each load would be waited for alone).
inline float tq_weight_rows(TqRowSets v, uint r0, uint q0, uint q1, uint j,
                            threadgroup const float* w, float acc) {
  uint r = q0;
  for (; r + TQ_REDUCE_ROWS_BATCH <= q1; r += TQ_REDUCE_ROWS_BATCH) {
    float x[TQ_REDUCE_ROWS_BATCH];
    TQ_UNROLL for (uint u = 0u; u < TQ_REDUCE_ROWS_BATCH; ++u) {
      x[u] = tq_half_bits_to_float(tq_row(v, r0 + r + u)[j]);
    }
    TQ_UNROLL for (uint u = 0u; u < TQ_REDUCE_ROWS_BATCH; ++u) acc += w[r + u] * x[u];
  }
  for (; r < q1; ++r) acc += w[r] * tq_half_bits_to_float(tq_row(v, r0 + r)[j]);
  return acc;
}

// Folds rows [first_row, rows) of the row sets into the running (M, lsum, v): chunks of
// TQ_REDUCE_ROWS_CHUNK rows, scored one simd-group per row, then weighted into v (thread per
// coordinate and slice). red: 32 floats, then TQ_REDUCE_SLICE_FLOATS for the slices' sums.
inline void tq_attention_merge_rows(device const float* qrow, TqRowSets k, TqRowSets vals,
                                    uint first_row, uint rows, float scale, threadgroup float* v,
                                    threadgroup float* sc, threadgroup float* red,
                                    thread float& M, thread float& lsum, uint tid,
                                    uint nthreads) {
  const uint lane = tid % TQ_SIMD_WIDTH, simd = tid / TQ_SIMD_WIDTH;
  const uint nsimd = (nthreads + TQ_SIMD_WIDTH - 1u) / TQ_SIMD_WIDTH;  // a group of 16 is one
  const uint d = k.d;
  const TqReduceSlices sl = tq_reduce_slices(d, tid, nthreads);
  threadgroup float* part = red + 32u;
  for (uint r0 = first_row; r0 < rows; r0 += TQ_REDUCE_ROWS_CHUNK) {
    const uint nr = min(TQ_REDUCE_ROWS_CHUNK, rows - r0);
    const float mloc = tq_score_rows(qrow, k, r0, nr, scale, sc, lane, simd, nsimd);
    const float mn = max(M, tq_group_reduce(mloc, 0u, red, tid, nthreads));  // barrier: sc set
    const float a = M == -INFINITY ? 0.0f : exp(M - mn);
    float ls = 0.0f;
    for (uint r = tid; r < nr; r += nthreads) {
      const float e = exp(sc[r] - mn);
      sc[r] = e;
      ls += e;
    }
    lsum = lsum * a + tq_group_reduce(ls, 1u, red, tid, nthreads);  // barrier: sc is set
    M = mn;
    // Each slice (tq_reduce_slices) weights its own run of the chunk's rows; slice 0 starts
    // from the running v.
    const uint q0 = tq_slice_begin(nr, sl.slice, sl.count);
    const uint q1 = tq_slice_begin(nr, sl.slice + 1u, sl.count);
    for (uint j = sl.j0; j < d; j += sl.jstep) {
      const float acc = tq_weight_rows(vals, r0, q0, q1, j, sc, sl.slice == 0u ? v[j] * a : 0.0f);
      tq_reduce_slices_put(v, part, sl, d, j, acc);
    }
    if (sl.count > 1u) tq_reduce_slices_add(v, part, sl, d);
    threadgroup_barrier(mem_flags::mem_threadgroup);  // sc is rewritten by the next chunk
  }
}

// The output of a reduce: float32 rows, or a decode step's rows as the model takes them
// (TqOutWords): 16-bit words of fp16 or bfloat16, the value mean of the KV head added first
// where one is given (mean[h·dim + j]), each rounded once as mlx's (out + mean).astype()
// rounds. The product and the sum are rounded on their own (TQ_MUL_RN: CUDA would fuse them).
struct TqOutWords {
  device ushort* words;
  device const float* mean;
  uint bf16, with_mean;
};

inline void tq_out_store(device float* out, ulong i, uint head, uint j, uint d, float x) {
  (void)head, (void)j, (void)d;
  out[i] = x;
}

inline void tq_out_store(thread const TqOutWords& out, ulong i, uint head, uint j, uint d,
                         float x) {
  out.words[i] = tq_float_to_word(out.with_mean != 0u ? x + out.mean[head * d + j] : x, out.bf16);
}

// One threadgroup per (query head g of the group, KV head): out[(h·G + g)·dim + j].
// The code blocks and the first TQ_REDUCE_ROWS_CHUNK fp16 rows (set a's, then set b's) go
// through one softmax pass: the rows are scored while the blocks' maxima load, one max and one
// sum over both, then each thread sums its coordinates over the blocks (rotated: Π_Vᵀ after)
// and over the rows. Rows past the first chunk are folded in after (tq_attention_merge_rows).
// tg: TQ_REDUCE_ROWS_FLOATS floats. nthreads: a power of two, at most 1024 (more than dim:
// slices, tq_reduce_slices).
template <class O>
inline void tq_attention_reduce_rows_body(device const float* part_m, device const float* part_l,
                                          device const float* part_acc, TQ_TABLE float* v_signs,
                                          device const float* q, device const ushort* k_a,
                                          device const ushort* v_a, device const ushort* k_b,
                                          device const ushort* v_b, O out,
                                          TQ_PARAMS TqReduceRowsParams& p, threadgroup float* tg,
                                          uint g, uint head, uint tid, uint nthreads) {
  const uint d = p.dim, G = p.group, nb = p.num_blocks;
  if (g >= G) return;  // uniform over the threadgroup
  threadgroup float* v = tg;  // the blocks' sums, then the output
  threadgroup float* eb = tg + 512u;
  threadgroup float* red = eb + TQ_REDUCE_CACHED_BLOCKS;
  threadgroup float* part = red + 32u;
  threadgroup float* sc = tg + TQ_REDUCE_GROUP_FLOATS;  // the chunk's scores, then weights
  threadgroup float* vr = sc + TQ_REDUCE_ROWS_CHUNK;     // the first chunk's row sums
  threadgroup float* part2 = vr + 512u;
  const uint lane = tid % TQ_SIMD_WIDTH, simd = tid / TQ_SIMD_WIDTH;
  const uint nsimd = (nthreads + TQ_SIMD_WIDTH - 1u) / TQ_SIMD_WIDTH;  // a group of 16 is one
  const uint na = p.rows_a, nrows = p.rows_a + p.rows_b;
  const uint n0 = min(nrows, TQ_REDUCE_ROWS_CHUNK);  // rows of the fused pass
  const ulong first_a = ulong(head) * p.stride_a, first_b = ulong(head) * p.stride_b;
  const TqRowSets keys = {k_a, k_b, first_a, first_b, na, d};
  const TqRowSets vals = {v_a, v_b, first_a, first_b, na, d};
  device const float* qrow = q + (ulong(head) * G + g) * d;
  const bool cached = nb <= TQ_REDUCE_CACHED_BLOCKS;
  const ulong base = ulong(head) * nb * G + g;  // part_m index of block 0

  // The blocks' maximum and the first chunk's scores (a simd-group a row, four in flight).
  float mloc = -INFINITY;
  for (uint b = tid; b < nb; b += nthreads) mloc = max(mloc, part_m[base + ulong(b) * G]);
  mloc = max(mloc, tq_score_rows(qrow, keys, 0u, n0, p.scale, sc, lane, simd, nsimd));
  const float M0 = tq_group_reduce(mloc, 0u, red, tid, nthreads);  // barrier: sc is set
  // The weights e^(m - M0) of blocks and rows, and their total.
  float lloc = 0.0f;
  for (uint b = tid; b < nb; b += nthreads) {
    const float e = exp(part_m[base + ulong(b) * G] - M0);
    if (cached) eb[b] = e;
    lloc += part_l[base + ulong(b) * G] * e;
  }
  for (uint r = tid; r < n0; r += nthreads) {
    const float e = exp(sc[r] - M0);
    sc[r] = e;
    lloc += e;
  }
  float lsum = tq_group_reduce(lloc, 1u, red, tid, nthreads);  // barrier: eb, sc are set
  float M = M0;
  // Each slice sums its own run of the blocks (rotated domain, four chains of loads) and of
  // the rows (eight rows' loads in flight), in the order of one slice.
  const TqReduceSlices sl = tq_reduce_slices(d, tid, nthreads);
  const uint b0 = tq_slice_begin(nb, sl.slice, sl.count);
  const uint b1 = tq_slice_begin(nb, sl.slice + 1u, sl.count);
  const uint q0 = tq_slice_begin(n0, sl.slice, sl.count);
  const uint q1 = tq_slice_begin(n0, sl.slice + 1u, sl.count);
  for (uint j = sl.j0; j < d; j += sl.jstep) {
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    uint b = b0;
    for (; b + 4u <= b1; b += 4u) {
      const ulong r = (base + ulong(b) * G) * d + j, st = ulong(G) * d;
      const float e0 = cached ? eb[b] : exp(part_m[base + ulong(b) * G] - M0);
      const float e1 = cached ? eb[b + 1u] : exp(part_m[base + ulong(b + 1u) * G] - M0);
      const float e2 = cached ? eb[b + 2u] : exp(part_m[base + ulong(b + 2u) * G] - M0);
      const float e3 = cached ? eb[b + 3u] : exp(part_m[base + ulong(b + 3u) * G] - M0);
      a0 += part_acc[r] * e0;
      a1 += part_acc[r + st] * e1;
      a2 += part_acc[r + 2u * st] * e2;
      a3 += part_acc[r + 3u * st] * e3;
    }
    for (; b < b1; ++b) {
      const float e = cached ? eb[b] : exp(part_m[base + ulong(b) * G] - M0);
      a0 += part_acc[(base + ulong(b) * G) * d + j] * e;
    }
    tq_reduce_slices_put(v, part, sl, d, j, (a0 + a1) + (a2 + a3));
    const float acc = tq_weight_rows(vals, 0u, q0, q1, j, sc, 0.0f);
    tq_reduce_slices_put(vr, part2, sl, d, j, acc);
  }
  if (sl.count > 1u) tq_reduce_slices_add2(v, part, vr, part2, sl, d);
  // Π_Vᵀ on the blocks' sums (barriers before and after), then the rows' sums added.
  if (nb > 0u && p.inverse_rotate != 0u) {
    tq_hadamard_inverse_simd(v, v_signs, d, tid, nthreads);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (uint j = tid; j < d; j += nthreads) v[j] += vr[j];
  // The rows past the first chunk, in row order (set a's, then set b's).
  if (nrows > n0) {
    threadgroup_barrier(mem_flags::mem_threadgroup);  // sc and v are free / complete
    tq_attention_merge_rows(qrow, keys, vals, n0, nrows, p.scale, v, sc, red, M, lsum, tid,
                            nthreads);
  }
  const float inv = 1.0f / lsum;
  for (uint j = tid; j < d; j += nthreads)
    tq_out_store(out, (ulong(head) * G + g) * d + j, head, j, d, TQ_MUL_RN(v[j], inv));
}

#endif  // TQ_METAL_ATTENTION_FAST
