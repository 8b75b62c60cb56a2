// Index helpers of the CUDA backend, host and device: where a step's rows are and where a row's
// sequence starts and ends, on top of elman.h's definitions, for a padded or a packed input.
#pragma once

#include <cstdint>

#include "../elman.h"

namespace rnn_ext {
namespace gpu {

// The rows of each step. A padded input has no batch_sizes array (every step has `batch` rows at
// t * batch), so the kernels of a padded input read no batch sizes at all, and it can run without
// any host-to-device copy (which is what keeps it capturable in a CUDA graph).
struct StepLayout {
  const int64_t* batch_sizes = nullptr;   // [steps], or null for a padded input
  const int64_t* step_offsets = nullptr;  // [steps], or null for a padded input
  int64_t steps = 0;
  int64_t batch = 0;

  ELMAN_HOST_DEVICE int64_t size(int64_t step) const {
    return batch_sizes != nullptr ? batch_sizes[step] : batch;
  }
  ELMAN_HOST_DEVICE int64_t offset(int64_t step) const {
    return step_offsets != nullptr ? step_offsets[step] : step * batch;
  }
  ELMAN_HOST_DEVICE int64_t row(int64_t step, int64_t b) const { return offset(step) + b; }

  // elman.h's reads_initial_state; without batch sizes every row starts at the direction's first
  // step.
  ELMAN_HOST_DEVICE bool is_first(int64_t step, int64_t b, bool reverse) const {
    if (batch_sizes != nullptr) return reads_initial_state(batch_sizes, steps, step, b, reverse);
    return step == step_at(0, steps, reverse);
  }
  // elman.h's writes_final_state; without batch sizes every row ends at the direction's last step.
  ELMAN_HOST_DEVICE bool is_last(int64_t step, int64_t b, bool reverse) const {
    if (batch_sizes != nullptr) return writes_final_state(batch_sizes, steps, step, b, reverse);
    return step == step_at(steps - 1, steps, reverse);
  }

  // Batch sizes never grow, so the rows of a step that end their sequence there form a suffix
  // [first_final_row, size(step)), and so do the rows that start there. Both follow from is_last /
  // is_first: either every row of the step qualifies, or exactly those past the neighbouring
  // step's batch size.
  ELMAN_HOST_DEVICE int64_t first_final_row(int64_t step, bool reverse) const {
    if (is_last(step, 0, reverse)) return 0;
    return reverse ? size(step) : size(step + 1);
  }
  ELMAN_HOST_DEVICE int64_t first_initial_row(int64_t step, bool reverse) const {
    if (is_first(step, 0, reverse)) return 0;
    return reverse ? size(step + 1) : size(step);
  }
};

// Element (direction, batch row, unit) of a contiguous [D, B, H] state tensor (hx, h_n, grads).
ELMAN_HOST_DEVICE int64_t state_index(int64_t direction, int64_t b, int64_t unit, int64_t batch,
                                      int64_t hidden) {
  return (direction * batch + b) * hidden + unit;
}

// The step that position `position` of the processing order visits: forward runs each direction
// in its own order, backward in the reverse of it.
ELMAN_HOST_DEVICE int64_t step_of_position(int64_t position, int64_t steps, bool reverse,
                                           bool backward) {
  return backward ? step_at(steps - 1 - position, steps, reverse) : step_at(position, steps, reverse);
}

}  // namespace gpu
}  // namespace rnn_ext
