// rnn_ext::elman_stack and its helpers (see stack.h): the layer loop over the layer operators,
// registered for every backend and for both vmap implementations, so that each layer reaches the
// backend's kernels or the layer ops' batching rules.
#include "stack.h"

#include <torch/library.h>

#include <c10/util/irange.h>

namespace rnn_ext {
std::tuple<at::Tensor, at::Tensor> call_elman_forward(const at::Tensor& input, const at::Tensor& hx,
                                                      at::TensorList weights,
                                                      const c10::optional<at::Tensor>& batch_sizes,
                                                      bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rnn_ext::elman_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, at::TensorList,
                           const c10::optional<at::Tensor>&, bool)>();
  return op.call(input, hx, weights, batch_sizes, relu);
}

BackwardResult call_elman_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                   const at::Tensor& input, const at::Tensor& hx,
                                   at::TensorList weights, const at::Tensor& output,
                                   const c10::optional<at::Tensor>& batch_sizes, bool relu,
                                   std::array<bool, 3> output_mask) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rnn_ext::elman_backward", "")
          .typed<BackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, at::TensorList, const at::Tensor&,
                                const c10::optional<at::Tensor>&, bool, std::array<bool, 3>)>();
  return op.call(grad_output, grad_h_n, input, hx, weights, output, batch_sizes, relu, output_mask);
}

namespace {

// [B, T, ...] <-> [T, B, ...] for a batch_first stack; packed and time-major tensors pass.
at::Tensor swap_batch_and_time(const StackShape& s, const at::Tensor& t) {
  return s.batch_first ? t.transpose(0, 1) : t;
}

// The input of layer l > 0: the previous layer's output, times its dropout mask.
at::Tensor next_layer_input(const at::Tensor& layer_output, at::TensorList dropout_masks,
                            int64_t layer) {
  return dropout_masks.empty() ? layer_output : layer_output * dropout_masks[layer - 1];
}

}  // namespace

StackShape read_stack_args(const char* op_name, const at::Tensor& input, const at::Tensor& hx,
                           at::TensorList weights, const c10::optional<at::Tensor>& batch_sizes,
                           at::TensorList dropout_masks, int64_t num_layers, bool bidirectional,
                           bool relu, bool batch_first) {
  StackShape s;
  s.packed = batch_sizes.has_value() && batch_sizes->defined();
  s.batch_first = batch_first && !s.packed;
  s.relu = relu;
  s.directions = bidirectional ? 2 : 1;
  TORCH_CHECK(num_layers >= 1, op_name, ": num_layers must be at least 1, got ", num_layers);
  s.num_layers = num_layers;
  const int64_t count = static_cast<int64_t>(weights.size());
  s.per_layer = count / num_layers;
  TORCH_CHECK(count % num_layers == 0 &&
                  (s.per_layer == 2 * s.directions || s.per_layer == 4 * s.directions),
              op_name, ": weights must hold (w_ih, w_hh[, b_ih, b_hh]) for each direction of each",
              " of the ", num_layers, " layer(s), got ", count, " tensors");
  // H from hx, or else from weight_hh of the first layer (the layer ops check every shape).
  if (hx.defined() && hx.dim() == 3) {
    s.hidden_size = hx.size(2);
  } else {
    TORCH_CHECK(weights[1].dim() == 2, op_name,
                ": weight_hh of direction 0 must have shape [hidden, hidden], got ",
                weights[1].sizes());
    s.hidden_size = weights[1].size(0);
  }
  TORCH_CHECK(input.dim() == (s.packed ? 2 : 3), op_name, ": input must be ",
              s.packed ? "packed [rows, input_size]" : "3-D", ", got ", input.sizes());
  if (hx.defined()) {
    TORCH_CHECK(hx.dim() == 3 && hx.size(0) == num_layers * s.directions, op_name,
                ": hx must be [num_layers * directions, batch, hidden] = [",
                num_layers * s.directions, ", batch, ", s.hidden_size, "], got ", hx.sizes());
  }
  TORCH_CHECK(dropout_masks.empty() || static_cast<int64_t>(dropout_masks.size()) == num_layers - 1,
              op_name, ": dropout_masks must be empty or hold one mask per layer but the last (",
              num_layers - 1, "), got ", dropout_masks.size());
  if (!dropout_masks.empty()) {
    std::vector<int64_t> expected;
    if (s.packed) {
      expected = {input.size(0), s.directions * s.hidden_size};
    } else {
      const at::Tensor time_major = swap_batch_and_time(s, input);
      expected = {time_major.size(0), time_major.size(1), s.directions * s.hidden_size};
    }
    for (const auto& mask : dropout_masks) {
      TORCH_CHECK(mask.sizes() == c10::IntArrayRef(expected), op_name,
                  ": each dropout mask must have the time-major shape of a layer's output ",
                  c10::IntArrayRef(expected), ", got ", mask.sizes());
      TORCH_CHECK(mask.scalar_type() == input.scalar_type() && mask.device() == input.device(),
                  op_name, ": dropout masks must match the input's dtype and device (",
                  input.scalar_type(), " on ", input.device(), "), got ", mask.scalar_type(),
                  " on ", mask.device());
    }
  }
  return s;
}

