// libFuzzer target: Rotation::from_parameters, the loader of stored rotations (saved caches
// and artifact stores install rotations through it). Input: kind byte, dim byte, then floats.
// Only FormatError / InvalidArgument (a bad kind or dim) may come out; a rotation that loads
// must be orthogonal on a test vector (norm preserved).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "turboquant/error.h"
#include "turboquant/rotation.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const auto kind = static_cast<turboquant::RotationKind>(data[0] % 4);
  static constexpr int kDims[] = {2, 3, 4, 8, 16, 32, 5, 0};
  const int dim = kDims[data[1] % 8];
  std::vector<float> params((size - 2) / sizeof(float));
  if (!params.empty()) std::memcpy(params.data(), data + 2, params.size() * sizeof(float));
  try {
    auto rot = turboquant::Rotation::from_parameters(kind, dim, params);
    std::vector<float> x(static_cast<size_t>(dim), 0.0f), y(static_cast<size_t>(dim));
    x[0] = 1.0f;
    rot->forward(x.data(), y.data(), 1);
    double n = 0;
    for (float v : y) n += static_cast<double>(v) * v;
    if (!(std::fabs(n - 1.0) < 1e-2)) __builtin_trap();
  } catch (const turboquant::FormatError&) {
  } catch (const turboquant::InvalidArgument&) {
  }
  return 0;
}
