// A small thread pool of our own for the decode GEMVs (M <= gemv_max_m), included by lowbit_cpu.cpp.
//
// Why: a decode step makes ~4 kernel calls per block, each a few to a few hundred microseconds of
// work. Through at::parallel_for each call wakes torch's OpenMP pool; under OMP_WAIT_POLICY=PASSIVE
// (which the Makefile sets for a shared box) its workers sleep in the kernel between calls, and
// the wake costs ~50-80 us per call: on SmolLM2-135M that was most of a 20 ms token
// (BENCHMARKS.md, issue 18). Here the workers spin (with pause, yielding now and then) for up to
// LOWBIT_SPIN_US microseconds after their last task, then sleep on a condition variable; a new
// task wakes sleepers only when there are any. Default: on (1000 us, about the gap between two
// decode steps' calls) only under OMP_WAIT_POLICY=PASSIVE. Under libgomp's default or ACTIVE
// policy its own workers spin between the ATen ops around our calls, and two pools spinning on the
// same cores starved each other (SmolLM2 decode 129 -> 8 tok/s on 2 cores), while OpenMP's wakes are
// cheap there: so at::parallel_for. LOWBIT_SPIN_US=0 forces at::parallel_for, > 0 forces the pool.
//
// run(n, fn) runs fn(0) on the caller and fn(1..n-1) on workers 1..n-1 (n <= 256), and returns
// when all are done. One run at a time: a caller that finds the pool busy (another Python thread) gets false
// and falls back to at::parallel_for. A forked child starts with a fresh pool (its parent's
// threads do not exist there). The pool is never destroyed (its threads end with the process).
#pragma once
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lowbit_pool {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// 0: not used (at::parallel_for). Default: 1000 us when OMP_WAIT_POLICY is PASSIVE, else 0.
inline int64_t spin_ns() {
  static const int64_t ns = [] {
    const char* s = std::getenv("LOWBIT_SPIN_US");
    if (s != nullptr && *s != '\0') {
      const long us = std::strtol(s, nullptr, 10);
      return static_cast<int64_t>(us < 0 ? 0 : us) * 1000;
    }
    const char* w = std::getenv("OMP_WAIT_POLICY");
    const bool passive = w != nullptr && (w[0] == 'p' || w[0] == 'P');
    return passive ? int64_t(1000) * 1000 : int64_t(0);
  }();
  return ns;
}

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

class Pool {
 public:
  static constexpr int kMaxWorkers = 255;

  bool run(int n, const std::function<void(int)>& fn) {
    if (n <= 1) {
      fn(0);
      return true;
    }
    if (n - 1 > kMaxWorkers) return false;
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    grow(n - 1);
    fn_ = &fn;
    pending_.store(n - 1, std::memory_order_relaxed);
    // the epoch word carries the number of workers taking part, so a worker reads both in one
    // load (a late worker can't pair an old epoch with a newer run's count); publishes fn_ too
    const uint64_t e = epoch_.load(std::memory_order_relaxed);
    epoch_.store((((e >> 8) + 1) << 8) | static_cast<uint64_t>(n - 1), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lk(mu_); }
      cv_.notify_all();
    }
    fn(0);
    while (pending_.load(std::memory_order_acquire) != 0) cpu_relax();
    return true;
  }

 private:
  void grow(int workers) {
    while (static_cast<int>(threads_) < workers) {
      const int id = static_cast<int>(++threads_);
      std::thread(&Pool::worker, this, id, epoch_.load(std::memory_order_seq_cst)).detach();
    }
  }

  void worker(int id, uint64_t seen) {
    for (;;) {
      uint64_t e;
      int64_t t0 = now_ns();
      unsigned spins = 0;
      while ((e = epoch_.load(std::memory_order_acquire)) == seen) {
        cpu_relax();
        if ((++spins & 1023u) != 0) continue;
        std::this_thread::yield();   // let a loaded box run others between checks
        if (now_ns() - t0 < spin_ns()) continue;
        std::unique_lock<std::mutex> lk(mu_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        cv_.wait(lk, [&] { return epoch_.load(std::memory_order_seq_cst) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        t0 = now_ns();
      }
      seen = e;
      if (static_cast<uint64_t>(id) <= (e & 0xFF)) {
        (*fn_)(id);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> pending_{0}, sleepers_{0};
  std::atomic<unsigned> threads_{0};
  const std::function<void(int)>* fn_ = nullptr;
};

inline Pool*& pool_slot() {
  static Pool* p = [] {
    pthread_atfork(nullptr, nullptr, [] { pool_slot() = new Pool(); });
    return new Pool();
  }();
  return p;
}

inline Pool& pool() { return *pool_slot(); }

}  // namespace lowbit_pool
