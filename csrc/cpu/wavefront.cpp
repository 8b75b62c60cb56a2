// The layer wavefront of a unidirectional stack on the CPU (see wavefront.h).
//
// Forward: task (l, c) projects layer l's input rows of chunk c (the input, or layer l - 1's
// output times its dropout mask) and runs layer l's recurrence over chunk c's steps; it waits for
// (l - 1, c) and (l, c - 1). Backward, in reverse time: task (l, c) runs layer l's reverse loop
// over chunk c (its output gradient is grad_output, or layer l + 1's input gradient rows times the
// mask) and then the input gradient rows dP_l @ W_ih_l that layer l - 1 needs; it waits for
// (l + 1, c) and (l, c + 1). The weight gradients, sums over every row, run after the pipeline with
// the layer's own code. Every piece is the layer kernel's code on part of the layer (elman_cpu.h),
// so the bits equal the layer loop's whatever the thread count.
//
// Scheduling: the tasks in wavefront order (stage s = l + c, layers in order within a stage) are
// dealt to the team's threads in turn, task i to thread i % team, so every thread's share is fixed
// and the layers' work is balanced over the threads whatever their number. A thread waits for a
// task's inputs on per-layer "chunks done" counters (release / acquire, a pause per spin). Each
// task waits only for tasks dealt earlier, so the pipeline always progresses. One thread runs every
// task in order.
#include "wavefront.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <c10/util/irange.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "../layer_args.h"
#include "elman_cpu.h"
#include "team.h"

