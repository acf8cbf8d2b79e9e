// Compiles, as C++ through metal/metal_compat.h, the exact single source that is embedded
// into the library for the Metal compiler (build/.../generated/turboquant_kernels.metal,
// written by cmake/embed_metal.cmake): a syntax-level check of what the GPU compiles, in
// its file order and without include paths. The kernels' behaviour is tested through
// metal_emulation.cpp, which includes the files one by one.
#include "metal_compat.h"

namespace tq_single_source {
#include "turboquant_kernels.metal"
}  // namespace tq_single_source

namespace turboquant::metal_emu {
// The scratch size the single source declares, for test_metal_emulation.cpp to compare.
unsigned single_source_attention_scratch(unsigned dim, unsigned group, unsigned bt, unsigned kb, unsigned vb) {
  return tq_single_source::tq_attention_scratch_floats(dim, group, bt, kb, vb);
}
}  // namespace turboquant::metal_emu
