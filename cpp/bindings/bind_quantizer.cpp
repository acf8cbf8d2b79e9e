// Python bindings of the quantizer layer: Quantizer, codebooks, packing, rotations.
#include <pybind11/stl.h>

#include "common.h"
#include "turboquant/codebook.h"
#include "turboquant/packing.h"
#include "turboquant/quantizer.h"
#include "turboquant/quantizer_outlier.h"
#include "turboquant/quantizer_polar.h"
#include "turboquant/quantizer_prod.h"
#include "turboquant/rotation.h"

namespace turboquant::bindings {

namespace {

NormDtype norm_dtype_from(const py::object& o) {
  const std::string name = py::str(py::module_::import("numpy").attr("dtype")(o)).cast<std::string>();
  if (name == "float16") return NormDtype::kFloat16;
  if (name == "float32") return NormDtype::kFloat32;
  throw InvalidArgument("norm_dtype must be float16 or float32, got " + name);
}

py::dtype norm_numpy_dtype(NormDtype t) {
  return t == NormDtype::kFloat16 ? py::dtype("float16") : py::dtype::of<float>();
}

// Validates (codes, norms) against a quantizer and returns the number of vectors.
size_t check_codes(const Quantizer& q, const py::array& codes, const py::array& norms,
                   std::vector<py::ssize_t>* lead) {
  if (!codes.dtype().is(py::dtype::of<uint8_t>()))
    throw TypeMismatch("codes must be uint8, got " + dtype_name(codes));
  if (codes.ndim() < 1 || static_cast<size_t>(codes.shape(codes.ndim() - 1)) != q.code_bytes())
    throw InvalidArgument("codes last dimension must be code_bytes=" + std::to_string(q.code_bytes()) +
                          " for this quantizer");
  if (!(codes.flags() & py::array::c_style)) throw InvalidArgument("codes must be C-contiguous");
  if (!norms.dtype().is(norm_numpy_dtype(q.norm_dtype())))
    throw TypeMismatch("norms must be " + py::str(norm_numpy_dtype(q.norm_dtype())).cast<std::string>() +
                       ", got " + dtype_name(norms));
  if (!(norms.flags() & py::array::c_style)) throw InvalidArgument("norms must be C-contiguous");
  lead->assign(codes.shape(), codes.shape() + codes.ndim() - 1);
  size_t n = 1;
  for (auto s : *lead) n *= static_cast<size_t>(s);
  if (static_cast<size_t>(norms.size()) != n)
    throw InvalidArgument("norms has " + std::to_string(norms.size()) + " entries but codes has " +
                          std::to_string(n) + " vectors");
  return n;
}

// Outlier options shared by Quantizer(...), bytes_per_vector() and effective_bits().
void set_outliers(QuantizerConfig& c, const py::object& outlier_channels, int n_outlier_channels,
                  int outlier_bits, const py::object& calibration, int split_angle_bits) {
  c.n_outlier_channels = n_outlier_channels;
  c.outlier_bits = outlier_bits;
  c.split_angle_bits = split_angle_bits;
  if (!outlier_channels.is_none()) {
    TQ_CHECK(calibration.is_none(), InvalidArgument, "give outlier_channels or calibration, not both");
    c.outlier_channels = outlier_channels.cast<std::vector<int>>();
  } else if (!calibration.is_none()) {
    TQ_CHECK(n_outlier_channels > 0, InvalidArgument,
             "calibration data needs n_outlier_channels > 0 (how many channels to pick)");
    const FloatRows rows = float_rows(calibration, static_cast<size_t>(c.dim), "calibration");
    const std::vector<float> data = rows.to_float();
    c.outlier_channels = select_outlier_channels(data.data(), rows.rows, c.dim, n_outlier_channels);
  }
}

QuantizerConfig simple_config(const std::string& method, int dim, int bits, int jl_dim,
                              const py::object& norm_dtype, const py::object& outlier_channels,
                              int n_outlier_channels, int outlier_bits, int split_angle_bits) {
  QuantizerConfig c;
  c.method = method;
  c.dim = dim;
  c.bits = bits;
  c.jl_dim = jl_dim;
  c.norm_dtype = norm_dtype_from(norm_dtype);
  set_outliers(c, outlier_channels, n_outlier_channels, outlier_bits, py::none(), split_angle_bits);
  return c;
}

}  // namespace

void bind_quantizer(py::module_& m) {
  py::class_<Codebook>(m, "Codebook", "Lloyd-Max scalar codebook for one (dim, bits, law).")
      .def_readonly("dim", &Codebook::dim)
      .def_readonly("bits", &Codebook::bits)
      .def_property_readonly("law", [](const Codebook& c) { return c.law == CoordinateLaw::kBeta ? "beta" : "gaussian"; })
      .def_property_readonly("centroids", [](const Codebook& c) { return py::array_t<float>(c.centroids.size(), c.centroids.data()); })
      .def_property_readonly("boundaries", [](const Codebook& c) { return py::array_t<float>(c.boundaries.size(), c.boundaries.data()); })
      .def_readonly("distortion", &Codebook::distortion, "E[(y - c(y))^2] for one coordinate")
      .def_property_readonly("vector_distortion", &Codebook::vector_distortion, "expected ||u - u~||^2 for a unit vector")
      .def("__repr__", [](const Codebook& c) {
        return "Codebook(dim=" + std::to_string(c.dim) + ", bits=" + std::to_string(c.bits) +
               ", vector_distortion=" + std::to_string(c.vector_distortion()) + ")";
      });

  m.def("codebook", [](int dim, int bits, const std::string& law) -> const Codebook& {
        TQ_CHECK(law == "beta" || law == "gaussian", InvalidArgument, "law must be 'beta' or 'gaussian', got '", law, "'");
        py::gil_scoped_release release;
        return lloyd_max_codebook(dim, bits, law == "beta" ? CoordinateLaw::kBeta : CoordinateLaw::kGaussian);
      }, py::arg("dim"), py::arg("bits"), py::arg("law") = "beta", py::return_value_policy::reference,
      "The cached Lloyd-Max codebook for a coordinate of a random unit vector in R^dim.");

  m.def("pack_indices", [](py::array_t<uint8_t, py::array::c_style> idx, int bits) {
        TQ_CHECK(bits >= 1 && bits <= 8, InvalidArgument, "bits must be in [1, 8], got ", bits);
        const auto* p = idx.data();
        for (py::ssize_t i = 0; i < idx.size(); ++i)
          TQ_CHECK(p[i] < (1u << bits), InvalidArgument, "index ", int(p[i]), " does not fit in ", bits, " bits");
        py::array_t<uint8_t> out(static_cast<py::ssize_t>(packed_bytes(static_cast<size_t>(idx.size()), bits)));
        pack_indices(p, static_cast<size_t>(idx.size()), bits, out.mutable_data());
        return out;
      }, py::arg("indices"), py::arg("bits"), "Dense LSB-first packing (layout: packing.h).");
  m.def("unpack_indices", [](py::array_t<uint8_t, py::array::c_style> packed, size_t count, int bits) {
        TQ_CHECK(bits >= 1 && bits <= 8, InvalidArgument, "bits must be in [1, 8], got ", bits);
        TQ_CHECK(static_cast<size_t>(packed.size()) >= packed_bytes(count, bits), InvalidArgument,
                 "packed has ", packed.size(), " bytes, need ", packed_bytes(count, bits));
        py::array_t<uint8_t> out(static_cast<py::ssize_t>(count));
        unpack_indices(packed.data(), count, bits, out.mutable_data());
        return out;
      }, py::arg("packed"), py::arg("count"), py::arg("bits"));

  m.def("methods", &registered_methods, "Names of the registered quantization methods.");

  m.def("bytes_per_vector", [](const std::string& method, int dim, int bits, int jl_dim,
                               const py::object& norm_dtype, const py::object& outlier_channels,
                               int n_outlier_channels, int outlier_bits, int split_angle_bits) {
        const QuantizerConfig c = simple_config(method, dim, bits, jl_dim, norm_dtype, outlier_channels,
                                                n_outlier_channels, outlier_bits, split_angle_bits);
        py::gil_scoped_release release;
        return bytes_per_vector(c);
      }, py::arg("method"), py::arg("dim"), py::arg("bits"), py::kw_only(), py::arg("jl_dim") = 0,
      py::arg("norm_dtype") = "float16", py::arg("outlier_channels") = py::none(),
      py::arg("n_outlier_channels") = 0, py::arg("outlier_bits") = 0, py::arg("split_angle_bits") = 8,
      "Exact stored bytes per vector (codes + norm). At dim=128, fp16 norm: turboquant_mse 2/3/4 bits "
      "-> 34/50/66, turboquant_prod -> 36/52/68, polar -> 34/50/66, qjl 1 bit -> 18.");
  m.def("effective_bits", [](const std::string& method, int dim, int bits, int jl_dim,
                             const py::object& norm_dtype, const py::object& outlier_channels,
                             int n_outlier_channels, int outlier_bits, int split_angle_bits, bool nominal) {
        const QuantizerConfig c = simple_config(method, dim, bits, jl_dim, norm_dtype, outlier_channels,
                                                n_outlier_channels, outlier_bits, split_angle_bits);
        py::gil_scoped_release release;
        const auto q = make_quantizer(c);
        return nominal ? q->nominal_bits() : q->effective_bits();
      }, py::arg("method"), py::arg("dim"), py::arg("bits"), py::kw_only(), py::arg("jl_dim") = 0,
      py::arg("norm_dtype") = "float16", py::arg("outlier_channels") = py::none(),
      py::arg("n_outlier_channels") = 0, py::arg("outlier_bits") = 0, py::arg("split_angle_bits") = 8,
      py::arg("nominal") = false,
      "Bits per coordinate, exactly: stored = 8 * bytes_per_vector / dim (norm and per-vector "
      "scalars included), or with nominal=True the payload's mean bits (e.g. 2.5 for 64 outlier "
      "channels at 3 bits + 64 at 2).");
  m.def("select_outlier_channels", [](const py::handle& x, int count) {
        py::array a;
        try { a = py::array::ensure(x); } catch (...) {}
        TQ_CHECK(a && a.ndim() >= 2, InvalidArgument, "calibration data must be an (n, head_dim) array");
        const auto dim = static_cast<size_t>(a.shape(a.ndim() - 1));
        const FloatRows rows = float_rows(x, dim, "calibration data");
        const std::vector<float> data = rows.to_float();
        py::gil_scoped_release release;
        return select_outlier_channels(data.data(), rows.rows, static_cast<int>(dim), count);
      }, py::arg("x"), py::arg("count"),
      "The `count` channels of largest mean |x| over calibration vectors x (..., head_dim), ascending.");

  py::class_<Quantizer>(m, "Quantizer", R"doc(
A vector quantizer: encode (n, d) vectors into packed codes plus norms, decode them, and
estimate inner products directly from the codes.

    q = turboquant.Quantizer("turboquant_mse", dim=128, bits=3, seed=42)
    codes, norms = q.encode(x)          # x: (..., 128) float32 or float16
    x_hat = q.decode(codes, norms)      # (..., 128) float32
    ip = q.inner_products(queries, codes, norms)   # (m, n)
)doc")
      .def(py::init([](const std::string& method, int dim, int bits, const py::object& seed, const std::string& rotation,
                       bool norm_correction, const py::object& norm_dtype, int jl_dim, uint64_t stream,
                       const py::object& outlier_channels, int n_outlier_channels, int outlier_bits,
                       const py::object& calibration, int split_angle_bits) {
             QuantizerConfig c;
             c.method = method;
             c.dim = dim;
             c.bits = bits;
             c.seed = seed_from(seed);
             c.stream = stream;
             c.rotation = rotation_kind_from_string(rotation);
             c.norm_correction = norm_correction;
             c.norm_dtype = norm_dtype_from(norm_dtype);
             c.jl_dim = jl_dim;
             set_outliers(c, outlier_channels, n_outlier_channels, outlier_bits, calibration, split_angle_bits);
             py::gil_scoped_release release;
             return make_quantizer(c);
           }),
           py::arg("method") = "turboquant_mse", py::arg("dim") = 128, py::arg("bits") = 3, py::arg("seed") = 0,
           py::arg("rotation") = "auto", py::arg("norm_correction") = false, py::arg("norm_dtype") = "float16",
           py::arg("jl_dim") = 0, py::arg("stream") = 0, py::arg("outlier_channels") = py::none(),
           py::arg("n_outlier_channels") = 0, py::arg("outlier_bits") = 0, py::arg("calibration") = py::none(),
           py::arg("split_angle_bits") = 8)
      .def_property_readonly("method", &Quantizer::method)
      .def_property_readonly("dim", &Quantizer::dim)
      .def_property_readonly("bits", &Quantizer::bits)
      .def_property_readonly("seed", [](const Quantizer& q) { return q.config().seed; })
      .def_property_readonly("jl_dim", [](const Quantizer& q) { return q.config().jl_dim; })
      .def_property_readonly("norm_correction", [](const Quantizer& q) { return q.config().norm_correction; })
      .def_property_readonly("rotation", [](const Quantizer& q) { return to_string(q.rotation().kind()); })
      .def_property_readonly("norm_dtype", [](const Quantizer& q) { return norm_numpy_dtype(q.norm_dtype()); })
      .def_property_readonly("code_bytes", &Quantizer::code_bytes, "packed payload bytes per vector")
      .def_property_readonly("norm_bytes", &Quantizer::norm_bytes)
      .def_property_readonly("bytes_per_vector", &Quantizer::bytes_per_vector)
      .def_property_readonly("effective_bits", &Quantizer::effective_bits, "stored bits per coordinate, norm included")
      .def_property_readonly("nominal_bits", &Quantizer::nominal_bits,
                             "payload bits per coordinate (exact weighted mean for an outlier split)")
      .def_property_readonly("outlier_channels", [](const Quantizer& q) {
        if (auto* s = dynamic_cast<const OutlierSplitQuantizer*>(&q)) return s->outlier_channels();
        return std::vector<int>{};
      }, "channels quantized at outlier_bits (ascending); empty without an outlier split")
      .def_property_readonly("outlier_bits", [](const Quantizer& q) {
        auto* s = dynamic_cast<const OutlierSplitQuantizer*>(&q);
        return s ? s->outlier_bits() : 0;
      })
      .def_property_readonly("split_angle_bits", [](const Quantizer& q) { return q.config().split_angle_bits; },
                             "bits of the outlier split's per-vector part angle (8 or 16)")
      .def("part", [](const Quantizer& q, int p) -> const Quantizer& {
        auto* s = dynamic_cast<const OutlierSplitQuantizer*>(&q);
        TQ_CHECK(s != nullptr, InvalidArgument, "part() needs an outlier split quantizer");
        TQ_CHECK(p == 0 || p == 1, InvalidArgument, "part must be 0 (outliers) or 1 (inliers), got ", p);
        return s->part(static_cast<size_t>(p));
      }, py::arg("p"), py::return_value_policy::reference_internal,
         "Part p of an outlier split (0: outlier channels, 1: the others): its own quantizer, "
         "rotation and codebook (the Metal kernels read their tables).")
      .def("state_bytes", &Quantizer::state_bytes, "bytes of the quantizer's state (rotation, tables)")
      .def("rotation_matrix", [](const Quantizer& q) {
        const auto mat = q.rotation().matrix();
        py::array_t<float> out({q.dim(), q.dim()});
        std::copy(mat.begin(), mat.end(), out.mutable_data());
        return out;
      }, "The rotation Π as a (d, d) matrix: y = Π x.")
      .def("rotation_parameters", [](const Quantizer& q) {
        const auto p = q.rotation().parameters();
        return py::array_t<float>(static_cast<py::ssize_t>(p.size()), p.data());
      })
      .def_property_readonly("codebook", [](const Quantizer& q) -> py::object {
        if (auto* mse = dynamic_cast<const MseQuantizer*>(&q)) return py::cast(mse->codebook(), py::return_value_policy::reference);
        if (auto* prod = dynamic_cast<const ProdQuantizer*>(&q); prod && prod->codebook())
          return py::cast(*prod->codebook(), py::return_value_policy::reference);
        return py::none();
      }, "the Lloyd-Max codebook (turboquant_mse; the (bits-1)-bit stage of turboquant_prod), else None")
      .def_property_readonly("predicted_distortion", [](const Quantizer& q) -> py::object {
        if (auto* mse = dynamic_cast<const MseQuantizer*>(&q)) return py::float_(mse->codebook().vector_distortion());
        if (auto* polar = dynamic_cast<const PolarQuantizer*>(&q)) return py::float_(polar->predicted_distortion());
        return py::none();
      })
      .def("encode", [](const Quantizer& q, const py::handle& x, bool copy) {
        const FloatRows rows = float_rows(x, static_cast<size_t>(q.dim()), "x", copy);
        py::array_t<uint8_t> codes(with_last(rows.lead_shape, static_cast<py::ssize_t>(q.code_bytes())));
        py::array norms(norm_numpy_dtype(q.norm_dtype()), rows.lead_shape);
        auto* cp = codes.mutable_data();
        auto* np = static_cast<uint8_t*>(norms.mutable_data());
        {
          py::gil_scoped_release release;
          rows.for_blocks([&](const float* b, size_t r0, size_t n) {
            q.encode(b, n, cp + r0 * q.code_bytes(), np + r0 * q.norm_bytes());
          });
        }
        return py::make_tuple(codes, norms);
      }, py::arg("x"), py::arg("copy") = false,
      "Encode (..., d) float32/float16 vectors -> (codes (..., code_bytes) uint8, norms (...)).")
      .def("decode", [](const Quantizer& q, const py::array& codes, const py::array& norms) {
        std::vector<py::ssize_t> lead;
        const size_t n = check_codes(q, codes, norms, &lead);
        py::array_t<float> out(with_last(lead, q.dim()));
        auto* op = out.mutable_data();
        {
          py::gil_scoped_release release;
          q.decode(static_cast<const uint8_t*>(codes.data()), norms.data(), n, op);
        }
        return out;
      }, py::arg("codes"), py::arg("norms"))
      .def("inner_products", [](const Quantizer& q, const py::handle& queries, const py::array& codes,
                                const py::array& norms) {
        const FloatRows qs = float_rows(queries, static_cast<size_t>(q.dim()), "queries");
        std::vector<py::ssize_t> lead;
        const size_t n = check_codes(q, codes, norms, &lead);
        const std::vector<float> qf = qs.to_float();
        py::array_t<float> out({static_cast<py::ssize_t>(qs.rows), static_cast<py::ssize_t>(n)});
        auto* op = out.mutable_data();
        {
          py::gil_scoped_release release;
          q.inner_products(qf.data(), qs.rows, static_cast<const uint8_t*>(codes.data()), norms.data(), n, op);
        }
        return out;
      }, py::arg("queries"), py::arg("codes"), py::arg("norms"),
      "Estimated <q_i, x_t> from the codes: (m, d) queries x n codes -> (m, n).")
      .def("__repr__", [](const Quantizer& q) {
        std::string extra;
        if (auto* s = dynamic_cast<const OutlierSplitQuantizer*>(&q))
          extra = ", n_outlier_channels=" + std::to_string(s->outlier_channels().size()) +
                  ", outlier_bits=" + std::to_string(s->outlier_bits()) +
                  ", split_angle_bits=" + std::to_string(q.config().split_angle_bits);
        return "Quantizer(method='" + q.method() + "', dim=" + std::to_string(q.dim()) + ", bits=" +
               std::to_string(q.bits()) + extra + ", seed=" + std::to_string(q.config().seed) + ", rotation='" +
               to_string(q.rotation().kind()) + "')";
      });
}

}  // namespace turboquant::bindings