namespace rnn_ext {
namespace cpu {
namespace {

// Rows per chunk the wavefront aims for: enough work per task (a few steps of a small batch) to
// repay the hand-over between threads, few enough that the pipeline fills quickly.
constexpr int64_t kChunkRows = 64;

// One counter per cache line: the threads write different layers' counters.
struct alignas(64) ChunkCounter {
  std::atomic<int64_t> done{0};
};

// Pauses a wait spins through before it yields its core on each further check: a task's wait is
// normally far shorter, but on a machine with more runnable threads than cores the thread being
// waited for may need this core to run at all.
constexpr int kSpinsBeforeYield = 1 << 12;

// Waits until counter >= target; false when another thread's task failed.
bool wait_for(const ChunkCounter& counter, int64_t target, const std::atomic<bool>& failed) {
  for (int spins = 0; counter.done.load(std::memory_order_acquire) < target; ++spins) {
    if (failed.load(std::memory_order_relaxed)) return false;
    if (spins < kSpinsBeforeYield) {
      spin_pause();
    } else {
      std::this_thread::yield();
    }
  }
  return true;
}

// Runs task(stage, chunk, thread) for every stage in [0, stages) and chunk in [0, chunks), where
// (stage, chunk) needs (stage - 1, chunk) and (stage, chunk - 1) done first.
template <typename Task>
void run_pipeline(int64_t stages, int64_t chunks, const Task& task) {
  std::vector<std::array<int64_t, 2>> order;
  order.reserve(stages * chunks);
  for (int64_t wave = 0; wave < stages + chunks - 1; ++wave) {
    for (int64_t stage = 0; stage < stages; ++stage) {
      const int64_t chunk = wave - stage;
      if (chunk >= 0 && chunk < chunks) order.push_back({stage, chunk});
    }
  }
  std::unique_ptr<ChunkCounter[]> counters(new ChunkCounter[stages]);
  std::atomic<bool> failed{false};
  run_team(true, [&](int thread, int team) {
    for (size_t i = thread; i < order.size(); i += team) {
      const auto [stage, chunk] = order[i];
      if (!wait_for(counters[stage], chunk, failed)) return;
      if (stage > 0 && !wait_for(counters[stage - 1], chunk + 1, failed)) return;
      try {
        task(stage, chunk, thread);
      } catch (...) {
        failed.store(true, std::memory_order_relaxed);
        throw;
      }
      counters[stage].done.store(chunk + 1, std::memory_order_release);
    }
  });
}

// [B, T, ...] <-> [T, B, ...] for a batch_first stack; packed and time-major tensors pass.
at::Tensor time_major(const StackShape& s, const at::Tensor& t) {
  return s.batch_first ? t.transpose(0, 1) : t;
}

// The steps [first, end) and rows [first, end) of chunk c.
struct Chunk {
  int64_t step_begin, step_end, row_begin, row_end;
};
Chunk chunk_of(const StepLayout& layout, int64_t chunk_steps, int64_t c) {
  const int64_t begin = c * chunk_steps;
  const int64_t end = std::min(layout.steps, begin + chunk_steps);
  return {begin, end, layout.offset(begin), layout.offset(end)};
}

template <typename T>
void multiply_rows(T* values, const T* mask, int64_t width, int64_t row_begin, int64_t row_end) {
  for (int64_t i = row_begin * width; i < row_end * width; ++i) values[i] *= mask[i];
}

template <typename T>
StackForwardResult wavefront_forward(const StackShape& s, const at::Tensor& input,
                                     const at::Tensor& hx, at::TensorList weights,
                                     const c10::optional<at::Tensor>& batch_sizes,
                                     at::TensorList dropout_masks) {
  const char* op_name = "rnn_ext::_elman_stack_forward";
  const int64_t L = s.num_layers, H = s.hidden_size;
  const bool masked = !dropout_masks.empty();
  const at::Tensor hx_c = hx.contiguous();
  std::vector<LayerArgs> args;
  std::vector<at::Tensor> outputs, layer_inputs;  // layer_inputs: the masked inputs of layers > 0
  std::vector<at::Tensor> masks;
  at::Tensor layer_input = time_major(s, input);
  for (const auto l : c10::irange(L)) {
    args.push_back(read_layer_args(op_name, layer_input, hx_c.narrow(0, l, 1),
                                   weights.slice(l * s.per_layer, s.per_layer), batch_sizes,
                                   s.relu));
    outputs.push_back(at::empty(output_sizes(args.back()), input.options()));
    if (l > 0 && masked) {
      layer_inputs.push_back(at::empty_like(outputs[l - 1]));
      masks.push_back(dropout_masks[l - 1].contiguous());
    } else {
      layer_inputs.emplace_back();
      masks.emplace_back();
    }
    layer_input = outputs.back();
  }
  const at::Tensor input_rows = time_major(s, input).reshape({args[0].shape.rows, -1}).contiguous();
  at::Tensor h_n = at::empty({L, args[0].shape.batch, H}, input.options());

  std::vector<PackedMatrix<T>> input_weights(L), recurrent_weights(L);
  std::vector<std::vector<T>> biases(L);
  for (const auto l : c10::irange(L)) {
    biases[l] = pack_input_weights<T>(args[l], input_weights[l]);
    pack_recurrent_weights<T>(args[l], 0, /*backward=*/false, recurrent_weights[l]);
  }
  const StepLayout layout = step_layout(args[0]);
  const int64_t chunk_steps = wavefront_chunk_steps(layout.steps, layout.batch);
  const int64_t chunks = (layout.steps + chunk_steps - 1) / chunk_steps;
  const int64_t state_size = args[0].shape.batch * H;

  run_pipeline(L, chunks, [&](int64_t l, int64_t c, int thread) {
    const Chunk chunk = chunk_of(layout, chunk_steps, c);
    const LayerArgs& a = args[l];
    T* out = outputs[l].data_ptr<T>();
    {
      PhaseTimer timer(Phase::InputProjection);
      mark_worker(Phase::InputProjection, thread);
      const T* in = l == 0 ? input_rows.data_ptr<T>() : outputs[l - 1].data_ptr<T>();
      if (l > 0 && masked) {
        T* target = layer_inputs[l].data_ptr<T>();
        const int64_t begin = chunk.row_begin * H, end = chunk.row_end * H;
        const T* mask = masks[l].data_ptr<T>();
        for (int64_t i = begin; i < end; ++i) target[i] = in[i] * mask[i];
        in = target;
      }
      project_rows<T>(a, input_weights[l], a.shape.has_bias ? biases[l].data() : nullptr, in, out,
                      chunk.row_begin, chunk.row_end);
    }
    PhaseTimer timer(Phase::ForwardRecurrence);
    mark_worker(Phase::ForwardRecurrence, thread);
    forward_steps<T>(a, 0, recurrent_weights[l], hx_c.data_ptr<T>() + l * state_size, out,
                     h_n.data_ptr<T>() + l * state_size, {chunk.step_begin, chunk.step_end});
  });

  at::Tensor output = time_major(s, outputs.back());
  outputs.pop_back();
  return {output, h_n, outputs};
}

template <typename T>
BackwardResult wavefront_backward(const StackShape& s, const at::Tensor& grad_output,
                                  const at::Tensor& grad_h_n, const at::Tensor& input,
                                  const at::Tensor& hx, at::TensorList weights,
                                  const c10::optional<at::Tensor>& batch_sizes,
                                  at::TensorList dropout_masks, at::TensorList layer_outputs,
                                  const at::Tensor& output, std::array<bool, 3> output_mask) {
  const char* op_name = "rnn_ext::elman_stack_backward";
  const int64_t L = s.num_layers, H = s.hidden_size;
  const bool masked = !dropout_masks.empty();
  const at::Tensor hx_c = hx.contiguous();
  const at::Tensor grad_h_n_c = grad_h_n.contiguous();
  std::vector<LayerArgs> args;
  std::vector<at::Tensor> outputs, masks;  // time-major, contiguous
  for (const auto l : c10::irange(L)) {
    const at::Tensor layer_input = l == 0 ? time_major(s, input) : layer_outputs[l - 1];
    const at::Tensor layer_hx = hx_c.narrow(0, l, 1);
    const at::TensorList layer_weights = weights.slice(l * s.per_layer, s.per_layer);
    if (l == L - 1) {
      args.push_back(read_backward_args(op_name, time_major(s, grad_output),
                                        grad_h_n_c.narrow(0, l, 1), layer_input, layer_hx,
                                        layer_weights, time_major(s, output), batch_sizes, s.relu));
      outputs.push_back(time_major(s, output).contiguous());
    } else {
      args.push_back(
          read_layer_args(op_name, layer_input, layer_hx, layer_weights, batch_sizes, s.relu));
      TORCH_CHECK(layer_outputs[l].sizes() == c10::IntArrayRef(output_sizes(args.back())), op_name,
                  ": layer_outputs[", l, "] must have shape ",
                  c10::IntArrayRef(output_sizes(args.back())), ", got ", layer_outputs[l].sizes());
      TORCH_CHECK(layer_outputs[l].scalar_type() == input.scalar_type(), op_name,
                  ": layer_outputs must have the input's dtype");
      outputs.push_back(layer_outputs[l].contiguous());
    }
    masks.push_back(masked && l > 0 ? dropout_masks[l - 1].contiguous() : at::Tensor());
  }
  const int64_t rows = args[0].shape.rows;
  const at::Tensor grad_output_c = time_major(s, grad_output).contiguous();
  at::Tensor grad_hx = at::zeros_like(hx_c, at::MemoryFormat::Contiguous);
  std::vector<at::Tensor> grad_pre(L), grad_inputs(L);
  std::vector<PackedMatrix<T>> input_weights(L), recurrent_weights(L);
  std::vector<std::vector<T>> carry(L);
  for (const auto l : c10::irange(L)) {
    grad_pre[l] = at::empty({rows, H}, input.options());
    if (l > 0 || output_mask[0]) {
      grad_inputs[l] = at::empty({rows, args[l].shape.input_size}, input.options());
      pack_input_gradient_weights<T>(args[l], input_weights[l]);
    }
    pack_recurrent_weights<T>(args[l], 0, /*backward=*/true, recurrent_weights[l]);
    carry[l].assign(args[l].shape.batch * H, T(0));
  }
  const StepLayout layout = step_layout(args[0]);
  const int64_t chunk_steps = wavefront_chunk_steps(layout.steps, layout.batch);
  const int64_t chunks = (layout.steps + chunk_steps - 1) / chunk_steps;
  const int64_t state_size = args[0].shape.batch * H;

  // Stage 0 is the top layer, chunk 0 the last chunk of time.
  run_pipeline(L, chunks, [&](int64_t stage, int64_t reverse_chunk, int thread) {
    const int64_t l = L - 1 - stage;
    const Chunk chunk = chunk_of(layout, chunk_steps, chunks - 1 - reverse_chunk);
    const LayerArgs& a = args[l];
    {
      PhaseTimer timer(Phase::BackwardRecurrence);
      mark_worker(Phase::BackwardRecurrence, thread);
      const T* grad = l == L - 1 ? grad_output_c.data_ptr<T>() : grad_inputs[l + 1].data_ptr<T>();
      const int64_t steps = layout.steps;
      backward_steps<T>(a, 0, recurrent_weights[l], grad, grad_h_n_c.data_ptr<T>() + l * state_size,
                        outputs[l].data_ptr<T>(), grad_pre[l].data_ptr<T>(),
                        grad_hx.data_ptr<T>() + l * state_size, carry[l].data(),
                        {steps - chunk.step_end, steps - chunk.step_begin});
    }
    if (grad_inputs[l].defined()) {
      PhaseTimer timer(Phase::InputGradient);
      mark_worker(Phase::InputGradient, thread);
      T* grad_input = grad_inputs[l].data_ptr<T>();
      input_gradient_rows<T>(a, input_weights[l], grad_pre[l].data_ptr<T>(), grad_input,
                             chunk.row_begin, chunk.row_end);
      if (l > 0 && masked)
        multiply_rows(grad_input, masks[l].data_ptr<T>(), a.shape.input_size, chunk.row_begin,
                      chunk.row_end);
    }
  });

  std::vector<at::Tensor> grad_weights;
  at::Tensor grad_input = at::empty({0}, input.options());
  for (const auto l : c10::irange(L)) {
    const at::Tensor layer_input =
        l == 0 ? time_major(s, input)
               : (masked ? layer_outputs[l - 1] * dropout_masks[l - 1] : layer_outputs[l - 1]);
    std::vector<DirectionGradients> directions;
    if (output_mask[2]) {
      directions = layer_weight_gradients<T>(
          args[l], grad_pre[l], layer_input.reshape({rows, args[l].shape.input_size}).contiguous(),
          hx_c.narrow(0, l, 1), outputs[l].view({rows, H}));
    }
    auto [layer_grad_input, layer_grad_hx, layer_grad_weights] =
        backward_result(args[l], layer_input, weights.slice(l * s.per_layer, s.per_layer),
                        {l == 0 && output_mask[0], false, output_mask[2]},
                        l == 0 ? grad_inputs[0] : at::Tensor(), at::Tensor(), directions);
    if (l == 0 && output_mask[0]) grad_input = time_major(s, layer_grad_input);
    for (auto& g : layer_grad_weights) grad_weights.push_back(std::move(g));
  }
  if (!output_mask[1]) grad_hx = at::empty({0}, input.options());
  return {grad_input, grad_hx, grad_weights};
}

std::tuple<at::Tensor, at::Tensor> elman_stack_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& hx, at::TensorList weights,
    const c10::optional<at::Tensor>& batch_sizes, at::TensorList dropout_masks, int64_t num_layers,
    bool bidirectional, bool relu, bool batch_first) {
  return stack_outputs(&stack_forward_cpu, input, hx, weights, batch_sizes, dropout_masks,
                       num_layers, bidirectional, relu, batch_first);
}

}  // namespace

int64_t wavefront_chunk_steps(int64_t steps, int64_t batch) {
  const int64_t by_rows = (kChunkRows + batch - 1) / std::max<int64_t>(batch, 1);
  return std::max<int64_t>(1, std::min(steps, by_rows));
}

bool runs_wavefront(const StackShape& s, const at::Tensor& input, const at::Tensor& hx) {
  if (s.directions != 1 || s.num_layers < 2 || !hx.defined()) return false;
  if (input.scalar_type() != at::kFloat && input.scalar_type() != at::kDouble) return false;
  if (input.numel() == 0 || available_threads() < 2) return false;
  ElmanShape shape;
  shape.batch = hx.size(1);
  shape.hidden_size = s.hidden_size;
  return !layer_splits_steps(shape);
}

StackForwardResult stack_forward_cpu(const at::Tensor& input, const at::Tensor& hx,
                                     at::TensorList weights,
                                     const c10::optional<at::Tensor>& batch_sizes,
                                     at::TensorList dropout_masks, int64_t num_layers,
                                     bool bidirectional, bool relu, bool batch_first) {
  const StackShape s =
      read_stack_args("rnn_ext::_elman_stack_forward", input, hx, weights, batch_sizes,
                      dropout_masks, num_layers, bidirectional, relu, batch_first);
  if (!runs_wavefront(s, input, hx))
    return stack_forward_checked(s, input, hx, weights, batch_sizes, dropout_masks);
  return AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_ext::_elman_stack_forward", [&] {
    return wavefront_forward<scalar_t>(s, input, hx, weights, batch_sizes, dropout_masks);
  });
}

