// SharedKVCache: the page pool, page allocation, all-or-nothing appends, and the refill of a
// batch's page tables from the sequences (the batch itself: batch.cpp).
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

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
  detail::Buffer kv_scales;  // e4m3 K/V: [2, num_kv_heads] f32, K's then V's
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

/// e4m3 K/V scales (`name` is "config.k_scales" or "config.v_scales"): 1 or num_kv_heads, each
/// finite and > 0; none for other K/V dtypes.
void check_kv_scales(const char* fn, const char* name, const std::vector<float>& scales, const CacheConfig& config) {
  if (config.dtype != DType::e4m3) {
    if (!scales.empty()) {
      detail::fail(ErrorCode::invalid_argument,
                   detail::concat(fn, ": ", name, " has ", scales.size(), " entries but config.dtype is ",
                                  dtype_name(config.dtype), "; K/V scales belong to e4m3 K/V only"));
    }
    return;
  }
  if (scales.size() != 1 && scales.size() != static_cast<std::size_t>(config.num_kv_heads)) {
    detail::fail(ErrorCode::invalid_argument,
                 detail::concat(fn, ": ", name, " has ", scales.size(), " entries; e4m3 K/V needs 1 (per tensor) or ",
                                config.num_kv_heads, " (config.num_kv_heads, per kv head)"));
  }
  for (std::size_t h = 0; h < scales.size(); ++h) {
    if (!(scales[h] > 0.0f) || !std::isfinite(scales[h])) {
      detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": ", name, "[", h, "] = ", scales[h],
                                                               "; e4m3 K/V scales must be finite and > 0"));
    }
  }
}

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
  if (!detail::is_cache_dtype(config.dtype)) {
    detail::fail(ErrorCode::dtype_mismatch, detail::concat(fn, ": config.dtype = ", dtype_name(config.dtype),
                                                           "; expected f32, f16, bf16 or e4m3"));
  }
  if (config.index_dtype && !detail::is_cache_dtype(*config.index_dtype)) {
    detail::fail(ErrorCode::dtype_mismatch,
                 detail::concat(fn, ": config.index_dtype = ", dtype_name(*config.index_dtype),
                                "; expected f32, f16, bf16 or e4m3 (or unset: config.dtype)"));
  }
  check_kv_scales(fn, "config.k_scales", config.k_scales, config);
  check_kv_scales(fn, "config.v_scales", config.v_scales, config);
  if (config.index_key_dtype() == DType::e4m3 && (std::int64_t{config.index_dim} * config.page_size) % 4 != 0) {
    detail::fail(ErrorCode::invalid_argument,
                 detail::concat(fn, ": config.index_dim * page_size = ", config.index_dim, " * ", config.page_size,
                                " is not a multiple of 4: e4m3 indexer keys keep a page's f32 scales after its "
                                "index_dim x page_size values (DeepGEMM's layout), 4-byte aligned"));
  }
}

/// Raises Error(unsupported) when `backend` cannot hold (and compute over) such a cache.
void check_supported(const char* fn, Backend backend, const CacheConfig& config) {
  const std::string unsupported =
      detail::compute_backend(backend).cache_unsupported(config.dtype, config.index_key_dtype());
  if (!unsupported.empty()) detail::fail(ErrorCode::unsupported, detail::concat(fn, ": ", unsupported));
}

/// config.k_scales then config.v_scales, each expanded to one per kv head: [2, num_kv_heads].
std::vector<float> expanded_kv_scales(const CacheConfig& config) {
  std::vector<float> scales;
  for (const std::vector<float>* given : {&config.k_scales, &config.v_scales}) {
    for (int h = 0; h < config.num_kv_heads; ++h)
      scales.push_back((*given)[given->size() == 1 ? 0 : static_cast<std::size_t>(h)]);
  }
  return scales;
}

/// The scales of a pool's e4m3 K/V as the kernels read them ([2, num_kv_heads], K's then V's),
/// copied to the host.
std::vector<float> pool_kv_scales(const PagedCacheLayout& pool) {
  std::vector<float> scales(2 * static_cast<std::size_t>(pool.num_kv_heads));
  const float* sources[] = {pool.k_scales, pool.v_scales};
  const std::int64_t strides[] = {pool.k_scale_stride, pool.v_scale_stride};
  for (int part = 0; part < 2; ++part) {
    for (int h = 0; h < pool.num_kv_heads; ++h) {
      copy_bytes(&scales[static_cast<std::size_t>(part * pool.num_kv_heads + h)], Device::cpu(),
                 sources[part] + h * strides[part], pool.device, sizeof(float));
    }
  }
  return scales;
}

