// Reliability of the cache layer: every bad call throws a typed error naming the problem and
// leaves the cache exactly as it was (sizes, memory_bytes(), attention output); the
// thread-safety rule of kv_cache.h is enforced; long contexts and size_t overflow.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <thread>

#include "kv_test_util.h"
#include "turboquant/error.h"
#include "turboquant/kv_cache.h"
#include "turboquant/serialize.h"

namespace turboquant {
namespace {

using testing::gaussian;

// Everything observable about a cache that a failed call must not change.
struct Snapshot {
  std::vector<size_t> sizes;
  size_t memory = 0;
  std::vector<float> attention;  // layer-0 attention of a fixed query (empty when empty)
  bool operator==(const Snapshot&) const = default;
};

Snapshot snapshot(const KVCache& c) {
  Snapshot s;
  for (int l = 0; l < c.config().n_layers; ++l) s.sizes.push_back(c.size(l));
  s.memory = c.memory_bytes();
  if (c.size(0) > 0) {
    const auto d = static_cast<size_t>(c.head_dim());
    const auto q = gaussian(static_cast<size_t>(c.config().n_q_heads) * d, 99);
    s.attention.resize(q.size());
    c.attend(0, q.data(), 1, s.attention.data());
  }
  return s;
}

KVCacheConfig small_config() {
  KVCacheConfig c;
  c.head_dim = 32;
  c.n_layers = 2;
  c.n_q_heads = 4;
  c.n_kv_heads = 2;
  c.key_bits = 3;
  c.value_bits = 2;
  c.block_tokens = 8;
  c.max_tokens = 40;
  c.seed = 5;
  return c;
}

// A cache holding 10 tokens in layer 0 and 3 in layer 1.
std::unique_ptr<KVCache> filled() {
  auto c = std::make_unique<KVCache>(small_config());
  const auto k = gaussian(2 * 10 * 32, 1), v = gaussian(2 * 10 * 32, 2);
  c->append(0, k.data(), v.data(), 10);
  const auto k1 = gaussian(2 * 3 * 32, 3), v1 = gaussian(2 * 3 * 32, 4);
  c->append(1, k1.data(), v1.data(), 3);
  return c;
}

// Runs fn, expects exception E whose message contains `needle`, and an unchanged cache.
template <typename E, typename Fn>
void expect_rejected(KVCache& c, Fn&& fn, const std::string& needle) {
  const Snapshot before = snapshot(c);
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one mentioning '" << needle << "'";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' does not mention '" << needle << "'";
  }
  EXPECT_TRUE(snapshot(c) == before) << "state changed by a failed call (" << needle << ")";
}

TEST(ReliabilityCpp, NonFiniteInputIsRejectedAndCacheUnchanged) {
  auto c = filled();
  const size_t T = 5, n = 2 * T * 32;
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    // bad value in the keys of head 0, in the values of head 1 (after three streams were
    // encoded into fresh pages: the rollback must give those pages back), and in the last
    // element.
    for (size_t where : {size_t{3}, n / 2 + 7, n - 1}) {
      auto k = gaussian(n, 11), v = gaussian(n, 12);
      (where == n / 2 + 7 ? v : k)[where] = bad;
      expect_rejected<InvalidArgument>(*c, [&] { c->append(0, k.data(), v.data(), T); }, "NaN or Inf");
    }
  }
  auto q = gaussian(4 * 32, 13);
  q[77] = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> out(q.size());
  expect_rejected<InvalidArgument>(*c, [&] { c->attend(0, q.data(), 1, out.data()); }, "NaN or Inf");
}

TEST(ReliabilityCpp, FailedAppendAcrossAPageBoundaryFreesThePagesItTook) {
  auto c = filled();  // 10 tokens, block_tokens 8: 2 pages per stream
  const size_t T = 20, n = 2 * T * 32;
  auto k = gaussian(n, 21), v = gaussian(n, 22);
  v[n - 1] = std::numeric_limits<float>::quiet_NaN();  // fails on the very last stream
  expect_rejected<InvalidArgument>(*c, [&] { c->append(0, k.data(), v.data(), T); }, "NaN or Inf");
  v[n - 1] = 0.5f;
  c->append(0, k.data(), v.data(), T);  // the same append now succeeds
  EXPECT_EQ(c->size(0), 30u);
}

