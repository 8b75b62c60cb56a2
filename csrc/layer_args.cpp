// Argument checks and shape reading for the layer ops (see layer_args.h).
#include "layer_args.h"

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/irange.h>

#include <cstring>
#include <exception>
#include <limits>

namespace rnn_ext {

LayerArgs read_layer_args(const char* op_name, const at::Tensor& input, const at::Tensor& hx,
                          at::TensorList weights, const c10::optional<at::Tensor>& batch_sizes,
                          bool relu) {
  LayerArgs args;
  ElmanShape& s = args.shape;
  const bool packed = batch_sizes.has_value() && batch_sizes->defined();
  at::Tensor sizes_c;  // batch_sizes, contiguous, when packed
  s.packed = packed;
  s.activation = relu ? Activation::Relu : Activation::Tanh;

  TORCH_CHECK(input.is_floating_point(), op_name, ": input must be a floating point tensor, got ",
              input.scalar_type());
  TORCH_CHECK(hx.dim() == 3, op_name, ": hx must be [directions, batch, hidden], got ", hx.sizes());
  s.directions = hx.size(0);
  TORCH_CHECK(s.directions == 1 || s.directions == 2, op_name,
              ": hx.size(0) is the number of directions and must be 1 or 2, got ", s.directions);
  TORCH_CHECK(weights.size() == static_cast<size_t>(2 * s.directions) ||
                  weights.size() == static_cast<size_t>(4 * s.directions),
              op_name, ": weights must hold (w_ih, w_hh[, b_ih, b_hh]) for each of the ",
              s.directions, " direction(s), got ", weights.size(), " tensors");
  s.has_bias = weights.size() == static_cast<size_t>(4 * s.directions);
  s.hidden_size = hx.size(2);

  if (packed) {
    const at::Tensor& sizes = *batch_sizes;
    TORCH_CHECK(input.dim() == 2, op_name, ": packed input must be [rows, input_size], got ",
                input.sizes());
    TORCH_CHECK(sizes.dim() == 1 && sizes.scalar_type() == at::kLong && sizes.device().is_cpu(),
                op_name, ": batch_sizes must be a 1-D int64 CPU tensor, got ", sizes.scalar_type(),
                " ", sizes.sizes(), " on ", sizes.device());
    TORCH_CHECK(sizes.numel() > 0, op_name, ": batch_sizes must not be empty");
    sizes_c = sizes.contiguous();
    s.steps = sizes_c.numel();
    s.input_size = input.size(1);
  } else {
    TORCH_CHECK(input.dim() == 3, op_name, ": input must be [steps, batch, input_size], got ",
                input.sizes());
    s.steps = input.size(0);
    s.batch = input.size(1);
    s.input_size = input.size(2);
  }
  TORCH_CHECK(s.steps > 0, op_name, ": the sequence must have at least one step");
  try {
    if (packed) {
      const int64_t* data = sizes_c.data_ptr<int64_t>();
      args.batch_sizes.assign(data, data + s.steps);
      s.batch = args.batch_sizes[0];
    } else {
      args.batch_sizes.assign(s.steps, s.batch);
    }
    args.step_offsets.resize(s.steps + 1);
  } catch (const std::exception&) {  // std::bad_alloc, or std::length_error past max_size
    // An expanded input can claim far more steps than memory holds; say so as torch would.
    TORCH_CHECK(false, op_name, ": cannot allocate the per-step bookkeeping for ", s.steps,
                " steps (out of memory)");
  }
  int64_t total = 0;
  for (const auto t : c10::irange(s.steps)) {
    const int64_t size = args.batch_sizes[t];
    TORCH_CHECK(size >= 0 && size <= s.batch && (t == 0 || size <= args.batch_sizes[t - 1]),
                op_name, ": batch_sizes must be non-increasing and non-negative, got ",
                c10::IntArrayRef(args.batch_sizes));
    TORCH_CHECK(!packed || size > 0, op_name, ": batch_sizes must be positive when packed");
    TORCH_CHECK(total <= std::numeric_limits<int64_t>::max() - size, op_name,
                ": batch_sizes sum past the int64 range");
    args.step_offsets[t] = total;
    total += size;
  }
  args.step_offsets[s.steps] = total;
  s.rows = total;
  if (packed) {
    TORCH_CHECK(input.size(0) == total, op_name, ": packed input has ", input.size(0),
                " rows but batch_sizes sum to ", total);
  }

  TORCH_CHECK(hx.size(1) == s.batch, op_name, ": hx batch ", hx.size(1),
              " does not match the input batch ", s.batch);
  // Device errors carry torch.nn.RNN's own text: the module relies on these checks.
  TORCH_CHECK(hx.device() == input.device(),
              "Input and hidden tensors are not at the same device, found input tensor at ",
              input.device(), " and hidden tensor at ", hx.device());
  for (const auto& weight : weights) {
    TORCH_CHECK(weight.device() == input.device(),
                "Input and parameter tensors are not at the same device, found input tensor at ",
                input.device(), " and parameter tensor at ", weight.device());
  }
  TORCH_CHECK(hx.scalar_type() == input.scalar_type(), op_name, ": hx dtype ", hx.scalar_type(),
              " does not match input dtype ", input.scalar_type());

  const int64_t per_direction = s.weights_per_direction();
  const int64_t H = s.hidden_size;
  for (const auto d : c10::irange(s.directions)) {
    DirectionWeights w;
    w.weight_ih = weights[d * per_direction];
    w.weight_hh = weights[d * per_direction + 1];
    if (s.has_bias) {
      w.bias_ih = weights[d * per_direction + 2];
      w.bias_hh = weights[d * per_direction + 3];
    }
    auto check_weight = [&](const at::Tensor& t, const char* name, at::IntArrayRef expected) {
      TORCH_CHECK(t.sizes() == expected, op_name, ": ", name, " of direction ", d,
                  " must have shape ", expected, ", got ", t.sizes());
      TORCH_CHECK(t.scalar_type() == input.scalar_type(), op_name, ": ", name, " dtype ",
                  t.scalar_type(), " does not match input dtype ", input.scalar_type());
    };
    check_weight(w.weight_ih, "weight_ih", {H, s.input_size});
    check_weight(w.weight_hh, "weight_hh", {H, H});
    if (s.has_bias) {
      check_weight(w.bias_ih, "bias_ih", {H});
      check_weight(w.bias_hh, "bias_hh", {H});
    }
    args.directions.push_back(std::move(w));
  }
  return args;
}

LayerArgs read_backward_args(const char* op_name, const at::Tensor& grad_output,
                             const at::Tensor& grad_h_n, const at::Tensor& input,
                             const at::Tensor& hx, at::TensorList weights, const at::Tensor& output,
                             const c10::optional<at::Tensor>& batch_sizes, bool relu) {
  LayerArgs args = read_layer_args(op_name, input, hx, weights, batch_sizes, relu);
  const auto expected_output = output_sizes(args);
  TORCH_CHECK(output.sizes() == c10::IntArrayRef(expected_output), op_name,
              ": output must have shape ", c10::IntArrayRef(expected_output), ", got ",
              output.sizes());
  TORCH_CHECK(grad_output.sizes() == output.sizes(), op_name, ": grad_output must have shape ",
              output.sizes(), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_h_n.sizes() == hx.sizes(), op_name, ": grad_h_n must have shape ", hx.sizes(),
              ", got ", grad_h_n.sizes());
  for (const at::Tensor* t : {&grad_output, &grad_h_n, &output}) {
    TORCH_CHECK(t->scalar_type() == input.scalar_type() && t->device() == input.device(), op_name,
                ": grad_output, grad_h_n and output must match the input's dtype and device (",
                input.scalar_type(), " on ", input.device(), "), got ", t->scalar_type(), " on ",
                t->device());
  }
  return args;
}

std::vector<int64_t> output_sizes(const LayerArgs& args) {
  const ElmanShape& s = args.shape;
  if (s.packed) return {s.rows, s.output_width()};
  return {s.steps, s.batch, s.output_width()};
}

StepLayout step_layout(const LayerArgs& args) {
  return StepLayout{args.batch_sizes.data(), args.step_offsets.data(), args.shape.steps,
                    args.shape.batch};
}

at::Tensor dense_copy(const at::Tensor& t) {
  // Exactly what a CPU tensor of plain storage carries: a fake tensor adds Python, a functorch
  // wrapper or a negative-bit view its own keys.
  static const c10::DispatchKeySet plain_cpu({c10::DispatchKey::CPU, c10::DispatchKey::AutogradCPU,
                                              c10::DispatchKey::ADInplaceOrView,
                                              c10::DispatchKey::AutocastCPU});
  if (!t.defined()) return t;
  // A dispatch mode (make_fx, a user's TorchDispatchMode) sees ops, not a memcpy: clone then.
  if (t.key_set() != plain_cpu || !t.is_non_overlapping_and_dense() ||
      c10::impl::dispatch_mode_enabled() ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python))
    return t.clone();
  at::Tensor copy = at::empty_strided(t.sizes(), t.strides(), t.options());
  if (t.numel() > 0) std::memcpy(copy.data_ptr(), t.const_data_ptr(), t.numel() * t.element_size());
  return copy;
}

