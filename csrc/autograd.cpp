// Autograd for rnn_ext::elman_forward and rnn_ext::elman_stack, in C++ so a call costs no Python:
// their backwards are the rnn_ext::elman_backward and rnn_ext::elman_stack_backward ops. Double
// backward (create_graph=True) re-runs the layer as the composite of composite.h and differentiates
// that, so gradgrad works as it does for nn.RNN.
#include <torch/autograd.h>
#include <torch/library.h>
#include <torch/types.h>

#include <c10/util/irange.h>

#include "composite.h"
#include "stack.h"

namespace rnn_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// An elman_stack call's configuration as one integer, for AutogradContext::saved_data. The
// counts of weights and masks follow from it: num_layers * directions * (4 or 2) weights and none
// or num_layers - 1 dropout masks, as the backend kernels check (and forward below, for the fake
// kernels, which do not).
struct StackConfigWord {
  int64_t num_layers;
  bool bidirectional, relu, batch_first, has_hx, has_bias, has_masks;

  int64_t encode() const {
    return num_layers << 6 | int64_t{bidirectional} | int64_t{relu} << 1 |
           int64_t{batch_first} << 2 | int64_t{has_hx} << 3 | int64_t{has_bias} << 4 |
           int64_t{has_masks} << 5;
  }
  static StackConfigWord decode(int64_t word) {
    const auto flag = [word](int bit) { return ((word >> bit) & 1) != 0; };
    return {word >> 6, flag(0), flag(1), flag(2), flag(3), flag(4), flag(5)};
  }
  int64_t num_weights() const { return num_layers * (bidirectional ? 2 : 1) * (has_bias ? 4 : 2); }
  int64_t num_masks() const { return has_masks ? num_layers - 1 : 0; }
};

class ElmanFunction : public torch::autograd::Function<ElmanFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& hx,
                               at::TensorList weights, const c10::optional<at::Tensor>& batch_sizes,
                               bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, h_n] = call_elman_forward(input, hx, weights, batch_sizes, relu);
    std::vector<at::Tensor> saved = {input, hx, output};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["packed"] = batch_sizes.has_value() && batch_sizes->defined();
    if (batch_sizes.has_value() && batch_sizes->defined())
      ctx->saved_data["batch_sizes"] = *batch_sizes;
    return {output, h_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& hx = saved[1];
    const at::Tensor& output = saved[2];
    const std::vector<at::Tensor> weights(saved.begin() + 3, saved.end());
    const bool relu = ctx->saved_data["relu"].toBool();
    c10::optional<at::Tensor> batch_sizes;
    if (ctx->saved_data["packed"].toBool()) batch_sizes = ctx->saved_data["batch_sizes"].toTensor();
    const at::Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(output);
    const at::Tensor grad_h_n = grads[1].defined() ? grads[1] : at::zeros_like(hx);

    const int64_t num_weights = static_cast<int64_t>(weights.size());
    bool any_weight = false;
    for (const auto i : c10::irange(num_weights)) any_weight |= ctx->needs_input_grad(2 + i);
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      any_weight};

    variable_list result(2 + num_weights + 2);  // + batch_sizes, relu: never differentiable
    if (at::GradMode::is_enabled()) {
      // create_graph=True: gradients must themselves be differentiable.
      auto [ref_output, ref_h_n] = composite_forward(input, hx, weights, batch_sizes, relu);
      variable_list wrt;
      std::vector<int64_t> position;
      for (const auto i : c10::irange(2 + num_weights)) {
        if (!ctx->needs_input_grad(i)) continue;
        wrt.push_back(i == 0 ? input : i == 1 ? hx : weights[i - 2]);
        position.push_back(i);
      }
      const variable_list computed = torch::autograd::grad(
          {ref_output, ref_h_n}, wrt, {grad_output, grad_h_n}, /*retain_graph=*/true,
          /*create_graph=*/true, /*allow_unused=*/true);
      for (const auto i : c10::irange(computed.size())) result[position[i]] = computed[i];
      return result;
    }
    at::AutoDispatchBelowADInplaceOrView guard;  // as in ElmanStackFunction::backward
    auto [grad_input, grad_hx, grad_weights] = call_elman_backward(
        grad_output, grad_h_n, input, hx, weights, output, batch_sizes, relu, mask);
    if (mask[0]) result[0] = grad_input;
    if (mask[1]) result[1] = grad_hx;
    if (mask[2]) {
      for (const auto i : c10::irange(num_weights)) {
        if (ctx->needs_input_grad(2 + i)) result[2 + i] = grad_weights[i];
      }
    }
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> elman_forward_autograd(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const c10::optional<at::Tensor>& batch_sizes, bool relu) {
  const variable_list outputs = ElmanFunction::apply(input, hx, weights, batch_sizes, relu);
  return {outputs[0], outputs[1]};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> call_stack_forward(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const c10::optional<at::Tensor>& batch_sizes, at::TensorList dropout_masks, int64_t num_layers,
    bool bidirectional, bool relu, bool batch_first) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rnn_ext::_elman_stack_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>(
              const at::Tensor&, const at::Tensor&, at::TensorList,
              const c10::optional<at::Tensor>&, at::TensorList, int64_t, bool, bool, bool)>();
  return op.call(input, hx, weights, batch_sizes, dropout_masks, num_layers, bidirectional, relu,
                 batch_first);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> call_stack_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& hx, at::TensorList weights, const c10::optional<at::Tensor>& batch_sizes,
    at::TensorList dropout_masks, at::TensorList layer_outputs, const at::Tensor& output,
    int64_t num_layers, bool bidirectional, bool relu, bool batch_first,
    std::array<bool, 3> output_mask) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rnn_ext::elman_stack_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              at::TensorList, const c10::optional<at::Tensor>&, at::TensorList, at::TensorList,
              const at::Tensor&, int64_t, bool, bool, bool, std::array<bool, 3>)>();
  return op.call(grad_output, grad_h_n, input, hx, weights, batch_sizes, dropout_masks,
                 layer_outputs, output, num_layers, bidirectional, relu, batch_first, output_mask);
}

