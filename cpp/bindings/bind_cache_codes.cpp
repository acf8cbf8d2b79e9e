// Raw code access of turboquant._core.KVCache: a stream's stored codes and norms out, and
// already-encoded tokens in. Stores that keep the codes elsewhere (the mlx-resident store
// of python/turboquant/mlx_metal.py) use these to read and write the cache file format of
// serialize.h through this class, so a file saved by either loads in the other.
#include <pybind11/stl.h>

#include <algorithm>
#include <optional>
#include <string>
#include <utility>
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

const Quantizer& role_quantizer(const KVCache& kv, int layer, int kv_head, KVRole role) {
  return role == KVRole::kKey ? kv.key_quantizer(layer, kv_head) : kv.value_quantizer(layer, kv_head);
}

// Checks one head's (codes (n, code_bytes) uint8, norms (n,)) pair of one role; returns n.
size_t check_head_rows(const Quantizer& q, const py::array& codes, const py::array& norms, const char* name,
                       size_t h) {
  TQ_CHECK(codes.dtype().is(py::dtype::of<uint8_t>()), TypeMismatch, name, " codes of KV head ", h,
           " must be uint8, got ", dtype_name(codes));
  TQ_CHECK(codes.ndim() == 2 && codes.shape(1) == static_cast<py::ssize_t>(q.code_bytes()), InvalidArgument,
           name, " codes of KV head ", h, " must have shape (n, code_bytes=", q.code_bytes(), ")");
  TQ_CHECK(codes.flags() & py::array::c_style, InvalidArgument, name, " codes of KV head ", h,
           " must be C-contiguous");
  const auto n = codes.shape(0);
  TQ_CHECK(norms.dtype().is(norm_dtype_of(q)), TypeMismatch, name, " norms of KV head ", h, " must be ",
           py::str(norm_dtype_of(q)).cast<std::string>(), ", got ", dtype_name(norms));
  TQ_CHECK(norms.ndim() == 1 && norms.shape(0) == n, InvalidArgument, name, " norms of KV head ", h,
           " must have shape (n=", n, ",)");
  TQ_CHECK(norms.flags() & py::array::c_style, InvalidArgument, name, " norms of KV head ", h,
           " must be C-contiguous");
  return static_cast<size_t>(n);
}

// Codes and norms given as sequences of one array per KV head (norms never one array):
// checked for type (`what` is the error) and length n_kv_heads.
std::pair<py::sequence, py::sequence> head_sequences(const py::object& codes_obj, const py::object& norms_obj, int H,
                                                     const char* name, const char* what) {
  TQ_CHECK(py::isinstance<py::sequence>(codes_obj) && py::isinstance<py::sequence>(norms_obj) &&
               !py::isinstance<py::array>(norms_obj),
           TypeMismatch, name, what);
  auto cs = codes_obj.cast<py::sequence>();
  auto ns = norms_obj.cast<py::sequence>();
  TQ_CHECK(cs.size() == static_cast<size_t>(H) && ns.size() == static_cast<size_t>(H), InvalidArgument, name,
           " codes and norms need one array per KV head (n_kv_heads=", H, "), got ", cs.size(), " and ",
           ns.size());
  return {cs, ns};
}

