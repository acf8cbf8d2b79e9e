// The thread-safety guards of KVCache (kv_cache.h, "Thread safety"), shared by the files
// that implement the cache. Internal header.
#pragma once

#include "turboquant/error.h"
#include "turboquant/kv_cache.h"

namespace turboquant {

// --- thread-safety guards (kv_cache.h, "Thread safety") ---------------------------------
// A reader announces itself (readers_ += 1) and then checks for a mutator; a mutator
// announces itself (writer_ = true) and then checks for readers. Both are seq_cst, so two
// overlapping calls cannot both miss each other; the loser throws before touching state.
inline constexpr const char* kThreadRule =
    "concurrent attend/size/save calls are safe, but append/trim/truncate/set_rotation need "
    "exclusive access to the cache (serialize them with a lock)";

class KVCache::ReadScope {
 public:
  ReadScope(const KVCache& c, const char* op) : c_(c) {
    c_.readers_.fetch_add(1, std::memory_order_seq_cst);
    if (c_.writer_.load(std::memory_order_seq_cst)) {
      c_.readers_.fetch_sub(1, std::memory_order_seq_cst);
      throw ConcurrentAccess(detail::concat("KVCache.", op,
                                            " called while another thread is modifying the cache; ",
                                            kThreadRule));
    }
  }
  ~ReadScope() { c_.readers_.fetch_sub(1, std::memory_order_seq_cst); }
  ReadScope(const ReadScope&) = delete;
  ReadScope& operator=(const ReadScope&) = delete;

 private:
  const KVCache& c_;
};

class KVCache::WriteScope {
 public:
  WriteScope(const KVCache& c, const char* op) : c_(c) {
    if (c_.writer_.exchange(true, std::memory_order_seq_cst)) {
      throw ConcurrentAccess(detail::concat("KVCache.", op,
                                            " called while another thread is modifying the cache; ",
                                            kThreadRule));
    }
    if (c_.readers_.load(std::memory_order_seq_cst) != 0) {
      c_.writer_.store(false, std::memory_order_seq_cst);
      throw ConcurrentAccess(detail::concat("KVCache.", op,
                                            " called while another thread is reading the cache; ",
                                            kThreadRule));
    }
  }
  ~WriteScope() { c_.writer_.store(false, std::memory_order_seq_cst); }
  WriteScope(const WriteScope&) = delete;
  WriteScope& operator=(const WriteScope&) = delete;

 private:
  const KVCache& c_;
};

}  // namespace turboquant
