// google-benchmark for the CPU kernels, every usable target (scalar, avx2, ...):
//   ./turboquant_bench --benchmark_filter=scores
// Counters: bytes_per_second = code bytes read (scores/accumulate) or fp32 input read
// (fwht/quantize/encode); items_per_second = vectors (tokens × queries for scores).
// BM_scores_fastscan is a fast-scan-style alternative (codes of 16 tokens interleaved per
// coordinate, float centroids gathered with one permute per coordinate and 8 tokens), and
// BM_scores_fastscan_pshufb FAISS's fast-scan proper (32-token blocks of nibbles, uint8
// tables looked up by vpshufb, uint16 sums), both kept here for the comparison against the
// row-major permute kernel.
#include <benchmark/benchmark.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/kernels.h"
#include "turboquant/backend.h"
#include "turboquant/codebook.h"
#include "turboquant/kv_cache.h"
#include "turboquant/packing.h"
#include "turboquant/quantizer.h"
#include "turboquant/thread_pool.h"

namespace {

using turboquant::cpu::Kernels;

std::vector<float> gaussian(size_t count, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> v(count);
  for (auto& x : v) x = dist(gen);
  return v;
}

std::vector<uint8_t> random_codes(size_t n, size_t d, int bits) {
  std::mt19937 gen(1);
  std::vector<uint8_t> idx(d), codes(n * turboquant::packed_bytes(d, bits));
  for (size_t t = 0; t < n; ++t) {
    for (auto& i : idx) i = static_cast<uint8_t>(gen() & ((1u << bits) - 1u));
    turboquant::pack_indices(idx.data(), d, bits, codes.data() + t * turboquant::packed_bytes(d, bits));
  }
  return codes;
}

void bm_fwht(benchmark::State& st, const Kernels* k) {
  const auto n = static_cast<size_t>(st.range(0));
  auto x = gaussian(n, 1);
  for (auto _ : st) {
    k->fwht(x.data(), n);
    benchmark::DoNotOptimize(x.data());
    for (auto& v : x) v *= 1.0f / std::sqrt(static_cast<float>(n));  // keep values bounded
  }
  st.SetItemsProcessed(static_cast<int64_t>(st.iterations()));
  st.SetBytesProcessed(static_cast<int64_t>(st.iterations() * n * sizeof(float)));
}

void bm_quantize_pack(benchmark::State& st, const Kernels* k) {
  const int bits = static_cast<int>(st.range(0));
  const size_t d = 128, n = 256;
  const auto& cb = turboquant::lloyd_max_codebook(static_cast<int>(d), bits, turboquant::CoordinateLaw::kBeta);
  const auto y = gaussian(n * d, 2, 1.0f / std::sqrt(static_cast<float>(d)));
  const size_t cbytes = turboquant::packed_bytes(d, bits);
  std::vector<uint8_t> codes(n * cbytes);
  for (auto _ : st) {
    k->quantize_pack(y.data(), n, d, cb.boundaries.data(), bits, codes.data(), cbytes);
    benchmark::DoNotOptimize(codes.data());
  }
  st.SetItemsProcessed(static_cast<int64_t>(st.iterations() * n));
  st.SetBytesProcessed(static_cast<int64_t>(st.iterations() * n * d * sizeof(float)));
}

void bm_scores(benchmark::State& st, const Kernels* k) {
  const int bits = static_cast<int>(st.range(0));
  const auto m = static_cast<size_t>(st.range(1));
  const auto n = static_cast<size_t>(st.range(2));
  const size_t d = 128;
  const auto& cb = turboquant::lloyd_max_codebook(static_cast<int>(d), bits, turboquant::CoordinateLaw::kBeta);
  const auto codes = random_codes(n, d, bits);
  const auto q = gaussian(m * d, 3);
  const auto norms = gaussian(n, 4);
  std::vector<float> out(m * n);
  const size_t cbytes = turboquant::packed_bytes(d, bits);
  for (auto _ : st) {
    k->mse_scores(q.data(), m, codes.data(), cbytes, norms.data(), n, d, bits, cb.centroids.data(), out.data(), n);
    benchmark::DoNotOptimize(out.data());
  }
  st.SetItemsProcessed(static_cast<int64_t>(st.iterations() * n * m));
  st.SetBytesProcessed(static_cast<int64_t>(st.iterations() * n * cbytes));
}

void bm_accumulate(benchmark::State& st, const Kernels* k) {
  const int bits = static_cast<int>(st.range(0));
  const auto m = static_cast<size_t>(st.range(1));
  const auto n = static_cast<size_t>(st.range(2));
  const size_t d = 128;
  const auto& cb = turboquant::lloyd_max_codebook(static_cast<int>(d), bits, turboquant::CoordinateLaw::kBeta);
  const auto codes = random_codes(n, d, bits);
  const auto w = gaussian(m * n, 5, 1e-3f);
  const auto norms = gaussian(n, 6);
  std::vector<float> acc(m * d);
  const size_t cbytes = turboquant::packed_bytes(d, bits);
  for (auto _ : st) {
    k->mse_accumulate(w.data(), n, m, codes.data(), cbytes, norms.data(), n, d, bits, cb.centroids.data(), acc.data());
    benchmark::DoNotOptimize(acc.data());
  }
  st.SetItemsProcessed(static_cast<int64_t>(st.iterations() * n * m));
  st.SetBytesProcessed(static_cast<int64_t>(st.iterations() * n * cbytes));
}

// Whole encode (norms, Hadamard rotation, quantize, pack) at d=128, one thread.
void bm_encode(benchmark::State& st) {
  const int bits = static_cast<int>(st.range(0));
  const auto threads = static_cast<int>(st.range(1));
  turboquant::set_num_threads(threads);
  turboquant::QuantizerConfig c;
  c.dim = 128;
  c.bits = bits;
  c.rotation = turboquant::RotationKind::kHadamard;
  const auto q = turboquant::make_quantizer(c);
  const size_t n = 16384;
  const auto x = gaussian(n * 128, 7);
  std::vector<uint8_t> codes(n * q->code_bytes());
  std::vector<uint8_t> norms(n * q->norm_bytes());
  for (auto _ : st) {
    q->encode(x.data(), n, codes.data(), norms.data());
    benchmark::DoNotOptimize(codes.data());
  }
  turboquant::set_num_threads(0);
  st.SetItemsProcessed(static_cast<int64_t>(st.iterations() * n));
  st.SetBytesProcessed(static_cast<int64_t>(st.iterations() * n * 128 * sizeof(float)));
}

// Decode attention through the cache: one layer, range(0) tokens, range(1) KV heads,
// GQA range(2), 3-bit keys and values, one query per query head, range(3) threads.
void bm_attend(benchmark::State& st) {
  const auto T = static_cast<size_t>(st.range(0));
  turboquant::KVCacheConfig c;
  c.n_kv_heads = static_cast<int>(st.range(1));
  c.n_q_heads = c.n_kv_heads * static_cast<int>(st.range(2));
  turboquant::set_num_threads(static_cast<int>(st.range(3)));
  turboquant::KVCache kv(c);
  const auto k = gaussian(static_cast<size_t>(c.n_kv_heads) * T * 128, 8);
  kv.append(0, k.data(), k.data(), T);
  const auto q = gaussian(static_cast<size_t>(c.n_q_heads) * 128, 9);
  std::vector<float> out(q.size());
  for (auto _ : st) {
    kv.attend(0, q.data(), 1, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  turboquant::set_num_threads(0);
  st.SetItemsProcessed(static_cast<int64_t>(st.iterations() * T * static_cast<size_t>(c.n_kv_heads)));
  st.SetBytesProcessed(static_cast<int64_t>(st.iterations() * T * static_cast<size_t>(c.n_kv_heads) * 2 * 50));
}

#if defined(__x86_64__) || defined(__i386__)
// Fast-scan layout for 3-bit codes: blocks of 16 tokens; for each coordinate j, two 24-bit
// words (tokens 0-7, 8-15), so one broadcast + shift gives 8 tokens' indices of coordinate
// j, one permute gives their centroids, and each query adds q_j × centroids with an FMA:
// the scores land in token lanes (no horizontal sums), but the permute is per 8 tokens and
// coordinate, the query broadcast per query and coordinate.
std::vector<uint8_t> interleave3(const std::vector<uint8_t>& codes, size_t n, size_t d) {
  const size_t nblk = (n + 15) / 16;
  std::vector<uint8_t> out(nblk * d * 6 + 8, 0);
  for (size_t t = 0; t < n; ++t)
    for (size_t j = 0; j < d; ++j) {
      const unsigned idx = turboquant::packed_index(codes.data() + t * turboquant::packed_bytes(d, 3), j, 3);
      const size_t blk = t / 16, half = (t % 16) / 8, lane = t % 8;
      uint8_t* w = out.data() + (blk * d + j) * 6 + half * 3;
      uint32_t v = 0;
      std::memcpy(&v, w, 3);
      v |= idx << (3 * lane);
      std::memcpy(w, &v, 3);
    }
  return out;
}

template <int MQ>
__attribute__((target("avx2,fma"))) void fastscan3(const float* q, size_t d, const uint8_t* il, const float* norms,
                                                   size_t n, const float* centroids, float* out) {
  alignas(32) float tab[8];
  for (int i = 0; i < 8; ++i) tab[i] = centroids[i];
  const __m256 t = _mm256_load_ps(tab);
  const __m256i sh = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
  for (size_t b = 0; b * 16 < n; ++b) {
    __m256 acc[MQ][2];
    for (auto& a : acc) a[0] = a[1] = _mm256_setzero_ps();
    const uint8_t* p = il + b * d * 6;
    for (size_t j = 0; j < d; ++j, p += 6) {
      uint32_t w0, w1;
      std::memcpy(&w0, p, 4);
      std::memcpy(&w1, p + 3, 4);
      const __m256 c0 = _mm256_permutevar8x32_ps(t, _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w0)), sh));
      const __m256 c1 = _mm256_permutevar8x32_ps(t, _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w1)), sh));
      for (int i = 0; i < MQ; ++i) {
        const __m256 qv = _mm256_broadcast_ss(q + i * d + j);
        acc[i][0] = _mm256_fmadd_ps(qv, c0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(qv, c1, acc[i][1]);
      }
    }
    for (int i = 0; i < MQ; ++i) {
      float* o = out + static_cast<size_t>(i) * n + b * 16;
      if (b * 16 + 16 <= n) {
        _mm256_storeu_ps(o, _mm256_mul_ps(acc[i][0], _mm256_loadu_ps(norms + b * 16)));
        _mm256_storeu_ps(o + 8, _mm256_mul_ps(acc[i][1], _mm256_loadu_ps(norms + b * 16 + 8)));
      }
    }
  }
}

