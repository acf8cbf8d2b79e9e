// The library's worker threads: one small pool, created on first use and kept for the life
// of the process (no per-call thread creation), shared by batch encode and by attention
// across KV heads. The calling thread works too, so n threads means n - 1 workers.
#pragma once

#include <cstddef>
#include <functional>

namespace turboquant {

// Threads used by parallel work (>= 1). Default: TURBOQUANT_NUM_THREADS if set, else the
// hardware concurrency.
int get_num_threads();
// Sets the thread count; 0 means the default above. Throws InvalidArgument if n < 0 or
// n > 1024. Waits for running parallel work to finish first.
void set_num_threads(int n);

// Calls fn(begin, end) on disjoint chunks covering [0, n), each at least `grain` long
// (except the last), on the pool and the calling thread; returns when all are done. The
// first exception thrown by fn is rethrown here (other chunks still finish). A call made
// from inside a parallel_for, or while another thread's parallel_for runs, runs inline.
void parallel_for(size_t n, size_t grain, const std::function<void(size_t, size_t)>& fn);

}  // namespace turboquant
