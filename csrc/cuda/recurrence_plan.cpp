// The recurrence planner: which regime runs a layer on a device and with what block shape. Pure
// arithmetic on the problem and the device limits; the one question it cannot answer alone (how
// many blocks an SM holds) comes from the launch side through ResidentBlocks.
#include "recurrence_plan.h"

#include <algorithm>

namespace rnn_ext {
namespace gpu {
namespace {

int smallest_tile_at_least(int64_t rows) {
  for (const int tile : kBatchTiles) {
    if (tile >= rows) return tile;
  }
  return kBatchTiles[sizeof(kBatchTiles) / sizeof(kBatchTiles[0]) - 1];
}

// Warps splitting one unit's dot product: as many as the block allows, but each keeps at least 16
// rows of A (4 quads) so that the reduction does not outweigh the product.
int k_split_for(int slice_width, int64_t hidden) {
  const int unit_groups = static_cast<int>(ceil_div(slice_width, kWarpSize));
  const int most = std::max(1, kMaxWarps / unit_groups);
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(most, ceil_div(round_up(hidden, 4), 16))));
}

int threads_for(int slice_width, int k_split) {
  return static_cast<int>(ceil_div(slice_width, kWarpSize)) * kWarpSize * k_split;
}

// Finds the widest k-split (at most k_split_for) for which a block of `slice_width` units and a
// register tile of `tile` rows fits in shared memory, with the tile small enough for the finishing
// phase's slots. Returns false when none does.
bool fit_block(const RecurrenceProblem& problem, const DeviceLimits& limits, int slice_width,
               int tile, RecurrencePlan& plan) {
  const int unit_groups = static_cast<int>(ceil_div(slice_width, kWarpSize));
  if (unit_groups > kMaxWarps) return false;
  for (int k_split = k_split_for(slice_width, problem.hidden); k_split >= 1; --k_split) {
    const int threads = threads_for(slice_width, k_split);
    if (int64_t(tile) * slice_width > int64_t(kPostSlots) * threads)
      return false;  // fewer warps: worse
    const int64_t bytes =
        shared_layout(problem.hidden, slice_width, tile, k_split,
                      element_bytes(problem.scalar_type), accumulator_bytes(problem.scalar_type))
            .total();
    if (bytes > limits.shared_memory_per_block_optin) continue;
    plan.batch_tile = tile;
    plan.k_split = k_split;
    plan.threads = threads;
    plan.shared_bytes = bytes;
    return true;
  }
  return false;
}

RecurrencePlan plan_single_block(const RecurrenceProblem& problem, const DeviceLimits& limits) {
  RecurrencePlan plan;
  plan.regime = Regime::SingleBlock;
  if (problem.hidden > int64_t(kMaxWarps) * kWarpSize) {
    plan.rejected = "hidden_size is larger than one block's units (512)";
    return plan;
  }
  const int width = static_cast<int>(problem.hidden);
  // Enough rows per block that all blocks run at once, and at least 4 where the batch has them:
  // up to 4 rows cost about the same per step as 1, since reading W_hh from shared memory is the
  // bound there.
  const int64_t rows_for_one_wave = ceil_div(problem.batch * problem.directions, limits.sm_count);
  int tile = smallest_tile_at_least(
      std::max<int64_t>(rows_for_one_wave, std::min<int64_t>(problem.batch, 4)));
  while (tile >= 1 && !fit_block(problem, limits, width, tile, plan)) tile /= 2;
  if (tile < 1) {
    plan.rejected = "W_hh does not fit in one block's shared memory on this device";
    return plan;
  }
  plan.slice_width = width;
  plan.slices = 1;
  plan.rows_per_group = plan.batch_tile;
  plan.groups = static_cast<int>(ceil_div(problem.batch, plan.batch_tile));
  plan.launch_directions = static_cast<int>(problem.directions);
  plan.rejected = nullptr;
  return plan;
}

RecurrencePlan plan_cooperative(const RecurrenceProblem& problem, const DeviceLimits& limits,
                                int max_slice_width, const ResidentBlocks& resident_blocks) {
  RecurrencePlan plan;
  plan.regime = Regime::Cooperative;
  if (!limits.cooperative_launch) {
    plan.rejected = "the device does not support cooperative launches";
    return plan;
  }
  const int64_t hidden = problem.hidden;
  // Both directions in one grid when the chip holds both; else one launch per direction.
  for (int launch_directions = static_cast<int>(problem.directions); launch_directions >= 1;
       --launch_directions) {
    const int64_t budget = limits.sm_count / launch_directions;  // one block per SM
    if (budget < 1) continue;  // fewer SMs than directions: one launch per direction
    const int64_t narrowest = ceil_div(hidden, budget);
    // A warp's 32 lanes span 32 units: slices narrower than that leave lanes idle, so the
    // preferred width is 32 (or all of H), widened only when the chip has too few SMs for it.
    int64_t widest = std::max<int64_t>(narrowest, std::min<int64_t>(hidden, kWarpSize));
    if (max_slice_width > 0) widest = std::min<int64_t>(widest, max_slice_width);
    if (widest < narrowest || widest > int64_t(kMaxWarps) * kWarpSize) continue;
    // The largest register tile first (each extra tile per step restages the states and rereads
    // A), then the widest slice that fits with it (fewer slices: less L2 traffic per step).
    RecurrencePlan candidate = plan;
    bool fitted = false;
    for (int tile = smallest_tile_at_least(problem.batch); tile >= 1 && !fitted; tile /= 2) {
      for (int64_t width = widest; width >= narrowest && !fitted; --width) {
        fitted = fit_block(problem, limits, static_cast<int>(width), tile, candidate);
        if (fitted) candidate.slice_width = static_cast<int>(width);
      }
    }
    if (!fitted) continue;
    // Same number of slices, spread evenly; the narrower block is refitted (its thread count and
    // shared memory follow its width), keeping the first fit if the refit fails.
    candidate.slices = static_cast<int>(ceil_div(hidden, candidate.slice_width));
    const int even_width = static_cast<int>(ceil_div(hidden, candidate.slices));
    if (even_width != candidate.slice_width) {
      RecurrencePlan refit = candidate;
      if (fit_block(problem, limits, even_width, candidate.batch_tile, refit)) {
        candidate = refit;
        candidate.slice_width = even_width;
      }
    }
    const int blocks_per_sm = resident_blocks(problem.scalar_type, candidate.batch_tile,
                                              candidate.threads, candidate.shared_bytes);
    const int64_t resident = int64_t(blocks_per_sm) * limits.sm_count / launch_directions;
    if (resident < candidate.slices) continue;
    // Spare SMs take batch groups, each of at least one register tile of rows.
    const int64_t spare = std::min<int64_t>(budget, resident) / candidate.slices;
    const int64_t groups = std::max<int64_t>(
        1, std::min<int64_t>(spare, ceil_div(problem.batch, candidate.batch_tile)));
    candidate.rows_per_group = static_cast<int>(ceil_div(problem.batch, groups));
    candidate.groups = static_cast<int>(ceil_div(problem.batch, candidate.rows_per_group));
    candidate.launch_directions = launch_directions;
    candidate.rejected = nullptr;
    return candidate;
  }
  plan.rejected = "W_hh does not fit in the shared memory of the co-resident blocks of this device";
  return plan;
}

}  // namespace

