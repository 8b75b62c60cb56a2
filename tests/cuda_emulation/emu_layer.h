// The C interface of the emulation library (api.cpp) for whole layers: one layer call, as the
// Python tests (a ctypes.Structure in tests/test_cuda_emulation.py) and the race driver fill it.
// Host buffers stand for device memory.
#pragma once

#include <cstdint>

extern "C" {

struct EmuLayer {
  int32_t scalar_type;  // gpu::ScalarType
  int32_t relu;
  int32_t regime;  // gpu::Regime
  int32_t max_slice_width;
  int32_t has_bias;
  int32_t packed;
  int64_t steps;
  int64_t batch;
  int64_t rows;
  int64_t input_size;
  int64_t hidden;
  int64_t directions;
  const int64_t* batch_sizes;  // [steps], packed only
  const void* input;           // [rows, I]
  const void* hx;              // [D, B, H]
  const void* weights[8];      // per direction: w_ih, w_hh, b_ih, b_hh (biases null without)
};

int emu_define_device(int index, int sm_count, int64_t shared_per_block_optin,
                      int64_t shared_per_sm, int cooperative_launch);

// A whole layer forward through the CUDA glue: output [rows, D*H] and h_n [D, B, H]. Returns 0, or
// 1 with the error's text in error_out. plan_out receives the recurrence's plan (11 fields).
int emu_layer_forward(const EmuLayer* layer, void* output, void* h_n, int64_t* plan_out,
                      char* error_out, int error_capacity);

// A whole layer backward through the CUDA glue. grad_input is null when not wanted; grad_weights
// holds 3 pointers per direction (w_ih, w_hh, bias; bias null without bias), or is null when the
// weight gradients are not wanted.
int emu_layer_backward(const EmuLayer* layer, const void* grad_output, const void* grad_h_n,
                       const void* output, void* grad_input, void* grad_hx,
                       void* const* grad_weights, int64_t* plan_out, char* error_out,
                       int error_capacity);
}
