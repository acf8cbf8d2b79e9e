// turboquant._core.SegmentPlan (cache/segment_plan.h): the rules of a layer's segments, so
// that a store holding its bytes elsewhere (python/turboquant/mlx_metal.py) follows the
// core's flushes and cuts instead of restating them; and KVCache.segment_plan(layer) /
// segment_sizes(layer), the plan and sizes of one of the cache's layers.
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "common.h"
#include "turboquant/cache/segment_plan.h"
#include "turboquant/kv_cache.h"

namespace turboquant::bindings {

namespace {

std::string repr(const SegmentSizes& s) {
  return "SegmentSizes(sinks=" + std::to_string(s.sinks) + ", codes=" + std::to_string(s.codes) +
         ", window=" + std::to_string(s.window) + ", rated=" + std::to_string(s.rated) + ")";
}

SegmentSizes layer_sizes(const KVCache& kv, int layer) {
  TQ_CHECK(layer >= 0 && layer < kv.config().n_layers, InvalidArgument, "layer must be in [0, ", kv.config().n_layers,
           "), got ", layer);
  const SegmentPlan plan(kv.config(), static_cast<size_t>(layer));
  return plan.sizes(kv.size(layer), kv.coded_tokens(layer), kv.rated_tokens(layer));
}

}  // namespace

void bind_segment_plan(py::module_& m) {
  py::class_<SegmentSizes>(m, "SegmentSizes",
                           "The segments of one layer: sinks fp16 sink tokens, then codes code tokens, then window "
                           "fp16 window tokens; rated (mixed precision): the leading tokens attention calls rated.")
      .def(py::init([](size_t sinks, size_t codes, size_t window, size_t rated) {
             return SegmentSizes{sinks, codes, window, rated};
           }),
           py::arg("sinks") = 0, py::arg("codes") = 0, py::arg("window") = 0, py::arg("rated") = 0)
      .def_readwrite("sinks", &SegmentSizes::sinks)
      .def_readwrite("codes", &SegmentSizes::codes)
      .def_readwrite("window", &SegmentSizes::window)
      .def_readwrite("rated", &SegmentSizes::rated)
      .def_property_readonly("size", &SegmentSizes::size, "tokens held")
      .def_property_readonly("coded", &SegmentSizes::coded, "end of the codes (sinks + codes)")
      .def("__eq__", [](const SegmentSizes& a, const SegmentSizes& b) { return a == b; })
      .def("__copy__", [](const SegmentSizes& s) { return s; })
      .def("__deepcopy__", [](const SegmentSizes& s, const py::dict&) { return s; }, py::arg("memo"))
      .def("__repr__", &repr);

  py::class_<AppendPlan>(m, "AppendPlan",
                         "An append: sinks tokens to the fp16 sinks, window to the fp16 window (or direct straight "
                         "into codes, unwindowed), then flushes pieces of piece window tokens into codes, oldest "
                         "first; after: the sizes then.")
      .def_readonly("sinks", &AppendPlan::sinks)
      .def_readonly("window", &AppendPlan::window)
      .def_readonly("direct", &AppendPlan::direct)
      .def_readonly("flushes", &AppendPlan::flushes)
      .def_readonly("piece", &AppendPlan::piece)
      .def_property_readonly("flushed", &AppendPlan::flushed, "window tokens flushed (flushes × piece)")
      .def_readonly("after", &AppendPlan::after);

  py::class_<CutPlan>(m, "CutPlan",
                      "A cut: the sizes kept (after), the tokens released per segment, whether the window and the "
                      "sinks give their capacity back, and whether it splits a mixed-precision flush group.")
      .def_readonly("after", &CutPlan::after)
      .def_readonly("sinks_released", &CutPlan::sinks_released)
      .def_readonly("codes_released", &CutPlan::codes_released)
      .def_readonly("window_released", &CutPlan::window_released)
      .def_readonly("window_freed", &CutPlan::window_freed)
      .def_readonly("sinks_freed", &CutPlan::sinks_freed)
      .def_readonly("splits_group", &CutPlan::splits_group);

  py::class_<CompactPlan>(m, "CompactPlan",
                          "A compaction of a layer: its whole window becomes codes (tokens of them) and gives its\n"
                          "capacity back (window_freed; false: the layer keeps its window).")
      .def_readonly("tokens", &CompactPlan::tokens)
      .def_readonly("window_freed", &CompactPlan::window_freed)
      .def_readonly("after", &CompactPlan::after);

  py::class_<SegmentPlan>(m, "SegmentPlan",
                          "The rules of one layer's segments, data-free: where an append's tokens go and which "
                          "window tokens flush into codes, and what a cut keeps. windowed defaults to the "
                          "configuration's (fp16 sinks or an fp16 window).")
      .def(py::init([](size_t fp16_sinks, size_t fp16_window, size_t block_tokens, size_t mixed_group_blocks,
                       size_t mixed_keep_blocks, std::optional<bool> windowed, bool fp16_layer) {
             SegmentPlan::Rules r;
             r.fp16_sinks = fp16_sinks;
             r.fp16_window = fp16_window;
             r.block_tokens = block_tokens;
             r.mixed_group_blocks = mixed_group_blocks;
             r.mixed_keep_blocks = mixed_keep_blocks;
             r.windowed = windowed.value_or(fp16_sinks > 0 || fp16_window > 0 || fp16_layer);
             r.fp16_layer = fp16_layer;
             return SegmentPlan(r);
           }),
           py::kw_only(), py::arg("fp16_sinks") = 0, py::arg("fp16_window") = 0, py::arg("block_tokens") = 256,
           py::arg("mixed_group_blocks") = 0, py::arg("mixed_keep_blocks") = 0, py::arg("windowed") = py::none(),
           py::arg("fp16_layer") = false)
      .def_property_readonly("windowed", &SegmentPlan::windowed)
      .def_property_readonly("mixed", &SegmentPlan::mixed)
      .def_property_readonly("sink_base", &SegmentPlan::sink_base, "the sinks a layer holds when full")
      .def_property_readonly("flush_tokens", &SegmentPlan::flush_tokens, "tokens one flush moves")
      .def_property_readonly("window_rows", &SegmentPlan::window_rows,
                             "rows a flushed window holds at most, its capacity once used")
      .def_property_readonly_static("unrated_tokens", [](const py::object&) { return SegmentPlan::kUnratedTokens; })
      .def("sizes", &SegmentPlan::sizes, py::arg("size"), py::arg("coded"), py::arg("rated") = 0,
           "The segments of a layer holding size tokens whose codes end at coded.")
      .def("append", &SegmentPlan::append, py::arg("sizes"), py::arg("tokens"), "An append of tokens tokens.")
      .def("quiet_tokens", &SegmentPlan::quiet_tokens, py::arg("sizes"),
           "One-token appends in a row that go to the window with no sink filled and no flush.")
      .def("due_flushes", &SegmentPlan::due_flushes, py::arg("sizes"), py::arg("keep_new"),
           "Flushes due in a layer whose latest append added keep_new window tokens.")
      .def("cut", &SegmentPlan::cut, py::arg("sizes"), py::arg("new_size"), "A cut back to new_size tokens.")
      .def("compact", &SegmentPlan::compact, py::arg("sizes"),
           "A compaction: the whole window into codes (mixed-precision and fp16 layers keep theirs).")
      .def("check_cut", &SegmentPlan::check_cut, py::arg("sizes"), py::arg("new_size"), py::arg("layer") = 0,
           "Raises RuntimeError for a cut that splits a mixed-precision flush group.")
      .def("low_codes", &SegmentPlan::low_codes, py::arg("codes"),
           "Of codes code tokens of a mixed-precision layer (whole groups), those at the low width.")
      .def("__copy__", [](const SegmentPlan& p) { return p; })
      .def("__deepcopy__", [](const SegmentPlan& p, const py::dict&) { return p; }, py::arg("memo"));

  auto cls = py::reinterpret_borrow<py::class_<KVCache>>(m.attr("KVCache"));
  cls.def("segment_plan", [](const KVCache& kv, int layer) {
        TQ_CHECK(layer >= 0 && layer < kv.config().n_layers, InvalidArgument, "layer must be in [0, ",
                 kv.config().n_layers, "), got ", layer);
        return SegmentPlan(kv.config(), static_cast<size_t>(layer));
      }, py::arg("layer") = 0, "The segment rules of one layer (SegmentPlan).");
  cls.def("segment_sizes", &layer_sizes, py::arg("layer") = 0, "The segment sizes of one layer (SegmentSizes).");
}

}  // namespace turboquant::bindings
