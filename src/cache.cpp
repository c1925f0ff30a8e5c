// SharedKVCache: the page pool, page allocation, all-or-nothing appends, and the refill of a
// batch's page tables from the sequences (the batch itself: batch.cpp).
#include <algorithm>
#include <climits>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "backend/backend.hpp"
#include "backend/memory.hpp"
#include "batch_storage.hpp"
#include "clsa/cache.hpp"
#include "clsa/paged_view.hpp"
#include "common/check.hpp"

namespace clsa {

namespace {

struct SequenceState {
  std::vector<std::int32_t> pages;
  std::int64_t length = 0;
  bool appending = false;
};

}  // namespace

struct SharedKVCache::State {
  CacheConfig config;
  Backend backend = Backend::cpu;
  Device device{};
  int page_shift = 0;
  detail::Buffer k_pool, v_pool, index_pool;
  PagedCacheLayout layout{};
  mutable std::mutex mutex;
  std::vector<std::int32_t> free_pages;  // a stack; the back is handed out next
  std::unordered_map<std::int64_t, SequenceState> sequences;
  std::int64_t next_id = 1;
  std::int64_t tokens = 0;
  // The pools above stay empty when the cache wraps engine memory (layout points there).

  std::int64_t pages_holding(std::int64_t length) const { return (length + config.page_size - 1) >> page_shift; }

  SequenceState& find(const char* function, SequenceId id) {
    auto it = sequences.find(static_cast<std::int64_t>(id));
    if (it == sequences.end()) {
      detail::fail(ErrorCode::unknown_sequence,
                   detail::concat(function, ": sequence ", static_cast<std::int64_t>(id), " is not in this cache"));
    }
    return it->second;
  }
  const SequenceState& find(const char* function, SequenceId id) const {
    return const_cast<State*>(this)->find(function, id);
  }
};

namespace {

void check_config(const char* fn, const CacheConfig& config) {
  detail::check_positive(fn, "config.num_kv_heads", config.num_kv_heads);
  detail::check_positive(fn, "config.head_dim", config.head_dim);
  detail::check_positive(fn, "config.index_dim", config.index_dim);
  detail::check_positive(fn, "config.max_pages", config.max_pages);
  if (!detail::is_power_of_two(config.page_size)) {
    detail::fail(ErrorCode::invalid_argument,
                 detail::concat(fn, ": config.page_size = ", config.page_size, "; it must be a power of two"));
  }
  if (config.max_pages > INT32_MAX || config.max_pages * config.page_size > INT32_MAX) {
    detail::fail(ErrorCode::invalid_argument,
                 detail::concat(fn, ": config.max_pages * page_size = ", config.max_pages, " * ", config.page_size,
                                " tokens exceeds the int32 position range"));
  }
  if (config.dtype == DType::i32) {
    detail::fail(ErrorCode::dtype_mismatch, detail::concat(fn, ": config.dtype = i32; expected f32, f16 or bf16"));
  }
}

/// Page bookkeeping shared by both constructors: every page free, handed out in index order.
void init_free_pages(std::vector<std::int32_t>& free_pages, std::int64_t pages) {
  free_pages.resize(static_cast<std::size_t>(pages));
  for (std::int64_t i = 0; i < pages; ++i)
    free_pages[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(pages - 1 - i);
}

}  // namespace

SharedKVCache::SharedKVCache(const CacheConfig& config, Backend backend) : state_(std::make_unique<State>()) {
  check_config("SharedKVCache", config);
  State& s = *state_;
  s.config = config;
  s.backend = resolve_backend(backend);
  s.device = backend_device(s.backend);
  s.page_shift = page_shift_of(config.page_size);

  const std::size_t element = dtype_size(config.dtype);
  const std::int64_t row = std::int64_t{config.num_kv_heads} * config.head_dim;
  const std::size_t pages = static_cast<std::size_t>(config.max_pages);
  s.k_pool.set_device(s.device);
  s.v_pool.set_device(s.device);
  s.index_pool.set_device(s.device);
  s.k_pool.ensure(pages * config.page_size * static_cast<std::size_t>(row) * element);
  s.v_pool.ensure(pages * config.page_size * static_cast<std::size_t>(row) * element);
  s.index_pool.ensure(pages * config.page_size * static_cast<std::size_t>(config.index_dim) * element);

  PagedCacheLayout& l = s.layout;
  l.k = s.k_pool.data();
  l.v = s.v_pool.data();
  l.index_keys = s.index_pool.data();
  l.dtype = config.dtype;
  l.device = s.device;
  l.num_kv_heads = config.num_kv_heads;
  l.head_dim = config.head_dim;
  l.index_dim = config.index_dim;
  l.page_size = config.page_size;
  l.num_pages = config.max_pages;
  l.k_page_stride = l.v_page_stride = row * config.page_size;
  l.k_token_stride = l.v_token_stride = row;
  l.k_head_stride = l.v_head_stride = config.head_dim;
  l.index_page_stride = std::int64_t{config.index_dim} * config.page_size;
  l.index_token_stride = config.index_dim;
  init_free_pages(s.free_pages, config.max_pages);
}

SharedKVCache SharedKVCache::wrap(const CacheConfig& requested, const PagedCacheLayout& pool) {
  const char* fn = "SharedKVCache::wrap";
  validate_layout(fn, pool);
  CacheConfig config = requested;
  config.max_pages = pool.num_pages;
  check_config(fn, config);
  if (pool.dtype != config.dtype || pool.num_kv_heads != config.num_kv_heads || pool.head_dim != config.head_dim ||
      pool.index_dim != config.index_dim || pool.page_size != config.page_size) {
    detail::fail(ErrorCode::shape_mismatch,
                 detail::concat(fn, ": pool has dtype ", dtype_name(pool.dtype), ", num_kv_heads ", pool.num_kv_heads,
                                ", head_dim ", pool.head_dim, ", index_dim ", pool.index_dim, ", page_size ",
                                pool.page_size, " but config has ", dtype_name(config.dtype), ", ", config.num_kv_heads,
                                ", ", config.head_dim, ", ", config.index_dim, ", ", config.page_size));
  }
  SharedKVCache cache;
  cache.state_ = std::make_unique<State>();
  State& s = *cache.state_;
  s.config = config;
  s.backend = pool.device.is_cuda() ? resolve_backend(Backend::cuda) : Backend::cpu;
  s.device = pool.device;
  s.page_shift = page_shift_of(config.page_size);
  s.layout = pool;
  init_free_pages(s.free_pages, config.max_pages);
  return cache;
}

SharedKVCache::~SharedKVCache() = default;
SharedKVCache::SharedKVCache(SharedKVCache&&) noexcept = default;
SharedKVCache& SharedKVCache::operator=(SharedKVCache&&) noexcept = default;

const CacheConfig& SharedKVCache::config() const {
  return state_->config;
}
Backend SharedKVCache::backend() const {
  return state_->backend;
}
Device SharedKVCache::device() const {
  return state_->device;
}
PagedCacheLayout SharedKVCache::layout() const {
  return state_->layout;
}

SequenceId SharedKVCache::add_sequence() {
  std::lock_guard<std::mutex> lock(state_->mutex);
  const std::int64_t id = state_->next_id++;
  state_->sequences.emplace(id, SequenceState{});
  return static_cast<SequenceId>(id);
}

void SharedKVCache::release(SequenceId sequence) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  SequenceState& seq = state_->find("SharedKVCache::release", sequence);
  if (seq.appending) {
    detail::fail(ErrorCode::invalid_argument,
                 detail::concat("SharedKVCache::release: sequence ", static_cast<std::int64_t>(sequence),
                                " is being appended to by another thread"));
  }
  state_->free_pages.insert(state_->free_pages.end(), seq.pages.rbegin(), seq.pages.rend());
  state_->tokens -= seq.length;
  state_->sequences.erase(static_cast<std::int64_t>(sequence));
}

bool SharedKVCache::contains(SequenceId sequence) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->sequences.count(static_cast<std::int64_t>(sequence)) != 0;
}

