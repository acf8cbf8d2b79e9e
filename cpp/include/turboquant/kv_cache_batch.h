// Attention of a batch of sequences, one KVCache per sequence (continuous batching, DESIGN
// §3): one call per layer and decode step for every row, the rows spread across the
// library's thread pool. Row i computes exactly what rows[i].cache->attend computes for its
// queries alone (bit for bit: the split-K chunking of attention does not depend on threads).
#pragma once

#include <cstddef>
#include <vector>

#include "turboquant/attention.h"
#include "turboquant/kv_cache.h"

namespace turboquant {

// One sequence of a batch: its cache, and which of the batch's T query positions are its
// queries (a left- or right-padded batch gives a row fewer real queries than T; count 0:
// the row takes no part in this call).
struct BatchAttendRow {
  const KVCache* cache = nullptr;
  size_t query_start = 0;
  size_t query_count = 0;
  AttentionOptions options;
};

// queries and out are B × n_q_heads × T × head_dim (B = rows.size(); every cache has the
// same n_q_heads and head_dim). Row i's queries are positions [query_start, query_start +
// query_count) of its T, the last query_count positions of its cache's `layer`; its output
// goes to the same positions of out, and every other position of out is set to 0. Every row
// is checked first (as KVCache::attend checks, plus the batch's shapes; two rows may not
// share a cache): on a bad argument InvalidArgument names the row, and nothing ran.
void attend_batch(const std::vector<BatchAttendRow>& rows, int layer, const float* queries, size_t T,
                  float* out);

}  // namespace turboquant
