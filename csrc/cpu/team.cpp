// The per-phase counters of team.h.
#include "team.h"

namespace rnn_ext {
namespace cpu {
namespace {

std::array<PhaseCounters, kPhaseCount> counters;

}  // namespace

const char* phase_name(Phase phase) {
  switch (phase) {
    case Phase::InputProjection:
      return "input_projection";
    case Phase::ForwardRecurrence:
      return "forward_recurrence";
    case Phase::BackwardRecurrence:
      return "backward_recurrence";
    case Phase::InputGradient:
      return "input_gradient";
    case Phase::WeightGradient:
      return "weight_gradient";
    case Phase::Count:
      break;
  }
  return "unknown";
}

PhaseCounters& phase_counters(Phase phase) { return counters[static_cast<int>(phase)]; }

void reset_phase_counters() {
  for (auto& c : counters) {
    c.calls.store(0);
    c.nanoseconds.store(0);
    c.thread_mask.store(0);
  }
}

}  // namespace cpu
}  // namespace rnn_ext
