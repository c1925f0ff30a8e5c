// SharedKVCache: the ONE paged cache of keys, values and indexer keys that every cross-decoder
// layer reads; CacheBatch: the page tables of a batch of its sequences, as kernels consume them.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <vector>

#include "clsa/numeric.hpp"
#include "clsa/tensor.hpp"
#include "clsa/types.hpp"

namespace clsa {

/// The shape and element types of a SharedKVCache.
///
/// fp8 (docs/design.md, "fp8 caches"): K/V and the indexer keys each may be e4m3, independently.
/// e4m3 indexer keys carry one f32 scale per token (key = e4m3 value * scale), stored after the
/// page's values (DeepGEMM's fp8_paged_mqa_logits layout, see PagedCacheLayout); append() computes
/// it from the token's largest magnitude (fp8_row_scale) or takes it with pre-quantized keys.
/// e4m3 K/V use fixed scales that the engine gives here (value = e4m3 value * scale, vLLM's
/// k_scale / v_scale).
struct CacheConfig {
  int num_kv_heads = 8;
  int head_dim = 128;          // 64, 128 or 256
  int index_dim = 128;         // indexer key dimension D_idx: 64 or 128
  int page_size = 64;          // tokens per page, a power of two
  std::int64_t max_pages = 0;  // pool size; capacity = max_pages * page_size tokens in all
  /// K and V: f32, f16, bf16 or e4m3 (then k_scales and v_scales are required). Also the dtype of
  /// the indexer keys, unless index_dtype is set.
  DType dtype = DType::bf16;
  /// The indexer keys' dtype when it is not `dtype`: f32, f16, bf16 or e4m3. Unset means "the
  /// same as dtype", so a configuration that never sets it keeps its meaning. The usual fp8
  /// choices: bf16 K/V with e4m3 keys (index_dtype = e4m3), or e4m3 K/V with bf16 keys
  /// (dtype = e4m3, index_dtype = bf16); dtype = e4m3 alone makes both e4m3.
  std::optional<DType> index_dtype;
  /// e4m3 indexer keys that append() quantizes: their per-token scale is max(absmax, 1e-4) / 448
  /// (f32) or the smallest power of two not below it (ue8m0, DeepGEMM's scale format). Ignored
  /// for other key dtypes.
  ScaleFormat index_scale_format = ScaleFormat::f32;
  /// e4m3 K/V: the dequantization scales (value = e4m3 value * scale; append() stores
  /// e4m3(x / scale), saturating at +-448): one for every kv head (size 1, "per tensor") or one
  /// per kv head (size num_kv_heads); finite and > 0. Required for e4m3 K/V, refused otherwise.
  std::vector<float> k_scales, v_scales;

