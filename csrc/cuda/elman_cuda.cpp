// CUDA implementation of the rnn_ext layer ops, registered for the CUDA key: argument checks
// (read_layer_args, shared with the CPU), allocation, the GEMMs through ATen (cuBLAS, so torch's
// TF32 setting applies to them), and the recurrence kernels through elman_launch.h. Everything runs
// on the current stream without a host synchronisation.
//
// RNN_EXT_CUDA_REGIME=auto|single_block|cooperative|step_gemm forces a recurrence regime (tests and
// the sanitizer runs use it to cover every path); a forced regime that cannot run is an error,
// never a silent fallback. RNN_EXT_CUDA_MAX_SLICE=N caps the hidden units per cooperative block.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/irange.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "../layer_args.h"
#include "elman_launch.h"

namespace rnn_ext {
namespace {

gpu::ScalarType kernel_scalar_type(const at::Tensor& input, const char* op_name) {
  switch (input.scalar_type()) {
    case at::kFloat:
      return gpu::ScalarType::Float32;
    case at::kDouble:
      return gpu::ScalarType::Float64;
    case at::kHalf:
      return gpu::ScalarType::Float16;
    case at::kBFloat16:
      return gpu::ScalarType::BFloat16;
    default:
      TORCH_CHECK(false, op_name,
                  ": on CUDA, input must be float32, float64, float16 or bfloat16, got ",
                  input.scalar_type());
  }
}

// Read per call, so that a test (or a user) can switch them between calls.
gpu::CudaOptions read_cuda_options() {
  gpu::CudaOptions options;
  const char* regime = std::getenv("RNN_EXT_CUDA_REGIME");
  if (regime == nullptr || *regime == '\0' || std::strcmp(regime, "auto") == 0) {
    options.regime = gpu::Regime::Auto;
  } else if (std::strcmp(regime, "single_block") == 0) {
    options.regime = gpu::Regime::SingleBlock;
  } else if (std::strcmp(regime, "cooperative") == 0) {
    options.regime = gpu::Regime::Cooperative;
  } else if (std::strcmp(regime, "step_gemm") == 0) {
    options.regime = gpu::Regime::StepGemm;
  } else {
    TORCH_CHECK(false,
                "RNN_EXT_CUDA_REGIME must be auto, single_block, cooperative or step_gemm, got '",
                regime, "'");
  }
  const char* width = std::getenv("RNN_EXT_CUDA_MAX_SLICE");
  if (width != nullptr && *width != '\0') {
    char* end = nullptr;
    const long value = std::strtol(width, &end, 10);
    TORCH_CHECK(end != width && *end == '\0' && value > 0 && value <= (1 << 20),
                "RNN_EXT_CUDA_MAX_SLICE must be a positive integer, got '", width, "'");
    options.max_slice_width = static_cast<int>(value);
  }
  return options;
}

bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// batch_sizes then step_offsets, [2 * steps] int64 on the device, for packed input. Staged through
// pinned memory so that the copy is asynchronous: the caching host allocator keeps the staging
// buffer alive until the copy has run, and the host never waits.
at::Tensor packed_steps_on_device(const char* op_name, const LayerArgs& args,
                                  const at::Device& device, cudaStream_t stream) {
  // A replayed graph would copy from a staging buffer that the host allocator may have handed to
  // someone else by then.
  TORCH_CHECK(!stream_is_capturing(stream), op_name,
              ": packed input (batch_sizes) cannot be captured in a CUDA graph; capture a padded "
              "input instead");
  const int64_t steps = args.shape.steps;
  at::Tensor host =
      at::empty({2 * steps}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* data = host.data_ptr<int64_t>();
  std::copy(args.batch_sizes.begin(), args.batch_sizes.end(), data);
  std::copy(args.step_offsets.begin(), args.step_offsets.begin() + steps, data + steps);
  return host.to(device, /*non_blocking=*/true);
}

// One call's recurrence: the problem for the kernels plus the tensors that must outlive the launch
// on the host side (the caching allocator makes their reuse stream-ordered after that).
struct Recurrence {
  const char* op_name;
  const LayerArgs& args;
  gpu::RecurrenceProblem problem;
  gpu::DeviceLimits limits;           // of the current device (the caller's CUDAGuard)
  std::vector<at::Tensor> weight_hh;  // contiguous, per direction
  at::Tensor packed_steps;            // packed input only
  cudaStream_t stream;

  Recurrence(const char* op_name_, const LayerArgs& args_, gpu::ScalarType type,
             const at::Device& device)
      : op_name(op_name_), args(args_), stream(at::cuda::getCurrentCUDAStream().stream()) {
    C10_CUDA_CHECK(gpu::current_device_limits(&limits));
    const ElmanShape& s = args.shape;
    problem.scalar_type = type;
    problem.activation = s.activation;
    problem.steps = s.steps;
    problem.batch = s.batch;
    problem.hidden = s.hidden_size;
    problem.directions = s.directions;
    for (const auto d : c10::irange(s.directions)) {
      weight_hh.push_back(args.directions[d].weight_hh.contiguous());
      problem.weight_hh[d] = weight_hh.back().data_ptr();
    }
    if (s.packed) {
      packed_steps = packed_steps_on_device(op_name, args, device, stream);
      problem.batch_sizes = packed_steps.data_ptr<int64_t>();
      problem.step_offsets = problem.batch_sizes + s.steps;
    }
  }

  gpu::RecurrencePlan plan() const {
    const gpu::CudaOptions options = read_cuda_options();
    const gpu::RecurrencePlan plan = gpu::plan_on_device(problem, limits, options);
    TORCH_CHECK(plan.rejected == nullptr, op_name,
                ": RNN_EXT_CUDA_REGIME=", gpu::regime_name(options.regime),
                " cannot run hidden_size=", problem.hidden, ", batch=", problem.batch,
                ", directions=", problem.directions, " on this device: ", plan.rejected);
    return plan;
  }

  // The persistent kernel, one launch for all directions or one per direction.
  void launch_persistent(const gpu::RecurrencePlan& plan, const at::TensorOptions& options) {
    at::Tensor exchange;
    if (plan.regime == gpu::Regime::Cooperative) {
      exchange = at::empty({gpu::exchange_bytes(problem)}, options.dtype(at::kByte));
      problem.exchange = exchange.data_ptr();
    }
    for (int64_t first = 0; first < problem.directions; first += plan.launch_directions) {
      C10_CUDA_CHECK(
          gpu::launch_recurrence(problem, plan, limits, static_cast<int>(first), stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
};

// StepGemm forward: per step, the GEMM adds h_{t-1} W_hh^T into the step's rows (P already there),
// then one pointwise kernel applies the activation and writes h_n for rows that end there.
void step_gemm_forward(Recurrence& r, at::Tensor& sequence, const at::Tensor& hx, at::Tensor& h_n) {
  const ElmanShape& s = r.args.shape;
  const StepLayout layout = step_layout(r.args);
  const int64_t H = s.hidden_size;
  for (const auto d : c10::irange(s.directions)) {
    const bool reverse = d == 1;
    const at::Tensor weight_t = r.weight_hh[d].t();
    const at::Tensor h0 = hx[d];
    at::Tensor final_state = h_n[d];
    const at::Tensor columns = sequence.narrow(1, d * H, H);
    for (const auto position : c10::irange(s.steps)) {
      const int64_t t = step_of_position(position, s.steps, reverse, /*backward=*/false);
      const int64_t rows = layout.size(t);
      const at::Tensor current = columns.narrow(0, layout.offset(t), rows);
      // Rows [0, carried) continue from the previous step; the others start from h0.
      const int64_t carried = layout.first_initial_row(t, reverse);
      if (carried > 0) {
        at::Tensor part = current.narrow(0, 0, carried);
        part.addmm_(columns.narrow(0, layout.offset(previous_step(t, reverse)), carried), weight_t);
      }
      if (carried < rows) {
        at::Tensor part = current.narrow(0, carried, rows - carried);
        part.addmm_(h0.narrow(0, carried, rows - carried), weight_t);
      }
      gpu::StepActivation step;
      step.scalar_type = r.problem.scalar_type;
      step.activation = s.activation;
      step.sequence = sequence.data_ptr();
      step.row_offset = layout.offset(t);
      step.rows = rows;
      step.hidden = H;
      step.directions = s.directions;
      step.direction = d;
      step.final_state = final_state.data_ptr();
      step.first_final_row = layout.first_final_row(t, reverse);
      C10_CUDA_CHECK(gpu::launch_step_activation(step, r.stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// StepGemm backward: per step (in reverse), one pointwise kernel forms dP from the carried dL/dh
// (or grad_h_n where a row ends), then the GEMM dP W_hh gives dL/dh_{t-1}: carried on, or grad_hx
// for rows that start at this step.
void step_gemm_backward(Recurrence& r, at::Tensor& grad_pre, const at::Tensor& grad_output,
                        const at::Tensor& output, const at::Tensor& grad_h_n, at::Tensor& grad_hx) {
  const ElmanShape& s = r.args.shape;
  const StepLayout layout = step_layout(r.args);
  const int64_t H = s.hidden_size;
  at::Tensor carry = at::empty({s.batch, H}, grad_pre.options());
  for (const auto d : c10::irange(s.directions)) {
    const bool reverse = d == 1;
    const at::Tensor& weight = r.weight_hh[d];
    at::Tensor grad_h0 = grad_hx[d];
    const at::Tensor grad_final = grad_h_n[d];
    const at::Tensor columns = grad_pre.narrow(1, d * H, H);
    for (const auto position : c10::irange(s.steps)) {
      const int64_t t = step_of_position(position, s.steps, reverse, /*backward=*/true);
      const int64_t rows = layout.size(t);
      gpu::StepGradient step;
      step.scalar_type = r.problem.scalar_type;
      step.activation = s.activation;
      step.grad_pre = grad_pre.data_ptr();
      step.grad_output = grad_output.data_ptr();
      step.output = output.data_ptr();
      step.row_offset = layout.offset(t);
      step.rows = rows;
      step.hidden = H;
      step.directions = s.directions;
      step.direction = d;
      step.carry = carry.data_ptr();
      step.grad_final = grad_final.data_ptr();
      step.first_final_row = layout.first_final_row(t, reverse);
      C10_CUDA_CHECK(gpu::launch_step_gradient(step, r.stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor current = columns.narrow(0, layout.offset(t), rows);
      const int64_t carried = layout.first_initial_row(t, reverse);
      if (carried > 0) {
        at::Tensor target = carry.narrow(0, 0, carried);
        at::mm_out(target, current.narrow(0, 0, carried), weight);
      }
      if (carried < rows) {
        at::Tensor target = grad_h0.narrow(0, carried, rows - carried);
        at::mm_out(target, current.narrow(0, carried, rows - carried), weight);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> elman_forward_cuda(const at::Tensor& input, const at::Tensor& hx,
                                                      at::TensorList weights,
                                                      const c10::optional<at::Tensor>& batch_sizes,
                                                      bool relu) {
  const char* op_name = "rnn_ext::elman_forward";
  const LayerArgs args = read_layer_args(op_name, input, hx, weights, batch_sizes, relu);
  TORCH_CHECK(input.is_cuda(), op_name, ": input must be a CUDA tensor here, got one on ",
              input.device());
  const gpu::ScalarType type = kernel_scalar_type(input, op_name);
  const c10::cuda::CUDAGuard guard(input.device());
  const ElmanShape& s = args.shape;
  const int64_t H = s.hidden_size;
  at::Tensor output = at::empty(output_sizes(args), input.options());
  at::Tensor h_n = at::empty({s.directions, s.batch, H}, input.options());
  if (s.rows == 0 || H == 0) return {output, h_n};

  // P = x W_ih^T + (b_ih + b_hh) for every row and direction, written straight into the output's
  // columns of the direction; the recurrence then turns P into h in place.
  at::Tensor sequence = output.view({s.rows, s.output_width()});
  const at::Tensor input_rows = input.reshape({s.rows, s.input_size});
  for (const auto d : c10::irange(s.directions)) {
    const DirectionWeights& w = args.directions[d];
    at::Tensor columns = sequence.narrow(1, d * H, H);
    if (s.has_bias) {
      at::addmm_out(columns, w.bias_ih + w.bias_hh, input_rows, w.weight_ih.t());
    } else {
      at::mm_out(columns, input_rows, w.weight_ih.t());
    }
  }

  Recurrence recurrence(op_name, args, type, input.device());
  const at::Tensor hx_c = hx.contiguous();
  const gpu::RecurrencePlan plan = recurrence.plan();
  if (plan.regime == gpu::Regime::StepGemm) {
    step_gemm_forward(recurrence, sequence, hx_c, h_n);
  } else {
    recurrence.problem.backward = false;
    recurrence.problem.initial = hx_c.data_ptr();
    recurrence.problem.final_state = h_n.data_ptr();
    recurrence.problem.sequence = sequence.data_ptr();
    recurrence.launch_persistent(plan, input.options());
  }
  return {output, h_n};
}

BackwardResult elman_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                   const at::Tensor& input, const at::Tensor& hx,
                                   at::TensorList weights, const at::Tensor& output,
                                   const c10::optional<at::Tensor>& batch_sizes, bool relu,
                                   std::array<bool, 3> output_mask) {
  const char* op_name = "rnn_ext::elman_backward";
  const LayerArgs args = read_backward_args(op_name, grad_output, grad_h_n, input, hx, weights,
                                            output, batch_sizes, relu);
  TORCH_CHECK(input.is_cuda(), op_name, ": input must be a CUDA tensor here, got one on ",
              input.device());
  const gpu::ScalarType type = kernel_scalar_type(input, op_name);
  const ElmanShape& s = args.shape;
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t H = s.hidden_size;
  const int64_t width = s.output_width();
  const at::TensorOptions options = input.options();

  // dL/dP for every row and direction, filled by the recurrence.
  at::Tensor grad_pre = at::empty({s.rows, width}, options);
  at::Tensor grad_hx = at::empty({s.directions, s.batch, H}, options);
  const at::Tensor output_rows = output.contiguous().view({s.rows, width});
  const at::Tensor hx_c = hx.contiguous();
  std::unique_ptr<Recurrence> recurrence;
  if (s.rows > 0 && H > 0) {
    recurrence = std::make_unique<Recurrence>(op_name, args, type, input.device());
    const at::Tensor grad_output_rows = grad_output.contiguous().view({s.rows, width});
    const at::Tensor grad_h_n_c = grad_h_n.contiguous();
    const gpu::RecurrencePlan plan = recurrence->plan();
    if (plan.regime == gpu::Regime::StepGemm) {
      step_gemm_backward(*recurrence, grad_pre, grad_output_rows, output_rows, grad_h_n_c, grad_hx);
    } else {
      gpu::RecurrenceProblem& problem = recurrence->problem;
      problem.backward = true;
      problem.initial = grad_h_n_c.data_ptr();
      problem.final_state = grad_hx.data_ptr();
      problem.sequence = grad_pre.data_ptr();
      problem.grad_output = grad_output_rows.data_ptr();
      problem.output = output_rows.data_ptr();
      recurrence->launch_persistent(plan, options);
    }
  } else {
    // No row or no unit: every gradient is a sum over nothing.
    grad_pre.zero_();
    grad_hx.zero_();
  }

  at::Tensor grad_input;
  if (output_mask[0]) {
    grad_input = at::mm(grad_pre.narrow(1, 0, H), args.directions[0].weight_ih);
    for (int64_t d = 1; d < s.directions; ++d) {
      grad_input.addmm_(grad_pre.narrow(1, d * H, H), args.directions[d].weight_ih);
    }
  }

  std::vector<DirectionGradients> grad_directions;
  if (output_mask[2]) {
    const at::Tensor input_rows = input.reshape({s.rows, s.input_size});
    // The state each row read at its step, for the W_hh gradient. Packed input gathers it into one
    // buffer; a padded input reads it from two shifted views (h0 for the first step's rows, the
    // output of the neighbouring step for the rest), with no copy.
    at::Tensor previous;
    if (s.packed && s.rows > 0 && H > 0) {
      previous = at::empty({s.rows, width}, options);
      gpu::PreviousStates gather;
      gather.scalar_type = type;
      gather.previous = previous.data_ptr();
      gather.output = output_rows.data_ptr();
      gather.hx = hx_c.data_ptr();
      gather.batch_sizes = recurrence->problem.batch_sizes;
      gather.step_offsets = recurrence->problem.step_offsets;
      gather.steps = s.steps;
      gather.batch = s.batch;
      gather.hidden = H;
      gather.directions = s.directions;
      C10_CUDA_CHECK(gpu::launch_gather_previous_states(gather, recurrence->stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    for (const auto d : c10::irange(s.directions)) {
      const at::Tensor grad_pre_d = grad_pre.narrow(1, d * H, H);
      DirectionGradients g;
      g.weight_ih = at::mm(grad_pre_d.t(), input_rows);
      if (previous.defined()) {
        g.weight_hh = at::mm(grad_pre_d.t(), previous.narrow(1, d * H, H));
      } else {
        const at::Tensor output_d = output_rows.narrow(1, d * H, H);
        const int64_t later = s.rows - s.batch;  // rows of every step but the direction's first
        const bool reverse = d == 1;
        // Forward: step t >= 1 read the output of t - 1. Reverse: step t <= T - 2 read t + 1.
        const int64_t grad_begin = reverse ? 0 : s.batch;
        const int64_t state_begin = reverse ? s.batch : 0;
        const int64_t first_step_begin = reverse ? later : 0;
        g.weight_hh = at::mm(grad_pre_d.narrow(0, grad_begin, later).t(),
                             output_d.narrow(0, state_begin, later));
        g.weight_hh.addmm_(grad_pre_d.narrow(0, first_step_begin, s.batch).t(), hx_c[d]);
      }
      if (s.has_bias) g.bias = grad_pre_d.sum(0);
      grad_directions.push_back(std::move(g));
    }
  }
  return backward_result(args, input, weights, output_mask, grad_input, grad_hx, grad_directions);
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, CUDA, m) {
  m.impl("elman_forward", &elman_forward_cuda);
  m.impl("elman_backward", &elman_backward_cuda);
}

}  // namespace rnn_ext