BackwardResult stack_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                  const at::Tensor& input, const at::Tensor& hx,
                                  at::TensorList weights,
                                  const c10::optional<at::Tensor>& batch_sizes,
                                  at::TensorList dropout_masks, at::TensorList layer_outputs,
                                  const at::Tensor& output, int64_t num_layers, bool bidirectional,
                                  bool relu, bool batch_first, std::array<bool, 3> output_mask) {
  const StackShape s =
      read_stack_backward_args(grad_h_n, input, hx, weights, batch_sizes, dropout_masks,
                               layer_outputs, num_layers, bidirectional, relu, batch_first);
  if (!runs_wavefront(s, input, hx))
    return stack_backward_checked(s, grad_output, grad_h_n, input, hx, weights, batch_sizes,
                                  dropout_masks, layer_outputs, output, output_mask);
  return AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_ext::elman_stack_backward", [&] {
    return wavefront_backward<scalar_t>(s, grad_output, grad_h_n, input, hx, weights, batch_sizes,
                                        dropout_masks, layer_outputs, output, output_mask);
  });
}

TORCH_LIBRARY_IMPL(rnn_ext, CPU, m) {
  m.impl("elman_stack", &elman_stack_cpu);
  m.impl("_elman_stack_forward", &stack_forward_cpu);
  m.impl("elman_stack_backward", &stack_backward_cpu);
}

}  // namespace cpu
}  // namespace rnn_ext
