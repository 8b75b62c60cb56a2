// The CUDA kernels of one Elman layer and the planner that picks how its recurrence runs. No torch
// headers: this file compiles with nvcc alone. The input projection and all weight/input gradients
// are GEMMs in the glue (elman_cuda.cpp); here is only the sequential part and its pointwise helpers.
//
// The persistent recurrence kernel serves two regimes with one body:
//  - SingleBlock: each block holds all of W_hh in shared memory and the states of a tile of batch
//    rows, and loops over every step alone (only __syncthreads, no grid-wide barrier).
//  - Cooperative: each block holds a slice of W_hh's columns; blocks exchange the states of a step
//    through L2 (a double-buffered scratch) and meet at one grid barrier per step.
// Per step, a block computes u = x A for its units, where x is the state its tile carries and
// A = W_hh^T (forward: u = h_{t-1} W_hh^T) or A = W_hh (backward: u = dP_t W_hh = dL/dh_{t-1}).
#include "elman_kernels.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "../elman.h"

namespace rnn_ext {
namespace gpu {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 16;
constexpr int kMaxThreads = kWarpSize * kMaxWarps;
// (row, unit) elements one thread finishes per tile: its pre-loaded operands live in registers, so
// the count is a compile-time bound and the planner keeps tiles within it.
constexpr int kPostSlots = 4;
// Batch rows per register tile the kernel is instantiated for.
constexpr int kBatchTiles[] = {1, 2, 4, 8};
constexpr int kPointwiseThreads = 256;

// Storage type <-> accumulation type. Half types accumulate in float32, as cuDNN and the CPU do.
template <typename T>
struct Scalar;
template <>
struct Scalar<float> {
  using Acc = float;
  static __device__ __forceinline__ float widen(float v) { return v; }
  static __device__ __forceinline__ float narrow(float v) { return v; }
};
template <>
struct Scalar<double> {
  using Acc = double;
  static __device__ __forceinline__ double widen(double v) { return v; }
  static __device__ __forceinline__ double narrow(double v) { return v; }
};
template <>
struct Scalar<__half> {
  using Acc = float;
  static __device__ __forceinline__ float widen(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half narrow(float v) { return __float2half_rn(v); }
};
template <>
struct Scalar<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 narrow(float v) { return __float2bfloat16_rn(v); }
};

// Four consecutive elements in one vector load (16 bytes for float, 8 for the half types, two
// 16-byte loads for double), widened to the accumulation type. Callers keep them aligned.
__device__ __forceinline__ void load_quad(const float* source, float (&value)[4]) {
  const float4 q = *reinterpret_cast<const float4*>(source);
  value[0] = q.x, value[1] = q.y, value[2] = q.z, value[3] = q.w;
}
__device__ __forceinline__ void load_quad(const double* source, double (&value)[4]) {
  const double2 low = reinterpret_cast<const double2*>(source)[0];
  const double2 high = reinterpret_cast<const double2*>(source)[1];
  value[0] = low.x, value[1] = low.y, value[2] = high.x, value[3] = high.y;
}
__device__ __forceinline__ void load_quad(const __half* source, float (&value)[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(source);
  value[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(raw.x & 0xffffu)));
  value[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(raw.x >> 16)));
  value[2] = __half2float(__ushort_as_half(static_cast<unsigned short>(raw.y & 0xffffu)));
  value[3] = __half2float(__ushort_as_half(static_cast<unsigned short>(raw.y >> 16)));
}
__device__ __forceinline__ void load_quad(const __nv_bfloat16* source, float (&value)[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(source);
  value[0] = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(raw.x & 0xffffu)));
  value[1] = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(raw.x >> 16)));
  value[2] = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(raw.y & 0xffffu)));
  value[3] = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(raw.y >> 16)));
}

__host__ __device__ constexpr int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}
__host__ __device__ constexpr int64_t ceil_div(int64_t value, int64_t divisor) {
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
  __host__ __device__ int64_t total() const { return weights_bytes + states_bytes + partials_bytes; }
};

