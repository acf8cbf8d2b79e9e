// The plain flush policy (flush_policy.h): while a layer's fp16 window holds more than
// fp16_window + block_tokens tokens, its oldest block_tokens tokens are quantized at the
// stream's bits and appended to the codes in position order, so at least fp16_window recent
// tokens stay exact. Codes are those of the fp16-rounded tokens, so the content is the same
// however the tokens were split into append() calls.
#pragma once

#include "turboquant/cache/flush_policy.h"

namespace turboquant {

class PlainFlush final : public FlushPolicy {
 public:
  using FlushPolicy::FlushPolicy;
  void flush(size_t l, size_t keep_new) override;
};

}  // namespace turboquant