void bm_scores_fastscan(benchmark::State& st) {
  const auto m = static_cast<size_t>(st.range(0));
  const auto n = static_cast<size_t>(st.range(1));
  const size_t d = 128;
  const auto& cb = turboquant::lloyd_max_codebook(static_cast<int>(d), 3, turboquant::CoordinateLaw::kBeta);
  const auto codes = random_codes(n, d, 3);
  const auto il = interleave3(codes, n, d);
  const auto q = gaussian(m * d, 3);
  const auto norms = gaussian(n, 4);
  std::vector<float> out(m * n), ref(m * n);
  turboquant::cpu::scalar_kernels().mse_scores(q.data(), m, codes.data(), turboquant::packed_bytes(d, 3), norms.data(),
                                               n, d, 3, cb.centroids.data(), ref.data(), n);
  auto run = [&] {
    if (m == 1) fastscan3<1>(q.data(), d, il.data(), norms.data(), n, cb.centroids.data(), out.data());
    else fastscan3<4>(q.data(), d, il.data(), norms.data(), n, cb.centroids.data(), out.data());
  };
  run();
  for (size_t i = 0; i < m * n; ++i)
    if (std::fabs(out[i] - ref[i]) > 1e-4f * (1 + std::fabs(ref[i]))) {
      st.SkipWithError("fast-scan scores differ from the scalar reference");
      return;
    }
  for (auto _ : st) {
    run();
    benchmark::DoNotOptimize(out.data());
  }
  st.SetItemsProcessed(static_cast<int64_t>(st.iterations() * n * m));
  st.SetBytesProcessed(static_cast<int64_t>(st.iterations() * n * turboquant::packed_bytes(d, 3)));
}
// FAISS fast-scan proper (faiss/impl/pq4_fast_scan): blocks of 32 tokens, each token's b-bit
// code (b <= 4) held as a nibble, per coordinate 16 bytes (byte i: token i in the low nibble,
// token 16 + i in the high one), coordinates j and j + 1 side by side so that one 256-bit
// register holds a pair, one per 128-bit lane (vpshufb looks up per lane). The per-query
// table q_j · c_k is quantized to uint8 (one scale, a bias per coordinate), two vpshufb give
// 64 table values, and uint16 lanes accumulate them (even bytes as the 16-bit lane minus
// 256 × the odd-byte sum, as FAISS does): ~11 instructions per 64 lookups, against ~5 per 8
// for the row-major permute kernel. The nibbles cost 4 bits per coordinate in the cache
// instead of 3.
std::vector<uint8_t> interleave_nibbles(const std::vector<uint8_t>& codes, size_t n, size_t d, int bits) {
  std::vector<uint8_t> out((n + 31) / 32 * d * 16, 0);
  for (size_t t = 0; t < n; ++t)
    for (size_t j = 0; j < d; ++j) {
      const unsigned idx = turboquant::packed_index(codes.data() + t * turboquant::packed_bytes(d, bits), j, bits);
      out[((t / 32) * d + j) * 16 + t % 16] |= static_cast<uint8_t>(idx << (t % 32 < 16 ? 0 : 4));
    }
  return out;
}