__host__ __device__ inline SharedLayout shared_layout(int64_t hidden, int slice_width, int batch_tile,
                                                      int k_split, int64_t element_bytes,
                                                      int64_t accumulator_bytes) {
  const int64_t hidden4 = round_up(hidden, 4);
  SharedLayout layout;
  layout.weights_bytes = round_up(hidden4 * slice_width * element_bytes, 16);
  layout.states_bytes = round_up(batch_tile * hidden4 * accumulator_bytes, 16);
  layout.partials_bytes = round_up(int64_t(k_split) * batch_tile * slice_width * accumulator_bytes, 16);
  return layout;
}

struct RecurrenceArgs {
  RecurrenceProblem problem;
  int first_direction;
  int slice_width;
  int slices;
  int rows_per_group;
  int k_split;
  bool cooperative;
};

template <typename T, int kBatchTile>
__global__ void __launch_bounds__(kMaxThreads, 1) elman_recurrence_kernel(const RecurrenceArgs args) {
  using Acc = typename Scalar<T>::Acc;
  const RecurrenceProblem& p = args.problem;
  const int hidden = static_cast<int>(p.hidden);
  const int hidden4 = static_cast<int>(round_up(hidden, 4));
  const int quads = hidden4 / 4;
  const int64_t batch = p.batch;
  const int64_t steps = p.steps;
  const int64_t directions = p.directions;
  const int direction = args.first_direction + static_cast<int>(blockIdx.y);
  const bool reverse = direction == 1;
  const int pitch = args.slice_width;
  const int unit_begin = static_cast<int>(blockIdx.x % args.slices) * pitch;
  const int width = min(pitch, hidden - unit_begin);  // units this block owns
  const int64_t rows_begin = static_cast<int64_t>(blockIdx.x / args.slices) * args.rows_per_group;
  const int64_t rows_end = min(batch, rows_begin + args.rows_per_group);
  const int threads = static_cast<int>(blockDim.x);
  const int tid = static_cast<int>(threadIdx.x);
  const Activation activation = p.activation;
  const StepLayout layout{p.batch_sizes, p.step_offsets, steps, batch};

  const SharedLayout shared =
      shared_layout(hidden, pitch, kBatchTile, args.k_split, sizeof(T), sizeof(Acc));
  extern __shared__ __align__(16) unsigned char shared_memory[];
  T* weights = reinterpret_cast<T*>(shared_memory);
  Acc* states = reinterpret_cast<Acc*>(shared_memory + shared.weights_bytes);
  Acc* partials = reinterpret_cast<Acc*>(shared_memory + shared.weights_bytes + shared.states_bytes);

  T* sequence = static_cast<T*>(p.sequence);
  const T* initial = static_cast<const T*>(p.initial);
  T* final_state = static_cast<T*>(p.final_state);
  const T* grad_output = static_cast<const T*>(p.grad_output);
  const T* output = static_cast<const T*>(p.output);
  Acc* exchange = static_cast<Acc*>(p.exchange);
  const int64_t exchange_plane = directions * batch * p.hidden;

  // A's columns for this block, read once for all steps.
  {
    // Selected without indexing the parameter array by a run-time value, which would copy the
    // whole argument block to local memory.
    const T* weight = static_cast<const T*>(direction == 0 ? p.weight_hh[0] : p.weight_hh[1]);
    // Consecutive threads walk W_hh's contiguous dimension (coalesced global reads; the scattered
    // shared-memory writes are the cheaper side): m for A = W_hh^T, the unit for A = W_hh.
    const int count = hidden4 * pitch;
    for (int i = tid; i < count; i += threads) {
      const int m = p.backward ? i / pitch : i % hidden4;
      const int column = p.backward ? i % pitch : i / hidden4;
      const int64_t n = unit_begin + column;
      T value = Scalar<T>::narrow(Acc(0));
      if (m < hidden && column < width) value = p.backward ? weight[int64_t(m) * hidden + n] : weight[n * hidden + m];
      weights[((m >> 2) * pitch + column) * 4 + (m & 3)] = value;
    }
  }

  // The state each tile starts from. Single block: the tile's rows persist in `states` across steps
  // (rows that have not started keep h0, rows that are done are never touched again). Cooperative:
  // `states` is restaged every step, and backward seeds the exchange with the first step's dP.
  {
    const int64_t first_step = step_of_position(0, steps, reverse, p.backward);
    const int64_t first_active = layout.size(first_step);
    const int state_width = args.cooperative ? width : hidden;
    const int count = kBatchTile * hidden4;
    for (int i = tid; i < count; i += threads) states[i] = Acc(0);
    if (!args.cooperative) __syncthreads();
    const int seeded = args.cooperative ? static_cast<int>(rows_end - rows_begin) * state_width
                                        : kBatchTile * state_width;
    for (int i = tid; i < seeded; i += threads) {
      const int b = i / state_width;
      const int column = i % state_width;
      const int64_t row = rows_begin + b;
      const int64_t n = unit_begin + column;
      if (row >= rows_end) continue;
      const int64_t at = state_index(direction, row, n, batch, p.hidden);
      if (!p.backward) {
        if (!args.cooperative) states[b * hidden4 + n] = Scalar<T>::widen(initial[at]);
        continue;
      }
      // Backward starts at the direction's last step, where every active row ends its sequence,
      // so its dL/dh is grad_h_n alone.
      if (row >= first_active) continue;
      const int64_t index = output_index(layout.row(first_step, row), direction, n, p.hidden, directions);
      const Acc grad_pre = activation_backward(
          Scalar<T>::widen(initial[at]) + Scalar<T>::widen(grad_output[index]),
          Scalar<T>::widen(output[index]), activation);
      sequence[index] = Scalar<T>::narrow(grad_pre);
      if (args.cooperative) {
        exchange[at] = grad_pre;
      } else {
        states[b * hidden4 + n] = grad_pre;
      }
    }
  }
  if (args.cooperative) {
    cooperative_groups::this_grid().sync();
  } else {
    __syncthreads();
  }

  // This thread's part of the product: one unit (lane-consecutive, so the weight loads are
  // conflict-free) and a contiguous run of quads; the warps of one unit group split the quads.
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int unit_groups = (pitch + kWarpSize - 1) / kWarpSize;
  const int my_column = (warp % unit_groups) * kWarpSize + lane;
  const int k_part = warp / unit_groups;
  const int quads_per_part = (quads + args.k_split - 1) / args.k_split;
  const int quad_begin = min(quads, k_part * quads_per_part);
  const int quad_end = min(quads, quad_begin + quads_per_part);
  const bool computes = my_column < width && k_part < args.k_split;
  const T* my_weights = weights + my_column * 4;
  const int tile_elements = kBatchTile * width;

  for (int64_t position = 0; position < steps; ++position) {
    const int64_t step = step_of_position(position, steps, reverse, p.backward);
    const bool has_next = position + 1 < steps;
    const int64_t next_step = has_next ? step_of_position(position + 1, steps, reverse, p.backward) : step;
    const int64_t active = layout.size(step);
    const int64_t next_active = has_next ? layout.size(next_step) : 0;
    const int64_t read_plane = (position & 1) * exchange_plane;
    const int64_t write_plane = exchange_plane - read_plane;

    for (int64_t tile_begin = rows_begin; tile_begin < rows_end; tile_begin += kBatchTile) {
      // Uniform across the block: a tile with no row to update at this step is skipped whole.
      if (tile_begin >= active && !(p.backward && tile_begin < next_active)) continue;

      // Issue the loads the finishing phase needs now, so that their latency hides behind the
      // product: P_t (forward), or dL/dh and h of the next step (backward).
      Acc first[kPostSlots];
      Acc second[kPostSlots];
#pragma unroll
      for (int slot = 0; slot < kPostSlots; ++slot) {
        first[slot] = Acc(0);
        second[slot] = Acc(0);
        const int e = tid + slot * threads;
        if (e >= tile_elements) continue;
        const int64_t row = tile_begin + e / width;
        const int64_t n = unit_begin + e % width;
        if (row >= rows_end) continue;
        if (!p.backward) {
          if (row < active) {
            first[slot] = Scalar<T>::widen(
                sequence[output_index(layout.row(step, row), direction, n, p.hidden, directions)]);
          }
        } else if (row < next_active) {
          const int64_t index = output_index(layout.row(next_step, row), direction, n, p.hidden, directions);
          first[slot] = Scalar<T>::widen(grad_output[index]);
          second[slot] = Scalar<T>::widen(output[index]);
        }
      }

      if (args.cooperative) {
        // Stage the tile's states of this step. The exchange is written by other blocks during the
        // kernel, so it is read through L2 only (ld.global.cg), never from a stale L1 line.
        const int count = kBatchTile * hidden;
        for (int i = tid; i < count; i += threads) {
          const int b = i / hidden;
          const int m = i % hidden;
          const int64_t row = tile_begin + b;
          Acc value = Acc(0);
          if (row < rows_end && row < active) {
            const int64_t at = state_index(direction, row, m, batch, p.hidden);
            if (!p.backward && layout.reads_initial_state(step, row, reverse)) {
              value = Scalar<T>::widen(initial[at]);
            } else {
              value = __ldcg(exchange + read_plane + at);
            }
          }
          states[b * hidden4 + m] = value;
        }
        __syncthreads();
      }

      Acc sum[kBatchTile];
#pragma unroll
      for (int b = 0; b < kBatchTile; ++b) sum[b] = Acc(0);
      if (computes) {
#pragma unroll 1
        for (int q = quad_begin; q < quad_end; ++q) {
          Acc a[4];
          load_quad(my_weights + q * pitch * 4, a);
#pragma unroll
          for (int b = 0; b < kBatchTile; ++b) {
            Acc x[4];
            load_quad(states + b * hidden4 + q * 4, x);
            sum[b] += a[0] * x[0] + a[1] * x[1] + a[2] * x[2] + a[3] * x[3];
          }
        }
#pragma unroll
        for (int b = 0; b < kBatchTile; ++b) {
          partials[(k_part * kBatchTile + b) * pitch + my_column] = sum[b];
        }
      }
      __syncthreads();

      // Finish each (row, unit) of the tile: reduce the warps' partial sums, then
      // forward:  h = act(P + u), written to the output, the next state and (at its end) h_n;
      // backward: u = dL/dh_{t-1}; rows starting here give grad_hx, the others the next dP.
#pragma unroll
      for (int slot = 0; slot < kPostSlots; ++slot) {
        const int e = tid + slot * threads;
        if (e >= tile_elements) continue;
        const int b = e / width;
        const int column = e % width;
        const int64_t row = tile_begin + b;
        const int64_t n = unit_begin + column;
        if (row >= rows_end) continue;
        Acc u = Acc(0);
        for (int k = 0; k < args.k_split; ++k) u += partials[(k * kBatchTile + b) * pitch + column];
        const int64_t at = state_index(direction, row, n, batch, p.hidden);
        if (!p.backward) {
          if (row >= active) continue;
          const Acc h = activate(first[slot] + u, activation);
          sequence[output_index(layout.row(step, row), direction, n, p.hidden, directions)] =
              Scalar<T>::narrow(h);
          if (args.cooperative) {
            exchange[write_plane + at] = h;
          } else {
            states[b * hidden4 + n] = h;
          }
          if (layout.writes_final_state(step, row, reverse)) final_state[at] = Scalar<T>::narrow(h);
          continue;
        }
        if (row < active && layout.reads_initial_state(step, row, reverse)) final_state[at] = Scalar<T>::narrow(u);
        if (row < next_active) {
          // A row joining at the next step ends its sequence there: its dL/dh is grad_h_n.
          const Acc grad_h = layout.writes_final_state(next_step, row, reverse) ? Scalar<T>::widen(initial[at]) : u;
          const Acc grad_pre = activation_backward(grad_h + first[slot], second[slot], activation);
          sequence[output_index(layout.row(next_step, row), direction, n, p.hidden, directions)] =
              Scalar<T>::narrow(grad_pre);
          if (args.cooperative) {
            exchange[write_plane + at] = grad_pre;
          } else {
            states[b * hidden4 + n] = grad_pre;
          }
        }
      }
      // The next tile (or step) overwrites `states` and `partials`.
      __syncthreads();
    }
    // Every block's states of this step are in the exchange before any block stages the next.
    if (args.cooperative) cooperative_groups::this_grid().sync();
  }
}

