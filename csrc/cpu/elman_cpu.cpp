// CPU forward and backward of one Elman layer (all directions), registered for the CPU key.
// Forward: one input projection over all rows, written straight into the output, then per step
// h_t = act(out_t + h_{t-1} W_hh^T) in place. Backward: the reverse loop turns output gradients into
// pre-activation gradients dP; weight, bias and input gradients are then single products over all
// rows. Only the output is saved: act'(.) is a function of h_t.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <c10/util/irange.h>

#include <cstring>
#include <vector>

#include "../elman.h"
#include "../layer_args.h"
#include "row_matmul.h"

namespace rnn_ext {
namespace {

using cpu::PackedMatrix;

// Below this many multiply-adds the input projection stays on the calling thread.
constexpr int64_t kParallelWorkThreshold = 1 << 18;
// A time step is split across threads only above this many multiply-adds: a fork/join costs a
// few microseconds, which a 32 x 32 x 32 step (about 1 us of arithmetic) would not repay.
constexpr int64_t kStepParallelThreshold = 1 << 16;

// One step's product c = (accumulate ? c : 0) + a @ b, then epilogue(column_begin, column_end)
// on the columns just written. Large steps split their columns across torch's intra-op threads,
// so each thread reads only its slice of W_hh and no two threads write the same element.
template <typename T, typename Epilogue>
void step_product(int64_t rows, const T* const* a_rows, const PackedMatrix<T>& b,
                  T* const* c_rows, bool accumulate, const Epilogue& epilogue) {
  constexpr int64_t block = cpu::column_block<T>();
  const int64_t blocks = b.padded_width / block;
  if (rows * b.depth * b.width < kStepParallelThreshold || blocks < 2 ||
      at::get_num_threads() < 2 || at::in_parallel_region()) {
    cpu::row_matmul<T>(rows, a_rows, b, c_rows, accumulate);
    epilogue(0, b.width);
    return;
  }
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t column_begin = begin * block;
    const int64_t column_end = std::min(end * block, b.width);
    cpu::row_matmul<T>(rows, a_rows, b, c_rows, accumulate, column_begin, column_end);
    epilogue(column_begin, column_end);
  });
}

// c[r] = (accumulate ? c[r] : 0) + a[r] @ b for `rows` rows at fixed strides, split over rows
// across torch's intra-op threads when the product is large enough.
template <typename T>
void parallel_row_matmul(int64_t rows, const T* a, int64_t a_stride, const PackedMatrix<T>& b,
                         T* c, int64_t c_stride, bool accumulate) {
  const int64_t per_row = std::max<int64_t>(1, b.depth * b.width);
  const int64_t grain = std::max<int64_t>(16, kParallelWorkThreshold / per_row);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<const T*> a_rows(end - begin);
    std::vector<T*> c_rows(end - begin);
    for (int64_t r = begin; r < end; ++r) {
      a_rows[r - begin] = a + r * a_stride;
      c_rows[r - begin] = c + r * c_stride;
    }
    cpu::row_matmul<T>(end - begin, a_rows.data(), b, c_rows.data(), accumulate);
  });
}

template <typename T>
void apply_activation(T* values, int64_t count, Activation activation) {
  if (activation == Activation::Tanh) {
    cpu::tanh_inplace(values, count);
  } else {
    for (int64_t i = 0; i < count; ++i) values[i] = activate(values[i], Activation::Relu);
  }
}

// output[row, d*H:(d+1)*H] = (bias_ih + bias_hh) + input[row] @ W_ih^T for every row.
template <typename T>
void project_inputs(const LayerArgs& args, int64_t direction, const T* input, T* output) {
  const ElmanShape& s = args.shape;
  const DirectionWeights& w = args.directions[direction];
  const int64_t H = s.hidden_size;
  const int64_t width = s.output_width();
  const at::Tensor weight_ih = w.weight_ih.contiguous();
  PackedMatrix<T> weight_t;
  cpu::pack_matrix(weight_t, weight_ih.data_ptr<T>(), s.input_size, H, /*k_stride=*/1,
                   /*j_stride=*/s.input_size);
  std::vector<T> bias(H, T(0));
  if (s.has_bias) {
    const at::Tensor b_ih = w.bias_ih.contiguous(), b_hh = w.bias_hh.contiguous();
    for (const auto j : c10::irange(H)) bias[j] = b_ih.data_ptr<T>()[j] + b_hh.data_ptr<T>()[j];
  }
  T* output_columns = output + output_index(0, direction, 0, H, s.directions);
  if (s.has_bias) {
    for (const auto r : c10::irange(s.rows)) std::memcpy(output_columns + r * width, bias.data(), H * sizeof(T));
  }
  parallel_row_matmul<T>(s.rows, input, s.input_size, weight_t, output_columns, width, s.has_bias);
}

