// Metal host code (metal-cpp): device discovery, the kernel library compiled from the
// embedded sources at first use, cached pipelines, shared (unified-memory) buffers, and the
// dispatches of tq_encode / tq_dequantize / tq_attention_block + tq_attention_reduce.
// Compiled only on Apple (TURBOQUANT_METAL). The launch geometry and threadgroup memory
// sizes are those of the emulation launchers in tests/cpp/metal_emulation.cpp, which run
// the same kernel bodies on Linux.
#define NS_PRIVATE_IMPLEMENTATION
#define MTL_PRIVATE_IMPLEMENTATION
#include <Foundation/Foundation.hpp>
#include <Metal/Metal.hpp>

#include "backend/metal/metal_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "turboquant/error.h"
#include "turboquant/packing.h"
#include "turboquant/quantizer.h"

namespace turboquant::metal {
namespace {

// Parameter blocks: the same layout as the structs of metal/common.metal (all 32-bit).
struct EncodeParams {
  uint32_t rows, dim, bits, code_bytes, norm_fp16, norm_correction;
};
struct DequantParams {
  uint32_t rows, dim, bits, code_bytes, norm_fp16, inverse_rotate, out_fp16;
};
struct AttnParams {
  uint32_t dim, tokens, head_stride, block_tokens, num_blocks, group, k_bits, v_bits,
      k_code_bytes, v_code_bytes, norm_fp16;
  float scale;
};
struct ReduceParams {
  uint32_t dim, num_blocks, group, inverse_rotate;
};

constexpr uint32_t kMaxGroup = 16;          // TQ_MAX_GROUP
constexpr uint32_t kAttnThreads = 128;      // tq_attention_block: 4 simd-groups
constexpr uint32_t kDefaultBlockTokens = 64;
constexpr size_t kMaxSetBytes = 4096;       // setBytes limit

// Autorelease pool for one host call (command buffers and encoders are autoreleased).
struct Pool {
  NS::AutoreleasePool* pool = NS::AutoreleasePool::alloc()->init();
  ~Pool() { pool->release(); }
};

std::string describe(NS::Error* error) {
  if (!error || !error->localizedDescription()) return "unknown error";
  return error->localizedDescription()->utf8String();
}

const MseQuantizer* as_mse(const Quantizer& q) { return dynamic_cast<const MseQuantizer*>(&q); }

uint32_t u32(size_t v, const char* what) {
  TQ_CHECK(v <= 0xFFFFFFFFu, InvalidArgument, what, " = ", v, " is too large for the Metal kernels");
  return static_cast<uint32_t>(v);
}

// Largest power of two <= min(a, b).
uint32_t pow2_at_most(uint32_t a, uint32_t b) {
  uint32_t limit = std::min(a, b), p = 1;
  while (p * 2 <= limit) p *= 2;
  return p;
}

}  // namespace

// A buffer bound to a kernel argument: the shared buffer that holds the memory (offset
// into it), or a temporary staging copy that is copied back for outputs.
struct Binding {
  MTL::Buffer* buffer = nullptr;
  size_t offset = 0;
  bool staged = false;
  void* host = nullptr;  // staged outputs are copied back here
  size_t bytes = 0;
};

struct MetalBackend::Impl {
  MTL::Device* device = nullptr;
  MTL::CommandQueue* queue = nullptr;
  std::mutex mutex;  // library, pipelines, shared allocations
  MTL::Library* library = nullptr;
  std::map<std::string, MTL::ComputePipelineState*> pipelines;
  std::map<uintptr_t, MTL::Buffer*> shared;  // CPU base address -> buffer

  ~Impl() {
    for (auto& [_, p] : pipelines) p->release();
    for (auto& [_, b] : shared) b->release();
    if (library) library->release();
    if (queue) queue->release();
    if (device) device->release();
  }