TEST(ReliabilityCpp, LimitsAndRangesAreCheckedBeforeAnyChange) {
  auto c = filled();
  const auto k = gaussian(2 * 31 * 32, 31), v = gaussian(2 * 31 * 32, 32);
  std::vector<float> out(4 * 32 * 20);
  const auto q = gaussian(4 * 32 * 20, 33);
  expect_rejected<InvalidArgument>(*c, [&] { c->append(0, k.data(), v.data(), 31); }, "max_tokens=40");
  expect_rejected<InvalidArgument>(*c, [&] { c->append(2, k.data(), v.data(), 1); }, "layer must be in [0, 2)");
  expect_rejected<InvalidArgument>(*c, [&] { c->append(-1, k.data(), v.data(), 1); }, "layer must be in");
  expect_rejected<InvalidArgument>(*c, [&] { c->attend(0, q.data(), 11, out.data()); }, "holds only 10 tokens");
  expect_rejected<InvalidArgument>(*c, [&] { c->attend(0, q.data(), 0, out.data()); }, "at least one query");
  AttentionOptions w0;
  w0.window = 0;
  expect_rejected<InvalidArgument>(*c, [&] { c->attend(0, q.data(), 1, out.data(), w0); }, "window must be >= 1");
  AttentionOptions bad_scale;
  bad_scale.scale = std::numeric_limits<float>::infinity();
  expect_rejected<InvalidArgument>(*c, [&] { c->attend(0, q.data(), 1, out.data(), bad_scale); }, "scale must be finite");
  std::vector<uint8_t> codes(64), norms(64);
  expect_rejected<InvalidArgument>(*c, [&] { c->copy_out(0, 0, KVRole::kKey, 8, 3, codes.data(), norms.data()); },
                                   "out of range");
  expect_rejected<InvalidArgument>(
      *c, [&] { c->copy_out(0, 0, KVRole::kKey, 1, std::numeric_limits<size_t>::max(), codes.data(), norms.data()); },
      "out of range");
  expect_rejected<InvalidArgument>(*c, [&] { c->copy_out(0, 2, KVRole::kKey, 0, 1, codes.data(), norms.data()); },
                                   "kv_head must be in [0, 2)");
  expect_rejected<InvalidArgument>(
      *c, [&] { c->set_rotation(0, 0, KVRole::kKey, Rotation::create(RotationKind::kDense, 32, 1, 2)); },
      "needs an empty layer");
  expect_rejected<InvalidArgument>(*c, [&] { c->append_encoded(0, 1, {}, {}); }, "code and norm streams");
}

TEST(ReliabilityCpp, AttendOnAnEmptyCacheNamesTheProblem) {
  KVCache c(small_config());
  const auto q = gaussian(4 * 32, 41);
  std::vector<float> out(q.size());
  expect_rejected<InvalidArgument>(c, [&] { c.attend(0, q.data(), 1, out.data()); }, "empty cache");
  expect_rejected<InvalidArgument>(c, [&] { c.attend(1, q.data(), 1, out.data()); }, "layer 1 holds no tokens");
}

