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
#include <optional>
#include <vector>

#include "turboquant/cache/page_store.h"

namespace turboquant {

struct AttentionOptions {
  bool causal = true;
  std::optional<float> scale;     // default 1/sqrt(head_dim)
  std::optional<size_t> window;   // sliding window: a query sees at most the last w keys
  // fp16 sinks (KVCacheConfig::fp16_sinks) stay visible to every query whatever the window:
  // a query sees its causal sinks plus the last `window` tokens (mlx-lm's RotatingKVCache
  // `keep` tokens, StreamingLLM). With eviction the stored tokens after the sinks are the
  // most recent ones, so the window counts them, not positions.
  bool sinks_visible = false;
  // Sparse V (0 = dense): on each page, value rows whose softmax weight exp(s - m) is below
  // sparse_v_threshold are skipped in the value sum, where m is the query's running maximum
  // score so far (online softmax). m never exceeds the final maximum, so every skipped row has
  // weight < threshold × (the query's maximum weight); the normalisation still sums all
  // weights. Error: |o - o_dense| <= Σ_skipped p_i |v_i| (p normalised). Applies to the
  // decode path (fewer than kGemmMinRows query rows per KV head) and to the fp16 window; the
  // prefill GEMM path stays dense (its pages serve many rows, so almost no row is skippable).
  // Coded pages: a value row is skipped for all query rows of the KV head when every one of
  // them weights it below the threshold (it is decoded once for all of them), and kept with
  // every row's exact weight otherwise, so the bound above holds for each query row; the
  // value sum decodes only the kept rows (Quantizer::accumulate_rows), and a page with none
  // costs its key scores only. The fp16 window drops each (row, token) weight on its own.
  float sparse_v_threshold = 0.0f;
};

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
  // Sparse V: each page (run) token's largest weight over the rows, and the kept tokens.
  std::vector<float> sparse_top;
  std::vector<uint32_t> sparse_index;
  // Runs of small pages, copied side by side (attend_pages).
  std::vector<uint8_t> run_kcodes, run_vcodes, run_vnorms;
  std::vector<size_t> page_order;  // attend_pages' reading order
};

// Decode reads pages smaller than this in runs of up to this many tokens (attend_pages).
inline constexpr size_t kRunTokens = 256;

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

// Throws InvalidArgument unless mask fits m rows over n_tokens tokens (sorted, in range)
// and keys / values agree on head_dim and page size.
void check_head_call(const HeadCodes& keys, const HeadCodes& values, size_t n_tokens, size_t m,
                     const RowMask& mask);

// The page loop of attend_head over pages [page_begin, page_end) only, from prepared
// queries (gemm: Π q, m × d; else prepare_queries' state): leaves the unnormalised
// rotated-domain accumulator in scratch.acc (m × d) and the rows' softmax max / sum in
// scratch.row_max / row_sum (a row with no visible token there: -inf / 0, acc 0).
void attend_pages(const HeadCodes& keys, const HeadCodes& values, size_t n_tokens, const float* state,
                  size_t m, const RowMask& mask, float scale, bool gemm, size_t page_begin, size_t page_end,
                  AttentionScratch& scratch, float sparse_v_threshold);

// Split-K decode (flash-decoding). A decode head (m < kGemmMinRows query rows) whose visible
// tokens span more than one chunk of kSplitChunkTokens tokens (rounded to whole pages, chunk
// boundaries at multiples of that many pages) is cut into chunks; every (head, chunk) is one
// work item of the thread pool, and a head's partial (max, sum, accumulator) are merged in
// chunk order with an exact log-sum-exp rescale. The chunking depends only on the page size
// and the mask, never on the thread count, so the output is bit-identical for any number of
// threads.
inline constexpr size_t kSplitChunkTokens = 256;

// One KV head's attention call for attend_heads: as attend_head's arguments.
struct HeadTask {
  HeadCodes keys, values;
  size_t n_tokens = 0;
  const float* queries = nullptr;  // m × d
  const RowMask* mask = nullptr;
  float* out = nullptr;            // m × d
  // Optional (m floats each): the softmax max / sum of every row, as attend_head leaves in
  // scratch.row_max / row_sum.
  float* row_max = nullptr;
  float* row_sum = nullptr;
};

// attend_head on every task (all with m query rows), split into chunks as above and run as
// one parallel_for over the (task, chunk) work items.
void attend_heads(const std::vector<HeadTask>& tasks, size_t m, float scale, float sparse_v_threshold);

}  // namespace turboquant