  MTL::ComputePipelineState* pipeline(const std::string& name) {
    std::lock_guard<std::mutex> lock(mutex);
    if (auto it = pipelines.find(name); it != pipelines.end()) return it->second;
    Pool pool;
    if (!library) {
      // kernel_source() is a NUL-terminated literal.
      NS::String* source = NS::String::string(kernel_source().data(), NS::UTF8StringEncoding);
      auto* options = MTL::CompileOptions::alloc()->init();
      // IEEE semantics: the norm's compensated sums and bit-exact codes depend on them.
      options->setFastMathEnabled(false);
      NS::Error* error = nullptr;
      library = device->newLibrary(source, options, &error);
      options->release();
      TQ_CHECK(library, NotSupported, "Metal kernel library failed to compile: ", describe(error));
    }
    NS::Error* error = nullptr;
    MTL::Function* fn = library->newFunction(NS::String::string(name.c_str(), NS::UTF8StringEncoding));
    TQ_CHECK(fn, NotSupported, "Metal kernel '", name, "' not found in the library");
    MTL::ComputePipelineState* pso = device->newComputePipelineState(fn, &error);
    fn->release();
    TQ_CHECK(pso, NotSupported, "Metal pipeline '", name, "' failed: ", describe(error));
    pipelines[name] = pso;
    return pso;
  }

  // The shared buffer holding [ptr, ptr + bytes), if ptr came from allocate_shared().
  bool find_shared(const void* ptr, size_t bytes, Binding* b) {
    std::lock_guard<std::mutex> lock(mutex);
    const auto p = reinterpret_cast<uintptr_t>(ptr);
    auto it = shared.upper_bound(p);
    if (it == shared.begin()) return false;
    --it;
    const size_t len = it->second->length();
    if (p < it->first || p + bytes > it->first + len) return false;
    b->buffer = it->second;
    b->offset = p - it->first;
    return true;
  }

  // Binds host memory: zero-copy when it is shared, else a staging copy.
  Binding bind(const void* ptr, size_t bytes, bool output, std::vector<MTL::Buffer*>* temps) {
    Binding b;
    b.bytes = bytes;
    if (find_shared(ptr, bytes, &b)) return b;
    const size_t len = std::max<size_t>(bytes, 16);
    b.buffer = device->newBuffer(len, MTL::ResourceStorageModeShared);
    TQ_CHECK(b.buffer, NotSupported, "Metal: could not allocate a ", len, "-byte buffer");
    temps->push_back(b.buffer);
    if (bytes > 0) std::memcpy(b.buffer->contents(), ptr, bytes);  // outputs too: kept if not overwritten
    b.staged = true;
    b.host = output ? const_cast<void*>(ptr) : nullptr;
    return b;
  }

  static void set(MTL::ComputeCommandEncoder* enc, const Binding& b, NS::UInteger index) {
    enc->setBuffer(b.buffer, b.offset, index);
  }

  // Small constant arrays (signs, centroids, boundaries) by setBytes, larger ones staged.
  void set_constant(MTL::ComputeCommandEncoder* enc, const void* data, size_t bytes,
                    NS::UInteger index, std::vector<MTL::Buffer*>* temps) {
    if (bytes <= kMaxSetBytes) {
      enc->setBytes(data, std::max<size_t>(bytes, 4), index);
      return;
    }
    set(enc, bind(data, bytes, false, temps), index);
  }

