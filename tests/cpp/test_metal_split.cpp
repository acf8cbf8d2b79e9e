// The key-split Metal kernels (metal/split.metal) on the emulated GPU against the CPU's
// OutlierSplitQuantizer: codes (angle byte(s) included) and norms bit-exact, decode
// bit-exact, decode attention within fp32 tolerance; angles next to their rounding
// boundaries, where a float atan2 alone would round differently from the CPU's double.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>
#include <random>
#include <vector>

#include "metal_emulation.h"
#include "turboquant/half.h"
#include "turboquant/quantizer.h"
#include "turboquant/quantizer_outlier.h"

using namespace turboquant;
namespace emu = turboquant::metal_emu;

namespace {

struct SplitSetup {
  std::unique_ptr<Quantizer> q;
  std::vector<float> signs, centroids, boundaries, angles, angle_bounds;
  emu::SplitTables t;

  const OutlierSplitQuantizer& split() const { return dynamic_cast<const OutlierSplitQuantizer&>(*q); }
};

// The mlx-lm key split: channels [0, d/2) at key_bits + 1, the rest at key_bits - 1.
SplitSetup make_split(int d, int key_bits, int angle_bits, bool norm_correction, uint64_t stream = 5) {
  SplitSetup s;
  QuantizerConfig c;
  c.method = "turboquant_mse";
  c.dim = d;
  c.bits = key_bits - 1;
  c.outlier_bits = key_bits + 1;
  c.seed = 11;
  c.stream = stream;
  c.rotation = RotationKind::kHadamard;
  c.norm_dtype = NormDtype::kFloat16;
  c.norm_correction = norm_correction;
  c.split_angle_bits = angle_bits;
  for (int j = 0; j < d / 2; ++j) c.outlier_channels.push_back(j);
  s.q = make_quantizer(c);
  const auto& sp = s.split();
  std::vector<float> p0 = sp.part(0).rotation().parameters(), p1 = sp.part(1).rotation().parameters();
  const auto h = static_cast<size_t>(d / 2);
  s.signs.insert(s.signs.end(), p0.begin(), p0.begin() + static_cast<long>(h));
  s.signs.insert(s.signs.end(), p1.begin(), p1.begin() + static_cast<long>(h));
  s.signs.insert(s.signs.end(), p0.begin() + static_cast<long>(h), p0.end());
  s.signs.insert(s.signs.end(), p1.begin() + static_cast<long>(h), p1.end());
  for (size_t p = 0; p < 2; ++p) {
    const Codebook& cb = dynamic_cast<const MseQuantizer&>(sp.part(p)).codebook();
    s.centroids.insert(s.centroids.end(), cb.centroids.begin(), cb.centroids.end());
    s.boundaries.insert(s.boundaries.end(), cb.boundaries.begin(), cb.boundaries.end());
  }
  // The core's float (cos, sin) table and the rounding boundaries' cos² as hi + lo.
  const unsigned top = (1u << angle_bits) - 1u;
  const double step = (std::numbers::pi / 2.0) / top;
  s.angles.assign(2 * (top + 1), 0.0f);
  for (unsigned k = 1; k < top; ++k) {
    s.angles[2 * k] = static_cast<float>(std::cos(k * step));
    s.angles[2 * k + 1] = static_cast<float>(std::sin(k * step));
  }
  s.angles[0] = 1.0f;
  s.angles[2 * top + 1] = 1.0f;
  for (unsigned j = 0; j < top; ++j) {
    const double c2 = std::pow(std::cos((j + 0.5) * step), 2);
    const auto hi = static_cast<float>(c2);
    s.angle_bounds.push_back(hi);
    s.angle_bounds.push_back(static_cast<float>(c2 - hi));
  }
  s.t = emu::SplitTables{d, key_bits + 1, key_bits - 1, angle_bits, s.signs.data(), s.centroids.data(),
                         s.boundaries.data(), s.angles.data(), s.angle_bounds.data()};
  return s;
}

// Keys with uneven halves: the first half's channels larger in some rows, smaller in others,
// so that the part angle spans [0, π/2]; plus a zero row, a row with a zero half each.
std::vector<float> split_rows(size_t n, int d, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> scale(-3.0f, 3.0f);
  const auto ud = static_cast<size_t>(d);
  std::vector<float> x(n * ud);
  for (size_t r = 0; r < n; ++r) {
    const float a = std::exp(scale(gen));
    for (size_t j = 0; j < ud; ++j) x[r * ud + j] = normal(gen) * (j < ud / 2 ? a : 1.0f);
  }
  for (size_t j = 0; j < ud && n > 3; ++j) {
    x[j] = 0.0f;
    if (j < ud / 2) x[ud + j] = 0.0f;
    else x[2 * ud + j] = 0.0f;
  }
  return x;
}

void expect_encode_matches(const SplitSetup& s, const std::vector<float>& x, size_t n, const char* what) {
  const size_t cb = s.q->code_bytes();
  ASSERT_EQ(cb, s.t.code_bytes());
  std::vector<uint8_t> cpu(n * cb), gpu(n * cb, 0xAB);
  std::vector<uint16_t> cpu_n(n), gpu_n(n, 0xFFFF);
  s.q->encode(x.data(), n, cpu.data(), cpu_n.data());
  emu::split_encode(s.t, x.data(), n, true, s.q->config().norm_correction, gpu.data(), gpu_n.data(),
                    static_cast<unsigned>(std::min(s.q->dim(), 256)));
  size_t bad = 0;
  for (size_t r = 0; r < n; ++r) {
    const bool same = std::memcmp(cpu.data() + r * cb, gpu.data() + r * cb, cb) == 0 && cpu_n[r] == gpu_n[r];
    if (!same && bad++ < 3) {
      ADD_FAILURE() << what << ": row " << r << " differs (angle cpu " << int(cpu[r * cb]) << " gpu "
                    << int(gpu[r * cb]) << ", norm bits " << cpu_n[r] << " / " << gpu_n[r] << ")";
    }
  }
  EXPECT_EQ(bad, 0u) << what;
}

}  // namespace