template <typename T>
__global__ void __launch_bounds__(kPointwiseThreads) step_activation_kernel(const StepActivation s) {
  using Acc = typename Scalar<T>::Acc;
  T* sequence = static_cast<T*>(s.sequence);
  T* final_state = static_cast<T*>(s.final_state);
  const int64_t count = s.rows * s.hidden;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    const int64_t b = i / s.hidden;
    const int64_t n = i % s.hidden;
    const int64_t index = output_index(s.row_offset + b, s.direction, n, s.hidden, s.directions);
    const T h = Scalar<T>::narrow(activate(Scalar<T>::widen(sequence[index]), s.activation));
    sequence[index] = h;
    if (b >= s.first_final_row) final_state[b * s.hidden + n] = h;
  }
}

template <typename T>
__global__ void __launch_bounds__(kPointwiseThreads) step_gradient_kernel(const StepGradient s) {
  using Acc = typename Scalar<T>::Acc;
  T* grad_pre = static_cast<T*>(s.grad_pre);
  const T* grad_output = static_cast<const T*>(s.grad_output);
  const T* output = static_cast<const T*>(s.output);
  const T* carry = static_cast<const T*>(s.carry);
  const T* grad_final = static_cast<const T*>(s.grad_final);
  const int64_t count = s.rows * s.hidden;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    const int64_t b = i / s.hidden;
    const int64_t index = output_index(s.row_offset + b, s.direction, i % s.hidden, s.hidden, s.directions);
    const Acc grad_h = Scalar<T>::widen(b >= s.first_final_row ? grad_final[i] : carry[i]);
    const Acc value = activation_backward(grad_h + Scalar<T>::widen(grad_output[index]),
                                          Scalar<T>::widen(output[index]), s.activation);
    grad_pre[index] = Scalar<T>::narrow(value);
  }
}