at::Tensor initial_state(const StackShape& s, const at::Tensor& input, const at::Tensor& hx,
                         const c10::optional<at::Tensor>& batch_sizes) {
  if (hx.defined()) return hx;
  int64_t batch = 0;
  if (s.packed) {
    TORCH_CHECK(batch_sizes->numel() > 0, "rnn_ext::elman_stack: batch_sizes must not be empty");
    batch = batch_sizes->select(0, 0).item<int64_t>();
  } else {
    batch = input.size(s.batch_first ? 0 : 1);
  }
  return at::zeros({s.num_layers * s.directions, batch, s.hidden_size}, input.options());
}

StackShape read_stack_backward_args(const at::Tensor& grad_h_n, const at::Tensor& input,
                                    const at::Tensor& hx, at::TensorList weights,
                                    const c10::optional<at::Tensor>& batch_sizes,
                                    at::TensorList dropout_masks, at::TensorList layer_outputs,
                                    int64_t num_layers, bool bidirectional, bool relu,
                                    bool batch_first) {
  const char* op_name = "rnn_ext::elman_stack_backward";
  const StackShape s = read_stack_args(op_name, input, hx, weights, batch_sizes, dropout_masks,
                                       num_layers, bidirectional, relu, batch_first);
  TORCH_CHECK(static_cast<int64_t>(layer_outputs.size()) == num_layers - 1, op_name,
              ": layer_outputs must hold the outputs of the ", num_layers - 1,
              " layer(s) below the last, got ", layer_outputs.size());
  TORCH_CHECK(grad_h_n.sizes() == hx.sizes(), op_name, ": grad_h_n must have shape ", hx.sizes(),
              ", got ", grad_h_n.sizes());
  return s;
}

StackForwardResult stack_forward(const at::Tensor& input, const at::Tensor& hx,
                                 at::TensorList weights,
                                 const c10::optional<at::Tensor>& batch_sizes,
                                 at::TensorList dropout_masks, int64_t num_layers,
                                 bool bidirectional, bool relu, bool batch_first) {
  const StackShape s =
      read_stack_args("rnn_ext::_elman_stack_forward", input, hx, weights, batch_sizes,
                      dropout_masks, num_layers, bidirectional, relu, batch_first);
  return stack_forward_checked(s, input, hx, weights, batch_sizes, dropout_masks);
}

StackForwardResult stack_forward_checked(const StackShape& s, const at::Tensor& input,
                                         const at::Tensor& hx, at::TensorList weights,
                                         const c10::optional<at::Tensor>& batch_sizes,
                                         at::TensorList dropout_masks) {
  TORCH_CHECK(hx.defined(), "rnn_ext::_elman_stack_forward: hx must be given");
  const int64_t D = s.directions, num_layers = s.num_layers;
  const bool relu = s.relu;
  at::Tensor layer_input = swap_batch_and_time(s, input);
  std::vector<at::Tensor> final_states, layer_outputs;
  final_states.reserve(num_layers);
  layer_outputs.reserve(num_layers - 1);
  at::Tensor output;
  for (const auto l : c10::irange(num_layers)) {
    auto [layer_output, layer_h_n] =
        call_elman_forward(layer_input, num_layers == 1 ? hx : hx.narrow(0, l * D, D),
                           weights.slice(l * s.per_layer, s.per_layer), batch_sizes, relu);
    final_states.push_back(std::move(layer_h_n));
    if (l + 1 < num_layers) {
      layer_input = next_layer_input(layer_output, dropout_masks, l + 1);
      layer_outputs.push_back(std::move(layer_output));
    } else {
      output = swap_batch_and_time(s, layer_output);
    }
  }
  at::Tensor h_n = num_layers == 1 ? final_states[0] : at::cat(final_states, 0);
  return {output, h_n, layer_outputs};
}

BackwardResult stack_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                              const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
                              const c10::optional<at::Tensor>& batch_sizes,
                              at::TensorList dropout_masks, at::TensorList layer_outputs,
                              const at::Tensor& output, int64_t num_layers, bool bidirectional,
                              bool relu, bool batch_first, std::array<bool, 3> output_mask) {
  const StackShape s =
      read_stack_backward_args(grad_h_n, input, hx, weights, batch_sizes, dropout_masks,
                               layer_outputs, num_layers, bidirectional, relu, batch_first);
  return stack_backward_checked(s, grad_output, grad_h_n, input, hx, weights, batch_sizes,
                                dropout_masks, layer_outputs, output, output_mask);
}

