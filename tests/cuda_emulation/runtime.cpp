// The emulated CUDA runtime behind cuda_emulation.h: a table of fake devices (the limits a test
// chooses), the runtime calls the launch code makes (device attributes, the shared-memory opt-in,
// the occupancy calculator, the last error), and the launch itself, one std::thread per CUDA
// thread.
#include "cuda_emulation.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "emulated_device.h"

namespace cuda_emulation {
namespace {

// A non-cooperative grid runs in waves of blocks of at most this many threads (its blocks are
// independent, so any order is a valid schedule); a cooperative grid always runs whole.
constexpr size_t kWaveThreads = 1024;
// The occupancy model charges every thread this many registers: the most the recurrence kernels
// use under their __launch_bounds__(512, 1) (ptxas reports 80-128 for sm_90).
constexpr int kRegistersPerThread = 128;
// Shared memory the driver reserves per block (1 KB on sm_80 and later).
constexpr int64_t kReservedSharedPerBlock = 1024;

std::mutex table_mutex;
std::map<int, EmulatedDevice>& devices() {
  static std::map<int, EmulatedDevice> table{{0, EmulatedDevice{}}};
  return table;
}
std::atomic<int> current_device{0};
// Per (kernel, device): the dynamic shared memory a launch may use (cudaFuncSetAttribute).
std::map<std::pair<const void*, int>, int64_t>& shared_limits() {
  static std::map<std::pair<const void*, int>, int64_t> table;
  return table;
}
thread_local cudaError_t last_error = cudaSuccess;

cudaError_t fail(cudaError_t error) {
  last_error = error;
  return error;
}

bool device_of(int index, EmulatedDevice* device) {
  std::lock_guard<std::mutex> lock(table_mutex);
  const auto found = devices().find(index);
  if (found == devices().end()) return false;
  *device = found->second;
  return true;
}

int64_t shared_limit(const void* kernel, int device) {
  std::lock_guard<std::mutex> lock(table_mutex);
  const auto found = shared_limits().find({kernel, device});
  return found == shared_limits().end() ? 48 * 1024 : found->second;
}

int occupancy(const EmulatedDevice& device, int64_t kernel_shared_limit, int threads,
              size_t shared_bytes) {
  if (threads <= 0 || threads > device.max_threads_per_block) return 0;
  if (static_cast<int64_t>(shared_bytes) > kernel_shared_limit) return 0;
  const int64_t by_threads = device.max_threads_per_sm / threads;
  const int64_t by_registers = device.registers_per_sm / (int64_t(threads) * kRegistersPerThread);
  const int64_t by_shared =
      device.shared_memory_per_sm / (static_cast<int64_t>(shared_bytes) + kReservedSharedPerBlock);
  return static_cast<int>(
      std::min({by_threads, by_registers, by_shared, int64_t(device.max_blocks_per_sm)}));
}

struct Block {
  dim3 index;
  std::vector<unsigned char> storage;
  unsigned char* shared = nullptr;
  std::unique_ptr<Barrier> barrier;
};

}  // namespace

void define_device(int index, const EmulatedDevice& device) {
  std::lock_guard<std::mutex> lock(table_mutex);
  devices()[index] = device;
}

void grid_sync() {
  if (current_thread.grid_barrier == nullptr) {
    std::fprintf(stderr, "cuda_emulation: grid sync() outside a cooperative launch\n");
    std::abort();
  }
  current_thread.grid_barrier->arrive_and_wait();
}

unsigned char* dynamic_shared_memory() { return current_thread.shared_memory; }

cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes,
                     bool cooperative, ThreadBody body, const void* args) {
  const int device_index = current_device.load();
  EmulatedDevice device;
  if (!device_of(device_index, &device)) return fail(cudaErrorInvalidDevice);
  const size_t block_threads = size_t(block.x) * block.y * block.z;
  const size_t blocks = size_t(grid.x) * grid.y * grid.z;
  if (block_threads == 0 || blocks == 0 || block_threads > size_t(device.max_threads_per_block)) {
    return fail(cudaErrorInvalidConfiguration);
  }
  const int64_t kernel_shared_limit = shared_limit(kernel, device_index);
  if (static_cast<int64_t>(shared_bytes) > kernel_shared_limit) return fail(cudaErrorInvalidValue);
  if (cooperative) {
    if (!device.cooperative_launch) return fail(cudaErrorNotSupported);
    const int per_sm =
        occupancy(device, kernel_shared_limit, static_cast<int>(block_threads), shared_bytes);
    if (blocks > size_t(per_sm) * device.sm_count) return fail(cudaErrorCooperativeLaunchTooLarge);
  }

  std::vector<dim3> order;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) order.push_back(dim3(x, y, z));
    }
  }
  const size_t wave_blocks =
      cooperative ? blocks : std::max<size_t>(1, kWaveThreads / block_threads);
  for (size_t first = 0; first < blocks; first += wave_blocks) {
    const size_t count = std::min(wave_blocks, blocks - first);
    std::unique_ptr<Barrier> grid_barrier;
    if (cooperative) grid_barrier = std::make_unique<Barrier>(count * block_threads);
    std::vector<Block> wave(count);
    for (size_t i = 0; i < count; ++i) {
      Block& b = wave[i];
      b.index = order[first + i];
      // Shared memory starts as all-ones bytes (NaN in every floating type), so a read before the
      // kernel's own write shows up in the results.
      b.storage.assign(shared_bytes + 16, 0xff);
      const uintptr_t base = reinterpret_cast<uintptr_t>(b.storage.data());
      b.shared = b.storage.data() + ((16 - base % 16) % 16);
      b.barrier = std::make_unique<Barrier>(block_threads);
    }
    std::vector<std::thread> threads;
    threads.reserve(count * block_threads);
    for (Block& b : wave) {
      for (unsigned z = 0; z < block.z; ++z) {
        for (unsigned y = 0; y < block.y; ++y) {
          for (unsigned x = 0; x < block.x; ++x) {
            threads.emplace_back(
                [&, x, y, z, block_index = b.index, shared = b.shared, barrier = b.barrier.get()] {
                  threadIdx = uint3{x, y, z};
                  blockIdx = uint3{block_index.x, block_index.y, block_index.z};
                  blockDim = block;
                  gridDim = grid;
                  current_thread.block_barrier = barrier;
                  current_thread.grid_barrier = grid_barrier.get();
                  current_thread.shared_memory = shared;
                  body(kernel, args);
                });
          }
        }
      }
    }
    for (std::thread& thread : threads) thread.join();
  }
  return cudaSuccess;
}

}  // namespace cuda_emulation

