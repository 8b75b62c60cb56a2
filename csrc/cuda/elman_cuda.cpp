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
#include <string>
#include <vector>

#include "../layer_args.h"
#include "elman_launch.h"
#include "layer_glue.h"

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

// The layer's device work (layer_glue.h) on the current device and stream: the kernels through
// elman_launch.h, the products through ATen (cuBLAS, so torch's TF32 setting applies to them), the
// workspaces from the caching allocator. Raw pointers become tensor views for ATen; the tensors
// this object allocates live as long as it does, and the caching allocator makes their reuse
// stream-ordered after that.
class CudaLayerDevice final : public gpu::LayerDevice {
 public:
  CudaLayerDevice(const char* op_name, const at::TensorOptions& options)
      : op_name_(op_name), options_(options), stream_(at::cuda::getCurrentCUDAStream().stream()) {
    C10_CUDA_CHECK(gpu::current_device_limits(&limits_));
  }

  [[noreturn]] void fail(const std::string& message) override { C10_THROW_ERROR(Error, message); }

  gpu::RecurrencePlan plan(const gpu::RecurrenceProblem& problem,
                           const gpu::CudaOptions& options) override {
    return gpu::plan_on_device(problem, limits_, options);
  }

  void launch_recurrence(const gpu::RecurrenceProblem& problem, const gpu::RecurrencePlan& plan,
                         int first_direction) override {
    C10_CUDA_CHECK(gpu::launch_recurrence(problem, plan, limits_, first_direction, stream_));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void launch_step_activation(const gpu::StepActivation& step) override {
    C10_CUDA_CHECK(gpu::launch_step_activation(step, stream_));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void launch_step_gradient(const gpu::StepGradient& step) override {
    C10_CUDA_CHECK(gpu::launch_step_gradient(step, stream_));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void launch_gather_previous_states(const gpu::PreviousStates& gather) override {
    C10_CUDA_CHECK(gpu::launch_gather_previous_states(gather, stream_));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void gemm(const gpu::Gemm& g) override {
    if (g.m == 0 || g.n == 0) return;
    at::Tensor c = view(g.c, {g.m, g.n}, {g.ldc, 1});
    if (g.k == 0) {  // a sum over nothing (its operands may have no storage)
      if (!g.accumulate) c.zero_();
      if (g.bias[0] != nullptr)
        c.add_(view(g.bias[0], {g.n}, {1})).add_(view(g.bias[1], {g.n}, {1}));
      return;
    }
    const at::Tensor a = operand(g.a, g.m, g.k);
    const at::Tensor b = operand(g.b, g.k, g.n);
    if (g.bias[0] != nullptr) {
      TORCH_INTERNAL_ASSERT(!g.accumulate && g.bias[1] != nullptr);
      const at::Tensor bias = view(g.bias[0], {g.n}, {1}) + view(g.bias[1], {g.n}, {1});
      at::addmm_out(c, bias, a, b);
    } else if (g.accumulate) {
      c.addmm_(a, b);
    } else {
      at::mm_out(c, a, b);
    }
  }

  void column_sums(const gpu::ColumnSums& sums) override {
    if (sums.columns == 0) return;
    at::Tensor out = view(sums.sums, {sums.columns}, {1});
    if (sums.rows == 0) {
      out.zero_();
      return;
    }
    const int64_t rows_dimension[] = {0};
    at::sum_out(out, view(sums.matrix, {sums.rows, sums.columns}, {sums.stride, 1}),
                at::IntArrayRef(rows_dimension));
  }

  void* workspace(int64_t bytes) override {
    keep_.push_back(at::empty({bytes}, options_.dtype(at::kByte)));
    return keep_.back().data_ptr();
  }

  // Staged through pinned memory so that the copy is asynchronous: the caching host allocator keeps
  // the staging buffer alive until the copy has run, and the host never waits.
  const int64_t* upload(const int64_t* host, int64_t count) override {
    // A replayed graph would copy from a staging buffer that the host allocator may have handed to
    // someone else by then.
    TORCH_CHECK(!stream_is_capturing(stream_), op_name_,
                ": packed input (batch_sizes) cannot be captured in a CUDA graph; capture a padded "
                "input instead");
    at::Tensor staging =
        at::empty({count}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::copy(host, host + count, staging.data_ptr<int64_t>());
    keep_.push_back(staging.to(options_.device(), /*non_blocking=*/true));
    return keep_.back().data_ptr<int64_t>();
  }

  void zero(void* data, int64_t bytes) override {
    if (bytes > 0) C10_CUDA_CHECK(cudaMemsetAsync(data, 0, static_cast<size_t>(bytes), stream_));
  }

 private:
  // A view of device memory of the call's dtype and device, owned elsewhere.
  at::Tensor view(const void* data, at::IntArrayRef sizes, at::IntArrayRef strides) const {
    return at::for_blob(const_cast<void*>(data), sizes)
        .strides(strides)
        .options(options_)
        .target_device(options_.device())
        .make_tensor();
  }

  // op(M) as a [rows, cols] view.
  at::Tensor operand(const gpu::MatrixView& m, int64_t rows, int64_t cols) const {
    if (m.transposed) return view(m.data, {rows, cols}, {1, m.stride});
    return view(m.data, {rows, cols}, {m.stride, 1});
  }

  const char* op_name_;
  at::TensorOptions options_;
  cudaStream_t stream_;
  gpu::DeviceLimits limits_;
  std::vector<at::Tensor> keep_;
};

// The glue's view of a checked call: its shape and options, and the device pointers of its inputs
// (made contiguous here; the tensors are kept in `keep`).
gpu::LayerCall layer_call(const char* op_name, const LayerArgs& args, const at::Tensor& input,
                          const at::Tensor& hx, std::vector<at::Tensor>& keep) {
  gpu::LayerCall call;
  call.op_name = op_name;
  call.scalar_type = kernel_scalar_type(input, op_name);
  call.shape = args.shape;
  call.options = read_cuda_options();
  if (args.shape.packed) {
    call.batch_sizes = args.batch_sizes.data();
    call.step_offsets = args.step_offsets.data();
  }
  auto pointer = [&keep](const at::Tensor& t) -> const void* {
    if (!t.defined()) return nullptr;
    keep.push_back(t.contiguous());
    return keep.back().data_ptr();
  };
  for (const auto d : c10::irange(args.shape.directions)) {
    const DirectionWeights& w = args.directions[d];
    call.directions[d].weight_ih = pointer(w.weight_ih);
    call.directions[d].weight_hh = pointer(w.weight_hh);
    call.directions[d].bias_ih = pointer(w.bias_ih);
    call.directions[d].bias_hh = pointer(w.bias_hh);
  }
  call.input = pointer(input);
  call.hx = pointer(hx);
  return call;
}

std::tuple<at::Tensor, at::Tensor> elman_forward_cuda(const at::Tensor& input, const at::Tensor& hx,
                                                      at::TensorList weights,
                                                      const c10::optional<at::Tensor>& batch_sizes,
                                                      bool relu) {
  const char* op_name = "rnn_ext::elman_forward";
  const LayerArgs args = read_layer_args(op_name, input, hx, weights, batch_sizes, relu);
  TORCH_CHECK(input.is_cuda(), op_name, ": input must be a CUDA tensor here, got one on ",
              input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const ElmanShape& s = args.shape;
  at::Tensor output = at::empty(output_sizes(args), input.options());
  at::Tensor h_n = at::empty({s.directions, s.batch, s.hidden_size}, input.options());
  std::vector<at::Tensor> keep;
  const gpu::LayerCall call = layer_call(op_name, args, input, hx, keep);
  CudaLayerDevice device(op_name, input.options());
  gpu::layer_forward(device, call, output.data_ptr(), h_n.data_ptr());
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
  const c10::cuda::CUDAGuard guard(input.device());
  const ElmanShape& s = args.shape;
  const int64_t H = s.hidden_size;
  const at::TensorOptions options = input.options();
  std::vector<at::Tensor> keep;
  const gpu::LayerCall call = layer_call(op_name, args, input, hx, keep);
  const at::Tensor grad_output_c = grad_output.contiguous();
  const at::Tensor grad_h_n_c = grad_h_n.contiguous();
  const at::Tensor output_c = output.contiguous();

  gpu::LayerGradients gradients;
  at::Tensor grad_hx = at::empty({s.directions, s.batch, H}, options);
  gradients.grad_hx = grad_hx.data_ptr();
  at::Tensor grad_input;
  if (output_mask[0]) {
    grad_input = at::empty({s.rows, s.input_size}, options);
    gradients.grad_input = grad_input.data_ptr();
  }
  std::vector<DirectionGradients> grad_directions;
  if (output_mask[2]) {
    gradients.weights = true;
    for (const auto d : c10::irange(s.directions)) {
      DirectionGradients g;
      g.weight_ih = at::empty({H, s.input_size}, options);
      g.weight_hh = at::empty({H, H}, options);
      gradients.directions[d].weight_ih = g.weight_ih.data_ptr();
      gradients.directions[d].weight_hh = g.weight_hh.data_ptr();
      if (s.has_bias) {
        g.bias = at::empty({H}, options);
        gradients.directions[d].bias = g.bias.data_ptr();
      }
      grad_directions.push_back(std::move(g));
    }
  }
  CudaLayerDevice device(op_name, options);
  gpu::layer_backward(device, call, grad_output_c.data_ptr(), grad_h_n_c.data_ptr(),
                      output_c.data_ptr(), gradients);
  return backward_result(args, input, weights, output_mask, grad_input, grad_hx, grad_directions);
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, CUDA, m) {
  m.impl("elman_forward", &elman_forward_cuda);
  m.impl("elman_backward", &elman_backward_cuda);
}

}  // namespace rnn_ext
