// Register-blocked row_matmul and a vectorised tanh (see row_matmul.h). row_matmul is compiled
// three times (baseline, AVX+FMA, AVX-512) and tanh twice (baseline, AVX+FMA); the build that runs
// is chosen at run time from the CPU's flags, so the binary runs on any x86-64.
#include "row_matmul.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "vector_math.h"

namespace rnn_ext {
namespace cpu {
namespace {

// The epilogue applied to a finished vector of C: tanh as vector_math.h's tanh_vector computes it
// (one function for every kernel, so the same bits everywhere), relu written so that NaN stays
// NaN.
template <typename T, int BYTES>
RNN_EXT_INLINE vec_t<T, BYTES> finish_vector(vec_t<T, BYTES> x, Epilogue epilogue) {
  if (epilogue == Epilogue::None) return x;
  if (epilogue == Epilogue::Relu) return x < T(0) ? vec_t<T, BYTES>{} : x;
  if constexpr (std::is_same_v<T, float>) {
    return tanh_vector<BYTES>(x);
  } else {
    // float64 is the reference-precision path: exact libm tanh.
    for (int64_t i = 0; i < Vector<T, BYTES>::lanes; ++i) x[i] = std::tanh(x[i]);
    return x;
  }
}

// The left-hand matrix A of a product, read through one of two views: A's rows by pointer (element
// (r, k) at rows[r][k]), or A stored transposed (element (r, k) at base[k * stride + r], so a
// block's values at one k are adjacent). A kernel reads A only through value(); the bits of a
// product do not depend on the view.
template <typename T>
struct RowPointers {
  const T* const* rows;
  RNN_EXT_INLINE T value(int64_t r, int64_t k) const { return rows[r][k]; }
  RNN_EXT_INLINE RowPointers from(int64_t r) const { return {rows + r}; }
};

template <typename T>
struct TransposedRows {
  const T* base;
  int64_t stride;
  RNN_EXT_INLINE T value(int64_t r, int64_t k) const { return base[k * stride + r]; }
  RNN_EXT_INLINE TransposedRows from(int64_t r) const { return {base + r, stride}; }
};

// ROWS rows times VECTORS vectors of columns of B over depth [k_begin, k_end): ROWS * VECTORS
// accumulators stay in registers; the result is added to C or replaces it, and with `finish` (the
// last depth slice) the epilogue is applied to the register tile before it is stored. Vector v
// holds `lanes` columns starting v * lanes columns into the strip: with 32-byte vectors two
// vectors make one column panel, with 64-byte vectors a vector is a whole panel.
template <typename T, int ROWS, int BYTES, int VECTORS, typename A>
RNN_EXT_INLINE void block_kernel(const A& a, const T* panel, int64_t depth, int64_t k_begin,
                                 int64_t k_end, T* const* c, int64_t column, int64_t width,
                                 bool accumulate, Epilogue epilogue) {
  using V = vec_t<T, BYTES>;
  constexpr int64_t lanes = Vector<T, BYTES>::lanes;
  constexpr int64_t block = column_block<T>();
  V acc[ROWS][VECTORS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECTORS; ++v) acc[r][v] = V{};
  constexpr int64_t columns = VECTORS * lanes;
  for (int r = 0; r < ROWS; ++r) prefetch_for_store(c[r] + column, columns * sizeof(T));
  const T* bk = panel + k_begin * block;
  for (int64_t k = k_begin; k < k_end; ++k, bk += block) {
    V bv[VECTORS];
    for (int v = 0; v < VECTORS; ++v)
      bv[v] = load<T, BYTES>(bk + v * lanes / block * depth * block + v * lanes % block);
    for (int r = 0; r < ROWS; ++r) {
      // vector * scalar: the compiler broadcasts straight from memory (vbroadcastss with AVX);
      // building the vector by hand costs a shuffle or an insert per lane.
      const T x = a.value(r, k);
      for (int v = 0; v < VECTORS; ++v) acc[r][v] += bv[v] * x;
    }
  }
  const int64_t valid = std::min<int64_t>(columns, width - column);
  for (int r = 0; r < ROWS; ++r) {
    T* out = c[r] + column;
    if (valid == columns) {
      for (int v = 0; v < VECTORS; ++v) {
        if (accumulate) acc[r][v] += load<T, BYTES>(out + v * lanes);
        store<T, BYTES>(out + v * lanes, finish_vector<T, BYTES>(acc[r][v], epilogue));
      }
    } else {
      T tail[columns];
      for (int v = 0; v < VECTORS; ++v) store<T, BYTES>(tail + v * lanes, acc[r][v]);
      if (accumulate)
        for (int64_t j = 0; j < valid; ++j) tail[j] += out[j];
      for (int v = 0; v < VECTORS; ++v)
        store<T, BYTES>(tail + v * lanes,
                        finish_vector<T, BYTES>(load<T, BYTES>(tail + v * lanes), epilogue));
      std::memcpy(out, tail, valid * sizeof(T));
    }
  }
}

// block_kernel for a block of `rows` rows, 1 <= rows <= MAX_ROWS, chosen at run time.
template <typename T, int BYTES, int VECTORS, int MAX_ROWS, typename A>
RNN_EXT_INLINE void block_of_rows(int64_t rows, const A& a, const T* panel, int64_t depth,
                                  int64_t k_begin, int64_t k_end, T* const* c, int64_t column,
                                  int64_t width, bool accumulate, Epilogue epilogue) {
  if constexpr (MAX_ROWS > 1) {
    if (rows < MAX_ROWS)
      return block_of_rows<T, BYTES, VECTORS, MAX_ROWS - 1>(rows, a, panel, depth, k_begin, k_end,
                                                            c, column, width, accumulate, epilogue);
  }
  block_kernel<T, MAX_ROWS, BYTES, VECTORS>(a, panel, depth, k_begin, k_end, c, column, width,
                                            accumulate, epilogue);
}

// The row blocks of one column strip: `rows` rows cut into the fewest blocks of at most
// MAX_ROWS, as even as possible (sizes differ by at most one; the larger ones first), so that no
// batch size falls to a narrow tail block (20 rows in blocks of at most 6: four of 5, not three of
// 6 and one of 2). A fixed function of `rows`; each row's arithmetic is the same whatever block it
// falls in.
template <typename T, int BYTES, int VECTORS, int MAX_ROWS, typename A>
RNN_EXT_INLINE void strip(int64_t rows, const A& a_rows, const T* panel, int64_t depth, int64_t k0,
                          int64_t k1, T* const* c_rows, int64_t column, int64_t width, bool add,
                          Epilogue epilogue) {
  const int64_t blocks = (rows + MAX_ROWS - 1) / MAX_ROWS;
  const int64_t size = rows / blocks, larger = rows % blocks;
  int64_t r = 0;
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t n = size + (i < larger ? 1 : 0);
    block_of_rows<T, BYTES, VECTORS, MAX_ROWS>(n, a_rows.from(r), panel, depth, k0, k1, c_rows + r,
                                               column, width, add, epilogue);
    r += n;
  }
}

template <typename T, int BYTES, typename A>
RNN_EXT_INLINE void row_matmul_body(int64_t rows, const A& a_rows, const PackedMatrix<T>& b,
                                    T* const* c_rows, bool accumulate, int64_t column_begin,
                                    int64_t column_end, Epilogue epilogue) {
  // Cache blocking, outermost first: a depth slice (1024), then a chunk of rows whose A block
  // (at most 60 x 1024) stays in L2, then one column strip whose depth slice (1024 x 16 per panel,
  // contiguous; 256 KiB for a 4-vector AVX-512 strip) stays in L2 while the chunk's row blocks
  // pass it. Depth slices after the first accumulate into C, so a long reduction never streams A
  // or B more than once; the epilogue runs on the last. Measured on Zen 4 (one thread): slices of
  // 1024 and 4-vector strips run 700 x 650 x 650 in 5.7 ms against 6.7-7.0 with slices of 256
  // and 2-vector strips, 512 x 6400 x 512 in 32 against 36 ms; recurrence steps (20 x 650 x 320,
  // 64 x 512 x 256) the same either way.
  constexpr int64_t kRowChunk = 60;
  constexpr int64_t kDepthChunk = 1024;
  constexpr int64_t block = column_block<T>();
  constexpr int64_t lanes = Vector<T, BYTES>::lanes;
  constexpr int64_t vectors_per_panel = block / lanes;
  // Accumulators: at most 12 of the 16 AVX registers, 24 of AVX-512's 32 (with the B vectors and
  // a broadcast beside them): enough independent FMAs in flight to cover the FMA latency. With
  // AVX-512 a strip is four vectors wide and takes blocks of up to 6 rows (one broadcast of A
  // feeds four FMAs); at a range's end, two vectors and 12 rows, then one. With AVX a strip is
  // two vectors (one 16-column panel) wide and takes blocks of up to 6 rows; a batch of one row
  // gets strips four vectors wide instead, so that it has four independent accumulator chains.
  constexpr int kAccumulators = BYTES == 64 ? 24 : 12;
  constexpr int kWideVectors = 4;
  constexpr int64_t kWideRows = 1;  // AVX: the rows that take four-vector strips
  const int64_t chunks = (rows + kRowChunk - 1) / kRowChunk;
  for (int64_t k0 = 0; k0 < std::max<int64_t>(b.depth, 1); k0 += kDepthChunk) {
    const int64_t k1 = std::min(b.depth, k0 + kDepthChunk);
    const bool add = accumulate || k0 > 0;
    const Epilogue finish = k1 == b.depth ? epilogue : Epilogue::None;
    for (int64_t i = 0; i < chunks; ++i) {
      // Chunks as even as the blocks inside them: 64 rows are two chunks of 32.
      const int64_t chunk = rows * i / chunks, chunk_rows = rows * (i + 1) / chunks - chunk;
      const A a = a_rows.from(chunk);
      T* const* c = c_rows + chunk;
      const int64_t end_panel = (column_end + block - 1) / block;
      for (int64_t column = column_begin; column < column_end;) {
        const T* panel = b.data.data() + column * b.depth;
        const int64_t panels = end_panel - column / block;
        if ((BYTES == 64 || chunk_rows <= kWideRows) &&
            panels * vectors_per_panel >= kWideVectors) {
          strip<T, BYTES, kWideVectors,
                BYTES == 64 ? kAccumulators / kWideVectors : static_cast<int>(kWideRows)>(
              chunk_rows, a, panel, b.depth, k0, k1, c, column, b.width, add, finish);
          column += kWideVectors * lanes;
        } else if (vectors_per_panel == 1 && panels == 1) {
          // A 64-byte strip spans two panels; the second may not exist at the range's end.
          strip<T, BYTES, 1, kAccumulators / 2>(chunk_rows, a, panel, b.depth, k0, k1, c, column,
                                                b.width, add, finish);
          column += lanes;
        } else {
          strip<T, BYTES, 2, kAccumulators / 2>(chunk_rows, a, panel, b.depth, k0, k1, c, column,
                                                b.width, add, finish);
          column += 2 * lanes;
        }
      }
    }
  }
}

template <typename T, typename A>
__attribute__((target("avx512f,avx512vl,avx512dq,fma"))) void row_matmul_avx512(
    int64_t rows, const A& a, const PackedMatrix<T>& b, T* const* c_rows, bool accumulate,
    int64_t column_begin, int64_t column_end, Epilogue epilogue) {
  row_matmul_body<T, 64>(rows, a, b, c_rows, accumulate, column_begin, column_end, epilogue);
}

template <typename T, typename A>
__attribute__((target("avx,fma"))) void row_matmul_avx(int64_t rows, const A& a,
                                                       const PackedMatrix<T>& b, T* const* c_rows,
                                                       bool accumulate, int64_t column_begin,
                                                       int64_t column_end, Epilogue epilogue) {
  row_matmul_body<T, 32>(rows, a, b, c_rows, accumulate, column_begin, column_end, epilogue);
}

template <typename T, typename A>
void row_matmul_baseline(int64_t rows, const A& a, const PackedMatrix<T>& b, T* const* c_rows,
                         bool accumulate, int64_t column_begin, int64_t column_end,
                         Epilogue epilogue) {
  row_matmul_body<T, 32>(rows, a, b, c_rows, accumulate, column_begin, column_end, epilogue);
}

// activation_backward (elman.h) on one vector of dh + grad. An always-inlined function rather than
// a lambda, so that it is compiled for the caller's target (a lambda does not inherit a function's
// target attribute).
template <int BYTES>
RNN_EXT_INLINE vec_t<float, BYTES> step_gradient_vector(const float* h, const float* g,
                                                        const float* out, Activation activation) {
  return activation_backward_vector<BYTES>(load<float, BYTES>(h) + load<float, BYTES>(g),
                                           load<float, BYTES>(out), activation);
}

// dp = activation_backward(dh + grad, y) on `count` floats, BYTES at a time; the tail through a
// zero-padded vector.
template <int BYTES>
RNN_EXT_INLINE void step_gradient_body(int64_t count, const float* dh, const float* grad,
                                       const float* y, Activation activation, float* dp) {
  constexpr int64_t lanes = Vector<float, BYTES>::lanes;
  int64_t j = 0;
  for (; j + lanes <= count; j += lanes)
    store<float, BYTES>(dp + j, step_gradient_vector<BYTES>(dh + j, grad + j, y + j, activation));
  if (j < count) {
    float tail[3][lanes] = {};
    const size_t bytes = (count - j) * sizeof(float);
    std::memcpy(tail[0], dh + j, bytes);
    std::memcpy(tail[1], grad + j, bytes);
    std::memcpy(tail[2], y + j, bytes);
    float result[lanes];
    store<float, BYTES>(result, step_gradient_vector<BYTES>(tail[0], tail[1], tail[2], activation));
    std::memcpy(dp + j, result, bytes);
  }
}

__attribute__((target("avx512f,avx512vl,avx512dq,fma"))) void step_gradient_avx512(
    int64_t count, const float* dh, const float* grad, const float* y, Activation activation,
    float* dp) {
  step_gradient_body<64>(count, dh, grad, y, activation, dp);
}

__attribute__((target("avx,fma"))) void step_gradient_avx(int64_t count, const float* dh,
                                                          const float* grad, const float* y,
                                                          Activation activation, float* dp) {
  step_gradient_body<32>(count, dh, grad, y, activation, dp);
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") &&
                          !std::getenv("RNN_EXT_NO_AVX512");
  return has;
}

bool cpu_has_avx_fma() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma");
  return has;
}

}  // namespace

