// The CUDA path of one Elman layer around its kernels (layer_glue.h): what runs in which order, on
// which rows and columns, with which operands. Buffers of [rows, D*H] hold the directions side by
// side (output_index in elman.h), so direction d's columns are a matrix of row stride D*H.
#include "layer_glue.h"

#include <string>
#include <type_traits>
#include <vector>

namespace rnn_ext {
namespace gpu {
namespace {

template <typename Pointer>
Pointer advance(Pointer data, int64_t elements, ScalarType type) {
  using Byte = std::conditional_t<std::is_const_v<std::remove_pointer_t<Pointer>>,
                                  const unsigned char*, unsigned char*>;
  return static_cast<Pointer>(static_cast<Byte>(data) + elements * element_bytes(type));
}

StepLayout host_layout(const LayerCall& call) {
  return StepLayout{call.batch_sizes, call.step_offsets, call.shape.steps, call.shape.batch};
}

// The state of one recurrence: the problem for the kernels and its plan on this device.
struct Recurrence {
  RecurrenceProblem problem;
  RecurrencePlan plan;

  Recurrence(LayerDevice& device, const LayerCall& call) {
    const ElmanShape& s = call.shape;
    problem.scalar_type = call.scalar_type;
    problem.activation = s.activation;
    problem.steps = s.steps;
    problem.batch = s.batch;
    problem.hidden = s.hidden_size;
    problem.directions = s.directions;
    for (int64_t d = 0; d < s.directions; ++d) problem.weight_hh[d] = call.directions[d].weight_hh;
    if (s.packed) {
      // batch_sizes then step_offsets, one copy.
      std::vector<int64_t> steps(call.batch_sizes, call.batch_sizes + s.steps);
      steps.insert(steps.end(), call.step_offsets, call.step_offsets + s.steps);
      problem.batch_sizes = device.upload(steps.data(), 2 * s.steps);
      problem.step_offsets = problem.batch_sizes + s.steps;
    }
    plan = device.plan(problem, call.options);
    if (plan.rejected != nullptr) {
      device.fail(std::string(call.op_name) +
                  ": RNN_EXT_CUDA_REGIME=" + regime_name(call.options.regime) +
                  " cannot run hidden_size=" + std::to_string(problem.hidden) +
                  ", batch=" + std::to_string(problem.batch) + ", directions=" +
                  std::to_string(problem.directions) + " on this device: " + plan.rejected);
    }
  }

