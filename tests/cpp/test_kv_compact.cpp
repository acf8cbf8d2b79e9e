// Compaction (KVCache::compact_window, SegmentPlan::compact): a layer's whole fp16 window
// moved into codes, its last block partial. The compacted cache must hold exactly the codes
// a cache given those tokens as codes holds, and append, cut, save and attend as usual.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "kv_test_util.h"
#include "turboquant/error.h"
#include "turboquant/half.h"
#include "turboquant/kv_cache.h"
#include "turboquant/quantizer.h"
#include "turboquant/serialize.h"

using namespace turboquant;
using namespace turboquant::testing;

namespace {

constexpr size_t kD = 32, kH = 2;  // head_dim, KV heads

KVCacheConfig compact_config() {
  KVCacheConfig c;
  c.head_dim = static_cast<int>(kD);
  c.n_layers = 2;
  c.n_q_heads = 4;
  c.n_kv_heads = static_cast<int>(kH);
  c.key_bits = 3;
  c.value_bits = 3;
  c.block_tokens = 16;
  c.fp16_window = 10;
  c.fp16_sinks = 4;
  c.seed = 9;
  return c;
}

// Keys and values of tokens [t0, t0 + n) of a fixed sequence, head-major.
struct Tokens {
  std::vector<float> k, v;
};
Tokens tokens(size_t t0, size_t n, int layer = 0) {
  const size_t total = 400;
  const auto k = gaussian(kH * total * kD, 1 + static_cast<uint64_t>(layer));
  const auto v = gaussian(kH * total * kD, 11 + static_cast<uint64_t>(layer));
  Tokens out{std::vector<float>(kH * n * kD), std::vector<float>(kH * n * kD)};
  if (n == 0) return out;  // an empty window: no row to copy (and no element to address)
  for (size_t h = 0; h < kH; ++h) {
    std::memcpy(&out.k[h * n * kD], &k[(h * total + t0) * kD], n * kD * sizeof(float));
    std::memcpy(&out.v[h * n * kD], &v[(h * total + t0) * kD], n * kD * sizeof(float));
  }
  return out;
}

void append(KVCache& c, int layer, size_t t0, size_t n) {
  const Tokens t = tokens(t0, n, layer);
  c.append(layer, t.k.data(), t.v.data(), n);
}

void append_one_by_one(KVCache& c, int layer, size_t t0, size_t n) {
  for (size_t t = t0; t < t0 + n; ++t) append(c, layer, t, 1);
}

// Rows [t0, t0 + n) of stream s (head s / 2, key or value), fp16-rounded as a window holds them.
std::vector<float> rows16(int layer, size_t s, size_t t0, size_t n) {
  const Tokens t = tokens(t0, n, layer);
  const auto& x = s % 2 == 0 ? t.k : t.v;
  std::vector<float> r(x.begin() + static_cast<std::ptrdiff_t>(s / 2 * n * kD),
                       x.begin() + static_cast<std::ptrdiff_t>((s / 2 + 1) * n * kD));
  for (auto& f : r) f = half_to_float(float_to_half(f));
  return r;
}

// The cache holding tokens [0, size) of a layer as 4 fp16 sinks, tokens [4, coded) as codes
// (each the quantizer's code of its fp16 row) and the rest as window rows, built through the
// restore calls of a load: what a compacted (and extended) layer must equal.
void build_reference(KVCache& ref, int layer, size_t coded, size_t size) {
  const size_t S = 4, streams = 2 * kH;
  std::vector<std::vector<uint16_t>> sink(streams), win(streams);
  std::vector<std::vector<uint8_t>> codes(streams), norms(streams);
  std::vector<const uint16_t*> sp(streams), wp(streams);
  std::vector<const uint8_t*> cp(streams), np(streams);
  for (size_t s = 0; s < streams; ++s) {
    for (float f : rows16(layer, s, 0, S)) sink[s].push_back(float_to_half(f));
    for (float f : rows16(layer, s, coded, size - coded)) win[s].push_back(float_to_half(f));
    const Quantizer& q = s % 2 == 0 ? ref.key_quantizer(layer, static_cast<int>(s / 2))
                                    : ref.value_quantizer(layer, static_cast<int>(s / 2));
    const auto x = rows16(layer, s, S, coded - S);
    codes[s].resize((coded - S) * q.code_bytes());
    norms[s].resize((coded - S) * q.norm_bytes());
    q.encode(x.data(), coded - S, codes[s].data(), norms[s].data());
    sp[s] = sink[s].data();
    wp[s] = win[s].data();
    cp[s] = codes[s].data();
    np[s] = norms[s].data();
  }
  ref.append_sinks(layer, S, sp);
  ref.append_encoded(layer, coded - S, cp, np);
  ref.append_window(layer, size - coded, wp);
}

std::vector<float> attend(const KVCache& c, int layer, size_t T_q = 3) {
  const auto q = gaussian(4 * T_q * kD, 77);
  std::vector<float> out(q.size());
  c.attend(layer, q.data(), T_q, out.data());
  return out;
}

// Every stored token of one stream, decoded (sinks and window as stored, codes dequantized).
std::vector<float> stored(const KVCache& c, int layer, size_t s) {
  std::vector<float> x(c.size(layer) * kD);
  c.decode_tokens(layer, static_cast<int>(s / 2), s % 2 ? KVRole::kValue : KVRole::kKey, 0, c.size(layer), x.data());
  return x;
}

// The two caches hold the same segments and bytes, and attend alike, in every layer.
void expect_same(const KVCache& a, const KVCache& b) {
  for (int l = 0; l < a.config().n_layers; ++l) {
    ASSERT_EQ(a.size(l), b.size(l)) << "layer " << l;
    ASSERT_EQ(a.coded_tokens(l), b.coded_tokens(l)) << "layer " << l;
    EXPECT_EQ(a.sink_tokens(l), b.sink_tokens(l)) << "layer " << l;
    EXPECT_EQ(a.token_bytes(l), b.token_bytes(l)) << "layer " << l;
    for (size_t s = 0; s < 2 * kH; ++s) EXPECT_EQ(stored(a, l, s), stored(b, l, s)) << "layer " << l << " stream " << s;
    if (a.size(l) > 0) {
      EXPECT_EQ(attend(a, l), attend(b, l)) << "layer " << l;
    }
  }
}

}  // namespace

