// Attention on compressed codes (DESIGN §2). For the m queries that share one KV head:
//   1. state = prepare_queries(q) once (q' = Π_K q, plus S q' for QJL methods);
//   2. scores from the key codes, page by page (Quantizer::scores: table lookups);
//   3. fp32 max-subtracted softmax of scale·score with causal / sliding-window masks,
//      computed online page by page (running max and sum, as in FlashAttention);
//   4. o' = Σ_t p_t ‖v_t‖ ỹ_t accumulated in the value rotation's domain
//      (Quantizer::accumulate), then o = Π_Vᵀ o' once (finish_rotated).
// Prefill (many queries) takes the GEMM path instead: each page of codes is dequantized
// into an fp32 rotated-domain tile and multiplied with Eigen.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "turboquant/kv_cache.h"

namespace turboquant {

// Which keys each query row may see: row i sees keys [lo[i], hi[i]] (inclusive).
// Rows must be sorted so that hi is non-decreasing (position-major order).
struct RowMask {
  std::vector<size_t> lo, hi;
};

// The visible key range of each of the G*T_q rows of a KV head (row = t*G + g, so lo is
// non-decreasing) over n tokens: the T_q queries are the last T_q positions; causal
// queries see keys [0, n - T_q + t], non-causal all n; a window keeps only the last w.
RowMask make_row_mask(size_t n, size_t T_q, size_t G, const AttentionOptions& options);

// Reusable buffers for attend_head; one per thread.
struct AttentionScratch {
  std::vector<float> state, scores, norms, acc, row_max, row_sum, tile, qrot;
  // Sparse V: each page token's largest weight over the rows, and the kept tokens.
  std::vector<float> sparse_top;
  std::vector<uint32_t> sparse_index;
};

// At or above this many query rows, attend_head uses the dequantize + GEMM path.
inline constexpr size_t kGemmMinRows = 16;

// Attention of m query rows (m × d, fp32, rows ordered as `mask` says) over the first
// n_tokens tokens of one KV head. out: m × d. Independent across heads, so callers may run
// several heads in parallel with one scratch each.
void attend_head(const HeadCodes& keys, const HeadCodes& values, size_t n_tokens,
                 const float* queries, size_t m, const RowMask& mask, float scale, float* out,
                 AttentionScratch& scratch, bool force_gemm = false, bool force_hooks = false,
                 float sparse_v_threshold = 0.0f);
// After attend_head, scratch.row_max[r] (max of scale·score) and scratch.row_sum[r]
// (Σ exp(scale·score - row_max)) describe row r's softmax; windowed attention merges them.

}  // namespace turboquant
