// Pieces of the CPU layer (elman_cpu.cpp) that run on a range of rows or steps, for code that
// schedules a layer's work itself (the layer wavefront, wavefront.h). Each is the code the layer
// kernels run, called on part of the layer: the packed kernel's per-row sums do not depend on the
// rows it is given, and the recurrences carry their state in the output (forward) or in `carry`
// (backward), so a layer run piece by piece gives the bits of a layer run whole. Defined for float
// and double. None starts a team or calls ATen: they may run on any thread of a team.
#pragma once

#include <torch/types.h>

#include <array>
#include <cstdint>
#include <vector>

#include "../layer_args.h"
#include "row_matmul.h"

namespace rnn_ext {
namespace cpu {

// W_ih of every direction of the layer, packed as the input projection reads it (element (k, j) =
// W_ih[j, k]), and (b_ih + b_hh) of every direction, [D*H] (empty without bias).
template <typename T>
std::vector<T> pack_input_weights(const LayerArgs& args, PackedMatrix<T>& weight_t);

// out[r] = bias + in[r] @ W_ih^T for the rows r in [row_begin, row_end) of the layer (`in` holds
// rows of input_size, `out` rows of the output width). bias may be null (no bias).
template <typename T>
void project_rows(const LayerArgs& args, const PackedMatrix<T>& weight_t, const T* bias,
                  const T* in, T* out, int64_t row_begin, int64_t row_end);

// [W_ih of every direction] packed as the input gradient reads it (element (k, j) = W_ih[k, j]).
template <typename T>
void pack_input_gradient_weights(const LayerArgs& args, PackedMatrix<T>& weight);

// grad_input[r] = grad_pre[r] @ [W_ih of every direction] for the rows in [row_begin, row_end).
template <typename T>
void input_gradient_rows(const LayerArgs& args, const PackedMatrix<T>& weight, const T* grad_pre,
                         T* grad_input, int64_t row_begin, int64_t row_end);

// W_hh of one direction packed for the forward recurrence (element (k, j) = W_hh[j, k]) or the
// backward one (element (k, j) = W_hh[k, j]).
template <typename T>
void pack_recurrent_weights(const LayerArgs& args, int64_t direction, bool backward,
                            PackedMatrix<T>& weight);

// The positions [begin, end) of one direction's forward recurrence (its own step order), all
// columns, on the calling thread. `output` holds the projected inputs of those steps and receives
// h_t; the steps before `begin` must be done (their h_t is read from `output`).
template <typename T>
void forward_steps(const LayerArgs& args, int64_t direction, const PackedMatrix<T>& weight_t,
                   const T* hx, T* output, T* h_n, std::array<int64_t, 2> positions);

// The positions [begin, end) of one direction's reverse loop (position 0 is the direction's last
// step), all columns, on the calling thread: grad_pre (dL/d pre-activation) of those steps and
// the direction's grad_hx rows that start there. `carry` ([batch, H], zeros before position 0)
// holds dL/dh of the next step to process between calls.
template <typename T>
void backward_steps(const LayerArgs& args, int64_t direction, const PackedMatrix<T>& weight,
                    const T* grad_output, const T* grad_h_n, const T* output, T* grad_pre,
                    T* grad_hx, T* carry, std::array<int64_t, 2> positions);

// dW_ih, dW_hh and the bias gradient of every direction from the layer's grad_pre [rows, D*H],
// its input rows [rows, I], hx [D, B, H] and output rows [rows, D*H] (contiguous), as the layer's
// backward computes them (over a team of its own).
template <typename T>
std::vector<DirectionGradients> layer_weight_gradients(const LayerArgs& args,
                                                       const at::Tensor& grad_pre,
                                                       const at::Tensor& input_rows,
                                                       const at::Tensor& hx,
                                                       const at::Tensor& output_rows);

// True when the layer's steps are large enough for the layer kernels to split each step's
// columns over a team (the layer then uses every thread on its own).
bool layer_splits_steps(const ElmanShape& shape);

}  // namespace cpu
}  // namespace rnn_ext