BackwardResult stack_backward_checked(const StackShape& s, const at::Tensor& grad_output,
                                      const at::Tensor& grad_h_n, const at::Tensor& input,
                                      const at::Tensor& hx, at::TensorList weights,
                                      const c10::optional<at::Tensor>& batch_sizes,
                                      at::TensorList dropout_masks, at::TensorList layer_outputs,
                                      const at::Tensor& output, std::array<bool, 3> output_mask) {
  const int64_t D = s.directions, num_layers = s.num_layers;
  const bool relu = s.relu;
  at::Tensor grad = swap_batch_and_time(s, grad_output);  // dL/d(this layer's output)
  std::vector<at::Tensor> grad_states(num_layers);
  std::vector<at::Tensor> grad_weights(output_mask[2] ? weights.size() : 0);
  at::Tensor grad_input;  // set by the first layer's call
  for (int64_t l = num_layers - 1; l >= 0; --l) {
    const at::Tensor layer_input = l == 0
                                       ? swap_batch_and_time(s, input)
                                       : next_layer_input(layer_outputs[l - 1], dropout_masks, l);
    const at::Tensor layer_output =
        l == num_layers - 1 ? swap_batch_and_time(s, output) : layer_outputs[l];
    const bool single = num_layers == 1;
    auto [grad_layer_input, grad_layer_hx, grad_layer_weights] = call_elman_backward(
        grad, single ? grad_h_n : grad_h_n.narrow(0, l * D, D), layer_input,
        single ? hx : hx.narrow(0, l * D, D), weights.slice(l * s.per_layer, s.per_layer),
        layer_output, batch_sizes, relu, {l > 0 || output_mask[0], output_mask[1], output_mask[2]});
    grad_states[l] = std::move(grad_layer_hx);  // an empty placeholder when not asked for
    if (output_mask[2]) {
      for (const auto i : c10::irange(s.per_layer))
        grad_weights[l * s.per_layer + i] = std::move(grad_layer_weights[i]);
    }
    if (l > 0) {
      grad = next_layer_input(grad_layer_input, dropout_masks, l);
    } else {
      // Not asked for: the layer's empty placeholder, which is what the stack returns too.
      grad_input =
          output_mask[0] ? swap_batch_and_time(s, grad_layer_input) : std::move(grad_layer_input);
    }
  }
  at::Tensor grad_hx =
      output_mask[1] && num_layers > 1 ? at::cat(grad_states, 0) : std::move(grad_states[0]);
  return {grad_input, grad_hx, grad_weights};
}

std::tuple<at::Tensor, at::Tensor> stack_outputs(StackForward forward, const at::Tensor& input,
                                                 const c10::optional<at::Tensor>& hx,
                                                 at::TensorList weights,
                                                 const c10::optional<at::Tensor>& batch_sizes,
                                                 at::TensorList dropout_masks, int64_t num_layers,
                                                 bool bidirectional, bool relu, bool batch_first) {
  const at::Tensor given = hx.has_value() ? *hx : at::Tensor();
  const StackShape s = read_stack_args("rnn_ext::elman_stack", input, given, weights, batch_sizes,
                                       dropout_masks, num_layers, bidirectional, relu, batch_first);
  auto [output, h_n, layer_outputs] =
      forward(input, initial_state(s, input, given, batch_sizes), weights, batch_sizes,
              dropout_masks, num_layers, bidirectional, relu, batch_first);
  return {output, h_n};
}

namespace {

std::tuple<at::Tensor, at::Tensor> elman_stack_kernel(
    const at::Tensor& input, const c10::optional<at::Tensor>& hx, at::TensorList weights,
    const c10::optional<at::Tensor>& batch_sizes, at::TensorList dropout_masks, int64_t num_layers,
    bool bidirectional, bool relu, bool batch_first) {
  return stack_outputs(&stack_forward, input, hx, weights, batch_sizes, dropout_masks, num_layers,
                       bidirectional, relu, batch_first);
}

void register_stack(torch::Library& m) {
  m.impl("elman_stack", &elman_stack_kernel);
  m.impl("_elman_stack_forward", &stack_forward);
  m.impl("elman_stack_backward", &stack_backward);
}

}  // namespace

// The CPU kernels (cpu/wavefront.cpp) run a unidirectional stack as a layer wavefront and call
// these loops for the other stacks.
#ifdef RNN_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(rnn_ext, CUDA, m) { register_stack(m); }
#endif
// Under torch.func.vmap and torch's older vmap (batched gradients) the loop runs on batched
// tensors, and each layer reaches the layer ops' batching rules.
TORCH_LIBRARY_IMPL(rnn_ext, FuncTorchBatched, m) { register_stack(m); }
TORCH_LIBRARY_IMPL(rnn_ext, Batched, m) { register_stack(m); }

}  // namespace rnn_ext
