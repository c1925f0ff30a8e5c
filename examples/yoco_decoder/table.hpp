// The table (yoco_decoder --table): decoding step time of each variant at a set of
// contexts and batch sizes, the KV memory per sequence, the largest batch that fits the device and
// the throughput there, and the ratios beside the paper's. Contexts are filled by
// Decoder::join_synthetic (no prefill: a step's time depends on the lengths, not on the values).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "cuda_support.hpp"
#include "decoder.hpp"
#include "model.hpp"

namespace yoco {

struct TableOptions {
  std::vector<std::int64_t> contexts = {32768, 131072, 524288};
  std::vector<int> batches = {1, 8, 32};
  int warmup = 3;  // untimed steps first (the first captures the step's graphs)
  int steps = 10;  // timed steps: the median is reported
  /// Also run each variant at the largest batch that fits the device (at most this many; 0: no).
  int max_batch_cap = 512;
  /// Memory kept free when sizing the largest batch (graphs, cuBLAS, lazily loaded kernels).
  std::size_t headroom_bytes = std::size_t{3} << 30;
};

/// What the table needs of the device (both empty on the CPU: no largest batch there).
struct DeviceProbe {
  /// Free device memory now.
  std::function<std::size_t()> free_memory;
  /// Clears the error that a refused allocation leaves behind (the runtime's last error), after
  /// the table has tried a batch that does not fit.
  std::function<void()> forget_failed_allocation;
};

/// Runs and prints the table. `weights` must hold the standard Transformer's projections when
/// `variants` has it. Timing: events on `lane` (CUDA) or the wall clock (CPU), per step, medians.
void run_table(const TableOptions& options, const ModelWeights& weights, DecoderOps& ops,
               const cuda_support::OwnedStream& lane, const RoutingOptions& routing,
               const std::vector<Variant>& variants, bool graphs, const DeviceProbe& device);

}  // namespace yoco
