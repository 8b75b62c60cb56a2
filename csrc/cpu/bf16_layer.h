// The bfloat16 forward and backward of one Elman layer on a CPU with avx512_bf16 (see
// bf16_layer.cpp). elman_cpu.cpp hands bfloat16 layers here when cpu::bf16_available().
#pragma once

#include <torch/types.h>

#include <array>
#include <tuple>

#include "../layer_args.h"

namespace rnn_ext {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> elman_forward_bf16(const LayerArgs& args,
                                                      const at::Tensor& input,
                                                      const at::Tensor& hx);

BackwardResult elman_backward_bf16(const LayerArgs& args, const at::Tensor& grad_output,
                                   const at::Tensor& grad_h_n, const at::Tensor& input,
                                   const at::Tensor& hx, at::TensorList weights,
                                   const at::Tensor& output, std::array<bool, 3> output_mask);

}  // namespace cpu
}  // namespace rnn_ext