// One role's encoded tokens: either one (n_kv_heads, n, code_bytes) codes array with
// (n_kv_heads, n) norms (every head at one width), or sequences of n_kv_heads (n, code_bytes)
// codes and (n,) norms arrays, each head's rows at its own width (per-head bit widths).
// Fills the code and norm pointers of streams 2*h + role (arrays kept alive in `hold`);
// returns n.
size_t check_encoded(const KVCache& kv, int layer, KVRole role, const py::object& codes_obj,
                     const py::object& norms_obj, const char* name, std::vector<const uint8_t*>& codes,
                     std::vector<const uint8_t*>& norms, std::vector<py::array>& hold) {
  const int H = kv.config().n_kv_heads;
  const auto r = static_cast<size_t>(role);
  if (!py::isinstance<py::array>(codes_obj)) {
    const auto [cs, ns] = head_sequences(codes_obj, norms_obj, H, name,
                                         " codes and norms must be arrays or sequences of one array per KV head");
    size_t n = 0;
    for (int h = 0; h < H; ++h) {
      const auto c = py::array::ensure(cs[static_cast<size_t>(h)]);
      const auto x = py::array::ensure(ns[static_cast<size_t>(h)]);
      TQ_CHECK(c && x, TypeMismatch, name, " codes and norms of KV head ", h, " must be arrays");
      const size_t nh = check_head_rows(role_quantizer(kv, layer, h, role), c, x, name, static_cast<size_t>(h));
      TQ_CHECK(h == 0 || nh == n, InvalidArgument, name, " codes of KV head ", h, " hold ", nh,
               " tokens but those of KV head 0 hold ", n);
      n = nh;
      codes[2 * static_cast<size_t>(h) + r] = static_cast<const uint8_t*>(c.data());
      norms[2 * static_cast<size_t>(h) + r] = static_cast<const uint8_t*>(x.data());
      hold.push_back(c);
      hold.push_back(x);
    }
    return n;
  }
  const auto ca = codes_obj.cast<py::array>();
  const auto na = py::array::ensure(norms_obj);
  TQ_CHECK(na, TypeMismatch, name, " norms must be an array when the codes are one array");
  const Quantizer& q = role_quantizer(kv, layer, 0, role);
  for (int h = 1; h < H; ++h) {
    const Quantizer& qh = role_quantizer(kv, layer, h, role);
    TQ_CHECK(qh.code_bytes() == q.code_bytes(), InvalidArgument, name, " codes: KV heads 0 and ", h,
             " have different row sizes (", q.code_bytes(), " and ", qh.code_bytes(),
             " code bytes: per-head bit widths), which one (n_kv_heads, n, code_bytes) array cannot hold "
             "(pass one array per KV head)");
  }
  TQ_CHECK(ca.dtype().is(py::dtype::of<uint8_t>()), TypeMismatch, name, " codes must be uint8, got ",
           dtype_name(ca));
  TQ_CHECK(ca.ndim() == 3 && ca.shape(0) == H && ca.shape(2) == static_cast<py::ssize_t>(q.code_bytes()),
           InvalidArgument, name, " codes must have shape (n_kv_heads=", H, ", n, code_bytes=", q.code_bytes(),
           ")");
  TQ_CHECK(ca.flags() & py::array::c_style, InvalidArgument, name, " codes must be C-contiguous");
  const auto n = static_cast<size_t>(ca.shape(1));
  TQ_CHECK(na.dtype().is(norm_dtype_of(q)), TypeMismatch, name, " norms must be ",
           py::str(norm_dtype_of(q)).cast<std::string>(), ", got ", dtype_name(na));
  TQ_CHECK(na.ndim() == 2 && na.shape(0) == H && na.shape(1) == static_cast<py::ssize_t>(n), InvalidArgument,
           name, " norms must have shape (n_kv_heads=", H, ", n=", n, ")");
  TQ_CHECK(na.flags() & py::array::c_style, InvalidArgument, name, " norms must be C-contiguous");
  const auto* c = static_cast<const uint8_t*>(ca.data());
  const auto* x = static_cast<const uint8_t*>(na.data());
  for (size_t h = 0; h < static_cast<size_t>(H); ++h) {
    codes[2 * h + r] = c + h * n * q.code_bytes();
    norms[2 * h + r] = x + h * n * q.norm_bytes();
  }
  hold.push_back(ca);
  hold.push_back(na);
  return n;
}

