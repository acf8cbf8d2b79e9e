#include "turboquant/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "turboquant/error.h"

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#define TQ_HAVE_GETPID 1
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace turboquant {
namespace {

int default_threads() {
  if (const char* env = std::getenv("TURBOQUANT_NUM_THREADS"); env && *env) {
    const int n = std::atoi(env);
    if (n >= 1 && n <= 1024) return n;
  }
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

thread_local bool tls_in_parallel = false;

// Before sleeping on a condition variable, a worker waiting for the next job and the caller
// waiting for the workers spin this long (OpenMP runtimes do the same): back-to-back calls
// (the layers of a decode step, the heads of a benchmark loop) then skip the wake-up latency
// of a sleeping thread (tens of microseconds in a VM), which is larger than a 1K-token
// chunk of attention. A worker that sees no job for this long sleeps and costs nothing.
constexpr auto kSpin = std::chrono::microseconds(50);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until pred() holds (true) or kSpin has passed (false).
template <class Pred>
bool spin_until(Pred pred) {
  const auto t0 = std::chrono::steady_clock::now();
  for (unsigned i = 1;; ++i) {
    if (pred()) return true;
    cpu_relax();
    if ((i & 63) == 0 && std::chrono::steady_clock::now() - t0 > kSpin) return false;
  }
}

class Pool {
 public:
  ~Pool() { stop(); }

  int threads() {
    std::lock_guard<std::mutex> lock(run_mutex_);
    return threads_;
  }

  void resize(int n) {
    std::lock_guard<std::mutex> lock(run_mutex_);  // waits for a running job
    stop();
    threads_ = n;
    start();
  }

  void run(size_t n, size_t grain, const std::function<void(size_t, size_t)>& fn) {
    if (n == 0) return;
    grain = std::max<size_t>(grain, 1);
    std::unique_lock<std::mutex> run_lock(run_mutex_, std::defer_lock);
    if (!tls_in_parallel && run_lock.try_lock()) {
      after_fork();
    } else {
      fn(0, n);
      return;
    }
    if (n <= grain || threads_ <= 1) {
      fn(0, n);
      return;
    }
    const size_t chunks = std::min((n + grain - 1) / grain, static_cast<size_t>(threads_) * 4);
    fn_ = &fn;
    n_ = n;
    chunk_ = (n + chunks - 1) / chunks;
    next_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    // As many workers join as there are chunks beyond the caller's first: a 4-chunk job on
    // a 16-thread pool wakes 3 workers, and the other 12 neither run nor touch the mutex.
    seats_.store(static_cast<int>(std::min(chunks, static_cast<size_t>(threads_)) - 1), std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      open_.store(true);  // seq_cst: publishes the fields above to a worker that sees it
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    work();
    // Every chunk has been taken: close the job, then wait only for the workers that joined
    // it (a worker joins by counting itself in active_ and then seeing open_; with both
    // seq_cst, a worker that saw the job open is counted before the caller reads active_).
    // A worker that wakes up late finds the job closed and touches nothing of it.
    open_.store(false);
    if (!spin_until([&] { return active_.load() == 0; })) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [&] { return active_.load() == 0; });
    }
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  // Workers do not survive fork(): a child process starts its own (the parent's thread
  // objects are left alone, as they name threads of another process).
  void after_fork() {
#ifdef TQ_HAVE_GETPID
    if (getpid() == pid_) return;
    new std::vector<std::thread>(std::move(workers_));  // intentionally leaked
    workers_.clear();
    start();
#endif
  }
  void start() {
#ifdef TQ_HAVE_GETPID
    pid_ = getpid();
#endif
    stopping_.store(false);
    // A worker starts from the generation current now, so a job posted before it first
    // locks the mutex is not missed.
    uint64_t g;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      g = generation_;
    }
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this, g] { loop(g); });
  }
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_.store(true);
      generation_.fetch_add(1);  // spinning workers see it at once
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  // Takes chunks until none is left.
  void work() {
    tls_in_parallel = true;
    for (;;) {
      const size_t b = next_.fetch_add(chunk_);
      if (b >= n_) break;
      try {
        (*fn_)(b, std::min(n_, b + chunk_));
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
    }
    tls_in_parallel = false;
  }

  // One of the job's seats (false when all are taken or there are none).
  bool take_seat() {
    int s = seats_.load(std::memory_order_relaxed);
    while (s > 0)
      if (seats_.compare_exchange_weak(s, s - 1, std::memory_order_relaxed)) return true;
    return false;
  }

  void loop(uint64_t seen) {
    for (;;) {
      // A new job (or stop(), which waits for this spin at most kSpin) is seen while
      // spinning; past kSpin the worker sleeps until the next job is posted.
      if (!spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; })) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_.load() || generation_.load() != seen; });
      }
      if (stopping_.load()) return;
      seen = generation_.load(std::memory_order_acquire);
      if (!take_seat()) continue;
      active_.fetch_add(1);
      if (open_.load()) work();
      if (active_.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);  // the caller may be between its check and wait
        done_.notify_one();
      }
    }
  }

  std::mutex run_mutex_;  // one parallel_for (or resize) at a time
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  int threads_ = 1;
  std::atomic<bool> stopping_{false};        // set under mutex_; also read while spinning
  std::atomic<uint64_t> generation_{0};      // bumped under mutex_ per job; read while spinning
  // The open job: written by its caller before open_ is set, read by workers that joined it.
  const std::function<void(size_t, size_t)>* fn_ = nullptr;
  size_t n_ = 0, chunk_ = 1;
  std::atomic<int> seats_{0};                // workers that may still join the open job
  std::atomic<size_t> active_{0};            // workers that joined (or are checking open_)
  std::atomic<bool> open_{false};            // chunks may still be untaken
  std::atomic<size_t> next_{0};
  std::exception_ptr error_;
#ifdef TQ_HAVE_GETPID
  pid_t pid_ = 0;
#endif

 public:
  Pool() : threads_(default_threads()) { start(); }
};

Pool& pool() {
  static Pool p;
  return p;
}

}  // namespace

int get_num_threads() { return pool().threads(); }

void set_num_threads(int n) {
  TQ_CHECK(n >= 0 && n <= 1024, InvalidArgument, "num_threads must be in [0, 1024] (0 = default), got ", n);
  pool().resize(n == 0 ? default_threads() : n);
}

void parallel_for(size_t n, size_t grain, const std::function<void(size_t, size_t)>& fn) {
  pool().run(n, grain, fn);
}

}  // namespace turboquant
