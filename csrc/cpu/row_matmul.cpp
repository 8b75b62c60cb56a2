// Register-blocked row_matmul and a vectorised tanh (see row_matmul.h). row_matmul is compiled
// three times (baseline, AVX+FMA, AVX-512) and tanh twice (baseline, AVX+FMA); the build that runs
// is chosen at run time from the CPU's flags, so the binary runs on any x86-64.
#include "row_matmul.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

#define RNN_EXT_INLINE inline __attribute__((always_inline))

namespace rnn_ext {
namespace cpu {
namespace {

// Vectors of BYTES bytes: 32 is one AVX register (two SSE registers in the baseline build), 64 one
// AVX-512 register.
template <typename T, int BYTES = 32>
struct Vector {
  typedef T type __attribute__((vector_size(BYTES)));
  static constexpr int64_t lanes = BYTES / sizeof(T);
};
template <typename T, int BYTES = 32>
using vec_t = typename Vector<T, BYTES>::type;

template <typename T, int BYTES = 32>
RNN_EXT_INLINE vec_t<T, BYTES> load(const T* p) {
  vec_t<T, BYTES> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T, int BYTES = 32>
RNN_EXT_INLINE void store(T* p, vec_t<T, BYTES> v) {
  std::memcpy(p, &v, sizeof(v));
}

// ROWS rows times VECTORS vectors of columns of B over depth [k_begin, k_end): ROWS * VECTORS
// accumulators stay in registers; the result is added to C or replaces it. With 32-byte vectors
// the two vectors are the two halves of one column panel; with 64-byte vectors a vector is a whole
// panel, so vector v reads the panel v places further on.
template <typename T, int ROWS, int BYTES, int VECTORS>
RNN_EXT_INLINE void block_kernel(const T* const* a, const T* panel, int64_t depth, int64_t k_begin,
                                 int64_t k_end, T* const* c, int64_t column, int64_t width,
                                 bool accumulate) {
  using V = vec_t<T, BYTES>;
  constexpr int64_t lanes = Vector<T, BYTES>::lanes;
  constexpr int64_t block = column_block<T>();
  const int64_t vector_step = lanes == block ? depth * block : lanes;
  V acc[ROWS][VECTORS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECTORS; ++v) acc[r][v] = V{};
  const T* bk = panel + k_begin * block;
  for (int64_t k = k_begin; k < k_end; ++k, bk += block) {
    V bv[VECTORS];
    for (int v = 0; v < VECTORS; ++v) bv[v] = load<T, BYTES>(bk + v * vector_step);
    for (int r = 0; r < ROWS; ++r) {
      // vector * scalar: the compiler broadcasts straight from memory (vbroadcastss with AVX);
      // building the vector by hand costs a shuffle or an insert per lane.
      const T x = a[r][k];
      for (int v = 0; v < VECTORS; ++v) acc[r][v] += bv[v] * x;
    }
  }
  constexpr int64_t columns = VECTORS * lanes;
  const int64_t valid = std::min<int64_t>(columns, width - column);
  for (int r = 0; r < ROWS; ++r) {
    T* out = c[r] + column;
    if (valid == columns) {
      for (int v = 0; v < VECTORS; ++v) {
        if (accumulate) acc[r][v] += load<T, BYTES>(out + v * lanes);
        store<T, BYTES>(out + v * lanes, acc[r][v]);
      }
    } else {
      T tail[columns];
      for (int v = 0; v < VECTORS; ++v) store<T, BYTES>(tail + v * lanes, acc[r][v]);
      for (int64_t j = 0; j < valid; ++j) out[j] = accumulate ? out[j] + tail[j] : tail[j];
    }
  }
}

// Rows [r, chunk_end) of one column strip, ROW_BLOCK rows at a time, then the remainder in
// blocks of 4, 2 and 1 rows (each row's arithmetic is the same whatever block it falls in).
template <typename T, int BYTES, int VECTORS, int ROW_BLOCK>
RNN_EXT_INLINE void strip(const T* const* a_rows, const T* panel, int64_t depth, int64_t k0,
                          int64_t k1, T* const* c_rows, int64_t column, int64_t width, bool add,
                          int64_t r, int64_t chunk_end) {
  for (; r + ROW_BLOCK <= chunk_end; r += ROW_BLOCK)
    block_kernel<T, ROW_BLOCK, BYTES, VECTORS>(a_rows + r, panel, depth, k0, k1, c_rows + r, column,
                                               width, add);
  if (ROW_BLOCK > 8 && chunk_end - r >= 8) {
    block_kernel<T, 8, BYTES, VECTORS>(a_rows + r, panel, depth, k0, k1, c_rows + r, column, width,
                                       add);
    r += 8;
  }
  if (chunk_end - r >= 4) {
    block_kernel<T, 4, BYTES, VECTORS>(a_rows + r, panel, depth, k0, k1, c_rows + r, column, width,
                                       add);
    r += 4;
  }
  if (chunk_end - r >= 2) {
    block_kernel<T, 2, BYTES, VECTORS>(a_rows + r, panel, depth, k0, k1, c_rows + r, column, width,
                                       add);
    r += 2;
  }
  if (chunk_end - r == 1)
    block_kernel<T, 1, BYTES, VECTORS>(a_rows + r, panel, depth, k0, k1, c_rows + r, column, width,
                                       add);
}

template <typename T, int BYTES>
RNN_EXT_INLINE void row_matmul_body(int64_t rows, const T* const* a_rows, const PackedMatrix<T>& b,
                                    T* const* c_rows, bool accumulate, int64_t column_begin,
                                    int64_t column_end) {
  // Cache blocking, outermost first: a depth slice (256), then a chunk of rows whose A block
  // (60 x 256) stays in L2, then one column strip whose depth slice (256 x 16 per panel,
  // contiguous) stays in L1 while the chunk's rows stream past it. Depth slices after the first
  // accumulate into C, so a long reduction never streams A or B more than once.
  constexpr int64_t kRowChunk = 60;
  constexpr int64_t kDepthChunk = 256;
  constexpr int64_t block = column_block<T>();
  constexpr int64_t lanes = Vector<T, BYTES>::lanes;
  // Accumulators: 6 rows x 2 vectors = 12 of the 16 AVX registers (with the 2 B vectors and a
  // broadcast); 12 rows x 2 vectors = 24 of AVX-512's 32. Enough independent FMAs in flight to
  // cover the FMA latency on two pipes.
  constexpr int64_t kRowBlock = BYTES == 64 ? 12 : 6;
  constexpr int64_t strip_columns = 2 * lanes;
  for (int64_t k0 = 0; k0 < std::max<int64_t>(b.depth, 1); k0 += kDepthChunk) {
    const int64_t k1 = std::min(b.depth, k0 + kDepthChunk);
    const bool add = accumulate || k0 > 0;
    for (int64_t chunk = 0; chunk < rows; chunk += kRowChunk) {
      const int64_t chunk_end = std::min(rows, chunk + kRowChunk);
      for (int64_t column = column_begin; column < column_end; column += strip_columns) {
        const T* panel = b.data.data() + column * b.depth;
        // A 64-byte strip spans two panels; the second may not exist at the matrix's end.
        if (lanes == block && column + block >= b.padded_width) {
          strip<T, BYTES, 1, kRowBlock>(a_rows, panel, b.depth, k0, k1, c_rows, column, b.width,
                                        add, chunk, chunk_end);
        } else {
          strip<T, BYTES, 2, kRowBlock>(a_rows, panel, b.depth, k0, k1, c_rows, column, b.width,
                                        add, chunk, chunk_end);
        }
      }
    }
  }
}

// tanh for 8 floats: an odd polynomial near zero, 1 - 2 / (exp(2|x|) + 1) elsewhere (the split of
// the classic Cephes tanhf, whose coefficients these are); both branches computed, then selected.
RNN_EXT_INLINE vec_t<float> tanh_vector(vec_t<float> x) {
  typedef int32_t ivec __attribute__((vector_size(32)));
  const ivec sign_mask = ivec{} + static_cast<int32_t>(0x80000000u);
  const vec_t<float> ax = (vec_t<float>)((ivec)x & ~sign_mask);

  const vec_t<float> z = x * x;
  vec_t<float> small = vec_t<float>{} - 5.70498872745e-3f;
  small = small * z + 2.06390887954e-2f;
  small = small * z - 5.37397155531e-2f;
  small = small * z + 1.33314422036e-1f;
  small = small * z - 3.33332819422e-1f;
  small = small * z * x + x;

  // exp(y) for y = 2|x|, clamped where tanh is 1 in float anyway: y = n ln2 + r, |r| <= ln2 / 2.
  vec_t<float> y = 2.0f * ax;
  y = y > 20.0f ? vec_t<float>{} + 20.0f : y;  // written so that NaN stays NaN
  const vec_t<float> n = __builtin_convertvector(
      __builtin_convertvector(y * 1.44269504088896341f + 0.5f, ivec), vec_t<float>);
  vec_t<float> r = y - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const vec_t<float> r2 = r * r;
  vec_t<float> p = vec_t<float>{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const ivec exponent = (__builtin_convertvector(n, ivec) + 127) << 23;
  const vec_t<float> e = p * (vec_t<float>)exponent;
  vec_t<float> large = 1.0f - 2.0f / (e + 1.0f);
  large = (vec_t<float>)((ivec)large | ((ivec)x & sign_mask));
  return ax < 0.625f ? small : large;
}

RNN_EXT_INLINE void tanh_body(float* values, int64_t count) {
  constexpr int64_t lanes = Vector<float>::lanes;
  int64_t i = 0;
  for (; i + lanes <= count; i += lanes) store(values + i, tanh_vector(load(values + i)));
  if (i < count) {
    float tail[lanes] = {};
    std::memcpy(tail, values + i, (count - i) * sizeof(float));
    store(tail, tanh_vector(load(tail)));
    std::memcpy(values + i, tail, (count - i) * sizeof(float));
  }
}

template <typename T>
__attribute__((target("avx512f,avx512vl,avx512dq,fma"))) void row_matmul_avx512(
    int64_t rows, const T* const* a_rows, const PackedMatrix<T>& b, T* const* c_rows,
    bool accumulate, int64_t column_begin, int64_t column_end) {
  row_matmul_body<T, 64>(rows, a_rows, b, c_rows, accumulate, column_begin, column_end);
}

template <typename T>
__attribute__((target("avx,fma"))) void row_matmul_avx(int64_t rows, const T* const* a_rows,
                                                       const PackedMatrix<T>& b, T* const* c_rows,
                                                       bool accumulate, int64_t column_begin,
                                                       int64_t column_end) {
  row_matmul_body<T, 32>(rows, a_rows, b, c_rows, accumulate, column_begin, column_end);
}

template <typename T>
void row_matmul_baseline(int64_t rows, const T* const* a_rows, const PackedMatrix<T>& b,
                         T* const* c_rows, bool accumulate, int64_t column_begin,
                         int64_t column_end) {
  row_matmul_body<T, 32>(rows, a_rows, b, c_rows, accumulate, column_begin, column_end);
}

__attribute__((target("avx,fma"))) void tanh_avx(float* values, int64_t count) {
  tanh_body(values, count);
}

void tanh_baseline(float* values, int64_t count) { tanh_body(values, count); }

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

template <typename T>
void row_matmul(int64_t rows, const T* const* a_rows, const PackedMatrix<T>& b, T* const* c_rows,
                bool accumulate, int64_t column_begin, int64_t column_end) {
  column_end = std::min(column_end, b.width);
  if (rows <= 0 || column_begin >= column_end) return;
  if (cpu_has_avx512()) {
    row_matmul_avx512(rows, a_rows, b, c_rows, accumulate, column_begin, column_end);
  } else if (cpu_has_avx_fma()) {
    row_matmul_avx(rows, a_rows, b, c_rows, accumulate, column_begin, column_end);
  } else {
    row_matmul_baseline(rows, a_rows, b, c_rows, accumulate, column_begin, column_end);
  }
}

template <>
void tanh_inplace<float>(float* values, int64_t count) {
  if (cpu_has_avx_fma()) {
    tanh_avx(values, count);
  } else {
    tanh_baseline(values, count);
  }
}

// float64 is the reference-precision path: exact libm tanh.
template <>
void tanh_inplace<double>(double* values, int64_t count) {
  for (int64_t i = 0; i < count; ++i) values[i] = std::tanh(values[i]);
}

template void row_matmul<float>(int64_t, const float* const*, const PackedMatrix<float>&,
                                float* const*, bool, int64_t, int64_t);
template void row_matmul<double>(int64_t, const double* const*, const PackedMatrix<double>&,
                                 double* const*, bool, int64_t, int64_t);

}  // namespace cpu
}  // namespace rnn_ext
