// How one Elman recurrence is laid out on a CUDA device: the problem, the device limits the planner
// reads, the plan it picks, and the shared-memory arithmetic the kernel repeats. Pure host C++ (no
// CUDA runtime, no torch), so the planner also runs, and is tested, without a GPU.
#pragma once

#include <cstdint>
#include <functional>

#include "../elman.h"

namespace rnn_ext {
namespace gpu {

constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 16;
constexpr int kMaxThreads = kWarpSize * kMaxWarps;
// (row, unit) elements one thread finishes per tile: its pre-loaded operands live in registers, so
// the count is a compile-time bound and the planner keeps tiles within it.
constexpr int kPostSlots = 4;
// Batch rows per register tile the kernel is instantiated for.
constexpr int kBatchTiles[] = {1, 2, 4, 8};
constexpr int kPointwiseThreads = 256;

enum class ScalarType : int32_t { Float32, Float64, Float16, BFloat16 };

// How the sequential recurrence runs (docs/design.md, "CUDA recurrence").
enum class Regime : int32_t {
  Auto = 0,         // the planner picks the first that fits, in the order below
  SingleBlock = 1,  // all of W_hh in one block's shared memory; independent batch-tile blocks
  Cooperative = 2,  // W_hh sliced over a co-resident grid; one grid barrier per step
  StepGemm = 3,     // per step: a cuBLAS GEMM (through ATen) and a fused pointwise kernel
};

const char* regime_name(Regime regime);

// The user's settings for the CUDA path, read per call (RNN_EXT_CUDA_REGIME,
// RNN_EXT_CUDA_MAX_SLICE).
struct CudaOptions {
  Regime regime = Regime::Auto;
  // > 0 caps the hidden units per Cooperative block (tests use it to force several slices at small
  // sizes); 0 leaves the width to the planner.
  int max_slice_width = 0;
};

// One recurrence launch. The input projection is already in `sequence` (forward), so the kernels
// only run h_t = act(P_t + h_{t-1} W_hh^T), or its reverse-mode counterpart. Every [rows, D*H]
// buffer uses output_index() from elman.h; every [D, B, H] buffer is contiguous.
struct RecurrenceProblem {
  ScalarType scalar_type = ScalarType::Float32;
  Activation activation = Activation::Tanh;
  bool backward = false;
  int64_t steps = 0;
  int64_t batch = 0;  // rows of the first (largest) step
  int64_t hidden = 0;
  int64_t directions = 1;
  // Device copies of batch_sizes [steps] and step_offsets [steps]; both null for a padded input.
  const int64_t* batch_sizes = nullptr;
  const int64_t* step_offsets = nullptr;
  const void* weight_hh[2] = {nullptr, nullptr};  // per direction, [H, H] contiguous
  const void* initial = nullptr;                  // [D, B, H]: hx (forward) or grad_h_n (backward)
  void* final_state = nullptr;                    // [D, B, H]: h_n (forward) or grad_hx (backward)
  // [rows, D*H]. Forward: holds P = x W_ih^T + b on entry and the outputs h on exit.
  // Backward: receives dL/dP, the gradient of the pre-activations.
  void* sequence = nullptr;
  const void* grad_output = nullptr;  // [rows, D*H], backward only
  const void* output = nullptr;       // [rows, D*H], backward only: act' is read off h
  void* exchange = nullptr;           // Cooperative only: exchange_bytes() of scratch
};

// What the planner needs to know about the device (elman_launch.cu reads it once per device).
struct DeviceLimits {
  int device = 0;
  int sm_count = 1;
  int64_t shared_memory_per_block_optin = 48 * 1024;
  bool cooperative_launch = false;
};

// Blocks of the recurrence kernel for `scalar_type` and `batch_tile` that one SM holds at once with
// `threads` threads and `shared_bytes` of dynamic shared memory; 0 when none or when the device
// cannot say. The launch side answers it from the CUDA runtime's occupancy calculator.
using ResidentBlocks =
    std::function<int(ScalarType scalar_type, int batch_tile, int threads, int64_t shared_bytes)>;

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

// Picks the regime and launch shape. options.regime = Auto tries SingleBlock, then Cooperative,
// then StepGemm; any other value returns that regime or, when it cannot run here, a plan whose
// `rejected` says why. `resident_blocks` is asked only by the Cooperative regime, whose grid must
// be co-resident.
RecurrencePlan plan_recurrence(const RecurrenceProblem& problem, const DeviceLimits& limits,
                               const CudaOptions& options, const ResidentBlocks& resident_blocks);

// Scratch the Cooperative regime exchanges states through: two [D, B, H] buffers of the
// accumulation type.
int64_t exchange_bytes(const RecurrenceProblem& problem);

ELMAN_HOST_DEVICE constexpr int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}
ELMAN_HOST_DEVICE constexpr int64_t ceil_div(int64_t value, int64_t divisor) {
  return (value + divisor - 1) / divisor;
}

// Shared memory of the recurrence kernel, in this order, each part 16-byte aligned:
//   weights  [quads][slice_width][4] of T: A's columns of the block's units, four consecutive rows
//            m of a column side by side so that one vector load fetches them;
//   states   [batch_tile][hidden4] of Acc: the tile's x (zero past hidden, so quads need no tail);
//   partials [k_split][batch_tile][slice_width] of Acc: per-warp partial dot products.
struct SharedLayout {
  int64_t weights_bytes;
  int64_t states_bytes;
  int64_t partials_bytes;
  ELMAN_HOST_DEVICE int64_t total() const { return weights_bytes + states_bytes + partials_bytes; }
};

ELMAN_HOST_DEVICE SharedLayout shared_layout(int64_t hidden, int slice_width, int batch_tile,
                                             int k_split, int64_t element_bytes,
                                             int64_t accumulator_bytes) {
  const int64_t hidden4 = round_up(hidden, 4);
  SharedLayout layout;
  layout.weights_bytes = round_up(hidden4 * slice_width * element_bytes, 16);
  layout.states_bytes = round_up(batch_tile * hidden4 * accumulator_bytes, 16);
  layout.partials_bytes =
      round_up(int64_t(k_split) * batch_tile * slice_width * accumulator_bytes, 16);
  return layout;
}

inline int64_t element_bytes(ScalarType type) {
  switch (type) {
    case ScalarType::Float64:
      return 8;
    case ScalarType::Float32:
      return 4;
    default:
      return 2;
  }
}

inline int64_t accumulator_bytes(ScalarType type) { return type == ScalarType::Float64 ? 8 : 4; }

// Blocks of a grid-stride pointwise kernel over `count` elements: enough to fill a large GPU, never
// more than the work needs.
inline unsigned pointwise_blocks(int64_t count) {
  const int64_t blocks = ceil_div(count, kPointwiseThreads);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 4096 ? 4096 : blocks));
}

}  // namespace gpu
}  // namespace rnn_ext