const char* kernel_name() {
  if (cpu_has_avx512()) return "AVX-512";
  if (cpu_has_avx_fma()) return "AVX+FMA";
  return "baseline";
}

namespace {

// The build of the kernel for this CPU, for either view of A.
template <typename T, typename A>
void dispatch_matmul(int64_t rows, const A& a, const PackedMatrix<T>& b, T* const* c_rows,
                     bool accumulate, int64_t column_begin, int64_t column_end, Epilogue epilogue) {
  column_end = std::min(column_end, b.width);
  if (rows <= 0 || column_begin >= column_end) return;
  if (cpu_has_avx512()) {
    row_matmul_avx512<T>(rows, a, b, c_rows, accumulate, column_begin, column_end, epilogue);
  } else if (cpu_has_avx_fma()) {
    row_matmul_avx<T>(rows, a, b, c_rows, accumulate, column_begin, column_end, epilogue);
  } else {
    row_matmul_baseline<T>(rows, a, b, c_rows, accumulate, column_begin, column_end, epilogue);
  }
}

}  // namespace

template <typename T>
void row_matmul(int64_t rows, const T* const* a_rows, const PackedMatrix<T>& b, T* const* c_rows,
                bool accumulate, int64_t column_begin, int64_t column_end, Epilogue epilogue) {
  dispatch_matmul<T>(rows, RowPointers<T>{a_rows}, b, c_rows, accumulate, column_begin, column_end,
                     epilogue);
}

