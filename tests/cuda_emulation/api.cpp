// The C entry points the emulation tests call through ctypes: define a fake device, ask the real
// planner for a plan on it, and run the real launch code (elman_launch.cu, compiled into this
// library with the emulation) on host buffers.
#include <cstdint>
#include <cstring>
#include <vector>

#include "../../csrc/cuda/elman_launch.h"
#include "emulated_device.h"

using namespace rnn_ext;

namespace {

// The fields of a plan, in the order the Python side reads them.
constexpr int kPlanFields = 11;

void write_plan(const gpu::RecurrencePlan& plan, int64_t* out) {
  const int64_t fields[kPlanFields] = {static_cast<int64_t>(plan.regime),
                                       plan.batch_tile,
                                       plan.slice_width,
                                       plan.slices,
                                       plan.rows_per_group,
                                       plan.groups,
                                       plan.k_split,
                                       plan.threads,
                                       plan.shared_bytes,
                                       plan.launch_directions,
                                       plan.rejected == nullptr ? 0 : 1};
  std::memcpy(out, fields, sizeof(fields));
}

void copy_text(const char* text, char* out, int capacity) {
  if (out == nullptr || capacity <= 0) return;
  std::strncpy(out, text == nullptr ? "" : text, static_cast<size_t>(capacity - 1));
  out[capacity - 1] = '\0';
}

gpu::RecurrenceProblem make_problem(int scalar_type, int relu, int backward, int64_t steps,
                                    int64_t batch, int64_t hidden, int64_t directions) {
  gpu::RecurrenceProblem problem;
  problem.scalar_type = static_cast<gpu::ScalarType>(scalar_type);
  problem.activation = relu ? Activation::Relu : Activation::Tanh;
  problem.backward = backward != 0;
  problem.steps = steps;
  problem.batch = batch;
  problem.hidden = hidden;
  problem.directions = directions;
  return problem;
}

}  // namespace

