// The limits of one emulated device: what the runtime calls of the emulation report for it.
#pragma once

#include <cstdint>

namespace cuda_emulation {

// Defaults: a small device, so that plans spread over several blocks at test sizes.
struct EmulatedDevice {
  int sm_count = 8;
  int64_t shared_memory_per_block_optin = 48 * 1024;
  int64_t shared_memory_per_sm = 64 * 1024;
  bool cooperative_launch = true;
  int max_threads_per_block = 1024;
  int max_threads_per_sm = 2048;
  int64_t registers_per_sm = 65536;
  int max_blocks_per_sm = 32;
};

// Adds or replaces device `index`. A device's limits are read once by the code under test and
// cached, so a test that needs other limits defines another index.
void define_device(int index, const EmulatedDevice& device);

}  // namespace cuda_emulation
