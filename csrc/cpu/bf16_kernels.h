// bfloat16 products for the CPU backend: bf16 operands, float32 accumulation, with the AVX-512
// BF16 dot-product instruction (vdpbf16ps), which multiplies pairs of bf16 values along the depth
// and adds both products into one float32 lane. Used only where the CPU has avx512_bf16 (see
// bf16_available); elsewhere bfloat16 layers run through the float32 kernels. No torch headers.
#pragma once

#include <climits>
#include <cstdint>
#include <vector>

#include "row_matmul.h"

namespace rnn_ext {
namespace cpu {

// Columns per panel of a packed bf16 matrix: one 512-bit register of float32 accumulators.
constexpr int64_t kBf16Panel = 16;

// A right-hand matrix B [depth, width] in bf16 (raw bits), packed as vdpbf16ps reads it: column
// panels of 16, and within a panel the depth in pairs, each pair of a column adjacent. Element
// (k, j) is at data[((j / 16) * pairs + k / 2) * 32 + (j % 16) * 2 + k % 2]; the odd depth row
// and columns past `width` are zero.
struct PackedBf16 {
  std::vector<uint16_t, UninitializedAllocator<uint16_t>> data;
  int64_t depth = 0;
  int64_t pairs = 0;  // ceil(depth / 2)
  int64_t width = 0;
  int64_t padded_width = 0;
};

// True when the CPU has AVX-512 with the BF16 extension and neither RNN_EXT_NO_BF16 nor
// RNN_EXT_NO_AVX512 is set (read at each call): bfloat16 layers then take the bf16 kernels.
bool bf16_available();

// Sizes `packed` for a depth x width matrix without writing it: pack_bf16_columns fills it.
void shape_bf16(PackedBf16& packed, int64_t depth, int64_t width);

// Packs the panels of columns [column_begin, column_end) of source (bf16 bits; element (k, j) at
// source[k * k_stride + j * j_stride]), their zeros included; column_begin a multiple of
// kBf16Panel. Threads that pack different column ranges write different panels.
void pack_bf16_columns(PackedBf16& packed, const uint16_t* source, int64_t k_stride,
                       int64_t j_stride, int64_t column_begin, int64_t column_end);

// Packs all of source into B.
void pack_bf16(PackedBf16& packed, const uint16_t* source, int64_t depth, int64_t width,
               int64_t k_stride, int64_t j_stride);

// c_rows[r][j] = (accumulate ? c_rows[r][j] : 0) + a_rows[r][0:depth] . B[:, j] in float32, for
// r in [0, rows) and j in [column_begin, min(column_end, width)). Each row of A is read in pairs:
// it must hold 2 * b.pairs readable bf16 values, the one past an odd depth finite (it meets a zero
// of B). column_begin is a multiple of kBf16Panel. Each element's sum runs over the depth in the
// same order whatever the rows and column range, so splits never change the bits. Requires
// bf16_available().
void row_matmul_bf16(int64_t rows, const uint16_t* const* a_rows, const PackedBf16& b,
                     float* const* c_rows, bool accumulate, int64_t column_begin = 0,
                     int64_t column_end = INT64_MAX);

// One step of the bf16 forward recurrence on columns [column_begin, column_end) (column_begin a
// multiple of kBf16Panel): h = f(pre_rows[r][j] + a_rows[r] . B[:, j]) in float32, f the epilogue,
// rounded to bf16 once and stored to state_rows[r][j] and output_rows[r][j]. The float32 result
// itself is not stored (pre_rows keeps a depth slice's partial sums where the depth takes more than
// one). The same bits as row_matmul_bf16 with accumulate, tanh_vector or relu, then round_to_bf16.
void step_bf16(int64_t rows, const uint16_t* const* a_rows, const PackedBf16& b,
               float* const* pre_rows, Epilogue epilogue, uint16_t* const* state_rows,
               uint16_t* const* output_rows, int64_t column_begin, int64_t column_end);

// The elementwise part of a bf16 backward step, on `count` units of one row: dP =
// activation_backward(dh + grad_output, output) in float32 (grad_output and output in bf16),
// added to bias in float32, rounded to bf16 once and stored to both `rounded` and `grad_pre`.
void step_gradient_bf16(int64_t count, const float* dh, const uint16_t* grad_output,
                        const uint16_t* output, Activation activation, float* bias,
                        uint16_t* rounded, uint16_t* grad_pre);

// dst[i] = bf16(src[i]), rounded to nearest even (vcvtneps2bf16: denormals become zero). Requires
// bf16_available().
void round_to_bf16(const float* src, uint16_t* dst, int64_t count);

}  // namespace cpu
}  // namespace rnn_ext
