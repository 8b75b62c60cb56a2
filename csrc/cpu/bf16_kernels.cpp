// The vdpbf16ps kernel and the float32 -> bf16 rounding (see bf16_kernels.h). Only the functions
// marked with the AVX-512 BF16 target use the instructions; the rest of the file is plain x86-64.
#include "bf16_kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "vector_math.h"

#define RNN_EXT_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

namespace rnn_ext {
namespace cpu {
namespace {

// What the last depth slice of a recurrence step does with its float32 sums: the activation, one
// rounding to bf16, and a store of the rounded value to the state row and the output row. Inactive
// (state null): the sums are stored to C in float32.
struct StepFinish {
  Epilogue epilogue = Epilogue::None;
  uint16_t* const* state = nullptr;
  uint16_t* const* output = nullptr;
  StepFinish from(int64_t r) const {
    return state == nullptr ? StepFinish{} : StepFinish{epilogue, state + r, output + r};
  }
};

// tanh (vector_math.h's tanh_vector, as in the float32 kernels) or relu, NaN kept.
RNN_EXT_BF16_TARGET RNN_EXT_INLINE __m512 activate_vector(__m512 value, Epilogue epilogue) {
  using F = vec_t<float, 64>;
  const F x = (F)value;
  if (epilogue == Epilogue::Tanh) return (__m512)tanh_vector<64>(x);
  if (epilogue == Epilogue::Relu) return (__m512)(x < 0.0f ? F{} : x);
  return value;
}

// ROWS rows times VECTORS panels of B over the depth pairs [p0, p1): ROWS * VECTORS accumulators
// of 16 float32 in registers. Per pair, one 32-bit broadcast of a row's two bf16 values meets one
// 512-bit load of a panel's 16 column pairs.
template <int ROWS, int VECTORS>
RNN_EXT_BF16_TARGET RNN_EXT_INLINE void block_kernel(const uint16_t* const* a,
                                                     const uint16_t* panel, int64_t pairs,
                                                     int64_t p0, int64_t p1, float* const* c,
                                                     int64_t column, int64_t width, bool accumulate,
                                                     const StepFinish& finish) {
  __m512 acc[ROWS][VECTORS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECTORS; ++v) acc[r][v] = _mm512_setzero_ps();
  const int64_t panel_stride = pairs * 2 * kBf16Panel;
  for (int r = 0; r < ROWS; ++r) {
    if (finish.state == nullptr || accumulate)
      prefetch_for_store(c[r] + column, VECTORS * kBf16Panel * sizeof(float));
    if (finish.state != nullptr)
      prefetch_for_store(finish.output[r] + column, VECTORS * kBf16Panel * sizeof(uint16_t));
  }
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
    const int64_t j = column + v * kBf16Panel;
    for (int r = 0; r < ROWS; ++r) {
      __m512 value = acc[r][v];
      if (accumulate) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, c[r] + j));
      if (finish.state == nullptr) {
        _mm512_mask_storeu_ps(c[r] + j, mask, value);
      } else {
        const __m256i rounded =
            (__m256i)_mm512_cvtneps_pbh(activate_vector(value, finish.epilogue));
        _mm256_mask_storeu_epi16(finish.state[r] + j, mask, rounded);
        _mm256_mask_storeu_epi16(finish.output[r] + j, mask, rounded);
      }
    }
  }
}

// block_kernel for a block of `rows` rows, 1 <= rows <= MAX_ROWS, chosen at run time.
template <int VECTORS, int MAX_ROWS>
RNN_EXT_BF16_TARGET RNN_EXT_INLINE void block_of_rows(int64_t rows, const uint16_t* const* a,
                                                      const uint16_t* panel, int64_t pairs,
                                                      int64_t p0, int64_t p1, float* const* c,
                                                      int64_t column, int64_t width, bool add,
                                                      const StepFinish& finish) {
  if constexpr (MAX_ROWS > 1) {
    if (rows < MAX_ROWS)
      return block_of_rows<VECTORS, MAX_ROWS - 1>(rows, a, panel, pairs, p0, p1, c, column, width,
                                                  add, finish);
  }
  block_kernel<MAX_ROWS, VECTORS>(a, panel, pairs, p0, p1, c, column, width, add, finish);
}

