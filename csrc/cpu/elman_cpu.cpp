// CPU forward and backward of one Elman layer (all directions), registered for the CPU key.
// Forward: one input projection over all rows (all directions at once), written straight into the
// output, then per step h_t = act(out_t + h_{t-1} W_hh^T) in place. Backward: the reverse loop
// turns output gradients into pre-activation gradients dP; weight, bias and input gradients are
// then products over all rows. Only the output is saved: act'(.) is a function of h_t.
//
// Threads (team.h): the large products (input projection, input and weight gradients) run the
// packed register-blocked kernel of row_matmul.h on parts fixed by their shapes, one part per
// thread at a time. That kernel sums each output element over k in the same order whatever rows
// or columns it is given, so neither the parts nor the thread count change the bits. The
// recurrences run in one team per layer: the two directions of a bidirectional layer on different
// threads, or else each step's columns split over the team with one barrier per step. Splitting
// columns never splits a sum, so any split gives the same bits.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>
#include <torch/types.h>

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/irange.h>

#include <cstring>
#include <vector>

#include "../elman.h"
#include "../layer_args.h"
#include "bf16_kernels.h"
#include "bf16_layer.h"
#include "elman_cpu.h"
#include "row_matmul.h"
#include "team.h"

namespace rnn_ext {
namespace {

using cpu::PackedMatrix;

using cpu::Phase;

// Multiply-adds per part of a large product, and the most parts: enough parts to balance two to
// eight threads, each large enough (about 10 us) to repay its share of starting a team.
constexpr int64_t kPartWork = 1 << 19;
constexpr int64_t kMaxParts = 8;
// A time step's columns are split over the team only above this many multiply-adds: measured on
// two cores, a 32 x 128 x 128 step (0.5M) ran slower split than whole, the barrier after each
// step and the cross-core traffic of h_t costing more than half the step.
constexpr int64_t kStepParallelThreshold = 1 << 20;
// Column granularity of a step split: two column panels (the kernels' strips stop at a range's
// end, so the unit only sets how finely a step's columns are shared).
constexpr int64_t kColumnUnit(int64_t block) { return 2 * block; }

// The number of parts of a product over `extent` splittable rows (or columns) with `macs`
// multiply-adds: a function of the shape alone; one part (the calling thread) below kPartWork.
int64_t product_parts(int64_t macs, int64_t extent) {
  return std::max<int64_t>(1, std::min({macs / kPartWork, kMaxParts, extent}));
}

// Runs pack(thread, team) on every thread of the team, waits for the whole team (a part reads all
// that was packed), then part(p) for p in [0, parts), contiguous runs of parts per thread. The
// bits depend on the parts (the shapes), not on the threads.
template <typename Pack, typename Part>
void run_parts(Phase phase, int64_t parts, const Pack& pack, const Part& part,
               bool use_team = true) {
  // Packing and parts touch raw memory only (no ATen call, no BLAS): nothing in them depends on a
  // worker thread's dispatch state or on a BLAS library's own threads.
  cpu::run_team(use_team && parts > 1, [&](int thread, int team) {
    cpu::mark_worker(phase, thread);
    pack(thread, team);
    if (team > 1) cpu::team_barrier();
    const auto [begin, end] = cpu::split_range(parts, 1, thread, team);
    for (int64_t p = begin; p < end; ++p) part(p);
  });
}

// Packs a team thread's share of the column panels of `packed` from source (as pack_columns).
template <typename T>
void pack_share(PackedMatrix<T>& packed, const T* source, int64_t k_stride, int64_t j_stride,
                int thread, int team) {
  const auto [begin, end] = cpu::split_range(packed.width, cpu::column_block<T>(), thread, team);
  cpu::pack_columns(packed, source, k_stride, j_stride, begin, end);
}

// c[r] = (accumulate ? c[r] : 0) + a[r] @ b for `rows` rows at fixed strides, on the calling
// thread.
template <typename T>
void strided_row_matmul(int64_t rows, const T* a, int64_t a_stride, const PackedMatrix<T>& b, T* c,
                        int64_t c_stride, bool accumulate) {
  std::vector<const T*> a_rows(rows);
  std::vector<T*> c_rows(rows);
  for (const auto r : c10::irange(rows)) {
    a_rows[r] = a + r * a_stride;
    c_rows[r] = c + r * c_stride;
  }
  cpu::row_matmul<T>(rows, a_rows.data(), b, c_rows.data(), accumulate);
}

// W_ih of every direction stacked [D*H, I] (the weight itself for one direction).
at::Tensor stacked_input_weights(const LayerArgs& args) {
  if (args.directions.size() == 1) return args.directions[0].weight_ih.contiguous();
  std::vector<at::Tensor> weights;
  for (const auto& w : args.directions) weights.push_back(w.weight_ih);
  return at::cat(weights, 0);
}

// (b_ih + b_hh) of every direction, stacked [D*H], summed here rather than by an ATen add (a
// dispatch and an allocation on every call of a small layer); the same sum, so the same bits.
// Empty without bias.
template <typename T>
std::vector<T> summed_biases(const LayerArgs& args) {
  std::vector<T> sums;
  if (!args.shape.has_bias) return sums;
  const int64_t H = args.shape.hidden_size;
  sums.resize(args.directions.size() * H);
  for (const auto d : c10::irange(args.directions.size())) {
    const at::Tensor b_ih = args.directions[d].bias_ih.contiguous();
    const at::Tensor b_hh = args.directions[d].bias_hh.contiguous();
    const T* a = b_ih.data_ptr<T>();
    const T* b = b_hh.data_ptr<T>();
    for (const auto j : c10::irange(H)) sums[d * H + j] = a[j] + b[j];
  }
  return sums;
}

// output[row, :] = (bias_ih + bias_hh) + input[row] @ W_ih^T for every row, all directions at once.
template <typename T>
void project_inputs(const LayerArgs& args, const at::Tensor& input_rows, at::Tensor& output_rows) {
  cpu::PhaseTimer timer(Phase::InputProjection);
  const ElmanShape& s = args.shape;
  const at::Tensor weight = stacked_input_weights(args);  // [D*H, I]
  PackedMatrix<T> weight_t;  // element (k, j) = W[j, k], packed once for every part
  cpu::shape_packed(weight_t, s.input_size, s.output_width());
  const std::vector<T> bias = summed_biases<T>(args);
  const T* bias_data = s.has_bias ? bias.data() : nullptr;
  const T* weight_data = weight.data_ptr<T>();  // read here: nothing may throw inside the team
  const T* in = input_rows.data_ptr<T>();
  T* out = output_rows.data_ptr<T>();
  const int64_t macs = s.rows * s.input_size * s.output_width();
  const int64_t parts = product_parts(macs, s.rows);
  run_parts(
      Phase::InputProjection, parts,
      [&](int thread, int team) {
        pack_share(weight_t, weight_data, /*k_stride=*/1, /*j_stride=*/s.input_size, thread, team);
      },
      [&](int64_t p) {
        const auto [begin, end] = cpu::split_range(s.rows, 1, p, parts);
        cpu::project_rows<T>(args, weight_t, bias_data, in, out, begin, end);
      });
}

// The columns [column_begin, column_end) of the steps at `positions` of one direction's forward
// recurrence (every step: {0, T}).
// With a column range short of H, the caller's team runs the other ranges and every thread of the
// team calls team_barrier() once per step (the next step reads all columns of this one).
template <typename T>
void forward_recurrence(const LayerArgs& args, int64_t direction, const PackedMatrix<T>& weight_t,
                        const T* hx, T* output, T* h_n, int64_t column_begin, int64_t column_end,
                        bool in_team, std::array<int64_t, 2> positions) {
  const ElmanShape& s = args.shape;
  const int64_t H = s.hidden_size, D = s.directions, T_ = s.steps;
  const bool reverse = direction == 1;
  const StepLayout layout = step_layout(args);
  const T* h0 = hx + state_index(direction, 0, 0, s.batch, H);
  T* final_state = h_n + state_index(direction, 0, 0, s.batch, H);
  const int64_t columns = column_end - column_begin;

  std::vector<const T*> previous(s.batch);
  std::vector<T*> current(s.batch);
  for (int64_t position = positions[0]; position < positions[1]; ++position) {
    const int64_t t = step_of_position(position, T_, reverse, /*backward=*/false);
    const int64_t rows = layout.size(t);
    for (const auto b : c10::irange(rows)) {
      previous[b] =
          layout.reads_initial_state(t, b, reverse)
              ? h0 + b * H
              : output + output_index(layout.row(previous_step(t, reverse), b), direction, 0, H, D);
      current[b] = output + output_index(layout.row(t, b), direction, 0, H, D);
    }
    if (columns > 0) {
      // h_t = activation(projection + h_{t-1} @ W_hh^T), the activation applied in the store.
      cpu::row_matmul<T>(rows, previous.data(), weight_t, current.data(), /*accumulate=*/true,
                         column_begin, column_end, cpu::activation_epilogue(s.activation));
      for (const auto b : c10::irange(rows)) {
        if (layout.writes_final_state(t, b, reverse))
          std::memcpy(final_state + b * H + column_begin, current[b] + column_begin,
                      columns * sizeof(T));
      }
    }
    if (in_team) cpu::team_barrier();
  }
}

// True when a step of `rows` x H x H is worth splitting over threads.
bool splits_steps(const ElmanShape& s) {
  return s.batch * s.hidden_size * s.hidden_size >= kStepParallelThreshold &&
         s.hidden_size > kColumnUnit(cpu::column_block<float>());
}

// Runs recurrence(direction, column_begin, column_end, in_team) for every direction of the layer:
// a bidirectional layer's directions on two threads, else one direction at a time, each step
// split over the team when it is large enough.
template <typename Recurrence>
void run_recurrences(const ElmanShape& s, Phase phase, int64_t block,
                     const Recurrence& recurrence) {
  const int64_t H = s.hidden_size;
  if (s.directions == 2 && cpu::available_threads() >= 2) {
    // OpenMP may grant a smaller team than asked for (OMP_THREAD_LIMIT, OMP_DYNAMIC): the team
    // that runs covers both directions whatever its size.
    cpu::run_team(true, [&](int thread, int team) {
      for (int d = thread; d < 2; d += team) {
        cpu::mark_worker(phase, thread);
        recurrence(d, 0, H, false);
      }
    });
    return;
  }
  for (const auto d : c10::irange(s.directions)) {
    cpu::run_team(splits_steps(s), [&](int thread, int team) {
      const auto [begin, end] = cpu::split_range(H, kColumnUnit(block), thread, team);
      if (begin < end) cpu::mark_worker(phase, thread);
      recurrence(d, begin, end, team > 1);
    });
  }
}

template <typename T>
void forward_typed(const LayerArgs& args, const at::Tensor& input_rows, const at::Tensor& hx,
                   at::Tensor& output, at::Tensor& h_n) {
  const ElmanShape& s = args.shape;
  at::Tensor output_rows = output.view({s.rows, s.output_width()});
  project_inputs<T>(args, input_rows, output_rows);
  cpu::PhaseTimer timer(Phase::ForwardRecurrence);
  const int64_t H = s.hidden_size;
  std::vector<at::Tensor> weights_hh(s.directions);
  std::vector<PackedMatrix<T>> packed(s.directions);  // element (k, j) = W_hh[j, k]
  for (const auto d : c10::irange(s.directions)) {
    weights_hh[d] = args.directions[d].weight_hh.contiguous();
    cpu::shape_packed(packed[d], H, H);
  }
  run_recurrences(s, Phase::ForwardRecurrence, cpu::column_block<T>(),
                  [&](int64_t d, int64_t begin, int64_t end, bool in_team) {
                    // Packed by the thread whose steps read these columns' panels (only these).
                    cpu::pack_columns(packed[d], weights_hh[d].template data_ptr<T>(),
                                      /*k_stride=*/1, /*j_stride=*/H, begin, end);
                    forward_recurrence<T>(args, d, packed[d], hx.data_ptr<T>(),
                                          output.data_ptr<T>(), h_n.data_ptr<T>(), begin, end,
                                          in_team, {0, s.steps});
                  });
}

// The columns [column_begin, column_end) of the positions `positions` of one direction's reverse
// loop (all of it: {0, T}): this direction's columns of grad_pre (dL/d pre-activation) and its
// grad_hx. A thread's columns of dP at a step depend only on its own columns of dL/dh, so one
// barrier per step (before the product, which reads all columns of dP) is enough.
template <typename T>
void backward_recurrence(const LayerArgs& args, int64_t direction, const PackedMatrix<T>& weight,
                         const T* grad_output, const T* grad_h_n, const T* output, T* grad_pre,
                         T* grad_hx, T* carry, int64_t column_begin, int64_t column_end,
                         bool in_team, std::array<int64_t, 2> positions) {
  const ElmanShape& s = args.shape;
  const int64_t H = s.hidden_size, D = s.directions, T_ = s.steps;
  const bool reverse = direction == 1;
  const StepLayout layout = step_layout(args);
  const T* grad_final = grad_h_n + state_index(direction, 0, 0, s.batch, H);
  T* grad_h0 = grad_hx + state_index(direction, 0, 0, s.batch, H);
  const int64_t columns = column_end - column_begin;

  std::vector<const T*> grad_rows(s.batch);
  std::vector<T*> targets(s.batch);
  for (int64_t position = positions[0]; position < positions[1]; ++position) {
    const int64_t t = step_of_position(position, T_, reverse, /*backward=*/true);
    const int64_t rows = layout.size(t);
    for (const auto b : c10::irange(rows)) {
      T* dh = carry + b * H;
      const int64_t index = output_index(layout.row(t, b), direction, 0, H, D);
      if (columns > 0) {
        if (layout.writes_final_state(t, b, reverse))
          std::memcpy(dh + column_begin, grad_final + b * H + column_begin, columns * sizeof(T));
        cpu::step_gradient<T>(columns, dh + column_begin, grad_output + index + column_begin,
                              output + index + column_begin, s.activation,
                              grad_pre + index + column_begin);
      }
      grad_rows[b] = grad_pre + index;
      targets[b] = layout.reads_initial_state(t, b, reverse) ? grad_h0 + b * H : dh;
    }
    if (in_team) cpu::team_barrier();
    if (columns > 0)
      cpu::row_matmul<T>(rows, grad_rows.data(), weight, targets.data(), /*accumulate=*/false,
                         column_begin, column_end);
  }
}

// grad_input = dP @ [W_ih of every direction], by parts of rows.
template <typename T>
at::Tensor input_gradient(const LayerArgs& args, const at::Tensor& grad_pre) {
  cpu::PhaseTimer timer(Phase::InputGradient);
  const ElmanShape& s = args.shape;
  at::Tensor grad_input = at::empty({s.rows, s.input_size}, grad_pre.options());
  const at::Tensor weight = stacked_input_weights(args);  // [D*H, I]
  PackedMatrix<T> packed;  // element (k, j) = W[k, j], packed once for every part
  cpu::shape_packed(packed, s.output_width(), s.input_size);
  const T* weight_data = weight.data_ptr<T>();  // read here: nothing may throw inside the team
  const T* dp = grad_pre.data_ptr<T>();
  T* out = grad_input.data_ptr<T>();
  const int64_t macs = s.rows * s.output_width() * s.input_size;
  const int64_t parts = product_parts(macs, s.rows);
  run_parts(
      Phase::InputGradient, parts,
      [&](int thread, int team) {
        pack_share(packed, weight_data, /*k_stride=*/s.input_size, /*j_stride=*/1, thread, team);
      },
      [&](int64_t p) {
        const auto [begin, end] = cpu::split_range(s.rows, 1, p, parts);
        cpu::input_gradient_rows<T>(args, packed, dp, out, begin, end);
      });
  return grad_input;
}

// Packs the rows of steps [step_begin, step_end) of direction d's H_prev (h_{t-1} of every row:
// h0's row where the row starts its sequence, else the output row of the previous step) straight
// from hx and the output, packed input included.
template <typename T>
void pack_previous_states(const LayerArgs& args, int64_t d, const T* hx, const T* output,
                          PackedMatrix<T>& previous, int64_t step_begin, int64_t step_end) {
  const ElmanShape& s = args.shape;
  const int64_t H = s.hidden_size, D = s.directions;
  const bool reverse = d == 1;
  const StepLayout layout = step_layout(args);
  for (int64_t t = step_begin; t < step_end; ++t) {
    for (const auto b : c10::irange(layout.size(t))) {
      const T* h_prev =
          layout.reads_initial_state(t, b, reverse)
              ? hx + state_index(d, b, 0, s.batch, H)
              : output + output_index(layout.row(previous_step(t, reverse), b), d, 0, H, D);
      cpu::pack_row(previous, layout.row(t, b), h_prev);
    }
  }
}

// c[r] = A[r] @ b for `rows` rows, A given transposed (element (r, k) at a_t[k * a_t_stride + r]),
// C's rows at a fixed stride, on the calling thread.
template <typename T>
void transposed_product(int64_t rows, const T* a_t, int64_t a_t_stride, const PackedMatrix<T>& b,
                        T* c, int64_t c_stride) {
  std::vector<T*> c_rows(rows);
  for (const auto r : c10::irange(rows)) c_rows[r] = c + r * c_stride;
  cpu::transposed_matmul<T>(rows, a_t, a_t_stride, b, c_rows.data(), /*accumulate=*/false);
}

// Weight gradients per direction: dW_ih = dP_d^T X, dW_hh = dP_d^T H_prev, and the column sums
// of dP_d (one tensor; backward_result gives each bias its own). X and each direction's H_prev are
// packed once, their rows split over the team; dP is read in place as A's transpose. Parts then
// split the H output rows (columns of dP), never the sum over rows, so the bits depend on the
// shape alone.
template <typename T>
std::vector<DirectionGradients> weight_gradients(const LayerArgs& args, const at::Tensor& grad_pre,
                                                 const at::Tensor& input_rows, const at::Tensor& hx,
                                                 const at::Tensor& output_rows) {
  cpu::PhaseTimer timer(Phase::WeightGradient);
  const ElmanShape& s = args.shape;
  const int64_t H = s.hidden_size, D = s.directions, I = s.input_size, width = s.output_width();
  std::vector<DirectionGradients> grads(D);
  for (auto& g : grads) {
    g.weight_ih = at::empty({H, I}, grad_pre.options());
    g.weight_hh = at::empty({H, H}, grad_pre.options());
    if (s.has_bias) g.bias = at::empty({H}, grad_pre.options());
  }
  PackedMatrix<T> inputs;
  cpu::shape_packed(inputs, s.rows, I);
  std::vector<PackedMatrix<T>> previous(D);
  for (auto& p : previous) cpu::shape_packed(p, s.rows, H);
  const T* dp = grad_pre.data_ptr<T>();
  const T* x = input_rows.data_ptr<T>();
  const T* h0 = hx.data_ptr<T>();
  const T* out = output_rows.data_ptr<T>();
  const int64_t macs = s.rows * H * (I + H);
  const int64_t parts = product_parts(macs, H);
  // A few parts' worth of work runs on the calling thread: a team's start would be the bulk of a
  // latency-bound layer's weight gradient (T=1000, B=1, H=32: 1M multiply-adds).
  run_parts(
      Phase::WeightGradient, parts * D,
      [&](int thread, int team) {
        const auto [row_begin, row_end] = cpu::split_range(s.rows, 1, thread, team);
        for (int64_t r = row_begin; r < row_end; ++r) cpu::pack_row(inputs, r, x + r * I);
        const auto [step_begin, step_end] = cpu::split_range(s.steps, 1, thread, team);
        for (const auto d : c10::irange(D))
          pack_previous_states<T>(args, d, h0, out, previous[d], step_begin, step_end);
      },
      [&](int64_t part) {
        const int64_t d = part / parts;
        const auto [begin, end] = cpu::split_range(H, 1, part % parts, parts);
        const int64_t n = end - begin;
        const T* dp_t = dp + d * H + begin;  // dP_d's columns [begin, end), transposed
        transposed_product<T>(n, dp_t, width, inputs, grads[d].weight_ih.data_ptr<T>() + begin * I,
                              I);
        transposed_product<T>(n, dp_t, width, previous[d],
                              grads[d].weight_hh.data_ptr<T>() + begin * H, H);
        if (s.has_bias) {
          T* sums = grads[d].bias.data_ptr<T>() + begin;
          std::fill(sums, sums + n, T(0));
          for (const auto r : c10::irange(s.rows))
            for (const auto j : c10::irange(n)) sums[j] += dp_t[r * width + j];
        }
      },
      /*use_team=*/macs >= 4 * kPartWork);
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
  if (input.scalar_type() == at::kBFloat16 && cpu::bf16_available())
    return cpu::elman_forward_bf16(args, input, hx);
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
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_ext::elman_forward",
                             [&] { forward_typed<scalar_t>(args, input_rows, hx_c, output, h_n); });
  return {output, h_n};
}

BackwardResult elman_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                  const at::Tensor& input, const at::Tensor& hx,
                                  at::TensorList weights, const at::Tensor& output,
                                  const c10::optional<at::Tensor>& batch_sizes, bool relu,
                                  std::array<bool, 3> output_mask) {
  const char* op_name = "rnn_ext::elman_backward";
  const LayerArgs args = read_backward_args(op_name, grad_output, grad_h_n, input, hx, weights,
                                            output, batch_sizes, relu);
  const ElmanShape& s = args.shape;
  if (input.scalar_type() == at::kBFloat16 && cpu::bf16_available())
    return cpu::elman_backward_bf16(args, grad_output, grad_h_n, input, hx, weights, output,
                                    output_mask);
  if (computes_in_float(input)) {
    auto [gi, gh, gw] =
        elman_backward_cpu(grad_output.to(at::kFloat), grad_h_n.to(at::kFloat),
                           input.to(at::kFloat), hx.to(at::kFloat), to_float(weights),
                           output.to(at::kFloat), batch_sizes, relu, output_mask);
    const auto type = input.scalar_type();
    for (auto& g : gw) g = g.to(type);
    return {gi.to(type), gh.to(type), gw};
  }

  const int64_t width = s.output_width();
  at::Tensor grad_pre = at::empty({s.rows, width}, input.options());
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
      using T = scalar_t;
      {
        cpu::PhaseTimer timer(Phase::BackwardRecurrence);
        const int64_t H = s.hidden_size;
        std::vector<at::Tensor> weights_hh(s.directions);
        std::vector<PackedMatrix<T>> packed(s.directions);  // element (j, k) = W_hh[j, k]
        // dL/dh of the step being processed, per direction (the directions may run side by side).
        std::vector<std::vector<T>> carry(s.directions);
        for (const auto d : c10::irange(s.directions)) {
          weights_hh[d] = args.directions[d].weight_hh.contiguous();
          cpu::shape_packed(packed[d], H, H);
          carry[d].assign(s.batch * H, T(0));
        }
        run_recurrences(s, Phase::BackwardRecurrence, cpu::column_block<T>(),
                        [&](int64_t d, int64_t begin, int64_t end, bool in_team) {
                          // Packed by the thread whose steps read these columns' panels.
                          cpu::pack_columns(packed[d], weights_hh[d].template data_ptr<T>(),
                                            /*k_stride=*/H, /*j_stride=*/1, begin, end);
                          backward_recurrence<T>(args, d, packed[d], grad_output_c.data_ptr<T>(),
                                                 grad_h_n_c.data_ptr<T>(), output_c.data_ptr<T>(),
                                                 grad_pre.data_ptr<T>(), grad_hx.data_ptr<T>(),
                                                 carry[d].data(), begin, end, in_team,
                                                 {0, s.steps});
                        });
      }
      if (output_mask[0]) grad_input = input_gradient<T>(args, grad_pre);
      if (output_mask[2])
        grad_directions =
            weight_gradients<T>(args, grad_pre, input_rows, hx_c, output_c.view({s.rows, width}));
    });
  }
  return backward_result(args, input, weights, output_mask, grad_input, grad_hx, grad_directions);
}

}  // namespace