// The initial state of an elman_stack call: hx when given, else nn.RNN's zeros [L*D, B, H]. Sizes
// are read as symbols: under torch.compile/export the batch may be a dynamic (or, packed,
// unbacked) size. The backend kernels check the arguments.
at::Tensor stack_initial_state(const at::Tensor& input, const c10::optional<at::Tensor>& hx,
                               at::TensorList weights, const c10::optional<at::Tensor>& batch_sizes,
                               int64_t num_layers, bool bidirectional, bool batch_first) {
  if (hx.has_value() && hx->defined()) return *hx;
  const char* op_name = "rnn_ext::elman_stack";
  TORCH_CHECK(weights.size() >= 2, op_name, ": weights must start with w_ih and w_hh");
  TORCH_CHECK(weights[1].dim() == 2, op_name,
              ": weight_hh of direction 0 must have shape [hidden, hidden], got ",
              weights[1].sizes());
  c10::SymInt batch;
  if (batch_sizes.has_value() && batch_sizes->defined()) {
    TORCH_CHECK(batch_sizes->dim() == 1 && batch_sizes->numel() > 0, op_name,
                ": batch_sizes must be a non-empty 1-D tensor");
    batch = batch_sizes->select(0, 0).item<int64_t>();
  } else {
    TORCH_CHECK(input.dim() == 3, op_name, ": input must be 3-D, got ", input.sizes());
    batch = input.sym_size(batch_first ? 0 : 1);
  }
  const int64_t states = num_layers * (bidirectional ? 2 : 1);
  return at::zeros_symint({c10::SymInt(states), batch, weights[1].sym_size(0)}, input.options());
}