  void run(MTL::CommandBuffer* cb, const std::vector<Binding>& outputs,
           std::vector<MTL::Buffer*>* temps) {
    cb->commit();
    cb->waitUntilCompleted();
    const bool ok = cb->status() == MTL::CommandBufferStatusCompleted;
    std::string why = ok ? "" : describe(cb->error());
    if (ok) {
      for (const auto& b : outputs)
        if (b.staged && b.host) std::memcpy(b.host, static_cast<char*>(b.buffer->contents()) + b.offset, b.bytes);
    }
    for (auto* t : *temps) t->release();
    temps->clear();
    TQ_CHECK(ok, NotSupported, "Metal command buffer failed: ", why);
  }
};

bool available() {
  static const bool found = [] {
    Pool pool;
    MTL::Device* d = MTL::CreateSystemDefaultDevice();
    if (!d) return false;
    d->release();
    return true;
  }();
  return found;
}

MetalBackend& MetalBackend::instance() {
  TQ_CHECK(available(), NotSupported, "Metal is not available on this platform (no Metal device found)");
  static MetalBackend backend;
  return backend;
}

MetalBackend::MetalBackend() : impl_(std::make_unique<Impl>()) {
  Pool pool;
  impl_->device = MTL::CreateSystemDefaultDevice();
  TQ_CHECK(impl_->device, NotSupported, "Metal is not available on this platform (no Metal device found)");
  impl_->queue = impl_->device->newCommandQueue();
  TQ_CHECK(impl_->queue, NotSupported, "Metal: could not create a command queue");
}

MetalBackend::~MetalBackend() = default;

std::string MetalBackend::device_name() const {
  return impl_->device->name() ? impl_->device->name()->utf8String() : "unknown";
}

void* MetalBackend::allocate_shared(size_t bytes) {
  MTL::Buffer* b = impl_->device->newBuffer(std::max<size_t>(bytes, 16), MTL::ResourceStorageModeShared);
  TQ_CHECK(b, InvalidArgument, "Metal: could not allocate ", bytes, " bytes of shared memory");
  std::memset(b->contents(), 0, b->length());
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->shared[reinterpret_cast<uintptr_t>(b->contents())] = b;
  return b->contents();
}

void MetalBackend::free_shared(void* ptr) {
  if (!ptr) return;
  std::lock_guard<std::mutex> lock(impl_->mutex);
  auto it = impl_->shared.find(reinterpret_cast<uintptr_t>(ptr));
  TQ_CHECK(it != impl_->shared.end(), InvalidArgument, "free_shared: pointer was not returned by allocate_shared");
  it->second->release();
  impl_->shared.erase(it);
}

void MetalBackend::encode(const Quantizer& q, const float* x, size_t n, uint8_t* codes, void* norms) {
  const MseQuantizer* mse = as_mse(q);
  const auto& cfg = q.config();
  if (!mse || q.rotation().kind() != RotationKind::kHadamard) {
    q.encode(x, n, codes, norms);  // not covered by the kernels: the CPU reference
    return;
  }
  if (n == 0) return;
  const auto d = static_cast<size_t>(q.dim());
  // The CPU path's validation, before anything is written (no partial results on error).
  for (size_t r = 0; r < n; ++r) {
    double s = 0.0;
    for (size_t j = 0; j < d; ++j) {
      const float v = x[r * d + j];
      TQ_CHECK(std::isfinite(v), InvalidArgument, "input contains NaN or Inf (vector ", r, ", coordinate ", j, ")");
      s += static_cast<double>(v) * v;
    }
    const auto norm = static_cast<float>(std::sqrt(s));
    TQ_CHECK(cfg.norm_dtype != NormDtype::kFloat16 || norm <= 65504.0f, InvalidArgument, "vector ", r,
             " has norm ", norm, ", above the fp16 norm range (65504); use norm_dtype='float32'");
  }
  Impl& m = *impl_;
  auto* pso = m.pipeline("tq_encode");
  const uint32_t threads = pow2_at_most(u32(d, "dim"), std::min<uint32_t>(256, static_cast<uint32_t>(pso->maxTotalThreadsPerThreadgroup())));
  const EncodeParams p{u32(n, "rows"), u32(d, "dim"), static_cast<uint32_t>(q.bits()), u32(q.code_bytes(), "code_bytes"),
                       cfg.norm_dtype == NormDtype::kFloat16 ? 1u : 0u, cfg.norm_correction ? 1u : 0u};
  const auto signs = q.rotation().parameters();
  Pool pool;
  std::vector<MTL::Buffer*> temps;
  const Binding bx = m.bind(x, n * d * sizeof(float), false, &temps);
  const Binding bc = m.bind(codes, n * q.code_bytes(), true, &temps);
  const Binding bn = m.bind(norms, n * q.norm_bytes(), true, &temps);
  MTL::CommandBuffer* cb = m.queue->commandBuffer();
  MTL::ComputeCommandEncoder* enc = cb->computeCommandEncoder();
  enc->setComputePipelineState(pso);
  Impl::set(enc, bx, 0);
  Impl::set(enc, bc, 1);
  Impl::set(enc, bn, 2);
  m.set_constant(enc, signs.data(), signs.size() * sizeof(float), 3, &temps);
  const auto& bounds = mse->codebook().boundaries;
  m.set_constant(enc, bounds.data(), bounds.size() * sizeof(float), 4, &temps);
  enc->setBytes(&p, sizeof(p), 5);
  const auto& cents = mse->codebook().centroids;  // read only with norm_correction
  m.set_constant(enc, cents.data(), cents.size() * sizeof(float), 6, &temps);
  enc->dispatchThreadgroups(MTL::Size(n, 1, 1), MTL::Size(threads, 1, 1));
  enc->endEncoding();
  m.run(cb, {bc, bn}, &temps);
}

void MetalBackend::dequantize(const Quantizer& q, const uint8_t* codes, const void* norms, size_t n,
                              bool inverse_rotate, bool out_fp16, void* out) {
  const MseQuantizer* mse = as_mse(q);
  TQ_CHECK(mse, NotSupported, "Metal dequantize supports turboquant_mse, got '", q.method(), "'");
  TQ_CHECK(!inverse_rotate || q.rotation().kind() == RotationKind::kHadamard, NotSupported,
           "Metal dequantize with inverse rotation needs the hadamard rotation");
  if (n == 0) return;
  const auto d = static_cast<size_t>(q.dim());
  Impl& m = *impl_;
  auto* pso = m.pipeline("tq_dequantize");
  const uint32_t threads = pow2_at_most(u32(d, "dim"), std::min<uint32_t>(256, static_cast<uint32_t>(pso->maxTotalThreadsPerThreadgroup())));
  const DequantParams p{u32(n, "rows"), u32(d, "dim"), static_cast<uint32_t>(q.bits()), u32(q.code_bytes(), "code_bytes"),
                        q.norm_dtype() == NormDtype::kFloat16 ? 1u : 0u, inverse_rotate ? 1u : 0u, out_fp16 ? 1u : 0u};
  const auto signs = q.rotation().parameters();
  Pool pool;
  std::vector<MTL::Buffer*> temps;
  const Binding bc = m.bind(codes, n * q.code_bytes(), false, &temps);
  const Binding bn = m.bind(norms, n * q.norm_bytes(), false, &temps);
  const Binding bo = m.bind(out, n * d * (out_fp16 ? 2 : 4), true, &temps);
  MTL::CommandBuffer* cb = m.queue->commandBuffer();
  MTL::ComputeCommandEncoder* enc = cb->computeCommandEncoder();
  enc->setComputePipelineState(pso);
  Impl::set(enc, bc, 0);
  Impl::set(enc, bn, 1);
  const auto& cents = mse->codebook().centroids;
  m.set_constant(enc, cents.data(), cents.size() * sizeof(float), 2, &temps);
  m.set_constant(enc, signs.data(), signs.size() * sizeof(float), 3, &temps);
  Impl::set(enc, bo, 4);
  enc->setBytes(&p, sizeof(p), 5);
  enc->dispatchThreadgroups(MTL::Size(n, 1, 1), MTL::Size(threads, 1, 1));
  enc->endEncoding();
  m.run(cb, {bo}, &temps);
}

void MetalBackend::decode_attention(const DecodeAttentionArgs& a, float* out) {
  TQ_CHECK(a.keys && a.values, InvalidArgument, "decode_attention needs key and value quantizers");
  const MseQuantizer* kq = as_mse(*a.keys);
  const MseQuantizer* vq = as_mse(*a.values);
  TQ_CHECK(kq && vq, NotSupported, "Metal decode attention supports turboquant_mse keys and values");
  TQ_CHECK(kq->dim() == vq->dim(), InvalidArgument, "key and value head_dim differ (", kq->dim(), " vs ", vq->dim(), ")");
  TQ_CHECK(kq->norm_dtype() == vq->norm_dtype(), NotSupported, "Metal decode attention needs keys and values with the same norm dtype");
  TQ_CHECK(a.group >= 1 && a.group <= kMaxGroup, InvalidArgument, "GQA group must be in [1, ", kMaxGroup, "], got ", a.group);
  TQ_CHECK(a.kv_heads >= 1, InvalidArgument, "kv_heads must be >= 1");
  TQ_CHECK(a.tokens >= 1 && a.head_stride >= a.tokens, InvalidArgument, "need 1 <= tokens <= head_stride, got tokens=",
           a.tokens, ", head_stride=", a.head_stride);
  const auto d = static_cast<size_t>(kq->dim());
  const size_t m_rows = a.kv_heads * a.group;
  for (size_t i = 0; i < m_rows * d; ++i)
    TQ_CHECK(std::isfinite(a.queries[i]), InvalidArgument, "query contains NaN or Inf (query ", i / d, ", coordinate ", i % d, ")");
  Impl& m = *impl_;
  auto* block_pso = m.pipeline("tq_attention_block");
  auto* reduce_pso = m.pipeline("tq_attention_reduce");
  TQ_CHECK(block_pso->maxTotalThreadsPerThreadgroup() >= kAttnThreads, NotSupported,
           "Metal device allows fewer than ", kAttnThreads, " threads per threadgroup");

  // Block size: the largest power of two <= 64 whose threadgroup memory fits the device.
  const size_t tg_limit = m.device->maxThreadgroupMemoryLength();
  uint32_t bt = kDefaultBlockTokens;
  auto scratch_bytes = [&](uint32_t block) {
    // tq_attention_scratch_floats of attention.metal: queries, centroids, a tile's scores,
    // the running value sums and softmax state.
    return sizeof(float) * (2 * a.group * d + (size_t{1} << kq->bits()) + (size_t{1} << vq->bits()) +
                            a.group * block + 3 * a.group);
  };
  while (bt > 1 && scratch_bytes(bt) > tg_limit) bt /= 2;
  TQ_CHECK(scratch_bytes(bt) <= tg_limit, NotSupported, "Metal decode attention: group ", a.group, " × head_dim ", d,
           " needs more threadgroup memory than the device has (", tg_limit, " bytes)");
  const size_t scratch = (scratch_bytes(bt) + 15) / 16 * 16;
  const uint32_t nb = u32((a.tokens + bt - 1) / bt, "blocks");

  std::vector<float> qrot(m_rows * d);
  kq->prepare_queries(a.queries, m_rows, qrot.data());  // Π_K q: m_rows small rows
  const bool hadamard_v = vq->rotation().kind() == RotationKind::kHadamard;
  const AttnParams p{u32(d, "dim"), u32(a.tokens, "tokens"), u32(a.head_stride, "head_stride"), bt, nb,
                     u32(a.group, "group"), static_cast<uint32_t>(kq->bits()), static_cast<uint32_t>(vq->bits()),
                     u32(kq->code_bytes(), "k_code_bytes"), u32(vq->code_bytes(), "v_code_bytes"),
                     kq->norm_dtype() == NormDtype::kFloat16 ? 1u : 0u, a.scale};
  const ReduceParams r{u32(d, "dim"), nb, u32(a.group, "group"), hadamard_v ? 1u : 0u};
  const size_t parts = a.kv_heads * nb * a.group;
  const uint32_t reduce_threads = pow2_at_most(u32(d, "dim"), std::min<uint32_t>(256, static_cast<uint32_t>(reduce_pso->maxTotalThreadsPerThreadgroup())));

  Pool pool;
  std::vector<MTL::Buffer*> temps;
  const size_t rows = a.kv_heads * a.head_stride;
  const Binding bq = m.bind(qrot.data(), qrot.size() * sizeof(float), false, &temps);
  const Binding bkc = m.bind(a.k_codes, rows * kq->code_bytes(), false, &temps);
  const Binding bkn = m.bind(a.k_norms, rows * kq->norm_bytes(), false, &temps);
  const Binding bvc = m.bind(a.v_codes, rows * vq->code_bytes(), false, &temps);
  const Binding bvn = m.bind(a.v_norms, rows * vq->norm_bytes(), false, &temps);
  MTL::Buffer* part_m = m.device->newBuffer(parts * sizeof(float), MTL::ResourceStorageModePrivate);
  MTL::Buffer* part_l = m.device->newBuffer(parts * sizeof(float), MTL::ResourceStorageModePrivate);
  MTL::Buffer* part_acc = m.device->newBuffer(parts * d * sizeof(float), MTL::ResourceStorageModePrivate);
  for (auto* b : {part_m, part_l, part_acc}) {
    if (b) temps.push_back(b);
  }
  TQ_CHECK(part_m && part_l && part_acc, NotSupported, "Metal: could not allocate attention partials");
  const Binding bo = m.bind(out, m_rows * d * sizeof(float), true, &temps);

  MTL::CommandBuffer* cb = m.queue->commandBuffer();
  // One serial encoder: the reduce dispatch sees the block dispatch's writes.
  MTL::ComputeCommandEncoder* enc = cb->computeCommandEncoder();
  enc->setComputePipelineState(block_pso);
  Impl::set(enc, bq, 0);
  Impl::set(enc, bkc, 1);
  Impl::set(enc, bkn, 2);
  Impl::set(enc, bvc, 3);
  Impl::set(enc, bvn, 4);
  m.set_constant(enc, kq->codebook().centroids.data(), kq->codebook().centroids.size() * sizeof(float), 5, &temps);
  m.set_constant(enc, vq->codebook().centroids.data(), vq->codebook().centroids.size() * sizeof(float), 6, &temps);
  enc->setBuffer(part_m, 0, 7);
  enc->setBuffer(part_l, 0, 8);
  enc->setBuffer(part_acc, 0, 9);
  enc->setBytes(&p, sizeof(p), 10);
  enc->setThreadgroupMemoryLength(scratch, 0);
  enc->dispatchThreadgroups(MTL::Size(nb, a.kv_heads, 1), MTL::Size(kAttnThreads, 1, 1));

  enc->setComputePipelineState(reduce_pso);
  enc->setBuffer(part_m, 0, 0);
  enc->setBuffer(part_l, 0, 1);
  enc->setBuffer(part_acc, 0, 2);
  const auto vsigns = hadamard_v ? vq->rotation().parameters() : std::vector<float>(1, 0.0f);
  m.set_constant(enc, vsigns.data(), vsigns.size() * sizeof(float), 3, &temps);
  Impl::set(enc, bo, 4);
  enc->setBytes(&r, sizeof(r), 5);
  enc->dispatchThreadgroups(MTL::Size(a.group, a.kv_heads, 1), MTL::Size(reduce_threads, 1, 1));
  enc->endEncoding();
  m.run(cb, {bo}, &temps);
  if (!hadamard_v) vq->finish_rotated(out, m_rows);  // dense Π_Vᵀ on the CPU
}

}  // namespace turboquant::metal