template <typename T>
__global__ void __launch_bounds__(kPointwiseThreads) gather_previous_states_kernel(const PreviousStates g) {
  T* previous = static_cast<T*>(g.previous);
  const T* output = static_cast<const T*>(g.output);
  const T* hx = static_cast<const T*>(g.hx);
  const StepLayout layout{g.batch_sizes, g.step_offsets, g.steps, g.batch};
  const int64_t width = g.directions * g.hidden;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t step = blockIdx.y; step < g.steps; step += gridDim.y) {
    const int64_t count = layout.size(step) * width;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
      const int64_t b = i / width;
      const int64_t direction = (i % width) / g.hidden;
      const int64_t n = i % g.hidden;
      const bool reverse = direction == 1;
      T value;
      if (layout.reads_initial_state(step, b, reverse)) {
        value = hx[state_index(direction, b, n, g.batch, g.hidden)];
      } else {
        value = output[output_index(layout.row(previous_step(step, reverse), b), direction, n, g.hidden,
                                    g.directions)];
      }
      previous[output_index(layout.row(step, b), direction, n, g.hidden, g.directions)] = value;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: kernel lookup, shared-memory opt-in, planning and launches.

int64_t element_bytes(ScalarType type) {
  switch (type) {
    case ScalarType::Float64: return 8;
    case ScalarType::Float32: return 4;
    default: return 2;
  }
}

int64_t accumulator_bytes(ScalarType type) { return type == ScalarType::Float64 ? 8 : 4; }

template <typename T>
const void* recurrence_kernel_of(int batch_tile) {
  switch (batch_tile) {
    case 1: return reinterpret_cast<const void*>(&elman_recurrence_kernel<T, 1>);
    case 2: return reinterpret_cast<const void*>(&elman_recurrence_kernel<T, 2>);
    case 4: return reinterpret_cast<const void*>(&elman_recurrence_kernel<T, 4>);
    default: return reinterpret_cast<const void*>(&elman_recurrence_kernel<T, 8>);
  }
}

const void* recurrence_kernel(ScalarType type, int batch_tile) {
  switch (type) {
    case ScalarType::Float64: return recurrence_kernel_of<double>(batch_tile);
    case ScalarType::Float16: return recurrence_kernel_of<__half>(batch_tile);
    case ScalarType::BFloat16: return recurrence_kernel_of<__nv_bfloat16>(batch_tile);
    default: return recurrence_kernel_of<float>(batch_tile);
  }
}

// A block may use more than 48 KB of dynamic shared memory only after the kernel's limit is raised,
// once per kernel and device. Raised straight to the device's opt-in maximum, so a later, larger
// plan needs no second call.
cudaError_t allow_shared_memory(const void* kernel, const DeviceLimits& limits, int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, bool> raised;
  std::lock_guard<std::mutex> lock(mutex);
  bool& done = raised[{kernel, limits.device}];
  if (done) return cudaSuccess;
  const cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(limits.shared_memory_per_block_optin));
  done = error == cudaSuccess;
  return error;
}

