// Python bindings of the cache layer: turboquant._core.KVCache (kv_cache.h, attention.h).
// Shapes: keys/values (T, d) | (H_kv, T, d) | (1, H_kv, T, d); queries (d,) | (T, d) |
// (H_q, T, d) | (1, H_q, T, d). float32 input is read in place, float16 converted once.
#include <pybind11/stl.h>

#include <algorithm>
#include <optional>

#include "common.h"
#include "turboquant/half.h"
#include "turboquant/kv_cache.h"
#include "turboquant/quantizer_outlier.h"
#include "turboquant/serialize.h"

namespace turboquant::bindings {

namespace {

OutlierRoles outlier_roles_from_string(const std::string& s) {
  if (s == "both") return OutlierRoles::kBoth;
  if (s == "keys") return OutlierRoles::kKeys;
  if (s == "values") return OutlierRoles::kValues;
  throw InvalidArgument(detail::concat("outlier_roles must be 'both', 'keys' or 'values', got '", s, "'"));
}

std::string outlier_roles_to_string(OutlierRoles r) {
  return r == OutlierRoles::kKeys ? "keys" : r == OutlierRoles::kValues ? "values" : "both";
}


std::string shape_str(const std::vector<py::ssize_t>& lead, size_t d) {
  std::string s = "(";
  for (auto v : lead) s += std::to_string(v) + ", ";
  return s + std::to_string(d) + ")";
}

// Number of heads and tokens of a (T, d) | (H, T, d) | (1, H, T, d) array.
std::pair<size_t, size_t> heads_tokens(const FloatRows& r, size_t expected_heads, const char* what,
                                       const char* heads_name) {
  const auto& s = r.lead_shape;
  size_t H = 1, T = 0;
  if (s.size() == 1) {
    T = static_cast<size_t>(s[0]);
  } else if (s.size() == 2) {
    H = static_cast<size_t>(s[0]);
    T = static_cast<size_t>(s[1]);
  } else if (s.size() == 3) {
    TQ_CHECK(s[0] == 1, InvalidArgument, what, " batch size must be 1 (one cache per sequence), got shape ",
             shape_str(s, r.dim));
    H = static_cast<size_t>(s[1]);
    T = static_cast<size_t>(s[2]);
  } else {
    throw InvalidArgument(std::string(what) + " must be (T, d), (H, T, d) or (1, H, T, d), got shape " +
                          shape_str(s, r.dim));
  }
  TQ_CHECK(H == expected_heads, InvalidArgument, what, " has ", H, " heads (shape ", shape_str(s, r.dim),
           ") but the cache has ", heads_name, "=", expected_heads,
           s.size() == 1 ? " (pass (H, T, d))" : "");
  return {H, T};
}

RotationKind role_kind_check(const std::string& role) {
  TQ_CHECK(role == "key" || role == "value", InvalidArgument, "role must be 'key' or 'value', got '", role, "'");
  return RotationKind::kAuto;
}
KVRole role_from(const std::string& role) {
  role_kind_check(role);
  return role == "key" ? KVRole::kKey : KVRole::kValue;
}

}  // namespace

void bind_cache(py::module_& m) {
  py::class_<KVCache>(m, "KVCache", R"doc(
Compressed KV cache: n_layers x n_kv_heads streams of key and value codes (paged), with
attention computed from the codes.

    kv = turboquant._core.KVCache(128, n_layers=2, n_q_heads=8, n_kv_heads=2, key_bits=4)
    kv.append(keys, values, layer=0)       # (T, d) | (H_kv, T, d) | (1, H_kv, T, d)
    out = kv.attend(queries, layer=0)      # (d,) | (T_q, d) | (H_q, T_q, d) | (1, H_q, T_q, d)

The T_q queries are the last T_q positions of the layer: query i sees keys
[0, len - T_q + i] when causal, and with window=w only the last w of those.
kv_head_offset=k: the cache holds the model's KV heads k, k+1, ... (a tensor-parallel
rank's slice); head h then encodes exactly as head k + h of a whole-model cache.
)doc")
      .def(py::init([](int head_dim, int n_layers, int n_q_heads, int n_kv_heads, const std::string& key_method,
                       int key_bits, const std::string& value_method, int value_bits, const py::object& seed,
                       const std::string& rotation, int jl_dim, size_t block_tokens, size_t max_tokens,
                       int n_outlier_channels, int outlier_bits, const std::vector<int>& outlier_channels,
                       size_t fp16_window, const std::vector<int>& fp16_layers, const std::string& outlier_roles,
                       bool norm_correction, size_t fp16_sinks, size_t decay_after, int decay_bits,
                       size_t max_coded_tokens, int split_angle_bits, const std::vector<int>& key_head_bits,
                       const std::vector<int>& value_head_bits, const std::vector<int>& outlier_head_bits,
                       size_t mixed_group_blocks, size_t mixed_keep_blocks, int kv_head_offset) {
             KVCacheConfig c;
             c.head_dim = head_dim;
             c.n_layers = n_layers;
             c.n_q_heads = n_q_heads;
             c.n_kv_heads = n_kv_heads;
             c.key_method = key_method;
             c.key_bits = key_bits;
             c.value_method = value_method;
             c.value_bits = value_bits;
             c.seed = seed_from(seed);
             c.rotation = rotation_kind_from_string(rotation);
             c.jl_dim = jl_dim;
             c.block_tokens = block_tokens;
             c.max_tokens = max_tokens;
             c.n_outlier_channels = n_outlier_channels;
             c.outlier_bits = outlier_bits;
             c.outlier_channels = outlier_channels;
             c.fp16_window = fp16_window;
             c.fp16_layers = fp16_layers;
             c.outlier_roles = outlier_roles_from_string(outlier_roles);
             c.norm_correction = norm_correction;
             c.fp16_sinks = fp16_sinks;
             c.decay_after = decay_after;
             c.decay_bits = decay_bits;
             c.max_coded_tokens = max_coded_tokens;
             c.split_angle_bits = split_angle_bits;
             c.key_head_bits = key_head_bits;
             c.value_head_bits = value_head_bits;
             c.outlier_head_bits = outlier_head_bits;
             c.mixed_group_blocks = mixed_group_blocks;
             c.mixed_keep_blocks = mixed_keep_blocks;
             c.kv_head_offset = kv_head_offset;
             py::gil_scoped_release release;
             return std::make_unique<KVCache>(c);
           }),
           py::arg("head_dim"), py::arg("n_layers") = 1, py::arg("n_q_heads") = 1, py::arg("n_kv_heads") = 1,
           py::arg("key_method") = "turboquant_mse", py::arg("key_bits") = 3,
           py::arg("value_method") = "turboquant_mse", py::arg("value_bits") = 3, py::arg("seed") = 0,
           py::arg("rotation") = "auto", py::arg("jl_dim") = 0, py::arg("block_tokens") = 256,
           py::arg("max_tokens") = 0, py::arg("n_outlier_channels") = 0, py::arg("outlier_bits") = 0,
           py::arg("outlier_channels") = std::vector<int>{}, py::arg("fp16_window") = 0,
           py::arg("fp16_layers") = std::vector<int>{}, py::arg("outlier_roles") = "both",
           py::arg("norm_correction") = false, py::arg("fp16_sinks") = 0,
           py::arg("decay_after") = 0, py::arg("decay_bits") = 0, py::arg("max_coded_tokens") = 0,
           py::arg("split_angle_bits") = 8, py::arg("key_head_bits") = std::vector<int>{},
           py::arg("value_head_bits") = std::vector<int>{}, py::arg("outlier_head_bits") = std::vector<int>{},
           py::arg("mixed_group_blocks") = 0, py::arg("mixed_keep_blocks") = 0, py::arg("kv_head_offset") = 0)
      .def("append", [](KVCache& kv, const py::handle& keys, const py::handle& values, int layer) {
        const auto d = static_cast<size_t>(kv.head_dim());
        const FloatRows k = float_rows(keys, d, "keys", false, 2);
        const FloatRows v = float_rows(values, d, "values", false, 2);
        TQ_CHECK(k.lead_shape == v.lead_shape, InvalidArgument, "keys shape ", shape_str(k.lead_shape, d),
                 " differs from values shape ", shape_str(v.lead_shape, d));
        const size_t H = static_cast<size_t>(kv.config().n_kv_heads);
        const size_t T = heads_tokens(k, H, "keys", "n_kv_heads").second;
        std::vector<float> kf, vf;
        if (k.is_half) kf = k.to_float();
        if (v.is_half) vf = v.to_float();
        const float* kp = k.is_half ? kf.data() : static_cast<const float*>(k.data);
        const float* vp = v.is_half ? vf.data() : static_cast<const float*>(v.data);
        py::gil_scoped_release release;
        kv.append(layer, kp, vp, T);
      }, py::arg("keys"), py::arg("values"), py::arg("layer") = 0,
      "Append T tokens of every KV head to one layer (float32 read in place; float16 converted).")
      .def("flush_rated", [](KVCache& kv, int layer) {
        py::gil_scoped_release release;
        kv.flush_rated(layer);
      }, py::arg("layer") = 0,
      "Mixed precision: flush the window groups that attention calls have rated since the layer's last\n"
      "append (an append flushes only groups rated before it); a no-op without mixed precision.")
      .def("compact_window", [](KVCache& kv, std::optional<int> layer) {
        py::gil_scoped_release release;
        return layer ? kv.compact_window(*layer) : kv.compact_window();
      }, py::arg("layer") = py::none(),
      "Move the whole fp16 window of one layer (every layer when layer is None) into codes, its last\n"
      "block partial, and give the window's memory back (a prompt parked in a store); the fp16 sinks\n"
      "stay. Returns the tokens moved. Later appends, flushes, trims, attention and saving work as\n"
      "usual. Mixed-precision and fp16 layers keep their windows (0 tokens moved); on an error the\n"
      "layer is unchanged.")
      .def("attend", [](const KVCache& kv, const py::handle& queries, int layer, bool causal,
                        std::optional<float> scale, std::optional<size_t> window, float sparse_v,
                        bool sinks_visible) {
        const auto d = static_cast<size_t>(kv.head_dim());
        const FloatRows q = float_rows(queries, d, "queries", false, 1);
        const size_t H = static_cast<size_t>(kv.config().n_q_heads);
        size_t T = 1;
        if (!q.lead_shape.empty()) {
          T = heads_tokens(q, H, "queries", "n_q_heads").second;
        } else {
          TQ_CHECK(H == 1, InvalidArgument, "a single (d,) query needs n_q_heads=1; the cache has n_q_heads=",
                   H, " (pass (H_q, T_q, d))");
        }
        std::vector<float> qf;
        if (q.is_half) qf = q.to_float();
        const float* qp = q.is_half ? qf.data() : static_cast<const float*>(q.data);
        std::vector<py::ssize_t> shape(q.lead_shape);
        shape.push_back(static_cast<py::ssize_t>(d));
        py::array_t<float> out(shape);
        float* op = out.mutable_data();
        AttentionOptions opt;
        opt.causal = causal;
        opt.scale = scale;
        opt.window = window;
        opt.sparse_v_threshold = sparse_v;
        opt.sinks_visible = sinks_visible;
        {
          py::gil_scoped_release release;
          kv.attend(layer, qp, T, op, opt);
        }
        return out;
      }, py::arg("queries"), py::arg("layer") = 0, py::arg("causal") = true, py::arg("scale") = py::none(),
      py::arg("window") = py::none(), py::arg("sparse_v") = 0.0f, py::arg("sinks_visible") = false,
      "Attention from the codes; float32 output of the queries' shape. scale defaults to 1/sqrt(d).\n"
      "sinks_visible=True: the fp16 sinks stay visible to every query whatever the window.\n"
      "sparse_v=t skips value rows whose weight is below t times the query's running maximum weight\n"
      "(the softmax normalisation still uses every weight).")
      .def("size", &KVCache::size, py::arg("layer") = 0, "tokens held by a layer")
      .def("__len__", [](const KVCache& kv) { return kv.size(0); })
      .def("trim", &KVCache::trim, py::arg("n"),
           "Remove the last n tokens of every layer; returns how many were removed from layer 0.")
      .def("memory_bytes", &KVCache::memory_bytes,
           "Exact bytes allocated: code and norm pages plus rotation/QJL state.")
      .def("fp16_bytes", &KVCache::fp16_bytes, "bytes the same tokens take as fp16 K and V")
      .def("decode", [](const KVCache& kv, int layer, int kv_head, const std::string& role, size_t start,
                        std::optional<size_t> count) {
        const KVRole r = role_from(role);
        const Quantizer& q = r == KVRole::kKey ? kv.key_quantizer(layer, kv_head) : kv.value_quantizer(layer, kv_head);
        const size_t n = kv.size(layer);
        TQ_CHECK(start <= n, InvalidArgument, "start ", start, " beyond the layer's ", n, " tokens");
        const size_t c = count ? *count : n - start;
        TQ_CHECK(c <= n - start, InvalidArgument, "tokens [", start, ", ", start + c, ") beyond the layer's ", n, " tokens");
        py::array_t<float> out({static_cast<py::ssize_t>(c), static_cast<py::ssize_t>(q.dim())});
        float* op = out.mutable_data();
        {
          py::gil_scoped_release release;
          // Coded tokens are decoded (decayed blocks at decay_bits); fp16 sink and window
          // tokens are returned as stored.
          kv.decode_tokens(layer, kv_head, r, start, c, op);
        }
        return out;
      }, py::arg("layer") = 0, py::arg("kv_head") = 0, py::arg("role") = "key", py::arg("start") = 0,
      py::arg("count") = py::none(), "The decoded (dequantized) keys or values of one head, (count, d) float32.")
      .def("rotation_parameters", [](const KVCache& kv, int layer, int kv_head, const std::string& role) {
        const KVRole r = role_from(role);
        const Quantizer& q = r == KVRole::kKey ? kv.key_quantizer(layer, kv_head) : kv.value_quantizer(layer, kv_head);
        const auto p = q.rotation().parameters();
        return py::make_tuple(to_string(q.rotation().kind()),
                              py::array_t<float>(static_cast<py::ssize_t>(p.size()), p.data()));
      }, py::arg("layer"), py::arg("kv_head"), py::arg("role"), "(kind, parameters) of a stream's rotation")
      .def("set_rotation_parameters", [](KVCache& kv, int layer, int kv_head, const std::string& role,
                                         const std::string& kind, py::array_t<float, py::array::c_style | py::array::forcecast> params) {
        const KVRole r = role_from(role);
        auto rot = Rotation::from_parameters(rotation_kind_from_string(kind), kv.head_dim(),
                                             std::span<const float>(params.data(), static_cast<size_t>(params.size())));
        kv.set_rotation(layer, kv_head, r, std::move(rot));
      }, py::arg("layer"), py::arg("kv_head"), py::arg("role"), py::arg("kind"), py::arg("parameters"),
      "Replace a stream's rotation (artifact stores); only while the layer is empty.")
      .def("bytes_per_token", [](const KVCache& kv) {
        const auto& c = kv.config();
        size_t b = 0;
        for (int h = 0; h < c.n_kv_heads; ++h)
          b += kv.key_quantizer(0, h).bytes_per_vector() + kv.value_quantizer(0, h).bytes_per_vector();
        return b * static_cast<size_t>(c.n_layers);
      }, "bytes per freshly coded token over all layers and heads (codes + norms at the "
         "configured bits; decayed blocks, fp16 sinks and window rows are not reflected: see "
         "stored_bytes_per_token)")
      .def("stored_bytes_per_token", [](const KVCache& kv) {
        const int nl = kv.config().n_layers;
        size_t bytes = 0, tokens = 0;
        for (int l = 0; l < nl; ++l) {
          bytes += kv.token_bytes(l);
          tokens += kv.size(l);
        }
        return tokens ? static_cast<double>(bytes) * nl / static_cast<double>(tokens) : 0.0;
      }, "average bytes per stored token over all layers and heads: codes at each block's bits "
         "(temporal decay), fp16 norms, fp16 sink and window rows; 0.0 while empty")
      .def("token_bytes", &KVCache::token_bytes, py::arg("layer") = 0,
           "bytes holding one layer's stored tokens (codes at each block's bits, norms, fp16 "
           "sink/window rows; no quantizer state or page slack)")
      .def("save", [](const KVCache& kv, const std::string& path, bool legacy) {
        py::gil_scoped_release release;
        kv.save(path, legacy);
      }, py::arg("path"), py::arg("legacy") = false,
         "Write the cache to a file (format: serialize.h): version 8, or with legacy=True the "
         "oldest of versions 1-7 that expresses it (for libraries before version 8).")
      .def_static("load", [](const std::string& path) {
        if (!py::module_::import("os").attr("path").attr("exists")(path).cast<bool>()) {
          PyErr_SetString(PyExc_FileNotFoundError, ("no such cache file: '" + path + "'").c_str());
          throw py::error_already_set();
        }
        py::gil_scoped_release release;
        return KVCache::load(path);
      }, py::arg("path"), "Read a saved cache; raises turboquant.FormatError on a damaged file.")
      .def("copy", &KVCache::copy,
           "An independent copy: what from_bytes(to_bytes()) gives, sharing this cache's quantizers "
           "(no rotation is made again) and without Python bytes between.")
      .def("to_bytes", [](const KVCache& kv, bool legacy) {
        const auto b = serialize_cache(kv, legacy);
        return py::bytes(reinterpret_cast<const char*>(b.data()), b.size());
      }, py::arg("legacy") = false, "The saved-file bytes of this cache (legacy: as save()).")
      .def_static("from_bytes", [](const py::bytes& data) {
        const std::string_view v(data);
        return deserialize_cache(reinterpret_cast<const uint8_t*>(v.data()), v.size());
      }, py::arg("data"))
      .def_property_readonly("head_dim", [](const KVCache& kv) { return kv.config().head_dim; })
      .def_property_readonly("n_layers", [](const KVCache& kv) { return kv.config().n_layers; })
      .def_property_readonly("n_q_heads", [](const KVCache& kv) { return kv.config().n_q_heads; })
      .def_property_readonly("n_kv_heads", [](const KVCache& kv) { return kv.config().n_kv_heads; })
      .def_property_readonly("key_method", [](const KVCache& kv) { return kv.config().key_method; })
      .def_property_readonly("key_bits", [](const KVCache& kv) { return kv.config().key_bits; })
      .def_property_readonly("value_method", [](const KVCache& kv) { return kv.config().value_method; })
      .def_property_readonly("value_bits", [](const KVCache& kv) { return kv.config().value_bits; })
      .def_property_readonly("key_head_bits", [](const KVCache& kv) { return kv.config().key_head_bits; },
                             "per-KV-head key bits: n_kv_heads entries (every layer) or n_layers * n_kv_heads, "
                             "layer-major (empty: every head at key_bits)")
      .def_property_readonly("value_head_bits", [](const KVCache& kv) { return kv.config().value_head_bits; },
                             "per-KV-head value bits, as key_head_bits (empty: every head at value_bits)")
      .def_property_readonly("outlier_head_bits", [](const KVCache& kv) { return kv.config().outlier_head_bits; },
                             "per-KV-head outlier bits of the outlier split, as key_head_bits (empty: outlier_bits)")
      .def_property_readonly("format_version", [](const KVCache&) { return kCacheFormatVersion; },
                             "the file format version save() writes (the section container)")
      .def_property_readonly("legacy_format_version",
                             [](const KVCache& kv) { return kv.config().format_version(); },
                             "the oldest version before the section container (1-7) that "
                             "expresses this cache: what save(path, legacy=True) writes")
      .def_property_readonly("seed", [](const KVCache& kv) { return kv.config().seed; })
      .def_property_readonly("rotation", [](const KVCache& kv) { return to_string(kv.key_quantizer(0, 0).rotation().kind()); })
      .def_property_readonly("configured_rotation", [](const KVCache& kv) { return to_string(kv.config().rotation); },
                             "the rotation as configured (\"auto\" unresolved): what the file header "
                             "records for an outlier split, whose own rotation is the dense export")
      .def_property_readonly("jl_dim", [](const KVCache& kv) { return kv.config().jl_dim; })
      .def_property_readonly("n_outlier_channels", [](const KVCache& kv) { return kv.config().n_outlier_channels; })
      .def_property_readonly("outlier_bits", [](const KVCache& kv) { return kv.config().outlier_bits; })
      .def_property_readonly("outlier_channels", [](const KVCache& kv) {
        // The channels in use (explicit, or the default first n).
        const auto* split = dynamic_cast<const OutlierSplitQuantizer*>(&kv.key_quantizer(0, 0));
        if (split == nullptr) split = dynamic_cast<const OutlierSplitQuantizer*>(&kv.value_quantizer(0, 0));
        return split ? split->outlier_channels() : std::vector<int>{};
      })
      .def_property_readonly("outlier_roles", [](const KVCache& kv) {
        return outlier_roles_to_string(kv.config().outlier_roles);
      })
      .def_property_readonly("norm_correction", [](const KVCache& kv) { return kv.config().norm_correction; })
      .def_property_readonly("split_angle_bits", [](const KVCache& kv) { return kv.config().split_angle_bits; },
                             "bits of the outlier split's per-vector part angle (8 or 16; 16 in files "
                             "before format version 4)")
      .def_property_readonly("block_tokens", [](const KVCache& kv) { return kv.config().block_tokens; })
      .def_property_readonly("fp16_window", [](const KVCache& kv) { return kv.config().fp16_window; })
      .def_property_readonly("fp16_layers", [](const KVCache& kv) { return kv.config().fp16_layers; })
      .def_property_readonly("fp16_sinks", [](const KVCache& kv) { return kv.config().fp16_sinks; })
      .def_property_readonly("decay_after", [](const KVCache& kv) { return kv.config().decay_after; })
      .def_property_readonly("decay_bits", [](const KVCache& kv) { return kv.config().decay_bits; })
      .def_property_readonly("mixed_group_blocks", [](const KVCache& kv) { return kv.config().mixed_group_blocks; })
      .def_property_readonly("mixed_keep_blocks", [](const KVCache& kv) { return kv.config().mixed_keep_blocks; })
      .def_property_readonly("max_coded_tokens", [](const KVCache& kv) { return kv.config().max_coded_tokens; })
      .def_property_readonly("kv_head_offset", [](const KVCache& kv) { return kv.config().kv_head_offset; },
                             "the model's number of this cache's KV head 0: head h uses the random streams "
                             "of model head kv_head_offset + h (a tensor-parallel rank's slice of the heads)")
      .def("evicted_tokens", &KVCache::evicted_tokens, py::arg("layer") = 0,
           "tokens of a layer dropped by eviction (max_coded_tokens) since it was empty")
      .def("sink_tokens", &KVCache::sink_tokens, py::arg("layer") = 0,
           "fp16 attention-sink tokens of a layer (the first min(size, fp16_sinks) tokens)")
      .def("code_tokens", &KVCache::code_tokens, py::arg("layer") = 0,
           "tokens held as codes (coded_tokens - sink_tokens)")
      .def("decayed_blocks", [](const KVCache& kv, int layer, int kv_head, const std::string& role) {
        return kv.decayed_blocks(layer, kv_head, role_from(role));
      }, py::arg("layer") = 0, py::arg("kv_head") = 0, py::arg("role") = "key",
      "number of code blocks of one stream re-quantized to decay_bits")
      .def("mixed_positions", [](const KVCache& kv, int layer, int kv_head) {
        std::vector<size_t> p;
        {
          py::gil_scoped_release release;
          p = kv.mixed_positions(layer, kv_head);
        }
        py::array_t<int64_t> out(static_cast<py::ssize_t>(p.size()));
        std::copy(p.begin(), p.end(), out.mutable_data());
        return out;
      }, py::arg("layer"), py::arg("kv_head"),
      "Position of every code index of one (layer, KV head): codes are stored by position, or with mixed\n"
      "precision by flush group, the group's kept tokens apart from the others.")
      .def("rated_tokens", &KVCache::rated_tokens, py::arg("layer") = 0,
           "Mixed precision: the leading tokens of a layer that attention calls have rated (only those flush).")
      .def("window_importance", [](const KVCache& kv, int layer, int kv_head) {
        const auto v = kv.window_importance(layer, kv_head);
        py::array_t<float> out(static_cast<py::ssize_t>(v.size()));
        std::copy(v.begin(), v.end(), out.mutable_data());
        return out;
      }, py::arg("layer"), py::arg("kv_head"),
      "Mixed precision: the sum of the squared softmax weights each fp16 window token of one KV head got so far.")
      .def("coded_tokens", &KVCache::coded_tokens, py::arg("layer") = 0,
           "tokens of a layer held as codes (the rest are in the fp16 window)")
      .def("window_tokens", &KVCache::window_tokens, py::arg("layer") = 0,
           "tokens of a layer held in the fp16 window")
      .def_property_readonly("max_tokens", [](const KVCache& kv) { return kv.config().max_tokens; })
      .def("__repr__", [](const KVCache& kv) {
        const auto& c = kv.config();
        return "KVCache(head_dim=" + std::to_string(c.head_dim) + ", n_layers=" + std::to_string(c.n_layers) +
               ", n_q_heads=" + std::to_string(c.n_q_heads) + ", n_kv_heads=" + std::to_string(c.n_kv_heads) +
               ", key='" + c.key_method + "'/" + std::to_string(c.key_bits) + "b, value='" + c.value_method + "'/" +
               std::to_string(c.value_bits) + "b, tokens=" + std::to_string(kv.size(0)) + ")";
      });
}

}  // namespace turboquant::bindings
