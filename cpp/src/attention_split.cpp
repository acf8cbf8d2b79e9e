// Split-K decode attention (flash-decoding) over several KV heads: attend_heads (attention.h).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>

#include "turboquant/attention.h"
#include "turboquant/error.h"
#include "turboquant/thread_pool.h"

namespace turboquant {
namespace {

// Per-thread buffers, reused across calls (work items of one call never nest).
AttentionScratch& item_scratch() {
  thread_local AttentionScratch s;
  return s;
}

// Pages [first, last) a task's rows can see, and the chunk size in pages.
struct Span {
  size_t first = 0, last = 0, chunk_pages = 1;
  size_t chunks() const { return (last - 1) / chunk_pages - first / chunk_pages + 1; }
  // Chunk c covers pages [chunk_begin(c), chunk_end(c)).
  size_t chunk_begin(size_t c) const { return c == 0 ? first : (first / chunk_pages + c) * chunk_pages; }
  size_t chunk_end(size_t c) const { return std::min(last, (first / chunk_pages + c + 1) * chunk_pages); }
};

Span task_span(const HeadTask& t, size_t m) {
  const size_t bt = t.keys.block_tokens;
  Span s;
  s.first = t.mask->lo[0] / bt;
  s.last = (t.mask->hi[m - 1] + bt) / bt;
  s.chunk_pages = std::max<size_t>(1, kSplitChunkTokens / bt);
  return s;
}

}  // namespace

void attend_heads(const std::vector<HeadTask>& tasks, size_t m, float scale, float sparse_v_threshold) {
  if (m == 0 || tasks.empty()) return;
  for (const HeadTask& t : tasks) check_head_call(t.keys, t.values, t.n_tokens, m, *t.mask);
  const bool gemm = m >= kGemmMinRows;
  // Work items: item_begin[i] .. item_begin[i + 1] are task i's chunks (one when not split).
  std::vector<size_t> item_begin(tasks.size() + 1, 0);
  std::vector<Span> spans(tasks.size());
  for (size_t i = 0; i < tasks.size(); ++i) {
    spans[i] = task_span(tasks[i], m);
    const size_t chunks = gemm ? 1 : spans[i].chunks();
    item_begin[i + 1] = item_begin[i] + chunks;
  }
  const size_t items = item_begin.back();
  const auto d = static_cast<size_t>(tasks[0].keys.quantizer->dim());
  // Partials of split tasks: per item m × d accumulator, then m maxima and m sums.
  const size_t stride = m * (d + 2);
  std::unique_ptr<float[]> partial(items > tasks.size() ? new float[items * stride] : nullptr);
  std::unique_ptr<std::atomic<size_t>[]> left(new std::atomic<size_t>[tasks.size()]);
  for (size_t i = 0; i < tasks.size(); ++i) left[i].store(item_begin[i + 1] - item_begin[i]);
  // Prepared queries of split tasks: made once by whichever chunk comes first.
  std::vector<size_t> state_at(tasks.size() + 1, 0);
  for (size_t i = 0; i < tasks.size(); ++i)
    state_at[i + 1] = state_at[i] + (item_begin[i + 1] - item_begin[i] > 1 ? m * tasks[i].keys.quantizer->query_state_floats() : 0);
  std::vector<float> states(state_at.back());
  std::unique_ptr<std::once_flag[]> prepared(new std::once_flag[tasks.size()]);

  // Merges task i's chunk partials in chunk order: o = Σ_c e^(M_c - M) acc_c / Σ_c e^(M_c - M) z_c.
  const auto merge = [&](size_t i) {
    const HeadTask& t = tasks[i];
    const size_t c0 = item_begin[i], nc = item_begin[i + 1] - c0;
    for (size_t r = 0; r < m; ++r) {
      float M = -std::numeric_limits<float>::infinity();
      for (size_t c = 0; c < nc; ++c) M = std::max(M, partial[(c0 + c) * stride + m * d + r]);
      float z = 0.0f;
      float* o = t.out + r * d;
      std::fill(o, o + d, 0.0f);
      if (M != -std::numeric_limits<float>::infinity()) {
        for (size_t c = 0; c < nc; ++c) {
          const float* p = partial.get() + (c0 + c) * stride;
          const float mc = p[m * d + r];
          if (mc == -std::numeric_limits<float>::infinity()) continue;
          const float f = std::exp(mc - M);
          z += f * p[m * d + m + r];
          const float* a = p + r * d;
          for (size_t j = 0; j < d; ++j) o[j] += f * a[j];
        }
      }
      const float inv = z > 0.0f ? 1.0f / z : 0.0f;
      for (size_t j = 0; j < d; ++j) o[j] *= inv;
      if (t.row_max) t.row_max[r] = M;
      if (t.row_sum) t.row_sum[r] = z;
    }
    t.values.quantizer->finish_rotated(t.out, m);
  };

  parallel_for(items, 1, [&](size_t b, size_t e) {
    // Decode reuses per-thread buffers; prefill tiles are large, so they are not kept.
    AttentionScratch local;
    AttentionScratch& sc = gemm ? local : item_scratch();
    for (size_t it = b; it < e; ++it) {
      const size_t i = static_cast<size_t>(std::upper_bound(item_begin.begin(), item_begin.end(), it) -
                                           item_begin.begin()) - 1;
      const HeadTask& t = tasks[i];
      const size_t nc = item_begin[i + 1] - item_begin[i];
      if (nc == 1) {  // whole head: attend_head as is
        attend_head(t.keys, t.values, t.n_tokens, t.queries, m, *t.mask, scale, t.out, sc, false, false,
                    sparse_v_threshold);
        if (t.row_max) std::copy_n(sc.row_max.data(), m, t.row_max);
        if (t.row_sum) std::copy_n(sc.row_sum.data(), m, t.row_sum);
        continue;
      }
      float* state = states.data() + state_at[i];
      std::call_once(prepared[i], [&] { t.keys.quantizer->prepare_queries(t.queries, m, state); });
      const size_t c = it - item_begin[i];
      attend_pages(t.keys, t.values, t.n_tokens, state, m, *t.mask, scale, false,
                   spans[i].chunk_begin(c), spans[i].chunk_end(c), sc, sparse_v_threshold);
      float* p = partial.get() + it * stride;
      std::copy_n(sc.acc.data(), m * d, p);
      std::copy_n(sc.row_max.data(), m, p + m * d);
      std::copy_n(sc.row_sum.data(), m, p + m * d + m);
      // The last chunk of a task to finish merges it (the merge order is fixed regardless).
      if (left[i].fetch_sub(1, std::memory_order_acq_rel) == 1) merge(i);
    }
  });
}

}  // namespace turboquant