int smallest_tile_at_least(int64_t rows) {
  for (const int tile : kBatchTiles) {
    if (tile >= rows) return tile;
  }
  return kBatchTiles[sizeof(kBatchTiles) / sizeof(kBatchTiles[0]) - 1];
}

// Warps splitting one unit's dot product: as many as the block allows, but each keeps at least 16
// rows of A (4 quads) so that the reduction does not outweigh the product.
int k_split_for(int slice_width, int64_t hidden) {
  const int unit_groups = static_cast<int>(ceil_div(slice_width, kWarpSize));
  const int most = std::max(1, kMaxWarps / unit_groups);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(most, ceil_div(round_up(hidden, 4), 16))));
}

int threads_for(int slice_width, int k_split) {
  return static_cast<int>(ceil_div(slice_width, kWarpSize)) * kWarpSize * k_split;
}

// Finds the widest k-split (at most k_split_for) for which a block of `slice_width` units and a
// register tile of `tile` rows fits in shared memory, with the tile small enough for the finishing
// phase's slots. Returns false when none does.
bool fit_block(const RecurrenceProblem& problem, const DeviceLimits& limits, int slice_width, int tile,
               RecurrencePlan& plan) {
  const int unit_groups = static_cast<int>(ceil_div(slice_width, kWarpSize));
  if (unit_groups > kMaxWarps) return false;
  for (int k_split = k_split_for(slice_width, problem.hidden); k_split >= 1; --k_split) {
    const int threads = threads_for(slice_width, k_split);
    if (int64_t(tile) * slice_width > int64_t(kPostSlots) * threads) return false;  // fewer warps: worse
    const int64_t bytes =
        shared_layout(problem.hidden, slice_width, tile, k_split, element_bytes(problem.scalar_type),
                      accumulator_bytes(problem.scalar_type))
            .total();
    if (bytes > limits.shared_memory_per_block_optin) continue;
    plan.batch_tile = tile;
    plan.k_split = k_split;
    plan.threads = threads;
    plan.shared_bytes = bytes;
    return true;
  }
  return false;
}