struct Lut8 {
  std::vector<uint8_t> table;  // d × 16 bytes: coordinate j's 2^b entries, then zeros
  float scale = 0, bias = 0;   // score ≈ scale × Σ table + bias
};

Lut8 make_lut8(const float* q, size_t d, const std::vector<float>& centroids) {
  Lut8 l;
  l.table.assign(d * 16, 0);
  std::vector<float> lo(d);
  float range = 0;
  double bias = 0;
  for (size_t j = 0; j < d; ++j) {
    float mn = INFINITY, mx = -INFINITY;
    for (float c : centroids) {
      mn = std::min(mn, q[j] * c);
      mx = std::max(mx, q[j] * c);
    }
    lo[j] = mn;
    bias += mn;
    range = std::max(range, mx - mn);
  }
  l.scale = range > 0 ? range / 255.0f : 1.0f;
  l.bias = static_cast<float>(bias);
  for (size_t j = 0; j < d; ++j)
    for (size_t k = 0; k < centroids.size(); ++k)
      l.table[j * 16 + k] = static_cast<uint8_t>(std::lround((q[j] * centroids[k] - lo[j]) / l.scale));
  return l;
}

// One query at a time over a block (its 4 accumulators stay in registers; the block's
// 2 KiB of codes stay in L1 for the next query): a GQA group of 4 with all 16 accumulators
// live spilled registers and ran slower than this.
__attribute__((target("avx2,fma"))) void fastscan_pshufb(const Lut8* luts, size_t m, size_t d, const uint8_t* il,
                                                         const float* norms, size_t n, float* out) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  alignas(32) float tmp[32];
  for (size_t b = 0; b * 32 < n; ++b) {
    for (size_t i = 0; i < m; ++i) {
      __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                        _mm256_setzero_si256()};
      const uint8_t* p = il + b * d * 16;
      const uint8_t* lut = luts[i].table.data();
      for (size_t j = 0; j < d; j += 2, p += 32) {
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m256i lo = _mm256_and_si256(c, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), m4);
        const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut + j * 16));
        const __m256i vl = _mm256_shuffle_epi8(t, lo), vh = _mm256_shuffle_epi8(t, hi);
        acc[0] = _mm256_add_epi16(acc[0], vl);
        acc[1] = _mm256_add_epi16(acc[1], _mm256_srli_epi16(vl, 8));
        acc[2] = _mm256_add_epi16(acc[2], vh);
        acc[3] = _mm256_add_epi16(acc[3], _mm256_srli_epi16(vh, 8));
      }
      for (int half = 0; half < 2; ++half) {  // tokens 0-15 (low nibbles), 16-31 (high)
        const __m256i od = acc[2 * half + 1];
        const __m256i ev = _mm256_sub_epi16(acc[2 * half], _mm256_slli_epi16(od, 8));
        // lane 0 holds the even coordinates' sums, lane 1 the odd ones'
        const __m128i e = _mm_add_epi16(_mm256_castsi256_si128(ev), _mm256_extracti128_si256(ev, 1));
        const __m128i o = _mm_add_epi16(_mm256_castsi256_si128(od), _mm256_extracti128_si256(od, 1));
        const __m256 s0 = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_unpacklo_epi16(e, o)));  // tokens 0-7
        const __m256 s1 = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_unpackhi_epi16(e, o)));  // 8-15
        const __m256 sc = _mm256_set1_ps(luts[i].scale), bi = _mm256_set1_ps(luts[i].bias);
        _mm256_store_ps(tmp + 16 * half, _mm256_fmadd_ps(s0, sc, bi));
        _mm256_store_ps(tmp + 16 * half + 8, _mm256_fmadd_ps(s1, sc, bi));
      }
      const size_t t0 = b * 32, cnt = std::min<size_t>(32, n - t0);
      float* o = out + i * n + t0;
      for (size_t t = 0; t < cnt; ++t) o[t] = tmp[t] * norms[t0 + t];
    }
  }
}

