// Paged-batch addressing, one definition for every path (host and device): a sequence's length
// from FlashInfer/vLLM-style page tables, the positions a query token sees, and position (or pool
// slot) -> page -> row offsets in a PagedCacheLayout. Header-only; compiles as host code, and as
// __host__ __device__ code under nvcc.
#pragma once

#include <cstdint>

#include "clsa/cache.hpp"

#if defined(__CUDACC__)
#define CLSA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CLSA_HOST_DEVICE inline
#endif

namespace clsa {

/// Length of sequence b of page tables (the one length mode): all pages full but the last, which
/// holds last_page_lengths[b] tokens; a sequence without pages is an empty slot (length 0).
CLSA_HOST_DEVICE int paged_length(const std::int32_t* page_indptr, const std::int32_t* last_page_lengths, int page_size,
                                  int b) {
  const int pages = page_indptr[b + 1] - page_indptr[b];
  return pages > 0 ? (pages - 1) * page_size + last_page_lengths[b] : 0;
}

/// Positions visible to query token t of T of a sequence of `length` (its own token included):
/// [0, length - T + t]; none for an empty slot.
CLSA_HOST_DEVICE int visible_length(std::int64_t length, int tokens, int t) {
  const std::int64_t visible = length - tokens + t + 1;
  return visible > 0 ? static_cast<int>(visible) : 0;
}

/// log2 of a power of two.
CLSA_HOST_DEVICE int page_shift_of(int page_size) {
  int shift = 0;
  while ((1 << shift) < page_size) ++shift;
  return shift;
}

/// A token's place in a pool: its page and its offset in that page (a pool slot, as in
/// RoutingIndex::slots, is page * page_size + offset), and the element offsets of its rows.
struct PoolRow {
  std::int64_t page;
  std::int64_t offset;

  /// The place of pool slot `slot` in pages of 2^page_shift tokens.
  CLSA_HOST_DEVICE static PoolRow of_slot(std::int64_t slot, int page_shift) {
    return PoolRow{slot >> page_shift, slot & ((std::int64_t{1} << page_shift) - 1)};
  }
  CLSA_HOST_DEVICE std::int64_t k_offset(const PagedCacheLayout& l, int kv_head) const {
    return page * l.k_page_stride + offset * l.k_token_stride + kv_head * l.k_head_stride;
  }
  CLSA_HOST_DEVICE std::int64_t v_offset(const PagedCacheLayout& l, int kv_head) const {
    return page * l.v_page_stride + offset * l.v_token_stride + kv_head * l.v_head_stride;
  }
  CLSA_HOST_DEVICE std::int64_t index_offset(const PagedCacheLayout& l) const {
    return page * l.index_page_stride + offset * l.index_token_stride;
  }
};

/// One sequence's pages: position -> (page, slot) -> element offsets of its rows in a pool.
struct PagedRows {
  const std::int32_t* pages;  // the sequence's page indices, in position order
  int page_shift;             // log2(page_size)

  CLSA_HOST_DEVICE std::int64_t page(std::int64_t position) const { return pages[position >> page_shift]; }
  CLSA_HOST_DEVICE std::int64_t slot(std::int64_t position) const {
    return position & ((std::int64_t{1} << page_shift) - 1);
  }
  /// Where `position` lives in the pool: page * page_size + offset in the page (RoutingIndex::slots).
  CLSA_HOST_DEVICE std::int64_t pool_slot(std::int64_t position) const {
    return (page(position) << page_shift) + slot(position);
  }
  /// Where `position` lives: its page and its offset in the page.
  CLSA_HOST_DEVICE PoolRow row(std::int64_t position) const { return PoolRow{page(position), slot(position)}; }
  CLSA_HOST_DEVICE std::int64_t k_offset(const PagedCacheLayout& l, std::int64_t position, int kv_head) const {
    return row(position).k_offset(l, kv_head);
  }
  CLSA_HOST_DEVICE std::int64_t v_offset(const PagedCacheLayout& l, std::int64_t position, int kv_head) const {
    return row(position).v_offset(l, kv_head);
  }
  CLSA_HOST_DEVICE std::int64_t index_offset(const PagedCacheLayout& l, std::int64_t position) const {
    return row(position).index_offset(l);
  }
};

}  // namespace clsa
