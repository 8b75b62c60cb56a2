// The C entry points the emulation tests call through ctypes: define a fake device, ask the real
// planner for a plan on it, and run whole layers forward and backward through the real CUDA glue
// (layer_glue.cpp) and launch code (elman_launch.cu), compiled into this library with the
// emulation, on host buffers. The glue's device work is bound here to the emulated launches and to
// plain CPU products that accumulate in double and round once to the storage type.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../csrc/cuda/elman_launch.h"
#include "../../csrc/cuda/layer_glue.h"
#include "emu_layer.h"
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

double load(const void* data, int64_t index, gpu::ScalarType type) {
  switch (type) {
    case gpu::ScalarType::Float64:
      return static_cast<const double*>(data)[index];
    case gpu::ScalarType::Float16:
      return __half2float(static_cast<const __half*>(data)[index]);
    case gpu::ScalarType::BFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(data)[index]);
    default:
      return static_cast<const float*>(data)[index];
  }
}

// Rounded once to the storage type (half types by way of float32, as a float32-accumulating GEMM
// rounds its result).
void store(void* data, int64_t index, gpu::ScalarType type, double value) {
  switch (type) {
    case gpu::ScalarType::Float64:
      static_cast<double*>(data)[index] = value;
      return;
    case gpu::ScalarType::Float16:
      static_cast<__half*>(data)[index] = __float2half_rn(static_cast<float>(value));
      return;
    case gpu::ScalarType::BFloat16:
      static_cast<__nv_bfloat16*>(data)[index] = __float2bfloat16_rn(static_cast<float>(value));
      return;
    default:
      static_cast<float*>(data)[index] = static_cast<float>(value);
  }
}

double element(const gpu::MatrixView& m, int64_t row, int64_t column, gpu::ScalarType type) {
  return load(m.data, m.transposed ? column * m.stride + row : row * m.stride + column, type);
}

void check_launch(cudaError_t error, const char* what) {
  if (error == cudaSuccess) error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": emulated launch failed with cudaError_t " +
                             std::to_string(static_cast<int>(error)));
  }
}

// The glue's device work on the host: emulated kernel launches on the current emulated device,
// products and sums in plain loops, workspaces filled with all-ones bytes (NaN in every floating
// type) so that a read of something nobody wrote shows in the results.
class EmulatedLayerDevice final : public gpu::LayerDevice {
 public:
  [[noreturn]] void fail(const std::string& message) override { throw std::runtime_error(message); }

  gpu::RecurrencePlan plan(const gpu::RecurrenceProblem& problem,
                           const gpu::CudaOptions& options) override {
    gpu::DeviceLimits limits;
    check_launch(gpu::current_device_limits(&limits), "device limits");
    last_plan = gpu::plan_on_device(problem, limits, options);
    return last_plan;
  }

  void launch_recurrence(const gpu::RecurrenceProblem& problem, const gpu::RecurrencePlan& plan,
                         int first_direction) override {
    gpu::DeviceLimits limits;
    check_launch(gpu::current_device_limits(&limits), "device limits");
    check_launch(gpu::launch_recurrence(problem, plan, limits, first_direction, nullptr),
                 "recurrence");
  }

  void launch_step_activation(const gpu::StepActivation& step) override {
    check_launch(gpu::launch_step_activation(step, nullptr), "step activation");
  }

  void launch_step_gradient(const gpu::StepGradient& step) override {
    check_launch(gpu::launch_step_gradient(step, nullptr), "step gradient");
  }

  void launch_gather_previous_states(const gpu::PreviousStates& gather) override {
    check_launch(gpu::launch_gather_previous_states(gather, nullptr), "gather");
  }

  void gemm(const gpu::Gemm& g) override {
    const gpu::ScalarType type = g.scalar_type;
    if (g.bias[0] != nullptr && (g.bias[1] == nullptr || g.accumulate)) {
      fail("emulated gemm: a bias needs both vectors and no accumulation");
    }
    for (int64_t i = 0; i < g.m; ++i) {
      for (int64_t j = 0; j < g.n; ++j) {
        double sum = 0;
        for (int64_t p = 0; p < g.k; ++p)
          sum += element(g.a, i, p, type) * element(g.b, p, j, type);
        if (g.accumulate) sum += load(g.c, i * g.ldc + j, type);
        if (g.bias[0] != nullptr) {
          // The two biases are added first, in the storage type, as the CUDA binding does.
          std::unique_ptr<unsigned char[]> bias(new unsigned char[8]);
          store(bias.get(), 0, type, load(g.bias[0], j, type) + load(g.bias[1], j, type));
          sum += load(bias.get(), 0, type);
        }
        store(g.c, i * g.ldc + j, type, sum);
      }
    }
  }

