// CacheBatch: the page tables the kernels read (libclsa's own, or wrapped engine tables), and
// the checks of an engine's pool layout.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "batch_storage.hpp"
#include "clsa/cache.hpp"
#include "common/check.hpp"

namespace clsa {

namespace detail {

BatchTables batch_tables(const CacheBatch& batch) {
  BatchTables tables;
  tables.layout = batch.layout();
  tables.num_sequences = batch.num_sequences();
  tables.max_length = batch.max_length();
  tables.host_lengths = batch.lengths();
  tables.last_page_lengths = batch.device_last_page_lengths();
  tables.page_indptr = batch.device_page_indptr();
  tables.page_indices = batch.device_page_indices();
  return tables;
}

void mark_captured(const CacheBatch& batch) {
  if (batch.storage_) batch.storage_->captured = true;
}

}  // namespace detail

void CacheBatch::point_at_tables(const std::int32_t* tables) {
  const std::size_t capacity = static_cast<std::size_t>(storage_->capacity);
  host_lengths_ = storage_->host_lengths.data();
  device_page_indptr_ = tables;
  device_last_page_lengths_ = tables + capacity + 1;
  device_page_indices_ = tables + 2 * capacity + 1;
}

int CacheBatch::capacity() const {
  return storage_ ? storage_->capacity : 0;
}

std::int64_t CacheBatch::page_capacity() const {
  return storage_ ? static_cast<std::int64_t>(storage_->page_capacity) : 0;
}

bool CacheBatch::fixed_capacity() const {
  return storage_ && storage_->fixed;
}

bool CacheBatch::captured() const {
  return storage_ && storage_->captured;
}

void validate_layout(const char* what, const PagedCacheLayout& l) {
  auto bad = [&](ErrorCode code, const std::string& detail_text) {
    detail::fail(code, detail::concat(what, ": pool ", detail_text));
  };
  if (l.k == nullptr || l.v == nullptr || l.index_keys == nullptr)
    bad(ErrorCode::invalid_argument, "has a null k, v or index_keys pointer");
  if (!detail::is_cache_dtype(l.dtype)) {
    bad(ErrorCode::dtype_mismatch,
        detail::concat("dtype is ", dtype_name(l.dtype), "; expected f32, f16, bf16 or e4m3"));
  }
  if (l.index_dtype && !detail::is_cache_dtype(*l.index_dtype)) {
    bad(ErrorCode::dtype_mismatch, detail::concat("index_dtype is ", dtype_name(*l.index_dtype),
                                                  "; expected f32, f16, bf16 or e4m3 (or unset: dtype)"));
  }
  const DType index_dtype = l.index_key_dtype();
  if (l.num_kv_heads <= 0 || l.head_dim <= 0 || l.index_dim <= 0 || l.num_pages <= 0) {
    bad(ErrorCode::invalid_argument,
        detail::concat("has num_kv_heads ", l.num_kv_heads, ", head_dim ", l.head_dim, ", index_dim ", l.index_dim,
                       ", num_pages ", l.num_pages, "; all must be > 0"));
  }
  if (!detail::is_power_of_two(l.page_size)) {
    bad(ErrorCode::invalid_argument, detail::concat("page_size = ", l.page_size, "; it must be a power of two"));
  }
  if (l.num_pages > INT32_MAX || l.num_pages * l.page_size > INT32_MAX) {
    bad(ErrorCode::invalid_argument, "holds more tokens than the int32 position range");
  }
  constexpr std::size_t kStrides = 12;
  const std::int64_t strides[kStrides] = {l.k_page_stride,     l.k_token_stride,          l.k_head_stride,
                                          l.v_page_stride,     l.v_token_stride,          l.v_head_stride,
                                          l.index_page_stride, l.index_token_stride,      l.k_scale_stride,
                                          l.v_scale_stride,    l.index_scale_page_stride, l.index_scale_token_stride};
  const char* names[kStrides] = {"k_page_stride",     "k_token_stride",          "k_head_stride",
                                 "v_page_stride",     "v_token_stride",          "v_head_stride",
                                 "index_page_stride", "index_token_stride",      "k_scale_stride",
                                 "v_scale_stride",    "index_scale_page_stride", "index_scale_token_stride"};
  for (std::size_t i = 0; i < kStrides; ++i) {
    if (strides[i] < 0) bad(ErrorCode::shape_mismatch, detail::concat(names[i], " = ", strides[i], "; negative"));
  }
  auto float_aligned = [](const float* pointer) {
    return reinterpret_cast<std::uintptr_t>(pointer) % alignof(float) == 0;
  };
  // e4m3 indexer keys: one f32 scale per token.
  if (index_dtype == DType::e4m3) {
    if (l.index_scales == nullptr) {
      bad(ErrorCode::invalid_argument, "index_scales is null, but e4m3 indexer keys need their per-token f32 scales");
    }
    if (!float_aligned(l.index_scales)) bad(ErrorCode::invalid_argument, "index_scales is not 4-byte aligned");
  } else if (l.index_scales != nullptr) {
    bad(ErrorCode::invalid_argument, detail::concat("index_scales is set, but the indexer keys are ",
                                                    dtype_name(index_dtype), " (scales belong to e4m3 keys only)"));
  }
  // e4m3 K/V: a scale per kv head (or one for all).
  const float* kv_scales[] = {l.k_scales, l.v_scales};
  const std::int64_t kv_scale_strides[] = {l.k_scale_stride, l.v_scale_stride};
  const char* kv_scale_names[] = {"k_scales", "v_scales"};
  for (int part = 0; part < 2; ++part) {
    const float* scales = kv_scales[part];
    const char* name = kv_scale_names[part];
    if (l.dtype != DType::e4m3) {
      if (scales != nullptr) {
        bad(ErrorCode::invalid_argument, detail::concat(name, " is set, but dtype is ", dtype_name(l.dtype),
                                                        " (K/V scales belong to e4m3 K/V only)"));
      }
      continue;
    }
    if (scales == nullptr) bad(ErrorCode::invalid_argument, detail::concat(name, " is null, but dtype is e4m3"));
    if (!float_aligned(scales)) bad(ErrorCode::invalid_argument, detail::concat(name, " is not 4-byte aligned"));
    if (l.device.is_cpu() && l.num_kv_heads > 0) {
      // Host memory: the values can be checked too (on CUDA they would need a copy).
      for (int h = 0; h < l.num_kv_heads; ++h) {
        const float scale = scales[h * kv_scale_strides[part]];
        if (!(scale > 0.0f) || !std::isfinite(scale)) {
          bad(ErrorCode::invalid_argument,
              detail::concat(name, "[", h, " * ", names[8 + part], "] = ", scale, " (kv head ", h,
                             "); e4m3 K/V scales must be finite and > 0"));
        }
      }
    }
  }
  if (l.device.is_cuda()) {
    // The kernels read rows with 16-byte loads.
    const std::int64_t kv_element = static_cast<std::int64_t>(dtype_size(l.dtype));
    const std::int64_t index_element = static_cast<std::int64_t>(dtype_size(index_dtype));
    for (std::size_t i = 0; i < 8; ++i) {
      const std::int64_t element = i < 6 ? kv_element : index_element;
      if ((strides[i] * element) % 16 != 0) {
        bad(ErrorCode::shape_mismatch,
            detail::concat(names[i], " = ", strides[i],
                           " elements; on CUDA every row stride must be a multiple of 16 bytes"));
      }
    }
    if ((l.head_dim * kv_element) % 16 != 0 || (l.index_dim * index_element) % 16 != 0) {
      bad(ErrorCode::shape_mismatch, "rows (head_dim, index_dim) must be multiples of 16 bytes on CUDA");
    }
    const void* pointers[] = {l.k, l.v, l.index_keys};
    for (const void* pointer : pointers) {
      if (reinterpret_cast<std::uintptr_t>(pointer) % 16 != 0)
        bad(ErrorCode::shape_mismatch, "pointers must be 16-byte aligned on CUDA");
    }
    if (index_dtype == DType::e4m3 &&
        (reinterpret_cast<std::uintptr_t>(l.index_scales) % 16 != 0 || (l.index_scale_page_stride * 4) % 16 != 0)) {
      bad(ErrorCode::shape_mismatch,
          "index_scales and index_scale_page_stride must be 16-byte aligned on CUDA (a page's scales are one row)");
    }
  }
}

CacheBatch CacheBatch::wrap(const PagedCacheLayout& pool, const PageTableView& tables) {
  CacheBatch batch;
  wrap(pool, tables, batch);
  return batch;
}

void CacheBatch::wrap(const PagedCacheLayout& pool, const PageTableView& tables, CacheBatch& reuse) {
  const char* fn = "CacheBatch::wrap";
  validate_layout(fn, pool);
  if (pool.dtype == DType::e4m3 || pool.index_key_dtype() != pool.dtype) {
    // Pools every backend reads (one f32, f16 or bf16 dtype) need no backend here.
    const std::string unsupported =
        detail::backend_of(pool.device).cache_unsupported(pool.dtype, pool.index_key_dtype());
    if (!unsupported.empty()) detail::fail(ErrorCode::unsupported, detail::concat(fn, ": ", unsupported));
  }
  const int count = tables.num_sequences;
  if (count <= 0)
    detail::fail(ErrorCode::invalid_argument,
                 detail::concat(fn, ": tables.num_sequences = ", count, "; it must be > 0"));
  if (tables.page_indptr == nullptr || tables.page_indices == nullptr || tables.last_page_lengths == nullptr ||
      tables.host_page_indptr == nullptr || tables.host_last_page_lengths == nullptr) {
    detail::fail(ErrorCode::invalid_argument,
                 detail::concat(fn,
                                ": tables has a null pointer (page_indptr, page_indices, last_page_lengths and "
                                "their host copies are all required)"));
  }
  const std::int32_t* indptr = tables.host_page_indptr;
  const std::int32_t* last = tables.host_last_page_lengths;
  if (indptr[0] != 0)
    detail::fail(ErrorCode::invalid_argument,
                 detail::concat(fn, ": tables.page_indptr[0] = ", indptr[0], "; it must be 0"));
  // Everything is checked before `reuse` changes (all or nothing).
  auto length_of = [&](int b) {
    const std::int64_t pages = std::int64_t{indptr[b + 1]} - indptr[b];
    return pages == 0 && last[b] == 0 ? 0 : (pages - 1) * std::int64_t{pool.page_size} + last[b];
  };
  std::int64_t max_length = 0;
  for (int b = 0; b < count; ++b) {
    const std::int64_t pages = std::int64_t{indptr[b + 1]} - indptr[b];
    const bool empty = pages == 0 && last[b] == 0;
    if (!empty && (pages < 1 || last[b] < 1 || last[b] > pool.page_size)) {
      detail::fail(ErrorCode::invalid_argument,
                   detail::concat(fn, ": sequence ", b, " has ", pages, " pages (page_indptr[", b, "..", b + 1,
                                  "] = ", indptr[b], "..", indptr[b + 1], ") and last_page_lengths[", b,
                                  "] = ", last[b], "; each sequence needs >= 1 page and a last page length in 1..",
                                  pool.page_size, ", or 0 pages and last page length 0 (an empty slot)"));
    }
    if (length_of(b) > INT32_MAX)
      detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": sequence ", b, " is too long"));
    max_length = std::max(max_length, length_of(b));
  }
  if (pool.device.is_cpu()) {
    // Host tables: the page indices can be checked too.
    for (std::int32_t i = 0; i < indptr[count]; ++i) {
      if (tables.page_indices[i] < 0 || tables.page_indices[i] >= pool.num_pages) {
        detail::fail(ErrorCode::invalid_argument,
                     detail::concat(fn, ": tables.page_indices[", i, "] = ", tables.page_indices[i],
                                    " is not a page of the pool (0..", pool.num_pages - 1, ")"));
      }
    }
  }
  const bool captured = reuse.captured();
  if (captured && reuse.storage_->upload) {
    // Wrapping would drop the tables a graph reads (and free them, were `reuse` their last holder).
    detail::fail(ErrorCode::invalid_argument,
                 detail::concat(fn, ": reuse holds page tables of a SharedKVCache that a CUDA graph captured (",
                                reuse.num_sequences(), " sequences, capacity ", reuse.capacity(), " sequences and ",
                                reuse.page_capacity(),
                                " pages); they must not move while the graph lives: wrap into "
                                "another CacheBatch"));
  }
  // Host lengths in storage of the batch's own when it has some (a wrapped batch's, from an earlier
  // wrap: no allocation once it has held as many sequences), else in new storage.
  // Storage that must grow is replaced, never reallocated: copies of `reuse` keep theirs.
  if (!reuse.storage_ || reuse.storage_->device != pool.device || reuse.storage_->upload ||
      reuse.storage_->host_lengths.capacity() < static_cast<std::size_t>(count)) {
    reuse.storage_ = std::make_shared<detail::BatchStorage>();
    reuse.storage_->device = pool.device;
    reuse.storage_->captured = captured;  // a graph may still read the engine tables it captured
  }
  std::vector<std::int32_t>& lengths = reuse.storage_->host_lengths;
  lengths.resize(static_cast<std::size_t>(count));
  for (int b = 0; b < count; ++b) lengths[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(length_of(b));
  reuse.layout_ = pool;
  reuse.layout_.index_dtype = pool.index_key_dtype();
  reuse.num_sequences_ = count;
  reuse.max_length_ = max_length;
  reuse.host_lengths_ = lengths.data();
  reuse.device_last_page_lengths_ = tables.last_page_lengths;
  reuse.device_page_indptr_ = tables.page_indptr;
  reuse.device_page_indices_ = tables.page_indices;
}

}  // namespace clsa