TEST(MetalSplit, EncodeIsBitExactAcrossWidthsDimsAndAngleBits) {
  for (int d : {64, 128})
    for (int kb : {2, 3, 4})
      for (int ab : {8, 16}) {
        if (d == 128 && kb != 3) continue;  // keep the emulated grid small
        const SplitSetup s = make_split(d, kb, ab, true);
        const size_t n = 12;
        const auto x = split_rows(n, d, static_cast<uint32_t>(d * 100 + kb * 10 + ab));
        expect_encode_matches(s, x, n, ("d=" + std::to_string(d) + " kb=" + std::to_string(kb) +
                                        " A=" + std::to_string(ab)).c_str());
      }
  const SplitSetup plain = make_split(128, 3, 8, false);  // without norm correction
  const auto x = split_rows(16, 128, 3);
  expect_encode_matches(plain, x, 16, "no norm correction");
  // Halves of 16 (registers only) and of 256 (fewer threads than channels).
  for (int d : {32, 512}) {
    const SplitSetup s = make_split(d, 3, 16, true);
    const auto xs = split_rows(6, d, static_cast<uint32_t>(d));
    expect_encode_matches(s, xs, 6, d == 32 ? "d=32" : "d=512");
  }
}

TEST(MetalSplit, AnglesNextToRoundingBoundariesFollowTheCpu) {
  // Halves of norms cos t, sin t with t a hair off a rounding boundary of the angle code:
  // after the rotation's float rounding the CPU's double atan2 lands on either side.
  for (int ab : {8, 16}) {
    const int d = 64;
    const SplitSetup s = make_split(d, 3, ab, true, 9);
    const unsigned top = (1u << ab) - 1u;
    std::mt19937 gen(static_cast<uint32_t>(ab));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_int_distribution<unsigned> pick(0, top - 1);
    std::uniform_real_distribution<double> eps(-4e-7, 4e-7);
    const size_t n = 32;
    std::vector<float> x(n * d);
    for (size_t r = 0; r < n; ++r) {
      const double t = (pick(gen) + 0.5) * (std::numbers::pi / 2.0) / top + eps(gen);
      for (int p = 0; p < 2; ++p) {
        double ss = 0.0;
        float* xs = x.data() + r * d + p * (d / 2);
        for (int j = 0; j < d / 2; ++j) {
          xs[j] = normal(gen);
          ss += static_cast<double>(xs[j]) * xs[j];
        }
        const double target = p == 0 ? std::cos(t) : std::sin(t);
        for (int j = 0; j < d / 2; ++j) xs[j] = static_cast<float>(xs[j] * target / std::sqrt(ss));
      }
    }
    expect_encode_matches(s, x, n, ab == 8 ? "near boundaries, A=8" : "near boundaries, A=16");
    // The test bites: a float atan2 of the float part norms rounds some of these rows
    // differently from the CPU.
    std::vector<float> y(n * d);
    std::vector<float> inv(n);
    std::vector<uint8_t> codes(n * s.q->code_bytes());
    std::vector<uint16_t> norms(n);
    s.q->encode(x.data(), n, codes.data(), norms.data());
    size_t differ = 0;
    for (size_t r = 0; r < n; ++r) {
      float s0 = 0.0f, s1 = 0.0f, nn = 0.0f;
      for (int j = 0; j < d; ++j) nn += x[r * d + j] * x[r * d + j];
      inv[r] = 1.0f / std::sqrt(nn);
      s.q->rotation().forward_scaled(x.data() + r * d, &inv[r], y.data() + r * d, 1);
      for (int j = 0; j < d; ++j) (j < d / 2 ? s0 : s1) += y[r * d + j] * y[r * d + j];
      const float guess = std::atan2(std::sqrt(s1), std::sqrt(s0)) * (static_cast<float>(top) / 1.5707964f);
      const auto k = static_cast<unsigned>(std::floor(guess + 0.5f));
      const size_t cb = s.q->code_bytes();
      const unsigned cpu_k = ab == 8 ? codes[r * cb] : (codes[r * cb] | (codes[r * cb + 1] << 8));
      differ += k != cpu_k;
    }
    EXPECT_GT(differ, 0u) << "no row needed the boundary correction (A=" << ab << ")";
  }
}

