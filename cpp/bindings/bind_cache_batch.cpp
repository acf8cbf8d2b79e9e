// Python binding of attend_batch (kv_cache_batch.h): turboquant._core.attend_batch, one call
// for the rows of a continuous batch (one KVCache per sequence), the GIL released while the
// rows run on the thread pool.
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "common.h"
#include "turboquant/kv_cache.h"
#include "turboquant/kv_cache_batch.h"

namespace turboquant::bindings {

namespace {

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// A per-row argument: one value for every row, or a sequence of B values.
template <typename T>
std::vector<T> per_row(const py::object& obj, size_t B, const char* what) {
  if (!py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj)) return std::vector<T>(B, obj.cast<T>());
  const auto seq = obj.cast<py::sequence>();
  TQ_CHECK(seq.size() == B, InvalidArgument, "attend_batch: ", what, " has ", seq.size(), " entries for ", B,
           " caches (one per row, or one value for all)");
  std::vector<T> out;
  out.reserve(B);
  for (const auto& v : seq) out.push_back(v.cast<T>());
  return out;
}

}  // namespace

void bind_cache_batch(py::module_& m) {
  m.def("attend_batch", [](const py::sequence& caches, const py::handle& queries, int layer, const py::object& starts,
                           const py::object& counts, std::optional<float> scale, const py::object& windows,
                           const py::object& sparse_v, const py::object& sinks_visible, bool causal) {
    const size_t B = caches.size();
    TQ_CHECK(B > 0, InvalidArgument, "attend_batch needs at least one cache (got an empty list)");
    std::vector<BatchAttendRow> rows(B);
    std::vector<py::object> held(B);  // the caches stay alive while the GIL is released
    for (size_t i = 0; i < B; ++i) {
      const py::object c = held[i] = caches[i];
      if (!py::isinstance<KVCache>(c)) {
        throw TypeMismatch("attend_batch: caches[" + std::to_string(i) + "] must be a turboquant._core.KVCache, got " +
                           py::str(py::type::of(c).attr("__name__")).cast<std::string>());
      }
      rows[i].cache = c.cast<const KVCache*>();
    }
    const KVCacheConfig& c0 = rows[0].cache->config();
    const auto d = static_cast<size_t>(c0.head_dim);
    const FloatRows q = float_rows(queries, d, "queries", false, 1);
    TQ_CHECK(q.lead_shape.size() == 3, InvalidArgument, "attend_batch: queries must be (B, H_q, T, d), got shape ",
             shape_of(q.array));
    TQ_CHECK(static_cast<size_t>(q.lead_shape[0]) == B, InvalidArgument, "attend_batch: queries ",
             shape_of(q.array), " have batch ", q.lead_shape[0], " for ", B, " caches");
    TQ_CHECK(q.lead_shape[1] == c0.n_q_heads, InvalidArgument, "attend_batch: queries ", shape_of(q.array), " have ",
             q.lead_shape[1], " heads but the caches have n_q_heads=", c0.n_q_heads);
    const auto T = static_cast<size_t>(q.lead_shape[2]);
    const auto start = starts.is_none() ? std::vector<size_t>(B, 0) : per_row<size_t>(starts, B, "starts");
    const auto count = counts.is_none() ? std::vector<size_t>(B, T) : per_row<size_t>(counts, B, "counts");
    const auto window = per_row<std::optional<size_t>>(windows, B, "windows");
    const auto sparse = per_row<float>(sparse_v, B, "sparse_v");
    const auto visible = per_row<bool>(sinks_visible, B, "sinks_visible");
    for (size_t i = 0; i < B; ++i) {
      rows[i].query_start = start[i];
      rows[i].query_count = count[i];
      rows[i].options.causal = causal;
      rows[i].options.scale = scale;
      rows[i].options.window = window[i];
      rows[i].options.sparse_v_threshold = sparse[i];
      rows[i].options.sinks_visible = visible[i];
    }
    std::vector<float> qf;
    if (q.is_half) qf = q.to_float();
    const float* qp = q.is_half ? qf.data() : static_cast<const float*>(q.data);
    py::array_t<float> out(with_last(q.lead_shape, static_cast<py::ssize_t>(d)));
    float* op = out.mutable_data();
    {
      py::gil_scoped_release release;
      attend_batch(rows, layer, qp, T, op);
    }
    return out;
  }, py::arg("caches"), py::arg("queries"), py::arg("layer") = 0, py::arg("starts") = py::none(),
  py::arg("counts") = py::none(), py::arg("scale") = py::none(), py::arg("windows") = py::none(),
  py::arg("sparse_v") = 0.0f, py::arg("sinks_visible") = false, py::arg("causal") = true,
  R"doc(
Attention of a batch of sequences, one KVCache per row, in one call: queries (B, H_q, T, d);
row i's queries are positions [starts[i], starts[i] + counts[i]) of its T (default: all T),
the last counts[i] positions of caches[i]'s layer. Returns (B, H_q, T, d) float32: row i's
outputs at its positions (exactly what caches[i].attend gives for those queries), zeros
elsewhere. windows, sparse_v and sinks_visible take one value for all rows or one per row.
Every row is checked before any runs (ValueError naming the row); the GIL is released and
the rows run in parallel on the library's thread pool.)doc");
}

}  // namespace turboquant::bindings
