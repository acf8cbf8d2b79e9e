// Attention over a KVCache layer's segments (cache/segments.h): the code pages through the
// kernels of attention.h (split-K across the thread pool), the fp16 sinks and window read
// in place as fp16, merged under one softmax. Attention does not know which policy put a
// token where; it asks the flush policy only which queries it may answer and whether it
// wants the window tokens' weights.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "backend/cpu/kernels.h"
#include "turboquant/attention.h"
#include "turboquant/error.h"
#include "turboquant/kv_cache.h"
#include "turboquant/thread_pool.h"
#include "kv_cache_guard.h"

namespace turboquant {

void KVCache::check_attend(int layer, const float* queries, size_t T_q, const AttentionOptions& options) const {
  const ReadScope guard(*this, "check_attend");
  check_layer(layer);
  const size_t n = segments_.size[static_cast<size_t>(layer)];
  TQ_CHECK(T_q >= 1, InvalidArgument, "attend needs at least one query");
  TQ_CHECK(n > 0, InvalidArgument, "attend on an empty cache: layer ", layer,
           " holds no tokens (append keys and values first)");
  TQ_CHECK(T_q <= n, InvalidArgument, "attend got ", T_q, " queries per head but layer ", layer,
           " holds only ", n, " tokens (queries are the last positions of the cache)");
  TQ_CHECK(!options.window || *options.window >= 1, InvalidArgument, "window must be >= 1");
  const auto d = static_cast<size_t>(config_.head_dim);
  const float scale = options.scale ? *options.scale : 1.0f / std::sqrt(static_cast<float>(d));
  TQ_CHECK(std::isfinite(scale), InvalidArgument, "scale must be finite, got ", scale);
  for (size_t i = 0; i < static_cast<size_t>(config_.n_q_heads) * T_q * d; ++i) {
    TQ_CHECK(std::isfinite(queries[i]), InvalidArgument, "queries contain NaN or Inf (element ", i, ")");
  }
  TQ_CHECK(options.sparse_v_threshold >= 0.0f && options.sparse_v_threshold < 1.0f, InvalidArgument,
           "sparse_v_threshold must be in [0, 1), got ", options.sparse_v_threshold);
  flush_->check_attend(static_cast<size_t>(layer), n, T_q, options.window, options.causal);
}

void KVCache::attend(int layer, const float* queries, size_t T_q, float* out,
                     const AttentionOptions& options) const {
  const ReadScope guard(*this, "attend");
  check_attend(layer, queries, T_q, options);
  const size_t n = segments_.size[static_cast<size_t>(layer)];
  const auto d = static_cast<size_t>(config_.head_dim);
  const float scale = options.scale ? *options.scale : 1.0f / std::sqrt(static_cast<float>(d));
  if (config_.windowed()) return attend_segments(layer, queries, T_q, out, options);
  const auto G = static_cast<size_t>(config_.group_size());
  const size_t m = G * T_q;
  const RowMask mask = make_row_mask(n, T_q, G, options);
  // KV heads (and, for decode, chunks of their tokens) split across the thread pool.
  // Query head h*G + g, position t is row t*G + g of KV head h; with G = 1 or T_q = 1 that is
  // already the caller's layout, so queries and outputs are used in place.
  const auto H = static_cast<size_t>(config_.n_kv_heads);
  const bool in_place = G == 1 || T_q == 1;
  std::vector<float> q, o;
  if (!in_place) {
    q.resize(H * m * d);
    o.resize(H * m * d);
    for (size_t h = 0; h < H; ++h)
      for (size_t g = 0; g < G; ++g)
        for (size_t t = 0; t < T_q; ++t)
          std::memcpy(&q[(h * m + t * G + g) * d], queries + ((h * G + g) * T_q + t) * d, d * sizeof(float));
  }
  std::vector<HeadTask> tasks(H);
  for (size_t h = 0; h < H; ++h) {
    HeadTask& task = tasks[h];
    task.keys = head_codes(layer, static_cast<int>(h), KVRole::kKey);
    task.values = head_codes(layer, static_cast<int>(h), KVRole::kValue);
    task.n_tokens = n;
    task.queries = in_place ? queries + h * m * d : &q[h * m * d];
    task.mask = &mask;
    task.out = in_place ? out + h * m * d : &o[h * m * d];
  }
  attend_heads(tasks, m, scale, options.sparse_v_threshold);
  if (!in_place) {
    for (size_t h = 0; h < H; ++h)
      for (size_t g = 0; g < G; ++g)
        for (size_t t = 0; t < T_q; ++t)
          std::memcpy(out + ((h * G + g) * T_q + t) * d, &o[(h * m + t * G + g) * d], d * sizeof(float));
  }
}

void KVCache::attend_segments(int layer, const float* queries, size_t T_q, float* out,
                              const AttentionOptions& options) const {
  const auto l = static_cast<size_t>(layer);
  const size_t n = segments_.size[l], c = segments_.coded[l];
  const size_t ns = segments_.sink_tokens(l);
  const auto d = static_cast<size_t>(config_.head_dim);
  const float scale = options.scale ? *options.scale : 1.0f / std::sqrt(static_cast<float>(d));
  const auto G = static_cast<size_t>(config_.group_size());
  const size_t m = G * T_q;
  const float thr = options.sparse_v_threshold;
  const RowMask mask = make_row_mask(n, T_q, G, options);  // over all n tokens
  // Codes hold tokens [ns, c) at code indices [0, c - ns). Rows that see at least one of them
  // form a contiguous range [ra, rb) (lo and hi are non-decreasing).
  size_t ra = 0, rb = 0;
  if (c > ns) {
    while (ra < m && mask.hi[ra] < ns) ++ra;
    rb = ra;
    while (rb < m && mask.lo[rb] < c) ++rb;
  }
  const size_t mc = rb - ra;
  RowMask cmask;
  cmask.lo.resize(mc);
  cmask.hi.resize(mc);
  for (size_t r = 0; r < mc; ++r) {
    cmask.lo[r] = std::max(mask.lo[ra + r], ns) - ns;
    cmask.hi[r] = std::min(mask.hi[ra + r], c - 1) - ns;
  }

  // fp16 tokens: the sinks [0, ns) then the window [c, n), indexed as one array of nf rows
  // (read in place as fp16 by the f16 kernels). Query rows go in chunks of kRowChunk: the
  // chunk's scores cover the union of its rows' visible fp16 rows, each row masked after.
  const size_t nw = n - c, nf = ns + nw;
  const auto& kernels = cpu::active_kernels();
  constexpr size_t kRowChunk = 16;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // Visible fp16 rows of query row r: sinks [sa, sb) and window [wa, wb) (fp16-array
  // indices; the window part is empty when wa >= wb).
  const auto sink_range = [&](size_t r) {
    const size_t a = options.sinks_visible ? 0 : std::min(mask.lo[r], ns);
    return std::pair<size_t, size_t>{a, std::min(mask.hi[r] + 1, ns)};
  };
  const auto window_range = [&](size_t r) {
    const size_t wa = ns + std::max(mask.lo[r], c) - c;
    const size_t wb = mask.hi[r] + 1 > c ? ns + mask.hi[r] + 1 - c : ns;
    return std::pair<size_t, size_t>{wa, std::max(wa, wb)};
  };
  // Queries in row order (row t*G + g of KV head h), all heads.
  const auto H = static_cast<size_t>(config_.n_kv_heads);
  std::vector<float> qall(H * m * d);
  for (size_t h = 0; h < H; ++h)
    for (size_t g = 0; g < G; ++g)
      for (size_t t = 0; t < T_q; ++t)
        std::memcpy(&qall[(h * m + t * G + g) * d], queries + ((h * G + g) * T_q + t) * d, d * sizeof(float));
  // The coded part of every head first (split-K across the pool like attend()): normalised
  // outputs and the rows' softmax max / sum, merged with the fp16 part below.
  std::vector<float> ocall(H * mc * d), cmax(H * mc), csum(H * mc);
  if (mc > 0) {
    std::vector<HeadTask> tasks(H);
    for (size_t h = 0; h < H; ++h) {
      HeadTask& task = tasks[h];
      task.keys = head_codes(layer, static_cast<int>(h), KVRole::kKey);
      task.values = head_codes(layer, static_cast<int>(h), KVRole::kValue);
      task.n_tokens = c - ns;
      task.queries = &qall[(h * m + ra) * d];
      task.mask = &cmask;
      task.out = &ocall[h * mc * d];
      task.row_max = &cmax[h * mc];
      task.row_sum = &csum[h * mc];
    }
    attend_heads(tasks, mc, scale, thr);
  }
  // KV heads are independent (own buffers): split across the thread pool like attend().
  // The flush policy may ask for the window tokens' squared weights (mixed precision: their
  // importance); attention does not know what it does with them.
  const bool rate = flush_->rates_window() && nw > 0;
  flush_->attended(l, n);
  parallel_for(H, 1, [&](size_t h0, size_t h1) {
    std::vector<float> s(kRowChunk * nf), acc(kRowChunk * d), z(kRowChunk), imp(rate ? nw : 0);
    for (size_t h = h0; h < h1; ++h) {
      std::fill(imp.begin(), imp.end(), 0.0f);
      const float* q = &qall[h * m * d];
      const float* oc = ocall.data() + h * mc * d;  // mc may be 0
      const float* row_max = cmax.data() + h * mc;
      const float* row_sum = csum.data() + h * mc;
      const size_t ik = index(layer, static_cast<int>(h), KVRole::kKey);
      const size_t iv = index(layer, static_cast<int>(h), KVRole::kValue);
      const uint16_t* ksink = ns > 0 ? segments_.sinks[ik].data() : nullptr;
      const uint16_t* vsink = ns > 0 ? segments_.sinks[iv].data() : nullptr;
      // Window row ns + i is the window's row i.
      const uint16_t* kwin = nw > 0 ? segments_.window[ik].data() : nullptr;
      const uint16_t* vwin = nw > 0 ? segments_.window[iv].data() : nullptr;
      for (size_t r0 = 0; r0 < m; r0 += kRowChunk) {
        const size_t r1 = std::min(m, r0 + kRowChunk), mr = r1 - r0;
        // Rows are sorted by position: the union of their ranges runs from the first row's
        // start to the last row's end.
        const size_t usa = sink_range(r0).first, usb = sink_range(r1 - 1).second;
        const size_t uwa = window_range(r0).first, uwb = window_range(r1 - 1).second;
        if (usb > usa) kernels.f16_scores(&q[r0 * d], mr, ksink + usa * d, usb - usa, d, s.data() + usa, nf);
        if (uwb > uwa)
          kernels.f16_scores(&q[r0 * d], mr, kwin + (uwa - ns) * d, uwb - uwa, d, s.data() + uwa, nf);
        std::fill(acc.begin(), acc.begin() + static_cast<std::ptrdiff_t>(mr * d), 0.0f);
        for (size_t r = r0; r < r1; ++r) {
          float* sr = s.data() + (r - r0) * nf;
          const auto [sa, sb] = sink_range(r);
          const auto [wa, wb] = window_range(r);
          float mf = kNegInf;
          for (const auto& [a, b] : {std::pair{sa, sb}, std::pair{wa, wb}})
            for (size_t t = a; t < b; ++t) {
              sr[t] *= scale;
              mf = std::max(mf, sr[t]);
            }
          const bool has_c = r >= ra && r < rb;
          const float mcx = has_c ? row_max[r - ra] : kNegInf;
          const float M = std::max(mf, mcx);
          float zr = 0.0f;
          float* ar = acc.data() + (r - r0) * d;
          if (has_c) {
            const float f = row_sum[r - ra] * std::exp(mcx - M);
            zr += f;
            for (size_t j = 0; j < d; ++j) ar[j] = f * oc[(r - ra) * d + j];
          }
          // Weights exp(s - M) on the visible rows, 0 on the rest of the chunk's union.
          for (size_t t = usa; t < sa; ++t) sr[t] = 0.0f;
          for (size_t t = sb; t < usb; ++t) sr[t] = 0.0f;
          for (size_t t = uwa; t < wa; ++t) sr[t] = 0.0f;
          for (size_t t = wb; t < uwb; ++t) sr[t] = 0.0f;
          for (const auto& [a, b] : {std::pair{sa, sb}, std::pair{wa, wb}})
            if (b > a) zr += kernels.exp_sum(sr + a, b - a, M);
          if (rate && zr > 0.0f)  // importance: Σ over query rows of the squared weight
            for (size_t t = wa; t < wb; ++t) imp[t - ns] += (sr[t] / zr) * (sr[t] / zr);
          if (thr > 0.0f)  // sparse V: the weight still counts in the normalisation
            for (const auto& [a, b] : {std::pair{sa, sb}, std::pair{wa, wb}})
              for (size_t t = a; t < b; ++t)
                if (sr[t] < thr) sr[t] = 0.0f;
          z[r - r0] = zr;
        }
        if (usb > usa) kernels.f16_accumulate(s.data() + usa, nf, mr, vsink + usa * d, usb - usa, d, acc.data());
        if (uwb > uwa)
          kernels.f16_accumulate(s.data() + uwa, nf, mr, vwin + (uwa - ns) * d, uwb - uwa, d, acc.data());
        for (size_t r = r0; r < r1; ++r) {
          const float inv = z[r - r0] > 0.0f ? 1.0f / z[r - r0] : 0.0f;
          const size_t t = r / G, qh = h * G + r % G;
          for (size_t j = 0; j < d; ++j) out[(qh * T_q + t) * d + j] = acc[(r - r0) * d + j] * inv;
        }
      }
      if (rate) flush_->rate(l, h, imp.data(), nw);
    }
  });
}

}  // namespace turboquant
