// Decode attention on compressed codes with 16x8x16 matrix multiply-accumulates (fp16 in,
// fp32 accumulate): the same partial outputs as tq_attention_block and the register-tiled
// kernels, merged by tq_attention_reduce. On CUDA (sm_80 and later) each product is one
// tensor-core instruction (mma.sync); elsewhere (Metal, the C++ emulator) the same fragments
// are multiplied by a simd-group exchange (tq_mma_16816), so one source serves all targets.
//
// One threadgroup per (block of tokens, KV head), as the other block kernels. Each simd-group
// takes tiles of 16 tokens in turn. For a tile it computes the scores, transposed, Sᵀ (16
// tokens x query heads) = K̂ · Qᵀ, and then the value sums Oᵀ += V̂ᵀ · Pᵀ, where K̂ and V̂ are the
// tile's decoded (unit-norm) rows: a lane turns two code indices into two fp16 centroids with
// one lookup in a table of centroid pairs (2^(2·bits) words in threadgroup memory, one copy
// per lane for 2^(2·bits) <= 64 so that lanes never share a bank), straight into the fragment
// the multiply takes. Tokens and coordinates are the rows of A, so every row of every product
// is live and the query heads (G <= 8) are the 8 columns of B and D. Each simd-group copies
// its next tiles into a ring of threadgroup memory (tq_mma_stage) and rotates the queries with
// shuffles (tq_rotate_simd). The norms scale the scores (key) and the softmax weights (value);
// the online softmax runs in base 2 (the queries carry scale · log2 e).
//
// The coordinates of a head are dealt to the k dimension of the score products in a fixed
// order (attention is a sum over coordinates, so any order gives the same scores): in each
// part of the key row (the whole row, or the split's outlier and inlier halves) lane column
// tg = lane % 4 owns D / (4·parts) consecutive coordinates, 4 per product step, so a lane
// reads its codes as one run of bits. The value products deal coordinates to the 16 rows of
// V̂ᵀ the same way: lane row gr = lane / 4 owns the D / 8 consecutive coordinates gr·D/8 + j,
// two in each product. A lane's scores (tokens gr, gr + 8; query heads 2tg, 2tg + 1) reach
// the lanes whose B words of Pᵀ hold them by four shuffles a tile. Fragments (PTX
// mma.m16n8k16 .f16 layout, lane = 4·gr + tg): A (16 x 16) in words a0 = A[gr][2tg, 2tg+1],
// a1 = A[gr+8][..], a2 = A[gr][2tg+8, 2tg+9], a3 = A[gr+8][..]; B (16 x 8) in
// b0 = B[2tg, 2tg+1][gr], b1 = B[2tg+8, 2tg+9][gr]; C (16 x 8, fp32) c0, c1 = C[gr][2tg, 2tg+1],
// c2, c3 = C[gr+8][..]. A word's lower-indexed fp16 is its low half.
//
// Precision: the queries, centroids and softmax weights enter the products as fp16 (as in
// fp16 attention), sums are fp32; the result matches the fp32 kernels to about 1e-3 of the
// output's scale. A softmax weight times its value norm must stay below 65504 (fp16 norms
// always do). Compile-time shape: D (64, 128, 256), KB0, KB1, VB (1..4 bits), SPLIT (0: plain
// keys, else the split's angle bytes, 1 or 2), and NS, the stages of a simd-group's copy ring
// (tiles in flight: NS - 1).
#ifndef TQ_METAL_ATTENTION_MMA
#define TQ_METAL_ATTENTION_MMA
#ifndef TQ_SINGLE_SOURCE
#include "attention_fast.metal"
#endif

// Two floats as one word of two fp16 (round to nearest even), lo in the low half.
inline uint tq_pack_half2(float lo, float hi) {
#if defined(__CUDACC__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#elif defined(__METAL_VERSION__)
  return as_type<uint>(half2(lo, hi));
#else
  return uint(tq_float_to_half_bits(lo)) | (uint(tq_float_to_half_bits(hi)) << 16u);
#endif
}

// (hi:lo) >> sh, the low word (sh < 32).
inline uint tq_funnel_r(uint lo, uint hi, uint sh) {
#if defined(__CUDACC__)
  return __funnelshift_r(lo, hi, sh);
#else
  return sh == 0u ? lo : (lo >> sh) | (hi << (32u - sh));
#endif
}

// Whether any lane of the simd-group passes b (called by every lane).
inline bool tq_simd_any(bool b) {
#if defined(__CUDACC__)
  return __any_sync(0xFFFFFFFFu, b ? 1 : 0) != 0;
#elif defined(__METAL_VERSION__)
  return simd_any(b);
#else
  return simd_max(b ? 1u : 0u) != 0u;
#endif
}

