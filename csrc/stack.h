// The whole nn.RNN call (rnn_ext::elman_stack): a loop over the layer ops, with the inter-layer
// dropout masks the caller drew, in one operator. Backends and transforms share these loops; each
// layer still runs in the backend's elman_forward / elman_backward kernels.
#pragma once

#include <torch/types.h>

#include <array>
#include <tuple>
#include <vector>

#include "layer_args.h"

namespace rnn_ext {

// The layer operators rnn_ext::elman_forward / elman_backward, called through the dispatcher (so
// that each call reaches its backend's kernel, or a transform's rule).
std::tuple<at::Tensor, at::Tensor> call_elman_forward(const at::Tensor& input, const at::Tensor& hx,
                                                      at::TensorList weights,
                                                      const c10::optional<at::Tensor>& batch_sizes,
                                                      bool relu);
BackwardResult call_elman_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                   const at::Tensor& input, const at::Tensor& hx,
                                   at::TensorList weights, const at::Tensor& output,
                                   const c10::optional<at::Tensor>& batch_sizes, bool relu,
                                   std::array<bool, 3> output_mask);

// What elman_stack's arguments say about the stack, once checked.
struct StackShape {
  int64_t num_layers = 1;
  int64_t directions = 1;
  int64_t per_layer = 2;  // flat weights per layer: directions * (2 or 4)
  int64_t hidden_size = 0;
  bool relu = false;
  bool packed = false;
  bool batch_first = false;  // and not packed: input, output and grad_input are [B, T, ...]
};

// Checks what a direct caller of the stack ops can get wrong beyond the layer ops' own checks.
// hx may be undefined (zeros).
StackShape read_stack_args(const char* op_name, const at::Tensor& input, const at::Tensor& hx,
                           at::TensorList weights, const c10::optional<at::Tensor>& batch_sizes,
                           at::TensorList dropout_masks, int64_t num_layers, bool bidirectional,
                           bool relu, bool batch_first);

// hx, or nn.RNN's zero initial state [L*D, B, H] when hx is undefined.
at::Tensor initial_state(const StackShape& shape, const at::Tensor& input, const at::Tensor& hx,
                         const c10::optional<at::Tensor>& batch_sizes);

using StackForwardResult = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>;

// rnn_ext::_elman_stack_forward: (output, h_n, outputs of the layers but the last).
StackForwardResult stack_forward(const at::Tensor& input, const at::Tensor& hx,
                                 at::TensorList weights,
                                 const c10::optional<at::Tensor>& batch_sizes,
                                 at::TensorList dropout_masks, int64_t num_layers,
                                 bool bidirectional, bool relu, bool batch_first);

// The same on arguments read_stack_args has already checked into `shape` (a backend that reads
// them itself to choose its own path calls this one, so nothing is checked twice).
StackForwardResult stack_forward_checked(const StackShape& shape, const at::Tensor& input,
                                         const at::Tensor& hx, at::TensorList weights,
                                         const c10::optional<at::Tensor>& batch_sizes,
                                         at::TensorList dropout_masks);

// A function with rnn_ext::_elman_stack_forward's signature (stack_forward, or a backend's own).
using StackForward = StackForwardResult (*)(const at::Tensor&, const at::Tensor&, at::TensorList,
                                            const c10::optional<at::Tensor>&, at::TensorList,
                                            int64_t, bool, bool, bool);

// rnn_ext::elman_stack (output, h_n) on top of `forward`: the checks, and nn.RNN's zero state when
// hx is absent.
std::tuple<at::Tensor, at::Tensor> stack_outputs(StackForward forward, const at::Tensor& input,
                                                 const c10::optional<at::Tensor>& hx,
                                                 at::TensorList weights,
                                                 const c10::optional<at::Tensor>& batch_sizes,
                                                 at::TensorList dropout_masks, int64_t num_layers,
                                                 bool bidirectional, bool relu, bool batch_first);

// read_stack_args for rnn_ext::elman_stack_backward, plus what only backward is given: the
// outputs of the layers below the last and grad_h_n.
StackShape read_stack_backward_args(const at::Tensor& grad_h_n, const at::Tensor& input,
                                    const at::Tensor& hx, at::TensorList weights,
                                    const c10::optional<at::Tensor>& batch_sizes,
                                    at::TensorList dropout_masks, at::TensorList layer_outputs,
                                    int64_t num_layers, bool bidirectional, bool relu,
                                    bool batch_first);

// rnn_ext::elman_stack_backward on arguments read_stack_backward_args has already checked.
BackwardResult stack_backward_checked(const StackShape& shape, const at::Tensor& grad_output,
                                      const at::Tensor& grad_h_n, const at::Tensor& input,
                                      const at::Tensor& hx, at::TensorList weights,
                                      const c10::optional<at::Tensor>& batch_sizes,
                                      at::TensorList dropout_masks, at::TensorList layer_outputs,
                                      const at::Tensor& output, std::array<bool, 3> output_mask);

// rnn_ext::elman_stack_backward: the checks, then stack_backward_checked.
BackwardResult stack_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                              const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
                              const c10::optional<at::Tensor>& batch_sizes,
                              at::TensorList dropout_masks, at::TensorList layer_outputs,
                              const at::Tensor& output, int64_t num_layers, bool bidirectional,
                              bool relu, bool batch_first, std::array<bool, 3> output_mask);

}  // namespace rnn_ext
