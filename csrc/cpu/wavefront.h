// The CPU kernels of the stack operators (rnn_ext::elman_stack, _elman_stack_forward and
// elman_stack_backward). A unidirectional stack whose steps are too small to split over threads
// runs as a layer wavefront: the time steps are cut into chunks, task (l, c) is layer l's work on
// chunk c, and the threads of one team run the tasks in wavefront order, layer l on chunk c while
// layer l + 1 runs chunk c - 1. Every other stack runs the layer loop of stack.h.
#pragma once

#include <torch/types.h>

#include <array>

#include "../stack.h"

namespace rnn_ext {
namespace cpu {

// Steps per chunk of the wavefront: a function of the shape alone (never of the thread count), so
// that the work of each task, and so the bits, are the same on any machine.
int64_t wavefront_chunk_steps(int64_t steps, int64_t batch);

// True when the stack runs as a wavefront: one direction, two layers or more, float32 or float64,
// steps too small for the layer kernels to split, and two threads or more to run on.
bool runs_wavefront(const StackShape& shape, const at::Tensor& input, const at::Tensor& hx);

StackForwardResult stack_forward_cpu(const at::Tensor& input, const at::Tensor& hx,
                                     at::TensorList weights,
                                     const c10::optional<at::Tensor>& batch_sizes,
                                     at::TensorList dropout_masks, int64_t num_layers,
                                     bool bidirectional, bool relu, bool batch_first);

BackwardResult stack_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                  const at::Tensor& input, const at::Tensor& hx,
                                  at::TensorList weights,
                                  const c10::optional<at::Tensor>& batch_sizes,
                                  at::TensorList dropout_masks, at::TensorList layer_outputs,
                                  const at::Tensor& output, int64_t num_layers, bool bidirectional,
                                  bool relu, bool batch_first, std::array<bool, 3> output_mask);

}  // namespace cpu
}  // namespace rnn_ext