std::int64_t SharedKVCache::length(SequenceId sequence) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->find("SharedKVCache::length", sequence).length;
}

std::vector<std::int32_t> SharedKVCache::pages(SequenceId sequence) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->find("SharedKVCache::pages", sequence).pages;
}

void SharedKVCache::append(SequenceId sequence, const TensorView& k, const TensorView& v, const TensorView& index_keys,
                           Stream stream) {
  const char* fn = "SharedKVCache::append";
  State& s = *state_;
  const CacheConfig& c = s.config;
  const std::int64_t tokens = k.defined() && k.rank() > 0 ? k.size(0) : 0;
  detail::check_tensor(fn, "k", k, c.dtype, s.device, {tokens, c.num_kv_heads, c.head_dim});
  detail::check_tensor(fn, "v", v, c.dtype, s.device, {tokens, c.num_kv_heads, c.head_dim});
  detail::check_tensor(fn, "index_keys", index_keys, c.dtype, s.device, {tokens, c.index_dim});

  // Reserve pages under the lock; copy outside it; then publish the new length.
  std::vector<std::int32_t> pages_snapshot;
  std::int64_t first_position = 0;
  std::size_t pages_before = 0;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    SequenceState& seq = s.find(fn, sequence);
    if (seq.appending) {
      detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": sequence ", static_cast<std::int64_t>(sequence),
                                                               " is being appended to by another thread"));
    }
    const std::int64_t new_length = seq.length + tokens;
    if (new_length > std::int64_t{c.max_pages} * c.page_size) {
      detail::fail(ErrorCode::capacity_exceeded,
                   detail::concat(fn, ": sequence ", static_cast<std::int64_t>(sequence), " would hold ", new_length,
                                  " tokens; the cache holds at most ", c.max_pages * c.page_size));
    }
    const std::size_t pages_needed = static_cast<std::size_t>((new_length + c.page_size - 1) >> s.page_shift);
    const std::size_t extra = pages_needed - seq.pages.size();
    if (extra > s.free_pages.size()) {
      detail::fail(
          ErrorCode::capacity_exceeded,
          detail::concat(fn, ": appending ", tokens, " tokens to sequence ", static_cast<std::int64_t>(sequence),
                         " (length ", seq.length, ") needs ", extra, " new pages of ", c.page_size, " tokens; ",
                         s.free_pages.size(), " of ", c.max_pages, " pages are free"));
    }
    if (tokens == 0) return;
    pages_before = seq.pages.size();
    for (std::size_t i = 0; i < extra; ++i) {
      seq.pages.push_back(s.free_pages.back());
      s.free_pages.pop_back();
    }
    seq.appending = true;
    first_position = seq.length;
    pages_snapshot = seq.pages;
  }

  try {
    const detail::DeviceGuard guard(s.device);
    detail::AppendCall call;
    call.layout = s.layout;
    call.page_shift = s.page_shift;
    call.pages = pages_snapshot.data();
    call.first_position = first_position;
    call.k = k;
    call.v = v;
    call.index_keys = index_keys;
    detail::backend_of(s.device).append(call, stream);
  } catch (...) {
    std::lock_guard<std::mutex> lock(s.mutex);
    SequenceState& seq = s.find(fn, sequence);
    while (seq.pages.size() > pages_before) {
      s.free_pages.push_back(seq.pages.back());
      seq.pages.pop_back();
    }
    seq.appending = false;
    throw;
  }
  std::lock_guard<std::mutex> lock(s.mutex);
  SequenceState& seq = s.find(fn, sequence);
  seq.length += tokens;
  seq.appending = false;
  s.tokens += tokens;
}