RecurrencePlan plan_single_block(const RecurrenceProblem& problem, const DeviceLimits& limits) {
  RecurrencePlan plan;
  plan.regime = Regime::SingleBlock;
  if (problem.hidden > int64_t(kMaxWarps) * kWarpSize) {
    plan.rejected = "hidden_size is larger than one block's units (512)";
    return plan;
  }
  const int width = static_cast<int>(problem.hidden);
  // Enough rows per block that all blocks run at once, and at least 4 where the batch has them:
  // up to 4 rows cost about the same per step as 1, since reading W_hh from shared memory is the
  // bound there.
  const int64_t rows_for_one_wave = ceil_div(problem.batch * problem.directions, limits.sm_count);
  int tile = smallest_tile_at_least(std::max<int64_t>(rows_for_one_wave, std::min<int64_t>(problem.batch, 4)));
  while (tile >= 1 && !fit_block(problem, limits, width, tile, plan)) tile /= 2;
  if (tile < 1) {
    plan.rejected = "W_hh does not fit in one block's shared memory on this device";
    return plan;
  }
  plan.slice_width = width;
  plan.slices = 1;
  plan.rows_per_group = plan.batch_tile;
  plan.groups = static_cast<int>(ceil_div(problem.batch, plan.batch_tile));
  plan.launch_directions = static_cast<int>(problem.directions);
  plan.rejected = nullptr;
  return plan;
}

