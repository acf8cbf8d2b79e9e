// The page store (cache/page_store.h): paged codes per stream, each block at its own width.
#include "turboquant/cache/page_store.h"

#include <gtest/gtest.h>

#include <vector>

#include "cache_parts_test_util.h"
#include "kv_test_util.h"

using namespace turboquant;
using namespace turboquant::testing;

namespace {
KVCacheConfig store_config(bool decay) {
  KVCacheConfig c = small_cache_config(3);
  if (decay) {
    c.decay_after = 8;
    c.decay_bits = 1;
  }
  return c;
}
}  // namespace

TEST(PageStore, EnsureAndReleaseWholeBlocksWithoutMovingOldOnes) {
  const KVCacheConfig c = store_config(false);
  const QuantizerTable table(c);
  PageStore store(table, c.block_tokens);
  store.ensure(0, 9);
  ASSERT_EQ(store[0].code_blocks.size(), 2u);
  const uint8_t* first = store[0].code_blocks[0].get();
  store.ensure(0, 40);
  EXPECT_EQ(store[0].code_blocks.size(), 5u);
  EXPECT_EQ(store[0].code_blocks[0].get(), first);
  EXPECT_TRUE(store[0].decayed.empty());  // no flags without decayed quantizers
  store.release(0, 17);
  EXPECT_EQ(store[0].code_blocks.size(), 3u);
  EXPECT_EQ(store[0].norm_blocks.size(), 3u);
  EXPECT_EQ(store.page_bytes(0), 3 * 8 * (table.at(0).code_bytes() + table.at(0).norm_bytes()));
}

TEST(PageStore, EncodeCopyOutAndWriteRoundTrip) {
  const KVCacheConfig c = store_config(false);
  const QuantizerTable table(c);
  PageStore a(table, c.block_tokens), b(table, c.block_tokens);
  const size_t n = 21;
  const auto x = gaussian(n * 32, 11);
  a.ensure(0, n);
  a.encode(0, 0, x.data(), n, 32);
  const Quantizer& q = table.at(0);
  std::vector<uint8_t> codes(n * q.code_bytes()), norms(n * q.norm_bytes());
  a.copy_out(0, 0, n, codes.data(), norms.data());
  std::vector<uint8_t> direct(n * q.code_bytes()), dnorms(n * q.norm_bytes());
  q.encode(x.data(), n, direct.data(), dnorms.data());
  EXPECT_EQ(codes, direct);  // code index j is row j % bt of block j / bt
  EXPECT_EQ(norms, dnorms);
  b.ensure(0, n);
  b.write(0, 0, n, codes.data(), norms.data());
  std::vector<uint8_t> again(codes.size()), again_n(norms.size());
  b.copy_out(0, 3, n - 3, again.data(), again_n.data());
  EXPECT_TRUE(std::equal(again.begin(), again.begin() + static_cast<std::ptrdiff_t>((n - 3) * q.code_bytes()),
                         codes.begin() + static_cast<std::ptrdiff_t>(3 * q.code_bytes())));
  EXPECT_EQ(a.code_bytes(0, n), n * q.bytes_per_vector());
}

TEST(PageStore, DecayedBlocksHaveTheirOwnWidth) {
  const KVCacheConfig c = store_config(true);
  const QuantizerTable table(c);
  PageStore store(table, c.block_tokens);
  store.ensure(0, 24);
  ASSERT_EQ(store[0].decayed, (std::vector<uint8_t>{0, 0, 0}));
  store.make_decayed(0, 1);
  EXPECT_TRUE(store[0].is_decayed(1));
  EXPECT_EQ(store.decayed_blocks(0), 1u);
  EXPECT_EQ(&store.block_quantizer(0, 1), table.decayed(0));
  EXPECT_EQ(&store.block_quantizer(0, 2), &table.at(0));
  const size_t full = table.at(0).code_bytes(), low = table.decayed(0)->code_bytes(), nb = table.at(0).norm_bytes();
  EXPECT_LT(low, full);
  EXPECT_EQ(store.page_bytes(0), 8 * (2 * full + low) + 3 * 8 * nb);
  EXPECT_EQ(store.code_bytes(0, 20), 8 * (full + nb) + 8 * (low + nb) + 4 * (full + nb));
  // A row range across blocks of two widths comes out packed, each row at its block's width.
  const auto x = gaussian(24 * 32, 4);
  store.encode(0, 0, x.data(), 24, 32);
  std::vector<uint8_t> codes(24 * full), norms(24 * nb);
  store.copy_out(0, 4, 12, codes.data(), norms.data());
  std::vector<uint8_t> low_rows(8 * low), low_norms(8 * nb);
  table.decayed(0)->encode(x.data() + 8 * 32, 8, low_rows.data(), low_norms.data());
  EXPECT_TRUE(std::equal(low_rows.begin(), low_rows.end(), codes.begin() + static_cast<std::ptrdiff_t>(4 * full)));
  // Dropping front blocks drops their flags too.
  store.drop_front(0, 2);
  EXPECT_EQ(store[0].code_blocks.size(), 1u);
  EXPECT_EQ(store[0].decayed, (std::vector<uint8_t>{0}));
  const HeadCodes view = store.head(0);
  EXPECT_EQ(view.decayed, table.decayed(0));
  EXPECT_EQ(view.block_tokens, 8u);
}
