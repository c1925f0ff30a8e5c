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

/// Tables of one CacheBatch: [lengths B | page_indptr B+1 | page_indices nnz] as one int32 array,
/// on the host (pinned for CUDA batches) and, for CUDA, mirrored on the device.
struct BatchStorage {
  Device device{};
  std::vector<std::int32_t> wrapped_lengths;  // host lengths of a CacheBatch::wrap
  std::int32_t* host = nullptr;
  std::size_t host_capacity = 0;  // int32 entries
  Buffer device_tables;
#if CLSA_WITH_CUDA
  cudaEvent_t copied = nullptr;  // the last host->device copy; host staging is reused after it
#endif

  ~BatchStorage() {
#if CLSA_WITH_CUDA
    if (device.is_cuda()) {
      if (copied != nullptr) (void)cudaEventDestroy(copied);
      (void)cudaFreeHost(host);
      return;
    }
#endif
    deallocate(Device::cpu(), host);
  }

  std::int32_t* host_tables(std::size_t entries) {
#if CLSA_WITH_CUDA
    if (device.is_cuda()) {
      if (copied != nullptr) cuda_check(cudaEventSynchronize(copied), "cudaEventSynchronize (batch tables)");
      if (entries > host_capacity) {
        void* fresh = nullptr;
        cuda_check(cudaMallocHost(&fresh, entries * sizeof(std::int32_t)), "cudaMallocHost (batch tables)");
        (void)cudaFreeHost(host);
        host = static_cast<std::int32_t*>(fresh);
        host_capacity = entries;
      }
      return host;
    }
#endif
    if (entries > host_capacity) {
      void* fresh = allocate(Device::cpu(), entries * sizeof(std::int32_t));
      deallocate(Device::cpu(), host);
      host = static_cast<std::int32_t*>(fresh);
      host_capacity = entries;
    }
    return host;
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

void SharedKVCache::batch(Span<SequenceId> sequences, CacheBatch& reuse, Stream stream) const {
  const char* fn = "SharedKVCache::batch";
  const State& s = *state_;
  if (sequences.empty()) detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": sequences is empty"));
  if (!reuse.storage_ || reuse.storage_->device != s.device) {
    reuse.storage_ = std::make_shared<detail::BatchStorage>();
    reuse.storage_->device = s.device;
    reuse.storage_->device_tables.set_device(s.device);
  }
  detail::BatchStorage& storage = *reuse.storage_;
  const std::size_t count = sequences.size();
  std::int64_t max_length = 0;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    std::size_t total_pages = 0;
    for (std::size_t i = 0; i < count; ++i) {
      auto it = s.sequences.find(static_cast<std::int64_t>(sequences[i]));
      if (it == s.sequences.end()) {
        detail::fail(ErrorCode::unknown_sequence,
                     detail::concat(fn, ": sequences[", i, "] = ", static_cast<std::int64_t>(sequences[i]),
                                    " is not in this cache"));
      }
      total_pages += it->second.pages.size();
    }
    const std::size_t entries = count + (count + 1) + total_pages;
    std::int32_t* host = storage.host_tables(entries);
    std::int32_t* lengths = host;
    std::int32_t* indptr = host + count;
    std::int32_t* indices = indptr + count + 1;
    indptr[0] = 0;
    for (std::size_t i = 0; i < count; ++i) {
      const SequenceState& seq = s.sequences.find(static_cast<std::int64_t>(sequences[i]))->second;
      lengths[i] = static_cast<std::int32_t>(seq.length);
      max_length = std::max(max_length, seq.length);
      std::copy(seq.pages.begin(), seq.pages.end(), indices + indptr[i]);
      indptr[i + 1] = indptr[i] + static_cast<std::int32_t>(seq.pages.size());
    }
    const std::int32_t* device_tables = host;
#if CLSA_WITH_CUDA
    if (s.device.is_cuda()) {
      auto* tables = storage.device_tables.ensure_as<std::int32_t>(entries);
      detail::cuda_check(
          cudaMemcpyAsync(tables, host, entries * sizeof(std::int32_t), cudaMemcpyHostToDevice, stream.cuda()),
          "cudaMemcpyAsync (batch tables)");
      if (storage.copied == nullptr) {
        detail::cuda_check(cudaEventCreateWithFlags(&storage.copied, cudaEventDisableTiming), "cudaEventCreate");
      }
      detail::cuda_check(cudaEventRecord(storage.copied, stream.cuda()), "cudaEventRecord (batch tables)");
      device_tables = tables;
    }
#endif
    (void)stream;
    reuse.layout_ = s.layout;
    reuse.num_sequences_ = static_cast<int>(count);
    reuse.max_length_ = max_length;
    reuse.host_lengths_ = lengths;
    reuse.device_lengths_ = device_tables;
    reuse.device_last_page_lengths_ = nullptr;
    reuse.device_page_indptr_ = device_tables + count;
    reuse.device_page_indices_ = device_tables + 2 * count + 1;
  }
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
  if (!reuse.storage_ || reuse.storage_->device != pool.device) {
    reuse.storage_ = std::make_shared<detail::BatchStorage>();
    reuse.storage_->device = pool.device;
  }
  std::vector<std::int32_t>& lengths = reuse.storage_->wrapped_lengths;
  lengths.resize(static_cast<std::size_t>(count));
  std::int64_t max_length = 0;
  for (int b = 0; b < count; ++b) {
    const std::int64_t pages = std::int64_t{indptr[b + 1]} - indptr[b];
    if (pages < 1 || last[b] < 1 || last[b] > pool.page_size) {
      detail::fail(ErrorCode::invalid_argument,
                   detail::concat(fn, ": sequence ", b, " has ", pages, " pages (page_indptr[", b, "..", b + 1, "] = ",
                                  indptr[b], "..", indptr[b + 1], ") and last_page_lengths[", b, "] = ", last[b],
                                  "; each sequence needs >= 1 page and a last page length in 1..", pool.page_size));
    }
    const std::int64_t length = (pages - 1) * pool.page_size + last[b];
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
