// Helpers shared by the binding files: zero-copy input views with clear errors.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "turboquant/error.h"
#include "turboquant/half.h"

namespace turboquant::bindings {

namespace py = pybind11;

// A read-only view of a float32 or float16 array whose last dimension is `dim`.
// float32 C-contiguous input is read in place; float16 is converted row block by row block
// into a small scratch buffer (never a whole copy). Anything else raises TypeError (dtype)
// or ValueError (shape, layout), unless copy=True asks for a converted copy.
struct FloatRows {
  py::array array;          // keeps the input alive
  const void* data = nullptr;
  bool is_half = false;
  size_t rows = 0;
  size_t dim = 0;
  std::vector<py::ssize_t> lead_shape;  // shape without the last dimension

  // Calls fn(const float* block, size_t first_row, size_t count) over blocks of rows.
  template <typename Fn>
  void for_blocks(Fn&& fn, size_t block = 1024) const {
    if (!is_half) {
      if (rows) fn(static_cast<const float*>(data), size_t{0}, rows);
      return;
    }
    std::vector<float> scratch(std::min(block, rows) * dim);
    const auto* h = static_cast<const half_bits*>(data);
    for (size_t r0 = 0; r0 < rows; r0 += block) {
      const size_t nb = std::min(block, rows - r0);
      for (size_t i = 0; i < nb * dim; ++i) scratch[i] = half_to_float(h[r0 * dim + i]);
      fn(scratch.data(), r0, nb);
    }
  }
  // The whole input as fp32 (a copy only for float16 input).
  std::vector<float> to_float() const {
    std::vector<float> out(rows * dim);
    for_blocks([&](const float* b, size_t r0, size_t n) {
      std::copy(b, b + n * dim, out.begin() + static_cast<std::ptrdiff_t>(r0 * dim));
    });
    return out;
  }
};

inline std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

inline FloatRows float_rows(const py::handle& obj, size_t dim, const char* what, bool copy = false,
                            int min_rank = 1) {
  py::array a;
  try {
    a = py::array::ensure(obj);
  } catch (...) {
  }
  if (!a) throw TypeMismatch(std::string(what) + " must be a float32 or float16 array");
  const bool f32 = a.dtype().is(py::dtype::of<float>());
  const bool f16 = a.dtype().char_() == 'e';
  if (!f32 && !f16) {
    if (!copy) {
      throw TypeMismatch(std::string(what) + " must be float32 or float16, got " + dtype_name(a) +
                         " (convert with .astype(np.float32) or pass copy=True)");
    }
    a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(a);
  }
  if (a.ndim() < min_rank) {
    throw InvalidArgument(std::string(what) + " must have at least " + std::to_string(min_rank) +
                          " dimension(s), got a " + std::to_string(a.ndim()) + "-d array");
  }
  if (a.ndim() == 0 || static_cast<size_t>(a.shape(a.ndim() - 1)) != dim) {
    throw InvalidArgument(std::string(what) + " last dimension must be head_dim=" + std::to_string(dim) +
                          ", got shape " + py::str(py::tuple(py::cast(std::vector<py::ssize_t>(
                                                        a.shape(), a.shape() + a.ndim())))).cast<std::string>());
  }
  if (!(a.flags() & py::array::c_style)) {
    if (!copy) {
      throw InvalidArgument(std::string(what) +
                            " must be C-contiguous (use np.ascontiguousarray or pass copy=True)");
    }
    a = py::module_::import("numpy").attr("ascontiguousarray")(a).cast<py::array>();
  }
  FloatRows r;
  r.is_half = a.dtype().char_() == 'e';
  r.array = a;
  r.data = a.data();
  r.dim = dim;
  r.lead_shape.assign(a.shape(), a.shape() + a.ndim() - 1);
  r.rows = 1;
  for (auto s : r.lead_shape) r.rows *= static_cast<size_t>(s);
  return r;
}

// A seed from Python: any integer in [0, 2^64 - 1]; anything else raises a clear error
// (a bare uint64_t parameter would give pybind11's generic "incompatible arguments").
inline uint64_t seed_from(const py::handle& obj) {
  if (!py::isinstance<py::int_>(obj) || py::isinstance<py::bool_>(obj)) {
    throw TypeMismatch("seed must be an int in [0, 2**64 - 1], got " +
                       py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  }
  const py::int_ v = py::reinterpret_borrow<py::int_>(obj);
  const bool ok = py::int_(0) <= v && v <= py::int_(static_cast<unsigned long long>(~0ULL));
  if (!ok) throw InvalidArgument("seed must be in [0, 2**64 - 1], got " + py::str(v).cast<std::string>());
  return v.cast<uint64_t>();
}

inline std::vector<py::ssize_t> with_last(std::vector<py::ssize_t> shape, py::ssize_t last) {
  shape.push_back(last);
  return shape;
}

}  // namespace turboquant::bindings
