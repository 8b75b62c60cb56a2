// One Elman layer as a chain of differentiable ATen ops, step by step (see composite.h).
#include "composite.h"

#include <c10/util/irange.h>

namespace rnn_ext {

std::tuple<at::Tensor, at::Tensor> composite_forward(const at::Tensor& input, const at::Tensor& hx,
                                                     at::TensorList weights,
                                                     const c10::optional<at::Tensor>& batch_sizes,
                                                     bool relu) {
  const LayerArgs args =
      read_layer_args("rnn_ext::elman_forward", input, hx, weights, batch_sizes, relu);
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
  const bool swap = batch_first && !(batch_sizes.has_value() && batch_sizes->defined());
  const int64_t directions = bidirectional ? 2 : 1;
  const int64_t per_layer = static_cast<int64_t>(weights.size()) / num_layers;
  at::Tensor layer_input = swap ? input.transpose(0, 1) : input;
  std::vector<at::Tensor> final_states;
  for (const auto l : c10::irange(num_layers)) {
    auto [layer_output, layer_h_n] =
        composite_forward(layer_input, hx.narrow(0, l * directions, directions),
                          weights.slice(l * per_layer, per_layer), batch_sizes, relu);
    final_states.push_back(layer_h_n);
    layer_input = dropout_masks.empty() || l + 1 == num_layers ? layer_output
                                                               : layer_output * dropout_masks[l];
  }
  return {swap ? layer_input.transpose(0, 1) : layer_input, at::cat(final_states, 0)};
}

}  // namespace rnn_ext
