// The Metal kernels (metal/*.metal) run on the emulated GPU of metal/metal_compat.h and
// checked against the CPU reference: codes and norms bit-exact, decode bit-exact, decode
// attention within fp32 tolerance. This is how the Metal backend is verified on machines
// without an Apple GPU; the emulator itself is tested first (simd-group semantics, barrier
// divergence and deadlock detection).
#include "metal_emulation.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/cpu/kernels.h"
#include "turboquant/half.h"
#include "turboquant/quantizer.h"

using namespace turboquant;
namespace emu = turboquant::metal_emu;

namespace {

// Keys-like data: Gaussian rows with a few large outlier channels, a zero row and a tiny row.
std::vector<float> test_rows(size_t n, int d, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(n * static_cast<size_t>(d));
  for (size_t r = 0; r < n; ++r)
    for (int j = 0; j < d; ++j) x[r * d + j] = normal(gen) * (j % 17 == 3 ? 12.0f : 1.0f);
  if (n > 2) {
    const auto ud = static_cast<size_t>(d);
    for (size_t j = 0; j < ud; ++j) {
      x[j] = 0.0f;
      x[ud + j] *= 1e-6f;
    }
  }
  return x;
}

QuantizerConfig hadamard_config(int d, int bits, uint64_t seed, NormDtype nd = NormDtype::kFloat16) {
  QuantizerConfig c;
  c.method = "turboquant_mse";
  c.dim = d;
  c.bits = bits;
  c.seed = seed;
  c.rotation = RotationKind::kHadamard;
  c.norm_dtype = nd;
  return c;
}

const MseQuantizer& as_mse(const Quantizer& q) { return dynamic_cast<const MseQuantizer&>(q); }

}  // namespace

// --- The emulator ------------------------------------------------------------------------

TEST(MetalEmulator, SimdReductionsUseThirtyTwoLaneGroups) {
  // 80 threads: simd-groups of 32, 32 and 16 lanes.
  std::vector<float> sum(80), mx(80), xr(80), bc(80), pre(80);
  emu::run_grid(1, 80, [&](unsigned, unsigned tid) {
    const float v = static_cast<float>(tid);
    sum[tid] = emu::emu_simd_sum(v);
    mx[tid] = emu::emu_simd_max(-v);
    xr[tid] = emu::emu_simd_shuffle_xor(v, 5);
    bc[tid] = emu::emu_simd_broadcast(v, 3);
    pre[tid] = emu::emu_simd_prefix_exclusive_sum(1.0f);
  });
  for (unsigned t = 0; t < 80; ++t) {
    const unsigned lo = t / 32 * 32, hi = std::min(80u, lo + 32);
    float s = 0;
    for (unsigned l = lo; l < hi; ++l) s += static_cast<float>(l);
    EXPECT_EQ(sum[t], s) << t;
    EXPECT_EQ(mx[t], -static_cast<float>(lo)) << t;
    EXPECT_EQ(xr[t], static_cast<float>(lo + ((t - lo) ^ 5u))) << t;
    EXPECT_EQ(bc[t], static_cast<float>(lo + 3)) << t;
    EXPECT_EQ(pre[t], static_cast<float>(t - lo)) << t;
  }
}

TEST(MetalEmulator, InactiveLanesDropOutOfReductions) {
  std::vector<float> sum(32, -1.0f);
  emu::run_grid(1, 32, [&](unsigned, unsigned tid) {
    if (tid >= 20) return;  // lanes 20..31 exit before the reduction
    sum[tid] = emu::emu_simd_sum(1.0f);
  });
  for (unsigned t = 0; t < 20; ++t) EXPECT_EQ(sum[t], 20.0f);
}

TEST(MetalEmulator, BarrierOrdersThreadgroupMemory) {
  std::vector<int> out(3 * 64);
  emu::run_grid(3, 64, [&](unsigned g, unsigned tid) {
    static thread_local int shared[64];  // one group at a time: plays threadgroup memory
    shared[tid] = static_cast<int>(g * 1000 + tid);
    emu::emu_threadgroup_barrier();
    out[g * 64 + tid] = shared[63 - tid];
  });
  for (unsigned g = 0; g < 3; ++g)
    for (unsigned t = 0; t < 64; ++t) EXPECT_EQ(out[g * 64 + t], static_cast<int>(g * 1000 + 63 - t));
}

