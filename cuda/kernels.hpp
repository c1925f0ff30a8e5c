// Host-side entry points of libclsa's CUDA kernels (defined in cuda/*.cu). Included by src/ only
// in builds with CUDA; argument checking happens before these are called.
#pragma once

#if CLSA_WITH_CUDA
#include <cuda_runtime_api.h>

#include <cstdint>

#include "clsa/cache.hpp"

namespace clsa {
namespace cuda_kernels {

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

/// One select() of the indexer: scores, then top-k per query row.
struct IndexerArgs {
  PagedCacheLayout layout;
  const std::int32_t* lengths;            // [B], device; nullptr: from page_indptr and last_page_lengths
  const std::int32_t* last_page_lengths;  // [B], device (engine-owned FlashInfer-style tables)
  const std::int32_t* page_indptr;        // [B+1], device
  const std::int32_t* page_indices;       // device
  int num_sequences;                      // B
  int tokens;                             // T
  std::int64_t max_length;                // >= every length
  const void* q;                          // [B, T, H, D] of layout.dtype
  std::int64_t q_stride_b, q_stride_t, q_stride_h;
  const void* weights;  // [B, T, H]
  DType weights_dtype;
  std::int64_t w_stride_b, w_stride_t;
  int heads, dim, top_k, sinks, window;
  float scale;
  std::int32_t* positions;  // [B, T, top_k]
  std::int64_t positions_stride_b, positions_stride_t;
  std::int32_t* counts;  // [B, T]
  std::int64_t counts_stride_b, counts_stride_t;
};
/// Device workspace select() needs for these bounds.
std::size_t indexer_workspace_bytes(int num_sequences, int tokens, std::int64_t max_length, int heads);
/// Enqueues the whole selection on `stream`; no allocation, no host synchronisation. The kernels
/// leave the workspace's histograms and counters zero; `clear` zeroes them first, needed when
/// the workspace is new or its layout (rows, max_length) differs from the previous call's.
void index_select(const IndexerArgs& args, void* workspace, std::size_t workspace_bytes, bool clear,
                  cudaStream_t stream);
/// Identifies the workspace layout of a call (equal keys: same layout).
std::int64_t indexer_workspace_key(int num_sequences, int tokens, std::int64_t max_length);
/// One forward() of sparse (positions != nullptr) or dense attention.
struct AttentionArgs {
  PagedCacheLayout layout;
  const std::int32_t* lengths;  // nullptr: from page_indptr and last_page_lengths
  const std::int32_t* last_page_lengths;
  const std::int32_t* page_indptr;
  const std::int32_t* page_indices;
  int num_sequences;
  int tokens;
  std::int64_t max_length;
  const void* q;  // [B, T, Hq, D] of layout.dtype
  std::int64_t q_stride_b, q_stride_t, q_stride_h;
  void* out;  // [B, T, Hq, D] of layout.dtype
  std::int64_t out_stride_b, out_stride_t, out_stride_h;
  float* lse;  // [B, T, Hq] or nullptr
  std::int64_t lse_stride_b, lse_stride_t;
  int q_heads, kv_heads, dim;
  float scale;
  const std::int32_t* positions;  // [B, T, top_k] or nullptr for dense
  std::int64_t positions_stride_b, positions_stride_t;
  const std::int32_t* counts;  // [B, T]
  std::int64_t counts_stride_b, counts_stride_t;
  int top_k;
};
/// Device workspace forward() needs: `span` is top_k (sparse) or the longest length (dense).
std::size_t attention_workspace_bytes(int num_sequences, int tokens, int q_heads, int dim, std::int64_t span);
void attention(const AttentionArgs& args, void* workspace, std::size_t workspace_bytes, cudaStream_t stream);
/// Number of multiprocessors of the current device (cached).
int multiprocessor_count();

}  // namespace cuda_kernels
}  // namespace clsa
#endif
