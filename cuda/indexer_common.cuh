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

/// Workspace layout: the scores of every row (the select passes read them from L2).
struct Workspace {
  std::int64_t stride;  // scores row stride (positions)
  std::size_t scores, end;

  Workspace(int rows, std::int64_t max_length) {
    stride = ceil_div(std::max<std::int64_t>(max_length, 1), 64) * 64;
    scores = 0;
    end = (static_cast<std::size_t>(rows) * static_cast<std::size_t>(stride) * 4 + 255) / 256 * 256;
  }
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
