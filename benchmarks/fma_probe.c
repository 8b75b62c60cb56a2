// The machine's arithmetic peak, for the benchmark: each thread runs a loop of independent
// multiply-add chains that never touch memory, so the only limit is how many FMA (or bf16 dot
// product) instructions a core retires per cycle. Enough independent chains hide the instruction
// latency (4-5 cycles on current cores, two pipes: 10 or more in flight).
//
// Built by benchmarks/bench.py at run time with the system C compiler and loaded through ctypes, so
// the probe does not depend on how the extension was built. Each kind has its own target attribute:
// one object serves every CPU, and the caller only runs the kinds the CPU's flags allow.
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>

#define CHAINS 12

// Keeps the accumulators alive: without a use the compiler may drop the whole loop.
static volatile float sink;

__attribute__((target("avx512f"))) static void fp32_avx512(int64_t iterations) {
  __m512 acc[CHAINS];
  for (int i = 0; i < CHAINS; ++i) acc[i] = _mm512_set1_ps((float)i * 1e-3f);
  const __m512 a = _mm512_set1_ps(0.999f);
  const __m512 b = _mm512_set1_ps(1e-4f);
  for (int64_t n = 0; n < iterations; ++n)
#pragma GCC unroll 12
    for (int i = 0; i < CHAINS; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  __m512 total = acc[0];
  for (int i = 1; i < CHAINS; ++i) total = _mm512_add_ps(total, acc[i]);
  sink = _mm512_reduce_add_ps(total);
}

__attribute__((target("avx2,fma"))) static void fp32_avx2(int64_t iterations) {
  __m256 acc[CHAINS];
  for (int i = 0; i < CHAINS; ++i) acc[i] = _mm256_set1_ps((float)i * 1e-3f);
  const __m256 a = _mm256_set1_ps(0.999f);
  const __m256 b = _mm256_set1_ps(1e-4f);
  for (int64_t n = 0; n < iterations; ++n)
#pragma GCC unroll 12
    for (int i = 0; i < CHAINS; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  __m256 total = acc[0];
  for (int i = 1; i < CHAINS; ++i) total = _mm256_add_ps(total, acc[i]);
  float lanes[8];
  _mm256_storeu_ps(lanes, total);
  sink = lanes[0] + lanes[7];
}

__attribute__((target("avx512f,avx512bf16"))) static void bf16_avx512(int64_t iterations) {
  __m512 acc[CHAINS];
  for (int i = 0; i < CHAINS; ++i) acc[i] = _mm512_set1_ps((float)i * 1e-3f);
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(2e-3f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(3e-3f), _mm512_set1_ps(4e-3f));
  for (int64_t n = 0; n < iterations; ++n)
#pragma GCC unroll 12
    for (int i = 0; i < CHAINS; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  __m512 total = acc[0];
  for (int i = 1; i < CHAINS; ++i) total = _mm512_add_ps(total, acc[i]);
  sink = _mm512_reduce_add_ps(total);
}

// Floating-point operations one iteration of each kind performs: CHAINS instructions of
// 16 lanes x 2 (AVX-512 fp32), 8 lanes x 2 (AVX2 fp32), 32 bf16 pairs x 2 (vdpbf16ps).
double probe_flops_per_iteration(int kind) {
  switch (kind) {
    case 0:
      return CHAINS * 32.0;
    case 1:
      return CHAINS * 16.0;
    case 2:
      return CHAINS * 64.0;
  }
  return 0.0;
}

struct job {
  int kind;
  int64_t iterations;
  const int* go;
};

static void* run_job(void* argument) {
  struct job* job = (struct job*)argument;
  while (!__atomic_load_n(job->go, __ATOMIC_ACQUIRE)) {
  }
  if (job->iterations == 0) return 0;
  if (job->kind == 0) fp32_avx512(job->iterations);
  if (job->kind == 1) fp32_avx2(job->iterations);
  if (job->kind == 2) bf16_avx512(job->iterations);
  return 0;
}

// Seconds for `threads` threads (at most 64) each to run `iterations` iterations of `kind`,
// released together (the clock starts when they are all made); -1 on bad arguments or when a thread
// cannot be made.
double probe_seconds(int kind, int threads, int64_t iterations) {
  if (kind < 0 || kind > 2 || threads < 1 || threads > 64 || iterations < 1) return -1.0;
  pthread_t handles[64];
  struct job jobs[64];
  int go = 0;
  int made = 0;
  for (; made < threads; ++made) {
    jobs[made].kind = kind;
    jobs[made].iterations = iterations;
    jobs[made].go = &go;
    if (pthread_create(&handles[made], 0, run_job, &jobs[made]) != 0) break;
  }
  if (made < threads) {  // release the threads already made without work, and fail
    for (int i = 0; i < made; ++i) jobs[i].iterations = 0;
    __atomic_store_n(&go, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < made; ++i) pthread_join(handles[i], 0);
    return -1.0;
  }
  struct timespec begin, end;
  clock_gettime(CLOCK_MONOTONIC, &begin);
  __atomic_store_n(&go, 1, __ATOMIC_RELEASE);
  for (int i = 0; i < threads; ++i) pthread_join(handles[i], 0);
  clock_gettime(CLOCK_MONOTONIC, &end);
  return (double)(end.tv_sec - begin.tv_sec) + 1e-9 * (double)(end.tv_nsec - begin.tv_nsec);
}
