// The plain flush policy (flush_policy.h): while a layer's fp16 window holds more than
// fp16_window + block_tokens tokens, its oldest block_tokens tokens are quantized at the
// stream's bits and appended to the codes in position order, so at least fp16_window recent
// tokens stay exact. Codes are those of the fp16-rounded tokens, so the content is the same
// however the tokens were split into append() calls. A compaction encodes the whole window
// the same way, its last block partial (later flushes fill that block on).
#pragma once

#include "turboquant/cache/flush_policy.h"

namespace turboquant {

class PlainFlush final : public FlushPolicy {
 public:
  using FlushPolicy::FlushPolicy;
  void flush(size_t l, size_t keep_new) override;
  size_t compact(size_t l) override;

 private:
  // Encodes the window's oldest n rows of every stream of layer l into code indices
  // [c, c + n); on an exception releases the pages past c (nothing else changed) and rethrows.
  void encode_window(size_t l, size_t c, size_t n);
};

}  // namespace turboquant
