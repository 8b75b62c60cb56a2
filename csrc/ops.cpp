// The rnn_ext operator schemas (TORCH_LIBRARY), and the Python module that loading them needs,
// with what the build report and the tests read from it: whether CUDA kernels are built, the CPU
// kernel chosen for this CPU, and the CPU backend's per-phase thread counters; and the typed entry
// to elman_stack that rnn_ext.RNN's common eager call uses.
#include <torch/library.h>
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <tuple>
#include <vector>

#include "cpu/bf16_kernels.h"
#include "cpu/row_matmul.h"
#include "cpu/team.h"

TORCH_LIBRARY(rnn_ext, m) {
  // One Elman layer, all its directions. input [T, B, I] or packed [N, I] with batch_sizes;
  // hx [D, B, H]; weights = D groups of (w_ih, w_hh[, b_ih, b_hh]).
  // Returns output [T, B, D*H] (or [N, D*H]) and h_n [D, B, H].
  m.def(
      "elman_forward(Tensor input, Tensor hx, Tensor[] weights, Tensor? batch_sizes, bool relu)"
      " -> (Tensor output, Tensor h_n)");
  // Gradients of elman_forward from its saved input, hx, weights and output. output_mask says
  // which of (input, hx, weights) need a gradient; the others come back empty.
  m.def(
      "elman_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor hx,"
      " Tensor[] weights, Tensor output, Tensor? batch_sizes, bool relu, bool[3] output_mask)"
      " -> (Tensor grad_input, Tensor grad_hx, Tensor[] grad_weights)");
  // A whole nn.RNN call: num_layers layers of elman_forward, each layer's input the previous
  // layer's output times its dropout mask. input [T, B, I] ([B, T, I] when batch_first) or packed
  // [N, I] with batch_sizes; hx [L*D, B, H], zeros when absent; weights nn.RNN's _flat_weights;
  // dropout_masks empty, or one per layer but the last, shaped like that layer's time-major output
  // and already scaled (the op draws no random numbers). Returns output and h_n [L*D, B, H].
  m.def(
      "elman_stack(Tensor input, Tensor? hx, Tensor[] weights, Tensor? batch_sizes,"
      " Tensor[] dropout_masks, int num_layers, bool bidirectional, bool relu, bool batch_first)"
      " -> (Tensor output, Tensor h_n)");
  // elman_stack as its autograd node runs it: the outputs of the layers but the last (time-major,
  // before dropout) come back too, for elman_stack_backward.
  m.def(
      "_elman_stack_forward(Tensor input, Tensor hx, Tensor[] weights, Tensor? batch_sizes,"
      " Tensor[] dropout_masks, int num_layers, bool bidirectional, bool relu, bool batch_first)"
      " -> (Tensor output, Tensor h_n, Tensor[] layer_outputs)");
  // elman_stack (hx given) as a chain of differentiable ATen ops, step by step: the same math,
  // slow, for what the fused kernels' C++ autograd cannot serve (torch.func transforms other than
  // vmap, forward-mode AD, double backward). A CompositeImplicitAutograd kernel (composite.cpp).
  m.def(
      "_elman_stack_composite(Tensor input, Tensor hx, Tensor[] weights, Tensor? batch_sizes,"
      " Tensor[] dropout_masks, int num_layers, bool bidirectional, bool relu, bool batch_first)"
      " -> (Tensor output, Tensor h_n)");
  // Gradients of elman_stack: the layers' elman_backward in reverse order. output_mask says which
  // of (input, hx, weights) need a gradient; the others come back empty.
  m.def(
      "elman_stack_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor hx,"
      " Tensor[] weights, Tensor? batch_sizes, Tensor[] dropout_masks, Tensor[] layer_outputs,"
      " Tensor output, int num_layers, bool bidirectional, bool relu, bool batch_first,"
      " bool[3] output_mask) -> (Tensor grad_input, Tensor grad_hx, Tensor[] grad_weights)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rnn_ext kernels; the operators live in torch.ops.rnn_ext";
#ifdef RNN_EXT_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.def(
      "_elman_stack_eager",
      [](const at::Tensor& input, const c10::optional<at::Tensor>& hx,
         const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& dropout_masks,
         int64_t num_layers, bool bidirectional, bool relu, bool batch_first) {
        static auto op =
            c10::Dispatcher::singleton()
                .findSchemaOrThrow("rnn_ext::elman_stack", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(
                    const at::Tensor&, const c10::optional<at::Tensor>&, at::TensorList,
                    const c10::optional<at::Tensor>&, at::TensorList, int64_t, bool, bool, bool)>();
        pybind11::gil_scoped_release no_gil;
        return op.call(input, hx, weights, c10::nullopt, dropout_masks, num_layers, bidirectional,
                       relu, batch_first);
      },
      "rnn_ext::elman_stack without batch_sizes, through the dispatcher (autograd, profiler and "
      "dispatch modes see the operator) but without torch.ops' argument parsing, which costs "
      "several microseconds. For plain tensors only: __torch_function__ is not consulted.");
  m.def(
      "cpu_kernel",
      [] {
        std::string name = rnn_ext::cpu::kernel_name();
        if (rnn_ext::cpu::bf16_available()) name += "+BF16";
        return name;
      },
      "The build of the CPU kernel chosen for this CPU: AVX-512, AVX+FMA or baseline, with "
      "+BF16 where bfloat16 layers use the AVX-512 BF16 kernels");
  m.def(
      "_cpu_phase_stats",
      [](bool reset) {
        pybind11::dict stats;
        for (int p = 0; p < rnn_ext::cpu::kPhaseCount; ++p) {
          const auto phase = static_cast<rnn_ext::cpu::Phase>(p);
          const auto& c = rnn_ext::cpu::phase_counters(phase);
          pybind11::dict entry;
          entry["calls"] = c.calls.load();
          entry["seconds"] = c.nanoseconds.load() * 1e-9;
          entry["thread_mask"] = c.thread_mask.load();
          stats[rnn_ext::cpu::phase_name(phase)] = entry;
        }
        if (reset) rnn_ext::cpu::reset_phase_counters();
        return stats;
      },
      pybind11::arg("reset") = false,
      "Per phase of the CPU kernels since the last reset: calls, wall seconds, and a bit per "
      "team thread that did part of the work.");
}
