// Python bindings of the thread pool: turboquant.set_num_threads / get_num_threads.
#include "common.h"
#include "turboquant/thread_pool.h"

namespace turboquant::bindings {

void bind_threads(py::module_& m) {
  m.def("set_num_threads", [](int n) {
        py::gil_scoped_release release;
        set_num_threads(n);
      }, py::arg("n"),
      "Threads used by batch encode and multi-head attention (0 = default: "
      "TURBOQUANT_NUM_THREADS or the number of cores). The pool is created once.");
  m.def("get_num_threads", &get_num_threads, "Threads used by parallel work.");
}

}  // namespace turboquant::bindings
