#include "turboquant/attention.h"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "backend/cpu/kernels.h"
#include "turboquant/error.h"

namespace turboquant {
namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Online softmax over one page: turns the raw scores of rows [r0, r1) (stride nb) into
// weights exp(scale·s - new_max), zero outside each row's mask, and rescales the rows'
// running sums and accumulators when their maximum grows.
void softmax_page(float* scores, size_t nb, size_t tb0, size_t r0, size_t r1, const RowMask& mask,
                  float scale, size_t d, float* row_max, float* row_sum, float* acc) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (size_t r = r0; r < r1; ++r) {
    float* s = scores + (r - r0) * nb;
    // Visible part of this page for row r: [a, b) in page coordinates.
    const size_t a = mask.lo[r] > tb0 ? mask.lo[r] - tb0 : 0;
    const size_t b = mask.hi[r] + 1 > tb0 ? std::min(nb, mask.hi[r] + 1 - tb0) : 0;
    float mx = kNegInf;
    for (size_t t = a; t < b; ++t) {
      s[t] *= scale;
      mx = std::max(mx, s[t]);
    }
    if (a >= b || mx == kNegInf) {
      std::fill(s, s + nb, 0.0f);
      continue;
    }
    if (mx > row_max[r]) {
      const float f = std::exp(row_max[r] - mx);  // 0 when row_max was -inf
      row_sum[r] *= f;
      float* ar = acc + r * d;
      for (size_t j = 0; j < d; ++j) ar[j] *= f;
      row_max[r] = mx;
    }
    const float m = row_max[r];
    for (size_t t = 0; t < a; ++t) s[t] = 0.0f;
    const float sum = cpu::active_kernels().exp_sum(s + a, b - a, m);  // SIMD exp
    for (size_t t = b; t < nb; ++t) s[t] = 0.0f;
    row_sum[r] += sum;
  }
}

// Sparse V on one page: lists in sc.sparse_index the tokens that some query row weights at
// or above `threshold` (weights are exp(s - running max), so relative to the row's maximum
// so far) and returns how many; the value sum skips the others for every row (a kept token
// keeps all its rows' weights). Masked tokens (weight 0) are never kept.
size_t sparse_v_keep(AttentionScratch& sc, size_t nb, size_t mr, float threshold) {
  const float* w = sc.scores.data();
  sc.sparse_top.resize(nb);
  sc.sparse_index.resize(nb);
  float* top = sc.sparse_top.data();
  std::copy(w, w + nb, top);
  for (size_t r = 1; r < mr; ++r)  // column maxima over the rows: vectorised
    for (size_t t = 0; t < nb; ++t) top[t] = std::max(top[t], w[r * nb + t]);
  uint32_t* idx = sc.sparse_index.data();
  size_t kept = 0;
  for (size_t t = 0; t < nb; ++t) {  // branch-free compaction
    idx[kept] = static_cast<uint32_t>(t);
    kept += top[t] >= threshold ? 1 : 0;
  }
  return kept;
}

}  // namespace

void check_head_call(const HeadCodes& keys, const HeadCodes& values, size_t n_tokens, size_t m,
                     const RowMask& mask) {
  TQ_CHECK(values.quantizer->dim() == keys.quantizer->dim(), InvalidArgument, "key and value head_dim differ");
  TQ_CHECK(keys.block_tokens == values.block_tokens, InvalidArgument, "page sizes differ");
  TQ_CHECK(mask.lo.size() == m && mask.hi.size() == m, InvalidArgument, "mask has wrong size");
  for (size_t r = 0; r < m; ++r) {
    TQ_CHECK(mask.hi[r] < n_tokens && mask.lo[r] <= mask.hi[r], InvalidArgument, "row ", r,
             " sees keys [", mask.lo[r], ", ", mask.hi[r], "] outside [0, ", n_tokens, ")");
    TQ_CHECK(r == 0 || (mask.hi[r] >= mask.hi[r - 1] && mask.lo[r] >= mask.lo[r - 1]),
             InvalidArgument, "mask rows must be sorted by position");
  }
}

void attend_head(const HeadCodes& keys, const HeadCodes& values, size_t n_tokens,
                 const float* queries, size_t m, const RowMask& mask, float scale, float* out,
                 AttentionScratch& sc, bool force_gemm, bool force_hooks, float sparse_v_threshold) {
  const Quantizer& kq = *keys.quantizer;
  const Quantizer& vq = *values.quantizer;
  const auto d = static_cast<size_t>(kq.dim());
  check_head_call(keys, values, n_tokens, m, mask);
  if (m == 0) return;
  const bool gemm = !force_hooks && (force_gemm || m >= kGemmMinRows);
  if (gemm) {
    sc.qrot.resize(m * d);
    kq.rotation().forward(queries, sc.qrot.data(), m);
  } else {
    sc.state.resize(m * kq.query_state_floats());
    kq.prepare_queries(queries, m, sc.state.data());
  }
  const size_t bt = keys.block_tokens;
  attend_pages(keys, values, n_tokens, gemm ? sc.qrot.data() : sc.state.data(), m, mask, scale, gemm,
               mask.lo[0] / bt, (mask.hi[m - 1] + bt) / bt, sc, sparse_v_threshold);
  for (size_t r = 0; r < m; ++r) {
    const float inv = sc.row_sum[r] > 0.0f ? 1.0f / sc.row_sum[r] : 0.0f;
    for (size_t j = 0; j < d; ++j) out[r * d + j] = sc.acc[r * d + j] * inv;
  }
  vq.finish_rotated(out, m);
}