/// check_finite for a host tensor of Elem: each row (innermost dimension) is scanned as it lies.
template <class Elem>
void check_finite_as(const char* fn, const char* name, const TensorView& t) {
  const int rank = t.rank();
  const std::int64_t inner = t.size(rank - 1);
  const std::int64_t rows = inner > 0 ? t.numel() / inner : 0;
  const Elem* base = t.data_as<const Elem>();
  for (std::int64_t row = 0; row < rows; ++row) {
    std::int64_t remainder = row;
    std::int64_t offset = 0;
    for (int d = rank - 2; d >= 0; --d) {
      offset += (remainder % t.size(d)) * t.stride(d);
      remainder /= t.size(d);
    }
    for (std::int64_t i = 0; i < inner; ++i) {
      const float x = to_float(base[offset + i]);
      if (std::isfinite(x)) continue;
      // Name the element: its multi-index.
      std::string where;
      remainder = row;
      for (int d = rank - 2; d >= 0; --d) {
        where = std::to_string(remainder % t.size(d)) + "," + where;
        remainder /= t.size(d);
      }
      detail::fail(ErrorCode::invalid_argument,
                   detail::concat(fn, ": ", name, "[", where, i, "] = ", x, " (", name, " is ", t.describe(),
                                  "); values that append quantizes to e4m3 must be finite"));
    }
  }
}

/// Requires every value of a host tensor of an activation dtype to be finite (what append
/// quantizes to e4m3: a NaN or an infinity would make a NaN, or a scale that zeroes the row).
void check_finite(const char* fn, const char* name, const TensorView& t) {
  switch (t.dtype()) {
    case DType::f32:
      check_finite_as<float>(fn, name, t);
      break;
    case DType::f16:
      check_finite_as<float16>(fn, name, t);
      break;
    case DType::bf16:
      check_finite_as<bfloat16>(fn, name, t);
      break;
    default:
      break;  // e4m3 input is stored as given
  }
}

/// An append input of `name` whose cache keeps `stored`: of that dtype, or for e4m3 also of an
/// activation dtype (quantized by append). Returns whether it is to be quantized.
bool check_append_input(const char* fn, const char* name, const TensorView& tensor, DType stored, Device device,
                        std::initializer_list<std::int64_t> shape) {
  const bool quantize = stored == DType::e4m3 && tensor.defined() && detail::is_activation_dtype(tensor.dtype());
  detail::check_tensor(fn, name, tensor, quantize ? tensor.dtype() : stored, device, shape);
  return quantize;
}

/// Page bookkeeping shared by both constructors: every page free, handed out in index order.
void init_free_pages(std::vector<std::int32_t>& free_pages, std::int64_t pages) {
  free_pages.resize(static_cast<std::size_t>(pages));
  for (std::int64_t i = 0; i < pages; ++i)
    free_pages[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(pages - 1 - i);
}

}  // namespace

