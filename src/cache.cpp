// SharedKVCache: page pool, page allocation, all-or-nothing appends and batch page tables.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "check.hpp"
#include "clsa/cache.hpp"
#include "cuda_check.hpp"
#include "memory.hpp"

#if CLSA_WITH_CUDA
#include "../cuda/kernels.hpp"
#endif

namespace clsa {

namespace detail {

/// Tables of one CacheBatch, laid out for its capacity of C sequences and P pages as one int32
/// array [lengths C | page_indptr C+1 | page_indices P], so that every table keeps its address
/// for as long as the capacity holds. On CUDA the array lives on the device and is filled from
/// two pinned staging copies in turn; on the CPU staging[0] is the table itself.
struct BatchStorage {
  Device device{};
  bool fixed = false;  // reserve_batch: never grows
  int capacity = 0;
  std::size_t page_capacity = 0;
  std::vector<std::int32_t> host_lengths;  // [capacity]: lengths (wrapped batches: computed)
  std::int32_t* staging[2] = {nullptr, nullptr};
  int next_staging = 0;
  Buffer device_tables;
#if CLSA_WITH_CUDA
  cudaEvent_t copied[2] = {nullptr, nullptr};  // the last copy out of each staging buffer
#endif

  std::size_t entries() const {
    return 2 * static_cast<std::size_t>(capacity) + 1 + page_capacity;
  }

  ~BatchStorage() {
    release_staging();
  }

  void release_staging() {
#if CLSA_WITH_CUDA
    if (device.is_cuda()) {
      for (int i = 0; i < 2; ++i) {
        if (copied[i] != nullptr) {
          (void)cudaEventSynchronize(copied[i]);  // a copy out of the staging may be in flight
          (void)cudaEventDestroy(copied[i]);
        }
        if (staging[i] != nullptr) (void)cudaFreeHost(staging[i]);
        copied[i] = nullptr;
        staging[i] = nullptr;
      }
      return;
    }
#endif
    deallocate(Device::cpu(), staging[0]);
    staging[0] = nullptr;
  }

  /// (Re)allocates every table for `sequences` and `pages` (the contents are dropped).
  void allocate_tables(int sequences, std::size_t pages) {
    release_staging();
    capacity = sequences;
    page_capacity = pages;
    const std::size_t bytes = entries() * sizeof(std::int32_t);
    host_lengths.assign(static_cast<std::size_t>(capacity), 0);
#if CLSA_WITH_CUDA
    if (device.is_cuda()) {
      for (int i = 0; i < 2; ++i) {
        void* memory = nullptr;
        cuda_check(cudaMallocHost(&memory, bytes), "cudaMallocHost (batch tables)");
        staging[i] = static_cast<std::int32_t*>(memory);
        std::memset(memory, 0, bytes);
        cuda_check(cudaEventCreateWithFlags(&copied[i], cudaEventDisableTiming), "cudaEventCreate (batch tables)");
      }
      device_tables.set_device(device);
      device_tables.ensure(bytes);
      cuda_check(cudaMemset(device_tables.data(), 0, bytes), "cudaMemset (batch tables)");
      return;
    }
#endif
    staging[0] = static_cast<std::int32_t*>(allocate(Device::cpu(), bytes));
    std::memset(staging[0], 0, bytes);
  }

  /// The host array the next refill writes (CUDA: the staging buffer whose last copy is done).
  std::int32_t* next_tables() {
#if CLSA_WITH_CUDA
    if (device.is_cuda()) {
      cuda_check(cudaEventSynchronize(copied[next_staging]), "cudaEventSynchronize (batch tables)");
      return staging[next_staging];
    }
#endif
    return staging[0];
  }

