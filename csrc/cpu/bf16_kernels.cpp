// The vdpbf16ps kernel and the float32 -> bf16 rounding (see bf16_kernels.h). Only the functions
// marked with the AVX-512 BF16 target use the instructions; the rest of the file is plain x86-64.
#include "bf16_kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#define RNN_EXT_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define RNN_EXT_INLINE inline __attribute__((always_inline))

namespace rnn_ext {
namespace cpu {
namespace {

// ROWS rows times VECTORS panels of B over the depth pairs [p0, p1): ROWS * VECTORS accumulators
// of 16 float32 in registers. Per pair, one 32-bit broadcast of a row's two bf16 values meets one
// 512-bit load of a panel's 16 column pairs.
template <int ROWS, int VECTORS>
RNN_EXT_BF16_TARGET RNN_EXT_INLINE void block_kernel(const uint16_t* const* a,
                                                     const uint16_t* panel, int64_t pairs,
                                                     int64_t p0, int64_t p1, float* const* c,
                                                     int64_t column, int64_t width,
                                                     bool accumulate) {
  __m512 acc[ROWS][VECTORS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECTORS; ++v) acc[r][v] = _mm512_setzero_ps();
  const int64_t panel_stride = pairs * 2 * kBf16Panel;
  const uint16_t* bp = panel + p0 * 2 * kBf16Panel;
  for (int64_t p = p0; p < p1; ++p, bp += 2 * kBf16Panel) {
    __m512bh bv[VECTORS];
    for (int v = 0; v < VECTORS; ++v)
      bv[v] = (__m512bh)_mm512_loadu_si512(static_cast<const void*>(bp + v * panel_stride));
    for (int r = 0; r < ROWS; ++r) {
      int32_t pair;
      std::memcpy(&pair, a[r] + 2 * p, sizeof(pair));
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < VECTORS; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, bv[v]);
    }
  }
  for (int v = 0; v < VECTORS; ++v) {
    const int64_t valid = std::min<int64_t>(kBf16Panel, width - column - v * kBf16Panel);
    if (valid <= 0) break;
    const __mmask16 mask = valid == kBf16Panel ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
    for (int r = 0; r < ROWS; ++r) {
      float* out = c[r] + column + v * kBf16Panel;
      __m512 value = acc[r][v];
      if (accumulate) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, out));
      _mm512_mask_storeu_ps(out, mask, value);
    }
  }
}

// Rows [r, end) of one strip of VECTORS panels: blocks of 12 rows, then 8, 4, 2, 1 (each row's
// arithmetic is the same in any block).
template <int VECTORS>
RNN_EXT_BF16_TARGET RNN_EXT_INLINE void strip(const uint16_t* const* a, const uint16_t* panel,
                                              int64_t pairs, int64_t p0, int64_t p1,
                                              float* const* c, int64_t column, int64_t width,
                                              bool add, int64_t r, int64_t end) {
  for (; r + 12 <= end; r += 12)
    block_kernel<12, VECTORS>(a + r, panel, pairs, p0, p1, c + r, column, width, add);
  if (end - r >= 8) {
    block_kernel<8, VECTORS>(a + r, panel, pairs, p0, p1, c + r, column, width, add);
    r += 8;
  }
  if (end - r >= 4) {
    block_kernel<4, VECTORS>(a + r, panel, pairs, p0, p1, c + r, column, width, add);
    r += 4;
  }
  if (end - r >= 2) {
    block_kernel<2, VECTORS>(a + r, panel, pairs, p0, p1, c + r, column, width, add);
    r += 2;
  }
  if (end - r == 1)
    block_kernel<1, VECTORS>(a + r, panel, pairs, p0, p1, c + r, column, width, add);
}

