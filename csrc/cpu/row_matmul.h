// A small register-blocked "rows times packed matrix" kernel for the CPU backend, and a vectorised
// tanh. The recurrence multiplies at most a batch of rows by an H x H matrix per step: too small
// for a BLAS call to pay for itself, and the input projection reuses the same kernel over all T*B
// rows.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "../elman.h"

namespace rnn_ext {
namespace cpu {

// An allocator whose vectors grow without writing their new elements, so that a packed matrix's
// memory is first written by the threads that pack (and then read) it.
template <typename T>
struct UninitializedAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = UninitializedAllocator<U>;
  };
  UninitializedAllocator() = default;
  template <typename U>
  UninitializedAllocator(const UninitializedAllocator<U>&) noexcept {}
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

// A right-hand matrix B [depth, width] stored as column panels: panel p holds columns
// [p * block, (p + 1) * block) for every k, contiguously (element (k, j) at
// data[(j / block * depth + k) * block + j % block]), zero-padded past `width`. A kernel then reads
// one panel as a single contiguous stream; row-major B with a large power-of-two width would put
// the lines of one column strip into a few L1 sets and evict itself. A product over a column range
// reads only the panels of that range.
template <typename T>
struct PackedMatrix {
  std::vector<T, UninitializedAllocator<T>> data;
  int64_t depth = 0;
  int64_t width = 0;
  int64_t padded_width = 0;
};

// Columns per register block: two 256-bit vectors.
template <typename T>
constexpr int64_t column_block() {
  return 64 / static_cast<int64_t>(sizeof(T));
}

// Sizes `packed` for a depth x width matrix without writing it: pack_columns fills it.
template <typename T>
void shape_packed(PackedMatrix<T>& packed, int64_t depth, int64_t width) {
  constexpr int64_t block = column_block<T>();
  packed.depth = depth;
  packed.width = width;
  packed.padded_width = (width + block - 1) / block * block;
  packed.data.resize(static_cast<size_t>(depth * packed.padded_width));
}

// Packs the panels of columns [column_begin, column_end) of source (element (k, j) at
// source[k * k_stride + j * j_stride]), their zero padding included; column_begin a multiple of
// column_block<T>(). Threads that split a product by columns each pack their own range, so their
// panels start out in their own core's cache.
template <typename T>
void pack_columns(PackedMatrix<T>& packed, const T* source, int64_t k_stride, int64_t j_stride,
                  int64_t column_begin, int64_t column_end) {
  constexpr int64_t block = column_block<T>();
  const int64_t depth = packed.depth;
  for (int64_t j0 = column_begin; j0 < std::min(column_end, packed.width); j0 += block) {
    T* panel = packed.data.data() + j0 * depth;
    const int64_t columns = std::min(block, packed.width - j0);
    for (int64_t k = 0; k < depth; ++k) {
      for (int64_t jj = 0; jj < columns; ++jj)
        panel[k * block + jj] = source[k * k_stride + (j0 + jj) * j_stride];
      for (int64_t jj = columns; jj < block; ++jj) panel[k * block + jj] = T(0);
    }
  }
}

// Packs row k of B from `source`, its `width` elements contiguous, the row's zero padding included:
// one copy per column panel. Rows are independent, so threads may pack different rows.
template <typename T>
void pack_row(PackedMatrix<T>& packed, int64_t k, const T* source) {
  constexpr int64_t block = column_block<T>();
  T* out = packed.data.data() + k * block;
  const int64_t full = packed.width / block * block;
  int64_t j0 = 0;
  for (; j0 < full; j0 += block, out += packed.depth * block)
    std::memcpy(out, source + j0, block * sizeof(T));
  if (j0 < packed.width) {
    const int64_t rest = packed.width - j0;
    std::memcpy(out, source + j0, rest * sizeof(T));
    std::fill(out + rest, out + block, T(0));
  }
}

// Packs all of source into B.
template <typename T>
void pack_matrix(PackedMatrix<T>& packed, const T* source, int64_t depth, int64_t width,
                 int64_t k_stride, int64_t j_stride) {
  shape_packed(packed, depth, width);
  pack_columns(packed, source, k_stride, j_stride, 0, width);
}

// What a product does to each element of C after its sum, on the register tile before the store:
// nothing (a plain product), tanh (vector_math.h's tanh_vector) or relu.
enum class Epilogue { None, Tanh, Relu };

// The epilogue that applies a layer's activation.
inline Epilogue activation_epilogue(Activation activation) {
  return activation == Activation::Tanh ? Epilogue::Tanh : Epilogue::Relu;
}

// c_rows[r][j] = f((accumulate ? c_rows[r][j] : 0) + a_rows[r][0:depth] @ B[:, j]), f the
// epilogue, for r in [0, rows) and j in [column_begin, min(column_end, width)). Rows are given by
// pointer so the recurrence can mix h0 rows with output rows; a column range lets threads split
// one product (column_begin a multiple of column_block<T>(), column_end one too or the width).
// Each element's sum runs over k in the same order whatever rows and columns are given, so the
// bits do not depend on how a product is cut into parts. Defined for float and double in
// row_matmul.cpp, dispatched to the AVX-512 or AVX+FMA build when the CPU has one.
template <typename T>
void row_matmul(int64_t rows, const T* const* a_rows, const PackedMatrix<T>& b, T* const* c_rows,
                bool accumulate, int64_t column_begin = 0, int64_t column_end = INT64_MAX,
                Epilogue epilogue = Epilogue::None);

// row_matmul with A given transposed: c_rows[r][j] = (accumulate ? c_rows[r][j] : 0) +
// sum_k a_t[k * a_t_stride + r] * B[k, j], for every column of B. The same sums in the same order
// as row_matmul over A's rows, so the same bits; a product whose left-hand side is the transpose
// of a row-major matrix (a weight gradient, dP^T X) reads it in place.
template <typename T>
void transposed_matmul(int64_t rows, const T* a_t, int64_t a_t_stride, const PackedMatrix<T>& b,
                       T* const* c_rows, bool accumulate);

// The elementwise part of a backward step: dp[j] = activation_backward(dh[j] + grad[j], y[j])
// (elman.h: relu selects, tanh multiplies by 1 - y^2) for j in [0, count). Vectorised on the CPU's
// widest build for float.
template <typename T>
void step_gradient(int64_t count, const T* dh, const T* grad, const T* y, Activation activation,
                   T* dp);

// The build of the kernel that runs on this CPU: "AVX-512", "AVX+FMA" or "baseline".
const char* kernel_name();

}  // namespace cpu
}  // namespace rnn_ext
