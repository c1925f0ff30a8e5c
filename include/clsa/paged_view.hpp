// Paged-batch addressing, one definition for every path (host and device): a sequence's length
// from FlashInfer/vLLM-style page tables, the positions a query token sees, position (or pool
// slot) -> page -> row offsets in a PagedCacheLayout, and the rows of a routing index.
// Header-only; compiles as host code, and as __host__ __device__ code under nvcc.
#pragma once

#include <cstddef>
#include <cstdint>

#include "clsa/cache.hpp"
#include "clsa/host_device.hpp"
#include "clsa/indexer.hpp"

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

/// A RoutingIndex as host and device code address it: query row (b, t)'s routed positions, its
/// count, its pool slots (decoded by PoolRow::of_slot) and its block of routed K/V rows. The
/// indexer writes through it, every layer's attention reads through it.
struct RoutingRows {
  std::int32_t* positions;  // [B, T, top_k]; nullptr: no routing (dense attention)
  std::int64_t positions_stride_b, positions_stride_t;
  std::int32_t* counts;  // [B, T]
  std::int64_t counts_stride_b, counts_stride_t;
  std::int32_t* slots;  // [B, T, top_k] or nullptr: the index carries no pool slots
  std::int64_t slots_stride_b, slots_stride_t;
  void* kv;   // contiguous [B, T, 2, Hkv, top_k, head_dim] or nullptr: no routed K/V block
  int top_k;  // entries per row

  /// The rows of `index` (host code): an undefined tensor gives nullptr and zero strides.
  static RoutingRows of(const RoutingIndex& index) {
    return RoutingRows{index.positions.data_as<std::int32_t>(),
                       index.positions.stride(0),
                       index.positions.stride(1),
                       index.counts.data_as<std::int32_t>(),
                       index.counts.stride(0),
                       index.counts.stride(1),
                       index.slots.data_as<std::int32_t>(),
                       index.slots.stride(0),
                       index.slots.stride(1),
                       index.kv.data(),
                       index.top_k};
  }

  /// Row (b, t)'s routed positions: count(b, t) of them in ascending order, then -1.
  CLSA_HOST_DEVICE std::int32_t* row_positions(int b, int t) const {
    return positions + b * positions_stride_b + t * positions_stride_t;
  }
  /// Row (b, t)'s count as stored.
  CLSA_HOST_DEVICE std::int32_t& count(int b, int t) const { return counts[b * counts_stride_b + t * counts_stride_t]; }
  /// Row (b, t)'s count clamped to [0, top_k]: a bound for reading the row, whatever an index the
  /// caller built holds.
  CLSA_HOST_DEVICE int clamped_count(int b, int t) const {
    const int stored = count(b, t);
    const int at_least_zero = stored > 0 ? stored : 0;
    return at_least_zero < top_k ? at_least_zero : top_k;
  }
  /// Row (b, t)'s pool slots (entry i: where row_positions(b, t)[i] lives), or nullptr without slots.
  CLSA_HOST_DEVICE std::int32_t* row_slots(int b, int t) const {
    return slots != nullptr ? slots + b * slots_stride_b + t * slots_stride_t : nullptr;
  }
  /// Where the top_k rows of one kv head of query row `row` (b * T + t) start in kv, in the caller's
  /// units (elements, bytes, 16-byte vectors): `head` is the kv head for its K rows, kv_heads + the
  /// kv head for its V rows; `head_units` is top_k x the units of a row.
  CLSA_HOST_DEVICE static std::size_t kv_offset(std::size_t row, int kv_heads, int head, std::size_t head_units) {
    return (row * 2 * kv_heads + head) * head_units;
  }
};

}  // namespace clsa