BackwardResult backward_result(const LayerArgs& args, const at::Tensor& input,
                               at::TensorList weights, std::array<bool, 3> output_mask,
                               at::Tensor grad_input, at::Tensor grad_hx,
                               const std::vector<DirectionGradients>& directions) {
  const at::TensorOptions options = input.options();
  if (!output_mask[0]) {
    grad_input = at::empty({0}, options);
  } else {
    grad_input =
        grad_input.defined() ? grad_input.view(input.sizes()) : at::zeros(input.sizes(), options);
  }
  if (!output_mask[1]) grad_hx = at::empty({0}, options);
  std::vector<at::Tensor> grad_weights;
  if (output_mask[2]) {
    for (const auto index : c10::irange(weights.size())) {
      const int64_t per_direction = args.shape.weights_per_direction();
      const DirectionGradients* g =
          directions.empty() ? nullptr : &directions[index / per_direction];
      at::Tensor grad;
      if (g != nullptr) {
        switch (index % per_direction) {
          case 0:
            grad = g->weight_ih;
            break;
          case 1:
            grad = g->weight_hh;
            break;
          case 2:
            grad = g->bias;
            break;
          default:
            grad = dense_copy(g->bias);
            break;  // own tensor
        }
      }
      grad_weights.push_back(
          grad.defined() ? grad : at::zeros_like(weights[index], at::MemoryFormat::Contiguous));
    }
  }
  return {grad_input, grad_hx, grad_weights};
}

}  // namespace rnn_ext