SharedKVCache::SharedKVCache(const CacheConfig& config, Backend backend) : state_(std::make_unique<State>()) {
  const char* fn = "SharedKVCache";
  check_config(fn, config);
  State& s = *state_;
  s.config = config;
  s.backend = resolve_backend(backend);
  check_supported(fn, s.backend, config);
  s.device = backend_device(s.backend);
  s.page_shift = page_shift_of(config.page_size);

  const DType index_dtype = config.index_key_dtype();
  const bool fp8_index = index_dtype == DType::e4m3;
  const std::size_t kv_element = dtype_size(config.dtype);
  const std::int64_t row = std::int64_t{config.num_kv_heads} * config.head_dim;
  // e4m3 indexer keys: a page is page_size x index_dim values, then page_size f32 scales.
  const std::int64_t index_token_bytes =
      std::int64_t{config.index_dim} * static_cast<std::int64_t>(dtype_size(index_dtype)) +
      (fp8_index ? static_cast<std::int64_t>(sizeof(float)) : 0);
  const std::size_t pages = static_cast<std::size_t>(config.max_pages);
  s.k_pool.set_device(s.device);
  s.v_pool.set_device(s.device);
  s.index_pool.set_device(s.device);
  s.kv_scales.set_device(s.device);
  s.k_pool.ensure(pages * config.page_size * static_cast<std::size_t>(row) * kv_element);
  s.v_pool.ensure(pages * config.page_size * static_cast<std::size_t>(row) * kv_element);
  s.index_pool.ensure(pages * config.page_size * static_cast<std::size_t>(index_token_bytes));

  PagedCacheLayout& l = s.layout;
  l.k = s.k_pool.data();
  l.v = s.v_pool.data();
  l.index_keys = s.index_pool.data();
  l.dtype = config.dtype;
  l.index_dtype = index_dtype;
  l.device = s.device;
  l.num_kv_heads = config.num_kv_heads;
  l.head_dim = config.head_dim;
  l.index_dim = config.index_dim;
  l.page_size = config.page_size;
  l.num_pages = config.max_pages;
  l.k_page_stride = l.v_page_stride = row * config.page_size;
  l.k_token_stride = l.v_token_stride = row;
  l.k_head_stride = l.v_head_stride = config.head_dim;
  l.index_token_stride = config.index_dim;
  if (fp8_index) {
    // DeepGEMM's fp8_paged_mqa_logits / vLLM's indexer_k_quant_and_cache page (PagedCacheLayout).
    const std::int64_t page_bytes = index_token_bytes * config.page_size;
    l.index_page_stride = page_bytes;
    l.index_scales = reinterpret_cast<const float*>(static_cast<const char*>(l.index_keys) +
                                                    std::int64_t{config.index_dim} * config.page_size);
    l.index_scale_page_stride = page_bytes / static_cast<std::int64_t>(sizeof(float));
    l.index_scale_token_stride = 1;
  } else {
    l.index_page_stride = std::int64_t{config.index_dim} * config.page_size;
  }
  if (config.dtype == DType::e4m3) {
    const std::vector<float> scales = expanded_kv_scales(config);
    auto* stored = static_cast<float*>(s.kv_scales.ensure(scales.size() * sizeof(float)));
    const detail::DeviceGuard guard(s.device);
    detail::backend_of(s.device).copy(stored, scales.data(), scales.size() * sizeof(float));
    l.k_scales = stored;
    l.v_scales = stored + config.num_kv_heads;
    l.k_scale_stride = l.v_scale_stride = 1;
  }
  init_free_pages(s.free_pages, config.max_pages);
}

