// Host side of the CUDA kernels: the per-device limits, kernel lookup, the shared-memory opt-in,
// the occupancy answer the planner needs, and the launches. No torch headers. The kernels
// themselves are in elman_kernels.cuh; the planner's arithmetic is in recurrence_plan.cpp.
#include "elman_launch.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "elman_kernels.cuh"

namespace rnn_ext {
namespace gpu {
namespace {

// Every kernel takes one argument struct by value, so one typed wrapper launches them all. A host
// emulation (RNN_EXT_CUDA_EMULATION) runs the kernel function itself, one host thread per CUDA
// thread.
template <typename Args>
cudaError_t launch_kernel(void (*kernel)(Args), dim3 grid, dim3 block, int64_t shared_bytes,
                          bool cooperative, cudaStream_t stream, Args args) {
#if defined(RNN_EXT_CUDA_EMULATION)
  (void)stream;
  return cuda_emulation::launch(kernel, grid, block, static_cast<size_t>(shared_bytes), cooperative,
                                args);
#else
  void* params[] = {&args};
  const void* entry = reinterpret_cast<const void*>(kernel);
  if (cooperative) {
    return cudaLaunchCooperativeKernel(entry, grid, block, params,
                                       static_cast<size_t>(shared_bytes), stream);
  }
  return cudaLaunchKernel(entry, grid, block, params, static_cast<size_t>(shared_bytes), stream);
#endif
}

using RecurrenceKernel = void (*)(RecurrenceArgs);

template <typename T>
RecurrenceKernel recurrence_kernel_of(int batch_tile) {
  switch (batch_tile) {
    case 1:
      return &elman_recurrence_kernel<T, 1>;
    case 2:
      return &elman_recurrence_kernel<T, 2>;
    case 4:
      return &elman_recurrence_kernel<T, 4>;
    default:
      return &elman_recurrence_kernel<T, 8>;
  }
}

RecurrenceKernel recurrence_kernel(ScalarType type, int batch_tile) {
  switch (type) {
    case ScalarType::Float64:
      return recurrence_kernel_of<double>(batch_tile);
    case ScalarType::Float16:
      return recurrence_kernel_of<__half>(batch_tile);
    case ScalarType::BFloat16:
      return recurrence_kernel_of<__nv_bfloat16>(batch_tile);
    default:
      return recurrence_kernel_of<float>(batch_tile);
  }
}

// A block may use more than 48 KB of dynamic shared memory only after the kernel's limit is raised,
// once per kernel and device. Raised straight to the device's opt-in maximum, so a later, larger
// plan needs no second call.
cudaError_t allow_shared_memory(RecurrenceKernel kernel, const DeviceLimits& limits,
                                int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  static std::mutex mutex;
  static std::map<std::pair<RecurrenceKernel, int>, bool> raised;
  std::lock_guard<std::mutex> lock(mutex);
  bool& done = raised[{kernel, limits.device}];
  if (done) return cudaSuccess;
  const cudaError_t error = cudaFuncSetAttribute(
      reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
      static_cast<int>(limits.shared_memory_per_block_optin));
  done = error == cudaSuccess;
  return error;
}

// The planner reports through `rejected`, so a failed query answers 0 blocks and clears the
// runtime's error rather than leaving it for the next launch check.
int resident_blocks(const DeviceLimits& limits, ScalarType type, int batch_tile, int threads,
                    int64_t shared_bytes) {
  const RecurrenceKernel kernel = recurrence_kernel(type, batch_tile);
  if (allow_shared_memory(kernel, limits, shared_bytes) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  int blocks_per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &blocks_per_sm, reinterpret_cast<const void*>(kernel), threads,
          static_cast<size_t>(shared_bytes)) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return blocks_per_sm;
}

cudaError_t read_device_limits(int device, DeviceLimits* limits) {
  limits->device = device;
  int sm_count = 0;
  int optin = 0;
  int cooperative = 0;
  cudaError_t error = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  if (error == cudaSuccess)
    error = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (error == cudaSuccess)
    error = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
  limits->sm_count = sm_count;
  limits->shared_memory_per_block_optin = optin;
  limits->cooperative_launch = cooperative != 0;
  return error;
}

template <typename Launch>
cudaError_t dispatch(ScalarType type, Launch&& launch) {
  switch (type) {
    case ScalarType::Float64:
      return launch(double());
    case ScalarType::Float16:
      return launch(__half());
    case ScalarType::BFloat16:
      return launch(__nv_bfloat16());
    default:
      return launch(float());
  }
}

}  // namespace

cudaError_t current_device_limits(DeviceLimits* limits) {
  int device = 0;
  const cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  static std::mutex mutex;
  static std::map<int, DeviceLimits> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(device);
  if (found != cache.end()) {
    *limits = found->second;
    return cudaSuccess;
  }
  DeviceLimits read;
  const cudaError_t read_error = read_device_limits(device, &read);
  if (read_error != cudaSuccess) return read_error;
  cache.emplace(device, read);
  *limits = read;
  return cudaSuccess;
}

RecurrencePlan plan_on_device(const RecurrenceProblem& problem, const DeviceLimits& limits,
                              const CudaOptions& options) {
  return plan_recurrence(
      problem, limits, options,
      [&limits](ScalarType type, int batch_tile, int threads, int64_t shared_bytes) {
        return resident_blocks(limits, type, batch_tile, threads, shared_bytes);
      });
}

cudaError_t launch_recurrence(const RecurrenceProblem& problem, const RecurrencePlan& plan,
                              const DeviceLimits& limits, int first_direction,
                              cudaStream_t stream) {
  RecurrenceArgs args;
  args.problem = problem;
  args.first_direction = first_direction;
  args.slice_width = plan.slice_width;
  args.slices = plan.slices;
  args.rows_per_group = plan.rows_per_group;
  args.k_split = plan.k_split;
  args.cooperative = plan.regime == Regime::Cooperative;
  const RecurrenceKernel kernel = recurrence_kernel(problem.scalar_type, plan.batch_tile);
  const cudaError_t error = allow_shared_memory(kernel, limits, plan.shared_bytes);
  if (error != cudaSuccess) return error;
  const dim3 grid(static_cast<unsigned>(plan.slices * plan.groups),
                  static_cast<unsigned>(plan.launch_directions));
  const dim3 block(static_cast<unsigned>(plan.threads));
  return launch_kernel(kernel, grid, block, plan.shared_bytes, args.cooperative, stream, args);
}

cudaError_t launch_step_activation(const StepActivation& step, cudaStream_t stream) {
  const dim3 grid(pointwise_blocks(step.rows * step.hidden));
  return dispatch(step.scalar_type, [&](auto tag) {
    using T = decltype(tag);
    return launch_kernel(&step_activation_kernel<T>, grid, dim3(kPointwiseThreads), 0, false,
                         stream, step);
  });
}

cudaError_t launch_step_gradient(const StepGradient& step, cudaStream_t stream) {
  const dim3 grid(pointwise_blocks(step.rows * step.hidden));
  return dispatch(step.scalar_type, [&](auto tag) {
    using T = decltype(tag);
    return launch_kernel(&step_gradient_kernel<T>, grid, dim3(kPointwiseThreads), 0, false, stream,
                         step);
  });
}

cudaError_t launch_gather_previous_states(const PreviousStates& gather, cudaStream_t stream) {
  const dim3 grid(
      pointwise_blocks(gather.batch * gather.directions * gather.hidden),
      static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(gather.steps, 1), 65535)));
  return dispatch(gather.scalar_type, [&](auto tag) {
    using T = decltype(tag);
    return launch_kernel(&gather_previous_states_kernel<T>, grid, dim3(kPointwiseThreads), 0, false,
                         stream, gather);
  });
}

}  // namespace gpu
}  // namespace rnn_ext
