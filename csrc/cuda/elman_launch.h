// Launching the CUDA kernels of one Elman layer on raw pointers and a cudaStream_t (no torch
// headers): the per-device limits, the plan for this device, and one entry point per kernel.
// elman_cuda.cpp adapts tensors to this.
#pragma once

#include <cuda_runtime_api.h>

#include "kernel_args.h"
#include "recurrence_plan.h"

namespace rnn_ext {
namespace gpu {

// The limits of the current device, read from the runtime once per device and cached.
cudaError_t current_device_limits(DeviceLimits* limits);

// plan_recurrence with this device's occupancy calculator (raising the kernel's shared-memory limit
// where the plan needs more than the default 48 KB).
RecurrencePlan plan_on_device(const RecurrenceProblem& problem, const DeviceLimits& limits,
                              const CudaOptions& options);

// One launch of the persistent recurrence for directions [first_direction, first_direction +
// plan.launch_directions) on the device `limits` describes. Returns the launch's error; the caller
// checks it.
cudaError_t launch_recurrence(const RecurrenceProblem& problem, const RecurrencePlan& plan,
                              const DeviceLimits& limits, int first_direction, cudaStream_t stream);

cudaError_t launch_step_activation(const StepActivation& step, cudaStream_t stream);
cudaError_t launch_step_gradient(const StepGradient& step, cudaStream_t stream);
cudaError_t launch_gather_previous_states(const PreviousStates& gather, cudaStream_t stream);

}  // namespace gpu
}  // namespace rnn_ext