const char* regime_name(Regime regime) {
  switch (regime) {
    case Regime::Auto:
      return "auto";
    case Regime::SingleBlock:
      return "single_block";
    case Regime::Cooperative:
      return "cooperative";
    case Regime::StepGemm:
      return "step_gemm";
  }
  return "unknown";
}

RecurrencePlan plan_recurrence(const RecurrenceProblem& problem, const DeviceLimits& limits,
                               const CudaOptions& options, const ResidentBlocks& resident_blocks) {
  const Regime requested = options.regime;
  if (requested == Regime::SingleBlock) return plan_single_block(problem, limits);
  if (requested == Regime::Cooperative) {
    return plan_cooperative(problem, limits, options.max_slice_width, resident_blocks);
  }
  if (requested == Regime::Auto) {
    RecurrencePlan plan = plan_single_block(problem, limits);
    if (plan.rejected == nullptr) return plan;
    plan = plan_cooperative(problem, limits, options.max_slice_width, resident_blocks);
    if (plan.rejected == nullptr) return plan;
  }
  RecurrencePlan plan;
  plan.regime = Regime::StepGemm;
  plan.launch_directions = 1;
  return plan;
}

int64_t exchange_bytes(const RecurrenceProblem& problem) {
  return 2 * problem.directions * problem.batch * problem.hidden *
         accumulator_bytes(problem.scalar_type);
}

}  // namespace gpu
}  // namespace rnn_ext