// The products of the two fp16 pairs x and y, summed (the exchange's arithmetic).
inline float tq_dot_half2(uint x, uint y) {
  return tq_half_bits_to_float(ushort(x & 0xFFFFu)) * tq_half_bits_to_float(ushort(y & 0xFFFFu)) +
         tq_half_bits_to_float(ushort(x >> 16u)) * tq_half_bits_to_float(ushort(y >> 16u));
}

// The low halves of x and y (hi = 0) or their high halves (hi = 1), x's in the low half.
inline uint tq_pick_halves(uint x, uint y, uint hi) {
#if defined(__CUDACC__)
  return __byte_perm(x, y, hi != 0u ? 0x7632u : 0x5410u);
#else
  return hi != 0u ? (x >> 16u) | (y & 0xFFFF0000u) : (x & 0xFFFFu) | (y << 16u);
#endif
}

// D += A · B for a 16 x 16 A (a0..a3, all rows live) and a 16 x 8 B (b0, b1): the whole
// 16x8x16 multiply-accumulate, d0, d1 = D[gr][2tg, 2tg+1], d2, d3 = D[gr+8][..]. Called by all
// 32 lanes of the simd-group in uniform control flow.
inline void tq_mma_16816(thread float (&d)[4], uint a0, uint a1, uint a2, uint a3, uint b0,
                         uint b1, uint lane) {
#if defined(__CUDACC__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  (void)lane;
#else
  const uint gr = lane / 4u, tg = lane % 4u;
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  for (uint j = 0u; j < 4u; ++j) {
    const uint xa0 = simd_shuffle(a0, ushort(gr * 4u + j));  // A[gr][2j, 2j+1]
    const uint xa1 = simd_shuffle(a1, ushort(gr * 4u + j));  // A[gr+8][2j, 2j+1]
    const uint xa2 = simd_shuffle(a2, ushort(gr * 4u + j));  // A[gr][2j+8, 2j+9]
    const uint xa3 = simd_shuffle(a3, ushort(gr * 4u + j));  // A[gr+8][2j+8, 2j+9]
    const uint y00 = simd_shuffle(b0, ushort(8u * tg + j));  // B[2j, 2j+1][2tg]
    const uint y01 = simd_shuffle(b1, ushort(8u * tg + j));  // B[2j+8, 2j+9][2tg]
    const uint y10 = simd_shuffle(b0, ushort(8u * tg + 4u + j));  // column 2tg + 1
    const uint y11 = simd_shuffle(b1, ushort(8u * tg + 4u + j));
    s0 += tq_dot_half2(xa0, y00) + tq_dot_half2(xa2, y01);
    s1 += tq_dot_half2(xa0, y10) + tq_dot_half2(xa2, y11);
    s2 += tq_dot_half2(xa1, y00) + tq_dot_half2(xa3, y01);
    s3 += tq_dot_half2(xa1, y10) + tq_dot_half2(xa3, y11);
  }
  d[0] += s0;
  d[1] += s1;
  d[2] += s2;
  d[3] += s3;
#endif
}

// Bits [o, o + w) of the little-endian words x, moved to bits [dst, dst + w) (dst + w <= 32).
template <uint NW>
inline uint tq_bits_at(thread const uint (&x)[NW], uint o, uint w, uint dst) {
  const uint i = o / 32u, s = o % 32u;
  const uint mask = ((1u << w) - 1u) << dst;
  if (s < dst) return (x[i] << (dst - s)) & mask;
  const uint hi = s + w > 32u && i + 1u < NW ? x[i + 1u] : 0u;
  return tq_funnel_r(x[i], hi, s - dst) & mask;
}

// The NB bytes at byte offset `byte` of `words` (device or threadgroup memory, any alignment)
// as little-endian words x; only the words that hold those bytes are read.
template <uint NB, class P>
inline void tq_load_run(thread uint (&x)[(NB + 3u) / 4u], P words, uint byte) {
  constexpr uint NW = (NB + 3u) / 4u;
  const uint w0 = byte >> 2u;
  const uint sh = (byte & 3u) * 8u;
  const uint held = ((byte & 3u) + NB + 3u) / 4u;  // NW or NW + 1
  uint prev = words[w0];
  TQ_UNROLL for (uint i = 0u; i < NW; ++i) {
    const uint next = i + 1u < held ? words[w0 + i + 1u] : 0u;
    x[i] = tq_funnel_r(prev, next, sh);
    prev = next;
  }
}

// The word of a pair table at byte offset off from lut.
inline uint tq_lut_word(threadgroup const uint* lut, uint off) {
  return *((threadgroup const uint*)((threadgroup const uchar*)lut + off));
}

// --- Staging a tile's codes in threadgroup memory ---------------------------------------------
// Each simd-group copies its tiles' key rows, value rows and norms (four runs of bytes) into
// its own ring of NS stages while it multiplies an earlier tile: on CUDA (sm_80+) with
// asynchronous copies (cp.async of 16-byte chunks, consecutive lanes on consecutive chunks),
// NS - 1 tiles ahead; elsewhere a plain copy. A run is copied as the aligned chunks that hold
// it (its bytes keep their offset within a chunk), so a run may start at any byte; each
// head's rows are whole chunks (the host checks), so no chunk lies past a buffer's end.

