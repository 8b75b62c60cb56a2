// The by-value arguments of the CUDA kernels (plain data: no CUDA runtime, no torch), shared by the
// kernels, their launches and the glue that fills them.
#pragma once

#include <cstdint>

#include "recurrence_plan.h"

namespace rnn_ext {
namespace gpu {

// The persistent recurrence kernel: the problem plus the block shape of its plan, for directions
// [first_direction, first_direction + gridDim.y).
struct RecurrenceArgs {
  RecurrenceProblem problem;
  int first_direction;
  int slice_width;
  int slices;
  int rows_per_group;
  int k_split;
  bool cooperative;
};

// StepGemm regime, forward, one step of one direction, after the GEMM has added h_{t-1} W_hh^T into
// the step's rows of `sequence`: applies the activation in place and copies rows
// [first_final_row, rows) to final_state (h_n of this direction, [B, H]).
struct StepActivation {
  ScalarType scalar_type = ScalarType::Float32;
  Activation activation = Activation::Tanh;
  void* sequence = nullptr;  // [total rows, D*H]
  int64_t row_offset = 0;    // first row of the step
  int64_t rows = 0;          // batch size of the step
  int64_t hidden = 0;
  int64_t directions = 1;
  int64_t direction = 0;
  void* final_state = nullptr;  // this direction's [B, H]
  int64_t first_final_row = 0;
};

// StepGemm regime, backward, one step of one direction: dP = (dh + dL/dh_t) * act'(h_t) for the
// step's rows, with dh = grad_h_n for rows [first_final_row, rows) and the carried gradient for the
// others. Writes dP into grad_pre's rows of the step.
struct StepGradient {
  ScalarType scalar_type = ScalarType::Float32;
  Activation activation = Activation::Tanh;
  void* grad_pre = nullptr;           // [total rows, D*H]
  const void* grad_output = nullptr;  // [total rows, D*H]
  const void* output = nullptr;       // [total rows, D*H]
  int64_t row_offset = 0;
  int64_t rows = 0;
  int64_t hidden = 0;
  int64_t directions = 1;
  int64_t direction = 0;
  const void* carry = nullptr;       // [B, H]: dL/dh_t carried from the later step
  const void* grad_final = nullptr;  // this direction's [B, H] of grad_h_n
  int64_t first_final_row = 0;
};

// previous[row, d, :] = the state the row read at its step in direction d: h0 where the row starts
// its sequence, else the output of the row at the direction's previous step. Used for the W_hh
// gradient of packed input (a padded input uses two GEMMs over shifted views instead).
struct PreviousStates {
  ScalarType scalar_type = ScalarType::Float32;
  void* previous = nullptr;               // [total rows, D*H]
  const void* output = nullptr;           // [total rows, D*H]
  const void* hx = nullptr;               // [D, B, H]
  const int64_t* batch_sizes = nullptr;   // device, null for a padded input
  const int64_t* step_offsets = nullptr;  // device, null for a padded input
  int64_t steps = 0;
  int64_t batch = 0;
  int64_t hidden = 0;
  int64_t directions = 1;
};

}  // namespace gpu
}  // namespace rnn_ext
