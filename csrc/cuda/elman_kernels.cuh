// The CUDA kernels of one Elman layer and their device helpers, nothing else: no launches, no
// runtime calls, no torch headers. elman_launch.cu includes it; the host emulation under
// tests/cuda_emulation/ compiles the same text with g++.
//
// The persistent recurrence kernel serves two regimes with one body:
//  - SingleBlock: each block holds all of W_hh in shared memory and the states of a tile of batch
//    rows, and loops over every step alone (only __syncthreads, no grid-wide barrier).
//  - Cooperative: each block holds a slice of W_hh's columns; blocks exchange the states of a step
//    through L2 (a double-buffered scratch) and meet at one grid barrier per step.
// Per step, a block computes u = x A for its units, where x is the state its tile carries and
// A = W_hh^T (forward: u = h_{t-1} W_hh^T) or A = W_hh (backward: u = dP_t W_hh = dL/dh_{t-1}).
// The input projection and all weight/input gradients are GEMMs in the glue (elman_cuda.cpp).
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../elman.h"
#include "kernel_args.h"
#include "recurrence_plan.h"

// The block's dynamic shared memory. The host emulation defines it first, to give each emulated
// block a buffer of its own.
#ifndef RNN_EXT_DYNAMIC_SHARED_MEMORY
#define RNN_EXT_DYNAMIC_SHARED_MEMORY(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace rnn_ext {
namespace gpu {
namespace {

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

template <typename T, int kBatchTile>
__global__ void __launch_bounds__(kMaxThreads, 1)
    elman_recurrence_kernel(const RecurrenceArgs args) {
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
  RNN_EXT_DYNAMIC_SHARED_MEMORY(shared_memory);
  T* weights = reinterpret_cast<T*>(shared_memory);
  Acc* states = reinterpret_cast<Acc*>(shared_memory + shared.weights_bytes);
  Acc* partials =
      reinterpret_cast<Acc*>(shared_memory + shared.weights_bytes + shared.states_bytes);

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
      if (m < hidden && column < width)
        value = p.backward ? weight[int64_t(m) * hidden + n] : weight[n * hidden + m];
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
      const int64_t index =
          output_index(layout.row(first_step, row), direction, n, p.hidden, directions);
      const Acc grad_pre =
          activation_backward(Scalar<T>::widen(initial[at]) + Scalar<T>::widen(grad_output[index]),
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
    const int64_t next_step =
        has_next ? step_of_position(position + 1, steps, reverse, p.backward) : step;
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
          const int64_t index =
              output_index(layout.row(next_step, row), direction, n, p.hidden, directions);
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
        if (row < active && layout.reads_initial_state(step, row, reverse))
          final_state[at] = Scalar<T>::narrow(u);
        if (row < next_active) {
          // A row joining at the next step ends its sequence there: its dL/dh is grad_h_n.
          const Acc grad_h = layout.writes_final_state(next_step, row, reverse)
                                 ? Scalar<T>::widen(initial[at])
                                 : u;
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
__global__ void __launch_bounds__(kPointwiseThreads)
    step_activation_kernel(const StepActivation s) {
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
    const int64_t index =
        output_index(s.row_offset + b, s.direction, i % s.hidden, s.hidden, s.directions);
    const Acc grad_h = Scalar<T>::widen(b >= s.first_final_row ? grad_final[i] : carry[i]);
    const Acc value = activation_backward(grad_h + Scalar<T>::widen(grad_output[index]),
                                          Scalar<T>::widen(output[index]), s.activation);
    grad_pre[index] = Scalar<T>::narrow(value);
  }
}

template <typename T>
__global__ void __launch_bounds__(kPointwiseThreads)
    gather_previous_states_kernel(const PreviousStates g) {
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
        value = output[output_index(layout.row(previous_step(step, reverse), b), direction, n,
                                    g.hidden, g.directions)];
      }
      previous[output_index(layout.row(step, b), direction, n, g.hidden, g.directions)] = value;
    }
  }
}

}  // namespace
}  // namespace gpu
}  // namespace rnn_ext