TEST(MetalEmulator, DivergentBarrierIsAnError) {
  EXPECT_THROW(emu::run_grid(1, 64, [&](unsigned, unsigned tid) {
                 if (tid < 40) emu::emu_threadgroup_barrier();
               }),
               std::runtime_error);
}

TEST(MetalEmulator, BarrierAgainstSimdOpIsADeadlock) {
  EXPECT_THROW(emu::run_grid(1, 32, [&](unsigned, unsigned tid) {
                 if (tid == 0) emu::emu_threadgroup_barrier(); else emu::emu_simd_sum(1.0f);
               }),
               std::runtime_error);
}

TEST(MetalEmulator, KernelExceptionsPropagate) {
  EXPECT_THROW(emu::run_grid(2, 32, [&](unsigned g, unsigned tid) {
                 if (g == 1 && tid == 7) throw std::logic_error("boom");
               }),
               std::logic_error);
}

// --- Encode, rotate, dequantize: bit-exact ---------------------------------------------

struct EncodeCase {
  int dim, bits;
  unsigned threads;
  NormDtype norms;
};

class MetalEncode : public ::testing::TestWithParam<EncodeCase> {};

TEST_P(MetalEncode, CodesAndNormsBitExact) {
  const auto c = GetParam();
  const size_t n = 40;
  auto q = make_quantizer(hadamard_config(c.dim, c.bits, 7, c.norms));
  const auto& mse = as_mse(*q);
  const auto x = test_rows(n, c.dim, 11u + static_cast<uint32_t>(c.dim * 10 + c.bits));
  std::vector<uint8_t> ref_codes(n * q->code_bytes()), codes(ref_codes.size(), 0xAB);
  std::vector<uint8_t> ref_norms(n * q->norm_bytes()), norms(ref_norms.size(), 0xCD);
  q->encode(x.data(), n, ref_codes.data(), ref_norms.data());
  const auto signs = q->rotation().parameters();
  emu::encode(x.data(), n, c.dim, c.bits, signs.data(), mse.codebook().boundaries.data(),
              c.norms == NormDtype::kFloat16, codes.data(), norms.data(), c.threads);
  size_t bad_rows = 0;
  for (size_t r = 0; r < n; ++r) {
    bad_rows += std::memcmp(&codes[r * q->code_bytes()], &ref_codes[r * q->code_bytes()],
                            q->code_bytes()) != 0;
  }
  EXPECT_EQ(bad_rows, 0u);
  EXPECT_EQ(norms, ref_norms);
}

INSTANTIATE_TEST_SUITE_P(
    BitsDimsThreads, MetalEncode,
    ::testing::Values(EncodeCase{64, 2, 64, NormDtype::kFloat16}, EncodeCase{64, 3, 64, NormDtype::kFloat16},
                      EncodeCase{64, 4, 64, NormDtype::kFloat32}, EncodeCase{128, 2, 128, NormDtype::kFloat16},
                      EncodeCase{128, 3, 128, NormDtype::kFloat32}, EncodeCase{128, 4, 128, NormDtype::kFloat16},
                      EncodeCase{128, 3, 32, NormDtype::kFloat16},  // 4 coordinates per thread
                      EncodeCase{16, 1, 16, NormDtype::kFloat16},   // a 16-lane simd-group
                      EncodeCase{256, 5, 256, NormDtype::kFloat16}, EncodeCase{512, 8, 256, NormDtype::kFloat32},
                      EncodeCase{512, 6, 512, NormDtype::kFloat16}, EncodeCase{32, 7, 32, NormDtype::kFloat16}),
    [](const auto& param_info) {
      return "d" + std::to_string(param_info.param.dim) + "_b" + std::to_string(param_info.param.bits) + "_t" +
             std::to_string(param_info.param.threads) + (param_info.param.norms == NormDtype::kFloat16 ? "_f16" : "_f32");
    });

TEST(MetalRotate, QueryRotationBitExact) {
  for (int d : {64, 128, 512}) {
    auto q = make_quantizer(hadamard_config(d, 3, 5));
    const auto x = test_rows(9, d, 3);
    std::vector<float> ref(x.size()), y(x.size());
    q->prepare_queries(x.data(), 9, ref.data());
    const auto signs = q->rotation().parameters();
    emu::rotate(x.data(), 9, d, signs.data(), y.data(), static_cast<unsigned>(std::min(d, 256)));
    EXPECT_EQ(std::memcmp(y.data(), ref.data(), y.size() * sizeof(float)), 0) << "d=" << d;
  }
}

