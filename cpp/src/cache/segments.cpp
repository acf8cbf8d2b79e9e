#include "turboquant/cache/segments.h"

namespace turboquant {

Segments::Segments(const CacheShape& shape, const SegmentsConfig& config, const MixedPrecisionConfig& mixed)
    : windowed(config.windowed()),
      head_dim(static_cast<size_t>(shape.head_dim)),
      streams_per_layer(static_cast<size_t>(shape.n_kv_heads) * 2),
      fp16_sinks(config.fp16_sinks),
      fp16_layer(static_cast<size_t>(shape.n_layers), 0),
      size(static_cast<size_t>(shape.n_layers), 0) {
  for (int l : config.fp16_layers) fp16_layer[static_cast<size_t>(l)] = 1;
  const size_t streams = static_cast<size_t>(shape.n_layers) * streams_per_layer;
  if (windowed) {
    coded.assign(size.size(), 0);
    window.resize(streams);
  }
  if (fp16_sinks > 0) sinks.resize(streams);
  plans_.reserve(size.size());
  for (size_t l = 0; l < size.size(); ++l) plans_.emplace_back(config, mixed, l);
}

void Segments::append_rows(size_t l, const uint16_t* rows, size_t T, size_t to_sinks) {
  const size_t d = head_dim, streams = streams_per_layer, old = size[l];
  if (to_sinks > 0) {
    for (size_t s = 0; s < streams; ++s) {
      auto& v = sinks[l * streams + s];
      v.reserve(sink_base(l) * d);
      v.insert(v.end(), rows + s * T * d, rows + s * T * d + to_sinks * d);
    }
    coded[l] = old + to_sinks;
  }
  for (size_t s = 0; s < streams; ++s) {
    auto& w = window[l * streams + s];
    w.insert(w.end(), rows + s * T * d + to_sinks * d, rows + (s + 1) * T * d);
  }
  size[l] = old + T;
}

void Segments::undo_append(size_t l, size_t old_size, size_t old_coded, size_t to_sinks) {
  const size_t d = head_dim, streams = streams_per_layer;
  if (coded[l] == old_size + to_sinks && to_sinks > 0) {  // nothing flushed: the sinks go too
    for (size_t s = 0; s < streams; ++s) sinks[l * streams + s].resize(old_size * d);
    coded[l] = old_coded;
  }
  const size_t keep = old_size > coded[l] ? old_size - coded[l] : 0;
  for (size_t s = 0; s < streams; ++s) window[l * streams + s].resize(keep * d);
  size[l] = std::max(old_size, coded[l]);
}

void Segments::flushed(size_t l, size_t tokens) {
  for (size_t s = 0; s < streams_per_layer; ++s) {
    auto& w = window[l * streams_per_layer + s];
    w.erase(w.begin(), w.begin() + static_cast<std::ptrdiff_t>(tokens * head_dim));
  }
  coded[l] += tokens;
}

void Segments::compacted(size_t l, size_t tokens) {
  flushed(l, tokens);
  for (size_t s = 0; s < streams_per_layer; ++s)
    std::vector<uint16_t>().swap(window[l * streams_per_layer + s]);
}

void Segments::fit_window(size_t l) {
  if (fp16_layer[l]) return;  // an unbounded window
  for (size_t s = 0; s < streams_per_layer; ++s) {
    auto& w = window[l * streams_per_layer + s];
    if (!w.empty()) fit_capacity(w, plans_[l].window_rows() * head_dim);
  }
}

void Segments::restore_window(size_t l, size_t n, const std::vector<const uint16_t*>& rows) {
  for (size_t s = 0; s < streams_per_layer; ++s) window[l * streams_per_layer + s].assign(rows[s], rows[s] + n * head_dim);
  fit_window(l);
  size[l] += n;
}

void Segments::restore_sinks(size_t l, size_t n, const std::vector<const uint16_t*>& rows) {
  for (size_t s = 0; s < streams_per_layer; ++s) {
    auto& v = sinks[l * streams_per_layer + s];
    v.reserve(fp16_sinks * head_dim);
    v.assign(rows[s], rows[s] + n * head_dim);
  }
  size[l] = n;
  coded[l] = n;
}

void Segments::add_codes(size_t l, size_t n) {
  size[l] += n;
  if (windowed) coded[l] = size[l];
}

void Segments::cut(size_t l, const CutPlan& plan) {
  const size_t d = head_dim, streams = streams_per_layer;
  if (windowed) {
    for (size_t s = 0; s < streams; ++s) {
      auto& w = window[l * streams + s];
      w.resize(plan.after.window * d);
      if (plan.window_freed) std::vector<uint16_t>().swap(w);
      if (plan.sinks_released > 0) {
        auto& v = sinks[l * streams + s];
        v.resize(plan.after.sinks * d);
        if (plan.sinks_freed) std::vector<uint16_t>().swap(v);
      }
    }
    coded[l] = plan.after.coded();
  }
  size[l] = plan.after.size();
}

void Segments::codes_dropped(size_t l, size_t tokens) {
  size[l] -= tokens;
  if (windowed) coded[l] -= tokens;
}

}  // namespace turboquant