TEST(MetalSplit, AngleRuleEqualsTheCpusDoubleRounding) {
  // The kernel's boundary comparison against the CPU's clamp(lround(atan2(√s1, √s0)/(π/2)·top))
  // over many part sums: random, and within 1e-9 rad of a rounding boundary.
  for (int ab : {8, 16}) {
    const SplitSetup s = make_split(32, 3, ab, false);
    const unsigned top = (1u << ab) - 1u;
    const double half_pi = std::numbers::pi / 2.0;
    std::mt19937_64 gen(static_cast<uint64_t>(ab));
    std::uniform_real_distribution<double> unit(0.0, 1.0), eps(-1e-9, 1e-9);
    size_t bad = 0;
    for (int i = 0; i < 40000; ++i) {
      const double t = i % 2 ? unit(gen) * half_pi
                             : (static_cast<double>(gen() % top) + 0.5) * half_pi / top + eps(gen);
      const double scale = std::exp(20.0 * unit(gen) - 10.0);
      // Part sums as the CPU has them (doubles), and as the kernel's hi + lo pairs.
      const double s0 = std::pow(std::cos(t), 2) * scale, s1 = std::pow(std::sin(t), 2) * scale;
      const auto h0 = static_cast<float>(s0), h1 = static_cast<float>(s1);
      const auto l0 = static_cast<float>(s0 - h0), l1 = static_cast<float>(s1 - h1);
      const double cpu_phi = std::atan2(std::sqrt(static_cast<double>(h1) + l1), std::sqrt(static_cast<double>(h0) + l0));
      const auto cpu = static_cast<unsigned>(
          std::clamp(std::lround(cpu_phi / half_pi * static_cast<double>(top)), 0L, static_cast<long>(top)));
      bad += emu::split_angle_code(h0, l0, h1, l1, s.angle_bounds.data(), ab) != cpu;
    }
    EXPECT_EQ(bad, 0u) << "A=" << ab;
    EXPECT_EQ(emu::split_angle_code(0, 0, 0, 0, s.angle_bounds.data(), ab), 0u);
    EXPECT_EQ(emu::split_angle_code(0, 0, 1, 0, s.angle_bounds.data(), ab), top);
    EXPECT_EQ(emu::split_angle_code(1, 0, 0, 0, s.angle_bounds.data(), ab), 0u);
  }
}

TEST(MetalSplit, DequantizeIsBitExact) {
  for (int ab : {8, 16}) {
    const SplitSetup s = make_split(128, 3, ab, true);
    const size_t n = 12, d = 128, cb = s.q->code_bytes();
    const auto x = split_rows(n, 128, 21);
    std::vector<uint8_t> codes(n * cb);
    std::vector<uint16_t> norms(n);
    s.q->encode(x.data(), n, codes.data(), norms.data());
    std::vector<float> cpu(n * d), gpu(n * d), tile(n * d), rot(n * d);
    s.q->decode(codes.data(), norms.data(), n, cpu.data());
    emu::split_dequantize(s.t, codes.data(), norms.data(), n, true, true, gpu.data(), 128);
    EXPECT_EQ(std::memcmp(cpu.data(), gpu.data(), cpu.size() * sizeof(float)), 0) << "A=" << ab;
    s.split().dequantize_rotated(codes.data(), n, rot.data());
    emu::split_dequantize(s.t, codes.data(), norms.data(), n, true, false, tile.data(), 64);
    for (size_t r = 0; r < n; ++r)
      for (size_t j = 0; j < d; ++j)
        ASSERT_EQ(tile[r * d + j], rot[r * d + j] * half_to_float(norms[r])) << r << "," << j;
  }
}

