// The turboquant._core extension module. Thin: argument checking and zero-copy views;
// every computation lives in the C++ library. One bind_<layer>() per binding file.
#include <pybind11/stl.h>

#include "common.h"
#include "turboquant/backend.h"
#include "turboquant/packing.h"
#include "turboquant/rng.h"

namespace turboquant::bindings {
void bind_quantizer(py::module_& m);
void bind_threads(py::module_& m);
void bind_cache(py::module_& m);
void bind_cache_codes(py::module_& m);
void bind_segment_plan(py::module_& m);
void bind_cache_batch(py::module_& m);
}  // namespace turboquant::bindings

namespace py = pybind11;
using namespace turboquant;

PYBIND11_MODULE(_core, m) {
  m.doc() = "turboquant C++ core";
  m.attr("__version__") = TURBOQUANT_VERSION;

  static py::exception<FormatError> format_error(m, "FormatError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const FormatError& e) {
      py::set_error(format_error, e.what());
    } catch (const TypeMismatch& e) {
      py::set_error(PyExc_TypeError, e.what());
    } catch (const InvalidArgument& e) {
      py::set_error(PyExc_ValueError, e.what());
    } catch (const NotSupported& e) {
      py::set_error(PyExc_RuntimeError, e.what());
    } catch (const ConcurrentAccess& e) {
      py::set_error(PyExc_RuntimeError, e.what());
    } catch (const OutOfMemory& e) {
      py::set_error(PyExc_MemoryError, e.what());
    }
  });

  m.def("backends", &available_backends, "Backends usable in this process, 'cpu' first.");
  m.def("resolve_backend", &resolve_backend, py::arg("requested") = "auto");
  m.def("build_info", [] {
    py::dict d;
    d["version"] = TURBOQUANT_VERSION;
    d["compiler"] = compiler_description();
    d["cplusplus"] = static_cast<long>(__cplusplus);
    d["simd_targets_compiled"] = compiled_simd_targets();
    d["simd_targets_available"] = available_simd_targets();
    const auto& f = cpu_features();
    py::dict cpu;
    cpu["sse4.2"] = f.sse42; cpu["avx2"] = f.avx2; cpu["fma"] = f.fma; cpu["f16c"] = f.f16c;
    cpu["avx512f"] = f.avx512f; cpu["avx512bw"] = f.avx512bw; cpu["neon"] = f.neon;
    d["cpu_features"] = cpu;
    d["backends"] = available_backends();
    d["packing_version"] = kPackingVersion;
    d["rng_scheme_version"] = kRngSchemeVersion;
    return d;
  }, "Compiler, SIMD targets and backends of this build.");

  bindings::bind_quantizer(m);
  bindings::bind_threads(m);
  bindings::bind_cache(m);
  bindings::bind_cache_codes(m);
  bindings::bind_segment_plan(m);
  bindings::bind_cache_batch(m);
}