  void column_sums(const gpu::ColumnSums& sums) override {
    for (int64_t j = 0; j < sums.columns; ++j) {
      double sum = 0;
      for (int64_t i = 0; i < sums.rows; ++i) {
        sum += load(sums.matrix, i * sums.stride + j, sums.scalar_type);
      }
      store(sums.sums, j, sums.scalar_type, sum);
    }
  }

  void* workspace(int64_t bytes) override {
    buffers_.emplace_back(static_cast<size_t>(bytes) + 16, 0xff);
    return buffers_.back().data();
  }

  const int64_t* upload(const int64_t* host, int64_t count) override {
    void* copy = workspace(count * static_cast<int64_t>(sizeof(int64_t)));
    std::memcpy(copy, host, static_cast<size_t>(count) * sizeof(int64_t));
    return static_cast<const int64_t*>(copy);
  }

  void zero(void* data, int64_t bytes) override {
    if (bytes > 0) std::memset(data, 0, static_cast<size_t>(bytes));
  }

  gpu::RecurrencePlan last_plan;

 private:
  std::vector<std::vector<unsigned char>> buffers_;
};

}  // namespace

namespace {

// The glue's LayerCall for `layer`; step_offsets is its storage for the packed step offsets.
gpu::LayerCall layer_call(const EmuLayer& layer, const char* op_name,
                          std::vector<int64_t>& step_offsets) {
  gpu::LayerCall call;
  call.op_name = op_name;
  call.scalar_type = static_cast<gpu::ScalarType>(layer.scalar_type);
  ElmanShape& s = call.shape;
  s.steps = layer.steps;
  s.batch = layer.batch;
  s.rows = layer.rows;
  s.input_size = layer.input_size;
  s.hidden_size = layer.hidden;
  s.directions = layer.directions;
  s.has_bias = layer.has_bias != 0;
  s.packed = layer.packed != 0;
  s.activation = layer.relu ? Activation::Relu : Activation::Tanh;
  call.options.regime = static_cast<gpu::Regime>(layer.regime);
  call.options.max_slice_width = layer.max_slice_width;
  if (s.packed) {
    int64_t offset = 0;
    for (int64_t t = 0; t < s.steps; ++t) {
      step_offsets.push_back(offset);
      offset += layer.batch_sizes[t];
    }
    call.batch_sizes = layer.batch_sizes;
    call.step_offsets = step_offsets.data();
  }
  for (int64_t d = 0; d < s.directions; ++d) {
    call.directions[d].weight_ih = layer.weights[4 * d];
    call.directions[d].weight_hh = layer.weights[4 * d + 1];
    call.directions[d].bias_ih = layer.weights[4 * d + 2];
    call.directions[d].bias_hh = layer.weights[4 * d + 3];
  }
  call.input = layer.input;
  call.hx = layer.hx;
  return call;
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

int emu_layer_forward(const EmuLayer* layer, void* output, void* h_n, int64_t* plan_out,
                      char* error_out, int error_capacity) {
  try {
    std::vector<int64_t> step_offsets;
    const gpu::LayerCall call = layer_call(*layer, "rnn_ext::elman_forward", step_offsets);
    EmulatedLayerDevice device;
    write_plan(gpu::layer_forward(device, call, output, h_n), plan_out);
    return 0;
  } catch (const std::exception& error) {
    copy_text(error.what(), error_out, error_capacity);
    return 1;
  }
}

int emu_layer_backward(const EmuLayer* layer, const void* grad_output, const void* grad_h_n,
                       const void* output, void* grad_input, void* grad_hx,
                       void* const* grad_weights, int64_t* plan_out, char* error_out,
                       int error_capacity) {
  try {
    std::vector<int64_t> step_offsets;
    const gpu::LayerCall call = layer_call(*layer, "rnn_ext::elman_backward", step_offsets);
    gpu::LayerGradients gradients;
    gradients.grad_input = grad_input;
    gradients.grad_hx = grad_hx;
    gradients.weights = grad_weights != nullptr;
    for (int64_t d = 0; gradients.weights && d < layer->directions; ++d) {
      gradients.directions[d].weight_ih = grad_weights[3 * d];
      gradients.directions[d].weight_hh = grad_weights[3 * d + 1];
      gradients.directions[d].bias = grad_weights[3 * d + 2];
    }
    EmulatedLayerDevice device;
    write_plan(gpu::layer_backward(device, call, grad_output, grad_h_n, output, gradients),
               plan_out);
    return 0;
  } catch (const std::exception& error) {
    copy_text(error.what(), error_out, error_capacity);
    return 1;
  }
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
