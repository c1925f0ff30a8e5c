// The one seam between the components (src/*.cpp) and the backends that compute for them
// (src/cpu/, cuda/). Components check their arguments, keep their plans and make one call here;
// a backend implements every operation for its device. Includes run one way: components ->
// this interface <- backends, all on src/common (errors, checks, bounds).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "clsa/attention.hpp"
#include "clsa/cache.hpp"
#include "clsa/indexer.hpp"
#include "clsa/tensor.hpp"
#include "clsa/types.hpp"
#include "common/plan.hpp"

namespace clsa {
namespace detail {

/// One batch's page tables as every backend reads them (FlashInfer's paged_kv_t), on the batch's
/// device: sequence b's length is paged_length() of them (clsa/paged_view.hpp); the host keeps
/// the lengths too.
struct BatchTables {
  PagedCacheLayout layout;
  int num_sequences = 0;
  std::int64_t max_length = 0;
  const std::int32_t* host_lengths = nullptr;  // [B], on the host
  const std::int32_t* last_page_lengths = nullptr;
  const std::int32_t* page_indptr = nullptr;  // [B+1]
  const std::int32_t* page_indices = nullptr;
};
BatchTables batch_tables(const CacheBatch& batch);

/// A backend's plan for one component's bounds: fixes the backend's part of the workspace.
class Plan {
 public:
  virtual ~Plan() = default;
  std::size_t workspace_bytes = 0;  // the backend's scratch (the component adds its own pieces)
};

/// One select(): T query tokens per sequence of the batch, into `out` (out.top_k is the indexer's).
struct SelectCall {
  BatchTables batch;
  TensorView q_idx, head_weights;
  RoutingIndex out;
  int tokens = 0;
};

/// One forward(): over `routing` (sparse) or every visible position (dense: routing == nullptr).
struct AttendCall {
  BatchTables batch;
  const RoutingIndex* routing = nullptr;
  TensorView q, out, lse;
  float scale = 0.0f;
  int tokens = 0;
};

/// One append(): k, v [T, Hkv, D] and index_keys [T, D_idx] to positions first_position.. of a
/// sequence whose pages (in position order, from page 0) are `pages`. The component has checked
/// everything: a tensor of the pool's dtype is copied; one of an activation dtype going into an
/// e4m3 pool is quantized (K/V with layout's k_scales / v_scales, index keys per token with
/// `index_scale_format`; its values are finite); e4m3 index_keys come with index_scales [T].
struct AppendCall {
  PagedCacheLayout layout;  // index_dtype set
  int page_shift = 0;
  const std::int32_t* pages = nullptr;
  std::int64_t first_position = 0;
  TensorView k, v, index_keys;
  TensorView index_scales;  // f32 [T], with e4m3 index_keys only
  ScaleFormat index_scale_format = ScaleFormat::f32;
};

/// What kernels found that the host could not check before they ran (a CUDA-graph replay runs
/// no host code): a sequence beyond the plan. Backends whose calls check everything first have
/// none.
class StatusReport {
 public:
  virtual ~StatusReport() = default;
  /// Where the kernels write the report (the backend's format).
  virtual void* device_view() const = 0;
  /// Throws Error(capacity_exceeded) naming `function` for a report since the last check (and
  /// clears it); `consequence` says what the kernels did instead.
  virtual void check(const char* function, const char* consequence) = 0;
};

/// The int32 page tables of a fixed-capacity batch: written on the host, published to the
/// kernels at an address that never changes.
class TableUpload {
 public:
  virtual ~TableUpload() = default;
  /// The host array the next refill writes (CUDA: a staging buffer whose last copy is done).
  virtual std::int32_t* next() = 0;
  /// Publishes the `used` leading entries just written; returns the kernels' tables.
  virtual const std::int32_t* publish(std::size_t used, Stream stream) = 0;
};

class ComputeBackend {
 public:
  virtual ~ComputeBackend() = default;
  virtual Backend kind() const = 0;

