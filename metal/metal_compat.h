// Metal Shading Language compatibility layer: lets the kernel bodies in metal/*.metal
// compile as C++20 on any machine and run on an emulated GPU grid, so their logic is
// tested where no Apple GPU exists (DESIGN §3 "Backend"). Never seen by the Metal compiler.
//
// What is emulated, and how faithfully:
//   - address spaces (device / constant / threadgroup) are plain pointers and references;
//   - a threadgroup is run as cooperative fibers (ucontext), one per thread, sharing the
//     threadgroup memory the launcher hands them, in ascending or (every other group)
//     descending thread order; threadgroup_barrier() suspends a thread
//     until every thread of its group has arrived. A barrier that some threads never reach
//     (they returned early) or a barrier that waits on a thread stuck in a simd-group op is
//     reported as an error instead of hanging or silently passing;
//   - simd-groups are 32 consecutive threads of a threadgroup (Apple GPUs); simd_sum,
//     simd_max, simd_min, simd_shuffle, simd_shuffle_xor, simd_broadcast and
//     simd_prefix_exclusive_sum exchange values between the lanes that are still running
//     (lanes that returned are inactive, as on the GPU). Reductions combine lanes by a
//     butterfly (xor 16, 8, 4, 2, 1), so every lane gets the same value;
//   - math: exp, sqrt, fma, max, min... map to <cmath>; as_type<T> is std::bit_cast.
// Not emulated: fast-math (the host compiles with math mode "safe"), simdgroup matrices,
// atomics, textures.
#pragma once

#ifndef __METAL_VERSION__

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#define TQ_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TQ_EMU_ASAN 1
#endif
#endif
#ifdef TQ_EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

typedef unsigned int uint;
typedef unsigned char uchar;
typedef unsigned short ushort;

struct uint3 {
  uint x = 0, y = 0, z = 0;
};

typedef unsigned long ulong;

// Address-space qualifiers: memory is ordinary host memory in the emulation. A C++ file
// that only drives the emulator (not a kernel) may define TQ_METAL_COMPAT_NO_QUALIFIERS.
#ifndef TQ_METAL_COMPAT_NO_QUALIFIERS
#define device
#define constant const
#define threadgroup
#define thread
#endif

namespace metal {

using std::abs;
using std::atan2;
using std::exp;
using std::floor;
using std::fma;
using std::isfinite;
using std::isinf;
using std::isnan;
using std::log;
using std::max;
using std::min;
using std::sqrt;

template <class To, class From>
inline To as_type(From v) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of equal size");
  return std::bit_cast<To>(v);
}

enum class mem_flags : unsigned { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return static_cast<mem_flags>(static_cast<unsigned>(a) | static_cast<unsigned>(b));
}

namespace emu {

inline constexpr uint kSimdWidth = 32;
inline constexpr size_t kStackBytes = 128 * 1024;

// Raised for a kernel that would hang or misbehave on the GPU (divergent barrier, deadlock).
struct EmulationError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class State { kReady, kBarrier, kSimd, kDone };

struct Fiber {
  ucontext_t ctx{};
  std::unique_ptr<char[]> stack;
  State state = State::kReady;
  uint tid = 0;
  alignas(8) unsigned char slot[8] = {};  // value offered to a simd-group exchange
  void* fake_stack = nullptr;           // ASan bookkeeping
};

// One threadgroup in flight: its fibers and the scheduler that runs them.
struct Group {
  std::vector<Fiber> fibers;
  uint size = 0;
  ucontext_t sched{};
  Fiber* current = nullptr;
  const std::function<void(uint)>* body = nullptr;
  std::exception_ptr error;
  std::vector<uint32_t> simd_active;  // per simd-group: lanes taking part in the last exchange
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
};

inline thread_local Group* g_group = nullptr;

inline Group& group() {
  if (!g_group) throw EmulationError("Metal built-in called outside an emulated threadgroup");
  return *g_group;
}

[[gnu::noinline]] inline void switch_to_scheduler(Group& g, Fiber& f, bool dying) {
#ifdef TQ_EMU_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &f.fake_stack, g.sched_stack_bottom,
                                 g.sched_stack_size);
#else
  (void)dying;
#endif
  swapcontext(&f.ctx, &g.sched);
#ifdef TQ_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &g.sched_stack_bottom, &g.sched_stack_size);
#endif
}

