// Compute backends (DESIGN §3 "Backend"). `cpu` always exists and holds the scalar
// reference kernels plus SIMD variants chosen at run time from CPU features; `metal` is
// registered on Apple when a device is found. Selection: "auto" | "cpu" | "metal", or the
// TURBOQUANT_BACKEND environment variable when the caller says "auto".
#pragma once

#include <string>
#include <vector>

namespace turboquant {

struct CpuFeatures {
  bool sse42 = false, avx2 = false, fma = false, f16c = false, bmi2 = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool neon = false;
};

// Detected once, at first use.
const CpuFeatures& cpu_features();

// SIMD targets compiled into this build (e.g. {"scalar", "avx2"}), and those usable here.
std::vector<std::string> compiled_simd_targets();
std::vector<std::string> available_simd_targets();

// Names of the backends usable in this process, "cpu" first.
std::vector<std::string> available_backends();

// Resolves "auto" (honouring TURBOQUANT_BACKEND) to a concrete backend name; throws
// InvalidArgument for an unknown name and NotSupported for one not available here.
std::string resolve_backend(const std::string& requested);

// Compiler and build description for turboquant.build_info().
std::string compiler_description();

}  // namespace turboquant