  // Devices and memory.
  /// The device a component made now computes on.
  virtual Device current_device() const = 0;
  /// Makes `device` current; returns what to hand restore_current() (the caller's device).
  virtual int make_current(Device device) const = 0;
  virtual void restore_current(int previous) const noexcept = 0;
  /// `bytes` (256-byte aligned) on `device`; Error when that fails.
  virtual void* allocate(Device device, std::size_t bytes) const = 0;
  virtual void deallocate(Device device, void* pointer) const noexcept = 0;
  /// Zeroes `bytes` at `data` on `device`: on `stream` when on_stream, else before returning.
  virtual void zero(Device device, void* data, std::size_t bytes, Stream stream, bool on_stream) const = 0;
  /// Copies between the host and this backend's devices (or within them), synchronously.
  virtual void copy(void* dst, const void* src, std::size_t bytes) const = 0;
  virtual void synchronize(Stream stream) const = 0;
  /// Whether `stream` is capturing a CUDA graph now (one query of its capture status; false on a
  /// backend without graphs).
  virtual bool capturing(Stream stream) const = 0;
  virtual std::unique_ptr<TableUpload> make_table_upload(Device device, std::size_t entries) const = 0;
  /// Null when the backend has nothing to report after the fact.
  virtual std::unique_ptr<StatusReport> make_status_report() const = 0;

  // The cache.
  /// Empty when the backend stores (appends) and computes over (indexer, attention) a cache of
  /// K/V of `kv_dtype` and indexer keys of `index_dtype`, else why not.
  virtual std::string cache_unsupported(DType kv_dtype, DType index_dtype) const = 0;
  virtual void append(const AppendCall& call, Stream stream) const = 0;

  // The indexer. *_unsupported: empty when the backend runs the configuration, else why not
  // (what CUTLASS calls can_implement).
  /// Over indexer keys of `dtype`.
  virtual std::string indexer_unsupported(const IndexerConfig& config, DType dtype) const = 0;
  virtual std::unique_ptr<Plan> plan_indexer(const IndexerConfig& config, const Bounds& bounds) const = 0;
  virtual void select(const IndexerConfig& config, const SelectCall& call, const Plan& plan, void* scratch,
                      StatusReport* status, Stream stream) const = 0;
  /// Whether select() gathers routed K/V rows (RoutingIndex::kv) of `head_dim` elements of `dtype`.
  virtual std::string routed_kv_unsupported(DType dtype, int head_dim) const = 0;
  /// clsa::keep_routed_kv_in_l2 on one of this backend's devices; the bytes granted.
  virtual std::size_t keep_routed_kv_in_l2(Device device, std::size_t bytes) const = 0;

  // Attention (sparse and dense).
  /// The configuration's shapes (every f32, f16 and bf16 cache is supported where they are).
  virtual std::string attention_unsupported(const AttentionConfig& config) const = 0;
  /// Over K/V of `kv_dtype`, for a configuration that attention_unsupported() accepts.
  virtual std::string attention_kv_unsupported(const AttentionConfig& config, DType kv_dtype) const = 0;
  virtual std::unique_ptr<Plan> plan_attention(const AttentionConfig& config, const Bounds& bounds) const = 0;
  virtual void attend(const AttentionConfig& config, const AttendCall& call, const Plan& plan, void* scratch,
                      StatusReport* status, Stream stream) const = 0;
};

/// The backend of a resolved Backend (cpu or cuda); Error(unsupported) for cuda in a build
/// without it. Defined in registry.cpp, the one place that knows which backends were built.
const ComputeBackend& compute_backend(Backend backend);
/// The backend that owns memory on `device`.
const ComputeBackend& backend_of(Device device);
/// CUDA devices present (0 in a build without CUDA, or without driver or device).
int cuda_devices();

}  // namespace detail
}  // namespace clsa