RNN_EXT_BF16_TARGET void row_matmul_bf16_avx512(int64_t rows, const uint16_t* const* a_rows,
                                                const PackedBf16& b, float* const* c_rows,
                                                bool accumulate, int64_t column_begin,
                                                int64_t column_end) {
  // Cache blocking as in the float32 kernel: a depth slice of 128 pairs (a two-panel strip of it
  // is 16 KiB, resident in L1 while the rows stream past), a chunk of 60 rows (its A slice, 30 KiB,
  // in L2), then the strips. Slices after the first accumulate into C in float32.
  constexpr int64_t kDepthPairs = 128;
  constexpr int64_t kRowChunk = 60;
  constexpr int64_t strip_columns = 2 * kBf16Panel;
  const int64_t pairs = b.pairs;
  for (int64_t p0 = 0; p0 < std::max<int64_t>(pairs, 1); p0 += kDepthPairs) {
    const int64_t p1 = std::min(pairs, p0 + kDepthPairs);
    const bool add = accumulate || p0 > 0;
    for (int64_t chunk = 0; chunk < rows; chunk += kRowChunk) {
      const int64_t chunk_end = std::min(rows, chunk + kRowChunk);
      for (int64_t column = column_begin; column < column_end; column += strip_columns) {
        const uint16_t* panel = b.data.data() + column * 2 * pairs;
        if (column + kBf16Panel >= b.padded_width) {
          strip<1>(a_rows, panel, pairs, p0, p1, c_rows, column, column_end, add, chunk, chunk_end);
        } else {
          strip<2>(a_rows, panel, pairs, p0, p1, c_rows, column, column_end, add, chunk, chunk_end);
        }
      }
    }
  }
}

RNN_EXT_BF16_TARGET void round_to_bf16_avx512(const float* src, uint16_t* dst, int64_t count) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)rounded);
  }
  if (i < count) {
    const __mmask16 mask = __mmask16((1u << (count - i)) - 1);
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + i));
    _mm256_mask_storeu_epi16(dst + i, mask, (__m256i)rounded);
  }
}

}  // namespace

// The switches are read on every call (a layer's cost dwarfs a getenv), so that tests can run
// both paths in one process.
bool bf16_available() {
  static const bool cpu_has =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("fma");
  return cpu_has && !std::getenv("RNN_EXT_NO_BF16") && !std::getenv("RNN_EXT_NO_AVX512");
}

void shape_bf16(PackedBf16& packed, int64_t depth, int64_t width) {
  packed.depth = depth;
  packed.pairs = (depth + 1) / 2;
  packed.width = width;
  packed.padded_width = (width + kBf16Panel - 1) / kBf16Panel * kBf16Panel;
  packed.data.resize(static_cast<size_t>(packed.pairs * 2 * packed.padded_width));
}

void pack_bf16_columns(PackedBf16& packed, const uint16_t* source, int64_t k_stride,
                       int64_t j_stride, int64_t column_begin, int64_t column_end) {
  const int64_t depth = packed.depth, width = packed.width;
  for (int64_t j0 = column_begin; j0 < std::min(column_end, width); j0 += kBf16Panel) {
    uint16_t* panel = packed.data.data() + j0 * 2 * packed.pairs;
    const int64_t columns = std::min(kBf16Panel, width - j0);
    for (int64_t k = 0; k < 2 * packed.pairs; ++k) {
      uint16_t* row = panel + (k / 2) * 2 * kBf16Panel + k % 2;
      for (int64_t jj = 0; jj < kBf16Panel; ++jj)
        row[jj * 2] = k < depth && jj < columns ? source[k * k_stride + (j0 + jj) * j_stride] : 0;
    }
  }
}

void pack_bf16(PackedBf16& packed, const uint16_t* source, int64_t depth, int64_t width,
               int64_t k_stride, int64_t j_stride) {
  shape_bf16(packed, depth, width);
  pack_bf16_columns(packed, source, k_stride, j_stride, 0, width);
}

void row_matmul_bf16(int64_t rows, const uint16_t* const* a_rows, const PackedBf16& b,
                     float* const* c_rows, bool accumulate, int64_t column_begin,
                     int64_t column_end) {
  column_end = std::min(column_end, b.width);
  if (rows <= 0 || column_begin >= column_end) return;
  row_matmul_bf16_avx512(rows, a_rows, b, c_rows, accumulate, column_begin, column_end);
}

void round_to_bf16(const float* src, uint16_t* dst, int64_t count) {
  if (count > 0) round_to_bf16_avx512(src, dst, count);
}

}  // namespace cpu
}  // namespace rnn_ext
