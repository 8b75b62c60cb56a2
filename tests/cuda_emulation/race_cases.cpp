// The ThreadSanitizer run of the emulated kernels (make check-cuda-races): every kernel and regime
// on small shapes, whole layers forward and backward through the CUDA glue, padded and packed. With
// barriers as the only synchronisation between emulated threads, a missing __syncthreads or grid
// sync shows up as a TSan data race. The numbers are checked by tests/test_cuda_emulation.py; here
// the regimes only have to agree.
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "emu_layer.h"

namespace {

enum ScalarType { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2 };
enum Regime { kSingleBlock = 1, kCooperative = 2, kStepGemm = 3 };
constexpr int64_t kSteps = 4;

// A buffer of `count` random values in [-scale, scale) stored as `type`.
std::vector<unsigned char> random_buffer(int type, int64_t count, double scale,
                                         std::mt19937& generator) {
  std::uniform_real_distribution<double> uniform(-scale, scale);
  const size_t width = type == kFloat64 ? 8 : (type == kFloat32 ? 4 : 2);
  std::vector<unsigned char> buffer(static_cast<size_t>(count) * width);
  for (int64_t i = 0; i < count; ++i) {
    const double value = uniform(generator);
    if (type == kFloat64) {
      reinterpret_cast<double*>(buffer.data())[i] = value;
    } else if (type == kFloat32) {
      reinterpret_cast<float*>(buffer.data())[i] = static_cast<float>(value);
    } else {
      reinterpret_cast<__half*>(buffer.data())[i] = __float2half_rn(static_cast<float>(value));
    }
  }
  return buffer;
}

struct Case {
  const char* name;
  int sm_count;  // of the emulated device (48 KB of shared memory per block, 64 KB per SM)
  int regime;
  int max_slice;
  int type;
  int64_t batch, hidden, directions;
  bool packed;
};

struct Result {
  std::vector<unsigned char> output, final_state, grad_input, grad_hx, grad_weights;
};

int failures = 0;

void expect(bool ok, const char* what, const char* name) {
  if (ok) return;
  std::printf("FAIL %s: %s\n", name, what);
  ++failures;
}

Result run_case(const Case& c) {
  std::mt19937 generator(12345);  // same data for every regime of one shape
  constexpr int64_t kInputSize = 3;
  std::vector<int64_t> batch_sizes(kSteps, c.batch);
  if (c.packed) {
    for (int64_t t = 0; t < kSteps; ++t) batch_sizes[t] = std::max<int64_t>(1, c.batch - t);
  }
  int64_t rows = 0;
  for (int64_t t = 0; t < kSteps; ++t) rows += batch_sizes[t];
  const int64_t width = c.directions * c.hidden;
  const int64_t states = c.directions * c.batch * c.hidden;
  const size_t element = c.type == kFloat64 ? 8 : (c.type == kFloat32 ? 4 : 2);
  const double scale = 1.0 / std::sqrt(double(c.hidden));
  std::vector<std::vector<unsigned char>> weights;
  EmuLayer layer{};
  for (int64_t d = 0; d < c.directions; ++d) {
    weights.push_back(random_buffer(c.type, c.hidden * kInputSize, 0.5, generator));
    weights.push_back(random_buffer(c.type, c.hidden * c.hidden, scale, generator));
    weights.push_back(random_buffer(c.type, c.hidden, 0.3, generator));
    weights.push_back(random_buffer(c.type, c.hidden, 0.3, generator));
  }
  for (size_t i = 0; i < weights.size(); ++i) layer.weights[i] = weights[i].data();
  const auto input = random_buffer(c.type, rows * kInputSize, 1.0, generator);
  const auto hx = random_buffer(c.type, states, 0.7, generator);
  const auto grad_output = random_buffer(c.type, rows * width, 1.0, generator);
  const auto grad_h_n = random_buffer(c.type, states, 1.0, generator);
  layer.scalar_type = c.type;
  layer.regime = c.regime;
  layer.max_slice_width = c.max_slice;
  layer.has_bias = 1;
  layer.packed = c.packed ? 1 : 0;
  layer.steps = kSteps;
  layer.batch = c.batch;
  layer.rows = rows;
  layer.input_size = kInputSize;
  layer.hidden = c.hidden;
  layer.directions = c.directions;
  layer.batch_sizes = batch_sizes.data();
  layer.input = input.data();
  layer.hx = hx.data();
  Result r;
  r.output.assign(rows * width * element, 0);
  r.final_state.assign(hx.size(), 0);
  r.grad_input.assign(input.size(), 0);
  r.grad_hx.assign(hx.size(), 0);
  const int64_t per_direction = c.hidden * (kInputSize + c.hidden + 1);
  r.grad_weights.assign(c.directions * per_direction * element, 0);
  void* grad_weights[6] = {};
  for (int64_t d = 0; d < c.directions; ++d) {
    unsigned char* base = r.grad_weights.data() + d * per_direction * element;
    grad_weights[3 * d] = base;
    grad_weights[3 * d + 1] = base + c.hidden * kInputSize * element;
    grad_weights[3 * d + 2] = base + c.hidden * (kInputSize + c.hidden) * element;
  }
  int64_t plan[16];
  char error[256] = "";
  // One device per SM count (the launch code caches a device's limits); defining it makes it
  // current.
  expect(emu_define_device(c.sm_count, c.sm_count, 48 * 1024, 64 * 1024, 1) == 0, "device", c.name);
  int code = emu_layer_forward(&layer, r.output.data(), r.final_state.data(), plan, error, 256);
  expect(code == 0 && plan[0] == c.regime, "forward", c.name);
  code = emu_layer_backward(&layer, grad_output.data(), grad_h_n.data(), r.output.data(),
                            r.grad_input.data(), r.grad_hx.data(), grad_weights, plan, error, 256);
  expect(code == 0 && plan[0] == c.regime, "backward", c.name);
  if (error[0] != '\0') std::printf("  %s\n", error);
  const char* regime = c.regime == kCooperative
                           ? "cooperative"
                           : (c.regime == kStepGemm ? "step_gemm" : "single_block");
  std::printf("ran %s: %s, %lld slices x %lld groups, %lld threads per block\n", c.name, regime,
              (long long)plan[3], (long long)plan[5], (long long)plan[7]);
  return r;
}

}  // namespace

