// The page store of a KV cache: the code segment of every stream (layer, KV head, role) as
// pages of block_tokens tokens, codes and fp16 norms in separate arrays. Growing a stream
// allocates new pages and never moves old ones. Each block is at its own width: the
// stream's bits, or, flagged in PagedCodes::decayed, its decayed quantizer's (temporal
// decay, mixed precision; quantizer_table.h). Code index j of a stream is row j % bt of
// block j / bt; which token a code index holds is the business of the segments and of the
// flush policy (kv_cache.h, flush_policy.h), not of the store.
#pragma once

#include <algorithm>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "turboquant/cache/quantizer_table.h"
#include "turboquant/quantizer.h"

namespace turboquant {

// The pages of one (layer, kv_head, role): block b holds code indices [b*bt, (b+1)*bt).
struct PagedCodes {
  std::vector<std::unique_ptr<uint8_t[]>> code_blocks;  // bt × code_bytes each
  std::vector<std::unique_ptr<uint8_t[]>> norm_blocks;  // bt × norm_bytes each (fp16)
  // Only where blocks may decay (empty otherwise): 1 where the block holds decay_bits codes
  // (bt × the decayed quantizer's code_bytes), 0 where it holds the stream's own bits.
  std::vector<uint8_t> decayed;
  bool is_decayed(size_t b) const { return b < decayed.size() && decayed[b] != 0; }
};

// A read-only view of one head's codes for the attention kernels (attention.h).
struct HeadCodes {
  const Quantizer* quantizer = nullptr;
  const PagedCodes* pages = nullptr;
  size_t block_tokens = 0;
  // Quantizer of decayed blocks (pages->decayed): same method and rotation, fewer bits.
  const Quantizer* decayed = nullptr;
  const Quantizer& block_quantizer(size_t b) const {
    return pages->is_decayed(b) ? *decayed : *quantizer;
  }
};

class PageStore {
 public:
  // One stream per quantizer of the table (which must outlive the store).
  PageStore(const QuantizerTable& table, size_t block_tokens);

  size_t block_tokens() const { return bt_; }
  const PagedCodes& operator[](size_t stream) const { return pages_[stream]; }
  HeadCodes head(size_t stream) const {
    return HeadCodes{&table_.at(stream), &pages_[stream], bt_, table_.decayed(stream)};
  }
  // The quantizer of a block (its width: decayed or the stream's).
  const Quantizer& block_quantizer(size_t stream, size_t block) const {
    return table_.block(stream, pages_[stream].is_decayed(block));
  }

  // Allocates full-width blocks until the stream can hold `tokens` code indices.
  void ensure(size_t stream, size_t tokens);
  // Frees the blocks past those holding the first `tokens` code indices.
  void release(size_t stream, size_t tokens);
  // Drops the stream's first `blocks` blocks (code indices move down by blocks × bt).
  void drop_front(size_t stream, size_t blocks);
  // Gives block b fresh (uninitialised) codes at the decayed width and flags it.
  void make_decayed(size_t stream, size_t b);
  // Installs re-quantized codes (decayed width) for block b and flags it.
  void set_decayed(size_t stream, size_t b, std::unique_ptr<uint8_t[]> codes);
  uint8_t* norms(size_t stream, size_t b) { return pages_[stream].norm_blocks[b].get(); }

  // Encodes n fp32 rows (n × dim) into code indices [pos, pos + n), each block at its width
  // (blocks must exist).
  void encode(size_t stream, size_t pos, const float* x, size_t n, size_t dim);
  // Code indices [t0, t0 + n) as packed rows (each at its block's code_bytes / norm_bytes):
  // copy_out reads them, write stores them (blocks must exist).
  void copy_out(size_t stream, size_t t0, size_t n, uint8_t* codes, uint8_t* norms) const;
  void write(size_t stream, size_t t0, size_t n, const uint8_t* codes, const uint8_t* norms);

  // Bytes of the stream's pages (allocated blocks, each at its width).
  size_t page_bytes(size_t stream) const;
  // Bytes of the first n code indices (codes at each block's width and norms).
  size_t code_bytes(size_t stream, size_t n) const;
  size_t decayed_blocks(size_t stream) const;

 private:
  // Calls f(block, offset in the block, tokens, block's quantizer, code bytes before, norm
  // bytes before) for each run of tokens [t0, t0 + n) of `stream` inside one block.
  template <class F>
  void for_each_run(size_t stream, size_t t0, size_t n, F&& f) const {
    size_t cat = 0, nat = 0;
    for (size_t t = 0; t < n;) {
      const size_t b = (t0 + t) / bt_, off = (t0 + t) % bt_;
      const size_t c = std::min(n - t, bt_ - off);
      const Quantizer& q = block_quantizer(stream, b);
      f(b, off, c, q, cat, nat);
      cat += c * q.code_bytes();
      nat += c * q.norm_bytes();
      t += c;
    }
  }

  const QuantizerTable& table_;
  size_t bt_;
  bool flags_;  // whether blocks carry decay flags (the table has decayed quantizers)
  std::vector<PagedCodes> pages_;
};

}  // namespace turboquant