  /// Publishes the host array just written (`used` leading entries) to the kernels' tables.
  const std::int32_t* publish(std::size_t used, Stream stream) {
#if CLSA_WITH_CUDA
    if (device.is_cuda()) {
      const int s = next_staging;
      cuda_check(cudaMemcpyAsync(device_tables.data(), staging[s], used * sizeof(std::int32_t), cudaMemcpyHostToDevice,
                                 stream.cuda()),
                 "cudaMemcpyAsync (batch tables)");
      cuda_check(cudaEventRecord(copied[s], stream.cuda()), "cudaEventRecord (batch tables)");
      next_staging = 1 - s;
      return static_cast<const std::int32_t*>(device_tables.data());
    }
#endif
    (void)used;
    (void)stream;
    return staging[0];
  }
};

}  // namespace detail

namespace {

struct SequenceState {
  std::vector<std::int32_t> pages;
  std::int64_t length = 0;
  bool appending = false;
};

bool is_power_of_two(std::int64_t x) {
  return x > 0 && (x & (x - 1)) == 0;
}

int log2_exact(std::int64_t x) {
  int shift = 0;
  while ((std::int64_t{1} << shift) < x) ++shift;
  return shift;
}

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
  if (!is_power_of_two(config.page_size)) {
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
  s.page_shift = log2_exact(config.page_size);

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
  s.page_shift = log2_exact(config.page_size);
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

namespace {

/// Copies tokens [0, T) of k/v/index_keys to positions first_position.. of the pages given.
void copy_tokens_host(const PagedCacheLayout& layout, int page_shift, const std::int32_t* sequence_pages,
                      std::int64_t first_position, const TensorView& k, const TensorView& v,
                      const TensorView& index_keys) {
  const std::size_t element = dtype_size(layout.dtype);
  const std::size_t head_bytes = static_cast<std::size_t>(layout.head_dim) * element;
  const std::size_t index_bytes = static_cast<std::size_t>(layout.index_dim) * element;
  auto* k_pool = static_cast<char*>(const_cast<void*>(layout.k));
  auto* v_pool = static_cast<char*>(const_cast<void*>(layout.v));
  auto* index_pool = static_cast<char*>(const_cast<void*>(layout.index_keys));
  const auto* k_src = static_cast<const char*>(k.data());
  const auto* v_src = static_cast<const char*>(v.data());
  const auto* index_src = static_cast<const char*>(index_keys.data());
  const std::int64_t tokens = k.size(0);
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::int64_t position = first_position + t;
    const std::int64_t page = sequence_pages[position >> page_shift];
    const std::int64_t slot = position & (layout.page_size - 1);
    for (int h = 0; h < layout.num_kv_heads; ++h) {
      std::memcpy(
          k_pool + (page * layout.k_page_stride + slot * layout.k_token_stride + h * layout.k_head_stride) * element,
          k_src + (t * k.stride(0) + h * k.stride(1)) * element, head_bytes);
      std::memcpy(
          v_pool + (page * layout.v_page_stride + slot * layout.v_token_stride + h * layout.v_head_stride) * element,
          v_src + (t * v.stride(0) + h * v.stride(1)) * element, head_bytes);
    }
    std::memcpy(index_pool + (page * layout.index_page_stride + slot * layout.index_token_stride) * element,
                index_src + t * index_keys.stride(0) * element, index_bytes);
  }
}

#if CLSA_WITH_CUDA
void copy_tokens_cuda(const PagedCacheLayout& layout, int page_shift, const std::int32_t* sequence_pages,
                      std::int64_t first_position, const TensorView& k, const TensorView& v,
                      const TensorView& index_keys, cudaStream_t stream) {
  using cuda_kernels::AppendArgs;
  const std::int64_t tokens = k.size(0);
  const std::size_t element = dtype_size(layout.dtype);
  std::int64_t done = 0;
  while (done < tokens) {
    // One launch per run of up to kMaxPages pages (page indices travel as kernel parameters).
    const std::int64_t position = first_position + done;
    const std::int64_t first_page = position >> page_shift;
    const std::int64_t end_of_run = (first_page + AppendArgs::kMaxPages) << page_shift;
    const std::int64_t count = std::min(tokens - done, end_of_run - position);
    AppendArgs args{};
    args.layout = layout;
    args.k = static_cast<const char*>(k.data()) + done * k.stride(0) * element;
    args.k_token_stride = k.stride(0);
    args.k_head_stride = k.stride(1);
    args.v = static_cast<const char*>(v.data()) + done * v.stride(0) * element;
    args.v_token_stride = v.stride(0);
    args.v_head_stride = v.stride(1);
    args.index_keys = static_cast<const char*>(index_keys.data()) + done * index_keys.stride(0) * element;
    args.index_token_stride = index_keys.stride(0);
    args.first_position = position;
    args.tokens = static_cast<int>(count);
    args.first_page = static_cast<int>(first_page);
    const std::int64_t last_page = (position + count - 1) >> page_shift;
    for (std::int64_t p = first_page; p <= last_page; ++p) args.pages[p - first_page] = sequence_pages[p];
    cuda_kernels::append_tokens(args, stream);
    done += count;
  }
}
#endif

}  // namespace

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
    if (s.device.is_cpu()) {
      copy_tokens_host(s.layout, s.page_shift, pages_snapshot.data(), first_position, k, v, index_keys);
    } else {
#if CLSA_WITH_CUDA
      copy_tokens_cuda(s.layout, s.page_shift, pages_snapshot.data(), first_position, k, v, index_keys, stream.cuda());
#endif
    }
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
  (void)stream;

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
  result.point_at_tables(storage.publish(0, {}));
  return result;
}

void SharedKVCache::batch(Span<SequenceId> sequences, CacheBatch& reuse, Stream stream) const {
  const char* fn = "SharedKVCache::batch";
  const State& s = *state_;
  if (sequences.empty()) detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": sequences is empty"));
  const detail::DeviceGuard guard(s.device);
  if (reuse.storage_ && (reuse.storage_->device != s.device || reuse.device_lengths_ == nullptr)) {
    if (reuse.storage_->fixed) {
      detail::fail(ErrorCode::invalid_argument,
                   detail::concat(fn, ": reuse was reserved for another cache (", device_name(reuse.storage_->device),
                                  ") or wraps engine tables"));
    }
    reuse.storage_.reset();
  }
  if (!reuse.storage_) {
    reuse.storage_ = std::make_shared<detail::BatchStorage>();
    reuse.storage_->device = s.device;
  }
  detail::BatchStorage& storage = *reuse.storage_;
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
    total_pages += it->second.pages.size();
  }
  if (count > static_cast<std::size_t>(storage.capacity) || total_pages > storage.page_capacity) {
    if (storage.fixed) {
      detail::fail(ErrorCode::capacity_exceeded,
                   detail::concat(fn, ": ", count, " sequences holding ", total_pages,
                                  " pages do not fit the batch reserved for ", storage.capacity, " sequences and ",
                                  storage.page_capacity, " pages (reserve_batch with larger bounds)"));
    }
    // Grow geometrically, so a decoding loop whose sequences cross pages soon stops allocating.
    storage.allocate_tables(
        static_cast<int>(std::max<std::size_t>(count, 2 * static_cast<std::size_t>(storage.capacity))),
        std::max(total_pages, 2 * storage.page_capacity));
  }
  const std::size_t capacity = static_cast<std::size_t>(storage.capacity);
  std::int32_t* host = storage.next_tables();
  std::int32_t* lengths = host;
  std::int32_t* indptr = host + capacity;
  std::int32_t* indices = indptr + capacity + 1;
  std::int64_t max_length = 0;
  indptr[0] = 0;
  for (std::size_t i = 0; i < capacity; ++i) {
    std::int32_t length = 0;
    std::int32_t pages = 0;
    if (i < count && sequences[i] != empty_slot) {
      const SequenceState& seq = s.sequences.find(static_cast<std::int64_t>(sequences[i]))->second;
      length = static_cast<std::int32_t>(seq.length);
      pages = static_cast<std::int32_t>(seq.pages.size());
      std::copy(seq.pages.begin(), seq.pages.end(), indices + indptr[i]);
    }
    lengths[i] = length;
    storage.host_lengths[i] = length;
    max_length = std::max<std::int64_t>(max_length, length);
    indptr[i + 1] = indptr[i] + pages;
  }
  reuse.layout_ = s.layout;
  reuse.num_sequences_ = static_cast<int>(count);
  reuse.max_length_ = max_length;
  reuse.point_at_tables(storage.publish(2 * capacity + 1 + total_pages, stream));
}