TEST(MetalDequantize, DecodeAndTilesBitExact) {
  for (int d : {64, 128}) {
    for (int bits : {2, 3, 4}) {
      auto q = make_quantizer(hadamard_config(d, bits, 9));
      const size_t n = 33;
      const auto x = test_rows(n, d, 21);
      std::vector<uint8_t> codes(n * q->code_bytes());
      std::vector<half_bits> norms(n);
      q->encode(x.data(), n, codes.data(), norms.data());
      const auto& cents = as_mse(*q).codebook().centroids;
      const auto signs = q->rotation().parameters();
      const auto ud = static_cast<size_t>(d);

      std::vector<float> ref(n * ud), out(n * ud);
      q->decode(codes.data(), norms.data(), n, ref.data());
      emu::dequantize(codes.data(), norms.data(), n, d, bits, cents.data(), signs.data(), true, true,
                      false, out.data(), 64);
      EXPECT_EQ(std::memcmp(out.data(), ref.data(), out.size() * sizeof(float)), 0) << d << " " << bits;

      std::vector<half_bits> out16(n * ud);
      emu::dequantize(codes.data(), norms.data(), n, d, bits, cents.data(), signs.data(), true, true,
                      true, out16.data(), 32);
      for (size_t i = 0; i < out16.size(); ++i) ASSERT_EQ(out16[i], float_to_half(ref[i])) << i;

      // Rotated-domain tile: ‖x‖·c[idx].
      q->dequantize_rotated(codes.data(), n, ref.data());
      for (size_t r = 0; r < n; ++r)
        for (size_t j = 0; j < ud; ++j) ref[r * ud + j] *= half_to_float(norms[r]);
      emu::dequantize(codes.data(), norms.data(), n, d, bits, cents.data(), signs.data(), true, false,
                      false, out.data(), static_cast<unsigned>(d));
      EXPECT_EQ(std::memcmp(out.data(), ref.data(), out.size() * sizeof(float)), 0) << d << " " << bits;
    }
  }
}

// --- Decode attention ---------------------------------------------------------------------

struct AttnCase {
  int dim, k_bits, v_bits, group, tokens, block_tokens;
  bool hadamard_values;
};

class MetalAttention : public ::testing::TestWithParam<AttnCase> {};