RecurrencePlan plan_cooperative(const RecurrenceProblem& problem, const DeviceLimits& limits,
                                int max_slice_width) {
  RecurrencePlan plan;
  plan.regime = Regime::Cooperative;
  if (!limits.cooperative_launch) {
    plan.rejected = "the device does not support cooperative launches";
    return plan;
  }
  const int64_t hidden = problem.hidden;
  // Both directions in one grid when the chip holds both; else one launch per direction.
  for (int launch_directions = static_cast<int>(problem.directions); launch_directions >= 1;
       --launch_directions) {
    const int64_t budget = limits.sm_count / launch_directions;  // one block per SM
    const int64_t narrowest = ceil_div(hidden, budget);
    // A warp's 32 lanes span 32 units: slices narrower than that leave lanes idle, so the
    // preferred width is 32 (or all of H), widened only when the chip has too few SMs for it.
    int64_t widest = std::max<int64_t>(narrowest, std::min<int64_t>(hidden, kWarpSize));
    if (max_slice_width > 0) widest = std::min<int64_t>(widest, max_slice_width);
    if (widest < narrowest || widest > int64_t(kMaxWarps) * kWarpSize) continue;
    // The largest register tile first (each extra tile per step restages the states and rereads
    // A), then the widest slice that fits with it (fewer slices: less L2 traffic per step).
    RecurrencePlan candidate = plan;
    bool fitted = false;
    for (int tile = smallest_tile_at_least(problem.batch); tile >= 1 && !fitted; tile /= 2) {
      for (int64_t width = widest; width >= narrowest && !fitted; --width) {
        fitted = fit_block(problem, limits, static_cast<int>(width), tile, candidate);
        if (fitted) candidate.slice_width = static_cast<int>(width);
      }
    }
    if (!fitted) continue;
    // Same number of slices, spread evenly; the narrower block is refitted (its thread count and
    // shared memory follow its width), keeping the first fit if the refit fails.
    candidate.slices = static_cast<int>(ceil_div(hidden, candidate.slice_width));
    const int even_width = static_cast<int>(ceil_div(hidden, candidate.slices));
    if (even_width != candidate.slice_width) {
      RecurrencePlan refit = candidate;
      if (fit_block(problem, limits, even_width, candidate.batch_tile, refit)) {
        candidate = refit;
        candidate.slice_width = even_width;
      }
    }
    const void* kernel = recurrence_kernel(problem.scalar_type, candidate.batch_tile);
    if (allow_shared_memory(kernel, limits, candidate.shared_bytes) != cudaSuccess) {
      cudaGetLastError();  // the planner reports through `rejected`, not the sticky error
      continue;
    }
    int blocks_per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, candidate.threads,
                                                      static_cast<size_t>(candidate.shared_bytes)) !=
        cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    const int64_t resident = int64_t(blocks_per_sm) * limits.sm_count / launch_directions;
    if (resident < candidate.slices) continue;
    // Spare SMs take batch groups, each of at least one register tile of rows.
    const int64_t spare = std::min<int64_t>(budget, resident) / candidate.slices;
    const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(spare, ceil_div(problem.batch, candidate.batch_tile)));
    candidate.rows_per_group = static_cast<int>(ceil_div(problem.batch, groups));
    candidate.groups = static_cast<int>(ceil_div(problem.batch, candidate.rows_per_group));
    candidate.launch_directions = launch_directions;
    candidate.rejected = nullptr;
    return candidate;
  }
  plan.rejected = "W_hh does not fit in the shared memory of the co-resident blocks of this device";
  return plan;
}

}  // namespace

const char* regime_name(Regime regime) {
  switch (regime) {
    case Regime::Auto: return "auto";
    case Regime::SingleBlock: return "single_block";
    case Regime::Cooperative: return "cooperative";
    case Regime::StepGemm: return "step_gemm";
  }
  return "unknown";
}