void attend_pages(const HeadCodes& keys, const HeadCodes& values, size_t n_tokens, const float* state,
                  size_t m, const RowMask& mask, float scale, bool gemm, size_t page_begin, size_t page_end,
                  AttentionScratch& sc, float sparse_v_threshold) {
  const Quantizer& kq = *keys.quantizer;
  const Quantizer& vq = *values.quantizer;
  const auto d = static_cast<size_t>(kq.dim());
  const size_t bt = keys.block_tokens;
  const size_t sf = gemm ? d : kq.query_state_floats();
  sc.acc.assign(m * d, 0.0f);
  sc.row_max.assign(m, -std::numeric_limits<float>::infinity());
  sc.row_sum.assign(m, 0.0f);
  // Small pages (e.g. the 32-token flush blocks of a windowed cache) are read in runs of up
  // to kRunTokens tokens, copied side by side, so that the kernels' and the softmax's per-call
  // costs are paid once per run, not once per page. A run's pages share their quantizers
  // (same decay state). Decode only: prefill tiles are already large.
  const size_t run_pages = gemm ? 1 : std::max<size_t>(1, kRunTokens / bt);
  sc.norms.resize(run_pages * bt);
  if (m == 0) return;
  const auto same_quantizers = [&](size_t a, size_t b) {
    return (!keys.decayed || keys.pages->is_decayed(a) == keys.pages->is_decayed(b)) &&
           (!values.decayed || values.pages->is_decayed(a) == values.pages->is_decayed(b));
  };

  const size_t t_begin = std::max(mask.lo[0], page_begin * bt);
  const size_t t_end = std::min(mask.hi[m - 1] + 1, page_end * bt);
  if (t_begin >= t_end) return;
  // Pages in reading order. When every row sees every token of [t_begin, t_end) (decode over
  // the codes), the softmax does not depend on the order, so pages of mixed widths (temporal
  // decay, mixed precision) are read width by width: full-width pages, then decay_bits ones,
  // each class in long runs instead of runs broken at every change of width.
  const auto page_tokens = [&](size_t b) { return std::min(bt, n_tokens - b * bt); };
  std::vector<size_t>& order = sc.page_order;
  order.clear();
  for (size_t b = t_begin / bt; b * bt < t_end; ++b) order.push_back(b);
  bool reorder = !gemm && (keys.decayed || values.decayed) && t_begin % bt == 0;
  for (size_t r = 0; reorder && r < m; ++r) reorder = mask.lo[r] <= t_begin && mask.hi[r] + 1 >= t_end;
  if (reorder)
    std::stable_partition(order.begin(), order.end(), [&](size_t b) {
      return !(keys.decayed && keys.pages->is_decayed(b)) && !(values.decayed && values.pages->is_decayed(b));
    });
  size_t r0 = 0, r1 = 0;  // rows active on the current run of pages
  for (size_t i = 0, np = 1; i < order.size(); i += np) {
    const size_t b = order[i];
    np = 1;  // a run: pages adjacent in `order` (in position too unless reordered), one width,
             // every page but the last full
    while (np < run_pages && i + np < order.size() && (reorder || order[i + np] == b + np) &&
           same_quantizers(b, order[i + np]) && page_tokens(order[i + np - 1]) == bt)
      ++np;
    // Reordered runs are placed at t_begin: every row sees all of them, so the mask (all
    // that tb0 is used for) passes them whole.
    const size_t tb0 = reorder ? t_begin : b * bt;
    size_t nb = 0;
    for (size_t j = 0; j < np; ++j) nb += page_tokens(order[i + j]);
    while (r0 < m && mask.hi[r0] < tb0) ++r0;          // rows that end before this page
    while (r1 < m && mask.lo[r1] < tb0 + nb) ++r1;     // rows that start before its end
    if (r0 >= r1) continue;
    const size_t mr = r1 - r0;
    sc.scores.resize(mr * nb);
    // Temporal decay: a decayed block has its own (fewer-bit) quantizer with the same
    // rotation, so the prepared query state and the rotated-domain accumulator are shared.
    const Quantizer& kb = keys.decayed ? keys.block_quantizer(b) : kq;
    const Quantizer& vb = values.decayed ? values.block_quantizer(b) : vq;
    const uint8_t* kcodes = keys.pages->code_blocks[b].get();
    const uint8_t* vcodes = values.pages->code_blocks[b].get();
    const uint8_t* vnorms_run = values.pages->norm_blocks[b].get();
    if (np > 1) {
      const size_t kcb = kb.code_bytes(), vcb = vb.code_bytes(), vnb = vq.norm_bytes();
      sc.run_kcodes.resize(nb * kcb);
      sc.run_vcodes.resize(nb * vcb);
      sc.run_vnorms.resize(nb * vnb);
      for (size_t j = 0; j < np; ++j) {
        const size_t pj = order[i + j], tj = page_tokens(pj);
        std::memcpy(sc.run_kcodes.data() + j * bt * kcb, keys.pages->code_blocks[pj].get(), tj * kcb);
        std::memcpy(sc.run_vcodes.data() + j * bt * vcb, values.pages->code_blocks[pj].get(), tj * vcb);
        std::memcpy(sc.run_vnorms.data() + j * bt * vnb, values.pages->norm_blocks[pj].get(), tj * vnb);
        kq.load_norms(keys.pages->norm_blocks[pj].get(), tj, sc.norms.data() + j * bt);
      }
      kcodes = sc.run_kcodes.data();
      vcodes = sc.run_vcodes.data();
      vnorms_run = sc.run_vnorms.data();
    } else {
      kq.load_norms(keys.pages->norm_blocks[b].get(), nb, sc.norms.data());
    }
    if (gemm) {
      sc.tile.resize(nb * d);
      kb.dequantize_rotated(kcodes, nb, sc.tile.data());
      Eigen::Map<RowMatrix> K(sc.tile.data(), static_cast<Eigen::Index>(nb), static_cast<Eigen::Index>(d));
      Eigen::Map<const Eigen::VectorXf> kn(sc.norms.data(), static_cast<Eigen::Index>(nb));
      K = kn.asDiagonal() * K;
      Eigen::Map<const RowMatrix> Q(state + r0 * sf, static_cast<Eigen::Index>(mr),
                                    static_cast<Eigen::Index>(d));
      Eigen::Map<RowMatrix> S(sc.scores.data(), static_cast<Eigen::Index>(mr), static_cast<Eigen::Index>(nb));
      S.noalias() = Q * K.transpose();
    } else {
      kb.scores(state + r0 * sf, mr, kcodes, sc.norms.data(), nb, sc.scores.data(), nb);
    }
    softmax_page(sc.scores.data(), nb, tb0, r0, r1, mask, scale, d, sc.row_max.data(),
                 sc.row_sum.data(), sc.acc.data());
    size_t kept = nb;  // sparse V: the value rows summed, listed in sc.sparse_index when < nb
    if (sparse_v_threshold > 0.0f && !gemm) {  // prefill pages serve many rows: kept dense
      kept = sparse_v_keep(sc, nb, mr, sparse_v_threshold);
      if (kept == 0) continue;  // no value work for a page below the threshold everywhere
    }
    vq.load_norms(vnorms_run, nb, sc.norms.data());
    if (gemm) {
      vb.dequantize_rotated(vcodes, nb, sc.tile.data());
      Eigen::Map<RowMatrix> V(sc.tile.data(), static_cast<Eigen::Index>(nb), static_cast<Eigen::Index>(d));
      Eigen::Map<const Eigen::VectorXf> vn(sc.norms.data(), static_cast<Eigen::Index>(nb));
      V = vn.asDiagonal() * V;
      Eigen::Map<const RowMatrix> W(sc.scores.data(), static_cast<Eigen::Index>(mr), static_cast<Eigen::Index>(nb));
      Eigen::Map<RowMatrix> A(sc.acc.data() + r0 * d, static_cast<Eigen::Index>(mr), static_cast<Eigen::Index>(d));
      A.noalias() += W * V;
    } else if (kept < nb) {
      vb.accumulate_rows(sc.scores.data(), nb, mr, vcodes, sc.norms.data(), nb, sc.sparse_index.data(), kept,
                         sc.acc.data() + r0 * d);
    } else {
      vb.accumulate(sc.scores.data(), nb, mr, vcodes, sc.norms.data(), nb, sc.acc.data() + r0 * d);
    }
  }
}

RowMask make_row_mask(size_t n, size_t T_q, size_t G, const AttentionOptions& options) {
  RowMask mask;
  mask.lo.resize(G * T_q);
  mask.hi.resize(G * T_q);
  for (size_t t = 0; t < T_q; ++t) {
    const size_t hi = options.causal ? n - T_q + t : n - 1;
    const size_t lo = options.window && hi + 1 > *options.window ? hi + 1 - *options.window : 0;
    for (size_t g = 0; g < G; ++g) {
      mask.lo[t * G + g] = lo;
      mask.hi[t * G + g] = hi;
    }
  }
  return mask;
}

}  // namespace turboquant