// The `rows` rows of one strip of VECTORS panels: the fewest blocks of at most 6 rows, as even as
// possible (20 rows: 5, 5, 5, 5; a chunk of 32 rows: 6, 6, 5, 5, 5, 5), so no batch size falls
// to a narrow tail block. Each row's arithmetic is the same in any block.
template <int VECTORS>
RNN_EXT_BF16_TARGET RNN_EXT_INLINE void strip(int64_t rows, const uint16_t* const* a,
                                              const uint16_t* panel, int64_t pairs, int64_t p0,
                                              int64_t p1, float* const* c, int64_t column,
                                              int64_t width, bool add, const StepFinish& finish) {
  constexpr int64_t kMaxRows = 6;
  const int64_t blocks = (rows + kMaxRows - 1) / kMaxRows;
  const int64_t size = rows / blocks, larger = rows % blocks;
  int64_t r = 0;
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t n = size + (i < larger ? 1 : 0);
    block_of_rows<VECTORS, kMaxRows>(n, a + r, panel, pairs, p0, p1, c + r, column, width, add,
                                     finish.from(r));
    r += n;
  }
}

RNN_EXT_BF16_TARGET void row_matmul_bf16_avx512(int64_t rows, const uint16_t* const* a_rows,
                                                const PackedBf16& b, float* const* c_rows,
                                                bool accumulate, int64_t column_begin,
                                                int64_t column_end, const StepFinish& finish) {
  // Register tile: up to 6 rows x 4 panels (24 accumulators, 4 panel registers and a broadcast),
  // so one 32-bit broadcast of A feeds four vdpbf16ps. Cache blocking: a chunk of 60 rows, then the
  // strips of 4 panels, each over the whole depth up to 1024 pairs (a strip of 1024 pairs is 256
  // KiB, resident in L2 while the chunk's blocks pass). Depth slices after the first accumulate
  // into C in float32; the last one applies `finish`. Measured on Zen 4 (one thread, steps of 20 x
  // 650 x 320 and 64 x 512 x 256, products of 700 x 650 x 650 and 512 x 6400 x 512): 10-25% faster
  // than 12 rows x 2 panels in slices of 128 pairs, whose C round trips between slices and twice as
  // many broadcasts per vdpbf16ps cost more than re-reading B from L2.
  constexpr int64_t kDepthPairs = 1024;
  constexpr int64_t kRowChunk = 60;
  constexpr int64_t kStripPanels = 4;
  const int64_t pairs = b.pairs;
  for (int64_t p0 = 0; p0 < std::max<int64_t>(pairs, 1); p0 += kDepthPairs) {
    const int64_t p1 = std::min(pairs, p0 + kDepthPairs);
    const bool add = accumulate || p0 > 0;
    const StepFinish last = p1 >= pairs ? finish : StepFinish{};
    const int64_t chunks = (rows + kRowChunk - 1) / kRowChunk;
    for (int64_t i = 0; i < chunks; ++i) {
      // Chunks as even as the blocks inside them: 64 rows are two chunks of 32.
      const int64_t chunk = rows * i / chunks, chunk_rows = rows * (i + 1) / chunks - chunk;
      const uint16_t* const* a = a_rows + chunk;
      float* const* c = c_rows + chunk;
      const StepFinish chunk_finish = last.from(chunk);
      for (int64_t column = column_begin; column < column_end;
           column += kStripPanels * kBf16Panel) {
        const uint16_t* panel = b.data.data() + column * 2 * pairs;
        // Panels holding columns of [column, column_end), at most kStripPanels.
        const int64_t panels = std::min<int64_t>(
            kStripPanels, (std::min(column_end, b.width) - column + kBf16Panel - 1) / kBf16Panel);
        switch (panels) {  // no lambda: it would not inherit this function's target
          case 4:
            strip<4>(chunk_rows, a, panel, pairs, p0, p1, c, column, column_end, add, chunk_finish);
            break;
          case 3:
            strip<3>(chunk_rows, a, panel, pairs, p0, p1, c, column, column_end, add, chunk_finish);
            break;
          case 2:
            strip<2>(chunk_rows, a, panel, pairs, p0, p1, c, column, column_end, add, chunk_finish);
            break;
          default:
            strip<1>(chunk_rows, a, panel, pairs, p0, p1, c, column, column_end, add, chunk_finish);
            break;
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

// 16 bf16 values (those `mask` selects; the others 0) widened to float32: the bits shifted up.
RNN_EXT_BF16_TARGET RNN_EXT_INLINE __m512 widen16(__mmask16 mask, const uint16_t* source) {
  // The zero-masking forms: GCC 12's plain ones pass an undefined vector, which -O3 warns about.
  const __m256i half = _mm256_maskz_loadu_epi16(mask, source);
  const __m512i words = _mm512_maskz_cvtepu16_epi32(__mmask16(0xFFFF), half);
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(__mmask16(0xFFFF), words, 16));
}

RNN_EXT_BF16_TARGET void step_gradient_bf16_avx512(int64_t count, const float* dh,
                                                   const uint16_t* grad_output,
                                                   const uint16_t* output, Activation activation,
                                                   float* bias, uint16_t* rounded,
                                                   uint16_t* grad_pre) {
  using F = vec_t<float, 64>;
  for (int64_t j = 0; j < count; j += kBf16Panel) {
    const int64_t n = std::min<int64_t>(kBf16Panel, count - j);
    const __mmask16 mask = n == kBf16Panel ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
    const F g =
        (F)_mm512_add_ps(_mm512_maskz_loadu_ps(mask, dh + j), widen16(mask, grad_output + j));
    const F y = (F)widen16(mask, output + j);
    const F d = activation_backward_vector<64>(g, y, activation);
    _mm512_mask_storeu_ps(bias + j, mask,
                          _mm512_add_ps(_mm512_maskz_loadu_ps(mask, bias + j), (__m512)d));
    const __m256i bits16 = (__m256i)_mm512_cvtneps_pbh((__m512)d);
    _mm256_mask_storeu_epi16(rounded + j, mask, bits16);
    _mm256_mask_storeu_epi16(grad_pre + j, mask, bits16);
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
  row_matmul_bf16_avx512(rows, a_rows, b, c_rows, accumulate, column_begin, column_end,
                         StepFinish{});
}

void step_bf16(int64_t rows, const uint16_t* const* a_rows, const PackedBf16& b,
               float* const* pre_rows, Epilogue epilogue, uint16_t* const* state_rows,
               uint16_t* const* output_rows, int64_t column_begin, int64_t column_end) {
  column_end = std::min(column_end, b.width);
  if (rows <= 0 || column_begin >= column_end) return;
  row_matmul_bf16_avx512(rows, a_rows, b, pre_rows, /*accumulate=*/true, column_begin, column_end,
                         StepFinish{epilogue, state_rows, output_rows});
}

void step_gradient_bf16(int64_t count, const float* dh, const uint16_t* grad_output,
                        const uint16_t* output, Activation activation, float* bias,
                        uint16_t* rounded, uint16_t* grad_pre) {
  if (count > 0)
    step_gradient_bf16_avx512(count, dh, grad_output, output, activation, bias, rounded, grad_pre);
}

void round_to_bf16(const float* src, uint16_t* dst, int64_t count) {
  if (count > 0) round_to_bf16_avx512(src, dst, count);
}

}  // namespace cpu
}  // namespace rnn_ext
