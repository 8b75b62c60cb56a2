// Register-blocked row_matmul and a vectorised tanh (see row_matmul.h). Each is compiled twice: a
// baseline build and an AVX+FMA build chosen at run time, so the binary runs on any x86-64.
#include "row_matmul.h"

#include <cmath>
#include <cstring>

#define RNN_EXT_INLINE inline __attribute__((always_inline))

namespace rnn_ext {
namespace cpu {
namespace {

// Vectors of 32 bytes: one AVX register, two SSE registers in the baseline build.
template <typename T>
struct Vector {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 32 / sizeof(T);
};
template <typename T>
using vec_t = typename Vector<T>::type;

template <typename T>
RNN_EXT_INLINE vec_t<T> load(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
RNN_EXT_INLINE void store(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// ROWS rows times one column panel of B over depth [k_begin, k_end): 2 * ROWS vector
// accumulators stay in registers; the result is added to C or replaces it.
template <typename T, int ROWS>
RNN_EXT_INLINE void block_kernel(const T* const* a, const T* panel, int64_t k_begin,
                                 int64_t k_end, T* const* c, int64_t column, int64_t width,
                                 bool accumulate) {
  constexpr int64_t lanes = Vector<T>::lanes;
  vec_t<T> acc0[ROWS], acc1[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    acc0[r] = vec_t<T>{};
    acc1[r] = vec_t<T>{};
  }
  const T* bk = panel + k_begin * 2 * lanes;
  for (int64_t k = k_begin; k < k_end; ++k, bk += 2 * lanes) {
    const vec_t<T> b0 = load(bk);
    const vec_t<T> b1 = load(bk + lanes);
    for (int r = 0; r < ROWS; ++r) {
      // vector * scalar: the compiler broadcasts straight from memory (vbroadcastss with AVX);
      // building the vector by hand costs a shuffle or an insert per lane.
      const T x = a[r][k];
      acc0[r] += b0 * x;
      acc1[r] += b1 * x;
    }
  }
  const int64_t valid = std::min<int64_t>(2 * lanes, width - column);
  for (int r = 0; r < ROWS; ++r) {
    T* out = c[r] + column;
    if (valid == 2 * lanes) {
      if (accumulate) {
        acc0[r] += load(out);
        acc1[r] += load(out + lanes);
      }
      store(out, acc0[r]);
      store(out + lanes, acc1[r]);
    } else {
      T tail[2 * lanes];
      store(tail, acc0[r]);
      store(tail + lanes, acc1[r]);
      for (int64_t j = 0; j < valid; ++j) out[j] = accumulate ? out[j] + tail[j] : tail[j];
    }
  }
}

template <typename T>
RNN_EXT_INLINE void row_matmul_body(int64_t rows, const T* const* a_rows,
                                    const PackedMatrix<T>& b, T* const* c_rows, bool accumulate,
                                    int64_t column_begin, int64_t column_end) {
  // Cache blocking, outermost first: a depth slice (256), then a chunk of rows whose A block
  // (60 x 256) stays in L2, then one column panel whose depth slice (256 x 16, contiguous) stays
  // in L1 while the chunk's rows stream past it. Depth slices after the first accumulate into C, so a long
  // reduction (the weight gradients reduce over all T*B rows) never streams A or B more than once.
  constexpr int64_t kRowChunk = 60;
  constexpr int64_t kDepthChunk = 256;
  // 6 rows x 2 vectors = 12 accumulators: enough independent FMAs in flight to cover the FMA
  // latency on two pipes, and with the 2 B vectors and a broadcast still within 16 registers.
  constexpr int64_t kRowBlock = 6;
  constexpr int64_t block = column_block<T>();
  for (int64_t k0 = 0; k0 < std::max<int64_t>(b.depth, 1); k0 += kDepthChunk) {
    const int64_t k1 = std::min(b.depth, k0 + kDepthChunk);
    const bool add = accumulate || k0 > 0;
    for (int64_t chunk = 0; chunk < rows; chunk += kRowChunk) {
      const int64_t chunk_end = std::min(rows, chunk + kRowChunk);
      for (int64_t column = column_begin; column < column_end; column += block) {
        const T* panel = b.data.data() + column * b.depth;
        int64_t r = chunk;
        for (; r + kRowBlock <= chunk_end; r += kRowBlock)
          block_kernel<T, kRowBlock>(a_rows + r, panel, k0, k1, c_rows + r, column, b.width,
                                     add);
        if (chunk_end - r >= 4) {
          block_kernel<T, 4>(a_rows + r, panel, k0, k1, c_rows + r, column, b.width, add);
          r += 4;
        }
        if (chunk_end - r == 3) {
          block_kernel<T, 3>(a_rows + r, panel, k0, k1, c_rows + r, column, b.width, add);
        } else if (chunk_end - r == 2) {
          block_kernel<T, 2>(a_rows + r, panel, k0, k1, c_rows + r, column, b.width, add);
        } else if (chunk_end - r == 1) {
          block_kernel<T, 1>(a_rows + r, panel, k0, k1, c_rows + r, column, b.width, add);
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
__attribute__((target("avx,fma"))) void row_matmul_avx(int64_t rows, const T* const* a_rows,
                                                        const PackedMatrix<T>& b,
                                                        T* const* c_rows, bool accumulate,
                                                        int64_t column_begin, int64_t column_end) {
  row_matmul_body(rows, a_rows, b, c_rows, accumulate, column_begin, column_end);
}

template <typename T>
void row_matmul_baseline(int64_t rows, const T* const* a_rows, const PackedMatrix<T>& b,
                         T* const* c_rows, bool accumulate, int64_t column_begin,
                         int64_t column_end) {
  row_matmul_body(rows, a_rows, b, c_rows, accumulate, column_begin, column_end);
}

__attribute__((target("avx,fma"))) void tanh_avx(float* values, int64_t count) {
  tanh_body(values, count);
}

void tanh_baseline(float* values, int64_t count) { tanh_body(values, count); }

bool cpu_has_avx_fma() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma");
  return has;
}

}  // namespace

template <typename T>
void row_matmul(int64_t rows, const T* const* a_rows, const PackedMatrix<T>& b, T* const* c_rows,
                bool accumulate, int64_t column_begin, int64_t column_end) {
  column_end = std::min(column_end, b.width);
  if (rows <= 0 || column_begin >= column_end) return;
  if (cpu_has_avx_fma()) {
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
