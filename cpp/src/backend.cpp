#include "turboquant/backend.h"

#include <cstdlib>

#include "backend/cpu/kernels.h"
#include "turboquant/error.h"

#ifdef TURBOQUANT_HAS_METAL
#include "backend/metal/metal_backend.h"
#endif

namespace turboquant {

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = [] {
    CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    f.sse42 = __builtin_cpu_supports("sse4.2");
    f.avx2 = __builtin_cpu_supports("avx2");
    f.fma = __builtin_cpu_supports("fma");
    f.avx512f = __builtin_cpu_supports("avx512f");
    f.avx512bw = __builtin_cpu_supports("avx512bw");
    f.avx512vl = __builtin_cpu_supports("avx512vl");
    f.avx512dq = __builtin_cpu_supports("avx512dq");
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
    f.f16c = __builtin_cpu_supports("f16c");
    f.bmi2 = __builtin_cpu_supports("bmi2");
#else
    f.f16c = f.avx2;
    f.bmi2 = f.avx2;
#endif
#elif defined(__aarch64__)
    f.neon = true;
#endif
    return f;
  }();
  return features;
}

std::vector<std::string> compiled_simd_targets() {
  // SIMD kernel sets register here as they are added (cpp/src/backend/cpu/*_avx2.cpp ...).
#if defined(__x86_64__) || defined(__i386__)
  return {"scalar", "avx2", "avx512"};
#elif TURBOQUANT_NEON_KERNELS
  return {"scalar", "neon"};
#else
  return {"scalar"};
#endif
}

std::vector<std::string> available_simd_targets() {
  std::vector<std::string> t{"scalar"};
  const auto& f = cpu_features();
  for (const auto& name : compiled_simd_targets()) {
    if (name == "avx2" && f.avx2 && f.fma && f.f16c) t.push_back(name);
    if (name == "avx512" && f.avx2 && f.fma && f.f16c && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq)
      t.push_back(name);
    if (name == "neon" && f.neon) t.push_back(name);
  }
  return t;
}

std::vector<std::string> available_backends() {
  std::vector<std::string> names{"cpu"};
#ifdef TURBOQUANT_HAS_METAL
  if (metal::available()) names.push_back("metal");  // Apple build with a Metal device
#endif
  return names;
}

std::string resolve_backend(const std::string& requested) {
  std::string name = requested;
  if (name == "auto") {
    const char* env = std::getenv("TURBOQUANT_BACKEND");
    name = (env && *env) ? std::string(env) : std::string("auto");
    if (name == "auto") {
      for (const auto& b : available_backends())
        if (b == "metal") return b;
      return "cpu";
    }
  }
  if (name == "cpu") return name;
  if (name == "metal") {
    for (const auto& b : available_backends())
      if (b == "metal") return name;
    throw NotSupported("Metal is not available on this platform (backends: cpu)");
  }
  throw InvalidArgument("backend must be 'auto', 'cpu' or 'metal', got '" + name + "'");
}

std::string compiler_description() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

}  // namespace turboquant