// One node for a whole elman_stack call. Saved: input, the initial state, the output, the weights,
// the dropout masks and the outputs of the layers below the last.
class ElmanStackFunction : public torch::autograd::Function<ElmanStackFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const c10::optional<at::Tensor>& hx, at::TensorList weights,
                               const c10::optional<at::Tensor>& batch_sizes,
                               at::TensorList dropout_masks, int64_t num_layers, bool bidirectional,
                               bool relu, bool batch_first) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::Tensor h0 = stack_initial_state(input, hx, weights, batch_sizes, num_layers,
                                              bidirectional, batch_first);
    auto [output, h_n, layer_outputs] =
        call_stack_forward(input, h0, weights, batch_sizes, dropout_masks, num_layers,
                           bidirectional, relu, batch_first);
    std::vector<at::Tensor> saved = {input, h0, output};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), dropout_masks.begin(), dropout_masks.end());
    saved.insert(saved.end(), layer_outputs.begin(), layer_outputs.end());
    ctx->save_for_backward(saved);
    // One entry for the call's configuration: each saved_data entry is a string-keyed map insert
    // now and a lookup in backward, a measurable part of a small call.
    TORCH_CHECK(num_layers >= 1, "rnn_ext::elman_stack: num_layers must be at least 1, got ",
                num_layers);
    const int64_t per_layer = static_cast<int64_t>(weights.size()) / num_layers;
    const StackConfigWord config{num_layers,
                                 bidirectional,
                                 relu,
                                 batch_first,
                                 hx.has_value() && hx->defined(),
                                 per_layer == (bidirectional ? 8 : 4),
                                 !dropout_masks.empty()};
    TORCH_CHECK(config.num_weights() == static_cast<int64_t>(weights.size()) &&
                    config.num_masks() == static_cast<int64_t>(dropout_masks.size()),
                "rnn_ext::elman_stack: ", weights.size(), " weights and ", dropout_masks.size(),
                " dropout masks do not make ", num_layers, " layers");
    ctx->saved_data["config"] = config.encode();
    if (batch_sizes.has_value() && batch_sizes->defined())
      ctx->saved_data["batch_sizes"] = *batch_sizes;
    // The saved output is the kernels' buffer (backward reads act' from it); the caller gets a
    // copy with the same strides, so that in-place use of it (`out += residual`) is as free as
    // with nn.RNN.
    return {dense_copy(output), h_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const StackConfigWord config = StackConfigWord::decode(ctx->saved_data["config"].toInt());
    const int64_t num_weights = config.num_weights(), num_masks = config.num_masks();
    const int64_t num_layers = config.num_layers;
    const bool bidirectional = config.bidirectional, relu = config.relu;
    const bool batch_first = config.batch_first, has_hx = config.has_hx;
    c10::optional<at::Tensor> batch_sizes;
    if (const auto found = ctx->saved_data.find("batch_sizes"); found != ctx->saved_data.end())
      batch_sizes = found->second.toTensor();
    const at::Tensor& input = saved[0];
    const at::Tensor& hx = saved[1];
    const at::Tensor& output = saved[2];
    const auto weights_begin = saved.begin() + 3;
    const std::vector<at::Tensor> weights(weights_begin, weights_begin + num_weights);
    const std::vector<at::Tensor> masks(weights_begin + num_weights,
                                        weights_begin + num_weights + num_masks);
    const std::vector<at::Tensor> layer_outputs(weights_begin + num_weights + num_masks,
                                                saved.end());
    const at::Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(output);
    const at::Tensor grad_h_n = grads[1].defined() ? grads[1] : at::zeros_like(hx);

    // needs_input_grad counts the tensors given (an absent hx is none); result counts arguments.
    const int64_t first_weight = has_hx ? 2 : 1;
    std::vector<bool> needs(2 + num_weights, false);  // per argument: input, hx, weights
    needs[0] = ctx->needs_input_grad(0);
    needs[1] = has_hx && ctx->needs_input_grad(1);
    bool any_weight = false;
    for (const auto i : c10::irange(num_weights)) {
      needs[2 + i] = ctx->needs_input_grad(first_weight + i);
      any_weight |= needs[2 + i];
    }
    const std::array<bool, 3> mask = {needs[0], needs[1], any_weight};
    // input, hx, weights, batch_sizes, masks, num_layers, bidirectional, relu, batch_first: only
    // the first three kinds are differentiable.
    variable_list result(2 + num_weights + 1 + num_masks + 4);
    if (at::GradMode::is_enabled()) {
      // create_graph=True: gradients must themselves be differentiable.
      auto [ref_output, ref_h_n] = composite_stack_forward(
          input, hx, weights, batch_sizes, masks, num_layers, bidirectional, relu, batch_first);
      variable_list wrt;
      std::vector<int64_t> position;
      for (const auto i : c10::irange(2 + num_weights)) {
        if (!needs[i]) continue;
        wrt.push_back(i == 0 ? input : i == 1 ? hx : weights[i - 2]);
        position.push_back(i);
      }
      if (wrt.empty()) return result;
      const variable_list computed = torch::autograd::grad(
          {ref_output, ref_h_n}, wrt, {grad_output, grad_h_n}, /*retain_graph=*/true,
          /*create_graph=*/true, /*allow_unused=*/true);
      for (const auto i : c10::irange(computed.size())) result[position[i]] = computed[i];
      return result;
    }
    // Grad mode is off here: the backend kernel directly, not through the autograd fallback
    // (which boxes every argument to find that nothing needs recording).
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_input, grad_hx, grad_weights] = call_stack_backward(
        grad_output, grad_h_n, input, hx, weights, batch_sizes, masks, layer_outputs, output,
        num_layers, bidirectional, relu, batch_first, mask);
    if (mask[0]) result[0] = grad_input;
    if (mask[1]) result[1] = grad_hx;
    if (mask[2]) {
      for (const auto i : c10::irange(num_weights)) {
        if (needs[2 + i]) result[2 + i] = grad_weights[i];
      }
    }
    return result;
  }
};

bool any_requires_grad(const at::Tensor& input, const c10::optional<at::Tensor>& hx,
                       at::TensorList weights) {
  if (!at::GradMode::is_enabled()) return false;
  if (input.requires_grad() || (hx.has_value() && hx->defined() && hx->requires_grad()))
    return true;
  for (const auto& weight : weights) {
    if (weight.requires_grad()) return true;
  }
  return false;
}

std::tuple<at::Tensor, at::Tensor> elman_stack_autograd(
    const at::Tensor& input, const c10::optional<at::Tensor>& hx, at::TensorList weights,
    const c10::optional<at::Tensor>& batch_sizes, at::TensorList dropout_masks, int64_t num_layers,
    bool bidirectional, bool relu, bool batch_first) {
  if (!any_requires_grad(input, hx, weights)) {
    // Nothing to record (no_grad, inference, or no input that requires grad): the backend kernel
    // directly, without building a node that would be thrown away.
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, h_n, layer_outputs] = call_stack_forward(
        input,
        stack_initial_state(input, hx, weights, batch_sizes, num_layers, bidirectional,
                            batch_first),
        weights, batch_sizes, dropout_masks, num_layers, bidirectional, relu, batch_first);
    return {output, h_n};
  }
  const variable_list outputs = ElmanStackFunction::apply(
      input, hx, weights, batch_sizes, dropout_masks, num_layers, bidirectional, relu, batch_first);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, Autograd, m) {
  m.impl("elman_forward", &elman_forward_autograd);
  m.impl("elman_stack", &elman_stack_autograd);
}

}  // namespace rnn_ext
