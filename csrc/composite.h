// One Elman layer (all directions) as a chain of differentiable ATen ops, step by step: the same
// math as the fused kernels, slow, for what needs a graph of the layer (double backward).
#pragma once

#include <torch/types.h>

#include "layer_args.h"

namespace rnn_ext {

// Same arguments and results as rnn_ext::elman_forward.
std::tuple<at::Tensor, at::Tensor> composite_forward(const at::Tensor& input, const at::Tensor& hx,
                                                     at::TensorList weights,
                                                     const c10::optional<at::Tensor>& batch_sizes,
                                                     bool relu);

}  // namespace rnn_ext