// Codes of n unit vectors (Gaussian, normalised) at the Lloyd-Max codebook's nearest
// centroids, and the exact dot products of each with each of the m queries: the accuracy of
// a quantized table is judged against the codes' own quantization error.
void unit_codes(size_t n, size_t d, const turboquant::Codebook& cb, const std::vector<float>& q, size_t m,
                std::vector<uint8_t>& codes, std::vector<float>& exact) {
  const auto x = gaussian(n * d, 7);
  codes.assign(n * turboquant::packed_bytes(d, cb.bits), 0);
  exact.assign(m * n, 0);
  std::vector<uint8_t> idx(d);
  for (size_t t = 0; t < n; ++t) {
    double nn = 0;
    for (size_t j = 0; j < d; ++j) nn += double(x[t * d + j]) * x[t * d + j];
    const float inv = static_cast<float>(1 / std::sqrt(nn));
    for (size_t j = 0; j < d; ++j) idx[j] = cb.quantize(x[t * d + j] * inv);
    turboquant::pack_indices(idx.data(), d, cb.bits, codes.data() + t * turboquant::packed_bytes(d, cb.bits));
    for (size_t i = 0; i < m; ++i) {
      double s = 0;
      for (size_t j = 0; j < d; ++j) s += double(q[i * d + j]) * x[t * d + j] * inv;
      exact[i * n + t] = static_cast<float>(s);
    }
  }
}