CacheBatch SharedKVCache::batch(Span<SequenceId> sequences, Stream stream) const {
  CacheBatch result;
  batch(sequences, result, stream);
  return result;
}

CacheBatch SharedKVCache::reserve_batch(int max_sequences, std::int64_t max_length) const {
  const char* fn = "SharedKVCache::reserve_batch";
  detail::check_positive(fn, "max_sequences", max_sequences);
  detail::check_positive(fn, "max_length", max_length);
  const State& s = *state_;
  const std::int64_t pages = std::int64_t{max_sequences} * ((max_length + s.config.page_size - 1) >> s.page_shift);
  if (pages > INT32_MAX) {
    detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": ", max_sequences, " sequences of ", max_length,
                                                             " tokens need ", pages, " pages; tables hold int32"));
  }
  const detail::DeviceGuard guard(s.device);
  CacheBatch result;
  result.storage_ = std::make_shared<detail::BatchStorage>();
  detail::BatchStorage& storage = *result.storage_;
  storage.device = s.device;
  storage.fixed = true;
  storage.allocate_tables(max_sequences, static_cast<std::size_t>(pages));
  result.layout_ = s.layout;
  result.num_sequences_ = 0;
  result.max_length_ = 0;
  result.point_at_tables(storage.upload->publish(0, {}));
  return result;
}