// Copies the 16 bytes at src to dst (both 16-byte aligned).
inline void tq_copy_chunk_async(threadgroup uint* dst, device const uint* src) {
#if defined(__CUDACC__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
#else
  TQ_UNROLL for (uint i = 0u; i < 4u; ++i) { dst[i] = src[i]; }
#endif
}

inline void tq_copy_commit() {
#if defined(__CUDACC__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N committed groups of this thread are in flight.
template <uint N>
inline void tq_copy_wait() {
#if defined(__CUDACC__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Words a run of n bytes occupies in a stage: the 16-byte chunks that hold it, from any start.
inline uint tq_run_words(uint n) { return (n + 30u) / 16u * 4u; }

// Words of one stage: 16 key rows, 16 value rows, 16 key norms, 16 value norms.
inline uint tq_mma_stage_words(uint k_code_bytes, uint v_code_bytes, uint norm_bytes) {
  return tq_run_words(16u * k_code_bytes) + tq_run_words(16u * v_code_bytes) +
         2u * tq_run_words(16u * norm_bytes);
}

// Copies the n <= MAXN bytes at byte offset `byte` of src (16-byte aligned) into dst by the
// simd-group's lanes: the 16-byte chunks that hold them, the first byte at offset byte % 16.
template <uint MAXN>
inline void tq_stage_run(threadgroup uint* dst, device const uchar* src, uint byte, uint n,
                         uint lane) {
  device const uint* w = (device const uint*)src + (byte >> 4u) * 4u;
  const uint chunks = ((byte & 15u) + n + 15u) / 16u;
  TQ_UNROLL for (uint k = 0u; k < (MAXN + 30u) / 16u / TQ_SIMD_WIDTH + 1u; ++k) {
    const uint i = lane + k * TQ_SIMD_WIDTH;
    if (i < chunks) tq_copy_chunk_async(dst + 4u * i, w + 4u * i);
  }
}

// Threadgroup scratch (words): the pair tables (and for split keys 512 floats of angles: the
// caller counts them in `tables`), then one region used in turn for the rotated queries (G·D
// floats), the simd-groups' stage rings, and the merge of their states. A table
// of at most 64 pairs is held once per lane (word 32·pair + lane: lanes never share a bank),
// a larger one once.
inline uint tq_mma_table_words(uint bits) {
  const uint pairs = 1u << (2u * bits);
  return pairs <= 64u ? pairs * TQ_SIMD_WIDTH : pairs;
}

// Floats of the split's angle table in the scratch: (cos, sin) of the 256 one-byte angle codes
// (two-byte codes read theirs from device memory; the room is kept either way). The host's
// MMA_ANGLE_FLOATS.
#define TQ_MMA_ANGLE_FLOATS 512u

inline uint tq_attention_mma_scratch_floats(uint dim, uint group, uint tables, uint nthreads,
                                            uint stage_words, uint stages) {
  const uint nwarps = nthreads / TQ_SIMD_WIDTH;
  uint region = group * dim;
  region = max(region, nwarps * stages * stage_words);
  const uint merge = nwarps * group * (dim + 2u);
  return max(tables + region, merge);
}

// The byte offset in its table of the pair in field o (w bits) of x; lane4 = 4·lane (a table
// of at most 64 pairs has a copy per lane).
template <uint NW>
inline uint tq_pair_offset(thread const uint (&x)[NW], uint o, uint w, uint lane4) {
  return (1u << w) <= 64u ? tq_bits_at(x, o, w, 7u) | lane4 : tq_bits_at(x, o, w, 2u);
}

// A head's code and norm rows and the tile geometry (tq_mma_stage).
struct TqMmaHead {
  device const uchar* k;
  device const uchar* v;
  device const uchar* kn;
  device const uchar* vn;
  uint kcb, nb, t_end, kr_words, vr_words, nr_words;
};

// Stages the tile of (at most) 16 tokens from token t into the stage st, if t < t_end.
template <uint D, uint KB0, uint KB1, uint VB, uint SPLIT>
inline void tq_mma_stage(threadgroup uint* st, thread const TqMmaHead& hd, uint t, uint lane) {
  constexpr uint KCB_MAX = SPLIT != 0u ? D / 2u * KB0 / 8u + D / 2u * KB1 / 8u + 2u : D * KB0 / 8u;
  constexpr uint VCB = D * VB / 8u;
  if (t >= hd.t_end) return;
  const uint n = min(16u, hd.t_end - t);
  tq_stage_run<16u * KCB_MAX>(st, hd.k, t * hd.kcb, n * hd.kcb, lane);
  tq_stage_run<16u * VCB>(st + hd.kr_words, hd.v, t * VCB, n * VCB, lane);
  tq_stage_run<64u>(st + hd.kr_words + hd.vr_words, hd.kn, t * hd.nb, n * hd.nb, lane);
  tq_stage_run<64u>(st + hd.kr_words + hd.vr_words + hd.nr_words, hd.vn, t * hd.nb, n * hd.nb,
                    lane);
}

// The fast Walsh-Hadamard transform of each aligned block of BLOCK elements of a vector of
// D = 32·K held by a simd-group (element e = lane + 32k in v[k]), unnormalized: the butterfly
// of tq_fwht (v[i], v[i+h] <- v[i] + v[i+h], v[i] - v[i+h]), lanes exchanging for h < 32.
template <uint K, uint BLOCK>
inline void tq_fwht_simd(thread float (&v)[K], uint lane) {
  TQ_UNROLL for (uint h = 1u; h < BLOCK && h < 32u; h <<= 1u) {
    TQ_UNROLL for (uint k = 0u; k < K; ++k) {
      const float o = simd_shuffle_xor(v[k], ushort(h));
      v[k] = (lane & h) != 0u ? o - v[k] : v[k] + o;
    }
  }
  TQ_UNROLL for (uint h = 32u; h < BLOCK; h <<= 1u) {
    TQ_UNROLL for (uint k = 0u; k < K; ++k) {
      if ((k & (h / 32u)) == 0u) {
        const float a = v[k], b = v[k + h / 32u];
        v[k] = a + b;
        v[k + h / 32u] = a - b;
      }
    }
  }
}

// The queries of a block kernel: float32 rows (row r at q + r·D), or a decode step's rows as
// the model gives them (TqQueryWords): 16-bit words of fp16 or bfloat16, read in the key
// split's channel order where one is given (permute: column c of KV head h is word
// order[h·D + c]), and kept as float32 in that order (kept, row r at kept + r·D; written by
// the threadgroups of block 0) for the reduce, which scores the fp16 rows with them. So a
// decode step needs neither mlx's gather of its queries nor their cast to float32.
struct TqQueryWords {
  device const ushort* words;
  TQ_TABLE uint* order;
  device float* kept;
  uint bf16, permute, keep;
};

inline float tq_query_at(device const float* q, ulong row, uint c, uint head, uint D) {
  (void)head;
  return q[row * D + c];
}

inline float tq_query_at(thread const TqQueryWords& q, ulong row, uint c, uint head, uint D) {
  const uint from = q.permute != 0u ? q.order[head * D + c] : c;
  return tq_word_to_float(q.words[row * D + from], q.bf16);
}

inline void tq_query_keep(device const float* q, ulong row, uint c, uint D, float x) {
  (void)q, (void)row, (void)c, (void)D, (void)x;
}

inline void tq_query_keep(thread const TqQueryWords& q, ulong row, uint c, uint D, float x) {
  if (q.keep != 0u) q.kept[row * D + c] = x;
}

// out = Π x for query row `row` (of KV head `head`) by one simd-group (tq_hadamard_forward,
// or per block of BLOCK coordinates as tq_hadamard_forward_blocks): signs D₁, transform, then
// (two rounds) D₂, transform; scaled by tq_rotation_scale(BLOCK).
template <uint D, uint BLOCK, class Q>
inline void tq_rotate_simd(threadgroup float* out, Q q, ulong row, uint head,
                           TQ_TABLE float* signs, uint lane) {
  constexpr uint K = D / 32u;
  float v[K];
  TQ_UNROLL for (uint k = 0u; k < K; ++k) {
    const float x = tq_query_at(q, row, lane + 32u * k, head, D);
    tq_query_keep(q, row, lane + 32u * k, D, x);
    v[k] = x * signs[lane + 32u * k];
  }
  tq_fwht_simd<K, BLOCK>(v, lane);
  if (TQ_ROTATION_ROUNDS == 2u) {
    TQ_UNROLL for (uint k = 0u; k < K; ++k) { v[k] *= signs[D + lane + 32u * k]; }
    tq_fwht_simd<K, BLOCK>(v, lane);
  }
  const float scale = tq_rotation_scale(BLOCK);
  TQ_UNROLL for (uint k = 0u; k < K; ++k) { out[lane + 32u * k] = v[k] * scale; }
}

template <uint D, uint KB0, uint KB1, uint VB, uint SPLIT, uint NS, class Q>
inline void tq_attention_mma_block_body(Q q, TQ_TABLE float* k_signs,
                                        device const uchar* k_codes, device const uchar* k_norms,
                                        device const uchar* v_codes, device const uchar* v_norms,
                                        TQ_TABLE float* k_centroids, TQ_TABLE float* v_centroids,
                                        device const float* angles, device float* part_m,
                                        device float* part_l, device float* part_acc,
                                        TQ_PARAMS TqSplitAttnParams& p, threadgroup float* tg,
                                        uint block, uint head, uint tid, uint nthreads) {
  constexpr uint H = SPLIT != 0u ? 2u : 1u;  // parts of a key row
  constexpr uint PD = D / H;                 // coordinates of a part
  constexpr uint CD = PD / 4u;               // a lane column's coordinates of a part
  constexpr uint SP = PD / 16u;              // product steps of a part
  constexpr uint NB0 = CD * KB0 / 8u, NB1 = SPLIT != 0u ? CD * KB1 / 8u : 1u;
  constexpr uint NW0 = (NB0 + 3u) / 4u, NW1 = (NB1 + 3u) / 4u;
  constexpr uint VD = D / 8u;  // a lane row's value coordinates
  constexpr uint NBV = VD * VB / 8u, NWV = (NBV + 3u) / 4u;
  constexpr uint VCB = D * VB / 8u;
  constexpr uint NK0 = 1u << KB0, NK1 = 1u << KB1, NV = 1u << VB;
  constexpr uint P0 = 1u << (2u * KB0), P1 = 1u << (2u * KB1), PV = 1u << (2u * VB);
  static_assert(D == 64u || D == 128u || D == 256u, "head_dim 64, 128 or 256");
  static_assert(KB0 >= 1u && KB0 <= 4u && KB1 >= 1u && KB1 <= 4u && VB >= 1u && VB <= 4u,
                "1 to 4 bits: the pair tables hold 2^(2·bits) words");
  static_assert(TQ_SIMD_WIDTH == 32u, "the fragments assume 32 lanes");
  static_assert(NS >= 1u && NS <= 4u, "1 to 4 stages");

  const uint BT = p.block_tokens, G = p.group;
  const uint per = tq_tiles_per_block(p.tokens, BT, p.num_blocks);
  const uint tile0 = block * per;
  if (tile0 * BT >= p.tokens || G > 8u || p.dim != D || p.k_bits != KB0 || p.v_bits != VB ||
      (SPLIT != 0u && (p.k_bits1 != KB1 || p.part_dim != PD || p.angle_bytes != SPLIT)))
    return;  // uniform over the threadgroup
  const uint t_begin = tile0 * BT, t_end = min((tile0 + per) * BT, p.tokens);
  const uint lane = tid % TQ_SIMD_WIDTH, warp = tid / TQ_SIMD_WIDTH;
  const uint nwarps = nthreads / TQ_SIMD_WIDTH;
  const uint gr = lane / 4u, tc = lane % 4u;

  // The pair tables: word (pair) = (centroid[pair % n], centroid[pair / n]) as fp16.
  const uint T0 = tq_mma_table_words(KB0), T1 = SPLIT != 0u ? tq_mma_table_words(KB1) : 0u;
  const uint TV = tq_mma_table_words(VB);
  threadgroup uint* lut0 = (threadgroup uint*)tg;
  threadgroup uint* lut1 = lut0 + T0;
  threadgroup uint* lutv = lut1 + T1;
  // The split's angle table (TQ_MMA_ANGLE_FLOATS) after the pair tables.
  threadgroup float* angt = (threadgroup float*)(lutv + TV);
  constexpr uint TA = SPLIT == 1u ? TQ_MMA_ANGLE_FLOATS : 0u;
  threadgroup float* region = tg + T0 + T1 + TV + (SPLIT != 0u ? TQ_MMA_ANGLE_FLOATS : 0u);
  // A signed index: TA may be 0 (NVRTC's warning #186 on "i < 0u").
  for (int i = int(tid); i < int(TA); i += int(nthreads)) angt[i] = angles[i];
  for (uint i = tid; i < T0; i += nthreads) {
    const uint e = P0 <= 64u ? i / 32u : i;
    lut0[i] = tq_pack_half2(k_centroids[e % NK0], k_centroids[e / NK0]);
  }
  // A signed index: T1 is 0 without a split, and "i < 0u" draws NVRTC 13.0's warning #186.
  for (int i = int(tid); i < int(T1); i += int(nthreads)) {
    const uint e = P1 <= 64u ? uint(i) / 32u : uint(i);
    lut1[i] = tq_pack_half2(k_centroids[NK0 + e % NK1], k_centroids[NK0 + e / NK1]);
  }
  for (uint i = tid; i < TV; i += nthreads) {
    const uint e = PV <= 64u ? i / 32u : i;
    lutv[i] = tq_pack_half2(v_centroids[e % NV], v_centroids[e / NV]);
  }
  threadgroup const uint* l0 = lut0;
  threadgroup const uint* l1 = lut1;
  threadgroup const uint* lv = lutv;
  const uint lane4 = 4u * lane;

  // The G queries rotated (Π_K q), one simd-group each in turn, into the region.
  threadgroup float* qs = region;
  for (uint g = warp; g < G; g += nwarps)
    tq_rotate_simd<D, PD>(qs + g * D, q, ulong(head) * G + g, head, k_signs, lane);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  // Query fragments: step s of part h covers coordinates h·PD + tc·CD + 4s + {0..3}.
  uint qf[H * SP][2];
  const float qscale = p.scale * 1.4426950408889634f;  // log2 e: the softmax in base 2
  TQ_UNROLL for (uint h = 0u; h < H; ++h) {
    TQ_UNROLL for (uint s = 0u; s < SP; ++s) {
      threadgroup const float* qr = qs + gr * D + h * PD + tc * CD + 4u * s;
      const bool live = gr < G;
      qf[h * SP + s][0] = live ? tq_pack_half2(qr[0] * qscale, qr[1] * qscale) : 0u;
      qf[h * SP + s][1] = live ? tq_pack_half2(qr[2] * qscale, qr[3] * qscale) : 0u;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // the region now holds the stage rings

  const ulong row0 = ulong(head) * p.head_stride;
  const uint kcb = p.k_code_bytes, nb = p.norm_fp16 != 0u ? 2u : 4u;
  const uint ab = p.angle_bytes;
  const uint k_off0 = ab + tc * NB0, k_off1 = ab + PD * KB0 / 8u + tc * NB1;
  const uint v_off = gr * NBV;
  const uint kr_words = tq_run_words(16u * kcb), vr_words = tq_run_words(16u * VCB);
  const uint nr_words = tq_run_words(16u * nb);
  const uint sw = tq_mma_stage_words(kcb, VCB, nb);
  threadgroup uint* ring = (threadgroup uint*)region + warp * NS * sw;
  // This head's rows (16-byte aligned: the host checks), addressed by 32-bit offsets.
  TqMmaHead hd;
  hd.k = k_codes + row0 * kcb;
  hd.v = v_codes + row0 * VCB;
  hd.kn = k_norms + row0 * nb;
  hd.vn = v_norms + row0 * nb;
  hd.kcb = kcb;
  hd.nb = nb;
  hd.t_end = t_end;
  hd.kr_words = kr_words;
  hd.vr_words = vr_words;
  hd.nr_words = nr_words;

  // The state of query heads 2tc + c (c = 0, 1): running max m[c] (base 2, the same in every
  // lane row), this lane's share l[c] of the sum (its tokens), and the value sums (the
  // columns of Oᵀ): o[j][c] and o[j][2 + c] at coordinates gr·VD + j and gr·VD + VH + j.
  constexpr uint VH = VD / 2u;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[VH][4];
  TQ_UNROLL for (uint j = 0u; j < VH; ++j) { o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f; }

  const uint step = 16u * nwarps;
  const uint first = t_begin + 16u * warp;
  // The prologue stages the first NS - 1 tiles (an empty group where there is none, so the
  // count of groups stays uniform).
  TQ_UNROLL for (uint k = 0u; k + 1u < NS; ++k) {
    tq_mma_stage<D, KB0, KB1, VB, SPLIT>(ring + k * sw, hd, first + k * step, lane);
    tq_copy_commit();
  }
  uint k = 0u;
  for (uint t0 = first; t0 < t_end; t0 += step, ++k) {
    // the tile NS - 1 ahead into the stage read last (NS = 1: this tile)
    tq_mma_stage<D, KB0, KB1, VB, SPLIT>(ring + ((k + NS - 1u) % NS) * sw, hd,
                                         t0 + (NS - 1u) * step, lane);
    tq_copy_commit();
    tq_copy_wait<NS - 1u>();  // this tile's group has landed
    simdgroup_barrier(mem_flags::mem_threadgroup);
    threadgroup const uint* st = ring + (k % NS) * sw;
    threadgroup const uint* skw = st;
    threadgroup const uint* svw = st + kr_words;
    // the runs' offsets within their first chunks
    const uint ksh = (t0 * kcb) & 15u, vsh = (t0 * VCB) & 15u, nsh = (t0 * nb) & 15u;
    threadgroup const uchar* skn = (threadgroup const uchar*)(st + kr_words + vr_words) + nsh;
    threadgroup const uchar* svn =
        (threadgroup const uchar*)(st + kr_words + vr_words + nr_words) + nsh;

    // Scores, transposed: Sᵀ (the tile's 16 tokens x query heads) = K̂ · Qᵀ per key part, one
    // product per step; this lane holds sc[h][2n + c] = Sᵀ[token gr + 8n][query head 2tc + c]
    // and reads the key runs of tokens gr and gr + 8 (the rows of its A words).
    float sc[H][4];
    {
      uint x0[2][NW0];
      tq_load_run<NB0>(x0[0], skw, ksh + gr * kcb + k_off0);
      tq_load_run<NB0>(x0[1], skw, ksh + (gr + 8u) * kcb + k_off0);
      sc[0][0] = sc[0][1] = sc[0][2] = sc[0][3] = 0.0f;
      TQ_UNROLL for (uint s = 0u; s < SP; ++s) {
        const uint o0 = 4u * KB0 * s, o1 = o0 + 2u * KB0;
        const uint a0 = tq_lut_word(l0, tq_pair_offset(x0[0], o0, 2u * KB0, lane4));
        const uint a1 = tq_lut_word(l0, tq_pair_offset(x0[1], o0, 2u * KB0, lane4));
        const uint a2 = tq_lut_word(l0, tq_pair_offset(x0[0], o1, 2u * KB0, lane4));
        const uint a3 = tq_lut_word(l0, tq_pair_offset(x0[1], o1, 2u * KB0, lane4));
        tq_mma_16816(sc[0], a0, a1, a2, a3, qf[s][0], qf[s][1], lane);
      }
    }
    if (SPLIT != 0u) {
      uint x1[2][NW1];
      tq_load_run<NB1>(x1[0], skw, ksh + gr * kcb + k_off1);
      tq_load_run<NB1>(x1[1], skw, ksh + (gr + 8u) * kcb + k_off1);
      sc[H - 1u][0] = sc[H - 1u][1] = sc[H - 1u][2] = sc[H - 1u][3] = 0.0f;
      TQ_UNROLL for (uint s = 0u; s < SP; ++s) {
        const uint o0 = 4u * KB1 * s, o1 = o0 + 2u * KB1;
        const uint a0 = tq_lut_word(l1, tq_pair_offset(x1[0], o0, 2u * KB1, lane4));
        const uint a1 = tq_lut_word(l1, tq_pair_offset(x1[1], o0, 2u * KB1, lane4));
        const uint a2 = tq_lut_word(l1, tq_pair_offset(x1[0], o1, 2u * KB1, lane4));
        const uint a3 = tq_lut_word(l1, tq_pair_offset(x1[1], o1, 2u * KB1, lane4));
        tq_mma_16816(sc[H - 1u], a0, a1, a2, a3, qf[SP + s][0], qf[SP + s][1], lane);
      }
    }
    // Online softmax over the tile (base 2), per query head 2tc + c: this lane's tokens gr and
    // gr + 8, then the max over the lane rows.
    float s4[4], vn[2];
    float mt[2] = {-INFINITY, -INFINITY};
    TQ_UNROLL for (uint n = 0u; n < 2u; ++n) {
      const uint j = gr + 8u * n;
      const bool live = t0 + j < t_end;
      float kn, ca = 1.0f, sa = 0.0f;
      if (nb == 2u) {
        kn = tq_half_bits_to_float(((threadgroup const ushort*)skn)[j]);
        vn[n] = tq_half_bits_to_float(((threadgroup const ushort*)svn)[j]);
      } else {
        kn = ((threadgroup const float*)skn)[j];
        vn[n] = ((threadgroup const float*)svn)[j];
      }
      if (SPLIT != 0u) {
        const uint a = tq_split_read_angle((threadgroup const uchar*)skw + ksh + j * kcb, SPLIT);
        ca = SPLIT == 1u ? angt[2u * a] : angles[2u * a];
        sa = SPLIT == 1u ? angt[2u * a + 1u] : angles[2u * a + 1u];
      }
      if (!live) vn[n] = 0.0f;
      TQ_UNROLL for (uint c = 0u; c < 2u; ++c) {
        const float x = SPLIT != 0u ? ca * sc[0][2u * n + c] + sa * sc[H - 1u][2u * n + c]
                                    : sc[0][2u * n + c];
        s4[2u * n + c] = live ? x * kn : -INFINITY;
        mt[c] = max(mt[c], s4[2u * n + c]);
      }
    }
    TQ_UNROLL for (uint c = 0u; c < 2u; ++c) {
      mt[c] = max(mt[c], simd_shuffle_xor(mt[c], ushort(4)));
      mt[c] = max(mt[c], simd_shuffle_xor(mt[c], ushort(8)));
      mt[c] = max(mt[c], simd_shuffle_xor(mt[c], ushort(16)));
    }
    // finite: token 0 of the tile is live
    const float mn0 = max(m[0], mt[0]), mn1 = max(m[1], mt[1]);
    if (tq_simd_any(mn0 > m[0] || mn1 > m[1])) {
      const float a0 = m[0] == -INFINITY ? 0.0f : exp2(m[0] - mn0);
      const float a1 = m[1] == -INFINITY ? 0.0f : exp2(m[1] - mn1);
      l[0] *= a0;
      l[1] *= a1;
      TQ_UNROLL for (uint j = 0u; j < VH; ++j) {
        o[j][0] *= a0;
        o[j][1] *= a1;
        o[j][2] *= a0;
        o[j][3] *= a1;
      }
      m[0] = mn0;
      m[1] = mn1;
    }
    float pw[4];
    TQ_UNROLL for (uint i = 0u; i < 4u; ++i) {
      const float e = exp2(s4[i] - m[i & 1u]);
      l[i & 1u] += e;
      pw[i] = e * vn[i >> 1u];
    }
    // Pᵀ as the B of Oᵀ += V̂ᵀ · Pᵀ: b0 = P[gr][2tc, 2tc+1], b1 = P[gr][2tc+8, 2tc+9], taken
    // from the lanes that scored those tokens (rows 2tc, 2tc + 1, column gr / 2): the half of
    // their (query head 2tc', 2tc' + 1) pair that is query head gr.
    const uint u0 = tq_pack_half2(pw[0], pw[1]), u1 = tq_pack_half2(pw[2], pw[3]);
    const ushort src0 = ushort(8u * tc + gr / 2u), src1 = ushort(8u * tc + 4u + gr / 2u);
    const uint pb0 = tq_pick_halves(simd_shuffle(u0, src0), simd_shuffle(u0, src1), gr & 1u);
    const uint pb1 = tq_pick_halves(simd_shuffle(u1, src0), simd_shuffle(u1, src1), gr & 1u);
    // Value sums, one whole 16x8x16 product per step j: the rows of V̂ᵀ are coordinates
    // (row r < 8: r·VD + j, row r + 8: r·VD + VH + j), its k the tile's tokens; lane row gr
    // takes coordinates gr·VD + j (a0, a2) and gr·VD + VH + j (a1, a3) of tokens 2tc, 2tc+1
    // (a0, a1) and 2tc+8, 2tc+9 (a2, a3), each pair one lookup of (centroid, centroid).
    uint xv[4][NWV];
    TQ_UNROLL for (uint i = 0u; i < 4u; ++i) {
      tq_load_run<NBV>(xv[i], svw, vsh + (2u * tc + (i & 1u) + 8u * (i >> 1u)) * VCB + v_off);
    }
    constexpr uint VS = PV <= 64u ? 7u : 2u;  // log2 of the table's bytes per pair
    const uint vl = PV <= 64u ? lane4 : 0u;
    TQ_UNROLL for (uint j = 0u; j < VH; ++j) {
      const uint a0 = tq_lut_word(lv, tq_bits_at(xv[0], VB * j, VB, VS) |
                                          tq_bits_at(xv[1], VB * j, VB, VS + VB) | vl);
      const uint a1 = tq_lut_word(lv, tq_bits_at(xv[0], VB * (VH + j), VB, VS) |
                                          tq_bits_at(xv[1], VB * (VH + j), VB, VS + VB) | vl);
      const uint a2 = tq_lut_word(lv, tq_bits_at(xv[2], VB * j, VB, VS) |
                                          tq_bits_at(xv[3], VB * j, VB, VS + VB) | vl);
      const uint a3 = tq_lut_word(lv, tq_bits_at(xv[2], VB * (VH + j), VB, VS) |
                                          tq_bits_at(xv[3], VB * (VH + j), VB, VS + VB) | vl);
      tq_mma_16816(o[j], a0, a1, a2, a3, pb0, pb1, lane);
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);  // done with the stage before its refill
  }
  tq_copy_wait<0u>();

  // The simd-groups' states (sums over the lane rows), merged through the scratch.
  TQ_UNROLL for (uint c = 0u; c < 2u; ++c) {
    l[c] += simd_shuffle_xor(l[c], ushort(4));
    l[c] += simd_shuffle_xor(l[c], ushort(8));
    l[c] += simd_shuffle_xor(l[c], ushort(16));
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // everyone is done with tables and stages
  threadgroup float* st = tg + warp * G * (D + 2u);  // [m (G), l (G), acc (G x D)]
  TQ_UNROLL for (uint c = 0u; c < 2u; ++c) {
    const uint g = 2u * tc + c;
    if (g < G) {
      if (gr == 0u) {
        st[g] = m[c];
        st[G + g] = l[c];
      }
      TQ_UNROLL for (uint j = 0u; j < VH; ++j) {
        st[2u * G + g * D + gr * VD + j] = o[j][c];
        st[2u * G + g * D + gr * VD + VH + j] = o[j][2u + c];
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const ulong base = (ulong(head) * p.num_blocks + block) * G;
  const float ln2 = 0.6931471805599453f;
  for (uint i = tid; i < G * D; i += nthreads) {
    const uint g = i / D, c = i % D;
    float mx = -INFINITY;
    for (uint w = 0u; w < nwarps; ++w) mx = max(mx, tg[w * G * (D + 2u) + g]);
    float ls = 0.0f, acc = 0.0f;
    for (uint w = 0u; w < nwarps; ++w) {
      threadgroup const float* sw = tg + w * G * (D + 2u);
      const float f = sw[g] == -INFINITY ? 0.0f : exp2(sw[g] - mx);
      ls += sw[G + g] * f;
      acc += sw[2u * G + g * D + c] * f;
    }
    part_acc[(base + g) * D + c] = acc;
    if (c == 0u) {
      part_m[base + g] = mx * ln2;  // natural-log units, as the other block kernels
      part_l[base + g] = ls;
    }
  }
}

#endif  // TQ_METAL_ATTENTION_MMA
