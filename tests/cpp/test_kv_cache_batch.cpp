// attend_batch (kv_cache_batch.h): each row bit for bit what its cache's own attend gives,
// padding positions zero, and bad batches refused before any row runs.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kv_test_util.h"
#include "turboquant/error.h"
#include "turboquant/kv_cache.h"
#include "turboquant/kv_cache_batch.h"
#include "turboquant/thread_pool.h"

using namespace turboquant;
using turboquant::testing::gaussian;

namespace {

constexpr int kD = 32;
constexpr int kQHeads = 6;

// One row kind per index: plain codes, fp16 window + sinks, mixed precision, temporal decay,
// all GQA (6 query heads over 2 or 3 KV heads).
KVCacheConfig row_config(size_t kind) {
  KVCacheConfig c;
  c.head_dim = kD;
  c.n_q_heads = kQHeads;
  c.n_kv_heads = kind % 2 ? 3 : 2;
  c.key_bits = 4;
  c.value_bits = 3;
  c.block_tokens = 8;
  c.seed = 11 + kind;
  if (kind % 4 == 1) {
    c.fp16_window = 12;
    c.fp16_sinks = 3;
  } else if (kind % 4 == 2) {
    c.fp16_window = 16;
    c.fp16_sinks = 2;
    c.decay_bits = 2;
    c.mixed_group_blocks = 2;
    c.mixed_keep_blocks = 1;
  } else if (kind % 4 == 3) {
    c.decay_after = 16;
    c.decay_bits = 2;
  }
  return c;
}

std::unique_ptr<KVCache> filled(size_t kind, size_t tokens) {
  auto kv = std::make_unique<KVCache>(row_config(kind));
  const auto H = static_cast<size_t>(kv->config().n_kv_heads);
  // in a few appends, so that windows flush and blocks decay along the way
  for (size_t t0 = 0, step = 0; t0 < tokens; ++step) {
    const size_t T = std::min<size_t>(tokens - t0, 5 + step % 7);
    const auto k = gaussian(H * T * kD, 100 * kind + t0), v = gaussian(H * T * kD, 100 * kind + t0 + 50);
    kv->append(0, k.data(), v.data(), T);
    t0 += T;
  }
  return kv;
}

struct Batch {
  std::vector<std::unique_ptr<KVCache>> caches;
  std::vector<BatchAttendRow> rows;
};

// B rows of different kinds and lengths; row i uses query positions [start, start + count)
// of T (left padding: start > 0; a row with count 0 sits the call out).
Batch make_batch(size_t T, const std::vector<std::pair<size_t, size_t>>& spans) {
  Batch b;
  for (size_t i = 0; i < spans.size(); ++i) {
    b.caches.push_back(filled(i, 20 + 13 * i));
    BatchAttendRow r;
    r.cache = b.caches.back().get();
    r.query_start = spans[i].first;
    r.query_count = spans[i].second;
    if (i % 3 == 1) r.options.window = 9;
    if (i % 4 == 1 && i % 3 == 2) r.options.sinks_visible = true;
    if (i % 4 == 3) r.options.sparse_v_threshold = 0.01f;
    b.rows.push_back(r);
  }
  (void)T;
  return b;
}

void expect_rows_match(size_t T, const std::vector<std::pair<size_t, size_t>>& spans) {
  Batch a = make_batch(T, spans), b = make_batch(T, spans);  // twins: attends may rate tokens
  const size_t B = spans.size(), per_row = static_cast<size_t>(kQHeads) * T * kD;
  const auto queries = gaussian(B * per_row, 7 + T);
  std::vector<float> out(B * per_row, 99.0f);
  attend_batch(a.rows, 0, queries.data(), T, out.data());
  for (size_t i = 0; i < B; ++i) {
    const auto [s, n] = spans[i];
    std::vector<float> want(per_row, 0.0f);
    if (n > 0) {
      std::vector<float> q(kQHeads * n * kD), o(q.size());
      for (size_t h = 0; h < kQHeads; ++h)
        std::memcpy(&q[h * n * kD], &queries[i * per_row + (h * T + s) * kD], n * kD * sizeof(float));
      b.caches[i]->attend(0, q.data(), n, o.data(), b.rows[i].options);
      for (size_t h = 0; h < kQHeads; ++h)
        std::memcpy(&want[(h * T + s) * kD], &o[h * n * kD], n * kD * sizeof(float));
    }
    EXPECT_EQ(0, std::memcmp(want.data(), &out[i * per_row], per_row * sizeof(float))) << "row " << i;
    // the mixed-precision bookkeeping that attend updates moved the same way
    EXPECT_EQ(a.caches[i]->rated_tokens(0), b.caches[i]->rated_tokens(0)) << "row " << i;
    if (a.caches[i]->config().mixed_group_blocks) {
      for (int h = 0; h < a.caches[i]->config().n_kv_heads; ++h)
        EXPECT_EQ(a.caches[i]->window_importance(0, h), b.caches[i]->window_importance(0, h)) << "row " << i;
    }
  }
}

TEST(AttendBatch, DecodeRowsMatchTheirOwnAttend) {
  expect_rows_match(1, {{0, 1}, {0, 1}, {0, 1}, {0, 1}, {0, 1}, {0, 1}, {0, 1}, {0, 1}, {0, 1}});
}

TEST(AttendBatch, PaddedRowsMatchTheirOwnAttendAndPaddingIsZero) {
  // left padding (a prompt shorter than the longest), right padding, a row sitting out
  expect_rows_match(6, {{0, 6}, {2, 4}, {0, 3}, {5, 1}, {0, 0}, {1, 5}, {0, 6}, {3, 2}});
}

TEST(AttendBatch, SameResultOnOneThread) {
  const int before = get_num_threads();
  set_num_threads(1);
  expect_rows_match(3, {{0, 3}, {1, 2}, {0, 3}, {2, 1}});
  set_num_threads(before);
}

TEST(AttendBatch, OneRow) { expect_rows_match(4, {{1, 3}}); }

// A bad batch throws InvalidArgument naming the problem, writes nothing and rates nothing.
void expect_refused(Batch& b, size_t T, const std::string& needle, int layer = 0) {
  const size_t per_row = static_cast<size_t>(kQHeads) * T * kD;
  const auto queries = gaussian(b.rows.size() * per_row, 5);
  std::vector<float> out(b.rows.size() * per_row, 99.0f);
  std::vector<size_t> rated;
  for (const auto& c : b.caches) rated.push_back(c->rated_tokens(0));
  try {
    attend_batch(b.rows, layer, queries.data(), T, out.data());
    ADD_FAILURE() << "no error; expected one naming " << needle;
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
  for (float v : out) ASSERT_EQ(v, 99.0f);
  for (size_t i = 0; i < b.caches.size(); ++i) EXPECT_EQ(rated[i], b.caches[i]->rated_tokens(0));
}

TEST(AttendBatch, RefusesBadBatchesBeforeAnyRowRuns) {
  {
    Batch b;
    expect_refused(b, 1, "at least one row");
  }
  {
    Batch b = make_batch(2, {{0, 2}, {0, 2}, {0, 2}});
    b.rows[2].query_start = 1;  // [1, 3) of 2 positions
    expect_refused(b, 2, "row 2's queries [1, 3) exceed");
  }
  {
    Batch b = make_batch(1, {{0, 1}, {0, 1}, {0, 1}});
    b.rows[2].cache = b.rows[0].cache;
    expect_refused(b, 1, "rows 0 and 2 share one cache");
  }
  {
    Batch b = make_batch(1, {{0, 1}, {0, 1}});
    KVCacheConfig c = row_config(0);
    c.n_q_heads = 4;
    b.caches.push_back(std::make_unique<KVCache>(c));
    BatchAttendRow r;
    r.cache = b.caches.back().get();
    r.query_count = 1;
    b.rows.push_back(r);
    expect_refused(b, 1, "row 2's cache has n_q_heads=4");
  }
  {
    Batch b = make_batch(1, {{0, 1}, {0, 1}, {0, 1}});
    expect_refused(b, 1, "row 0: layer must be in [0, 1), got 3", 3);  // one layer each
  }
  {
    // the mixed-precision row 2 comes first; row 3's window is refused: row 2 rates nothing
    Batch b = make_batch(1, {{0, 1}, {0, 1}, {0, 1}, {0, 1}});
    b.rows[3].options.window = 0;
    expect_refused(b, 1, "row 3: window must be >= 1");
  }
  {
    Batch b = make_batch(1, {{0, 1}, {0, 1}});
    b.rows[1].cache = nullptr;
    expect_refused(b, 1, "row 1 has no cache");
  }
}

}  // namespace
