// Autograd for rnn_ext::elman_forward, in C++ so a call costs no Python: the backward is the
// rnn_ext::elman_backward op. Double backward (create_graph=True) re-runs the layer as the
// composite of composite.h and differentiates that, so gradgrad works as it does for nn.RNN.
#include <torch/autograd.h>
#include <torch/library.h>
#include <torch/types.h>

#include <c10/util/irange.h>

#include "composite.h"

namespace rnn_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& input, const at::Tensor& hx,
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

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> call_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& hx, at::TensorList weights, const at::Tensor& output,
    const c10::optional<at::Tensor>& batch_sizes, bool relu, std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rnn_ext::elman_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, at::TensorList, const at::Tensor&,
                           const c10::optional<at::Tensor>&, bool, std::array<bool, 3>)>();
  return op.call(grad_output, grad_h_n, input, hx, weights, output, batch_sizes, relu, output_mask);
}

class ElmanFunction : public torch::autograd::Function<ElmanFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& hx,
                               at::TensorList weights, const c10::optional<at::Tensor>& batch_sizes,
                               bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, h_n] = call_forward(input, hx, weights, batch_sizes, relu);
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
    auto [grad_input, grad_hx, grad_weights] =
        call_backward(grad_output, grad_h_n, input, hx, weights, output, batch_sizes, relu, mask);
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

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, Autograd, m) { m.impl("elman_forward", &elman_forward_autograd); }

}  // namespace rnn_ext