template <typename T>
void forward_direction(const LayerArgs& args, int64_t direction, const T* hx, T* output, T* h_n) {
  const ElmanShape& s = args.shape;
  const int64_t H = s.hidden_size, D = s.directions, T_ = s.steps;
  const bool reverse = direction == 1;
  const StepLayout layout = step_layout(args);
  const at::Tensor weight_hh = args.directions[direction].weight_hh.contiguous();
  PackedMatrix<T> weight_t;  // element (k, j) = W_hh[j, k]
  cpu::pack_matrix(weight_t, weight_hh.data_ptr<T>(), H, H, /*k_stride=*/1, /*j_stride=*/H);
  const T* h0 = hx + state_index(direction, 0, 0, s.batch, H);
  T* final_state = h_n + state_index(direction, 0, 0, s.batch, H);

  std::vector<const T*> previous(s.batch);
  std::vector<T*> current(s.batch);
  for (const auto position : c10::irange(T_)) {
    const int64_t t = step_of_position(position, T_, reverse, /*backward=*/false);
    const int64_t rows = layout.size(t);
    for (const auto b : c10::irange(rows)) {
      previous[b] = layout.reads_initial_state(t, b, reverse)
                        ? h0 + b * H
                        : output + output_index(layout.row(previous_step(t, reverse), b), direction, 0, H, D);
      current[b] = output + output_index(layout.row(t, b), direction, 0, H, D);
    }
    step_product(rows, previous.data(), weight_t, current.data(), /*accumulate=*/true,
                 [&](int64_t column_begin, int64_t column_end) {
                   if (D == 1 && column_begin == 0 && column_end == H) {
                     apply_activation(current[0], rows * H, s.activation);  // rows are adjacent
                     return;
                   }
                   for (const auto b : c10::irange(rows))
                     apply_activation(current[b] + column_begin, column_end - column_begin,
                                      s.activation);
                 });
    for (const auto b : c10::irange(rows)) {
      if (layout.writes_final_state(t, b, reverse))
        std::memcpy(final_state + b * H, current[b], H * sizeof(T));
    }
  }
}

template <typename T>
void forward_typed(const LayerArgs& args, const at::Tensor& input, const at::Tensor& hx,
                   at::Tensor& output, at::Tensor& h_n) {
  for (const auto d : c10::irange(args.shape.directions)) {
    project_inputs<T>(args, d, input.data_ptr<T>(), output.data_ptr<T>());
    forward_direction<T>(args, d, hx.data_ptr<T>(), output.data_ptr<T>(), h_n.data_ptr<T>());
  }
}

// Reverse loop of one direction: fills this direction's columns of grad_pre (dL/d pre-activation)
// and of previous_states (h_{t-1} per row, for the W_hh gradient), and grad_hx for the direction.
template <typename T>
void backward_direction(const LayerArgs& args, int64_t direction, const T* grad_output,
                        const T* grad_h_n, const T* hx, const T* output, T* grad_pre,
                        T* previous_states, T* grad_hx) {
  const ElmanShape& s = args.shape;
  const int64_t H = s.hidden_size, D = s.directions, T_ = s.steps;
  const bool reverse = direction == 1;
  const StepLayout layout = step_layout(args);
  const at::Tensor weight_hh = args.directions[direction].weight_hh.contiguous();
  PackedMatrix<T> weight;  // element (j, k) = W_hh[j, k]: dh_{t-1} = dP_t W_hh
  cpu::pack_matrix(weight, weight_hh.data_ptr<T>(), H, H, /*k_stride=*/H, /*j_stride=*/1);
  const int64_t first = state_index(direction, 0, 0, s.batch, H);
  const T* h0 = hx + first;
  const T* grad_final = grad_h_n + first;
  T* grad_h0 = grad_hx + first;

  std::vector<T> carry(s.batch * H, T(0));  // dL/dh for the step being processed
  std::vector<const T*> grad_rows(s.batch);
  std::vector<T*> targets(s.batch);
  for (const auto position : c10::irange(T_)) {
    const int64_t t = step_of_position(position, T_, reverse, /*backward=*/true);
    const int64_t rows = layout.size(t);
    for (const auto b : c10::irange(rows)) {
      T* dh = carry.data() + b * H;
      if (layout.writes_final_state(t, b, reverse))
        std::memcpy(dh, grad_final + b * H, H * sizeof(T));
      const int64_t index = output_index(layout.row(t, b), direction, 0, H, D);
      const T* y = output + index;
      const T* g = grad_output + index;
      T* dp = grad_pre + index;
      for (const auto j : c10::irange(H))
        dp[j] = activation_backward(dh[j] + g[j], y[j], s.activation);
      grad_rows[b] = dp;
      const bool initial = layout.reads_initial_state(t, b, reverse);
      const T* h_prev = initial ? h0 + b * H
                                : output + output_index(layout.row(previous_step(t, reverse), b),
                                                        direction, 0, H, D);
      std::memcpy(previous_states + index, h_prev, H * sizeof(T));
      targets[b] = initial ? grad_h0 + b * H : dh;
    }
    step_product(rows, grad_rows.data(), weight, targets.data(), /*accumulate=*/false,
                 [](int64_t, int64_t) {});
  }
}

