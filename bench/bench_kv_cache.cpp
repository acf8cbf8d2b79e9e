// Benchmarks of the compressed KV cache (kv_cache.h, attention.h): append (encode) and
// decode / prefill attention over the codes, with items/s and bytes/s counters. The bytes
// counter of attend is the code + norm bytes read, to compare with memory bandwidth.
//   build/bench/turboquant_bench --benchmark_filter=KVCache
#include <benchmark/benchmark.h>

#include <vector>

#include "turboquant/attention.h"
#include "turboquant/kv_cache.h"
#include "turboquant/rng.h"
#include "turboquant/thread_pool.h"

using namespace turboquant;

namespace {

std::vector<float> gaussian(size_t n, uint64_t seed) {
  RandomStream rs(seed, make_stream_id(StreamPurpose::kTest, 9));
  std::vector<float> x(n);
  for (auto& v : x) v = static_cast<float>(rs.next_gaussian());
  return x;
}

KVCacheConfig config(int bits) {
  KVCacheConfig c;
  c.head_dim = 128;
  c.key_bits = bits;
  c.value_bits = bits;
  return c;
}

size_t code_bytes_per_token(const KVCache& c) {
  return c.key_quantizer(0, 0).bytes_per_vector() + c.value_quantizer(0, 0).bytes_per_vector();
}

// Append 1024 tokens (keys and values: 2048 vectors) to a fresh cache.
void BM_KVCacheAppend(benchmark::State& state) {
  const int bits = static_cast<int>(state.range(0));
  const size_t n = 1024;
  const auto k = gaussian(n * 128, 1), v = gaussian(n * 128, 2);
  size_t stored = 0;
  for (auto _ : state) {
    KVCache c(config(bits));
    c.append(0, k.data(), v.data(), n);
    stored = code_bytes_per_token(c) * n;
    benchmark::DoNotOptimize(c.size(0));
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * 2 * n));  // vectors encoded
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * 2 * n * 128 * sizeof(float)));
  state.counters["stored_B"] = static_cast<double>(stored);
}

// One query over n cached tokens (decode).
void BM_KVCacheAttendDecode(benchmark::State& state) {
  const int bits = static_cast<int>(state.range(0));
  const auto n = static_cast<size_t>(state.range(1));
  KVCache c(config(bits));
  const auto k = gaussian(n * 128, 3), v = gaussian(n * 128, 4), q = gaussian(128, 5);
  c.append(0, k.data(), v.data(), n);
  std::vector<float> out(128);
  for (auto _ : state) {
    c.attend(0, q.data(), 1, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * n));  // tokens attended
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n * code_bytes_per_token(c)));
}

// GQA decode: 8 query heads over 2 KV heads, n tokens.
void BM_KVCacheAttendGqa(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  KVCacheConfig cfg = config(3);
  cfg.n_q_heads = 8;
  cfg.n_kv_heads = 2;
  KVCache c(cfg);
  const auto k = gaussian(2 * n * 128, 6), v = gaussian(2 * n * 128, 7), q = gaussian(8 * 128, 8);
  c.append(0, k.data(), v.data(), n);
  std::vector<float> out(8 * 128);
  for (auto _ : state) {
    c.attend(0, q.data(), 1, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * 2 * n));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * 2 * n * code_bytes_per_token(c)));
}

// Prefill: the last 128 positions of n tokens attend causally (GEMM path).
void BM_KVCacheAttendPrefill(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  const size_t tq = 128;
  KVCache c(config(3));
  const auto k = gaussian(n * 128, 9), v = gaussian(n * 128, 10), q = gaussian(tq * 128, 11);
  c.append(0, k.data(), v.data(), n);
  std::vector<float> out(tq * 128);
  for (auto _ : state) {
    c.attend(0, q.data(), tq, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * tq));  // queries
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n * code_bytes_per_token(c)));
}

