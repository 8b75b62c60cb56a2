// One Elman layer on a CUDA device, forward and backward, as host code on raw device pointers: the
// input projection, the recurrence (persistent kernel launches, or the step-GEMM loop), the
// staging of packed input's step sizes, and the input and weight gradient products. No torch and
// no CUDA runtime header: the device work goes through LayerDevice, which elman_cuda.cpp binds to
// the runtime, cuBLAS through ATen and the current stream, and the host emulation
// (tests/cuda_emulation) to emulated launches and plain CPU products. So the tests run this very
// code without a GPU.
#pragma once

#include <cstdint>
#include <string>

#include "kernel_args.h"
#include "recurrence_plan.h"

namespace rnn_ext {
namespace gpu {

// A GEMM operand: a row-major matrix with `stride` elements between rows, read as stored or, when
// `transposed`, as its transpose.
struct MatrixView {
  const void* data = nullptr;
  int64_t stride = 0;
  bool transposed = false;
};

// c[m, n] (row stride ldc) = op(a)[m, k] op(b)[k, n], plus c itself when `accumulate`, plus
// bias[0] + bias[1] on every row when they are set (only without `accumulate`). Everything is of
// `scalar_type`; k may be 0.
struct Gemm {
  ScalarType scalar_type = ScalarType::Float32;
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  MatrixView a;
  MatrixView b;
  void* c = nullptr;
  int64_t ldc = 0;
  bool accumulate = false;
  const void* bias[2] = {nullptr, nullptr};  // [n] each
};

// sums[j] = sum over i < rows of matrix[i * stride + j], for j < columns.
struct ColumnSums {
  ScalarType scalar_type = ScalarType::Float32;
  const void* matrix = nullptr;
  int64_t rows = 0;
  int64_t columns = 0;
  int64_t stride = 0;
  void* sums = nullptr;
};

// The device work of one layer call, in the order the call issues it (one stream: each piece runs
// after the previous ones). Errors do not return: fail() and every method that fails throw.
class LayerDevice {
 public:
  virtual ~LayerDevice() = default;
  [[noreturn]] virtual void fail(const std::string& message) = 0;
  // The plan of the current device for this problem and these options.
  virtual RecurrencePlan plan(const RecurrenceProblem& problem, const CudaOptions& options) = 0;
  virtual void launch_recurrence(const RecurrenceProblem& problem, const RecurrencePlan& plan,
                                 int first_direction) = 0;
  virtual void launch_step_activation(const StepActivation& step) = 0;
  virtual void launch_step_gradient(const StepGradient& step) = 0;
  virtual void launch_gather_previous_states(const PreviousStates& gather) = 0;
  virtual void gemm(const Gemm& gemm) = 0;
  virtual void column_sums(const ColumnSums& sums) = 0;
  // Device memory of `bytes` (any content), valid until the device object goes away.
  virtual void* workspace(int64_t bytes) = 0;
  // A device copy of `count` host values; the host array may be reused as soon as this returns.
  virtual const int64_t* upload(const int64_t* host, int64_t count) = 0;
  virtual void zero(void* data, int64_t bytes) = 0;
};

// One direction's weights on the device, contiguous: weight_ih [H, I], weight_hh [H, H], biases
// [H] (both null without bias).
struct DirectionPointers {
  const void* weight_ih = nullptr;
  const void* weight_hh = nullptr;
  const void* bias_ih = nullptr;
  const void* bias_hh = nullptr;
};

// One call of the layer: its checked shape, its options, and its inputs on the device.
struct LayerCall {
  const char* op_name = "";
  ScalarType scalar_type = ScalarType::Float32;
  ElmanShape shape;
  CudaOptions options;
  const int64_t* batch_sizes = nullptr;   // host [steps], packed input only
  const int64_t* step_offsets = nullptr;  // host [steps], packed input only
  DirectionPointers directions[2];
  const void* input = nullptr;  // [rows, I], contiguous
  const void* hx = nullptr;     // [D, B, H], contiguous
};

// Where backward writes. grad_input and the weight gradients are null when not wanted; grad_hx is
// always written. All contiguous, in the shapes of what they are the gradients of.
struct LayerGradients {
  void* grad_input = nullptr;  // [rows, I]
  void* grad_hx = nullptr;     // [D, B, H]
  bool weights = false;        // write the weight gradients below
  struct {
    void* weight_ih = nullptr;  // [H, I]
    void* weight_hh = nullptr;  // [H, H]
    void* bias = nullptr;       // [H], the gradient of b_ih and of b_hh alike; null without bias
  } directions[2];
};

// Forward: output [rows, D*H] and h_n [D, B, H]. Backward: from the forward's output and the
// gradients of output and h_n. Both return the recurrence's plan (regime Auto when the layer has
// no row or no unit, and nothing ran).
RecurrencePlan layer_forward(LayerDevice& device, const LayerCall& call, void* output, void* h_n);
RecurrencePlan layer_backward(LayerDevice& device, const LayerCall& call, const void* grad_output,
                              const void* grad_h_n, const void* output,
                              const LayerGradients& gradients);

}  // namespace gpu
}  // namespace rnn_ext