inline void fiber_entry() {
  Group& g = *g_group;
  Fiber& f = *g.current;
#ifdef TQ_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g.sched_stack_bottom, &g.sched_stack_size);
#endif
  try {
    (*g.body)(f.tid);
  } catch (...) {
    if (!g.error) g.error = std::current_exception();
  }
  f.state = State::kDone;
  switch_to_scheduler(g, f, true);
}

// Suspends the calling thread in `state` until the scheduler releases it.
inline void block(State state) {
  Group& g = group();
  Fiber& f = *g.current;
  f.state = state;
  switch_to_scheduler(g, f, false);
}

inline Fiber& self() { return *group().current; }
inline uint lane_of(uint tid) { return tid % kSimdWidth; }

// getcontext/swapcontext return twice: they live in functions of their own, so that no
// local of the scheduler is live across them (-Wclobbered).
[[gnu::noinline]] inline void prepare_fiber(Fiber& f, char* stack) {
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_entry, 0);
}

[[gnu::noinline]] inline void resume_fiber(Group& g, Fiber& f, char* stack) {
#ifdef TQ_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, stack, kStackBytes);
#else
  (void)stack;
#endif
  swapcontext(&g.sched, &f.ctx);
#ifdef TQ_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// Runs one threadgroup of `size` threads to completion; rethrows a kernel's exception.
// Between synchronisation points threads run one after the other, in ascending order or,
// with `reverse`, descending: a read of another thread's write that lacks its barrier sees
// stale memory in one of the two orders (dispatch() alternates them).
inline void run_threadgroup(uint size, const std::function<void(uint)>& body, bool reverse = false) {
  if (size == 0 || size > 1024) throw EmulationError("threadgroup size must be in [1, 1024]");
  static thread_local std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() < size) stacks.push_back(std::make_unique<char[]>(kStackBytes));
  Group g;
  g.size = size;
  g.body = &body;
  g.fibers.resize(size);
  g.simd_active.assign((size + kSimdWidth - 1) / kSimdWidth, 0);
  for (uint t = 0; t < size; ++t) {
    g.fibers[t].tid = t;
    prepare_fiber(g.fibers[t], stacks[t].get());
  }
  Group* const outer = g_group;
  g_group = &g;
  auto fail = [&](const std::string& what) {
    g_group = outer;
    throw EmulationError(what);
  };
  for (;;) {
    for (uint i = 0; i < size; ++i) {
      Fiber& f = g.fibers[reverse ? size - 1 - i : i];
      if (f.state != State::kReady) continue;
      g.current = &f;
      resume_fiber(g, f, stacks[f.tid].get());
      g.current = nullptr;
      if (g.error) {
        g_group = outer;
        std::rethrow_exception(g.error);
      }
    }
    uint done = 0, at_barrier = 0;
    for (const auto& f : g.fibers) {
      done += f.state == State::kDone;
      at_barrier += f.state == State::kBarrier;
    }
    if (done == size) break;
    const uint active = size - done;
    if (at_barrier == active) {
      if (done > 0) {
        fail("threadgroup_barrier reached by " + std::to_string(at_barrier) + " of " +
             std::to_string(size) + " threads (the others returned): this hangs on the GPU");
      }
      for (auto& f : g.fibers) f.state = State::kReady;
      continue;
    }
    bool released = false;
    for (uint s = 0; s < g.simd_active.size(); ++s) {
      const uint lo = s * kSimdWidth, hi = std::min(size, lo + kSimdWidth);
      uint waiting = 0, alive = 0;
      uint32_t mask = 0;
      for (uint t = lo; t < hi; ++t) {
        if (g.fibers[t].state == State::kDone) continue;
        ++alive;
        if (g.fibers[t].state == State::kSimd) {
          ++waiting;
          mask |= 1u << (t - lo);
        }
      }
      if (alive > 0 && waiting == alive) {
        g.simd_active[s] = mask;
        for (uint t = lo; t < hi; ++t)
          if (g.fibers[t].state == State::kSimd) g.fibers[t].state = State::kReady;
        released = true;
      }
    }
    if (!released) {
      fail("deadlock: threads wait in threadgroup_barrier while others of their simd-group wait "
           "in a simd-group function (non-uniform control flow)");
    }
  }
  g_group = outer;
}

