#include "turboquant/rotation_block.h"

#include <algorithm>

#include "turboquant/error.h"

namespace turboquant {

namespace {
int total_dim(const std::vector<int>& channels) { return static_cast<int>(channels.size()); }
}  // namespace

BlockDiagonalRotation::BlockDiagonalRotation(std::vector<int> channels,
                                             std::vector<std::unique_ptr<Rotation>> blocks)
    : Rotation(total_dim(channels)), channels_(std::move(channels)), blocks_(std::move(blocks)) {
  const auto d = channels_.size();
  TQ_CHECK(d >= 1, InvalidArgument, "block rotation needs at least one channel");
  std::vector<bool> seen(d, false);
  for (int c : channels_) {
    TQ_CHECK(c >= 0 && static_cast<size_t>(c) < d && !seen[static_cast<size_t>(c)], InvalidArgument,
             "block rotation channels must be a permutation of 0..", d - 1);
    seen[static_cast<size_t>(c)] = true;
  }
  size_t sum = 0;
  for (const auto& b : blocks_) {
    TQ_CHECK(b != nullptr, InvalidArgument, "block rotation: null block");
    sum += static_cast<size_t>(b->dim());
  }
  TQ_CHECK(sum == d, InvalidArgument, "block rotation: block dims sum to ", sum, ", expected ", d);
}

void BlockDiagonalRotation::forward(const float* x, float* y, size_t n) const {
  const auto d = static_cast<size_t>(dim_);
  std::vector<float> out(n * d), part;
  size_t off = 0;
  for (const auto& b : blocks_) {
    const auto db = static_cast<size_t>(b->dim());
    part.resize(n * db);
    for (size_t r = 0; r < n; ++r)
      for (size_t j = 0; j < db; ++j) part[r * db + j] = x[r * d + static_cast<size_t>(channels_[off + j])];
    b->forward(part.data(), part.data(), n);
    for (size_t r = 0; r < n; ++r) std::copy_n(part.data() + r * db, db, out.data() + r * d + off);
    off += db;
  }
  std::copy(out.begin(), out.end(), y);
}

void BlockDiagonalRotation::inverse(const float* y, float* x, size_t n) const {
  const auto d = static_cast<size_t>(dim_);
  std::vector<float> out(n * d), part;
  size_t off = 0;
  for (const auto& b : blocks_) {
    const auto db = static_cast<size_t>(b->dim());
    part.resize(n * db);
    for (size_t r = 0; r < n; ++r) std::copy_n(y + r * d + off, db, part.data() + r * db);
    b->inverse(part.data(), part.data(), n);
    for (size_t r = 0; r < n; ++r)
      for (size_t j = 0; j < db; ++j) out[r * d + static_cast<size_t>(channels_[off + j])] = part[r * db + j];
    off += db;
  }
  std::copy(out.begin(), out.end(), x);
}

}  // namespace turboquant
