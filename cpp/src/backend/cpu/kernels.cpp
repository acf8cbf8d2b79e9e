// Run-time selection of the CPU kernel set.
#include <cstdlib>
#include <string>

#include "backend/cpu/kernels.h"
#include "turboquant/backend.h"
#include "turboquant/error.h"

namespace turboquant::cpu {

std::vector<const Kernels*> usable_kernels() {
  std::vector<const Kernels*> k{&scalar_kernels()};
  // SIMD variants are appended here, best last, when the CPU supports them.
  const auto& f = cpu_features();
#if defined(__x86_64__) || defined(__i386__)
  if (f.avx2 && f.fma && f.f16c) k.push_back(&avx2_kernels());
  if (f.avx2 && f.fma && f.f16c && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq)
    k.push_back(&avx512_kernels());
#endif
#if TURBOQUANT_NEON_KERNELS
  if (f.neon) k.push_back(&neon_kernels());
#endif
  (void)f;
  return k;
}

const Kernels& active_kernels() {
  static const Kernels* chosen = [] {
    const auto all = usable_kernels();
    const char* env = std::getenv("TURBOQUANT_SIMD");
    if (env && *env) {
      for (const auto* k : all)
        if (std::string(k->name) == env) return k;
      std::string names;
      for (const auto* k : all) names += std::string(names.empty() ? "" : ", ") + k->name;
      throw InvalidArgument(std::string("TURBOQUANT_SIMD='") + env + "' is not usable here (usable: " + names + ")");
    }
    return all.back();
  }();
  return *chosen;
}

}  // namespace turboquant::cpu