TEST(MetalSplit, DecodeAttentionMatchesTheCpuAcrossGqaAndRaggedBlocks) {
  struct Case {
    int d, kb, ab, kv_heads, group, tokens, block, num_blocks;  // num_blocks 0: one per tile
  };
  for (const Case c : {Case{64, 2, 8, 2, 3, 77, 16, 0}, Case{128, 4, 16, 1, 4, 40, 32, 0},
                       Case{64, 3, 16, 1, 1, 5, 64, 0}, Case{64, 2, 8, 2, 3, 300, 16, 4},
                       Case{128, 3, 8, 1, 5, 129, 8, 2}}) {
    const auto ud = static_cast<size_t>(c.d);
    const size_t T = static_cast<size_t>(c.tokens), H = static_cast<size_t>(c.kv_heads);
    const size_t G = static_cast<size_t>(c.group), stride = T + 3;
    QuantizerConfig vc;
    vc.method = "turboquant_mse";
    vc.dim = c.d;
    vc.bits = 3;
    vc.seed = 11;
    vc.rotation = RotationKind::kHadamard;
    vc.norm_dtype = NormDtype::kFloat16;
    // One key quantizer for all heads (the kernel takes one sign table per launch here).
    const SplitSetup ks = make_split(c.d, c.kb, c.ab, true);
    const auto vq = make_quantizer(vc);
    const size_t kcb = ks.q->code_bytes(), vcb = vq->code_bytes();
    std::vector<uint8_t> kcodes(H * stride * kcb), vcodes(H * stride * vcb);
    std::vector<uint16_t> knorms(H * stride), vnorms(H * stride);
    std::vector<float> kdec(H * T * ud), vdec(H * T * ud);
    for (size_t h = 0; h < H; ++h) {
      const auto k = split_rows(T, c.d, static_cast<uint32_t>(40 + h));
      const auto v = split_rows(T, c.d, static_cast<uint32_t>(80 + h));
      ks.q->encode(k.data(), T, kcodes.data() + h * stride * kcb, knorms.data() + h * stride);
      vq->encode(v.data(), T, vcodes.data() + h * stride * vcb, vnorms.data() + h * stride);
      ks.q->decode(kcodes.data() + h * stride * kcb, knorms.data() + h * stride, T, kdec.data() + h * T * ud);
      vq->decode(vcodes.data() + h * stride * vcb, vnorms.data() + h * stride, T, vdec.data() + h * T * ud);
    }
    std::mt19937 gen(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> q(H * G * ud), qrot(H * G * ud), out(H * G * ud);
    for (auto& e : q) e = normal(gen);
    emu::split_rotate(ks.t, q.data(), H * G, qrot.data(), static_cast<unsigned>(c.d));
    // The rotation the CPU applies to queries (prepare_queries of the split).
    std::vector<float> state(H * G * ks.q->query_state_floats());
    ks.q->prepare_queries(q.data(), H * G, state.data());
    for (size_t i = 0; i < H * G; ++i)
      for (size_t j = 0; j < ud; ++j)
        ASSERT_EQ(qrot[i * ud + j], state[i * ks.q->query_state_floats() + j]) << i << "," << j;
    const Codebook& vcb_ = dynamic_cast<const MseQuantizer&>(*vq).codebook();
    const auto vsigns = vq->rotation().parameters();
    emu::AttentionProblem p;
    p.dim = c.d;
    p.tokens = c.tokens;
    p.head_stride = static_cast<int>(stride);
    p.kv_heads = c.kv_heads;
    p.group = c.group;
    p.block_tokens = c.block;
    p.num_blocks = c.num_blocks;
    p.v_bits = 3;
    p.scale = 1.0f / std::sqrt(static_cast<float>(c.d));
    p.q_rotated = qrot.data();
    p.k_codes = kcodes.data();
    p.k_norms = knorms.data();
    p.v_codes = vcodes.data();
    p.v_norms = vnorms.data();
    p.v_centroids = vcb_.centroids.data();
    p.v_signs = vsigns.data();
    emu::split_decode_attention(ks.t, p, out.data(), 128, static_cast<unsigned>(c.d));
    for (size_t h = 0; h < H; ++h)
      for (size_t g = 0; g < G; ++g) {
        const float* qi = q.data() + (h * G + g) * ud;
        std::vector<double> s(T);
        double m = -1e300, l = 0.0;
        for (size_t t = 0; t < T; ++t) {
          double dot = 0.0;
          for (size_t j = 0; j < ud; ++j) dot += static_cast<double>(qi[j]) * kdec[(h * T + t) * ud + j];
          s[t] = dot * p.scale;
          m = std::max(m, s[t]);
        }
        for (auto& e : s) l += (e = std::exp(e - m));
        for (size_t j = 0; j < ud; ++j) {
          double ref = 0.0;
          for (size_t t = 0; t < T; ++t) ref += s[t] / l * vdec[(h * T + t) * ud + j];
          EXPECT_NEAR(out[(h * G + g) * ud + j], ref, 2e-4 * (1.0 + std::abs(ref)))
              << "d=" << c.d << " head " << h << " g " << g << " j " << j;
        }
      }
  }
}