  // The persistent kernel, one launch for all directions or one per direction.
  void launch_persistent(LayerDevice& device) {
    if (plan.regime == Regime::Cooperative) {
      problem.exchange = device.workspace(exchange_bytes(problem));
    }
    for (int64_t first = 0; first < problem.directions; first += plan.launch_directions) {
      device.launch_recurrence(problem, plan, static_cast<int>(first));
    }
  }
};

// StepGemm forward: per step, the GEMM adds h_{t-1} W_hh^T into the step's rows (P already there),
// then one pointwise kernel applies the activation and writes h_n for rows that end there.
void step_gemm_forward(LayerDevice& device, const LayerCall& call, void* sequence, void* h_n) {
  const ElmanShape& s = call.shape;
  const ScalarType type = call.scalar_type;
  const StepLayout layout = host_layout(call);
  const int64_t H = s.hidden_size;
  const int64_t width = s.output_width();
  for (int64_t d = 0; d < s.directions; ++d) {
    const bool reverse = d == 1;
    const MatrixView weight_t{call.directions[d].weight_hh, H, /*transposed=*/true};
    const void* h0 = advance(call.hx, d * s.batch * H, type);
    void* columns = advance(sequence, d * H, type);
    for (int64_t position = 0; position < s.steps; ++position) {
      const int64_t t = step_of_position(position, s.steps, reverse, /*backward=*/false);
      const int64_t rows = layout.size(t);
      void* current = advance(columns, layout.offset(t) * width, type);
      // Rows [0, carried) continue from the previous step; the others start from h0.
      const int64_t carried = layout.first_initial_row(t, reverse);
      Gemm gemm;
      gemm.scalar_type = type;
      gemm.n = H;
      gemm.k = H;
      gemm.b = weight_t;
      gemm.ldc = width;
      gemm.accumulate = true;
      if (carried > 0) {
        gemm.m = carried;
        gemm.a = {advance(columns, layout.offset(previous_step(t, reverse)) * width, type), width};
        gemm.c = current;
        device.gemm(gemm);
      }
      if (carried < rows) {
        gemm.m = rows - carried;
        gemm.a = {advance(h0, carried * H, type), H};
        gemm.c = advance(current, carried * width, type);
        device.gemm(gemm);
      }
      StepActivation step;
      step.scalar_type = type;
      step.activation = s.activation;
      step.sequence = sequence;
      step.row_offset = layout.offset(t);
      step.rows = rows;
      step.hidden = H;
      step.directions = s.directions;
      step.direction = d;
      step.final_state = advance(h_n, d * s.batch * H, type);
      step.first_final_row = layout.first_final_row(t, reverse);
      device.launch_step_activation(step);
    }
  }
}

// StepGemm backward: per step (in reverse), one pointwise kernel forms dP from the carried dL/dh
// (or grad_h_n where a row ends), then the GEMM dP W_hh gives dL/dh_{t-1}: carried on, or grad_hx
// for rows that start at this step.
void step_gemm_backward(LayerDevice& device, const LayerCall& call, void* grad_pre,
                        const void* grad_output, const void* output, const void* grad_h_n,
                        void* grad_hx) {
  const ElmanShape& s = call.shape;
  const ScalarType type = call.scalar_type;
  const StepLayout layout = host_layout(call);
  const int64_t H = s.hidden_size;
  const int64_t width = s.output_width();
  void* carry = device.workspace(s.batch * H * element_bytes(type));
  for (int64_t d = 0; d < s.directions; ++d) {
    const bool reverse = d == 1;
    const MatrixView weight{call.directions[d].weight_hh, H};
    void* grad_h0 = advance(grad_hx, d * s.batch * H, type);
    const void* columns = advance(grad_pre, d * H, type);
    for (int64_t position = 0; position < s.steps; ++position) {
      const int64_t t = step_of_position(position, s.steps, reverse, /*backward=*/true);
      const int64_t rows = layout.size(t);
      StepGradient step;
      step.scalar_type = type;
      step.activation = s.activation;
      step.grad_pre = grad_pre;
      step.grad_output = grad_output;
      step.output = output;
      step.row_offset = layout.offset(t);
      step.rows = rows;
      step.hidden = H;
      step.directions = s.directions;
      step.direction = d;
      step.carry = carry;
      step.grad_final = advance(grad_h_n, d * s.batch * H, type);
      step.first_final_row = layout.first_final_row(t, reverse);
      device.launch_step_gradient(step);
      const void* current = advance(columns, layout.offset(t) * width, type);
      const int64_t carried = layout.first_initial_row(t, reverse);
      Gemm gemm;
      gemm.scalar_type = type;
      gemm.n = H;
      gemm.k = H;
      gemm.b = weight;
      gemm.ldc = H;
      if (carried > 0) {
        gemm.m = carried;
        gemm.a = {current, width};
        gemm.c = carry;
        device.gemm(gemm);
      }
      if (carried < rows) {
        gemm.m = rows - carried;
        gemm.a = {advance(current, carried * width, type), width};
        gemm.c = advance(grad_h0, carried * H, type);
        device.gemm(gemm);
      }
    }
  }
}

}  // namespace

RecurrencePlan layer_forward(LayerDevice& device, const LayerCall& call, void* output, void* h_n) {
  const ElmanShape& s = call.shape;
  const ScalarType type = call.scalar_type;
  const int64_t H = s.hidden_size;
  const int64_t width = s.output_width();
  RecurrencePlan none;
  none.regime = Regime::Auto;
  if (s.rows == 0 || H == 0) return none;

  // P = x W_ih^T + (b_ih + b_hh) for every row and direction, written straight into the output's
  // columns of the direction; the recurrence then turns P into h in place.
  for (int64_t d = 0; d < s.directions; ++d) {
    const DirectionPointers& w = call.directions[d];
    Gemm gemm;
    gemm.scalar_type = type;
    gemm.m = s.rows;
    gemm.n = H;
    gemm.k = s.input_size;
    gemm.a = {call.input, s.input_size};
    gemm.b = {w.weight_ih, s.input_size, /*transposed=*/true};
    gemm.c = advance(output, d * H, type);
    gemm.ldc = width;
    if (s.has_bias) {
      gemm.bias[0] = w.bias_ih;
      gemm.bias[1] = w.bias_hh;
    }
    device.gemm(gemm);
  }

  Recurrence recurrence(device, call);
  if (recurrence.plan.regime == Regime::StepGemm) {
    step_gemm_forward(device, call, output, h_n);
  } else {
    recurrence.problem.backward = false;
    recurrence.problem.initial = call.hx;
    recurrence.problem.final_state = h_n;
    recurrence.problem.sequence = output;
    recurrence.launch_persistent(device);
  }
  return recurrence.plan;
}

RecurrencePlan layer_backward(LayerDevice& device, const LayerCall& call, const void* grad_output,
                              const void* grad_h_n, const void* output,
                              const LayerGradients& gradients) {
  const ElmanShape& s = call.shape;
  const ScalarType type = call.scalar_type;
  const int64_t H = s.hidden_size;
  const int64_t width = s.output_width();
  const int64_t bytes = element_bytes(type);

  // dL/dP for every row and direction, filled by the recurrence.
  void* grad_pre = device.workspace(s.rows * width * bytes);
  RecurrencePlan plan;
  plan.regime = Regime::Auto;
  const int64_t* device_batch_sizes = nullptr;
  const int64_t* device_step_offsets = nullptr;
  if (s.rows > 0 && H > 0) {
    Recurrence recurrence(device, call);
    plan = recurrence.plan;
    device_batch_sizes = recurrence.problem.batch_sizes;
    device_step_offsets = recurrence.problem.step_offsets;
    if (plan.regime == Regime::StepGemm) {
      step_gemm_backward(device, call, grad_pre, grad_output, output, grad_h_n, gradients.grad_hx);
    } else {
      RecurrenceProblem& problem = recurrence.problem;
      problem.backward = true;
      problem.initial = grad_h_n;
      problem.final_state = gradients.grad_hx;
      problem.sequence = grad_pre;
      problem.grad_output = grad_output;
      problem.output = output;
      recurrence.launch_persistent(device);
    }
  } else {
    // No row or no unit: every gradient is a sum over nothing.
    device.zero(grad_pre, s.rows * width * bytes);
    device.zero(gradients.grad_hx, s.directions * s.batch * H * bytes);
  }

  if (gradients.grad_input != nullptr) {
    // dL/dx = sum over directions of dP_d W_ih,d.
    for (int64_t d = 0; d < s.directions; ++d) {
      Gemm gemm;
      gemm.scalar_type = type;
      gemm.m = s.rows;
      gemm.n = s.input_size;
      gemm.k = H;
      gemm.a = {advance(grad_pre, d * H, type), width};
      gemm.b = {call.directions[d].weight_ih, s.input_size};
      gemm.c = gradients.grad_input;
      gemm.ldc = s.input_size;
      gemm.accumulate = d > 0;
      device.gemm(gemm);
    }
  }

  if (!gradients.weights) return plan;
  // The state each row read at its step, for the W_hh gradient. Packed input gathers it into one
  // buffer; a padded input reads it from two shifted views (h0 for the first step's rows, the
  // output of the neighbouring step for the rest), with no copy.
  const void* previous = nullptr;
  if (s.packed && s.rows > 0 && H > 0) {
    void* gathered = device.workspace(s.rows * width * bytes);
    PreviousStates gather;
    gather.scalar_type = type;
    gather.previous = gathered;
    gather.output = output;
    gather.hx = call.hx;
    gather.batch_sizes = device_batch_sizes;
    gather.step_offsets = device_step_offsets;
    gather.steps = s.steps;
    gather.batch = s.batch;
    gather.hidden = H;
    gather.directions = s.directions;
    device.launch_gather_previous_states(gather);
    previous = gathered;
  }
  for (int64_t d = 0; d < s.directions; ++d) {
    const auto& g = gradients.directions[d];
    const void* grad_pre_d = advance(grad_pre, d * H, type);
    Gemm gemm;
    gemm.scalar_type = type;
    gemm.m = H;
    gemm.n = s.input_size;
    gemm.k = s.rows;
    gemm.a = {grad_pre_d, width, /*transposed=*/true};
    gemm.b = {call.input, s.input_size};
    gemm.c = g.weight_ih;
    gemm.ldc = s.input_size;
    device.gemm(gemm);

    gemm.n = H;
    gemm.c = g.weight_hh;
    gemm.ldc = H;
    if (previous != nullptr) {
      gemm.b = {advance(previous, d * H, type), width};
      device.gemm(gemm);
    } else {
      const void* output_d = advance(output, d * H, type);
      const int64_t later = s.rows - s.batch;  // rows of every step but the direction's first
      const bool reverse = d == 1;
      // Forward: step t >= 1 read the output of t - 1. Reverse: step t <= T - 2 read t + 1.
      const int64_t grad_begin = reverse ? 0 : s.batch;
      const int64_t state_begin = reverse ? s.batch : 0;
      const int64_t first_step_begin = reverse ? later : 0;
      gemm.k = later;
      gemm.a = {advance(grad_pre_d, grad_begin * width, type), width, /*transposed=*/true};
      gemm.b = {advance(output_d, state_begin * width, type), width};
      device.gemm(gemm);
      gemm.k = s.batch;
      gemm.a = {advance(grad_pre_d, first_step_begin * width, type), width, /*transposed=*/true};
      gemm.b = {advance(call.hx, d * s.batch * H, type), H};
      gemm.accumulate = true;
      device.gemm(gemm);
    }
    if (s.has_bias) {
      ColumnSums sums;
      sums.scalar_type = type;
      sums.matrix = grad_pre_d;
      sums.rows = s.rows;
      sums.columns = H;
      sums.stride = width;
      sums.sums = g.bias;
      device.column_sums(sums);
    }
  }
  return plan;
}

}  // namespace gpu
}  // namespace rnn_ext