void bm_scores_fastscan_pshufb(benchmark::State& st) {
  const auto m = static_cast<size_t>(st.range(0));
  const auto n = static_cast<size_t>(st.range(1));
  const size_t d = 128;
  const auto& cb = turboquant::lloyd_max_codebook(static_cast<int>(d), 3, turboquant::CoordinateLaw::kBeta);
  const auto q = gaussian(m * d, 3);
  std::vector<uint8_t> codes;
  std::vector<float> exact;
  unit_codes(n, d, cb, q, m, codes, exact);
  const auto il = interleave_nibbles(codes, n, d, 3);
  const std::vector<float> norms(n, 1.0f);
  std::vector<Lut8> luts;
  for (size_t i = 0; i < m; ++i) luts.push_back(make_lut8(q.data() + i * d, d, cb.centroids));
  std::vector<float> out(m * n), ref(m * n);
  turboquant::cpu::scalar_kernels().mse_scores(q.data(), m, codes.data(), turboquant::packed_bytes(d, 3), norms.data(),
                                               n, d, 3, cb.centroids.data(), ref.data(), n);
  auto run = [&] { fastscan_pshufb(luts.data(), m, d, il.data(), norms.data(), n, out.data()); };
  run();
  // Each of the d table entries is off by at most scale / 2: the sum by d × scale / 2.
  double e2 = 0, r2 = 0, qe2 = 0, worst = 0, bound = 0;
  for (size_t i = 0; i < m; ++i) bound = std::max(bound, double(d) * luts[i].scale / 2 * (1 + 1e-5) + 1e-5);
  for (size_t k = 0; k < m * n; ++k) {
    const double e = double(out[k]) - ref[k];
    e2 += e * e;
    r2 += double(ref[k]) * ref[k];
    qe2 += (double(ref[k]) - exact[k]) * (double(ref[k]) - exact[k]);
    worst = std::max(worst, std::fabs(e));
  }
  if (worst > bound) {
    st.SkipWithError("fast-scan (uint8 tables) scores differ from the scalar reference beyond the table rounding");
    return;
  }
  for (auto _ : st) {
    run();
    benchmark::DoNotOptimize(out.data());
  }
  st.counters["err_rel_rms"] = std::sqrt(e2 / r2);                  // vs the scores' RMS
  st.counters["err_vs_3bit_err"] = std::sqrt(e2 / qe2);             // vs the codes' own error
  st.counters["max_err_vs_bound"] = worst / bound;
  st.SetItemsProcessed(static_cast<int64_t>(st.iterations() * n * m));
  st.SetBytesProcessed(static_cast<int64_t>(st.iterations() * n * d / 2));  // nibbles read
}

