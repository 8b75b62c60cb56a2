// Vector arithmetic shared by the CPU kernels (row_matmul.cpp, bf16_kernels.cpp): GCC vector
// types of 32 or 64 bytes, unaligned loads and stores, the vectorised tanh and the activations'
// derivative. Header-only and always inlined, so each kernel build (AVX+FMA, AVX-512, baseline)
// compiles them for its own instruction set; every lane runs the same arithmetic whatever the
// width, so a 16-lane and an 8-lane tanh give the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "../elman.h"

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

// Asks for the cache lines of [p, p + bytes) ahead of a store to them. A register tile's store to
// lines not in cache waits for each line (read for ownership); issued before the tile's
// multiply-adds, the fetches overlap them. Measured on Zen 4 (one thread, bf16 6400 x 256 x 512,
// a 13 MB result): 157-168 -> 179-188 GFLOP/s; no change where the result stays in cache.
RNN_EXT_INLINE void prefetch_for_store(const void* p, int64_t bytes) {
  const char* begin = static_cast<const char*>(p);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(begin + offset, 1);
  __builtin_prefetch(begin + bytes - 1, 1);
}

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

// tanh for a vector of 8 or 16 floats (the same arithmetic on every lane whatever the width): an
// odd polynomial near zero, 1 - 2 / (exp(2|x|) + 1) elsewhere (the split of the classic Cephes
// tanhf, whose coefficients these are); both branches computed, then selected.
template <int BYTES = 32>
RNN_EXT_INLINE vec_t<float, BYTES> tanh_vector(vec_t<float, BYTES> x) {
  using ivec = vec_t<int32_t, BYTES>;
  using F = vec_t<float, BYTES>;
  const ivec sign_mask = ivec{} + static_cast<int32_t>(0x80000000u);
  const F ax = (F)((ivec)x & ~sign_mask);

  const F z = x * x;
  F small = F{} - 5.70498872745e-3f;
  small = small * z + 2.06390887954e-2f;
  small = small * z - 5.37397155531e-2f;
  small = small * z + 1.33314422036e-1f;
  small = small * z - 3.33332819422e-1f;
  small = small * z * x + x;

  // exp(y) for y = 2|x|, clamped where tanh is 1 in float anyway: y = n ln2 + r, |r| <= ln2 / 2.
  F y = 2.0f * ax;
  y = y > 20.0f ? F{} + 20.0f : y;  // written so that NaN stays NaN
  const F n =
      __builtin_convertvector(__builtin_convertvector(y * 1.44269504088896341f + 0.5f, ivec), F);
  F r = y - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const F r2 = r * r;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const ivec exponent = (__builtin_convertvector(n, ivec) + 127) << 23;
  const F e = p * (F)exponent;
  F large = 1.0f - 2.0f / (e + 1.0f);
  large = (F)((ivec)large | ((ivec)x & sign_mask));
  return ax < 0.625f ? small : large;
}

// activation_backward (elman.h) on a vector of floats: grad selected by y > 0 (relu) or times
// 1 - y^2 (tanh). With FMA, 1 - y*y is one fused operation: the AVX builds' bits differ from the
// baseline build's in the last place.
template <int BYTES>
RNN_EXT_INLINE vec_t<float, BYTES> activation_backward_vector(vec_t<float, BYTES> grad,
                                                              vec_t<float, BYTES> y,
                                                              Activation activation) {
  using F = vec_t<float, BYTES>;
  return activation == Activation::Relu ? (y <= 0.0f ? F{} : grad) : grad * (1.0f - y * y);
}

}  // namespace
}  // namespace cpu
}  // namespace rnn_ext