void CacheBatch::point_at_tables(const std::int32_t* tables) {
  const std::size_t capacity = static_cast<std::size_t>(storage_->capacity);
  host_lengths_ = storage_->host_lengths.data();
  device_lengths_ = tables;
  device_last_page_lengths_ = nullptr;
  device_page_indptr_ = tables + capacity;
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

void validate_layout(const char* what, const PagedCacheLayout& l) {
  auto bad = [&](ErrorCode code, const std::string& detail_text) {
    detail::fail(code, detail::concat(what, ": pool ", detail_text));
  };
  if (l.k == nullptr || l.v == nullptr || l.index_keys == nullptr)
    bad(ErrorCode::invalid_argument, "has a null k, v or index_keys pointer");
  if (l.dtype == DType::i32) bad(ErrorCode::dtype_mismatch, "dtype is i32; expected f32, f16 or bf16");
  if (l.num_kv_heads <= 0 || l.head_dim <= 0 || l.index_dim <= 0 || l.num_pages <= 0) {
    bad(ErrorCode::invalid_argument,
        detail::concat("has num_kv_heads ", l.num_kv_heads, ", head_dim ", l.head_dim, ", index_dim ", l.index_dim,
                       ", num_pages ", l.num_pages, "; all must be > 0"));
  }
  if (!is_power_of_two(l.page_size)) {
    bad(ErrorCode::invalid_argument, detail::concat("page_size = ", l.page_size, "; it must be a power of two"));
  }
  if (l.num_pages > INT32_MAX || l.num_pages * l.page_size > INT32_MAX) {
    bad(ErrorCode::invalid_argument, "holds more tokens than the int32 position range");
  }
  const std::int64_t strides[] = {l.k_page_stride,  l.k_token_stride, l.k_head_stride,     l.v_page_stride,
                                  l.v_token_stride, l.v_head_stride,  l.index_page_stride, l.index_token_stride};
  const char* names[] = {"k_page_stride",  "k_token_stride", "k_head_stride",     "v_page_stride",
                         "v_token_stride", "v_head_stride",  "index_page_stride", "index_token_stride"};
  for (std::size_t i = 0; i < 8; ++i) {
    if (strides[i] < 0) bad(ErrorCode::shape_mismatch, detail::concat(names[i], " = ", strides[i], "; negative"));
  }
  if (l.device.is_cuda()) {
    // The kernels read rows with 16-byte loads.
    const std::int64_t element = static_cast<std::int64_t>(dtype_size(l.dtype));
    for (std::size_t i = 0; i < 8; ++i) {
      if ((strides[i] * element) % 16 != 0) {
        bad(ErrorCode::shape_mismatch,
            detail::concat(names[i], " = ", strides[i],
                           " elements; on CUDA every stride must be a multiple of 16 bytes"));
      }
    }
    if ((l.head_dim * element) % 16 != 0 || (l.index_dim * element) % 16 != 0) {
      bad(ErrorCode::shape_mismatch, "rows (head_dim, index_dim) must be multiples of 16 bytes on CUDA");
    }
    const void* pointers[] = {l.k, l.v, l.index_keys};
    for (const void* pointer : pointers) {
      if (reinterpret_cast<std::uintptr_t>(pointer) % 16 != 0)
        bad(ErrorCode::shape_mismatch, "pointers must be 16-byte aligned on CUDA");
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
  if (!reuse.storage_ || reuse.storage_->device != pool.device || reuse.storage_->capacity > 0) {
    reuse.storage_ = std::make_shared<detail::BatchStorage>();
    reuse.storage_->device = pool.device;
  }
  std::vector<std::int32_t>& lengths = reuse.storage_->host_lengths;
  lengths.resize(static_cast<std::size_t>(count));
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
    const std::int64_t length = empty ? 0 : (pages - 1) * pool.page_size + last[b];
    if (length > INT32_MAX)
      detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": sequence ", b, " is too long"));
    lengths[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(length);
    max_length = std::max(max_length, length);
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
  reuse.layout_ = pool;
  reuse.num_sequences_ = count;
  reuse.max_length_ = max_length;
  reuse.host_lengths_ = lengths.data();
  reuse.device_lengths_ = nullptr;
  reuse.device_last_page_lengths_ = tables.last_page_lengths;
  reuse.device_page_indptr_ = tables.page_indptr;
  reuse.device_page_indices_ = tables.page_indices;
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