using cuda_emulation::current_device;
using cuda_emulation::EmulatedDevice;
using cuda_emulation::fail;

// The runtime calls the launch code makes, with the C signatures of cuda_runtime_api.h (no
// libcudart is linked).
extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = current_device.load();
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  EmulatedDevice ignored;
  if (!cuda_emulation::device_of(device, &ignored)) return fail(cudaErrorInvalidDevice);
  current_device.store(device);
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attribute, int device) {
  EmulatedDevice d;
  if (!cuda_emulation::device_of(device, &d)) return fail(cudaErrorInvalidDevice);
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount:
      *value = d.sm_count;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(d.shared_memory_per_block_optin);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = static_cast<int>(d.shared_memory_per_sm);
      return cudaSuccess;
    case cudaDevAttrCooperativeLaunch:
      *value = d.cooperative_launch ? 1 : 0;
      return cudaSuccess;
    default:
      return fail(cudaErrorInvalidValue);
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attribute, int value) {
  const int device_index = current_device.load();
  EmulatedDevice d;
  if (!cuda_emulation::device_of(device_index, &d)) return fail(cudaErrorInvalidDevice);
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return fail(cudaErrorInvalidValue);
  if (value < 0 || value > d.shared_memory_per_block_optin) return fail(cudaErrorInvalidValue);
  std::lock_guard<std::mutex> lock(cuda_emulation::table_mutex);
  cuda_emulation::shared_limits()[{func, device_index}] = value;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* func,
                                                          int block_size,
                                                          size_t dynamic_shared_bytes) {
  const int device_index = current_device.load();
  EmulatedDevice d;
  if (!cuda_emulation::device_of(device_index, &d)) return fail(cudaErrorInvalidDevice);
  *blocks = cuda_emulation::occupancy(d, cuda_emulation::shared_limit(func, device_index),
                                      block_size, dynamic_shared_bytes);
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t error = cuda_emulation::last_error;
  cuda_emulation::last_error = cudaSuccess;
  return error;
}

}  // extern "C"
