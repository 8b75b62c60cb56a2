// The CPU backend's threading: one OpenMP team per phase of a layer (the pool torch's own
// at::parallel_for uses, sized by torch.set_num_threads), work split by partitions fixed by the
// shapes, and per-phase counters that show which threads did the work and how long it took.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <condition_variable>
#include <mutex>

namespace rnn_ext {
namespace cpu {

enum class Phase : int {
  InputProjection = 0,
  ForwardRecurrence,
  BackwardRecurrence,
  InputGradient,
  WeightGradient,
  Count
};
constexpr int kPhaseCount = static_cast<int>(Phase::Count);

const char* phase_name(Phase phase);

// Per phase since the last reset: calls, seconds of wall time, and a bit per thread (by its number
// in the team) that did part of the phase's work. Read by the threading tests, through _C.
struct PhaseCounters {
  std::atomic<uint64_t> calls{0};
  std::atomic<uint64_t> nanoseconds{0};
  std::atomic<uint64_t> thread_mask{0};
};
PhaseCounters& phase_counters(Phase phase);
void reset_phase_counters();

// Times one phase call (scope) into its counters.
class PhaseTimer {
 public:
  explicit PhaseTimer(Phase phase)
      : counters_(phase_counters(phase)), start_(std::chrono::steady_clock::now()) {}
  ~PhaseTimer() {
    const auto elapsed = std::chrono::steady_clock::now() - start_;
    counters_.calls.fetch_add(1, std::memory_order_relaxed);
    counters_.nanoseconds.fetch_add(
        std::chrono::duration_cast<std::chrono::nanoseconds>(elapsed).count(),
        std::memory_order_relaxed);
  }
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;

 private:
  PhaseCounters& counters_;
  std::chrono::steady_clock::time_point start_;
};

inline void mark_worker(Phase phase, int thread) {
  phase_counters(phase).thread_mask.fetch_or(uint64_t(1) << std::min(thread, 63),
                                             std::memory_order_relaxed);
}

// Threads a phase may use: torch's intra-op thread count, or 1 inside someone's parallel region
// (nested teams would oversubscribe the cores).
inline int available_threads() {
  if (at::in_parallel_region()) return 1;
  return std::max(1, at::get_num_threads());
}

// One turn of a spin-wait loop: tells the core it is spinning (x86 pause, AArch64 yield), which
// frees resources for the sibling hyperthread and avoids a memory-order flush on exit.
inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// A barrier for the threads of one team: an arrival counter and a generation number, each on its
// own cache line. The last thread to arrive resets the counter and publishes the next generation
// (release); the others spin on the generation line (acquire) with a pause in the loop, so a
// barrier costs about one cache-line round trip. A thread still waiting after kSpins turns sleeps
// on a condition variable instead, which the last thread signals only when someone sleeps: on a
// machine with more runnable threads than cores, spinning (or yielding, which hands the core to
// another process for a whole time slice) would hold up the teammate it waits for. Every thread
// of the team must call wait() the same number of times (as with an OpenMP barrier); none throws.
class SpinBarrier {
 public:
  void set_size(int size) { size_.store(size, std::memory_order_relaxed); }

  void wait() {
    // The generation cannot move on before this thread arrives, so this is the current one.
    const uint32_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 ==
        size_.load(std::memory_order_relaxed)) {
      arrived_.store(0, std::memory_order_relaxed);  // ordered before the store below
      // seq_cst with the load of sleepers_, against a waiter's increment and then load of the
      // generation: one of the two sides sees the other's store, so no waiter sleeps through.
      generation_.store(generation + 1, std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) {
        std::lock_guard<std::mutex> lock(mutex_);
        wake_.notify_all();
      }
      return;
    }
    for (int spins = 0; spins < kSpins; ++spins) {
      if (generation_.load(std::memory_order_acquire) != generation) return;
      spin_pause();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    wake_.wait(lock, [&] { return generation_.load(std::memory_order_seq_cst) != generation; });
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }

 private:
  // A pause takes 25-100 ns on recent x86 cores: about 1-3 ms of spinning, of the order of what
  // libgomp's own barrier spins before it sleeps. Far longer than two threads of one step drift
  // apart, and long enough that a busy machine's scheduling hiccups (tens of microseconds) do not
  // send a waiter to the futex, whose wake-up costs more than a step of a mid-sized layer.
  static constexpr int kSpins = 1 << 15;

  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<uint32_t> generation_{0};
  alignas(64) std::atomic<int> size_{1};
  std::atomic<int> sleepers_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
};

// The barrier of the team the calling thread runs in (set by run_team), or null.
inline thread_local SpinBarrier* current_team_barrier = nullptr;

// Runs body(thread, team_size) on one team of torch's intra-op threads, or inline on the caller
// when `parallel` is false or only one thread is available. The body may call team_barrier();
// every thread of the team must reach each barrier. No num_threads clause, as in ATen's own
// parallel_for: the team size comes from torch.set_num_threads (omp_set_num_threads).
template <typename Body>
void run_team(bool parallel, const Body& body) {
  if (!parallel || available_threads() < 2) {
    body(0, 1);
    return;
  }
  // An exception must not leave an OpenMP region (the process would terminate): the first one is
  // kept and rethrown on the caller, as ATen's parallel_for does. Bodies that meet at
  // team_barrier() must not throw between barriers.
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  SpinBarrier barrier;
#pragma omp parallel
  {
    // Lets ATen code called by the body see that it runs inside a parallel region.
    at::internal::ThreadIdGuard thread_id(omp_get_thread_num());
    // The team's size is known only inside the region; every thread stores the same value before
    // its first wait().
    barrier.set_size(omp_get_num_threads());
    current_team_barrier = &barrier;
    try {
      body(omp_get_thread_num(), omp_get_num_threads());
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
    current_team_barrier = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

// Waits until every thread of the calling thread's team (run_team's) has reached this barrier: the
// team's SpinBarrier, or an OpenMP barrier outside run_team.
inline void team_barrier() {
  if (SpinBarrier* barrier = current_team_barrier) {
    barrier->wait();
  } else {
#pragma omp barrier
  }
}

// Part `part` of `parts` equal parts of [0, count) in units of `unit` (the last part takes the
// remainder): [begin, end).
inline std::array<int64_t, 2> split_range(int64_t count, int64_t unit, int64_t part,
                                          int64_t parts) {
  const int64_t units = (count + unit - 1) / unit;
  const int64_t begin = units * part / parts * unit;
  const int64_t end = units * (part + 1) / parts * unit;
  return {std::min(begin, count), std::min(end, count)};
}

}  // namespace cpu
}  // namespace rnn_ext
