// CUDA dialect of the kernel sources: maps the Metal names that the kernel bodies of
// metal/*.metal use (address spaces, barriers, 32-lane SIMD-group functions, as_type) onto
// CUDA, so that the same bodies compile under mx.fast.cuda_kernel (NVRTC, with mlx's
// --device-as-default-execution-space: plain functions are device functions).
// python/turboquant/metal.py prepends this file to the kernel header for the "cuda" target
// (NVRTC sees one string; it is never included by path). metal_compat.h is the C++
// emulator's dialect; Metal itself needs none.
//
// The one shared assumption: a SIMD group is 32 lanes (Apple GPUs' simd-groups, NVIDIA's
// warps), and the kernels' threadgroups are one-dimensional, so lane = threadIdx.x % 32.
// SIMD-group functions are called in warp-uniform control flow by every thread of the
// group (as on Metal); the lanes taking part are the threads that exist in the warp (a
// threadgroup of 16 threads is a 16-lane group), and a reduction combines lanes by the
// same butterfly (xor 16, 8, 4, 2, 1) as the emulator, a missing partner lane contributing
// the identity.
#ifndef TQ_CUDA_COMPAT
#define TQ_CUDA_COMPAT

#if !defined(__CUDACC__)
#error "cuda_compat.h is the CUDA dialect of the kernel sources (NVRTC / nvcc only)"
#endif

typedef unsigned int uint;
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned long long ulong;  // Metal's ulong is 64 bits

// Address spaces: CUDA pointers are generic; threadgroup arrays are declared __shared__ by
// TQ_THREADGROUP_ARRAY (common.metal).
#define device
#define constant const
#define threadgroup
#define thread

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// A product rounded on its own: CUDA contracts a*b + c into one fma by default (--fmad),
// which would change the compensated sums of common.metal; __fmul_rn is never contracted.
#define TQ_MUL_RN(a, b) __fmul_rn((a), (b))

// fp16 bits to float by the hardware conversion (exact; PTX, so no header is needed).
#define TQ_NATIVE_HALF_TO_FLOAT 1
inline float tq_native_half_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

#define TQ_THREADGROUP_ARRAY(type, name, count) __shared__ type name[count]

namespace metal {

enum class mem_flags : unsigned { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return static_cast<mem_flags>(static_cast<unsigned>(a) | static_cast<unsigned>(b));
}

inline void threadgroup_barrier(mem_flags) { __syncthreads(); }

template <class To, class From>
inline To as_type(From v) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of equal size");
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
}

namespace cuda {

constexpr uint kSimdWidth = 32u;

inline uint lane() { return threadIdx.x % kSimdWidth; }

// The lanes of the calling thread's warp that exist in its (one-dimensional) threadgroup.
inline unsigned lanes() {
  const uint first = threadIdx.x - lane();
  const uint n = min(kSimdWidth, blockDim.x - first);
  return n >= kSimdWidth ? 0xFFFFFFFFu : ((1u << n) - 1u);
}

template <class T, class Op>
inline T butterfly(T v, T identity, Op op) {
  const unsigned mask = lanes();
  const uint self = lane();
  for (uint off = kSimdWidth / 2u; off >= 1u; off >>= 1u) {
    T other = __shfl_xor_sync(mask, v, int(off));
    if (((mask >> (self ^ off)) & 1u) == 0u) other = identity;
    v = op(v, other);
  }
  return v;
}

struct Add {
  template <class T>
  T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <class T>
  T operator()(T a, T b) const { return a > b ? a : b; }
};
struct Min {
  template <class T>
  T operator()(T a, T b) const { return a < b ? a : b; }
};

}  // namespace cuda

inline void simdgroup_barrier(mem_flags) { __syncwarp(cuda::lanes()); }

template <class T>
inline T simd_sum(T v) {
  return cuda::butterfly(v, T(0), cuda::Add{});
}
inline float simd_max(float v) { return cuda::butterfly(v, -INFINITY, cuda::Max{}); }
inline float simd_min(float v) { return cuda::butterfly(v, INFINITY, cuda::Min{}); }
inline uint simd_max(uint v) { return cuda::butterfly(v, 0u, cuda::Max{}); }
inline uint simd_min(uint v) { return cuda::butterfly(v, 0xFFFFFFFFu, cuda::Min{}); }

// Reading a lane outside the group is undefined on the GPU; here it returns the caller's value.
template <class T>
inline T simd_shuffle(T v, ushort src_lane) {
  const unsigned mask = cuda::lanes();
  const uint l = uint(src_lane) % cuda::kSimdWidth;
  const T got = __shfl_sync(mask, v, int(l));
  return ((mask >> l) & 1u) != 0u ? got : v;
}
template <class T>
inline T simd_shuffle_xor(T v, ushort xor_mask) {
  const unsigned mask = cuda::lanes();
  const uint l = (cuda::lane() ^ uint(xor_mask)) % cuda::kSimdWidth;
  const T got = __shfl_xor_sync(mask, v, int(xor_mask));
  return ((mask >> l) & 1u) != 0u ? got : v;
}
template <class T>
inline T simd_broadcast(T v, ushort lane) {
  return simd_shuffle(v, lane);
}
template <class T>
inline T simd_prefix_exclusive_sum(T v) {
  const unsigned mask = cuda::lanes();
  const uint self = cuda::lane();
  T sum = T(0);
  for (uint l = 0u; l < cuda::kSimdWidth; ++l) {
    const T got = __shfl_sync(mask, v, int(l));
    if (l < self && ((mask >> l) & 1u) != 0u) sum += got;
  }
  return sum;
}

}  // namespace metal

#endif  // TQ_CUDA_COMPAT
