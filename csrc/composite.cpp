// One Elman layer as a chain of differentiable ATen ops, step by step (see composite.h), and the
// stack of them registered as rnn_ext::_elman_stack_composite.
#include "composite.h"

#include <c10/util/irange.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "stack.h"

namespace rnn_ext {
namespace {

// batch_sizes as a tensor whose values can be read. Inside a torch.func transform a tensor that
// the transformed function creates or receives arrives wrapped, one TensorWrapper per transform
// level; a wrapper has no storage, but item() reaches the values through the transforms (and is
// refused under vmap, where each sample could have its own sizes). batch_sizes is never
// differentiated, so a plain tensor of the same values serves every level. It is made without
// the dispatcher, which inside a transform would wrap it again.
c10::optional<at::Tensor> readable_batch_sizes(const c10::optional<at::Tensor>& batch_sizes) {
  if (!batch_sizes.has_value() || !batch_sizes->defined()) return batch_sizes;
  const at::Tensor& sizes = *batch_sizes;
  const auto wrappers = c10::DispatchKeySet(
      {c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::FuncTorchBatched});
  // Anything else, or a tensor read_layer_args will refuse, goes on as it is.
  if (!sizes.key_set().has_any(wrappers) || sizes.dim() != 1 || sizes.scalar_type() != at::kLong ||
      !sizes.device().is_cpu())
    return sizes;
  auto values = std::make_unique<std::vector<int64_t>>(sizes.numel());
  for (const auto t : c10::irange(sizes.numel())) (*values)[t] = sizes[t].item<int64_t>();
  auto* owned = values.release();
  return at::from_blob(
      owned->data(), {static_cast<int64_t>(owned->size())}, [owned](void*) { delete owned; },
      at::TensorOptions().dtype(at::kLong));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> composite_forward(const at::Tensor& input, const at::Tensor& hx,
                                                     at::TensorList weights,
                                                     const c10::optional<at::Tensor>& batch_sizes,
                                                     bool relu) {
  const LayerArgs args = read_layer_args("rnn_ext::elman_forward", input, hx, weights,
                                         readable_batch_sizes(batch_sizes), relu);
  const ElmanShape& s = args.shape;
  const StepLayout layout = step_layout(args);
  const at::Tensor rows = input.reshape({s.rows, s.input_size});
  auto activation = [&](const at::Tensor& x) { return relu ? at::relu(x) : at::tanh(x); };
  std::vector<at::Tensor> direction_outputs, final_states;
  for (const auto d : c10::irange(s.directions)) {
    const DirectionWeights& w = args.directions[d];
    at::Tensor projected = at::matmul(rows, w.weight_ih.t());
    if (s.has_bias) projected = projected + w.bias_ih + w.bias_hh;
    const bool reverse = d == 1;
    std::vector<at::Tensor> step_outputs(s.steps);
    at::Tensor state = hx[d];  // [B, H]; rows past a step's batch size hold their final states
    for (const auto position : c10::irange(s.steps)) {
      const int64_t t = step_of_position(position, s.steps, reverse, /*backward=*/false);
      const int64_t active = layout.size(t);
      // Rows [0, carried) continue their sequence; the others start here and read h0.
      const int64_t carried = layout.first_initial_row(t, reverse);
      at::Tensor previous = state.narrow(0, 0, active);
      if (carried < active) {
        previous = carried == 0 ? hx[d].narrow(0, 0, active)
                                : at::cat({state.narrow(0, 0, carried),
                                           hx[d].narrow(0, carried, active - carried)});
      }
      const at::Tensor h = activation(projected.narrow(0, layout.offset(t), active) +
                                      at::matmul(previous, w.weight_hh.t()));
      step_outputs[t] = h;
      state = active == s.batch ? h : at::cat({h, state.narrow(0, active, s.batch - active)});
    }
    direction_outputs.push_back(at::cat(step_outputs, 0));
    final_states.push_back(state);
  }
  const at::Tensor output = at::cat(direction_outputs, 1).view(output_sizes(args));
  return {output, at::stack(final_states, 0)};
}

std::tuple<at::Tensor, at::Tensor> composite_stack_forward(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const c10::optional<at::Tensor>& batch_sizes, at::TensorList dropout_masks, int64_t num_layers,
    bool bidirectional, bool relu, bool batch_first) {
  const c10::optional<at::Tensor> sizes = readable_batch_sizes(batch_sizes);
  TORCH_CHECK(hx.defined(), "rnn_ext::_elman_stack_composite: hx must be given");
  const StackShape s = read_stack_args("rnn_ext::_elman_stack_composite", input, hx, weights, sizes,
                                       dropout_masks, num_layers, bidirectional, relu, batch_first);
  const bool swap = s.batch_first;
  const int64_t directions = s.directions;
  const int64_t per_layer = s.per_layer;
  at::Tensor layer_input = swap ? input.transpose(0, 1) : input;
  std::vector<at::Tensor> final_states;
  for (const auto l : c10::irange(num_layers)) {
    auto [layer_output, layer_h_n] =
        composite_forward(layer_input, hx.narrow(0, l * directions, directions),
                          weights.slice(l * per_layer, per_layer), sizes, relu);
    final_states.push_back(layer_h_n);
    layer_input = dropout_masks.empty() || l + 1 == num_layers ? layer_output
                                                               : layer_output * dropout_masks[l];
  }
  return {swap ? layer_input.transpose(0, 1) : layer_input, at::cat(final_states, 0)};
}

// A CompositeImplicitAutograd kernel: every backend, autograd (forward and reverse mode) and the
// torch.func transforms see the ATen ops it calls, never this operator.
TORCH_LIBRARY_IMPL(rnn_ext, CompositeImplicitAutograd, m) {
  m.impl("_elman_stack_composite", &composite_stack_forward);
}

}  // namespace rnn_ext
