// The one description of an Elman layer shared by the CPU and CUDA backends: shapes, flags, the
// time-major row layout and the activation. No torch headers, so nvcc-only kernel files include it.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ELMAN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ELMAN_HOST_DEVICE inline
#endif

namespace rnn_ext {

enum class Activation : int32_t { Tanh = 0, Relu = 1 };

// One layer, all directions. Rows are time-major: step t owns rows
// [step_offset(t), step_offset(t) + batch_size(t)). A padded [T, B, I] input is the packed case with
// every batch size equal to B, so both backends have a single code path.
struct ElmanShape {
  int64_t steps = 0;        // T
  int64_t batch = 0;        // rows of the first step (the largest)
  int64_t rows = 0;         // sum of the batch sizes = T * B when not packed
  int64_t input_size = 0;   // I
  int64_t hidden_size = 0;  // H
  int64_t directions = 1;   // 1, or 2 when bidirectional
  bool has_bias = false;
  bool packed = false;
  Activation activation = Activation::Tanh;

  // Width of an output row: the directions' hidden states side by side.
  ELMAN_HOST_DEVICE int64_t output_width() const { return directions * hidden_size; }
  // Flat weights per direction: w_ih, w_hh[, b_ih, b_hh] (nn.RNN's _flat_weights order).
  ELMAN_HOST_DEVICE int64_t weights_per_direction() const { return has_bias ? 4 : 2; }
};

// Element (row, direction, unit) of an output-shaped [rows, directions * hidden] buffer.
ELMAN_HOST_DEVICE int64_t output_index(int64_t row, int64_t direction, int64_t unit,
                                       int64_t hidden_size, int64_t directions) {
  return (row * directions + direction) * hidden_size + unit;
}

// The step a direction processes at position `position` of its own order (0 = its first step).
ELMAN_HOST_DEVICE int64_t step_at(int64_t position, int64_t steps, bool reverse) {
  return reverse ? steps - 1 - position : position;
}

// True when row `row` at step `step` starts its sequence for this direction, i.e. reads h0.
// batch_sizes is non-increasing, so in the reverse direction a row starts where the next step
// no longer has it.
ELMAN_HOST_DEVICE bool reads_initial_state(const int64_t* batch_sizes, int64_t steps, int64_t step,
                                           int64_t row, bool reverse) {
  if (!reverse) return step == 0;
  return step == steps - 1 || row >= batch_sizes[step + 1];
}

// True when `row` at `step` is the direction's last step for that sequence (it produces h_n).
ELMAN_HOST_DEVICE bool writes_final_state(const int64_t* batch_sizes, int64_t steps, int64_t step,
                                          int64_t row, bool reverse) {
  if (reverse) return step == 0;
  return step == steps - 1 || row >= batch_sizes[step + 1];
}

// Written so that NaN stays NaN, as torch.relu and torch.tanh keep it.
template <typename T>
ELMAN_HOST_DEVICE T activate(T pre_activation, Activation activation) {
  if (activation == Activation::Relu) return pre_activation < T(0) ? T(0) : pre_activation;
  using std::tanh;  // float stays float on the host; nvcc maps it to the device intrinsic
  return tanh(pre_activation);
}

// dL/d pre-activation from dL/dh and the activation's output y (all backward keeps). relu selects
// rather than multiplies, as torch's threshold_backward does: an infinite gradient through a zero
// unit gives 0 (not NaN), and a NaN output passes the gradient on.
template <typename T>
ELMAN_HOST_DEVICE T activation_backward(T grad, T y, Activation activation) {
  if (activation == Activation::Relu) return y <= T(0) ? T(0) : grad;
  return grad * (T(1) - y * y);
}

}  // namespace rnn_ext