SharedKVCache SharedKVCache::wrap(const CacheConfig& requested, const PagedCacheLayout& pool) {
  const char* fn = "SharedKVCache::wrap";
  validate_layout(fn, pool);
  CacheConfig config = requested;
  config.max_pages = pool.num_pages;
  check_config(fn, config);
  if (pool.dtype != config.dtype || pool.index_key_dtype() != config.index_key_dtype() ||
      pool.num_kv_heads != config.num_kv_heads || pool.head_dim != config.head_dim ||
      pool.index_dim != config.index_dim || pool.page_size != config.page_size) {
    detail::fail(
        ErrorCode::shape_mismatch,
        detail::concat(fn, ": pool has dtype ", dtype_name(pool.dtype), ", index dtype ",
                       dtype_name(pool.index_key_dtype()), ", num_kv_heads ", pool.num_kv_heads, ", head_dim ",
                       pool.head_dim, ", index_dim ", pool.index_dim, ", page_size ", pool.page_size,
                       " but config has ", dtype_name(config.dtype), ", ", dtype_name(config.index_key_dtype()), ", ",
                       config.num_kv_heads, ", ", config.head_dim, ", ", config.index_dim, ", ", config.page_size));
  }
  const Backend backend = pool.device.is_cuda() ? resolve_backend(Backend::cuda) : Backend::cpu;
  check_supported(fn, backend, config);
  if (config.dtype == DType::e4m3) {
    // append() quantizes with the config's scales, the kernels dequantize with the pool's: one set.
    const std::vector<float> given = expanded_kv_scales(config);
    const std::vector<float> held = pool_kv_scales(pool);
    for (std::size_t i = 0; i < given.size(); ++i) {
      if (given[i] == held[i]) continue;
      const bool is_k = i < static_cast<std::size_t>(config.num_kv_heads);
      const std::size_t h = is_k ? i : i - static_cast<std::size_t>(config.num_kv_heads);
      const std::vector<float>& scales = is_k ? config.k_scales : config.v_scales;
      detail::fail(ErrorCode::invalid_argument,
                   detail::concat(fn, ": config.", is_k ? "k" : "v", "_scales[", scales.size() == 1 ? 0 : h,
                                  "] = ", scales[scales.size() == 1 ? 0 : h], " but the pool's ", is_k ? "k" : "v",
                                  "_scales hold ", held[i], " for kv head ", h, "; they must be the same scales"));
    }
  }
  SharedKVCache cache;
  cache.state_ = std::make_unique<State>();
  State& s = *cache.state_;
  s.config = config;
  s.backend = backend;
  s.device = pool.device;
  s.page_shift = page_shift_of(config.page_size);
  s.layout = pool;
  s.layout.index_dtype = pool.index_key_dtype();
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
                           Stream stream, const TensorView& index_scales) {
  const char* fn = "SharedKVCache::append";
  State& s = *state_;
  const CacheConfig& c = s.config;
  const DType index_dtype = s.layout.index_key_dtype();
  const std::int64_t tokens = k.defined() && k.rank() > 0 ? k.size(0) : 0;
  const bool quantize_k = check_append_input(fn, "k", k, c.dtype, s.device, {tokens, c.num_kv_heads, c.head_dim});
  const bool quantize_v = check_append_input(fn, "v", v, c.dtype, s.device, {tokens, c.num_kv_heads, c.head_dim});
  const bool quantize_index =
      check_append_input(fn, "index_keys", index_keys, index_dtype, s.device, {tokens, c.index_dim});
  const bool prequantized_index = index_dtype == DType::e4m3 && !quantize_index;
  if (prequantized_index) {
    if (!index_scales.defined()) {
      detail::fail(ErrorCode::invalid_argument,
                   detail::concat(fn, ": index_scales is empty; e4m3 index_keys (", index_keys.describe(),
                                  ") need their per-token f32 scales [", tokens, "]"));
    }
    detail::check_tensor(fn, "index_scales", index_scales, DType::f32, s.device, {tokens});
  } else if (index_scales.defined()) {
    detail::fail(ErrorCode::invalid_argument,
                 detail::concat(fn, ": index_scales (", index_scales.describe(), ") is given but index_keys is ",
                                index_keys.describe(), " into ", dtype_name(index_dtype),
                                " indexer keys; scales come only with already-quantized e4m3 index_keys"));
  }
  if (s.device.is_cpu()) {
    // Values are checked before anything is reserved or written. (The CUDA backend holds no e4m3
    // cache yet; its quantizing append kernel will have to report such values itself.)
    if (quantize_k) check_finite(fn, "k", k);
    if (quantize_v) check_finite(fn, "v", v);
    if (quantize_index) check_finite(fn, "index_keys", index_keys);
    if (prequantized_index) {
      const float* scales = index_scales.data_as<const float>();
      for (std::int64_t t = 0; t < tokens; ++t) {
        const float scale = scales[t * index_scales.stride(0)];
        if (!(scale > 0.0f) || !std::isfinite(scale)) {
          detail::fail(ErrorCode::invalid_argument,
                       detail::concat(fn, ": index_scales[", t, "] = ", scale,
                                      "; the scales of e4m3 index keys must be finite and > 0"));
        }
      }
    }
  }

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
    call.index_scales = index_scales;
    call.index_scale_format = c.index_scale_format;
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
  const DType index_dtype = c.index_key_dtype();
  stats.kv_bytes_per_token = 2 * static_cast<std::size_t>(c.num_kv_heads) * c.head_dim * dtype_size(c.dtype);
  stats.index_bytes_per_token = static_cast<std::size_t>(c.index_dim) * dtype_size(index_dtype) +
                                (index_dtype == DType::e4m3 ? sizeof(float) : 0);  // + the token's scale
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