extern "C" {

int emu_define_device(int index, int sm_count, int64_t shared_per_block_optin,
                      int64_t shared_per_sm, int cooperative_launch) {
  cuda_emulation::EmulatedDevice device;
  device.sm_count = sm_count;
  device.shared_memory_per_block_optin = shared_per_block_optin;
  device.shared_memory_per_sm = shared_per_sm;
  device.cooperative_launch = cooperative_launch != 0;
  cuda_emulation::define_device(index, device);
  return cudaSetDevice(index);
}

int emu_plan_fields() { return kPlanFields; }

// The plan the CUDA path would pick on the current emulated device.
int emu_plan(int scalar_type, int64_t steps, int64_t batch, int64_t hidden, int64_t directions,
             int regime, int max_slice_width, int64_t* plan_out, char* rejected_out,
             int rejected_capacity) {
  gpu::DeviceLimits limits;
  const cudaError_t error = gpu::current_device_limits(&limits);
  if (error != cudaSuccess) return error;
  const gpu::RecurrenceProblem problem =
      make_problem(scalar_type, 0, 0, steps, batch, hidden, directions);
  gpu::CudaOptions options;
  options.regime = static_cast<gpu::Regime>(regime);
  options.max_slice_width = max_slice_width;
  const gpu::RecurrencePlan plan = gpu::plan_on_device(problem, limits, options);
  write_plan(plan, plan_out);
  copy_text(plan.rejected, rejected_out, rejected_capacity);
  return 0;
}

// One persistent recurrence (forward or backward), planned and launched as the CUDA glue does.
// Returns a cudaError_t, or -1 when the plan was rejected or is not a persistent regime.
int emu_run_recurrence(int scalar_type, int relu, int backward, int64_t steps, int64_t batch,
                       int64_t hidden, int64_t directions, const int64_t* batch_sizes,
                       const int64_t* step_offsets, const void* weight_hh0, const void* weight_hh1,
                       const void* initial, void* final_state, void* sequence,
                       const void* grad_output, const void* output, int regime, int max_slice_width,
                       int64_t* plan_out) {
  gpu::DeviceLimits limits;
  cudaError_t error = gpu::current_device_limits(&limits);
  if (error != cudaSuccess) return error;
  gpu::RecurrenceProblem problem =
      make_problem(scalar_type, relu, backward, steps, batch, hidden, directions);
  problem.batch_sizes = batch_sizes;
  problem.step_offsets = step_offsets;
  problem.weight_hh[0] = weight_hh0;
  problem.weight_hh[1] = weight_hh1;
  problem.initial = initial;
  problem.final_state = final_state;
  problem.sequence = sequence;
  problem.grad_output = grad_output;
  problem.output = output;
  gpu::CudaOptions options;
  options.regime = static_cast<gpu::Regime>(regime);
  options.max_slice_width = max_slice_width;
  const gpu::RecurrencePlan plan = gpu::plan_on_device(problem, limits, options);
  write_plan(plan, plan_out);
  if (plan.rejected != nullptr || plan.regime == gpu::Regime::StepGemm) return -1;
  // The exchange starts as all-ones bytes (NaN), so a read of a state nobody wrote shows.
  std::vector<unsigned char> exchange;
  if (plan.regime == gpu::Regime::Cooperative) {
    exchange.assign(static_cast<size_t>(gpu::exchange_bytes(problem)), 0xff);
    problem.exchange = exchange.data();
  }
  for (int64_t first = 0; first < directions; first += plan.launch_directions) {
    error = gpu::launch_recurrence(problem, plan, limits, static_cast<int>(first), nullptr);
    if (error != cudaSuccess) return error;
  }
  return 0;
}

int emu_step_activation(int scalar_type, int relu, void* sequence, int64_t row_offset, int64_t rows,
                        int64_t hidden, int64_t directions, int64_t direction, void* final_state,
                        int64_t first_final_row) {
  gpu::StepActivation step;
  step.scalar_type = static_cast<gpu::ScalarType>(scalar_type);
  step.activation = relu ? Activation::Relu : Activation::Tanh;
  step.sequence = sequence;
  step.row_offset = row_offset;
  step.rows = rows;
  step.hidden = hidden;
  step.directions = directions;
  step.direction = direction;
  step.final_state = final_state;
  step.first_final_row = first_final_row;
  return gpu::launch_step_activation(step, nullptr);
}

int emu_step_gradient(int scalar_type, int relu, void* grad_pre, const void* grad_output,
                      const void* output, int64_t row_offset, int64_t rows, int64_t hidden,
                      int64_t directions, int64_t direction, const void* carry,
                      const void* grad_final, int64_t first_final_row) {
  gpu::StepGradient step;
  step.scalar_type = static_cast<gpu::ScalarType>(scalar_type);
  step.activation = relu ? Activation::Relu : Activation::Tanh;
  step.grad_pre = grad_pre;
  step.grad_output = grad_output;
  step.output = output;
  step.row_offset = row_offset;
  step.rows = rows;
  step.hidden = hidden;
  step.directions = directions;
  step.direction = direction;
  step.carry = carry;
  step.grad_final = grad_final;
  step.first_final_row = first_final_row;
  return gpu::launch_step_gradient(step, nullptr);
}

int emu_gather_previous_states(int scalar_type, void* previous, const void* output, const void* hx,
                               const int64_t* batch_sizes, const int64_t* step_offsets,
                               int64_t steps, int64_t batch, int64_t hidden, int64_t directions) {
  gpu::PreviousStates gather;
  gather.scalar_type = static_cast<gpu::ScalarType>(scalar_type);
  gather.previous = previous;
  gather.output = output;
  gather.hx = hx;
  gather.batch_sizes = batch_sizes;
  gather.step_offsets = step_offsets;
  gather.steps = steps;
  gather.batch = batch;
  gather.hidden = hidden;
  gather.directions = directions;
  return gpu::launch_gather_previous_states(gather, nullptr);
}

}  // extern "C"