  /// The indexer keys' dtype: index_dtype, or dtype when unset.
  DType index_key_dtype() const { return index_dtype.value_or(dtype); }
};

/// Handle of one sequence in a SharedKVCache. Ids are never reused by a cache.
enum class SequenceId : std::int64_t {};

/// No sequence: a batch slot left empty. It has length 0: its query rows route nothing, and
/// attention writes zeros for them (lse -inf). Engines pad a batch bucket with it.
inline constexpr SequenceId empty_slot = SequenceId{0};

struct MemoryStats {
  std::int64_t pages_total = 0;
  std::int64_t pages_used = 0;
  std::int64_t pages_free = 0;
  std::int64_t sequences = 0;
  std::int64_t tokens = 0;                // tokens stored over all sequences
  std::size_t kv_bytes_per_token = 0;     // K and V of all kv heads (of the K/V dtype)
  std::size_t index_bytes_per_token = 0;  // the indexer key (e4m3: index_dim + its 4-byte scale)
  std::size_t bytes_per_token = 0;        // the two above: what one cached token costs, once
  std::size_t pool_bytes = 0;             // device (or host) memory held by the pool
  /// What per-layer K/V caches (one per cross-decoder layer, as in a plain decoder) would hold
  /// for the same tokens: tokens * kv_bytes_per_token * layers.
  std::size_t per_layer_cache_bytes(int layers) const {
    return static_cast<std::size_t>(tokens) * kv_bytes_per_token * static_cast<std::size_t>(layers);
  }
  /// What this shared cache holds for them: tokens * bytes_per_token.
  std::size_t shared_cache_bytes() const { return static_cast<std::size_t>(tokens) * bytes_per_token; }
};

/// Where a paged pool's entries are. Element (page p, token slot o, kv head h, dim d) of K is at
/// k + p*k_page_stride + o*k_token_stride + h*k_head_stride + d (strides in elements of dtype); V
/// likewise; indexer key (p, o, d) at index_keys + p*index_page_stride + o*index_token_stride + d
/// (strides in elements of the index key dtype).
/// libclsa's own pools are token-major: [page][token][kv_head][head_dim] (a routed token's K of
/// all heads is one contiguous row) and [page][token][index_dim].
///
/// fp8. e4m3 indexer keys (index_key_dtype() == e4m3) have one f32 scale per token, that of key
/// (p, o) at index_scales + p*index_scale_page_stride + o*index_scale_token_stride (strides in
/// floats); key (p, o) = its e4m3 values * that scale. libclsa's own pools keep them the way
/// DeepGEMM's fp8_paged_mqa_logits reads them and vLLM's indexer_k_quant_and_cache writes them:
/// a page is page_size x index_dim e4m3 values, then page_size f32 scales (index_dim + 4 bytes a
/// token), i.e. index_page_stride = page_size * (index_dim + 4), index_token_stride = index_dim,
/// index_scales = (const float*)((const char*)index_keys + page_size * index_dim),
/// index_scale_page_stride = page_size * (index_dim + 4) / 4, index_scale_token_stride = 1.
/// An engine's vLLM DSA indexer cache ([pages, page_size, index_dim + 4] bytes) is
/// described by the same values. e4m3 K/V (dtype == e4m3): kv head h's scales are
/// k_scales[h * k_scale_stride] and v_scales[h * v_scale_stride] (stride 0: one scale for every
/// head), on the pool's device; K = e4m3 value * its scale, V likewise. Scale pointers are null
/// for other dtypes.
struct PagedCacheLayout {
  const void* k = nullptr;
  const void* v = nullptr;
  const void* index_keys = nullptr;
  DType dtype = DType::bf16;  // of K and V (and of the indexer keys when index_dtype is unset)
  Device device{};
  int num_kv_heads = 0;
  int head_dim = 0;
  int index_dim = 0;
  int page_size = 0;
  std::int64_t num_pages = 0;
  std::int64_t k_page_stride = 0, k_token_stride = 0, k_head_stride = 0;
  std::int64_t v_page_stride = 0, v_token_stride = 0, v_head_stride = 0;
  std::int64_t index_page_stride = 0, index_token_stride = 0;
  std::optional<DType> index_dtype;     // the indexer keys' dtype; unset: dtype (CacheConfig::index_dtype)
  const float* index_scales = nullptr;  // e4m3 indexer keys: their per-token scales
  std::int64_t index_scale_page_stride = 0, index_scale_token_stride = 0;
  const float* k_scales = nullptr;  // e4m3 K/V: per kv head (or one) dequantization scales
  const float* v_scales = nullptr;
  std::int64_t k_scale_stride = 0, v_scale_stride = 0;

  /// The indexer keys' dtype: index_dtype, or dtype when unset. (The layouts libclsa hands out,
  /// SharedKVCache::layout() and CacheBatch::layout(), always have index_dtype set.)
  DType index_key_dtype() const { return index_dtype.value_or(dtype); }
};

class CacheBatch;

namespace detail {
struct BatchStorage;
/// Records that a CUDA graph is capturing a call that reads `batch`'s tables (src/batch.cpp;
/// select() and forward() call it when their stream is capturing).
void mark_captured(const CacheBatch& batch);
}  // namespace detail

/// Page tables that the host engine owns (the FlashInfer/vLLM paged layout): sequence b holds
/// pages page_indices[page_indptr[b] .. page_indptr[b+1]), all full but the last, which holds
/// last_page_lengths[b] tokens (1..page_size); a sequence with no pages and last page length 0
/// is an empty slot (length 0). The device pointers are read by the kernels as they
/// are (no copy); host copies of page_indptr and last_page_lengths give the lengths to the host
/// (for checks and launch sizes). For a host (CPU) pool, pass the same pointers twice.
struct PageTableView {
  int num_sequences = 0;
  const std::int32_t* page_indptr = nullptr;             // [B+1], on the pool's device
  const std::int32_t* page_indices = nullptr;            // [page_indptr[B]], on the pool's device
  const std::int32_t* last_page_lengths = nullptr;       // [B], on the pool's device
  const std::int32_t* host_page_indptr = nullptr;        // [B+1], host
  const std::int32_t* host_last_page_lengths = nullptr;  // [B], host
};

/// The sequences of one batch, as the kernels see them: per sequence its pages (CSR:
/// page_indptr[B+1] into page_indices) and the length of its last page. Tables live on the cache's device; lengths are
/// also kept on the host. Cheap to copy: copies share the tables, and a refill of one that fits
/// them is seen by all (their num_sequences() and max_length() stay those of the refill they were
/// copied after); a refill that must grow a batch gives it new tables and leaves its copies as
/// they were. Tables of a reserve_batch() batch never grow. Tables that a CUDA graph captured
/// never move either (captured()): a refill that would grow them raises an Error instead.
class CacheBatch {
 public:
  CacheBatch() = default;

