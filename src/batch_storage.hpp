// The storage behind a CacheBatch that libclsa fills (SharedKVCache::batch, reserve_batch).
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "backend/backend.hpp"

namespace clsa {
namespace detail {

/// Tables of one CacheBatch, laid out for its capacity of C sequences and P pages as one int32
/// array [page_indptr C+1 | last_page_lengths C | page_indices P], so that every table keeps its
/// address
/// for as long as the capacity holds (FlashInfer's paged_kv_t tables: the one length mode). The backend publishes them
/// (CUDA: from two pinned staging copies in turn; CPU: the host array itself). Wrapped engine tables have no storage of
/// their own: capacity 0, host lengths only.
struct BatchStorage {
  Device device{};
  bool fixed = false;     // reserve_batch: never grows
  bool captured = false;  // a CUDA graph holds the tables' addresses: they must not move
  int capacity = 0;
  std::size_t page_capacity = 0;
  std::vector<std::int32_t> host_lengths;  // [capacity]: lengths (wrapped batches: computed)
  std::unique_ptr<TableUpload> upload;

  /// Allocates every table for `sequences` and `pages` (a fresh storage; on failure it is left
  /// as it was).
  void allocate_tables(int sequences, std::size_t pages) {
    const std::size_t entries = 2 * static_cast<std::size_t>(sequences) + 1 + pages;
    std::unique_ptr<TableUpload> tables = backend_of(device).make_table_upload(device, entries);
    host_lengths.assign(static_cast<std::size_t>(sequences), 0);
    upload = std::move(tables);
    capacity = sequences;
    page_capacity = pages;
  }
};

}  // namespace detail
}  // namespace clsa