RecurrencePlan plan_recurrence(const RecurrenceProblem& problem, const DeviceLimits& limits,
                               Regime requested, int max_slice_width) {
  if (requested == Regime::SingleBlock) return plan_single_block(problem, limits);
  if (requested == Regime::Cooperative) return plan_cooperative(problem, limits, max_slice_width);
  if (requested == Regime::Auto) {
    RecurrencePlan plan = plan_single_block(problem, limits);
    if (plan.rejected == nullptr) return plan;
    plan = plan_cooperative(problem, limits, max_slice_width);
    if (plan.rejected == nullptr) return plan;
  }
  RecurrencePlan plan;
  plan.regime = Regime::StepGemm;
  plan.launch_directions = 1;
  return plan;
}

int64_t exchange_bytes(const RecurrenceProblem& problem) {
  return 2 * problem.directions * problem.batch * problem.hidden * accumulator_bytes(problem.scalar_type);
}

cudaError_t launch_recurrence(const RecurrenceProblem& problem, const RecurrencePlan& plan,
                              int first_direction, cudaStream_t stream) {
  RecurrenceArgs args;
  args.problem = problem;
  args.first_direction = first_direction;
  args.slice_width = plan.slice_width;
  args.slices = plan.slices;
  args.rows_per_group = plan.rows_per_group;
  args.k_split = plan.k_split;
  args.cooperative = plan.regime == Regime::Cooperative;
  const void* kernel = recurrence_kernel(problem.scalar_type, plan.batch_tile);
  DeviceLimits limits;
  cudaError_t error = cudaGetDevice(&limits.device);
  if (error != cudaSuccess) return error;
  int optin = 0;
  error = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, limits.device);
  if (error != cudaSuccess) return error;
  limits.shared_memory_per_block_optin = optin;
  error = allow_shared_memory(kernel, limits, plan.shared_bytes);
  if (error != cudaSuccess) return error;
  const dim3 grid(static_cast<unsigned>(plan.slices * plan.groups), static_cast<unsigned>(plan.launch_directions));
  const dim3 block(static_cast<unsigned>(plan.threads));
  void* params[] = {&args};
  if (args.cooperative) {
    return cudaLaunchCooperativeKernel(kernel, grid, block, params, static_cast<size_t>(plan.shared_bytes), stream);
  }
  return cudaLaunchKernel(kernel, grid, block, params, static_cast<size_t>(plan.shared_bytes), stream);
}

namespace {

unsigned pointwise_blocks(int64_t count) {
  // Grid-stride loops: enough blocks to fill a large GPU, never more than the work needs.
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(count, kPointwiseThreads), 4096)));
}

template <typename Launch>
cudaError_t dispatch(ScalarType type, Launch&& launch) {
  switch (type) {
    case ScalarType::Float64: launch(double()); break;
    case ScalarType::Float16: launch(__half()); break;
    case ScalarType::BFloat16: launch(__nv_bfloat16()); break;
    default: launch(float()); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_step_activation(const StepActivation& step, cudaStream_t stream) {
  const unsigned blocks = pointwise_blocks(step.rows * step.hidden);
  return dispatch(step.scalar_type, [&](auto tag) {
    using T = decltype(tag);
    step_activation_kernel<T><<<blocks, kPointwiseThreads, 0, stream>>>(step);
  });
}

cudaError_t launch_step_gradient(const StepGradient& step, cudaStream_t stream) {
  const unsigned blocks = pointwise_blocks(step.rows * step.hidden);
  return dispatch(step.scalar_type, [&](auto tag) {
    using T = decltype(tag);
    step_gradient_kernel<T><<<blocks, kPointwiseThreads, 0, stream>>>(step);
  });
}

cudaError_t launch_gather_previous_states(const PreviousStates& gather, cudaStream_t stream) {
  const dim3 grid(pointwise_blocks(gather.batch * gather.directions * gather.hidden),
                  static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(gather.steps, 1), 65535)));
  return dispatch(gather.scalar_type, [&](auto tag) {
    using T = decltype(tag);
    gather_previous_states_kernel<T><<<grid, kPointwiseThreads, 0, stream>>>(gather);
  });
}

}  // namespace gpu
}  // namespace rnn_ext
