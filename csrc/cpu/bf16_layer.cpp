// The bfloat16 layer on a CPU with avx512_bf16: every product takes bf16 operands and accumulates
// in float32. Forward: the input projection (vdpbf16ps kernel, float32 result plus the float32 sum
// of both biases) fills a float32 pre-activation buffer; each step adds h_{t-1} W_hh^T to it in
// float32, applies the activation in float32 and rounds h_t to bf16 once: that rounded h_t is the
// output, h_n and the operand of the next step's product (vdpbf16ps reads bf16 only). So the
// pre-activation is never rounded (nn.RNN rounds each product's result to bf16 and adds in bf16);
// the state is rounded once per step, as nn.RNN does.
// Backward: dL/dh is carried in float32, dP = act'(.) in float32 (the bias gradient sums it in
// float32), rounded to bf16 for the step product dP_t W_hh and for the large products after the
// loop (input and weight gradients), which run as torch's bf16 matmul (oneDNN, float32 inside).
// Threads as in the float32 path: a bidirectional layer's directions side by side, or each step's
// columns split over the team with one barrier per step.
#include "bf16_layer.h"

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "bf16_kernels.h"
#include "row_matmul.h"
#include "team.h"

namespace rnn_ext {
namespace cpu {
namespace {

const uint16_t* bits(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>());
}
uint16_t* mutable_bits(const at::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.mutable_data_ptr<at::BFloat16>());
}

inline float widen(uint16_t value) {
  const uint32_t word = uint32_t(value) << 16;
  float result;
  std::memcpy(&result, &word, sizeof(result));
  return result;
}

// Row stride of the bf16 operand buffers: the kernel reads the depth in pairs.
int64_t padded_depth(int64_t depth) { return (depth + 1) / 2 * 2; }

// As in the float32 path: a step is split over threads from 1M multiply-adds, in units of two
// panels.
constexpr int64_t kStepParallelThreshold = 1 << 20;
constexpr int64_t kColumnUnit = 2 * kBf16Panel;
// The input projection and the kernel's products are split over the team from this many
// multiply-adds.
constexpr int64_t kProjectionParallelThreshold = 1 << 18;
// The products after the backward loop go to oneDNN from this many multiply-adds (below it, a
// oneDNN call's fixed cost, tens of microseconds, exceeds the product).
constexpr int64_t kOneDnnThreshold = int64_t(1) << 20;

bool splits_steps(const ElmanShape& s) {
  return s.batch * s.hidden_size * s.hidden_size >= kStepParallelThreshold &&
         s.hidden_size > kColumnUnit;
}

template <typename Recurrence>
void run_directions(const ElmanShape& s, Phase phase, const Recurrence& recurrence) {
  const int64_t H = s.hidden_size;
  if (s.directions == 2 && available_threads() >= 2) {
    run_team(true, [&](int thread, int team) {
      for (int d = thread; d < 2; d += team) {
        mark_worker(phase, thread);
        recurrence(d, 0, H, false);
      }
    });
    return;
  }
  for (const auto d : c10::irange(s.directions)) {
    run_team(splits_steps(s), [&](int thread, int team) {
      const auto [begin, end] = split_range(H, kColumnUnit, thread, team);
      if (begin < end) mark_worker(phase, thread);
      recurrence(d, begin, end, team > 1);
    });
  }
}

// W_ih of every direction stacked [D*H, I] in bf16.
at::Tensor stacked_input_weights(const LayerArgs& args) {
  std::vector<at::Tensor> weights;
  for (const auto& w : args.directions) weights.push_back(w.weight_ih);
  return weights.size() == 1 ? weights[0].contiguous() : at::cat(weights, 0);
}

// work[row, :] = (b_ih + b_hh) + x_row W_ih^T for every row and direction, in float32.
void project_inputs(const LayerArgs& args, const at::Tensor& input_rows, float* work) {
  PhaseTimer timer(Phase::InputProjection);
  const ElmanShape& s = args.shape;
  const int64_t width = s.output_width(), I = s.input_size;
  const at::Tensor weight = stacked_input_weights(args);
  PackedBf16 packed;  // element (k, j) = W_ih[j, k], each thread packing its share of panels
  shape_bf16(packed, I, width);
  std::vector<float> bias;
  if (s.has_bias) {
    for (const auto& w : args.directions) {
      const at::Tensor sum = w.bias_ih.to(at::kFloat) + w.bias_hh.to(at::kFloat);
      bias.insert(bias.end(), sum.const_data_ptr<float>(),
                  sum.const_data_ptr<float>() + s.hidden_size);
    }
  }
  const at::Tensor a = I % 2 ? at::constant_pad_nd(input_rows, {0, 1}).contiguous() : input_rows;
  const int64_t a_stride = padded_depth(I);
  const bool parallel = s.rows * I * width >= kProjectionParallelThreshold;
  const uint16_t* weight_bits = bits(weight);  // read here: nothing may throw inside the team
  run_team(parallel, [&](int thread, int team) {
    mark_worker(Phase::InputProjection, thread);
    const auto [column_begin, column_end] = split_range(width, kBf16Panel, thread, team);
    pack_bf16_columns(packed, weight_bits, /*k_stride=*/1, /*j_stride=*/I, column_begin,
                      column_end);
    if (team > 1) team_barrier();
    const auto [begin, end] = split_range(s.rows, 12, thread, team);
    if (begin >= end) return;
    std::vector<const uint16_t*> a_rows(end - begin);
    std::vector<float*> c_rows(end - begin);
    for (int64_t r = begin; r < end; ++r) {
      a_rows[r - begin] = bits(a) + r * a_stride;
      c_rows[r - begin] = work + r * width;
      if (s.has_bias) std::memcpy(c_rows[r - begin], bias.data(), width * sizeof(float));
    }
    row_matmul_bf16(end - begin, a_rows.data(), packed, c_rows.data(), s.has_bias);
  });
}

// Columns [column_begin, column_end) of every step of direction d. `states` holds two [B, Hp]
// bf16 buffers, both starting as h0: step number `position` reads buffer (position + 1) % 2 and
// writes buffer position % 2, so threads writing this step never touch what another still reads.
// A row that starts its sequence later (reverse direction of packed input) still finds h0 in both.
void forward_recurrence(const LayerArgs& args, int64_t d, const PackedBf16& weight,
                        uint16_t* states, float* work, uint16_t* output, uint16_t* h_n,
                        int64_t column_begin, int64_t column_end, bool in_team) {
  const ElmanShape& s = args.shape;
  const int64_t H = s.hidden_size, D = s.directions, Hp = padded_depth(H);
  const bool reverse = d == 1;
  const StepLayout layout = step_layout(args);
  const int64_t columns = column_end - column_begin;
  const Epilogue epilogue = activation_epilogue(s.activation);
  std::vector<const uint16_t*> previous(s.batch);
  std::vector<float*> current(s.batch);
  std::vector<uint16_t*> state_rows(s.batch), output_rows(s.batch);
  for (const auto position : c10::irange(s.steps)) {
    const int64_t t = step_of_position(position, s.steps, reverse, /*backward=*/false);
    const int64_t rows = layout.size(t);
    const uint16_t* read = states + ((position + 1) % 2) * s.batch * Hp;
    uint16_t* write = states + (position % 2) * s.batch * Hp;
    if (columns > 0) {
      for (const auto b : c10::irange(rows)) {
        const int64_t index = output_index(layout.row(t, b), d, 0, H, D);
        previous[b] = read + b * Hp;
        current[b] = work + index;
        state_rows[b] = write + b * Hp;
        output_rows[b] = output + index;
      }
      // h_t = act(pre + h_{t-1} W_hh^T), rounded once, into the state and the output.
      step_bf16(rows, previous.data(), weight, current.data(), epilogue, state_rows.data(),
                output_rows.data(), column_begin, column_end);
      for (const auto b : c10::irange(rows)) {
        if (layout.writes_final_state(t, b, reverse))
          std::memcpy(h_n + state_index(d, b, column_begin, s.batch, H),
                      state_rows[b] + column_begin, columns * sizeof(uint16_t));
      }
    }
    if (in_team) team_barrier();
  }
}

// Per-direction buffers of the reverse loop.
struct BackwardBuffers {
  std::vector<float> carry;       // [B, H] dL/dh of the step being processed, float32
  std::vector<uint16_t> rounded;  // [2, B, Hp] this step's dP in bf16, alternating as in forward
  std::vector<float> grad_h0;     // [B, H]
  std::vector<float> bias;        // [H] column sums of dP
};

// Columns [column_begin, column_end) of direction d's reverse loop. A thread's columns of dP
// depend only on its own columns of dL/dh, so one barrier per step (before the product, which
// reads every column of dP) is enough.
void backward_recurrence(const LayerArgs& args, int64_t d, const PackedBf16& weight,
                         const uint16_t* grad_output, const uint16_t* grad_h_n,
                         const uint16_t* output, uint16_t* grad_pre, BackwardBuffers& buffers,
                         int64_t column_begin, int64_t column_end, bool in_team) {
  const ElmanShape& s = args.shape;
  const int64_t H = s.hidden_size, D = s.directions, Hp = padded_depth(H);
  const bool reverse = d == 1;
  const StepLayout layout = step_layout(args);
  const int64_t columns = column_end - column_begin;
  std::vector<const uint16_t*> dp_rows(s.batch);
  std::vector<float*> targets(s.batch);
  for (const auto position : c10::irange(s.steps)) {
    const int64_t t = step_of_position(position, s.steps, reverse, /*backward=*/true);
    const int64_t rows = layout.size(t);
    uint16_t* rounded = buffers.rounded.data() + (position % 2) * s.batch * Hp;
    for (const auto b : c10::irange(rows)) {
      float* dh = buffers.carry.data() + b * H;
      const int64_t index = output_index(layout.row(t, b), d, 0, H, D);
      if (columns > 0) {
        if (layout.writes_final_state(t, b, reverse)) {
          const uint16_t* g = grad_h_n + state_index(d, b, 0, s.batch, H);
          for (int64_t j = column_begin; j < column_end; ++j) dh[j] = widen(g[j]);
        }
        step_gradient_bf16(columns, dh + column_begin, grad_output + index + column_begin,
                           output + index + column_begin, s.activation,
                           buffers.bias.data() + column_begin, rounded + b * Hp + column_begin,
                           grad_pre + index + column_begin);
      }
      dp_rows[b] = rounded + b * Hp;
      targets[b] = layout.reads_initial_state(t, b, reverse) ? buffers.grad_h0.data() + b * H : dh;
    }
    if (in_team) team_barrier();
    if (columns > 0)
      row_matmul_bf16(rows, dp_rows.data(), weight, targets.data(), /*accumulate=*/false,
                      column_begin, column_end);
  }
}

// h_{t-1} of every row of direction d, as rows [rows, H] (bf16).
at::Tensor previous_states(const LayerArgs& args, int64_t d, const at::Tensor& hx,
                           const at::Tensor& output) {
  const ElmanShape& s = args.shape;
  const int64_t H = s.hidden_size, D = s.directions;
  const bool reverse = d == 1;
  const StepLayout layout = step_layout(args);
  at::Tensor previous = at::empty({s.rows, H}, output.options());
  uint16_t* target = mutable_bits(previous);
  for (const auto t : c10::irange(s.steps)) {
    for (const auto b : c10::irange(layout.size(t))) {
      const uint16_t* source =
          layout.reads_initial_state(t, b, reverse)
              ? bits(hx) + state_index(d, b, 0, s.batch, H)
              : bits(output) + output_index(layout.row(previous_step(t, reverse), b), d, 0, H, D);
      std::memcpy(target + layout.row(t, b) * H, source, H * sizeof(uint16_t));
    }
  }
  return previous;
}

at::Tensor rounded_tensor(const std::vector<float>& values, at::IntArrayRef sizes,
                          const at::TensorOptions& options) {
  at::Tensor result = at::empty(sizes, options);
  round_to_bf16(values.data(), mutable_bits(result), static_cast<int64_t>(values.size()));
  return result;
}

// A [m, depth] (bf16) times B [depth, n] (packed) in float32, rounded to a bf16 [m, n] tensor:
// by oneDNN (torch's bf16 matmul) or by the vdpbf16ps kernel, rows split over the team (which
// does not change the bits). RNN_EXT_BF16_GEMM=onednn|kernel overrides the choice.
bool large_products_by_onednn(int64_t macs) {
  const char* choice = std::getenv("RNN_EXT_BF16_GEMM");
  if (choice != nullptr && std::strcmp(choice, "onednn") == 0) return true;
  if (choice != nullptr && std::strcmp(choice, "kernel") == 0) return false;
  return macs >= kOneDnnThreshold;
}

at::Tensor kernel_product(Phase phase, const at::Tensor& a, const at::Tensor& b_source,
                          bool b_transposed) {
  const int64_t m = a.size(0), depth = a.size(1);
  const int64_t n = b_transposed ? b_source.size(0) : b_source.size(1);
  at::Tensor a_rows = a.contiguous();
  if (depth % 2) a_rows = at::constant_pad_nd(a_rows, {0, 1});
  const at::Tensor b_c = b_source.contiguous();
  PackedBf16 packed;
  if (b_transposed) {  // b_source is B^T [n, depth]
    pack_bf16(packed, bits(b_c), depth, n, /*k_stride=*/1, /*j_stride=*/depth);
  } else {
    pack_bf16(packed, bits(b_c), depth, n, /*k_stride=*/n, /*j_stride=*/1);
  }
  std::vector<float> result(m * n);
  const int64_t stride = padded_depth(depth);
  run_team(m * depth * n >= kProjectionParallelThreshold, [&](int thread, int team) {
    const auto [begin, end] = split_range(m, 12, thread, team);
    if (begin >= end) return;
    mark_worker(phase, thread);
    std::vector<const uint16_t*> a_ptrs(end - begin);
    std::vector<float*> c_ptrs(end - begin);
    for (int64_t r = begin; r < end; ++r) {
      a_ptrs[r - begin] = bits(a_rows) + r * stride;
      c_ptrs[r - begin] = result.data() + r * n;
    }
    row_matmul_bf16(end - begin, a_ptrs.data(), packed, c_ptrs.data(), /*accumulate=*/false);
  });
  return rounded_tensor(result, {m, n}, a.options());
}

// a @ b, or a @ b_t^T when b_transposed.
at::Tensor bf16_product(Phase phase, const at::Tensor& a, const at::Tensor& b, bool b_transposed) {
  const int64_t n = b_transposed ? b.size(0) : b.size(1);
  if (large_products_by_onednn(a.size(0) * a.size(1) * n)) {
    mark_worker(phase, 0);
    return at::mm(a, b_transposed ? b.t() : b);
  }
  return kernel_product(phase, a, b, b_transposed);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> elman_forward_bf16(const LayerArgs& args,
                                                      const at::Tensor& input,
                                                      const at::Tensor& hx) {
  const ElmanShape& s = args.shape;
  const int64_t H = s.hidden_size, Hp = padded_depth(H);
  at::Tensor output = at::empty(output_sizes(args), input.options());
  at::Tensor h_n = at::empty({s.directions, s.batch, H}, input.options());
  if (s.rows == 0) return {output, h_n};
  const at::Tensor input_rows = input.reshape({s.rows, s.input_size}).contiguous();
  const at::Tensor hx_c = hx.contiguous();
  std::vector<float> work(s.rows * s.output_width());
  project_inputs(args, input_rows, work.data());

  PhaseTimer timer(Phase::ForwardRecurrence);
  // element (k, j) = W_hh[j, k], packed by the thread whose steps read those panels
  std::vector<PackedBf16> packed(s.directions);
  std::vector<at::Tensor> weights_hh(s.directions);
  std::vector<const uint16_t*> hh_bits(s.directions);  // read here: nothing throws in the team
  std::vector<std::vector<uint16_t>> states(s.directions);
  for (const auto d : c10::irange(s.directions)) {
    weights_hh[d] = args.directions[d].weight_hh.contiguous();
    hh_bits[d] = bits(weights_hh[d]);
    shape_bf16(packed[d], H, H);
    states[d].assign(2 * s.batch * Hp, 0);
    for (const auto copy : c10::irange(2))
      for (const auto b : c10::irange(s.batch))
        std::memcpy(states[d].data() + (copy * s.batch + b) * Hp,
                    bits(hx_c) + state_index(d, b, 0, s.batch, H), H * sizeof(uint16_t));
  }
  run_directions(s, Phase::ForwardRecurrence,
                 [&](int64_t d, int64_t begin, int64_t end, bool in_team) {
                   pack_bf16_columns(packed[d], hh_bits[d], /*k_stride=*/1,
                                     /*j_stride=*/H, begin, end);
                   forward_recurrence(args, d, packed[d], states[d].data(), work.data(),
                                      mutable_bits(output), mutable_bits(h_n), begin, end, in_team);
                 });
  return {output, h_n};
}

BackwardResult elman_backward_bf16(const LayerArgs& args, const at::Tensor& grad_output,
                                   const at::Tensor& grad_h_n, const at::Tensor& input,
                                   const at::Tensor& hx, at::TensorList weights,
                                   const at::Tensor& output, std::array<bool, 3> output_mask) {
  const ElmanShape& s = args.shape;
  const int64_t H = s.hidden_size, D = s.directions, Hp = padded_depth(H);
  const int64_t width = s.output_width();
  at::Tensor grad_input, grad_hx;
  std::vector<DirectionGradients> grad_directions;
  if (s.rows == 0) {
    grad_hx = at::zeros_like(hx, at::MemoryFormat::Contiguous);
    return backward_result(args, input, weights, output_mask, grad_input, grad_hx, grad_directions);
  }
  const at::Tensor input_rows = input.reshape({s.rows, s.input_size}).contiguous();
  const at::Tensor grad_output_c = grad_output.contiguous();
  const at::Tensor grad_h_n_c = grad_h_n.contiguous();
  const at::Tensor hx_c = hx.contiguous();
  const at::Tensor output_c = output.contiguous();
  at::Tensor grad_pre = at::empty({s.rows, width}, input.options());
  std::vector<BackwardBuffers> buffers(D);
  {
    PhaseTimer timer(Phase::BackwardRecurrence);
    // element (k, j) = W_hh[k, j], packed by the thread whose steps read those panels
    std::vector<PackedBf16> packed(D);
    std::vector<at::Tensor> weights_hh(D);
    std::vector<const uint16_t*> hh_bits(D);  // read here: nothing throws in the team
    for (const auto d : c10::irange(D)) {
      weights_hh[d] = args.directions[d].weight_hh.contiguous();
      hh_bits[d] = bits(weights_hh[d]);
      shape_bf16(packed[d], H, H);
      buffers[d].carry.assign(s.batch * H, 0.0f);
      buffers[d].rounded.assign(2 * s.batch * Hp, 0);
      buffers[d].grad_h0.assign(s.batch * H, 0.0f);
      buffers[d].bias.assign(H, 0.0f);
    }
    run_directions(s, Phase::BackwardRecurrence,
                   [&](int64_t d, int64_t begin, int64_t end, bool in_team) {
                     pack_bf16_columns(packed[d], hh_bits[d], /*k_stride=*/H,
                                       /*j_stride=*/1, begin, end);
                     backward_recurrence(args, d, packed[d], bits(grad_output_c), bits(grad_h_n_c),
                                         bits(output_c), mutable_bits(grad_pre), buffers[d], begin,
                                         end, in_team);
                   });
  }
  std::vector<float> grad_h0;
  for (const auto& b : buffers) grad_h0.insert(grad_h0.end(), b.grad_h0.begin(), b.grad_h0.end());
  grad_hx = rounded_tensor(grad_h0, {D, s.batch, H}, input.options());
  if (output_mask[0]) {
    PhaseTimer timer(Phase::InputGradient);
    grad_input = bf16_product(Phase::InputGradient, grad_pre, stacked_input_weights(args), false);
  }
  if (output_mask[2]) {
    PhaseTimer timer(Phase::WeightGradient);
    for (const auto d : c10::irange(D)) {
      const at::Tensor dp = grad_pre.narrow(1, d * H, H).t();  // [H, rows]
      DirectionGradients g;
      g.weight_ih = bf16_product(Phase::WeightGradient, dp, input_rows, false);
      g.weight_hh =
          bf16_product(Phase::WeightGradient, dp, previous_states(args, d, hx_c, output_c), false);
      if (s.has_bias) g.bias = rounded_tensor(buffers[d].bias, {H}, input.options());
      grad_directions.push_back(g);
    }
  }
  return backward_result(args, input, weights, output_mask, grad_input, grad_hx, grad_directions);
}

}  // namespace cpu
}  // namespace rnn_ext