  /// Room of the tables: sequences, and pages over all sequences. A batch from
  /// SharedKVCache::reserve_batch has fixed capacity (its device tables never move); others grow.
  int capacity() const;
  std::int64_t page_capacity() const;
  bool fixed_capacity() const;
  /// Whether a CUDA graph captured a call that reads these tables: a select() or forward() over
  /// the batch (or a copy sharing its tables) made while its stream was capturing. From then on
  /// the tables never move, since the graph holds their addresses: a refill that fits writes
  /// them in place, one that would grow them (or give the batch other tables) raises Error and
  /// leaves the batch as it was. Stays set for the life of the tables. Never set on the CPU.
  bool captured() const;

  const PagedCacheLayout& layout() const { return layout_; }
  Device device() const { return layout_.device; }
  int num_sequences() const { return num_sequences_; }
  /// Host copy of the lengths, [num_sequences].
  const std::int32_t* lengths() const { return host_lengths_; }
  std::int64_t length(int sequence) const { return host_lengths_[sequence]; }
  /// Largest length in the batch (kernels size their grids and workspaces by it).
  std::int64_t max_length() const { return max_length_; }
  /// Tables on device() (FlashInfer's paged_kv_t layout, whoever filled them): page_indptr [B+1],
  /// page_indices [page_indptr[B]] and last_page_lengths [B]; sequence b's length is
  /// clsa::paged_length() of them (clsa/paged_view.hpp), 0 for an empty slot.
  const std::int32_t* device_last_page_lengths() const { return device_last_page_lengths_; }
  const std::int32_t* device_page_indptr() const { return device_page_indptr_; }
  const std::int32_t* device_page_indices() const { return device_page_indices_; }

  /// A batch over a pool and page tables that the host engine owns: nothing is copied, the
  /// kernels read `pool` and `tables` where they are. Checks the layout and the host tables
  /// (Error on an inconsistent one; Error(unsupported) for dtypes the pool's backend cannot read:
  /// on CUDA, for now, e4m3 or indexer keys of another dtype than K/V); allocates the host
  /// lengths only. Engine memory must outlive the batch, and the tables must not change while
  /// kernels that use them are in flight.
  static CacheBatch wrap(const PagedCacheLayout& pool, const PageTableView& tables);
  /// Same, refilling `reuse` (no allocation once it has held as many sequences). A `reuse` that
  /// holds a SharedKVCache's tables which a CUDA graph captured (captured()) raises
  /// Error(invalid_argument): those tables must not be dropped while the graph lives.
  static void wrap(const PagedCacheLayout& pool, const PageTableView& tables, CacheBatch& reuse);

 private:
  friend class SharedKVCache;
  friend void detail::mark_captured(const CacheBatch& batch);
  void point_at_tables(const std::int32_t* tables);
  PagedCacheLayout layout_{};
  int num_sequences_ = 0;
  std::int64_t max_length_ = 0;
  const std::int32_t* host_lengths_ = nullptr;
  const std::int32_t* device_last_page_lengths_ = nullptr;
  const std::int32_t* device_page_indptr_ = nullptr;
  const std::int32_t* device_page_indices_ = nullptr;
  std::shared_ptr<detail::BatchStorage> storage_;
};

/// One paged K/V/indexer-key cache shared by all cross-decoder layers.
///
/// Thread safety: distinct sequences may be added, appended to, released and read from several
/// host threads at once; one sequence must not be appended to from two threads at once (that
/// raises Error(invalid_argument)). batch() may run concurrently with appends to other sequences.
class SharedKVCache {
 public:
  /// Allocates the page pool on the backend's device (all of it, once). A configuration the
  /// backend has no kernels for raises Error(unsupported) (on CUDA, for now: e4m3 K/V or indexer
  /// keys, and indexer keys of another dtype than K/V).
  explicit SharedKVCache(const CacheConfig& config, Backend backend = Backend::automatic);
  /// A cache over a pool that the host engine allocated (`pool` describes its K, V and indexer
  /// key pages, any strides; pool.num_pages pages): libclsa manages sequences, pages and appends,
  /// the memory stays the engine's. `config` gives the dtypes and shapes, which must match `pool`
  /// (config.max_pages is taken from pool.num_pages; e4m3 K/V: config's scales must equal those
  /// the pool points at, read back once here). The pool's device decides the backend.
  static SharedKVCache wrap(const CacheConfig& config, const PagedCacheLayout& pool);
  ~SharedKVCache();
  SharedKVCache(SharedKVCache&&) noexcept;
  SharedKVCache& operator=(SharedKVCache&&) noexcept;
  SharedKVCache(const SharedKVCache&) = delete;
  SharedKVCache& operator=(const SharedKVCache&) = delete;

