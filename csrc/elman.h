// The one description of an Elman layer shared by the CPU kernels, the CUDA kernels and the
// composite (differentiable ATen) path: shapes, flags, the time-major row layout, the step rules of
// padded and packed input, and the activation. No torch headers: nvcc-only kernel files include it.
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
// [step_offset(t), step_offset(t) + batch_size(t)). A padded [T, B, I] input is the packed case
// with every batch size equal to B, so both backends have a single code path.
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

// Element (direction, batch row, unit) of a contiguous [D, B, H] state tensor (hx, h_n, grads).
ELMAN_HOST_DEVICE int64_t state_index(int64_t direction, int64_t b, int64_t unit, int64_t batch,
                                      int64_t hidden_size) {
  return (direction * batch + b) * hidden_size + unit;
}

// The step a direction processes at position `position` of its own order (0 = its first step).
ELMAN_HOST_DEVICE int64_t step_at(int64_t position, int64_t steps, bool reverse) {
  return reverse ? steps - 1 - position : position;
}

// The step a pass visits at its position `position`: a forward pass runs each direction in the
// direction's own order, a backward pass in the reverse of it.
ELMAN_HOST_DEVICE int64_t step_of_position(int64_t position, int64_t steps, bool reverse,
                                           bool backward) {
  return backward ? step_at(steps - 1 - position, steps, reverse)
                  : step_at(position, steps, reverse);
}

// The step whose state `step` reads, for a row that does not start its sequence at `step`.
ELMAN_HOST_DEVICE int64_t previous_step(int64_t step, bool reverse) {
  return reverse ? step + 1 : step - 1;
}

// Where each step's rows are, and where each row's sequence starts and ends, for one direction.
// A padded input has no batch_sizes array (every step has `batch` rows at t * batch): the CUDA
// kernels of a padded input then read no batch sizes at all and need no host-to-device copy (which
// keeps them capturable in a CUDA graph). batch_sizes never grows from one step to the next.
struct StepLayout {
  const int64_t* batch_sizes = nullptr;   // [steps], or null for a padded input
  const int64_t* step_offsets = nullptr;  // [steps] first row of each step, or null when padded
  int64_t steps = 0;
  int64_t batch = 0;

  ELMAN_HOST_DEVICE int64_t size(int64_t step) const {
    return batch_sizes != nullptr ? batch_sizes[step] : batch;
  }
  ELMAN_HOST_DEVICE int64_t offset(int64_t step) const {
    return step_offsets != nullptr ? step_offsets[step] : step * batch;
  }
  ELMAN_HOST_DEVICE int64_t row(int64_t step, int64_t b) const { return offset(step) + b; }

  // True when row `b` at `step` starts its sequence for this direction, i.e. reads h0. In the
  // reverse direction a row starts where the next step no longer has it.
  ELMAN_HOST_DEVICE bool reads_initial_state(int64_t step, int64_t b, bool reverse) const {
    if (!reverse) return step == 0;
    return step == steps - 1 || b >= size(step + 1);
  }
  // True when row `b` at `step` is the direction's last step of its sequence (it produces h_n).
  ELMAN_HOST_DEVICE bool writes_final_state(int64_t step, int64_t b, bool reverse) const {
    if (reverse) return step == 0;
    return step == steps - 1 || b >= size(step + 1);
  }

  // The rows of a step that end their sequence there form a suffix [first_final_row, size(step)),
  // and so do the rows that start there: either every row of the step, or exactly those past the
  // neighbouring step's batch size.
  ELMAN_HOST_DEVICE int64_t first_final_row(int64_t step, bool reverse) const {
    if (writes_final_state(step, 0, reverse)) return 0;
    return reverse ? size(step) : size(step + 1);
  }
  ELMAN_HOST_DEVICE int64_t first_initial_row(int64_t step, bool reverse) const {
    if (reads_initial_state(step, 0, reverse)) return 0;
    return reverse ? size(step + 1) : size(step);
  }
};

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
