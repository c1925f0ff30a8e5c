// CrossLayerIndexer: argument checks and plans; the backend (src/backend/backend.hpp) computes.
#include "clsa/indexer.hpp"

#include <algorithm>
#include <limits>
#include <utility>

#include "backend/backend.hpp"
#include "backend/component_core.hpp"
#include "backend/memory.hpp"
#include "common/check.hpp"
#include "common/plan.hpp"

namespace clsa {

namespace {
/// Whether every pool slot (page * page_size + offset) of the layout fits RoutingIndex::slots.
bool slots_fit_int32(const PagedCacheLayout& layout) {
  return layout.num_pages <= std::numeric_limits<std::int32_t>::max() / std::max(layout.page_size, 1);
}
}  // namespace

struct CrossLayerIndexer::State : detail::ComponentCore {
  IndexerConfig config;
  // One workspace holds everything: the RoutingIndex that select() returns (positions
  // [B, T, top_k], counts [B, T], slots [B, T, top_k], the routed K/V block when gathering), then
  // the backend's scratch. Bounds' span = max_length.
  // gather_routed_kv(): whether select() fills RoutingIndex::kv, and the block's geometry.
  bool gathers = false;
  CacheConfig routed_kv{};

  State(const IndexerConfig& c, Backend requested)
      : ComponentCore(checked("CrossLayerIndexer", c, requested), "max_length"), config(c) {}

  /// The configuration's checks, made before the backend is resolved; returns `requested`.
  static Backend checked(const char* fn, const IndexerConfig& config, Backend requested) {
    detail::check_positive(fn, "config.num_heads", config.num_heads);
    detail::check_positive(fn, "config.index_dim", config.index_dim);
    detail::check_positive(fn, "config.top_k", config.top_k);
    if (config.sink_tokens < 0 || config.local_window < 0) {
      detail::fail(ErrorCode::invalid_argument,
                   detail::concat(fn, ": config.sink_tokens = ", config.sink_tokens,
                                  ", config.local_window = ", config.local_window, "; both must be >= 0"));
    }
    if (std::int64_t{config.sink_tokens} + config.local_window > config.top_k) {
      detail::fail(ErrorCode::invalid_argument,
                   detail::concat(fn, ": config.sink_tokens + config.local_window = ", config.sink_tokens, " + ",
                                  config.local_window, " exceeds config.top_k = ", config.top_k,
                                  " (they are counted inside top_k)"));
    }
    if (!(config.scale > 0.0f) || config.scale == std::numeric_limits<float>::infinity()) {
      detail::fail(ErrorCode::invalid_argument,
                   detail::concat(fn, ": config.scale = ", config.scale, "; it must be finite and > 0"));
    }
    return requested;
  }

  struct Pieces {
    std::int32_t* positions;
    std::int32_t* counts;
    std::int32_t* slots;
    unsigned char* kv;  // [rows, 2, Hkv, top_k, head_dim] when gathering
    void* scratch;      // the backend's
  };
  std::size_t routed_kv_row_bytes() const {
    if (!gathers) return 0;
    return 2 * static_cast<std::size_t>(routed_kv.num_kv_heads) * static_cast<std::size_t>(config.top_k) *
           static_cast<std::size_t>(routed_kv.head_dim) * dtype_size(routed_kv.dtype);
  }
  Pieces carve(detail::Carver& carver, const detail::Bounds& bounds, std::size_t scratch_bytes) const {
    const std::size_t rows = static_cast<std::size_t>(bounds.sequences) * static_cast<std::size_t>(bounds.tokens);
    Pieces pieces{};
    pieces.positions = carver.take<std::int32_t>(rows * static_cast<std::size_t>(config.top_k));
    pieces.counts = carver.take<std::int32_t>(rows);
    pieces.slots = carver.take<std::int32_t>(rows * static_cast<std::size_t>(config.top_k));
    pieces.kv = carver.take<unsigned char>(rows * routed_kv_row_bytes());
    pieces.scratch = carver.take<unsigned char>(scratch_bytes);
    return pieces;
  }
  std::unique_ptr<detail::Plan> make_plan(const detail::Bounds& bounds, std::size_t* bytes) const override {
    std::unique_ptr<detail::Plan> next = ops->plan_indexer(config, bounds);
    detail::Carver counter;
    carve(counter, bounds, next->workspace_bytes);
    *bytes = counter.used();
    return next;
  }
  void check_status(const char* fn) { ComponentCore::check_status(fn, "its query rows routed nothing"); }