#endif

const bool kRegistered = [] {
  for (const Kernels* k : turboquant::cpu::usable_kernels()) {
    const std::string t = k->name;
    benchmark::RegisterBenchmark(("fwht/" + t).c_str(), bm_fwht, k)->Arg(128)->Arg(512);
    benchmark::RegisterBenchmark(("quantize_pack/" + t).c_str(), bm_quantize_pack, k)->DenseRange(1, 4)->Arg(8);
    for (int bits : {2, 3, 4, 8})
      for (int m : {1, 4})
        for (int n : {1024, 16384}) {
          benchmark::RegisterBenchmark(("scores/" + t).c_str(), bm_scores, k)->Args({bits, m, n});
          benchmark::RegisterBenchmark(("accumulate/" + t).c_str(), bm_accumulate, k)->Args({bits, m, n});
        }
  }
  benchmark::RegisterBenchmark("attend_b3/active", bm_attend)
      ->Args({1024, 1, 1, 1})->Args({1024, 1, 4, 1})->Args({16384, 8, 4, 1})->Args({16384, 8, 4, 2})->UseRealTime();
  benchmark::RegisterBenchmark("encode_d128_hadamard/active", bm_encode)->Args({3, 1})->Args({3, 2})->Args({2, 1})->Args({4, 1})->UseRealTime();
#if defined(__x86_64__) || defined(__i386__)
  const auto& f = turboquant::cpu_features();
  if (f.avx2 && f.fma) {
    benchmark::RegisterBenchmark("scores_fastscan_b3/avx2", bm_scores_fastscan)->Args({1, 1024})->Args({4, 1024})->Args({1, 16384})->Args({4, 16384});
    benchmark::RegisterBenchmark("scores_fastscan_pshufb_b3/avx2", bm_scores_fastscan_pshufb)
        ->Args({1, 1024})->Args({4, 1024})->Args({1, 16384})->Args({4, 16384});
  }
#endif
  return true;
}();

}  // namespace