// Mixed precision (append_encoded with block flags): one role's tokens per KV head as packed
// rows, (bytes,) uint8 codes whose rows have their block's code_bytes (flag 1: the low-width
// quantizer's) and (n,) norms. `flags` are the role's streams' per-block flags, first block
// = the layer's next. Fills the pointers of streams 2*h + role; returns n.
size_t check_packed(const KVCache& kv, int layer, KVRole role, const py::object& codes_obj,
                    const py::object& norms_obj, const std::vector<py::array>& flags, size_t c0, const char* name,
                    std::vector<const uint8_t*>& codes, std::vector<const uint8_t*>& norms,
                    std::vector<py::array>& hold) {
  const int H = kv.config().n_kv_heads;
  const auto r = static_cast<size_t>(role);
  const size_t bt = kv.config().block_tokens;
  TQ_CHECK(!py::isinstance<py::array>(codes_obj), TypeMismatch, name,
           " codes and norms of a cache with low-width blocks must be sequences of one array per KV head");
  const auto [cs, ns] = head_sequences(codes_obj, norms_obj, H, name,
                                       " codes and norms of a cache with low-width blocks must be sequences of one "
                                       "array per KV head");
  size_t n = 0;
  for (int h = 0; h < H; ++h) {
    const auto c = py::array::ensure(cs[static_cast<size_t>(h)]);
    const auto x = py::array::ensure(ns[static_cast<size_t>(h)]);
    TQ_CHECK(c && x, TypeMismatch, name, " codes and norms of KV head ", h, " must be arrays");
    const Quantizer& q = role_quantizer(kv, layer, h, role);
    TQ_CHECK(x.dtype().is(norm_dtype_of(q)) && x.ndim() == 1 && (x.flags() & py::array::c_style), InvalidArgument,
             name, " norms of KV head ", h, " must be a C-contiguous (n,) ",
             py::str(norm_dtype_of(q)).cast<std::string>(), " array");
    const auto nh = static_cast<size_t>(x.shape(0));
    TQ_CHECK(h == 0 || nh == n, InvalidArgument, name, " norms of KV head ", h, " hold ", nh,
             " tokens but those of KV head 0 hold ", n);
    n = nh;
    const size_t dcb = kv.head_codes(layer, h, role).decayed->code_bytes();
    const py::array& f = flags[2 * static_cast<size_t>(h) + r];
    const size_t blocks = (c0 + n + bt - 1) / bt - c0 / bt;
    TQ_CHECK(static_cast<size_t>(f.shape(0)) == blocks, InvalidArgument, name, " block flags of KV head ", h,
             " hold ", f.shape(0), " blocks, the codes ", blocks);
    const auto* fp = static_cast<const uint8_t*>(f.data());
    size_t bytes = 0;
    for (size_t b = 0; b < blocks; ++b) {
      const size_t first = std::max(c0, (c0 / bt + b) * bt), last = std::min(c0 + n, (c0 / bt + b + 1) * bt);
      bytes += (last - first) * (fp[b] ? dcb : q.code_bytes());
    }
    TQ_CHECK(c.dtype().is(py::dtype::of<uint8_t>()) && c.ndim() == 1 && (c.flags() & py::array::c_style) &&
                 static_cast<size_t>(c.shape(0)) == bytes,
             InvalidArgument, name, " codes of KV head ", h, " must be a C-contiguous (", bytes,
             ",) uint8 array of packed rows (each at its block's code bytes)");
    codes[2 * static_cast<size_t>(h) + r] = static_cast<const uint8_t*>(c.data());
    norms[2 * static_cast<size_t>(h) + r] = static_cast<const uint8_t*>(x.data());
    hold.push_back(c);
    hold.push_back(x);
  }
  return n;
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
  cls.def("append_encoded", [](KVCache& kv, const py::object& key_codes, const py::object& key_norms,
                               const py::object& value_codes, const py::object& value_norms, int layer,
                               const py::object& decayed, const py::object& masks) {
        TQ_CHECK(layer >= 0 && layer < kv.config().n_layers, InvalidArgument, "layer must be in [0, ",
                 kv.config().n_layers, "), got ", layer);
        const auto H = static_cast<size_t>(kv.config().n_kv_heads);
        std::vector<const uint8_t*> codes(2 * H), norms(2 * H);
        std::vector<py::array> hold, flag_arrays, mask_arrays;
        std::vector<const uint8_t*> flag_ptrs;
        std::vector<const uint64_t*> mask_ptrs;
        size_t n = 0, nv = 0;
        if (decayed.is_none()) {
          n = check_encoded(kv, layer, KVRole::kKey, key_codes, key_norms, "key", codes, norms, hold);
          nv = check_encoded(kv, layer, KVRole::kValue, value_codes, value_norms, "value", codes, norms, hold);
        } else {
          TQ_CHECK(kv.config().low_blocks(), InvalidArgument, "block flags given but this cache has no low-width "
                   "blocks (temporal decay or mixed precision)");
          const auto fs = decayed.cast<py::sequence>();
          TQ_CHECK(fs.size() == 2 * H, InvalidArgument, "block flags need one array per stream (2 * n_kv_heads = ",
                   2 * H, "), got ", fs.size());
          for (size_t s = 0; s < 2 * H; ++s) {
            auto f = py::array_t<uint8_t, py::array::c_style>::ensure(fs[s]);
            TQ_CHECK(f && f.ndim() == 1, InvalidArgument, "block flags of stream ", s, " must be a (blocks,) uint8 array");
            flag_arrays.push_back(f);
            flag_ptrs.push_back(f.data());
          }
          const size_t c0 = kv.code_tokens(layer);
          n = check_packed(kv, layer, KVRole::kKey, key_codes, key_norms, flag_arrays, c0, "key", codes, norms, hold);
          nv = check_packed(kv, layer, KVRole::kValue, value_codes, value_norms, flag_arrays, c0, "value", codes,
                            norms, hold);
        }
        TQ_CHECK(n == nv, InvalidArgument, "key codes hold ", n, " tokens but value codes hold ", nv);
        if (!masks.is_none()) {
          const auto ms = masks.cast<py::sequence>();
          TQ_CHECK(kv.config().mixed(), InvalidArgument, "mixed-precision masks given but this cache has no mixed "
                   "precision");
          TQ_CHECK(ms.size() == H, InvalidArgument, "masks need one array per KV head (n_kv_heads=", H, "), got ",
                   ms.size());
          const size_t F = kv.config().mixed_group_tokens(), words = kv.mixed_mask_words();
          for (size_t h = 0; h < H; ++h) {
            auto mk = py::array_t<uint64_t, py::array::c_style>::ensure(ms[h]);
            TQ_CHECK(mk && mk.ndim() == 1 && static_cast<size_t>(mk.shape(0)) == n / F * words, InvalidArgument,
                     "masks of KV head ", h, " must be a (", n / F * words, ",) uint64 array (", words,
                     " words per flush group)");
            mask_arrays.push_back(mk);
            mask_ptrs.push_back(mk.data());
          }
        }
        py::gil_scoped_release release;
        kv.append_encoded(layer, n, codes, norms, decayed.is_none() ? nullptr : &flag_ptrs,
                          masks.is_none() ? nullptr : &mask_ptrs);
      }, py::arg("key_codes"), py::arg("key_norms"), py::arg("value_codes"), py::arg("value_norms"),
      py::arg("layer") = 0, py::arg("decayed") = py::none(), py::arg("masks") = py::none(),
      "Append n already-encoded tokens to one layer: codes (n_kv_heads, n, code_bytes) uint8 and\n"
      "norms (n_kv_heads, n) float16 per role, or (per-head bit widths) per role a list of n_kv_heads\n"
      "codes (n, code_bytes of that head) and norms (n,) arrays, as encoded by this cache's quantizers\n"
      "(no check that they were). With low-width blocks (mixed precision): `decayed`, per stream\n"
      "2*kv_head + role a (blocks,) uint8 array of block flags (1: the low width), the codes per\n"
      "head as packed (bytes,) uint8 rows at their block's width, and `masks`, per KV head the\n"
      "(groups * words,) uint64 kept-token masks (mixed_masks). All arrays are validated before\n"
      "anything is written.");
  cls.def("append_window", [](KVCache& kv, const py::array& keys, const py::array& values, int layer,
                              const py::object& importance) {
        const auto H = static_cast<size_t>(kv.config().n_kv_heads);
        const auto d = static_cast<py::ssize_t>(kv.config().head_dim);
        std::vector<py::array> hold;
        std::vector<const uint16_t*> rows(2 * H);
        size_t n = 0;
        for (size_t role = 0; role < 2; ++role) {
          const py::array& a = role == 0 ? keys : values;
          TQ_CHECK(a.dtype().char_() == 'e' && a.ndim() == 3 && a.shape(0) == static_cast<py::ssize_t>(H) &&
                       a.shape(2) == d && (a.flags() & py::array::c_style),
                   InvalidArgument, role == 0 ? "keys" : "values", " must be a C-contiguous (n_kv_heads=", H,
                   ", n, head_dim=", d, ") float16 array");
          TQ_CHECK(role == 0 || static_cast<size_t>(a.shape(1)) == n, InvalidArgument, "keys hold ", n,
                   " tokens but values ", a.shape(1));
          n = static_cast<size_t>(a.shape(1));
          for (size_t h = 0; h < H; ++h)
            rows[2 * h + role] = static_cast<const uint16_t*>(a.data()) + h * n * static_cast<size_t>(d);
        }
        std::vector<const float*> imp;
        py::array_t<float, py::array::c_style> ia;
        if (!importance.is_none()) {
          ia = py::array_t<float, py::array::c_style>::ensure(importance);
          TQ_CHECK(ia && ia.ndim() == 2 && static_cast<size_t>(ia.shape(0)) == H &&
                       static_cast<size_t>(ia.shape(1)) == n,
                   InvalidArgument, "importance must be an (n_kv_heads=", H, ", n=", n, ") float32 array");
          for (size_t h = 0; h < H; ++h) imp.push_back(ia.data() + h * n);
        }
        TQ_CHECK(layer >= 0 && layer < kv.config().n_layers, InvalidArgument, "layer must be in [0, ",
                 kv.config().n_layers, "), got ", layer);
        py::gil_scoped_release release;
        kv.append_window(layer, n, rows, importance.is_none() ? nullptr : &imp);
      }, py::arg("keys"), py::arg("values"), py::arg("layer") = 0, py::arg("importance") = py::none(),
      "Restore a layer's fp16 window: keys and values (n_kv_heads, n, head_dim) float16 rows, into a\n"
      "layer that holds no window tokens; importance (mixed precision): (n_kv_heads, n) float32, the\n"
      "window tokens' importance (window_importance).");
  cls.def("set_rated_tokens", &KVCache::set_rated_tokens, py::arg("layer"), py::arg("n"),
          "Mixed precision: restore the leading tokens of a layer that attention calls have rated.");
  cls.def("mixed_masks", [](const KVCache& kv, int layer, int kv_head) {
        const auto& words = kv.mixed_masks(layer, kv_head);
        py::array_t<uint64_t> out(static_cast<py::ssize_t>(words.size()));
        std::copy(words.begin(), words.end(), out.mutable_data());
        return out;
      }, py::arg("layer"), py::arg("kv_head"),
      "Mixed precision: per flush group of one (layer, KV head), the kept tokens' bit mask (mixed_mask_words()\n"
      "uint64 words per group; bit o of group g: token sink_tokens + g * mixed_group_tokens + o).");
}

}  // namespace turboquant::bindings
