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
// run(parts, threads, fn) runs fn(0..parts-1) on the caller and up to threads - 1 workers (<= 255)
// and returns when all are done. Parts are claimed from a shared counter: on a loaded box a
// worker that is not running claims nothing and the caller does the work (a fixed split made the
// caller spin-wait for a descheduled worker: `make demo` beside a test run decoded at 2 tok/s). One run at a time: a caller that finds the pool busy (another Python thread) gets false
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

  // fn(0..parts-1) on the caller and up to threads - 1 workers; parts are claimed one at a time
  // from a shared counter, so a worker the OS has not scheduled yet just claims none (the caller
  // does its parts) and the caller only ever waits for parts already running
  bool run(int parts, int threads, const std::function<void(int)>& fn) {
    if (parts <= 1 || threads <= 1) {
      for (int i = 0; i < parts; ++i) fn(i);
      return true;
    }
    if (threads - 1 > kMaxWorkers || parts > kMaxParts) return false;
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    grow(threads - 1);
    fn_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    const uint32_t ep = ++count_;
    // one word says which run, how many parts and the next unclaimed one, so a claim is checked
    // against its own run's bound: with the bound in a separate atomic, a worker finishing the last
    // run's final part could read this run's larger count before seeing this word, claim a part
    // that was never issued (calling the last run's fn, now gone) and bump done_ for this run,
    // which then returned with a part still running or waited forever (done_ past parts)
    work_.store(pack(ep, static_cast<uint32_t>(parts), 0), std::memory_order_seq_cst);
    epoch_.store(ep, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lk(mu_); }
      cv_.notify_all();
    }
    claim(ep);
    for (unsigned spins = 1; done_.load(std::memory_order_acquire) != parts; ++spins) {
      cpu_relax();
      if ((spins & 1023u) == 0) std::this_thread::yield();
    }
    return true;
  }

 private:
  static constexpr int kMaxParts = 0xFFFF;
  // work_ = epoch << 32 | parts << 16 | next unclaimed part
  static uint64_t pack(uint32_t ep, uint32_t parts, uint32_t next) {
    return static_cast<uint64_t>(ep) << 32 | static_cast<uint64_t>(parts) << 16 | next;
  }

  void claim(uint32_t ep) {
    uint64_t w = work_.load(std::memory_order_acquire);
    for (;;) {
      if (static_cast<uint32_t>(w >> 32) != ep) return;
      const uint32_t i = static_cast<uint32_t>(w & 0xFFFF), parts = static_cast<uint32_t>(w >> 16) & 0xFFFF;
      if (i >= parts) return;
      // acquire: fn_ and done_'s reset, written before this run's word, are seen
      if (!work_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      (*fn_)(static_cast<int>(i));   // fn_ is this epoch's: the run can't end with part i unclaimed
      done_.fetch_add(1, std::memory_order_release);
      w = work_.load(std::memory_order_acquire);
    }
  }

  void grow(int workers) {
    while (static_cast<int>(threads_) < workers) {
      ++threads_;
      std::thread(&Pool::worker, this, epoch_.load(std::memory_order_seq_cst)).detach();
    }
  }

  void worker(uint32_t seen) {
    for (;;) {
      uint32_t e;
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
      claim(e);
    }
  }

  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint32_t count_ = 0;                       // epochs issued (the caller's, under run_mu_)
  std::atomic<uint32_t> epoch_{0};
  std::atomic<uint64_t> work_{0};
  std::atomic<int> done_{0}, sleepers_{0};
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
