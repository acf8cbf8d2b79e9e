#include "turboquant/cache/segments.h"

namespace turboquant {

Segments::Segments(const KVCacheConfig& config)
    : windowed(config.windowed()),
      head_dim(static_cast<size_t>(config.head_dim)),
      streams_per_layer(static_cast<size_t>(config.n_kv_heads) * 2),
      fp16_sinks(config.fp16_sinks),
      fp16_layer(static_cast<size_t>(config.n_layers), 0),
      size(static_cast<size_t>(config.n_layers), 0) {
  for (int l : config.fp16_layers) fp16_layer[static_cast<size_t>(l)] = 1;
  const size_t streams = static_cast<size_t>(config.n_layers) * streams_per_layer;
  if (windowed) {
    coded.assign(size.size(), 0);
    window.resize(streams);
  }
  if (fp16_sinks > 0) sinks.resize(streams);
}

}  // namespace turboquant


