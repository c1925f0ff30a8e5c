// What the indexer's two passes share (indexer_scores.cu: the score pass and the first radix
// histogram; indexer_select.cu: the exact radix select): tile sizes, the workspace layout, the
// kernels' parameters, the routing-key digits and the threshold-bin search.
#pragma once

#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "common.cuh"
#include "kernels.hpp"

namespace clsa {
namespace cuda_kernels {
namespace indexer {

constexpr int kBins = 2048;
constexpr int kScoreThreads = 128;
constexpr int kTokensPerWarp = 64;
constexpr int kScoreTile = kTokensPerWarp * kScoreThreads / 32;  // 256 positions per CTA
constexpr int kQueryBudget = 32 * 1024;                          // shared memory for queries
constexpr int kFilterThreads = 256;
constexpr int kFilterTile = 4096;

/// Workspace layout (all offsets 256-byte aligned).
struct Workspace {
  std::int64_t stride;  // scores / candidate row stride (positions)
  std::size_t scores, hist0, hist1, counters, bitmap, candidates, spare, end;

  Workspace(int rows, std::int64_t max_length) {
    auto align = [](std::size_t x) { return (x + 255) / 256 * 256; };
    stride = ceil_div(std::max<std::int64_t>(max_length, 1), 64) * 64;
    const std::size_t r = static_cast<std::size_t>(rows);
    const std::size_t row_bytes = static_cast<std::size_t>(stride) * 4;
    scores = 0;
    hist0 = align(scores + r * row_bytes);
    hist1 = hist0 + r * kBins * 4;
    counters = hist1 + r * kBins * 4;
    bitmap = counters + r * 4 * 4;
    candidates = align(bitmap + r * static_cast<std::size_t>(stride / 32) * 4);
    spare = align(candidates + 2 * r * row_bytes);  // 64-bit keys
    end = align(spare + 2 * r * row_bytes);
  }
};

struct SelectParams {
  IndexerArgs a;
  int page_shift;
  int rows_per_block;  // query tokens per score CTA (grid.z = ceil(T / rows_per_block))
  int padded_heads;    // heads rounded up to 16 (mma path)
  std::int64_t stride;
  float* scores;              // [rows][stride]
  unsigned* hist0;            // [rows][kBins]
  unsigned* hist1;            // [rows][kBins]
  unsigned* counters;         // [rows][4]: selected above the threshold bin, candidates
  unsigned* bitmap;           // [rows][stride / 32]: the routed set, to write it in position order
  std::uint64_t* candidates;  // [rows][stride]: routing keys of the threshold bin's members
  std::uint64_t* spare;       // [rows][stride]
};

/// Length of sequence b as the plan sees it: one longer than the plan's max_length counts as
/// empty (the finish kernel reports it), so no kernel reads or writes past the planned rows.
__device__ __forceinline__ int planned_length(const IndexerArgs& a, int b) {
  const int length = paged_length(a.page_indptr, a.last_page_lengths, a.layout.page_size, b);
  return length <= a.max_length ? length : 0;
}

/// What a query row must do: its visible length and the candidate range between sinks and window.
struct RowPlan {
  int visible, sink_end, window_begin, forced, needed;
  bool selects;  // false when every visible position is routed (or sinks + window fill top_k)

  __device__ RowPlan(const IndexerArgs& a, int b, int t) {
    visible = visible_length(planned_length(a, b), a.tokens, t);
    sink_end = min(a.sinks, visible);
    window_begin = max(sink_end, visible - a.window);
    forced = sink_end + (visible - window_begin);
    needed = a.top_k - forced;
    selects = visible > a.top_k && needed > 0;
  }
};

__device__ __forceinline__ float relu_keep_nan(float x) {
  return x < 0.0f ? 0.0f : x;
}

/// Radix digit `level` of a routing key: 11, 11, 10 bits of the score key, then 11, 11, 10 bits
/// of the position part.
__device__ __forceinline__ int digit(std::uint64_t key, int level) {
  switch (level) {
    case 0:
      return static_cast<int>(key >> 53);
    case 1:
      return static_cast<int>((key >> 42) & 0x7ff);
    case 2:
      return static_cast<int>((key >> 32) & 0x3ff);
    case 3:
      return static_cast<int>((key >> 21) & 0x7ff);
    case 4:
      return static_cast<int>((key >> 10) & 0x7ff);
    default:
      return static_cast<int>(key & 0x3ff);
  }
}

/// A histogram's bins as one thread of a block holds them for threshold_bin: kBins / Threads
/// consecutive bins, in descending bin order.
template <int Threads>
struct HistogramSlice {
  int counts[kBins / Threads];
  __device__ void load(const unsigned* histogram) {
#pragma unroll
    for (int i = 0; i < kBins / Threads; ++i) {
      counts[i] = static_cast<int>(histogram[kBins - 1 - (threadIdx.x * (kBins / Threads) + i)]);
    }
  }
};

/// Threshold bin of a histogram: the bin where, counting from the top, `needed` is reached.
/// Returns the bin and, in `above`, how many lie in higher bins. Every thread of the block gets
/// the answer. `shared_result` holds two ints.
template <int Threads>
__device__ int threshold_bin(const HistogramSlice<Threads>& slice, int needed, int* above, int* shared_result,
                             typename cub::BlockScan<int, Threads>::TempStorage& scan_storage) {
  constexpr int kPerThread = kBins / Threads;
  if (threadIdx.x == 0) {
    shared_result[0] = 0;  // only reached if the histogram holds fewer than `needed` (a bug)
    shared_result[1] = 0;
  }
  int local = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) local += slice.counts[i];
  int before = 0;
  cub::BlockScan<int, Threads>(scan_storage).ExclusiveSum(local, before);  // its barrier orders the reset
  int running = before;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    if (running < needed && running + slice.counts[i] >= needed) {
      shared_result[0] = kBins - 1 - (static_cast<int>(threadIdx.x) * kPerThread + i);
      shared_result[1] = running;
    }
    running += slice.counts[i];
  }
  __syncthreads();
  *above = shared_result[1];
  const int bin = shared_result[0];
  __syncthreads();
  return bin;
}

template <int Threads>
__device__ int threshold_bin(const unsigned* histogram, int needed, int* above, int* shared_result,
                             typename cub::BlockScan<int, Threads>::TempStorage& scan_storage) {
  HistogramSlice<Threads> slice;
  slice.load(histogram);
  return threshold_bin<Threads>(slice, needed, above, shared_result, scan_storage);
}

// ---------------------------------------------------------------- score pass

/// Launches the selection passes (filter_kernel, finish_kernel) of one select() over `rows`
/// query rows and sequences of up to `max_length` positions; as programmatic dependents of the
/// kernel before each when `dependent`.
void launch_select(const SelectParams& p, int rows, std::int64_t max_length, bool dependent, cudaStream_t stream);
/// Whether both selection kernels can run as programmatic dependents on the current device.
bool select_dependent_launch_ready();

}  // namespace indexer
}  // namespace cuda_kernels
}  // namespace clsa