template <typename T>
void transposed_matmul(int64_t rows, const T* a_t, int64_t a_t_stride, const PackedMatrix<T>& b,
                       T* const* c_rows, bool accumulate) {
  dispatch_matmul<T>(rows, TransposedRows<T>{a_t, a_t_stride}, b, c_rows, accumulate, 0, INT64_MAX,
                     Epilogue::None);
}

// One element at a time: the baseline build's float path and float64, the reference-precision
// path.
template <typename T>
void step_gradient_scalar(int64_t count, const T* dh, const T* grad, const T* y,
                          Activation activation, T* dp) {
  for (int64_t j = 0; j < count; ++j)
    dp[j] = activation_backward(dh[j] + grad[j], y[j], activation);
}

template <>
void step_gradient<float>(int64_t count, const float* dh, const float* grad, const float* y,
                          Activation activation, float* dp) {
  if (cpu_has_avx512()) {
    step_gradient_avx512(count, dh, grad, y, activation, dp);
  } else if (cpu_has_avx_fma()) {
    step_gradient_avx(count, dh, grad, y, activation, dp);
  } else {
    step_gradient_scalar(count, dh, grad, y, activation, dp);
  }
}

template <>
void step_gradient<double>(int64_t count, const double* dh, const double* grad, const double* y,
                           Activation activation, double* dp) {
  step_gradient_scalar(count, dh, grad, y, activation, dp);
}

template void row_matmul<float>(int64_t, const float* const*, const PackedMatrix<float>&,
                                float* const*, bool, int64_t, int64_t, Epilogue);
template void row_matmul<double>(int64_t, const double* const*, const PackedMatrix<double>&,
                                 double* const*, bool, int64_t, int64_t, Epilogue);
template void transposed_matmul<float>(int64_t, const float*, int64_t, const PackedMatrix<float>&,
                                       float* const*, bool);
template void transposed_matmul<double>(int64_t, const double*, int64_t,
                                        const PackedMatrix<double>&, double* const*, bool);

}  // namespace cpu
}  // namespace rnn_ext
