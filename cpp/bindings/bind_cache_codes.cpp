// Raw code access of turboquant._core.KVCache: a stream's stored codes and norms out, and
// already-encoded tokens in. Stores that keep the codes elsewhere (the mlx-resident store
// of python/turboquant/mlx_metal.py) use these to read and write the cache file format of
// serialize.h through this class, so a file saved by either loads in the other.
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "common.h"
#include "turboquant/kv_cache.h"

namespace turboquant::bindings {

namespace {

KVRole role_named(const std::string& role) {
  TQ_CHECK(role == "key" || role == "value", InvalidArgument, "role must be 'key' or 'value', got '", role, "'");
  return role == "key" ? KVRole::kKey : KVRole::kValue;
}

py::dtype norm_dtype_of(const Quantizer& q) {
  return q.norm_dtype() == NormDtype::kFloat16 ? py::dtype("float16") : py::dtype::of<float>();
}

// Checks one role's (codes (H, n, code_bytes) uint8, norms (H, n)) pair; returns n.
size_t check_encoded(const KVCache& kv, KVRole role, const py::array& codes, const py::array& norms,
                     const char* name) {
  const auto H = static_cast<py::ssize_t>(kv.config().n_kv_heads);
  const Quantizer& q = role == KVRole::kKey ? kv.key_quantizer(0, 0) : kv.value_quantizer(0, 0);
  for (int h = 1; h < kv.config().n_kv_heads; ++h) {
    const Quantizer& qh = role == KVRole::kKey ? kv.key_quantizer(0, h) : kv.value_quantizer(0, h);
    TQ_CHECK(qh.code_bytes() == q.code_bytes(), InvalidArgument, name, " codes: KV heads 0 and ", h,
             " have different row sizes (", q.code_bytes(), " and ", qh.code_bytes(),
             " code bytes: per-head bit widths), which one (n_kv_heads, n, code_bytes) array cannot hold");
  }
  TQ_CHECK(codes.dtype().is(py::dtype::of<uint8_t>()), TypeMismatch, name, " codes must be uint8, got ",
           dtype_name(codes));
  TQ_CHECK(codes.ndim() == 3 && codes.shape(0) == H &&
               codes.shape(2) == static_cast<py::ssize_t>(q.code_bytes()),
           InvalidArgument, name, " codes must have shape (n_kv_heads=", H, ", n, code_bytes=", q.code_bytes(),
           ")");
  TQ_CHECK(codes.flags() & py::array::c_style, InvalidArgument, name, " codes must be C-contiguous");
  const auto n = codes.shape(1);
  TQ_CHECK(norms.dtype().is(norm_dtype_of(q)), TypeMismatch, name, " norms must be ",
           py::str(norm_dtype_of(q)).cast<std::string>(), ", got ", dtype_name(norms));
  TQ_CHECK(norms.ndim() == 2 && norms.shape(0) == H && norms.shape(1) == n, InvalidArgument, name,
           " norms must have shape (n_kv_heads=", H, ", n=", n, ")");
  TQ_CHECK(norms.flags() & py::array::c_style, InvalidArgument, name, " norms must be C-contiguous");
  return static_cast<size_t>(n);
}

}  // namespace

void bind_cache_codes(py::module_& m) {
  auto cls = py::reinterpret_borrow<py::class_<KVCache>>(m.attr("KVCache"));
  cls.def("encoded", [](const KVCache& kv, int layer, int kv_head, const std::string& role, size_t start,
                        std::optional<size_t> count) {
        const KVRole r = role_named(role);
        const Quantizer& q = r == KVRole::kKey ? kv.key_quantizer(layer, kv_head) : kv.value_quantizer(layer, kv_head);
        const size_t held = kv.coded_tokens(layer);
        TQ_CHECK(start <= held, InvalidArgument, "start ", start, " beyond the layer's ", held, " coded tokens");
        const size_t c = count ? *count : held - start;
        TQ_CHECK(c <= held - start, InvalidArgument, "tokens [", start, ", ", start + c, ") beyond the layer's ",
                 held, " coded tokens");
        py::array_t<uint8_t> codes({static_cast<py::ssize_t>(c), static_cast<py::ssize_t>(q.code_bytes())});
        py::array norms(norm_dtype_of(q), std::vector<py::ssize_t>{static_cast<py::ssize_t>(c)});
        auto* cp = codes.mutable_data();
        auto* np = static_cast<uint8_t*>(norms.mutable_data());
        {
          py::gil_scoped_release release;
          kv.copy_out(layer, kv_head, r, start, c, cp, np);
        }
        return py::make_tuple(codes, norms);
      }, py::arg("layer") = 0, py::arg("kv_head") = 0, py::arg("role") = "key", py::arg("start") = 0,
      py::arg("count") = py::none(),
      "The stored (codes (n, code_bytes) uint8, norms (n,)) of one stream, tokens [start, start+count)\n"
      "of the coded part of the layer (the fp16 window, if any, is not included).");
  cls.def("append_encoded", [](KVCache& kv, const py::array& key_codes, const py::array& key_norms,
                               const py::array& value_codes, const py::array& value_norms, int layer) {
        TQ_CHECK(layer >= 0 && layer < kv.config().n_layers, InvalidArgument, "layer must be in [0, ",
                 kv.config().n_layers, "), got ", layer);
        const size_t n = check_encoded(kv, KVRole::kKey, key_codes, key_norms, "key");
        const size_t nv = check_encoded(kv, KVRole::kValue, value_codes, value_norms, "value");
        TQ_CHECK(n == nv, InvalidArgument, "key codes hold ", n, " tokens but value codes hold ", nv);
        const auto H = static_cast<size_t>(kv.config().n_kv_heads);
        std::vector<const uint8_t*> codes(2 * H), norms(2 * H);
        const auto* kc = static_cast<const uint8_t*>(key_codes.data());
        const auto* kn = static_cast<const uint8_t*>(key_norms.data());
        const auto* vc = static_cast<const uint8_t*>(value_codes.data());
        const auto* vn = static_cast<const uint8_t*>(value_norms.data());
        for (size_t h = 0; h < H; ++h) {
          const Quantizer& kq = kv.key_quantizer(layer, static_cast<int>(h));
          const Quantizer& vq = kv.value_quantizer(layer, static_cast<int>(h));
          codes[2 * h] = kc + h * n * kq.code_bytes();
          norms[2 * h] = kn + h * n * kq.norm_bytes();
          codes[2 * h + 1] = vc + h * n * vq.code_bytes();
          norms[2 * h + 1] = vn + h * n * vq.norm_bytes();
        }
        py::gil_scoped_release release;
        kv.append_encoded(layer, n, codes, norms);
      }, py::arg("key_codes"), py::arg("key_norms"), py::arg("value_codes"), py::arg("value_norms"),
      py::arg("layer") = 0,
      "Append n already-encoded tokens to one layer: codes (n_kv_heads, n, code_bytes) uint8 and\n"
      "norms (n_kv_heads, n) float16 per role, as encoded by this cache's quantizers (no check that\n"
      "they were). All arrays are validated before anything is written.");
}

}  // namespace turboquant::bindings