template <typename T>
at::Tensor input_gradient(const LayerArgs& args, const at::Tensor& grad_pre) {
  const ElmanShape& s = args.shape;
  const int64_t width = s.output_width();
  std::vector<at::Tensor> weights_ih;
  for (const auto& w : args.directions) weights_ih.push_back(w.weight_ih);
  const at::Tensor stacked =  // [D*H, I]
      weights_ih.size() == 1 ? weights_ih[0].contiguous() : at::cat(weights_ih, 0);
  PackedMatrix<T> packed;
  cpu::pack_matrix(packed, stacked.data_ptr<T>(), width, s.input_size, /*k_stride=*/s.input_size,
                   /*j_stride=*/1);
  at::Tensor grad_input = at::empty({s.rows, s.input_size}, grad_pre.options());
  parallel_row_matmul<T>(s.rows, grad_pre.data_ptr<T>(), width, packed, grad_input.data_ptr<T>(),
                         s.input_size, /*accumulate=*/false);
  return grad_input;
}

// Weight gradients dW_ih = dP^T X and dW_hh = dP^T H_prev per direction, with the same kernel:
// the rows of dP^T times X (or H_prev) packed as the right-hand side.
template <typename T>
std::vector<DirectionGradients> weight_gradients(const LayerArgs& args, const at::Tensor& grad_pre,
                                                 const at::Tensor& input_rows,
                                                 const at::Tensor& previous_states) {
  const ElmanShape& s = args.shape;
  const int64_t H = s.hidden_size, width = s.output_width();
  const at::Tensor grad_pre_t = grad_pre.t().contiguous();  // [D*H, rows]
  PackedMatrix<T> inputs, previous;
  cpu::pack_matrix(inputs, input_rows.data_ptr<T>(), s.rows, s.input_size,
                   /*k_stride=*/s.input_size, /*j_stride=*/1);
  std::vector<DirectionGradients> grads;
  for (const auto d : c10::irange(s.directions)) {
    const T* grad_pre_d = grad_pre_t.data_ptr<T>() + d * H * s.rows;
    DirectionGradients g;
    g.weight_ih = at::empty({H, s.input_size}, grad_pre.options());
    parallel_row_matmul<T>(H, grad_pre_d, s.rows, inputs, g.weight_ih.data_ptr<T>(), s.input_size,
                           /*accumulate=*/false);
    cpu::pack_matrix(previous, previous_states.data_ptr<T>() + d * H, s.rows, H,
                     /*k_stride=*/width, /*j_stride=*/1);
    g.weight_hh = at::empty({H, H}, grad_pre.options());
    parallel_row_matmul<T>(H, grad_pre_d, s.rows, previous, g.weight_hh.data_ptr<T>(), H,
                           /*accumulate=*/false);
    if (s.has_bias) {
      // The column sums of dP_d, summed row by row so the result is the same whatever the thread
      // count.
      g.bias = at::zeros({H}, grad_pre.options());
      T* sums = g.bias.data_ptr<T>();
      const T* rows = grad_pre.data_ptr<T>() + d * H;
      for (const auto r : c10::irange(s.rows))
        for (const auto j : c10::irange(H)) sums[j] += rows[r * width + j];
    }
    grads.push_back(std::move(g));
  }
  return grads;
}

