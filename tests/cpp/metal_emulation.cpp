// Runs the Metal kernel bodies (metal/*.metal, compiled here as C++ through
// metal/metal_compat.h) on the emulated grid: each launcher does what the Metal host code
// (cpp/src/backend/metal/) does with dispatchThreadgroups, threadgroup memory included.
#include "metal_emulation.h"

#include <stdexcept>
#include <string>
#include <vector>

#include "metal_compat.h"
// The kernels, exactly as the Metal compiler sees them (minus the [[kernel]] wrappers).
#include "attention.metal"
#include "dequantize.metal"
#include "encode.metal"
#include "split.metal"

namespace turboquant::metal_emu {
namespace {

void check_threads(unsigned threads, int dim, const char* kernel) {
  const auto d = static_cast<unsigned>(dim);
  if (threads == 0 || (threads & (threads - 1)) != 0 || d % threads != 0) {
    throw std::invalid_argument(std::string(kernel) + ": threads per group must be a power of two dividing dim");
  }
}

}  // namespace

void encode(const float* x, size_t rows, int dim, int bits, const float* signs,
            const float* boundaries, bool norm_fp16, uint8_t* codes, void* norms,
            unsigned threads, const float* centroids, bool norm_correction) {
  check_threads(threads, dim, "tq_encode");
  if (norm_correction && centroids == nullptr) throw std::invalid_argument("tq_encode: norm_correction needs centroids");
  const TqEncodeParams p{static_cast<uint>(rows), static_cast<uint>(dim), static_cast<uint>(bits),
                         static_cast<uint>((static_cast<unsigned>(dim) * static_cast<unsigned>(bits) + 7u) / 8u),
                         norm_fp16 ? 1u : 0u, norm_correction ? 1u : 0u};
  std::vector<float> v(static_cast<size_t>(dim)), red(64);
  std::vector<uchar> idx(static_cast<size_t>(dim));
  metal::emu::dispatch({p.rows, 1, 1}, threads, [&](uint3 group, uint tid) {
    tq_encode_body(x, codes, static_cast<uchar*>(norms), signs, boundaries, centroids, p, v.data(), idx.data(),
                   red.data(), group.x, tid, threads);
  });
}

void rotate(const float* x, size_t rows, int dim, const float* signs, float* y, unsigned threads) {
  check_threads(threads, dim, "tq_rotate");
  const TqRotateParams p{static_cast<uint>(rows), static_cast<uint>(dim)};
  std::vector<float> v(static_cast<size_t>(dim));
  metal::emu::dispatch({p.rows, 1, 1}, threads, [&](uint3 group, uint tid) {
    tq_rotate_body(x, y, signs, p, v.data(), group.x, tid, threads);
  });
}

void dequantize(const uint8_t* codes, const void* norms, size_t rows, int dim, int bits,
                const float* centroids, const float* signs, bool norm_fp16, bool inverse_rotate,
                bool out_fp16, void* out, unsigned threads) {
  check_threads(threads, dim, "tq_dequantize");
  const TqDequantParams p{static_cast<uint>(rows), static_cast<uint>(dim), static_cast<uint>(bits),
                          static_cast<uint>((static_cast<unsigned>(dim) * static_cast<unsigned>(bits) + 7u) / 8u),
                          norm_fp16 ? 1u : 0u, inverse_rotate ? 1u : 0u, out_fp16 ? 1u : 0u};
  std::vector<float> v(static_cast<size_t>(dim));
  metal::emu::dispatch({p.rows, 1, 1}, threads, [&](uint3 group, uint tid) {
    tq_dequantize_body(codes, static_cast<const uchar*>(norms), centroids, signs,
                       static_cast<uchar*>(out), p, v.data(), group.x, tid, threads);
  });
}

void decode_attention(const AttentionProblem& a, float* out, unsigned block_threads,
                      unsigned reduce_threads) {
  if (block_threads == 0 || block_threads % 32 != 0) {
    throw std::invalid_argument("tq_attention_block: threads per group must be a multiple of 32");
  }
  check_threads(reduce_threads, a.dim, "tq_attention_reduce");
  if (a.group < 1 || a.group > static_cast<int>(TQ_MAX_GROUP)) {
    throw std::invalid_argument("decode attention: group must be in [1, 16]");
  }
  if (a.tokens < 1 || a.head_stride < a.tokens || a.block_tokens < 1) {
    throw std::invalid_argument("decode attention: need 1 <= tokens <= head_stride, block_tokens >= 1");
  }
  const auto u = [](int v) { return static_cast<uint>(v); };
  const uint tiles = (u(a.tokens) + u(a.block_tokens) - 1u) / u(a.block_tokens);
  if (a.num_blocks < 0 || u(a.num_blocks) > tiles) {
    throw std::invalid_argument("decode attention: num_blocks must be in [0, ceil(tokens / block_tokens)]");
  }
  const uint nb = a.num_blocks == 0 ? tiles : u(a.num_blocks);
  const TqAttnParams p{u(a.dim), u(a.tokens), u(a.head_stride), u(a.block_tokens), nb, u(a.group),
                       u(a.k_bits), u(a.v_bits), (u(a.dim) * u(a.k_bits) + 7u) / 8u,
                       (u(a.dim) * u(a.v_bits) + 7u) / 8u, a.norm_fp16 ? 1u : 0u, a.scale};
  const size_t parts = static_cast<size_t>(a.kv_heads) * nb * u(a.group);
  std::vector<float> part_m(parts), part_l(parts), part_acc(parts * u(a.dim));
  std::vector<float> scratch(tq_attention_scratch_floats(p.dim, p.group, p.block_tokens, p.k_bits, p.v_bits));
  metal::emu::dispatch({nb, u(a.kv_heads), 1}, block_threads, [&](uint3 group, uint tid) {
    tq_attention_block_body(a.q_rotated, a.k_codes, static_cast<const uchar*>(a.k_norms), a.v_codes,
                            static_cast<const uchar*>(a.v_norms), a.k_centroids, a.v_centroids,
                            part_m.data(), part_l.data(), part_acc.data(), p, scratch.data(),
                            group.x, group.y, tid, block_threads);
  });
  const TqReduceParams r{p.dim, nb, p.group, a.v_signs ? 1u : 0u};
  std::vector<float> v(TQ_REDUCE_GROUP_FLOATS);
  const float no_signs[1] = {0.0f};
  metal::emu::dispatch({p.group, u(a.kv_heads), 1}, reduce_threads, [&](uint3 group, uint tid) {
    tq_attention_reduce_body(part_m.data(), part_l.data(), part_acc.data(),
                             a.v_signs ? a.v_signs : no_signs, out, r, v.data(), group.x, group.y,
                             tid, reduce_threads);
  });
}

size_t SplitTables::code_bytes() const {
  const auto half = static_cast<unsigned>(dim / 2);
  return static_cast<size_t>(angle_bits / 8) + (half * static_cast<unsigned>(bits0) + 7u) / 8u +
         (half * static_cast<unsigned>(bits1) + 7u) / 8u;
}

namespace {
TqSplitParams split_params(const SplitTables& t, size_t rows, bool norm_fp16, bool norm_correction,
                           bool inverse_rotate) {
  const auto u = [](int v) { return static_cast<uint>(v); };
  if (t.dim < 32 || (t.dim & (t.dim - 1)) != 0 || (t.angle_bits != 8 && t.angle_bits != 16)) {
    throw std::invalid_argument("split kernels: dim must be a power of two >= 32, angle_bits 8 or 16");
  }
  const uint pd = u(t.dim) / 2u;
  const uint pb0 = (pd * u(t.bits0) + 7u) / 8u, pb1 = (pd * u(t.bits1) + 7u) / 8u;
  return TqSplitParams{static_cast<uint>(rows), u(t.dim), pd, u(t.bits0), u(t.bits1), pb0, pb1,
                       u(t.angle_bits / 8), static_cast<uint>(t.code_bytes()), norm_fp16 ? 1u : 0u,
                       norm_correction ? 1u : 0u, inverse_rotate ? 1u : 0u, 0u};
}
}  // namespace

void split_encode(const SplitTables& t, const float* x, size_t rows, bool norm_fp16, bool norm_correction,
                  uint8_t* codes, void* norms, unsigned threads) {
  check_threads(threads, t.dim, "tq_split_encode");
  const TqSplitParams p = split_params(t, rows, norm_fp16, norm_correction, false);
  std::vector<float> v(static_cast<size_t>(t.dim)), red(64);
  std::vector<uchar> idx(static_cast<size_t>(t.dim));
  metal::emu::dispatch({p.rows, 1, 1}, threads, [&](uint3 group, uint tid) {
    tq_split_encode_body(x, codes, static_cast<uchar*>(norms), t.signs, t.boundaries, t.centroids, t.angles,
                         t.angle_bounds, p, v.data(), idx.data(), red.data(), group.x, tid, threads);
  });
}

void split_dequantize(const SplitTables& t, const uint8_t* codes, const void* norms, size_t rows, bool norm_fp16,
                      bool inverse_rotate, float* out, unsigned threads) {
  check_threads(threads, t.dim, "tq_split_dequantize");
  const TqSplitParams p = split_params(t, rows, norm_fp16, false, inverse_rotate);
  std::vector<float> v(static_cast<size_t>(t.dim));
  metal::emu::dispatch({p.rows, 1, 1}, threads, [&](uint3 group, uint tid) {
    tq_split_dequantize_body(codes, static_cast<const uchar*>(norms), t.centroids, t.signs, t.angles,
                             reinterpret_cast<uchar*>(out), p, v.data(), group.x, tid, threads);
  });
}

void split_rotate(const SplitTables& t, const float* x, size_t rows, float* y, unsigned threads) {
  check_threads(threads, t.dim, "tq_split_rotate");
  const TqSplitParams p = split_params(t, rows, false, false, false);
  std::vector<float> v(static_cast<size_t>(t.dim));
  metal::emu::dispatch({p.rows, 1, 1}, threads, [&](uint3 group, uint tid) {
    tq_split_rotate_body(x, y, t.signs, p, v.data(), group.x, tid, threads);
  });
}

void split_decode_attention(const SplitTables& t, const AttentionProblem& a, float* out, unsigned block_threads,
                            unsigned reduce_threads) {
  if (block_threads == 0 || block_threads % 32 != 0) {
    throw std::invalid_argument("tq_split_attention_block: threads per group must be a multiple of 32");
  }
  check_threads(reduce_threads, a.dim, "tq_attention_reduce");
  if (a.group < 1 || a.group > static_cast<int>(TQ_MAX_GROUP) || a.dim != t.dim) {
    throw std::invalid_argument("split decode attention: group must be in [1, 16], dims must agree");
  }
  if (a.tokens < 1 || a.head_stride < a.tokens || a.block_tokens < 1) {
    throw std::invalid_argument("decode attention: need 1 <= tokens <= head_stride, block_tokens >= 1");
  }
  const auto u = [](int v) { return static_cast<uint>(v); };
  const TqSplitParams sp = split_params(t, 0, a.norm_fp16, false, false);
  const uint tiles = (u(a.tokens) + u(a.block_tokens) - 1u) / u(a.block_tokens);
  if (a.num_blocks < 0 || u(a.num_blocks) > tiles) {
    throw std::invalid_argument("decode attention: num_blocks must be in [0, ceil(tokens / block_tokens)]");
  }
  const uint nb = a.num_blocks == 0 ? tiles : u(a.num_blocks);
  const TqSplitAttnParams p{u(a.dim), u(a.tokens), u(a.head_stride), u(a.block_tokens), nb, u(a.group),
                            u(t.bits0), u(a.v_bits), sp.code_bytes, (u(a.dim) * u(a.v_bits) + 7u) / 8u,
                            a.norm_fp16 ? 1u : 0u, a.scale, sp.part_dim, u(t.bits1), sp.part_bytes0,
                            sp.angle_bytes};
  const size_t parts = static_cast<size_t>(a.kv_heads) * nb * u(a.group);
  std::vector<float> part_m(parts), part_l(parts), part_acc(parts * u(a.dim));
  std::vector<float> scratch(
      tq_split_attention_scratch_floats(p.dim, p.group, p.block_tokens, p.k_bits, p.k_bits1, p.v_bits));
  metal::emu::dispatch({nb, u(a.kv_heads), 1}, block_threads, [&](uint3 group, uint tid) {
    tq_split_attention_block_body(a.q_rotated, a.k_codes, static_cast<const uchar*>(a.k_norms), a.v_codes,
                                  static_cast<const uchar*>(a.v_norms), t.centroids, a.v_centroids, t.angles,
                                  part_m.data(), part_l.data(), part_acc.data(), p, scratch.data(), group.x,
                                  group.y, tid, block_threads);
  });
  const TqReduceParams r{p.dim, nb, p.group, a.v_signs ? 1u : 0u};
  std::vector<float> v(TQ_REDUCE_GROUP_FLOATS);
  const float no_signs[1] = {0.0f};
  metal::emu::dispatch({p.group, u(a.kv_heads), 1}, reduce_threads, [&](uint3 group, uint tid) {
    tq_attention_reduce_body(part_m.data(), part_l.data(), part_acc.data(), a.v_signs ? a.v_signs : no_signs,
                             out, r, v.data(), group.x, group.y, tid, reduce_threads);
  });
}

unsigned split_angle_code(float h0, float l0, float h1, float l1, const float* angle_bounds, int angle_bits) {
  return tq_split_angle(h0, l0, h1, l1, angle_bounds, (1u << static_cast<unsigned>(angle_bits)) - 1u);
}

void run_grid(unsigned groups_x, unsigned threads,
              const std::function<void(unsigned group, unsigned tid)>& body) {
  metal::emu::dispatch({groups_x, 1, 1}, threads, [&](uint3 g, uint tid) { body(g.x, tid); });
}

float emu_simd_sum(float v) { return metal::simd_sum(v); }
float emu_simd_max(float v) { return metal::simd_max(v); }
float emu_simd_shuffle_xor(float v, unsigned mask) {
  return metal::simd_shuffle_xor(v, static_cast<ushort>(mask));
}
float emu_simd_broadcast(float v, unsigned lane) {
  return metal::simd_broadcast(v, static_cast<ushort>(lane));
}
float emu_simd_prefix_exclusive_sum(float v) { return metal::simd_prefix_exclusive_sum(v); }
void emu_threadgroup_barrier() { metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup); }

}  // namespace turboquant::metal_emu
