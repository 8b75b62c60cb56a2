// The CUDA kernels of one Elman layer, on raw pointers and a cudaStream_t (no torch headers), and the
// plan that picks how the recurrence runs on a given device. elman_cuda.cpp adapts tensors to this.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../elman.h"

namespace rnn_ext {
namespace gpu {

enum class ScalarType : int32_t { Float32, Float64, Float16, BFloat16 };

// How the sequential recurrence runs (docs/design.md, "CUDA recurrence").
enum class Regime : int32_t {
  Auto = 0,         // the planner picks the first that fits, in the order below
  SingleBlock = 1,  // all of W_hh in one block's shared memory; independent batch-tile blocks
  Cooperative = 2,  // W_hh sliced over a co-resident grid; one grid barrier per step
  StepGemm = 3,     // per step: a cuBLAS GEMM (through ATen) and a fused pointwise kernel
};

const char* regime_name(Regime regime);

// One recurrence launch. The input projection is already in `sequence` (forward), so the kernels
// only run h_t = act(P_t + h_{t-1} W_hh^T), or its reverse-mode counterpart. Every [rows, D*H]
// buffer uses output_index() from elman.h; every [D, B, H] buffer is contiguous.
struct RecurrenceProblem {
  ScalarType scalar_type = ScalarType::Float32;
  Activation activation = Activation::Tanh;
  bool backward = false;
  int64_t steps = 0;
  int64_t batch = 0;   // rows of the first (largest) step
  int64_t hidden = 0;
  int64_t directions = 1;
  // Device copies of batch_sizes [steps] and step_offsets [steps]; both null for a padded input.
  const int64_t* batch_sizes = nullptr;
  const int64_t* step_offsets = nullptr;
  const void* weight_hh[2] = {nullptr, nullptr};  // per direction, [H, H] contiguous
  const void* initial = nullptr;  // [D, B, H]: hx (forward) or grad_h_n (backward)
  void* final_state = nullptr;    // [D, B, H]: h_n (forward) or grad_hx (backward)
  // [rows, D*H]. Forward: holds P = x W_ih^T + b on entry and the outputs h on exit.
  // Backward: receives dL/dP, the gradient of the pre-activations.
  void* sequence = nullptr;
  const void* grad_output = nullptr;  // [rows, D*H], backward only
  const void* output = nullptr;       // [rows, D*H], backward only: act' is read off h
  void* exchange = nullptr;           // Cooperative only: exchange_bytes() of scratch
};

// What the planner needs to know about the device; the glue fills it from cudaDeviceProp.
struct DeviceLimits {
  int device = 0;
  int sm_count = 1;
  int64_t shared_memory_per_block_optin = 48 * 1024;
  bool cooperative_launch = false;
};

// How one recurrence is laid out on the device. Blocks are (batch group x hidden slice) along x and
// one direction each along y.
struct RecurrencePlan {
  Regime regime = Regime::StepGemm;
  int batch_tile = 1;      // rows whose accumulators one thread keeps in registers (1, 2, 4, 8)
  int slice_width = 0;     // hidden units one block owns (= hidden for SingleBlock)
  int slices = 1;          // blocks along the hidden dimension
  int rows_per_group = 0;  // batch rows one block owns (= batch_tile for SingleBlock)
  int groups = 1;          // blocks along the batch dimension
  int k_split = 1;         // warps sharing one hidden unit's dot product
  int threads = 0;
  int64_t shared_bytes = 0;
  int launch_directions = 1;  // directions per launch: all of them, or one launch each
  // Why a regime was not possible (static text), for the error when it was asked for explicitly.
  const char* rejected = nullptr;
};

// Picks the regime and launch shape. `requested` = Auto tries SingleBlock, then Cooperative, then
// StepGemm; any other value returns that regime or, when it cannot run here, a plan whose
// `rejected` says why. `max_slice_width` > 0 caps the hidden units per Cooperative block (tests use
// it to force several slices at small sizes).
RecurrencePlan plan_recurrence(const RecurrenceProblem& problem, const DeviceLimits& limits,
                               Regime requested, int max_slice_width);

// Scratch the Cooperative regime exchanges states through: two [D, B, H] buffers of the
// accumulation type.
int64_t exchange_bytes(const RecurrenceProblem& problem);

// One launch of the persistent recurrence for directions [first_direction, first_direction +
// plan.launch_directions). Returns the launch's error; the caller checks it.
cudaError_t launch_recurrence(const RecurrenceProblem& problem, const RecurrencePlan& plan,
                              int first_direction, cudaStream_t stream);

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
cudaError_t launch_step_activation(const StepActivation& step, cudaStream_t stream);

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
cudaError_t launch_step_gradient(const StepGradient& step, cudaStream_t stream);

// previous[row, d, :] = the state the row read at its step in direction d: h0 where the row starts
// its sequence, else the output of the row at the direction's previous step. Used for the W_hh
// gradient of packed input (a padded input uses two GEMMs over shifted views instead).
struct PreviousStates {
  ScalarType scalar_type = ScalarType::Float32;
  void* previous = nullptr;      // [total rows, D*H]
  const void* output = nullptr;  // [total rows, D*H]
  const void* hx = nullptr;      // [D, B, H]
  const int64_t* batch_sizes = nullptr;   // device, null for a padded input
  const int64_t* step_offsets = nullptr;  // device, null for a padded input
  int64_t steps = 0;
  int64_t batch = 0;
  int64_t hidden = 0;
  int64_t directions = 1;
};
cudaError_t launch_gather_previous_states(const PreviousStates& gather, cudaStream_t stream);

}  // namespace gpu
}  // namespace rnn_ext
