// The ThreadSanitizer run of the emulated kernels (make check-cuda-races): every kernel and regime
// on small shapes, forward and backward, padded and packed. With barriers as the only
// synchronisation between emulated threads, a missing __syncthreads or grid sync shows up as a TSan
// data race. The numbers are checked by tests/test_cuda_emulation.py; here the regimes only have to
// agree.
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

extern "C" {
int emu_define_device(int index, int sm_count, int64_t shared_per_block_optin,
                      int64_t shared_per_sm, int cooperative_launch);
int emu_run_recurrence(int scalar_type, int relu, int backward, int64_t steps, int64_t batch,
                       int64_t hidden, int64_t directions, const int64_t* batch_sizes,
                       const int64_t* step_offsets, const void* weight_hh0, const void* weight_hh1,
                       const void* initial, void* final_state, void* sequence,
                       const void* grad_output, const void* output, int regime, int max_slice_width,
                       int64_t* plan_out);
int emu_step_activation(int scalar_type, int relu, void* sequence, int64_t row_offset, int64_t rows,
                        int64_t hidden, int64_t directions, int64_t direction, void* final_state,
                        int64_t first_final_row);
int emu_step_gradient(int scalar_type, int relu, void* grad_pre, const void* grad_output,
                      const void* output, int64_t row_offset, int64_t rows, int64_t hidden,
                      int64_t directions, int64_t direction, const void* carry,
                      const void* grad_final, int64_t first_final_row);
int emu_gather_previous_states(int scalar_type, void* previous, const void* output, const void* hx,
                               const int64_t* batch_sizes, const int64_t* step_offsets,
                               int64_t steps, int64_t batch, int64_t hidden, int64_t directions);
}

namespace {

enum ScalarType { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2 };
enum Regime { kSingleBlock = 1, kCooperative = 2 };
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
  std::vector<unsigned char> output, final_state, grad_pre, grad_hx;
};

int failures = 0;

void expect(bool ok, const char* what, const char* name) {
  if (ok) return;
  std::printf("FAIL %s: %s\n", name, what);
  ++failures;
}

Result run_case(const Case& c) {
  std::mt19937 generator(12345);  // same data for every regime of one shape
  std::vector<int64_t> batch_sizes(kSteps, c.batch), offsets(kSteps);
  if (c.packed) {
    for (int64_t t = 0; t < kSteps; ++t) batch_sizes[t] = std::max<int64_t>(1, c.batch - t);
  }
  int64_t rows = 0;
  for (int64_t t = 0; t < kSteps; ++t) offsets[t] = rows, rows += batch_sizes[t];
  const int64_t width = c.directions * c.hidden;
  const int64_t states = c.directions * c.batch * c.hidden;
  const auto weights0 =
      random_buffer(c.type, c.hidden * c.hidden, 1.0 / std::sqrt(double(c.hidden)), generator);
  const auto weights1 =
      random_buffer(c.type, c.hidden * c.hidden, 1.0 / std::sqrt(double(c.hidden)), generator);
  const auto hx = random_buffer(c.type, states, 0.7, generator);
  const auto grad_output = random_buffer(c.type, rows * width, 1.0, generator);
  const auto grad_h_n = random_buffer(c.type, states, 1.0, generator);
  Result r;
  r.output = random_buffer(c.type, rows * width, 0.7, generator);
  r.final_state.assign(hx.size(), 0);
  r.grad_pre.assign(r.output.size(), 0);
  r.grad_hx.assign(hx.size(), 0);
  const int64_t* sizes = c.packed ? batch_sizes.data() : nullptr;
  const int64_t* starts = c.packed ? offsets.data() : nullptr;
  int64_t plan[16];
  // One device per SM count (the launch code caches a device's limits); defining it makes it
  // current.
  expect(emu_define_device(c.sm_count, c.sm_count, 48 * 1024, 64 * 1024, 1) == 0, "device", c.name);
  int code =
      emu_run_recurrence(c.type, 0, 0, kSteps, c.batch, c.hidden, c.directions, sizes, starts,
                         weights0.data(), weights1.data(), hx.data(), r.final_state.data(),
                         r.output.data(), nullptr, nullptr, c.regime, c.max_slice, plan);
  expect(code == 0 && plan[0] == c.regime, "forward launch", c.name);
  code = emu_run_recurrence(c.type, 0, 1, kSteps, c.batch, c.hidden, c.directions, sizes, starts,
                            weights0.data(), weights1.data(), grad_h_n.data(), r.grad_hx.data(),
                            r.grad_pre.data(), grad_output.data(), r.output.data(), c.regime,
                            c.max_slice, plan);
  expect(code == 0 && plan[0] == c.regime, "backward launch", c.name);
  std::printf("ran %s: %s, %lld slices x %lld groups, %lld threads per block\n", c.name,
              c.regime == kCooperative ? "cooperative" : "single_block", (long long)plan[3],
              (long long)plan[5], (long long)plan[7]);
  return r;
}

void run_pointwise() {
  std::mt19937 generator(7);
  const int64_t rows = 23, hidden = 21, directions = 2;
  auto sequence = random_buffer(kFloat32, rows * directions * hidden, 1.0, generator);
  auto final_state = random_buffer(kFloat32, rows * hidden, 1.0, generator);
  expect(emu_step_activation(kFloat32, 0, sequence.data(), 0, rows, hidden, directions, 1,
                             final_state.data(), 5) == 0,
         "step activation", "pointwise");
  const auto grad_output = random_buffer(kFloat32, rows * directions * hidden, 1.0, generator);
  const auto carry = random_buffer(kFloat32, rows * hidden, 1.0, generator);
  const auto grad_final = random_buffer(kFloat32, rows * hidden, 1.0, generator);
  auto grad_pre = random_buffer(kFloat32, rows * directions * hidden, 1.0, generator);
  expect(emu_step_gradient(kFloat32, 1, grad_pre.data(), grad_output.data(), sequence.data(), 0,
                           rows, hidden, directions, 0, carry.data(), grad_final.data(), 7) == 0,
         "step gradient", "pointwise");
  const int64_t steps = 5, batch = 6;
  std::vector<int64_t> sizes = {6, 5, 5, 3, 1}, offsets = {0, 6, 11, 16, 19};
  const auto output = random_buffer(kFloat16, 20 * directions * hidden, 1.0, generator);
  const auto hx = random_buffer(kFloat16, directions * batch * hidden, 1.0, generator);
  auto previous = random_buffer(kFloat16, 20 * directions * hidden, 1.0, generator);
  expect(
      emu_gather_previous_states(kFloat16, previous.data(), output.data(), hx.data(), sizes.data(),
                                 offsets.data(), steps, batch, hidden, directions) == 0,
      "gather", "pointwise");
  std::printf("ran pointwise: step activation, step gradient, gather\n");
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
  };
  std::vector<Result> results;
  for (const Case& c : cases) results.push_back(run_case(c));
  // The same float64 shape through both regimes: the same numbers, bit for bit (same k-split).
  expect(results[0].output == results[2].output &&
             results[0].final_state == results[2].final_state &&
             results[0].grad_pre == results[2].grad_pre && results[0].grad_hx == results[2].grad_hx,
         "single-block and cooperative results differ", "single_h21_packed vs coop_h21_packed");
  run_pointwise();
  std::printf("%s\n", failures == 0 ? "all cases ran" : "FAILED");
  return failures == 0 ? 0 : 1;
}