// Decode at a SmolLM2-like shape (head_dim 64, 9 query / 3 KV heads, 3 bits, 32-token
// pages as the mlx-lm cache uses with sinks or a window) over n tokens: arg 0 = plain codes,
// 1 = 4 fp16 sinks + a 64-token fp16 window, 2 = the same plus the key split (32 channels at
// 4 bits, 32 at 2, keys only), 3 = an fp16 layer (every token fp16: the f16 kernels alone),
// 4 = plain codes on 256-token pages (the mlx-lm cache without sinks / window), 5 = the key
// split on 256-token pages.
void BM_KVCacheAttendWindow(benchmark::State& state) {
  const auto mode = state.range(0);
  const auto n = static_cast<size_t>(state.range(1));
  KVCacheConfig cfg;
  cfg.head_dim = 64;
  cfg.n_q_heads = 9;
  cfg.n_kv_heads = 3;
  cfg.key_bits = 3;
  cfg.value_bits = 3;
  cfg.block_tokens = mode >= 4 ? 256 : 32;
  if (mode == 1 || mode == 2) {
    cfg.fp16_sinks = 4;
    cfg.fp16_window = 64;
  }
  if (mode == 2 || mode == 5) {
    cfg.key_bits = 2;
    cfg.n_outlier_channels = 32;
    cfg.outlier_bits = 4;
    cfg.outlier_roles = OutlierRoles::kKeys;
  }
  if (mode == 3) cfg.fp16_layers = {0};
  KVCache c(cfg);
  const auto k = gaussian(3 * n * 64, 12), v = gaussian(3 * n * 64, 13), q = gaussian(9 * 64, 14);
  c.append(0, k.data(), v.data(), n);
  std::vector<float> out(9 * 64);
  for (auto _ : state) {
    c.attend(0, q.data(), 1, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * 3 * n));  // (KV head, token) pairs
  state.counters["fp16_tokens"] = static_cast<double>(c.sink_tokens(0) + c.window_tokens(0));
}

}  // namespace

BENCHMARK(BM_KVCacheAttendWindow)->ArgsProduct({{0, 1, 2, 3, 4, 5}, {4096}})->Unit(benchmark::kMicrosecond);

BENCHMARK(BM_KVCacheAppend)->Arg(2)->Arg(3)->Arg(4)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_KVCacheAttendDecode)->ArgsProduct({{2, 3, 4}, {1024, 4096}})->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_KVCacheAttendGqa)->Arg(1024)->Arg(4096)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_KVCacheAttendPrefill)->Arg(1024)->Unit(benchmark::kMicrosecond);

namespace {
// The two attention paths of attend_head on one decode query: table-lookup hooks vs
// dequantize-to-tile + Eigen GEMV (arg 0 = hooks, 1 = GEMM).
void BM_AttendHeadPath(benchmark::State& state) {
  const bool gemm = state.range(0) == 1;
  const size_t n = 1024;
  KVCache c(config(3));
  const auto k = gaussian(n * 128, 12), v = gaussian(n * 128, 13), q = gaussian(128, 14);
  c.append(0, k.data(), v.data(), n);
  RowMask mask;
  mask.lo = {0};
  mask.hi = {n - 1};
  AttentionScratch scratch;
  std::vector<float> out(128);
  const auto K = c.head_codes(0, 0, KVRole::kKey), V = c.head_codes(0, 0, KVRole::kValue);
  for (auto _ : state) {
    attend_head(K, V, n, q.data(), 1, mask, 0.088f, out.data(), scratch, gemm, !gemm);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * n));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n * code_bytes_per_token(c)));
}
}  // namespace

BENCHMARK(BM_AttendHeadPath)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

namespace {
// Decode with a given thread count: arg 0 = tokens, 1 = threads, 2 = KV heads (GQA 4 when
// more than one: 8 KV heads = 32 query heads). One query per head, d = 128, 3 bits. The
// "per_kv_head" counter is the wall time per KV head of one call.
void BM_KVCacheDecodeThreads(benchmark::State& state) {
  const auto n = static_cast<size_t>(state.range(0));
  const int threads = static_cast<int>(state.range(1));
  const auto hkv = static_cast<int>(state.range(2));
  KVCacheConfig cfg = config(3);
  cfg.n_kv_heads = hkv;
  cfg.n_q_heads = hkv > 1 ? 4 * hkv : 1;
  KVCache c(cfg);
  const auto H = static_cast<size_t>(hkv), Hq = static_cast<size_t>(cfg.n_q_heads);
  const auto k = gaussian(H * n * 128, 15), v = gaussian(H * n * 128, 16), q = gaussian(Hq * 128, 17);
  c.append(0, k.data(), v.data(), n);
  std::vector<float> out(Hq * 128);
  const int before = get_num_threads();
  set_num_threads(threads);
  for (auto _ : state) {
    c.attend(0, q.data(), 1, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  set_num_threads(before);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * H * n));
  state.counters["per_kv_head"] = benchmark::Counter(static_cast<double>(H),
                                                     benchmark::Counter::kIsIterationInvariantRate |
                                                         benchmark::Counter::kInvert);
}
}  // namespace

BENCHMARK(BM_KVCacheDecodeThreads)
    ->ArgsProduct({{1024, 4096}, {1, 2, 4, 8, 16}, {1}})
    ->ArgsProduct({{1024}, {1, 2, 4, 8, 16}, {8}})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
