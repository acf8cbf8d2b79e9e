// The thread pool (thread_pool.h): every index of a parallel_for runs exactly once and has
// finished when the call returns, also for many short jobs in a row (workers that wake up
// late must not run a finished job, and workers beyond a job's chunk count stay out of it),
// and the first exception is rethrown.
#include "turboquant/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <stdexcept>
#include <vector>

using namespace turboquant;

TEST(ThreadPool, ManyShortJobsRunEveryIndexOnceBeforeReturning) {
  // 16 threads on a smaller machine: most jobs have fewer chunks than workers, so most
  // workers must stay out of them (and a late one must not run a later job's chunks twice).
  for (int threads : {2, 3, 16}) {
    set_num_threads(threads);
    std::vector<int> hits(7, 0);
    for (int job = 0; job < 2000; ++job) {
      const size_t n = 1 + static_cast<size_t>(job % 7);
      std::vector<std::atomic<int>> seen(n);
      for (auto& s : seen) s.store(0);
      parallel_for(n, 1, [&](size_t b, size_t e) {
        for (size_t i = b; i < e; ++i) seen[i].fetch_add(1);
      });
      for (size_t i = 0; i < n; ++i) {
        ASSERT_EQ(seen[i].load(), 1) << "job " << job << " index " << i << " threads " << threads;
        ++hits[i];
      }
    }
    EXPECT_GT(hits[6], 0);
  }
  set_num_threads(0);
}

TEST(ThreadPool, RethrowsAndStaysUsable) {
  set_num_threads(2);
  EXPECT_THROW(parallel_for(4, 1, [](size_t b, size_t) {
                 if (b == 3) throw std::runtime_error("chunk 3");
               }),
               std::runtime_error);
  std::atomic<size_t> total{0};
  parallel_for(100, 1, [&](size_t b, size_t e) { total.fetch_add(e - b); });
  EXPECT_EQ(total.load(), 100u);
  set_num_threads(0);
}