TEST_P(MetalAttention, MatchesCpuReference) {
  const auto c = GetParam();
  const int kv_heads = 2, stride = c.tokens + 5;  // rows past `tokens` must be ignored
  const auto d = static_cast<size_t>(c.dim), G = static_cast<size_t>(c.group);
  auto kq = make_quantizer(hadamard_config(c.dim, c.k_bits, 1));
  auto vcfg = hadamard_config(c.dim, c.v_bits, 2);
  if (!c.hadamard_values) vcfg.rotation = RotationKind::kDense;
  auto vq = make_quantizer(vcfg);
  const auto rows = static_cast<size_t>(kv_heads * stride);
  auto keys = test_rows(rows, c.dim, 5), values = test_rows(rows, c.dim, 6);
  std::vector<uint8_t> kc(rows * kq->code_bytes()), vc(rows * vq->code_bytes());
  std::vector<half_bits> kn(rows), vn(rows);
  kq->encode(keys.data(), rows, kc.data(), kn.data());
  vq->encode(values.data(), rows, vc.data(), vn.data());
  const auto queries = test_rows(kv_heads * G, c.dim, 7);
  std::vector<float> qrot(queries.size());
  kq->prepare_queries(queries.data(), kv_heads * G, qrot.data());
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.dim));

  // CPU reference: scalar kernels, softmax in double, Π_Vᵀ at the end.
  const auto& ref_k = cpu::scalar_kernels();
  std::vector<float> ref(kv_heads * G * d, 0.0f);
  const auto T = static_cast<size_t>(c.tokens);
  for (int h = 0; h < kv_heads; ++h) {
    const size_t row0 = static_cast<size_t>(h) * static_cast<size_t>(stride);
    std::vector<float> knf(T), vnf(T), s(G * T), w(G * T);
    for (size_t t = 0; t < T; ++t) {
      knf[t] = half_to_float(kn[row0 + t]);
      vnf[t] = half_to_float(vn[row0 + t]);
    }
    ref_k.mse_scores(&qrot[h * G * d], G, &kc[row0 * kq->code_bytes()], kq->code_bytes(), knf.data(), T,
                     d, c.k_bits, as_mse(*kq).codebook().centroids.data(), s.data(), T);
    for (size_t g = 0; g < G; ++g) {
      double m = -INFINITY, l = 0;
      for (size_t t = 0; t < T; ++t) m = std::max(m, static_cast<double>(s[g * T + t]) * scale);
      for (size_t t = 0; t < T; ++t) l += std::exp(static_cast<double>(s[g * T + t]) * scale - m);
      for (size_t t = 0; t < T; ++t)
        w[g * T + t] = static_cast<float>(std::exp(static_cast<double>(s[g * T + t]) * scale - m) / l);
    }
    ref_k.mse_accumulate(w.data(), T, G, &vc[row0 * vq->code_bytes()], vq->code_bytes(), vnf.data(), T, d,
                         c.v_bits, as_mse(*vq).codebook().centroids.data(), &ref[h * G * d]);
    if (c.hadamard_values) vq->finish_rotated(&ref[h * G * d], G);
  }

  emu::AttentionProblem p;
  p.dim = c.dim;
  p.tokens = c.tokens;
  p.head_stride = stride;
  p.kv_heads = kv_heads;
  p.group = c.group;
  p.block_tokens = c.block_tokens;
  p.k_bits = c.k_bits;
  p.v_bits = c.v_bits;
  p.scale = scale;
  p.q_rotated = qrot.data();
  p.k_codes = kc.data();
  p.k_norms = kn.data();
  p.v_codes = vc.data();
  p.v_norms = vn.data();
  p.k_centroids = as_mse(*kq).codebook().centroids.data();
  p.v_centroids = as_mse(*vq).codebook().centroids.data();
  const auto vsigns = vq->rotation().parameters();
  p.v_signs = c.hadamard_values ? vsigns.data() : nullptr;
  std::vector<float> out(ref.size(), NAN);
  emu::decode_attention(p, out.data(), 64, static_cast<unsigned>(std::min(c.dim, 128)));

  double max_ref = 0, max_err = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    max_ref = std::max(max_ref, std::abs(static_cast<double>(ref[i])));
    max_err = std::max(max_err, std::abs(static_cast<double>(out[i]) - ref[i]));
  }
  ASSERT_GT(max_ref, 0.1);
  EXPECT_LE(max_err, 2e-5 * max_ref) << "max |ref| = " << max_ref;
}

INSTANTIATE_TEST_SUITE_P(
    BitsDimsGqaTokens, MetalAttention,
    ::testing::Values(AttnCase{128, 3, 3, 1, 200, 64, true}, AttnCase{128, 2, 2, 4, 131, 64, true},
                      AttnCase{128, 4, 4, 7, 77, 32, true}, AttnCase{64, 3, 3, 4, 200, 64, true},
                      AttnCase{64, 4, 2, 7, 65, 64, true}, AttnCase{64, 2, 4, 1, 1, 64, true},
                      AttnCase{128, 4, 3, 7, 100, 128, true}, AttnCase{64, 3, 3, 16, 45, 16, true},
                      AttnCase{128, 3, 4, 4, 90, 64, false}),  // dense value rotation: output stays rotated
    [](const auto& param_info) {
      const auto& c = param_info.param;
      return "d" + std::to_string(c.dim) + "_k" + std::to_string(c.k_bits) + "v" + std::to_string(c.v_bits) +
             "_g" + std::to_string(c.group) + "_T" + std::to_string(c.tokens) + "_bt" +
             std::to_string(c.block_tokens) + (c.hadamard_values ? "" : "_dense");
    });

TEST(MetalAttention, RejectsBadLaunches) {
  emu::AttentionProblem p;
  p.tokens = 10;
  p.head_stride = 10;
  p.group = 17;
  std::vector<float> out(1);
  EXPECT_THROW(emu::decode_attention(p, out.data(), 64, 128), std::invalid_argument);
  p.group = 1;
  EXPECT_THROW(emu::decode_attention(p, out.data(), 48, 128), std::invalid_argument);
}