TEST(KVCompact, CompactedLayerHoldsTheCodesOfItsWindowTokens) {
  KVCache c(compact_config()), ref(compact_config());
  append(c, 0, 0, 75);  // sinks 4, codes 48 (3 blocks), window 23
  append_one_by_one(c, 1, 0, 40);
  ASSERT_EQ(c.window_tokens(0), 23u);
  EXPECT_EQ(c.compact_window(0), 23u);  // code indices 48..70: block 3, and 7 rows of block 4
  EXPECT_EQ(c.coded_tokens(0), 75u);
  EXPECT_EQ(c.window_tokens(0), 0u);
  EXPECT_EQ(c.window_tokens(1), 40u - 4 - 16);  // layer 1 untouched
  EXPECT_EQ(c.compact_window(0), 0u);           // nothing left
  build_reference(ref, 0, 75, 75);
  build_reference(ref, 1, 20, 40);
  expect_same(c, ref);
  // Against exact attention over the fp16 rows: within the 3-bit codes' error.
  const auto q = gaussian(4 * kD, 5);
  std::vector<float> out(4 * kD);
  c.attend(0, q.data(), 1, out.data());
  for (size_t qh = 0; qh < 4; ++qh) {
    const size_t h = qh / 2;
    const auto K = rows16(0, 2 * h, 0, 75), V = rows16(0, 2 * h + 1, 0, 75);
    const auto exact = exact_attention(&q[qh * kD], K.data(), V.data(), kD, 0, 74, 1.0 / std::sqrt(double(kD)));
    EXPECT_GT(cosine(exact, &out[qh * kD]), 0.9) << "query head " << qh;
  }
}

TEST(KVCompact, AppendsAfterCompactionFlushFromUnalignedCodes) {
  for (bool chunked : {false, true}) {
    KVCache c(compact_config()), ref(compact_config());
    append(c, 0, 0, 75);
    c.compact_window(0);  // codes end at code index 71: row 7 of block 4
    if (chunked) {
      append(c, 0, 75, 40);
    } else {
      append_one_by_one(c, 0, 75, 40);
    }
    // The window took the 40 tokens and flushed one 16-token block from code index 71.
    EXPECT_EQ(c.coded_tokens(0), 91u);
    EXPECT_EQ(c.window_tokens(0), 24u);
    build_reference(ref, 0, 91, 115);
    expect_same(c, ref);
    // Compacted again: codes from 87 (block 5, row 7) to 111.
    EXPECT_EQ(c.compact_window(0), 24u);
    KVCache ref2(compact_config());
    build_reference(ref2, 0, 115, 115);
    expect_same(c, ref2);
  }
}

TEST(KVCompact, CutIntoTheCompactedCodesThenAppend) {
  KVCache c(compact_config()), ref(compact_config());
  append(c, 0, 0, 75);
  append(c, 1, 0, 75);
  c.compact_window();
  const size_t memory = c.memory_bytes();
  EXPECT_EQ(c.trim(10), 10u);  // into the compacted tokens: codes end at 65
  EXPECT_EQ(c.coded_tokens(0), 65u);
  EXPECT_EQ(c.window_tokens(0), 0u);
  EXPECT_LE(c.memory_bytes(), memory);
  build_reference(ref, 0, 65, 65);
  build_reference(ref, 1, 65, 65);
  expect_same(c, ref);
  append(c, 0, 65, 30);  // 30 > 10 + 16: one block from code index 61 (block 3, row 13)
  append(ref, 0, 65, 30);
  append(c, 1, 65, 3);
  append(ref, 1, 65, 3);
  expect_same(c, ref);
  c.truncate(50);  // past the codes: the window empties
  ref.truncate(50);
  expect_same(c, ref);
}