  const CacheConfig& config() const;
  Backend backend() const;
  Device device() const;
  PagedCacheLayout layout() const;

  SequenceId add_sequence();
  /// Returns the sequence's pages to the pool. Throws for an unknown id.
  void release(SequenceId sequence);
  bool contains(SequenceId sequence) const;
  std::int64_t length(SequenceId sequence) const;
  /// Page indices of the sequence, in position order.
  std::vector<std::int32_t> pages(SequenceId sequence) const;

  /// Appends T tokens: k and v [T, num_kv_heads, head_dim], index_keys [T, index_dim], on the
  /// cache's device, innermost stride 1. Each is of its cache dtype (k and v of config.dtype,
  /// index_keys of config.index_key_dtype()), except that what the cache keeps in e4m3 may also be
  /// given as f32, f16 or bf16 values, which append() quantizes: k and v with the config's scales
  /// (e4m3(x / scale), round to nearest even, saturating at +-448), each index key with a scale of
  /// its own (quantize_row_e4m3 with config.index_scale_format; the scale is stored with it).
  /// Values to be quantized must be finite: a NaN or an infinity raises Error(invalid_argument)
  /// naming the tensor and the element. Already-quantized e4m3 index_keys come with their per-token
  /// scales in `index_scales` (f32 [T], finite and > 0, stored as they are); index_scales stays
  /// undefined otherwise. Already-quantized e4m3 k and v are stored as they are.
  /// All-or-nothing: on any error (bad tensor, bad value, unknown sequence, too few free pages) the
  /// cache is left exactly as it was. On CUDA the copy is enqueued on `stream`.
  void append(SequenceId sequence, const TensorView& k, const TensorView& v, const TensorView& index_keys,
              Stream stream = {}, const TensorView& index_scales = {});

  /// The page tables of `sequences` (in that order; empty_slot entries are empty slots) for the
  /// kernels. Allocates its tables.
  CacheBatch batch(Span<SequenceId> sequences, Stream stream = {}) const;
  CacheBatch batch(std::initializer_list<SequenceId> sequences, Stream stream = {}) const {
    return batch(Span<SequenceId>(sequences.begin(), sequences.size()), stream);
  }
  /// An empty batch (no sequences yet) whose tables hold up to `max_sequences` sequences and
  /// max_sequences * ceil(max_length / page_size) pages in all. Its device tables are allocated
  /// here and never move: refills write them in place, so a CUDA graph captured over the batch
  /// stays valid while the engine refills it step after step.
  CacheBatch reserve_batch(int max_sequences, std::int64_t max_length) const;
  /// Refills `reuse` for `sequences` (empty_slot entries are empty slots). Slots past
  /// sequences.size(), up to the capacity, are emptied too: a graph captured over B slots may be
  /// replayed after a refill with fewer sequences. A fixed-capacity batch (reserve_batch) that
  /// cannot hold them raises Error(capacity_exceeded) and is left as it was; any other batch
  /// grows (geometrically: a decoding loop soon allocates nothing), except one that a CUDA graph
  /// captured (reuse.captured()): growing would move the tables under the graph, whose replays
  /// would then read freed memory, so such a refill raises Error(capacity_exceeded) naming
  /// reserve_batch and leaves the batch as it was (a refill that fits is written in place). Give
  /// every batch that a graph captures reserve_batch() bounds. On CUDA the tables are copied on
  /// `stream` from pinned staging; two staging buffers take turns, so a refill waits at most for
  /// the copy two refills back.
  void batch(Span<SequenceId> sequences, CacheBatch& reuse, Stream stream = {}) const;
  void batch(std::initializer_list<SequenceId> sequences, CacheBatch& reuse, Stream stream = {}) const {
    batch(Span<SequenceId>(sequences.begin(), sequences.size()), reuse, stream);
  }

  MemoryStats memory() const;

 private:
  struct State;
  SharedKVCache() = default;
  std::unique_ptr<State> state_;
};

/// Checks a pool description (pointers, dtypes, shapes, power-of-two page size, strides; the fp8
/// scale pointers and strides, and on the CPU the K/V scale values; 16-byte alignment of rows on
/// CUDA); throws Error naming `what` and the offending field.
void validate_layout(const char* what, const PagedCacheLayout& layout);

}  // namespace clsa
