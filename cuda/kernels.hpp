// Host-side entry points of libclsa's CUDA kernels (defined in cuda/*.cu), called by the CUDA
// backend (cuda/backend.cpp) after the components have checked every argument.
//
// Plans. A component makes a plan once from its bounds (max sequences, max query tokens, max
// length or top_k): the plan fixes the kernel variant, the grids, the split counts for every
// batch size within the bounds and the workspace layout. Every later call inside the bounds runs
// on that plan: launch sizes never depend on the host lengths of the moment, so a step captured
// in a CUDA graph stays valid while the contexts grow (up to the planned length).
//
// The workspace invariant (the one place it is stated): the counters in a plan's workspace (the
// attention's split tickets; the indexer's first-level row histograms, which the score pass fills
// and the select kernel empties) are zero between calls. The component zeroes the whole workspace when it adopts a plan
// (reserve, set_workspace, or an automatic plan for an unreserved component); every kernel that raises a counter
// returns it to zero before the call ends, for every row it touched. The layout never moves while the plan holds, so no
// call depends on what an earlier call of another batch size left behind.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "clsa/cache.hpp"
#include "clsa/paged_view.hpp"

namespace clsa {
namespace cuda_kernels {

/// What kernels report that the host could not check before it launched them (a CUDA-graph
/// replay runs no host code): the first report wins. Lives in host-mapped pinned memory, so the
/// host reads it without a copy once the reporting kernel has finished.
struct RunStatus {
  enum Code : unsigned { fine = 0, length_beyond_plan = 1 };
  unsigned code;
  int sequence;  // batch index of the offending sequence
  int length;    // its length
  int limit;     // the plan's bound it exceeds
};

/// Copy of `tokens` new tokens of one sequence into its pages. Positions
/// [first_position, first_position + tokens) must lie in `pages` (the sequence's pages from
/// first_page on: position p is in pages[(p >> log2(page_size)) - first_page]).
struct AppendArgs {
  static constexpr int kMaxPages = 32;
  PagedCacheLayout layout;
  const void* k;
  std::int64_t k_token_stride, k_head_stride;
  const void* v;
  std::int64_t v_token_stride, v_head_stride;
  const void* index_keys;
  std::int64_t index_token_stride;
  std::int64_t first_position;
  int tokens;
  int first_page;
  std::int32_t pages[kMaxPages];
};
void append_tokens(const AppendArgs& args, cudaStream_t stream);

/// The indexer's plan: its bounds and the workspace layout (the same for every key dtype).
struct IndexerPlan {
  int max_sequences = 0, max_tokens = 0;
  std::int64_t max_length = 0;    // the longest sequence a call may hold
  std::int64_t stride = 0;        // positions per scores row
  std::size_t bytes = 0;          // workspace bytes
  bool dependent_launch = false;  // the select kernel launches as a programmatic dependent (sm_90)
  bool score_dependent = false;   // the score pass too, of the kernel before select() (IndexerConfig::enable_pdl)
  int cluster = 1;                // select CTAs per query row (a thread-block cluster when > 1)
};
/// Throws Error(capacity_exceeded) for bounds whose grids would not fit the launch limits. Sets
/// the score kernels' shared-memory limits on the current device.
IndexerPlan plan_indexer(int max_sequences, int max_tokens, std::int64_t max_length, int heads, int dim,
                         bool enable_pdl);
/// Whether a score kernel exists for keys of `dtype` and `dim` (else select() is unsupported).
bool indexer_supports(DType dtype, int dim);
/// Whether select() can gather routed K/V rows (RoutingIndex::kv) of `head_dim` elements of `dtype`.
bool routed_kv_supported(DType dtype, int head_dim);

/// A routing index as both kernel families take it: its rows (read by the attention, written by
/// the indexer) and what a launch needs of its routed K/V block (rows.kv of layout.dtype).
struct RoutingArgs {
  RoutingRows rows;
  std::size_t kv_bytes;   // rows.kv's size
  float kv_l2_hit_ratio;  // > 0: rows.kv is accessed under a persisting L2 access-policy window
};

/// One select() of the indexer: scores, then top-k per query row.
struct IndexerArgs {
  PagedCacheLayout layout;
  const std::int32_t* last_page_lengths;  // [B], device: lengths are paged_length() of the tables
  const std::int32_t* page_indptr;        // [B+1], device
  const std::int32_t* page_indices;       // device
  int num_sequences;                      // B
  int tokens;                             // T
  std::int64_t max_length;                // the plan's: longer sequences are reported and route nothing
  const void* q;                          // [B, T, H, D] of layout.dtype
  std::int64_t q_stride_b, q_stride_t, q_stride_h;
  const void* weights;  // [B, T, H]
  DType weights_dtype;
  std::int64_t w_stride_b, w_stride_t;
  int heads, dim, sinks, window;
  float scale;
  RoutingArgs routing;  // the index written: routing.rows.top_k entries per query row
  RunStatus* status;    // device view of the component's status
};
/// Enqueues the whole selection on `stream`; no allocation, no host synchronisation.
void index_select(const IndexerArgs& args, const IndexerPlan& plan, void* workspace, cudaStream_t stream);

/// The attention's plan: per cache dtype (f32, f16, bf16) the kernel variant and the resident CTA
/// slots it fills; one workspace layout that serves every dtype and batch size in the bounds.
struct AttentionPlan {
  int max_rows = 0;       // max sequences x max query tokens
  std::int64_t span = 0;  // top_k (sparse) or the longest length (dense)
  int q_heads = 0, kv_heads = 0, dim = 0;
  int variant[3] = {-1, -1, -1};  // by DType: index into the kernel table
  std::int64_t slots[3] = {};     // resident CTAs of the variant on the device (multiprocessors x per SM)
  bool dependent_launch = false;  // launches as a programmatic dependent (AttentionConfig::enable_pdl, sm_90)
  std::size_t partial_out_offset = 0, partial_ml_offset = 0, bytes = 0;  // workspace layout
};
/// Throws Error(unsupported) for a (head_dim, group) without kernels.
AttentionPlan plan_attention(int max_rows, std::int64_t span, int q_heads, int kv_heads, int dim, bool enable_pdl);
/// Whether attention kernels exist for this head dimension (every float dtype has them).
bool attention_supports(int dim);

/// One forward() of sparse (routing.rows.positions != nullptr) or dense attention.
struct AttentionArgs {
  PagedCacheLayout layout;
  const std::int32_t* last_page_lengths;  // lengths are paged_length() of the tables
  const std::int32_t* page_indptr;
  const std::int32_t* page_indices;
  int num_sequences;
  int tokens;
  const void* q;  // [B, T, Hq, D] of layout.dtype
  std::int64_t q_stride_b, q_stride_t, q_stride_h;
  void* out;  // [B, T, Hq, D] of layout.dtype
  std::int64_t out_stride_b, out_stride_t, out_stride_h;
  float* lse;  // [B, T, Hq] or nullptr
  std::int64_t lse_stride_b, lse_stride_t;
  int q_heads, kv_heads, dim;
  float scale;
  RoutingArgs routing;  // the index read (slots: no page lookup; kv: no pool reads); all zero for dense
  RunStatus* status;    // dense: sequences longer than the plan's span are reported and write zeros
};
void attention(const AttentionArgs& args, const AttentionPlan& plan, void* workspace, cudaStream_t stream);

/// clsa::keep_routed_kv_in_l2 on the current device: sets its persisting-L2 limit; the bytes granted.
std::size_t keep_routed_kv_in_l2(std::size_t bytes);
/// Hit ratio of the persisting window over a routed K/V block of `bytes` on the current device:
/// the carve-out granted by keep_routed_kv_in_l2 over the window (0: no window).
float routed_kv_hit_ratio(std::size_t bytes);

}  // namespace cuda_kernels
}  // namespace clsa