TEST(KVCompact, SaveLoadRoundTripAndAppendsAlike) {
  KVCache c(compact_config());
  append(c, 0, 0, 75);
  append(c, 1, 0, 31);
  c.compact_window();
  const auto bytes = serialize_cache(c);
  auto loaded = deserialize_cache(bytes.data(), bytes.size());
  expect_same(c, *loaded);
  EXPECT_EQ(serialize_cache(*loaded), bytes);
  EXPECT_EQ(loaded->memory_bytes(), c.memory_bytes());  // no window capacity after a load either
  append_one_by_one(c, 0, 75, 20);
  append_one_by_one(*loaded, 0, 75, 20);
  append(c, 1, 31, 9);
  append(*loaded, 1, 31, 9);
  expect_same(c, *loaded);
  EXPECT_EQ(serialize_cache(*loaded), serialize_cache(c));
}

TEST(KVCompact, MemoryDropsByTheWindowLessTheCodes) {
  KVCache c(compact_config());
  append(c, 0, 0, 75);  // codes 48: 3 pages; window 23 rows of a capacity of 10 + 16
  append(c, 1, 0, 75);
  const size_t before = c.memory_bytes(), tokens_before = c.token_bytes(0);
  const Quantizer& q = c.key_quantizer(0, 0);  // every stream: 3 bits, same row size
  const size_t row = q.code_bytes() + q.norm_bytes(), streams = 2 * kH;
  c.compact_window(0);
  // Layer 0: the window's 26 fp16 rows go, two pages of 16 code rows come (71 codes).
  const size_t window = streams * (10 + 16) * kD * 2, page = streams * 16 * row;
  EXPECT_EQ(c.memory_bytes(), before - window + 2 * page);
  EXPECT_EQ(c.token_bytes(0), tokens_before - streams * 23 * (kD * 2 - row));
  EXPECT_LT(c.memory_bytes(), before);
  // An appended token allocates the window again (its fixed capacity).
  append(c, 0, 75, 1);
  EXPECT_EQ(c.memory_bytes(), before + 2 * page);
}

TEST(KVCompact, MixedPrecisionAndFp16LayersKeepTheirWindows) {
  KVCacheConfig cfg = compact_config();
  cfg.fp16_layers = {1};
  KVCache c(cfg);
  append(c, 0, 0, 50);
  append(c, 1, 0, 50);
  EXPECT_EQ(c.compact_window(1), 0u);
  EXPECT_EQ(c.window_tokens(1), 50u);
  EXPECT_EQ(c.compact_window(), 50u - 4 - 32);  // layer 0 only

  KVCacheConfig mcfg = compact_config();
  mcfg.key_bits = mcfg.value_bits = 4;
  mcfg.decay_bits = 2;
  mcfg.block_tokens = 8;
  mcfg.mixed_group_blocks = 2;
  mcfg.mixed_keep_blocks = 1;
  KVCache m(mcfg);
  append(m, 0, 0, 60);
  append(m, 1, 0, 60);
  const auto bytes = serialize_cache(m);
  const size_t memory = m.memory_bytes();
  EXPECT_EQ(m.compact_window(), 0u);
  EXPECT_EQ(serialize_cache(m), bytes);
  EXPECT_EQ(m.memory_bytes(), memory);
}

namespace {
// A turboquant_mse quantizer whose encode throws std::bad_alloc once a countdown of calls
// runs out (armed when >= 0): a compaction failing part-way through a layer's streams.
int g_encodes_left = -1;
class FailingQuantizer : public MseQuantizer {
 public:
  using MseQuantizer::MseQuantizer;
  void quantize_rotated(const float* y, size_t n, uint8_t* codes) const override {
    if (g_encodes_left == 0) throw std::bad_alloc();
    if (g_encodes_left > 0) --g_encodes_left;
    MseQuantizer::quantize_rotated(y, n, codes);
  }
};
}  // namespace

TEST(KVCompact, FailedCompactionLeavesTheLayerUnchanged) {
  static const bool registered = register_quantizer(
      "test_failing_mse", [](const QuantizerConfig& q) { return std::make_unique<FailingQuantizer>(q); });
  (void)registered;
  KVCacheConfig cfg = compact_config();
  cfg.key_method = cfg.value_method = "test_failing_mse";
  KVCache c(cfg), ok(cfg);
  for (KVCache* x : {&c, &ok}) {
    append(*x, 0, 0, 75);  // the window's 23 rows go to code indices 48..70: two runs a stream
    append(*x, 1, 0, 75);
  }
  const auto bytes = serialize_cache(c);
  const size_t memory = c.memory_bytes();
  const auto out = attend(c, 0);
  for (int fail_at : {0, 1, 2, 7}) {  // stream 0's runs (the second on a new page) .. stream 3's last
    g_encodes_left = fail_at;
    EXPECT_THROW(c.compact_window(0), std::bad_alloc);
    g_encodes_left = -1;
    EXPECT_EQ(serialize_cache(c), bytes) << "fail at stream " << fail_at;
    EXPECT_EQ(c.memory_bytes(), memory) << "fail at stream " << fail_at;
    EXPECT_EQ(attend(c, 0), out);
  }
  EXPECT_EQ(c.compact_window(0), 23u);
  ok.compact_window(0);
  expect_same(c, ok);
}
