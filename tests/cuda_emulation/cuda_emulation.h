// Host emulation of CUDA's execution model for the rnn_ext kernels: g++ compiles the unmodified
// kernel source with this header forced in first (-include), and every CUDA thread of a launch runs
// as one OS thread. __syncthreads() is a barrier over the block's threads, a cooperative grid's
// sync() a barrier over all of its threads (all blocks live at once, as a cooperative launch
// guarantees), and each block gets its own dynamic shared memory. Those barriers are the only
// synchronisation between emulated threads, so under ThreadSanitizer a missing barrier in a kernel
// is a data race.
#pragma once

// Before the CUDA headers, which keep a qualifier that is already defined; on the host they mean
// nothing.
#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)
#define RNN_EXT_CUDA_EMULATION 1

#include <cuda_runtime.h>

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>

using std::max;
using std::min;

// The built-in index variables, per emulated thread.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace cuda_emulation {

// A reusable barrier that blocks on a condition variable, without spinning: hundreds of emulated
// threads share a few cores. (std::barrier works too, and TSan accepts it; a mutex is the plainest
// happens-before edge: everything before any thread's arrival happens before every thread's
// release.)
class Barrier {
 public:
  explicit Barrier(size_t count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const size_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      lock.unlock();
      released_.notify_all();
      return;
    }
    released_.wait(lock, [&] { return generation_ != generation; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  const size_t count_;
  size_t arrived_ = 0;
  size_t generation_ = 0;
};

// One launch as the kernel body sees it, set for each emulated thread before the kernel runs.
struct ThreadContext {
  Barrier* block_barrier = nullptr;
  Barrier* grid_barrier = nullptr;         // null outside a cooperative launch
  unsigned char* shared_memory = nullptr;  // the block's dynamic shared memory
};

inline thread_local ThreadContext current_thread;

void grid_sync();
unsigned char* dynamic_shared_memory();

// The part of a launch that does not depend on the kernel's argument type: checks the launch
// against the emulated device (as the runtime would), then runs `run_thread(context)` once per
// emulated thread with the index variables set. Returns the launch's error.
using ThreadBody = void (*)(const void* kernel, const void* args);
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes,
                     bool cooperative, ThreadBody body, const void* args);

template <typename Args>
cudaError_t launch(void (*kernel)(Args), dim3 grid, dim3 block, size_t shared_bytes,
                   bool cooperative, const Args& args) {
  const ThreadBody body = [](const void* entry, const void* arguments) {
    // Each emulated thread gets its own copy of the arguments, as each CUDA thread reads them from
    // the constant bank.
    reinterpret_cast<void (*)(Args)>(const_cast<void*>(entry))(
        *static_cast<const Args*>(arguments));
  };
  return run_grid(reinterpret_cast<const void*>(kernel), grid, block, shared_bytes, cooperative,
                  body, &args);
}

}  // namespace cuda_emulation

inline void __syncthreads() { ::cuda_emulation::current_thread.block_barrier->arrive_and_wait(); }

// Loads that bypass L1 on the device: plain loads on the host.
template <typename T>
inline T __ldcg(const T* address) {
  return *address;
}

#define RNN_EXT_DYNAMIC_SHARED_MEMORY(name) \
  unsigned char* const name = ::cuda_emulation::dynamic_shared_memory()
