// Reads the arguments of the rnn_ext layer ops into an ElmanShape, checking everything a caller can
// get wrong. Shared by the CPU and CUDA implementations so both accept and reject the same inputs.
#pragma once

#include <torch/types.h>

#include <array>
#include <tuple>
#include <vector>

#include "elman.h"

namespace rnn_ext {

// The flat weights of one direction, as nn.RNN's _flat_weights hold them.
struct DirectionWeights {
  at::Tensor weight_ih;  // [H, I]
  at::Tensor weight_hh;  // [H, H]
  at::Tensor bias_ih;    // [H] or undefined
  at::Tensor bias_hh;    // [H] or undefined
};

struct LayerArgs {
  ElmanShape shape;
  std::vector<DirectionWeights> directions;
  std::vector<int64_t> batch_sizes;   // one per step, host memory
  std::vector<int64_t> step_offsets;  // first row of each step, plus the total at the end
};

// input: [T, B, I] (batch_sizes undefined) or packed [N, I] (batch_sizes: int64 [T] on the CPU).
// hx: [D, B, H]. weights: D groups of (w_ih, w_hh[, b_ih, b_hh]).
LayerArgs read_layer_args(const char* op_name, const at::Tensor& input, const at::Tensor& hx,
                          at::TensorList weights, const c10::optional<at::Tensor>& batch_sizes,
                          bool relu);

// read_layer_args for rnn_ext::elman_backward, plus the checks of its gradients and saved output.
LayerArgs read_backward_args(const char* op_name, const at::Tensor& grad_output,
                             const at::Tensor& grad_h_n, const at::Tensor& input,
                             const at::Tensor& hx, at::TensorList weights, const at::Tensor& output,
                             const c10::optional<at::Tensor>& batch_sizes, bool relu);

// The shape of the layer's output for this input: [T, B, D*H], or [N, D*H] when packed.
std::vector<int64_t> output_sizes(const LayerArgs& args);

// The rows of each step, for the step rules of elman.h (host memory; valid while args lives).
StepLayout step_layout(const LayerArgs& args);

// A copy of t with t's sizes and strides. A plain dense CPU tensor is copied with one memcpy
// (clone's copy goes through TensorIterator, a noticeable part of a small call); anything else
// (CUDA, fake and other tensor subclasses, non-dense views, any call under a dispatch mode) is
// cloned.
at::Tensor dense_copy(const at::Tensor& t);

// One direction's parameter gradients as a backend computes them: the two biases of a direction
// share one gradient (both are added to the same pre-activation).
struct DirectionGradients {
  at::Tensor weight_ih;
  at::Tensor weight_hh;
  at::Tensor bias;  // undefined when the layer has no bias
};

using BackwardResult = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>;

// elman_backward's result from what a backend computed. Gradients not asked for in output_mask
// come back as empty tensors (an op cannot return undefined ones); an undefined gradient that was
// asked for (a layer with no rows) is zero; the weight gradients follow the flat weights' order.
BackwardResult backward_result(const LayerArgs& args, const at::Tensor& input,
                               at::TensorList weights, std::array<bool, 3> output_mask,
                               at::Tensor grad_input, at::Tensor grad_hx,
                               const std::vector<DirectionGradients>& directions);

}  // namespace rnn_ext