namespace cpu {

template <typename T>
std::vector<T> pack_input_weights(const LayerArgs& args, PackedMatrix<T>& weight_t) {
  const ElmanShape& s = args.shape;
  const at::Tensor weight = stacked_input_weights(args);
  pack_matrix(weight_t, weight.data_ptr<T>(), s.input_size, s.output_width(), /*k_stride=*/1,
              /*j_stride=*/s.input_size);
  return summed_biases<T>(args);
}

template <typename T>
void project_rows(const LayerArgs& args, const PackedMatrix<T>& weight_t, const T* bias,
                  const T* in, T* out, int64_t row_begin, int64_t row_end) {
  const int64_t input_size = args.shape.input_size, width = args.shape.output_width();
  if (bias != nullptr) {
    for (int64_t r = row_begin; r < row_end; ++r)
      std::memcpy(out + r * width, bias, width * sizeof(T));
  }
  strided_row_matmul<T>(row_end - row_begin, in + row_begin * input_size, input_size, weight_t,
                        out + row_begin * width, width, /*accumulate=*/bias != nullptr);
}

template <typename T>
void pack_input_gradient_weights(const LayerArgs& args, PackedMatrix<T>& weight) {
  const ElmanShape& s = args.shape;
  const at::Tensor stacked = stacked_input_weights(args);  // [D*H, I]
  pack_matrix(weight, stacked.data_ptr<T>(), s.output_width(), s.input_size,
              /*k_stride=*/s.input_size, /*j_stride=*/1);
}

template <typename T>
void input_gradient_rows(const LayerArgs& args, const PackedMatrix<T>& weight, const T* grad_pre,
                         T* grad_input, int64_t row_begin, int64_t row_end) {
  const int64_t input_size = args.shape.input_size, width = args.shape.output_width();
  strided_row_matmul<T>(row_end - row_begin, grad_pre + row_begin * width, width, weight,
                        grad_input + row_begin * input_size, input_size, /*accumulate=*/false);
}

template <typename T>
void pack_recurrent_weights(const LayerArgs& args, int64_t direction, bool backward,
                            PackedMatrix<T>& weight) {
  const int64_t H = args.shape.hidden_size;
  const at::Tensor w = args.directions[direction].weight_hh.contiguous();
  pack_matrix(weight, w.data_ptr<T>(), H, H, /*k_stride=*/backward ? H : 1,
              /*j_stride=*/backward ? 1 : H);
}

template <typename T>
void forward_steps(const LayerArgs& args, int64_t direction, const PackedMatrix<T>& weight_t,
                   const T* hx, T* output, T* h_n, std::array<int64_t, 2> positions) {
  forward_recurrence<T>(args, direction, weight_t, hx, output, h_n, 0, args.shape.hidden_size,
                        /*in_team=*/false, positions);
}

template <typename T>
void backward_steps(const LayerArgs& args, int64_t direction, const PackedMatrix<T>& weight,
                    const T* grad_output, const T* grad_h_n, const T* output, T* grad_pre,
                    T* grad_hx, T* carry, std::array<int64_t, 2> positions) {
  backward_recurrence<T>(args, direction, weight, grad_output, grad_h_n, output, grad_pre, grad_hx,
                         carry, 0, args.shape.hidden_size, /*in_team=*/false, positions);
}

template <typename T>
std::vector<DirectionGradients> layer_weight_gradients(const LayerArgs& args,
                                                       const at::Tensor& grad_pre,
                                                       const at::Tensor& input_rows,
                                                       const at::Tensor& hx,
                                                       const at::Tensor& output_rows) {
  return weight_gradients<T>(args, grad_pre, input_rows, hx, output_rows);
}

bool layer_splits_steps(const ElmanShape& shape) { return splits_steps(shape); }

#define RNN_EXT_LAYER_PIECES(T)                                                                   \
  template std::vector<T> pack_input_weights<T>(const LayerArgs&, PackedMatrix<T>&);              \
  template void project_rows<T>(const LayerArgs&, const PackedMatrix<T>&, const T*, const T*, T*, \
                                int64_t, int64_t);                                                \
  template void pack_input_gradient_weights<T>(const LayerArgs&, PackedMatrix<T>&);               \
  template void input_gradient_rows<T>(const LayerArgs&, const PackedMatrix<T>&, const T*, T*,    \
                                       int64_t, int64_t);                                         \
  template void pack_recurrent_weights<T>(const LayerArgs&, int64_t, bool, PackedMatrix<T>&);     \
  template void forward_steps<T>(const LayerArgs&, int64_t, const PackedMatrix<T>&, const T*, T*, \
                                 T*, std::array<int64_t, 2>);                                     \
  template void backward_steps<T>(const LayerArgs&, int64_t, const PackedMatrix<T>&, const T*,    \
                                  const T*, const T*, T*, T*, T*, std::array<int64_t, 2>);        \
  template std::vector<DirectionGradients> layer_weight_gradients<T>(                             \
      const LayerArgs&, const at::Tensor&, const at::Tensor&, const at::Tensor&,                  \
      const at::Tensor&);
RNN_EXT_LAYER_PIECES(float)
RNN_EXT_LAYER_PIECES(double)
#undef RNN_EXT_LAYER_PIECES

}  // namespace cpu

TORCH_LIBRARY_IMPL(rnn_ext, CPU, m) {
  m.impl("elman_forward", &elman_forward_cpu);
  m.impl("elman_backward", &elman_backward_cpu);
}

}  // namespace rnn_ext