  /// Checks batch, q_idx and head_weights; returns T.
  int check_inputs(const char* fn, const CacheBatch& batch, const TensorView& q_idx, const TensorView& head_weights);
  /// Selects into `out`, or (out == nullptr) into the workspace's own index, returned in *returned.
  void run(const char* fn, const CacheBatch& batch, const TensorView& q_idx, const TensorView& head_weights,
           const RoutingIndex* out, RoutingIndex* returned, Stream stream);
};

CrossLayerIndexer::CrossLayerIndexer(const IndexerConfig& config, Backend backend)
    : state_(std::make_unique<State>(config, backend)) {}

bool CrossLayerIndexer::supports(const IndexerConfig& config, DType cache_dtype, Backend backend, std::string* why) {
  std::string reason;
  if (backend == Backend::cuda && cuda_device_count() == 0) {
    reason = built_with_cuda() ? "no CUDA device is present" : "this build has no CUDA support";
  } else if (!detail::is_cache_dtype(cache_dtype)) {
    reason = detail::concat("the indexer key dtype must be f32, f16, bf16 or e4m3, not ", dtype_name(cache_dtype));
  } else {
    reason = detail::compute_backend(resolve_backend(backend)).indexer_unsupported(config, cache_dtype);
  }
  if (why != nullptr) *why = reason;
  return reason.empty();
}

CrossLayerIndexer::~CrossLayerIndexer() = default;
CrossLayerIndexer::CrossLayerIndexer(CrossLayerIndexer&&) noexcept = default;
CrossLayerIndexer& CrossLayerIndexer::operator=(CrossLayerIndexer&&) noexcept = default;

const IndexerConfig& CrossLayerIndexer::config() const {
  return state_->config;
}
Backend CrossLayerIndexer::backend() const {
  return state_->backend;
}
Device CrossLayerIndexer::device() const {
  return state_->device;
}

std::size_t CrossLayerIndexer::workspace_bytes(int max_sequences, int max_tokens, std::int64_t max_length) const {
  return state_->bytes("CrossLayerIndexer::workspace_bytes", {max_sequences, max_tokens, max_length});
}

void CrossLayerIndexer::set_workspace(void* data, std::size_t bytes, int max_sequences, int max_tokens,
                                      std::int64_t max_length) {
  state_->set_workspace("CrossLayerIndexer::set_workspace", data, bytes, {max_sequences, max_tokens, max_length});
}

void CrossLayerIndexer::reserve(int max_sequences, int max_tokens, std::int64_t max_length) {
  state_->reserve("CrossLayerIndexer::reserve", {max_sequences, max_tokens, max_length});
}

void CrossLayerIndexer::check_status() {
  state_->check_status("CrossLayerIndexer::check_status");
}

int CrossLayerIndexer::State::check_inputs(const char* fn, const CacheBatch& batch, const TensorView& q_idx,
                                           const TensorView& head_weights) {
  check_status(fn);
  const IndexerConfig& c = config;
  check_batch(fn, batch, "indexer");
  const PagedCacheLayout& layout = batch.layout();
  if (layout.index_dim != c.index_dim) {
    detail::fail(ErrorCode::shape_mismatch, detail::concat(fn, ": batch's cache has index_dim ", layout.index_dim,
                                                           " but config.index_dim = ", c.index_dim));
  }
  const std::int64_t sequences = batch.num_sequences();
  const std::int64_t tokens = q_idx.defined() && q_idx.rank() > 1 ? q_idx.size(1) : 0;
  // q_idx has the indexer keys' dtype; over e4m3 keys it is f32, f16 or bf16 (not quantized).
  const DType key_dtype = layout.index_key_dtype();
  if (key_dtype == DType::e4m3) {
    detail::check_float_tensor(fn, "q_idx", q_idx, device, {sequences, tokens, c.num_heads, c.index_dim});
  } else {
    detail::check_tensor(fn, "q_idx", q_idx, key_dtype, device, {sequences, tokens, c.num_heads, c.index_dim});
  }
  detail::check_positive(fn, "q_idx.size(1) (query tokens T)", tokens);
  detail::check_float_tensor(fn, "head_weights", head_weights, device, {sequences, tokens, c.num_heads});
  check_lengths(fn, batch, tokens, "append the query tokens' keys first; an empty slot holds 0");
  const std::string unsupported = ops->indexer_unsupported(c, key_dtype);
  if (!unsupported.empty()) detail::fail(ErrorCode::unsupported, detail::concat(fn, ": ", unsupported));
  if (backend == Backend::cuda && q_idx.dtype() != DType::f32) detail::check_vector_aligned(fn, "q_idx", q_idx);
  return static_cast<int>(tokens);
}

void CrossLayerIndexer::State::run(const char* fn, const CacheBatch& batch, const TensorView& q_idx,
                                   const TensorView& head_weights, const RoutingIndex* out, RoutingIndex* returned,
                                   Stream stream) {
  const int tokens = static_cast<int>(q_idx.size(1));
  const int sequences = batch.num_sequences();
  prepare(fn, {sequences, tokens, std::max<std::int64_t>(batch.max_length(), 1)}, true, stream);
  const detail::Bounds& bounds = planned.book.bounds();
  detail::Carver carver(planned.base);
  const Pieces pieces = carve(carver, bounds, planned.plan->workspace_bytes);
  detail::SelectCall select_call;
  select_call.batch = detail::batch_tables(batch);
  // Pool slots are int32: a pool of more than 2^31 token slots gets no slots (forward() then looks
  // the pages up).
  const bool slots_fit = slots_fit_int32(select_call.batch.layout);
  RoutingIndex target;
  if (out == nullptr) {
    target.top_k = config.top_k;
    target.positions = TensorView(pieces.positions, DType::i32, {sequences, tokens, config.top_k}, device);
    target.counts = TensorView(pieces.counts, DType::i32, {sequences, tokens}, device);
    if (slots_fit) target.slots = TensorView(pieces.slots, DType::i32, {sequences, tokens, config.top_k}, device);
    if (gathers) {
      target.kv = TensorView(pieces.kv, routed_kv.dtype,
                             {sequences, tokens, 2, routed_kv.num_kv_heads, config.top_k, routed_kv.head_dim}, device);
    }
    *returned = target;
    out = &target;
  }
  select_call.q_idx = q_idx;
  select_call.head_weights = head_weights;
  select_call.out = *out;
  select_call.out.top_k = config.top_k;  // the rows' length (checked); a caller's `out` may leave top_k unset
  select_call.tokens = tokens;
  note_capture(batch, stream);
  ops->select(config, select_call, *planned.plan, pieces.scratch, status.get(), stream);
}

RoutingIndex CrossLayerIndexer::select(const CacheBatch& batch, const TensorView& q_idx, const TensorView& head_weights,
                                       Stream stream) {
  const char* fn = "CrossLayerIndexer::select";
  State& s = *state_;
  const detail::DeviceGuard guard(s.device);
  s.check_inputs(fn, batch, q_idx, head_weights);
  const PagedCacheLayout& layout = batch.layout();
  const CacheConfig& kv = s.routed_kv;
  if (s.gathers &&
      (layout.num_kv_heads != kv.num_kv_heads || layout.head_dim != kv.head_dim || layout.dtype != kv.dtype)) {
    detail::fail(ErrorCode::shape_mismatch,
                 detail::concat(fn, ": batch's cache has ", layout.num_kv_heads, " kv heads of head_dim ",
                                layout.head_dim, " in ", dtype_name(layout.dtype), " but gather_routed_kv() planned ",
                                kv.num_kv_heads, " of ", kv.head_dim, " in ", dtype_name(kv.dtype)));
  }
  RoutingIndex returned;
  s.run(fn, batch, q_idx, head_weights, nullptr, &returned, stream);
  return returned;
}

void CrossLayerIndexer::select(const CacheBatch& batch, const TensorView& q_idx, const TensorView& head_weights,
                               const RoutingIndex& out, Stream stream) {
  const char* fn = "CrossLayerIndexer::select";
  State& s = *state_;
  const detail::DeviceGuard guard(s.device);
  const std::int64_t tokens = s.check_inputs(fn, batch, q_idx, head_weights);
  const std::int64_t sequences = batch.num_sequences();
  detail::check_tensor(fn, "out.positions", out.positions, DType::i32, s.device, {sequences, tokens, s.config.top_k});
  detail::check_tensor(fn, "out.counts", out.counts, DType::i32, s.device, {sequences, tokens});
  if (out.slots.defined()) {
    detail::check_tensor(fn, "out.slots", out.slots, DType::i32, s.device, {sequences, tokens, s.config.top_k});
    const PagedCacheLayout& layout = batch.layout();
    if (!slots_fit_int32(layout)) {
      detail::fail(ErrorCode::invalid_argument,
                   detail::concat(fn, ": out.slots [", sequences, ", ", tokens, ", ", s.config.top_k, "]: a pool of ",
                                  layout.num_pages, " pages x ", layout.page_size,
                                  " tokens has slots beyond int32; pass an index without slots"));
    }
  }
  if (out.kv.defined()) {
    const PagedCacheLayout& layout = batch.layout();
    detail::check_routed_kv(fn, "out.kv", out.kv, layout, s.device, sequences, tokens, s.config.top_k);
    const std::string unsupported = s.ops->routed_kv_unsupported(layout.dtype, layout.head_dim);
    if (!unsupported.empty()) detail::fail(ErrorCode::unsupported, detail::concat(fn, ": out.kv: ", unsupported));
    if (s.backend == Backend::cuda) detail::check_vector_aligned(fn, "out.kv", out.kv);
  }
  s.run(fn, batch, q_idx, head_weights, &out, nullptr, stream);
}

void CrossLayerIndexer::gather_routed_kv(const CacheConfig& cache, bool enabled) {
  const char* fn = "CrossLayerIndexer::gather_routed_kv";
  State& s = *state_;
  CacheConfig next = s.routed_kv;
  if (enabled) {
    detail::check_positive(fn, "cache.num_kv_heads", cache.num_kv_heads);
    detail::check_positive(fn, "cache.head_dim", cache.head_dim);
    if (!detail::is_cache_dtype(cache.dtype)) {
      detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": cache.dtype is ", dtype_name(cache.dtype),
                                                               "; K and V are f32, f16, bf16 or e4m3"));
    }
    const std::string unsupported = s.ops->routed_kv_unsupported(cache.dtype, cache.head_dim);
    if (!unsupported.empty()) detail::fail(ErrorCode::unsupported, detail::concat(fn, ": ", unsupported));
    next.num_kv_heads = cache.num_kv_heads;
    next.head_dim = cache.head_dim;
    next.dtype = cache.dtype;
  }
  const CacheConfig previous = s.routed_kv;
  const bool previously = s.gathers;
  s.routed_kv = next;
  s.gathers = enabled;
  try {
    s.replan(fn);  // the block is part of the plan's workspace (an unplanned indexer carves it later)
  } catch (...) {
    s.routed_kv = previous;
    s.gathers = previously;
    throw;
  }
}

bool CrossLayerIndexer::gathers_routed_kv() const {
  return state_->gathers;
}

std::size_t keep_routed_kv_in_l2(Device device, std::size_t bytes) {
  return detail::backend_of(device).keep_routed_kv_in_l2(device, bytes);
}

}  // namespace clsa
