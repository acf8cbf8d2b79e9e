#include "turboquant/cache/page_store.h"

#include <algorithm>
#include <cstring>

namespace turboquant {

PageStore::PageStore(const QuantizerTable& table, size_t block_tokens)
    : table_(table), bt_(block_tokens), flags_(table.decayed(0) != nullptr), pages_(table.streams()) {}

void PageStore::ensure(size_t stream, size_t tokens) {
  PagedCodes& p = pages_[stream];
  const Quantizer& q = table_.at(stream);
  const size_t need = (tokens + bt_ - 1) / bt_;
  while (p.code_blocks.size() < need) {
    p.code_blocks.emplace_back(new uint8_t[bt_ * q.code_bytes()]);
    p.norm_blocks.emplace_back(new uint8_t[bt_ * q.norm_bytes()]);
    if (flags_) p.decayed.push_back(0);
  }
}

void PageStore::release(size_t stream, size_t tokens) {
  PagedCodes& p = pages_[stream];
  const size_t keep = (tokens + bt_ - 1) / bt_;
  if (p.code_blocks.size() > keep) {
    p.code_blocks.resize(keep);
    p.norm_blocks.resize(keep);
    if (p.decayed.size() > keep) p.decayed.resize(keep);
  }
}

void PageStore::drop_front(size_t stream, size_t blocks) {
  PagedCodes& p = pages_[stream];
  const auto k = static_cast<std::ptrdiff_t>(blocks);
  p.code_blocks.erase(p.code_blocks.begin(), p.code_blocks.begin() + k);
  p.norm_blocks.erase(p.norm_blocks.begin(), p.norm_blocks.begin() + k);
  if (!p.decayed.empty()) p.decayed.erase(p.decayed.begin(), p.decayed.begin() + k);
}

void PageStore::make_decayed(size_t stream, size_t b) {
  set_decayed(stream, b, std::unique_ptr<uint8_t[]>(new uint8_t[bt_ * table_.decayed(stream)->code_bytes()]));
}

void PageStore::set_decayed(size_t stream, size_t b, std::unique_ptr<uint8_t[]> codes) {
  PagedCodes& p = pages_[stream];
  p.code_blocks[b] = std::move(codes);
  p.decayed[b] = 1;
}

void PageStore::encode(size_t stream, size_t pos, const float* x, size_t n, size_t dim) {
  PagedCodes& p = pages_[stream];
  size_t t = 0;
  for_each_run(stream, pos, n, [&](size_t b, size_t off, size_t c, const Quantizer& q, size_t, size_t) {
    q.encode(x + t * dim, c, p.code_blocks[b].get() + off * q.code_bytes(),
             p.norm_blocks[b].get() + off * q.norm_bytes());
    t += c;
  });
}

void PageStore::copy_out(size_t stream, size_t t0, size_t n, uint8_t* codes, uint8_t* norms) const {
  const PagedCodes& p = pages_[stream];
  for_each_run(stream, t0, n, [&](size_t b, size_t off, size_t c, const Quantizer& q, size_t cat, size_t nat) {
    std::memcpy(codes + cat, p.code_blocks[b].get() + off * q.code_bytes(), c * q.code_bytes());
    std::memcpy(norms + nat, p.norm_blocks[b].get() + off * q.norm_bytes(), c * q.norm_bytes());
  });
}

void PageStore::write(size_t stream, size_t t0, size_t n, const uint8_t* codes, const uint8_t* norms) {
  PagedCodes& p = pages_[stream];
  for_each_run(stream, t0, n, [&](size_t b, size_t off, size_t c, const Quantizer& q, size_t cat, size_t nat) {
    std::memcpy(p.code_blocks[b].get() + off * q.code_bytes(), codes + cat, c * q.code_bytes());
    std::memcpy(p.norm_blocks[b].get() + off * q.norm_bytes(), norms + nat, c * q.norm_bytes());
  });
}

size_t PageStore::page_bytes(size_t stream) const {
  const PagedCodes& p = pages_[stream];
  const Quantizer& q = table_.at(stream);
  size_t total = 0;
  if (flags_) {
    const Quantizer& dq = *table_.decayed(stream);
    for (size_t b = 0; b < p.code_blocks.size(); ++b)
      total += bt_ * (p.is_decayed(b) ? dq.code_bytes() : q.code_bytes());
  } else {
    total += p.code_blocks.size() * bt_ * q.code_bytes();
  }
  return total + p.norm_blocks.size() * bt_ * q.norm_bytes();
}

size_t PageStore::code_bytes(size_t stream, size_t n) const {
  size_t total = 0;
  for (size_t b = 0; b * bt_ < n; ++b) total += std::min(bt_, n - b * bt_) * block_quantizer(stream, b).bytes_per_vector();
  return total;
}

size_t PageStore::decayed_blocks(size_t stream) const {
  const PagedCodes& p = pages_[stream];
  return static_cast<size_t>(std::count(p.decayed.begin(), p.decayed.end(), uint8_t{1}));
}

}  // namespace turboquant
