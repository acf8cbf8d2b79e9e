// attend_batch (kv_cache_batch.h): every row checked, then the rows split across the thread
// pool, each row one KVCache::attend (whose own parallel work then runs inline on its thread).
#include "turboquant/kv_cache_batch.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <unordered_map>

#include "turboquant/error.h"
#include "turboquant/thread_pool.h"

namespace turboquant {

void attend_batch(const std::vector<BatchAttendRow>& rows, int layer, const float* queries, size_t T,
                  float* out) {
  TQ_CHECK(!rows.empty(), InvalidArgument, "attend_batch needs at least one row");
  TQ_CHECK(rows[0].cache != nullptr, InvalidArgument, "attend_batch: row 0 has no cache");
  const KVCacheConfig& c0 = rows[0].cache->config();
  const auto Hq = static_cast<size_t>(c0.n_q_heads), d = static_cast<size_t>(c0.head_dim);
  const size_t row_floats = Hq * T * d;
  std::unordered_map<const KVCache*, size_t> seen;
  for (size_t i = 0; i < rows.size(); ++i) {
    const BatchAttendRow& r = rows[i];
    TQ_CHECK(r.cache != nullptr, InvalidArgument, "attend_batch: row ", i, " has no cache");
    const auto [it, fresh] = seen.emplace(r.cache, i);
    TQ_CHECK(fresh, InvalidArgument, "attend_batch: rows ", it->second, " and ", i,
             " share one cache (each row must be its own sequence's cache)");
    const KVCacheConfig& c = r.cache->config();
    TQ_CHECK(static_cast<size_t>(c.n_q_heads) == Hq && static_cast<size_t>(c.head_dim) == d, InvalidArgument,
             "attend_batch: row ", i, "'s cache has n_q_heads=", c.n_q_heads, ", head_dim=", c.head_dim,
             " but row 0's has n_q_heads=", Hq, ", head_dim=", d, " (one batch, one query shape)");
    TQ_CHECK(r.query_start <= T && r.query_count <= T - r.query_start, InvalidArgument, "attend_batch: row ", i,
             "'s queries [", r.query_start, ", ", r.query_start + r.query_count, ") exceed the batch's ", T,
             " query positions");
  }
  // A row's queries as attend takes them (H_q × count × d): in place when the row uses all
  // T positions, else gathered.
  std::vector<std::vector<float>> gathered(rows.size());
  std::vector<const float*> q(rows.size(), nullptr);
  std::vector<size_t> active;
  for (size_t i = 0; i < rows.size(); ++i) {
    const BatchAttendRow& r = rows[i];
    if (r.query_count == 0) continue;
    const float* src = queries + i * row_floats;
    if (r.query_count == T) {
      q[i] = src;
    } else {
      gathered[i].resize(Hq * r.query_count * d);
      for (size_t h = 0; h < Hq; ++h)
        std::memcpy(&gathered[i][h * r.query_count * d], src + (h * T + r.query_start) * d,
                    r.query_count * d * sizeof(float));
      q[i] = gathered[i].data();
    }
    try {
      r.cache->check_attend(layer, q[i], r.query_count, r.options);
    } catch (const InvalidArgument& e) {
      throw InvalidArgument(detail::concat("attend_batch: row ", i, ": ", e.what()));
    } catch (const NotSupported& e) {
      throw NotSupported(detail::concat("attend_batch: row ", i, ": ", e.what()));
    }
    active.push_back(i);
  }
  const auto run_row = [&](size_t i) {
    const BatchAttendRow& r = rows[i];
    float* dst = out + i * row_floats;
    if (r.query_count == T) {
      r.cache->attend(layer, q[i], T, dst, r.options);
      return;
    }
    std::vector<float> o(Hq * r.query_count * d);
    r.cache->attend(layer, q[i], r.query_count, o.data(), r.options);
    for (size_t h = 0; h < Hq; ++h) {
      float* oh = dst + h * T * d;
      std::fill(oh, oh + r.query_start * d, 0.0f);
      std::memcpy(oh + r.query_start * d, &o[h * r.query_count * d], r.query_count * d * sizeof(float));
      std::fill(oh + (r.query_start + r.query_count) * d, oh + T * d, 0.0f);
    }
  };
  for (size_t i = 0; i < rows.size(); ++i)
    if (rows[i].query_count == 0) std::fill(out + i * row_floats, out + (i + 1) * row_floats, 0.0f);
  // One row keeps attend's own split across the pool (KV heads, split-K); several rows go one
  // per task, their attends then running inline.
  if (active.size() == 1) {
    run_row(active[0]);
    return;
  }
  parallel_for(active.size(), 1, [&](size_t b, size_t e) {
    for (size_t k = b; k < e; ++k) run_row(active[k]);
  });
}

}  // namespace turboquant
