// One Elman layer (all directions) as a chain of differentiable ATen ops, step by step: the same
// math as the fused kernels, slow, for what needs a graph of the layer: double backward, and the
// torch.func transforms and forward-mode AD through rnn_ext::_elman_stack_composite, whose
// CompositeImplicitAutograd kernel is composite_stack_forward.
#pragma once

#include <torch/types.h>

#include "layer_args.h"

namespace rnn_ext {

// Same arguments and results as rnn_ext::elman_forward.
std::tuple<at::Tensor, at::Tensor> composite_forward(const at::Tensor& input, const at::Tensor& hx,
                                                     at::TensorList weights,
                                                     const c10::optional<at::Tensor>& batch_sizes,
                                                     bool relu);

// Same arguments and results as rnn_ext::_elman_stack_forward's output and h_n (hx given): the
// layers of composite_forward, each layer's input the previous output times its dropout mask.
// batch_sizes may arrive wrapped by torch.func transforms.
std::tuple<at::Tensor, at::Tensor> composite_stack_forward(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const c10::optional<at::Tensor>& batch_sizes, at::TensorList dropout_masks, int64_t num_layers,
    bool bidirectional, bool relu, bool batch_first);

}  // namespace rnn_ext