void SharedKVCache::batch(Span<SequenceId> sequences, CacheBatch& reuse, Stream stream) const {
  const char* fn = "SharedKVCache::batch";
  const State& s = *state_;
  if (sequences.empty()) detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": sequences is empty"));
  const detail::DeviceGuard guard(s.device);
  // All or nothing: `reuse` changes only once everything is checked and its new tables exist.
  std::shared_ptr<detail::BatchStorage> target = reuse.storage_;
  if (target && (target->device != s.device || !target->upload)) {
    if (target->fixed) {
      detail::fail(ErrorCode::invalid_argument,
                   detail::concat(fn, ": reuse was reserved for another cache (", device_name(target->device),
                                  ") or wraps engine tables"));
    }
    if (target->captured) {
      detail::fail(
          ErrorCode::invalid_argument,
          detail::concat(fn, ": reuse wraps engine tables or belongs to another cache (", device_name(target->device),
                         "), and a CUDA graph captured calls over it: refilling it here would give it other "
                         "tables than the graph reads. Refill a batch of this cache's reserve_batch instead"));
    }
    target.reset();
  }
  // The staging buffer this refill writes, waited for (on CUDA: the copy two refills back)
  // before the cache's lock is taken.
  std::int32_t* host = target ? target->upload->next() : nullptr;
  const std::size_t count = sequences.size();
  std::lock_guard<std::mutex> lock(s.mutex);
  // Everything is checked before anything is written.
  std::size_t total_pages = 0;
  for (std::size_t i = 0; i < count; ++i) {
    if (sequences[i] == empty_slot) continue;
    auto it = s.sequences.find(static_cast<std::int64_t>(sequences[i]));
    if (it == s.sequences.end()) {
      detail::fail(ErrorCode::unknown_sequence,
                   detail::concat(fn, ": sequences[", i, "] = ", static_cast<std::int64_t>(sequences[i]),
                                  " is not in this cache"));
    }
    total_pages += static_cast<std::size_t>(s.pages_holding(it->second.length));
  }
  if (!target || count > static_cast<std::size_t>(target->capacity) || total_pages > target->page_capacity) {
    if (target && target->fixed) {
      detail::fail(ErrorCode::capacity_exceeded,
                   detail::concat(fn, ": ", count, " sequences holding ", total_pages,
                                  " pages do not fit the batch reserved for ", target->capacity, " sequences and ",
                                  target->page_capacity, " pages (reserve_batch with larger bounds)"));
    }
    if (target && target->captured) {
      // Growing gives the batch new tables and frees the old ones that the graph reads.
      detail::fail(ErrorCode::capacity_exceeded,
                   detail::concat(fn, ": ", count, " sequences holding ", total_pages,
                                  " pages do not fit the batch's tables (capacity ", target->capacity,
                                  " sequences and ", target->page_capacity,
                                  " pages), and growing them would move them under the CUDA graph that captured "
                                  "calls over the batch (its replays would read freed memory). Take batches that "
                                  "graphs capture from SharedKVCache::reserve_batch(max_sequences, max_length): "
                                  "their tables never move"));
    }
    // New tables, grown geometrically so that a decoding loop whose sequences cross pages soon
    // stops allocating; copies of `reuse` keep the old ones (as of their last refill).
    auto grown = std::make_shared<detail::BatchStorage>();
    grown->device = s.device;
    grown->allocate_tables(
        static_cast<int>(std::max<std::size_t>(count, 2 * static_cast<std::size_t>(target ? target->capacity : 0))),
        std::max(total_pages, 2 * (target ? target->page_capacity : 0)));
    target = std::move(grown);
    host = target->upload->next();
  }
  detail::BatchStorage& storage = *target;
  const std::size_t capacity = static_cast<std::size_t>(storage.capacity);
  std::int32_t* indptr = host;
  std::int32_t* last_page_lengths = indptr + capacity + 1;
  std::int32_t* indices = last_page_lengths + capacity;
  std::int64_t max_length = 0;
  indptr[0] = 0;
  for (std::size_t i = 0; i < capacity; ++i) {
    std::int32_t length = 0;
    std::int32_t pages = 0;
    if (i < count && sequences[i] != empty_slot) {
      const SequenceState& seq = s.sequences.find(static_cast<std::int64_t>(sequences[i]))->second;
      length = static_cast<std::int32_t>(seq.length);
      // The pages that hold its tokens: an append in flight on another thread may already have
      // reserved more, which must not count before its length is published.
      pages = static_cast<std::int32_t>(s.pages_holding(seq.length));
      std::copy(seq.pages.begin(), seq.pages.begin() + pages, indices + indptr[i]);
    }
    last_page_lengths[i] = pages > 0 ? length - (pages - 1) * s.config.page_size : 0;
    storage.host_lengths[i] = length;
    max_length = std::max<std::int64_t>(max_length, length);
    indptr[i + 1] = indptr[i] + pages;
  }
  reuse.storage_ = std::move(target);
  reuse.layout_ = s.layout;
  reuse.num_sequences_ = static_cast<int>(count);
  reuse.max_length_ = max_length;
  reuse.point_at_tables(storage.upload->publish(2 * capacity + 1 + total_pages, stream));
}

MemoryStats SharedKVCache::memory() const {
  const State& s = *state_;
  const CacheConfig& c = s.config;
  MemoryStats stats;
  const std::size_t element = dtype_size(c.dtype);
  stats.kv_bytes_per_token = 2 * static_cast<std::size_t>(c.num_kv_heads) * c.head_dim * element;
  stats.index_bytes_per_token = static_cast<std::size_t>(c.index_dim) * element;
  stats.bytes_per_token = stats.kv_bytes_per_token + stats.index_bytes_per_token;
  stats.pool_bytes = static_cast<std::size_t>(c.max_pages) * c.page_size * stats.bytes_per_token;
  std::lock_guard<std::mutex> lock(s.mutex);
  stats.pages_total = c.max_pages;
  stats.pages_free = static_cast<std::int64_t>(s.free_pages.size());
  stats.pages_used = stats.pages_total - stats.pages_free;
  stats.sequences = static_cast<std::int64_t>(s.sequences.size());
  stats.tokens = s.tokens;
  return stats;
}

}  // namespace clsa
