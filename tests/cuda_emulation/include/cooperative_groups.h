// Stand-in for CUDA's cooperative_groups.h in the host emulation: the grid group's sync() is a
// barrier over every emulated thread of a cooperative launch.
#pragma once

#include "../cuda_emulation.h"

namespace cooperative_groups {

struct grid_group {
  void sync() const { ::cuda_emulation::grid_sync(); }
};

inline grid_group this_grid() { return grid_group{}; }

}  // namespace cooperative_groups