// Half types run in float32 on the CPU and come back in their own type.
bool computes_in_float(const at::Tensor& input) {
  return input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
}

std::vector<at::Tensor> to_float(at::TensorList tensors) {
  std::vector<at::Tensor> result;
  for (const auto& t : tensors) result.push_back(t.to(at::kFloat));
  return result;
}

std::tuple<at::Tensor, at::Tensor> elman_forward_cpu(const at::Tensor& input, const at::Tensor& hx,
                                                     at::TensorList weights,
                                                     const c10::optional<at::Tensor>& batch_sizes,
                                                     bool relu) {
  const LayerArgs args =
      read_layer_args("rnn_ext::elman_forward", input, hx, weights, batch_sizes, relu);
  if (computes_in_float(input)) {
    auto [output, h_n] = elman_forward_cpu(input.to(at::kFloat), hx.to(at::kFloat),
                                           to_float(weights), batch_sizes, relu);
    return {output.to(input.scalar_type()), h_n.to(input.scalar_type())};
  }
  const ElmanShape& s = args.shape;
  at::Tensor output = at::empty(output_sizes(args), input.options());
  at::Tensor h_n = at::empty({s.directions, s.batch, s.hidden_size}, input.options());
  if (s.rows == 0) return {output, h_n};
  const at::Tensor input_rows = input.reshape({s.rows, s.input_size}).contiguous();
  const at::Tensor hx_c = hx.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_ext::elman_forward", [&] {
    forward_typed<scalar_t>(args, input_rows, hx_c, output, h_n);
  });
  return {output, h_n};
}

BackwardResult elman_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& hx, at::TensorList weights, const at::Tensor& output,
    const c10::optional<at::Tensor>& batch_sizes, bool relu, std::array<bool, 3> output_mask) {
  const char* op_name = "rnn_ext::elman_backward";
  const LayerArgs args = read_backward_args(op_name, grad_output, grad_h_n, input, hx, weights,
                                            output, batch_sizes, relu);
  const ElmanShape& s = args.shape;
  if (computes_in_float(input)) {
    auto [gi, gh, gw] = elman_backward_cpu(
        grad_output.to(at::kFloat), grad_h_n.to(at::kFloat), input.to(at::kFloat),
        hx.to(at::kFloat), to_float(weights), output.to(at::kFloat), batch_sizes, relu, output_mask);
    const auto type = input.scalar_type();
    for (auto& g : gw) g = g.to(type);
    return {gi.to(type), gh.to(type), gw};
  }

  const int64_t width = s.output_width();
  at::Tensor grad_pre = at::empty({s.rows, width}, input.options());
  at::Tensor previous_states = at::empty({s.rows, width}, input.options());
  at::Tensor grad_hx = at::zeros_like(hx, at::MemoryFormat::Contiguous);
  at::Tensor grad_input;
  std::vector<DirectionGradients> grad_directions;
  if (s.rows > 0) {
    const at::Tensor input_rows = input.reshape({s.rows, s.input_size}).contiguous();
    const at::Tensor grad_output_c = grad_output.contiguous();
    const at::Tensor grad_h_n_c = grad_h_n.contiguous();
    const at::Tensor hx_c = hx.contiguous();
    const at::Tensor output_c = output.contiguous();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_ext::elman_backward", [&] {
      for (const auto d : c10::irange(s.directions)) {
        backward_direction<scalar_t>(args, d, grad_output_c.data_ptr<scalar_t>(),
                                     grad_h_n_c.data_ptr<scalar_t>(), hx_c.data_ptr<scalar_t>(),
                                     output_c.data_ptr<scalar_t>(), grad_pre.data_ptr<scalar_t>(),
                                     previous_states.data_ptr<scalar_t>(),
                                     grad_hx.data_ptr<scalar_t>());
      }
      if (output_mask[0]) grad_input = input_gradient<scalar_t>(args, grad_pre);
      if (output_mask[2])
        grad_directions = weight_gradients<scalar_t>(args, grad_pre, input_rows, previous_states);
    });
  }
  return backward_result(args, input, weights, output_mask, grad_input, grad_hx, grad_directions);
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, CPU, m) {
  m.impl("elman_forward", &elman_forward_cpu);
  m.impl("elman_backward", &elman_backward_cpu);
}

}  // namespace rnn_ext
