// What the indexer's two passes share (indexer_scores.cu: the score pass; indexer_select.cu: the
// exact radix select on thread-block clusters and the gather of the routed K/V rows): tile sizes,
// the workspace layout and the kernels' parameters.
#pragma once

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
constexpr int kSelectThreads = 1024;  // twice the warps of 512 x 16 to hide the latency of the histograms
constexpr int kSelectItems = 8;       // scores per thread and tile, in registers
constexpr int kSelectTile = kSelectThreads * kSelectItems;  // 8192 positions per CTA and pass
constexpr int kMaxCluster = 16;                             // CTAs per row (a Hopper cluster)

/// Workspace layout: the scores of every row (the select passes read them from L2), then every
/// row's first radix histogram (kBins counts; SelectParams::histograms), zero between calls.
struct Workspace {
  std::int64_t stride;  // scores row stride (positions)
  std::size_t scores, histograms, end;

  Workspace(int rows, std::int64_t max_length) {
    stride = ceil_div(std::max<std::int64_t>(max_length, 1), 64) * 64;
    scores = 0;
    histograms = aligned(scores + static_cast<std::size_t>(rows) * static_cast<std::size_t>(stride) * 4);
    end = aligned(histograms + static_cast<std::size_t>(rows) * kBins * sizeof(unsigned));
  }
  static std::size_t aligned(std::size_t bytes) { return (bytes + 255) / 256 * 256; }
};

struct SelectParams {
  IndexerArgs a;
  int page_shift;
  int rows_per_block;  // query tokens per score CTA (grid.z = ceil(T / rows_per_block))
  int padded_heads;    // heads rounded up to 16 (mma path)
  int cluster;         // select CTAs per row (grid.x), one thread-block cluster when > 1
  int element_bytes;   // of the cache's dtype
  std::int64_t stride;
  float* scores;  // [rows][stride]
  // [rows][kBins]: the first radix level's histogram of each row's candidate scores (digit
  // score_key >> 21), added up by the score pass and returned to zero by the select kernel; nullptr
  // when the score pass does not build them this call (several query rows per score CTA, or f32
  // keys): the select kernel then builds level 0 itself.
  unsigned* histograms;
};

/// Length of sequence b as the plan sees it: one longer than the plan's max_length counts as
/// empty (the select kernel reports it), so no kernel reads or writes past the planned rows.
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
    needed = a.routing.rows.top_k - forced;
    selects = visible > a.routing.rows.top_k && needed > 0;
  }
};

/// Digit of `key` at radix level `level`: bits 31..21, 20..10, 9..0 (the select kernel's levels;
/// the score pass counts level 0's).
__device__ __forceinline__ int level_digit(unsigned key, int level) {
  return level == 0   ? static_cast<int>(key >> 21)
         : level == 1 ? static_cast<int>((key >> 10) & 0x7ffu)
                      : static_cast<int>(key & 0x3ffu);
}

/// Adds 1 to hist[bin] for every lane with `take`; lanes of the warp with the same bin add once
/// (score keys crowd into few bins: plain shared atomics would serialise on them). Warp-collective:
/// every lane of the warp calls it.
__device__ __forceinline__ void add_to_histogram(unsigned* hist, int bin, bool take) {
  const unsigned active = __ballot_sync(kFullMask, take);
  if (!take) return;
  const unsigned same = __match_any_sync(active, bin);
  if (static_cast<int>(threadIdx.x % 32) == __ffs(static_cast<int>(same)) - 1) {
    atomicAdd(&hist[bin], static_cast<unsigned>(__popc(same)));
  }
}

__device__ __forceinline__ float relu_keep_nan(float x) {
  return x < 0.0f ? 0.0f : x;
}

/// Launches the selection of one select() over `rows` query rows (as a programmatic dependent of
/// the score pass when `dependent`) and, when the routing has a kv block, the gather of the routed
/// K/V rows.
void launch_select(const SelectParams& p, int rows, bool dependent, cudaStream_t stream);
/// Whether the select kernel can run as a programmatic dependent on the current device.
bool select_dependent_launch_ready();
/// CTAs per row of the select kernel for rows of up to `max_length` positions on the current
/// device: a power of two up to kMaxCluster where thread-block clusters run (sm_90 code on a
/// compute capability 9.0+ device), else 1. Also sets the kernel's cluster attributes.
int plan_select_cluster(std::int64_t max_length);
/// Whether gather_kernel copies rows of `dim` elements of `dtype` (16-byte vectors, 8..64 per row).
bool gather_supported(DType dtype, int dim);

}  // namespace indexer
}  // namespace cuda_kernels
}  // namespace clsa