// Launches a grid of threadgroups (dispatchThreadgroups): body(group_position, thread_index).
inline void dispatch(uint3 groups, uint threads_per_group,
                     const std::function<void(uint3, uint)>& body) {
  for (uint z = 0; z < groups.z; ++z)
    for (uint y = 0; y < groups.y; ++y)
      for (uint x = 0; x < groups.x; ++x) {
        const uint3 pos{x, y, z};
        run_threadgroup(threads_per_group, [&](uint tid) { body(pos, tid); }, ((x + y + z) & 1u) != 0u);
      }
}

// Offers v to the simd-group, waits for every active lane, and returns the lanes' values
// (inactive lanes absent from `mask`).
template <class T>
struct Exchange {
  T values[kSimdWidth];
  uint32_t mask;
  uint lane;
};

template <class T>
inline Exchange<T> exchange(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  Group& g = group();
  Fiber& f = self();
  std::memcpy(f.slot, &v, sizeof(T));
  block(State::kSimd);
  const uint s = f.tid / kSimdWidth, lo = s * kSimdWidth;
  Exchange<T> e{};
  e.mask = g.simd_active[s];
  e.lane = f.tid - lo;
  for (uint l = 0; l < kSimdWidth; ++l) {
    if (e.mask & (1u << l)) std::memcpy(&e.values[l], g.fibers[lo + l].slot, sizeof(T));
  }
  block(State::kSimd);  // nobody overwrites its slot before every lane has read
  return e;
}

template <class T, class Op>
inline T butterfly(const Exchange<T>& e, T identity, Op op) {
  T v[kSimdWidth];
  for (uint l = 0; l < kSimdWidth; ++l) v[l] = (e.mask & (1u << l)) ? e.values[l] : identity;
  for (uint off = kSimdWidth / 2; off >= 1; off >>= 1) {
    T next[kSimdWidth];
    for (uint l = 0; l < kSimdWidth; ++l) next[l] = op(v[l], v[l ^ off]);
    std::copy(next, next + kSimdWidth, v);
  }
  return v[e.lane];
}

}  // namespace emu

inline void threadgroup_barrier(mem_flags) { emu::block(emu::State::kBarrier); }
inline void simdgroup_barrier(mem_flags) { (void)emu::exchange<int>(0); }

template <class T>
inline T simd_sum(T v) {
  return emu::butterfly(emu::exchange(v), T(0), [](T a, T b) { return a + b; });
}
template <class T>
inline T simd_max(T v) {
  const T lowest = std::numeric_limits<T>::has_infinity ? -std::numeric_limits<T>::infinity()
                                                        : std::numeric_limits<T>::lowest();
  return emu::butterfly(emu::exchange(v), lowest, [](T a, T b) { return std::max(a, b); });
}
template <class T>
inline T simd_min(T v) {
  const T highest = std::numeric_limits<T>::has_infinity ? std::numeric_limits<T>::infinity()
                                                         : std::numeric_limits<T>::max();
  return emu::butterfly(emu::exchange(v), highest, [](T a, T b) { return std::min(a, b); });
}
// Reading an inactive lane is undefined on the GPU; the emulation returns the caller's value.
template <class T>
inline T simd_shuffle(T v, ushort src_lane) {
  const auto e = emu::exchange(v);
  const uint l = src_lane % emu::kSimdWidth;
  return (e.mask & (1u << l)) ? e.values[l] : v;
}
template <class T>
inline T simd_shuffle_xor(T v, ushort mask) {
  const auto e = emu::exchange(v);
  const uint l = (e.lane ^ mask) % emu::kSimdWidth;
  return (e.mask & (1u << l)) ? e.values[l] : v;
}
template <class T>
inline T simd_broadcast(T v, ushort lane) {
  return simd_shuffle(v, lane);
}
template <class T>
inline T simd_prefix_exclusive_sum(T v) {
  const auto e = emu::exchange(v);
  T s = T(0);
  for (uint l = 0; l < e.lane; ++l)
    if (e.mask & (1u << l)) s += e.values[l];
  return s;
}

}  // namespace metal

#endif  // __METAL_VERSION__