int main() {
  const Case cases[] = {
      {"single_h21_packed", 8, kSingleBlock, 0, kFloat64, 3, 21, 2, true},
      {"single_tile8_h40", 2, kSingleBlock, 0, kFloat16, 9, 40, 2, false},
      {"coop_h21_packed", 8, kCooperative, 7, kFloat64, 3, 21, 2, true},
      {"coop_slices_groups", 16, kCooperative, 8, kFloat32, 12, 21, 2, true},
      {"coop_separate", 4, kCooperative, 8, kFloat16, 4, 21, 2, false},
      {"coop_tiles_per_block", 4, kCooperative, 12, kFloat32, 20, 24, 1, false},
      {"step_gemm_h21_packed", 8, kStepGemm, 0, kFloat32, 23, 21, 2, true},
      {"step_gemm_h16_float16", 8, kStepGemm, 0, kFloat16, 5, 16, 2, false},
  };
  std::vector<Result> results;
  for (const Case& c : cases) results.push_back(run_case(c));
  // The same float64 shape through both regimes: the same numbers, bit for bit (same k-split).
  expect(results[0].output == results[2].output &&
             results[0].final_state == results[2].final_state &&
             results[0].grad_input == results[2].grad_input &&
             results[0].grad_hx == results[2].grad_hx &&
             results[0].grad_weights == results[2].grad_weights,
         "single-block and cooperative results differ", "single_h21_packed vs coop_h21_packed");
  std::printf("%s\n", failures == 0 ? "all cases ran" : "FAILED");
  return failures == 0 ? 0 : 1;
}