TEST(ReliabilityCpp, InvalidConfigsNameTheField) {
  const std::vector<std::pair<std::function<void(KVCacheConfig&)>, std::string>> cases = {
      {[](KVCacheConfig& c) { c.key_bits = 0; }, "key_bits must be in"},
      {[](KVCacheConfig& c) { c.key_bits = 9; }, "key_bits must be in"},
      {[](KVCacheConfig& c) { c.value_bits = -1; }, "value_bits must be in"},
      {[](KVCacheConfig& c) { c.head_dim = 0; }, "head_dim must be in"},
      {[](KVCacheConfig& c) { c.head_dim = 1 << 20; }, "head_dim must be in"},
      {[](KVCacheConfig& c) { c.n_q_heads = 3; }, "must be a multiple of n_kv_heads"},
      {[](KVCacheConfig& c) { c.n_layers = 0; }, "n_layers must be in"},
      {[](KVCacheConfig& c) { c.n_kv_heads = -2; }, "n_kv_heads must be in"},
      {[](KVCacheConfig& c) { c.block_tokens = 0; }, "block_tokens must be in"},
      {[](KVCacheConfig& c) { c.jl_dim = -1; }, "jl_dim must be in"},
      {[](KVCacheConfig& c) { c.key_method = "no_such_method"; }, "no_such_method"},
  };
  for (const auto& [mutate, needle] : cases) {
    KVCacheConfig c = small_config();
    mutate(c);
    try {
      KVCache cache(c);
      ADD_FAILURE() << "accepted a config that should fail with '" << needle << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  }
}

TEST(ReliabilityCpp, HugeRequestsFailAsOutOfMemoryBeforeAllocating) {
  auto c = filled();
  KVCacheConfig unbounded = small_config();
  unbounded.max_tokens = 0;
  KVCache u(unbounded);
  const float dummy[1] = {0.0f};
  // T × heads × head_dim × 4 does not fit size_t: refused before the input is even read.
  expect_rejected<OutOfMemory>(u, [&] { u.append(0, dummy, dummy, std::numeric_limits<size_t>::max() / 8); },
                               "overflows size_t");
  expect_rejected<OutOfMemory>(u, [&] { u.append(0, dummy, dummy, std::numeric_limits<size_t>::max()); },
                               "overflows size_t");
  // max_tokens is checked without wrapping too (old + T would wrap to a small number).
  expect_rejected<InvalidArgument>(*c, [&] { c->append(0, dummy, dummy, std::numeric_limits<size_t>::max() - 5); },
                                   "exceeds max_tokens");
  // An absurd max_tokens is only a bound: nothing is reserved for it.
  KVCacheConfig absurd = small_config();
  absurd.max_tokens = std::numeric_limits<size_t>::max();
  KVCache a(absurd);
  EXPECT_EQ(a.memory_bytes(), KVCache(small_config()).memory_bytes());
}

// --- concurrency ----------------------------------------------------------------------

TEST(ReliabilityCpp, ConcurrentAttendFromManyThreadsMatchesSerial) {
  auto c = filled();
  const size_t d = 32;
  std::vector<std::vector<float>> queries, expected;
  for (int i = 0; i < 8; ++i) {
    queries.push_back(gaussian(4 * 3 * d, 100 + static_cast<uint64_t>(i)));
    expected.emplace_back(4 * 3 * d);
    c->attend(0, queries.back().data(), 3, expected.back().data());
  }
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<float> out(4 * 3 * d);
      for (int rep = 0; rep < 50; ++rep) {
        const auto i = static_cast<size_t>((t + rep) % 8);
        c->attend(0, queries[i].data(), 3, out.data());
        if (std::memcmp(out.data(), expected[i].data(), out.size() * sizeof(float)) != 0) ++mismatches;
        (void)c->size(1);
        (void)c->memory_bytes();
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST(ReliabilityCpp, ConcurrentAttendOnAMixedPrecisionCacheSumsEveryCallsImportance) {
  // Mixed precision: attend (a reader) adds to the window tokens' importance under its own
  // lock. Many threads at once must add exactly what the same calls add one after another.
  KVCacheConfig cfg;
  cfg.head_dim = 32;
  cfg.n_q_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.key_bits = 4;
  cfg.value_bits = 4;
  cfg.block_tokens = 8;
  cfg.fp16_window = 16;
  cfg.decay_bits = 2;
  cfg.mixed_group_blocks = 2;
  cfg.mixed_keep_blocks = 1;
  KVCache serial(cfg), shared(cfg);
  const auto k = gaussian(2 * 60 * 32, 7), v = gaussian(2 * 60 * 32, 8);
  for (KVCache* c : {&serial, &shared}) c->append(0, k.data(), v.data(), 60);
  const auto q = gaussian(4 * 32, 9);
  std::vector<float> out(4 * 32);
  for (int i = 0; i < 4 * 25; ++i) serial.attend(0, q.data(), 1, out.data());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      std::vector<float> o(4 * 32);
      for (int rep = 0; rep < 25; ++rep) shared.attend(0, q.data(), 1, o.data());
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(shared.rated_tokens(0), 60u);
  for (int h = 0; h < 2; ++h) {
    const auto a = serial.window_importance(0, h), b = shared.window_importance(0, h);
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-5f * a[i] + 1e-9f) << "token " << i;
  }
}

// A turboquant_mse quantizer that can be made to pause inside encode or scores, so that a
// second thread deterministically overlaps a mutation or a read.
struct Gate {
  std::mutex m;
  std::condition_variable cv;
  bool armed_encode = false, armed_scores = false, inside = false, release = false;
  void pause() {
    std::unique_lock lock(m);
    inside = true;
    cv.notify_all();
    cv.wait(lock, [&] { return release; });
  }
  void wait_inside() {
    std::unique_lock lock(m);
    cv.wait(lock, [&] { return inside; });
  }
  void open() {
    std::lock_guard lock(m);
    release = true;
    cv.notify_all();
  }
};
Gate* g_gate = nullptr;

class GatedQuantizer : public MseQuantizer {
 public:
  using MseQuantizer::MseQuantizer;
  void quantize_rotated(const float* y, size_t n, uint8_t* codes) const override {
    if (g_gate && g_gate->armed_encode) g_gate->pause();
    MseQuantizer::quantize_rotated(y, n, codes);
  }
  void scores(const float* state, size_t m, const uint8_t* codes, const float* norms, size_t n, float* out,
              size_t out_stride) const override {
    if (g_gate && g_gate->armed_scores) g_gate->pause();
    MseQuantizer::scores(state, m, codes, norms, n, out, out_stride);
  }
};

KVCacheConfig gated_config() {
  static const bool registered = register_quantizer(
      "test_gated_mse", [](const QuantizerConfig& c) { return std::make_unique<GatedQuantizer>(c); });
  (void)registered;
  KVCacheConfig c = small_config();
  c.n_layers = 1;
  c.n_q_heads = 2;
  c.n_kv_heads = 2;
  c.key_method = c.value_method = "test_gated_mse";
  return c;
}

TEST(ReliabilityCpp, MutationDuringAnotherThreadsAppendThrowsConcurrentAccess) {
  KVCache c(gated_config());
  const auto k = gaussian(2 * 4 * 32, 51), v = gaussian(2 * 4 * 32, 52);
  c.append(0, k.data(), v.data(), 4);
  Gate gate;
  gate.armed_encode = true;
  g_gate = &gate;
  std::thread writer([&] { c.append(0, k.data(), v.data(), 4); });
  gate.wait_inside();  // the writer is inside append now
  std::vector<float> out(2 * 32);
  const auto q = gaussian(2 * 32, 53);
  EXPECT_THROW(c.attend(0, q.data(), 1, out.data()), ConcurrentAccess);
  EXPECT_THROW(c.append(0, k.data(), v.data(), 4), ConcurrentAccess);
  EXPECT_THROW(c.trim(1), ConcurrentAccess);
  EXPECT_THROW(c.truncate(0), ConcurrentAccess);
  EXPECT_THROW((void)c.size(0), ConcurrentAccess);
  EXPECT_THROW((void)c.memory_bytes(), ConcurrentAccess);
  EXPECT_THROW((void)serialize_cache(c), ConcurrentAccess);
  try {
    c.append(0, k.data(), v.data(), 4);
  } catch (const ConcurrentAccess& e) {
    EXPECT_NE(std::string(e.what()).find("KVCache.append called while another thread is modifying"),
              std::string::npos) << e.what();
  }
  gate.open();
  writer.join();
  g_gate = nullptr;
  EXPECT_EQ(c.size(0), 8u);  // only the writer's append happened
  c.append(0, k.data(), v.data(), 4);
  EXPECT_EQ(c.size(0), 12u);
}

TEST(ReliabilityCpp, MutationDuringAnotherThreadsAttendThrowsConcurrentAccess) {
  KVCache c(gated_config());
  const auto k = gaussian(2 * 4 * 32, 61), v = gaussian(2 * 4 * 32, 62);
  c.append(0, k.data(), v.data(), 4);
  const auto q = gaussian(2 * 32, 63);
  std::vector<float> expected(2 * 32), out(2 * 32), out2(2 * 32);
  c.attend(0, q.data(), 1, expected.data());
  Gate gate;
  gate.armed_scores = true;
  g_gate = &gate;
  std::thread reader([&] { c.attend(0, q.data(), 1, out.data()); });
  gate.wait_inside();
  EXPECT_THROW(c.append(0, k.data(), v.data(), 4), ConcurrentAccess);
  EXPECT_THROW(c.trim(2), ConcurrentAccess);
  EXPECT_EQ(c.size(0), 4u);  // reads may overlap reads
  gate.open();
  reader.join();
  g_gate = nullptr;
  EXPECT_EQ(std::memcmp(out.data(), expected.data(), out.size() * sizeof(float)), 0);
  c.attend(0, q.data(), 1, out2.data());
  EXPECT_EQ(std::memcmp(out2.data(), expected.data(), out.size() * sizeof(float)), 0);
  c.append(0, k.data(), v.data(), 4);  // nothing left locked
  EXPECT_EQ(c.size(0), 8u);
}

TEST(ReliabilityCpp, WriterAndReadersRetryOnConflict) {
  // Readers and one writer sharing a cache without a lock: every overlap is refused with
  // ConcurrentAccess (never torn state) and the refused side retries. (A writer competing
  // with readers that never pause would be refused forever: the flag does not queue.)
  KVCacheConfig cfg = small_config();
  cfg.max_tokens = 0;
  KVCache c(cfg);
  const auto k = gaussian(2 * 2 * 32, 71), v = gaussian(2 * 2 * 32, 72);
  c.append(0, k.data(), v.data(), 2);
  std::atomic<bool> done{false};
  std::atomic<long> reads{0}, refused{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 3; ++t) {
    readers.emplace_back([&] {
      const auto q = gaussian(4 * 32, 73);
      std::vector<float> out(4 * 32);
      while (!done.load()) {
        try {
          c.attend(0, q.data(), 1, out.data());
          for (float x : out) ASSERT_TRUE(std::isfinite(x));
          ++reads;
        } catch (const ConcurrentAccess&) {
          ++refused;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    });
  }
  while (reads.load() < 3) std::this_thread::sleep_for(std::chrono::microseconds(100));
  size_t appended = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  for (int i = 0; i < 50; ++i) {
    for (;;) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "writer starved";
      try {
        c.append(0, k.data(), v.data(), 2);
        appended += 2;
        break;
      } catch (const ConcurrentAccess&) {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    }
  }
  done = true;
  for (auto& th : readers) th.join();
  EXPECT_EQ(c.size(0), 2 + appended);
  EXPECT_GT(reads.load(), 0);
}

// --- limits ---------------------------------------------------------------------------

TEST(ReliabilityCpp, OneMillionTokensOneHeadIndexArithmetic) {
  KVCacheConfig cfg;
  cfg.head_dim = 16;
  cfg.key_bits = cfg.value_bits = 1;
  cfg.block_tokens = 4096;
  KVCache c(cfg);
  const size_t N = size_t{1} << 20, chunk = size_t{1} << 16, d = 16;
  std::vector<float> k(chunk * d), v(chunk * d);
  for (size_t t0 = 0; t0 < N; t0 += chunk) {
    for (size_t i = 0; i < chunk * d; ++i) {
      // distinct per position so that a wrong index shows up in the decoded rows
      k[i] = std::sin(0.001f * static_cast<float>(t0 + i / d) + static_cast<float>(i % d));
      v[i] = std::cos(0.002f * static_cast<float>(t0 + i / d) * static_cast<float>(1 + i % d));
    }
    c.append(0, k.data(), v.data(), chunk);
  }
  ASSERT_EQ(c.size(0), N);
  const Quantizer& kq = c.key_quantizer(0, 0);
  const Quantizer& vq = c.value_quantizer(0, 0);
  const size_t pages = N / cfg.block_tokens;
  EXPECT_EQ(c.memory_bytes(), kq.state_bytes() + vq.state_bytes() +
                                  pages * cfg.block_tokens * (kq.code_bytes() + kq.norm_bytes() +
                                                              vq.code_bytes() + vq.norm_bytes()));
  // The last rows read back through copy_out equal a fresh encoding of the last inputs.
  const size_t tail = 3;
  std::vector<uint8_t> codes(tail * kq.code_bytes()), norms(tail * kq.norm_bytes());
  std::vector<uint8_t> ref_codes(codes.size()), ref_norms(norms.size());
  c.copy_out(0, 0, KVRole::kKey, N - tail, tail, codes.data(), norms.data());
  kq.encode(k.data() + (chunk - tail) * d, tail, ref_codes.data(), ref_norms.data());
  EXPECT_EQ(codes, ref_codes);
  EXPECT_EQ(norms, ref_norms);
  // Attention of the last position over all 1M keys, and over a window of 4 checked
  // against exact attention on the decoded last four rows.
  const auto q = gaussian(d, 81);
  std::vector<float> full(d), win(d);
  c.attend(0, q.data(), 1, full.data());
  for (float x : full) EXPECT_TRUE(std::isfinite(x));
  AttentionOptions w4;
  w4.window = 4;
  c.attend(0, q.data(), 1, win.data(), w4);
  std::vector<float> kd(4 * d), vd(4 * d);
  std::vector<uint8_t> c4(4 * kq.code_bytes()), n4(4 * kq.norm_bytes());
  c.copy_out(0, 0, KVRole::kKey, N - 4, 4, c4.data(), n4.data());
  kq.decode(c4.data(), n4.data(), 4, kd.data());
  c.copy_out(0, 0, KVRole::kValue, N - 4, 4, c4.data(), n4.data());
  vq.decode(c4.data(), n4.data(), 4, vd.data());
  const auto exact = testing::exact_attention(q.data(), kd.data(), vd.data(), d, 0, 3, 0.25);
  for (size_t j = 0; j < d; ++j) EXPECT_NEAR(win[j], exact[j], 1e-3) << j;
  EXPECT_EQ(c.fp16_bytes(), N * 2 * d * 2);
  EXPECT_EQ(c.trim(N - 1), N - 1);
  EXPECT_EQ(c.size(0), 1u);
}

}  // namespace
}  // namespace turboquant
