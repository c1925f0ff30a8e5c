// SparseCrossAttention and DenseCrossAttention: checks and plans; the backend computes. Both run
// the same code: dense is attention over the contiguous range of visible positions.
#include "clsa/attention.hpp"

#include <algorithm>
#include <cmath>
#include <utility>

#include "backend/backend.hpp"
#include "backend/component_core.hpp"
#include "backend/memory.hpp"
#include "clsa/paged_view.hpp"
#include "common/check.hpp"
#include "common/plan.hpp"

namespace clsa {

namespace {

/// What sparse and dense attention share: the component core (backend, plan, workspace, status)
/// and the configuration with its softmax scale.
struct AttentionCore : detail::ComponentCore {
  AttentionConfig config;
  float scale = 0.0f;

  AttentionCore(const char* fn, const AttentionConfig& c, Backend requested, const char* span)
      : ComponentCore(checked(fn, c, requested), span), config(c) {
    scale = c.softmax_scale > 0.0f ? c.softmax_scale : 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    const std::string unsupported = ops->attention_unsupported(c);
    if (!unsupported.empty()) detail::fail(ErrorCode::unsupported, detail::concat(fn, ": ", unsupported));
  }

  /// The configuration's checks, made before the backend is resolved; returns `requested`.
  static Backend checked(const char* fn, const AttentionConfig& c, Backend requested) {
    detail::check_positive(fn, "config.num_q_heads", c.num_q_heads);
    detail::check_positive(fn, "config.num_kv_heads", c.num_kv_heads);
    detail::check_positive(fn, "config.head_dim", c.head_dim);
    if (c.num_q_heads % c.num_kv_heads != 0) {
      detail::fail(ErrorCode::invalid_argument,
                   detail::concat(fn, ": config.num_q_heads = ", c.num_q_heads,
                                  " is not a multiple of config.num_kv_heads = ", c.num_kv_heads));
    }
    if (c.softmax_scale < 0.0f || std::isnan(c.softmax_scale) || std::isinf(c.softmax_scale)) {
      detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": config.softmax_scale = ", c.softmax_scale,
                                                               "; it must be finite and >= 0 (0 = 1/sqrt(head_dim))"));
    }
    return requested;
  }

  std::unique_ptr<detail::Plan> make_plan(const detail::Bounds& bounds, std::size_t* bytes) const override {
    std::unique_ptr<detail::Plan> next = ops->plan_attention(config, bounds);
    *bytes = next->workspace_bytes;
    return next;
  }

  /// Plans (or checks against the plan) a call of `sequences` x `tokens` rows over `span`.
  void prepare(const char* fn, int sequences, int tokens, std::int64_t span, bool round_span, Stream stream) {
    ComponentCore::prepare(fn, {sequences, tokens, std::max<std::int64_t>(span, 1)}, round_span, stream);
  }

  void check_status(const char* fn) { ComponentCore::check_status(fn, "its rows were written as zeros"); }

  /// Checks shared by both: batch, q, out, lse; returns T.
  int check(const char* fn, const CacheBatch& batch, const TensorView& q, const TensorView& out,
            const TensorView& lse) {
    check_status(fn);
    const AttentionConfig& c = config;
    check_batch(fn, batch, "attention");
    const PagedCacheLayout& layout = batch.layout();
    if (layout.num_kv_heads != c.num_kv_heads || layout.head_dim != c.head_dim) {
      detail::fail(
          ErrorCode::shape_mismatch,
          detail::concat(fn, ": batch's cache has num_kv_heads ", layout.num_kv_heads, ", head_dim ", layout.head_dim,
                         " but config has num_kv_heads ", c.num_kv_heads, ", head_dim ", c.head_dim));
    }
    const std::int64_t sequences = batch.num_sequences();
    const std::int64_t tokens = q.defined() && q.rank() > 1 ? q.size(1) : 0;
    // q and out have the cache's dtype; over e4m3 K/V, q is f32, f16 or bf16 and out of q's dtype.
    if (layout.dtype == DType::e4m3) {
      detail::check_float_tensor(fn, "q", q, device, {sequences, tokens, c.num_q_heads, c.head_dim});
    } else {
      detail::check_tensor(fn, "q", q, layout.dtype, device, {sequences, tokens, c.num_q_heads, c.head_dim});
    }
    detail::check_positive(fn, "q.size(1) (query tokens T)", tokens);
    detail::check_tensor(fn, "out", out, q.dtype(), device, {sequences, tokens, c.num_q_heads, c.head_dim});
    if (lse.defined()) detail::check_tensor(fn, "lse", lse, DType::f32, device, {sequences, tokens, c.num_q_heads});
    if (backend == Backend::cuda) detail::check_vector_aligned(fn, "q", q);
    check_lengths(fn, batch, tokens, "an empty slot holds 0");
    const std::string unsupported = ops->attention_kv_unsupported(c, layout.dtype);
    if (!unsupported.empty()) detail::fail(ErrorCode::unsupported, detail::concat(fn, ": ", unsupported));
    return static_cast<int>(tokens);
  }

  /// routing == nullptr means dense.
  void forward(const CacheBatch& batch, const RoutingIndex* routing, const TensorView& q, const TensorView& out,
               const TensorView& lse, Stream stream) {
    detail::AttendCall call;
    call.batch = detail::batch_tables(batch);
    call.routing = routing;
    call.q = q;
    call.out = out;
    call.lse = lse;
    call.scale = scale;
    call.tokens = static_cast<int>(q.size(1));
    note_capture(batch, stream);
    ops->attend(config, call, *planned.plan, planned.base, status.get(), stream);
  }
};

/// CPU only (the values are on the host): every count in [0, top_k], every routed position
/// visible to its query token. The CUDA kernels skip positions outside that range instead.
void check_routing_values(const char* fn, const CacheBatch& batch, const RoutingIndex& routing, int tokens) {
  const RoutingRows rows = RoutingRows::of(routing);
  for (int b = 0; b < batch.num_sequences(); ++b) {
    for (int t = 0; t < tokens; ++t) {
      const int visible = visible_length(batch.length(b), tokens, t);
      const std::int32_t count = rows.count(b, t);
      if (count < 0 || count > routing.top_k) {
        detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": routing.counts[", b, ",", t, "] = ", count,
                                                                 "; expected 0..top_k = ", routing.top_k));
      }
      const std::int32_t* routed = rows.row_positions(b, t);
      for (std::int32_t i = 0; i < count; ++i) {
        if (routed[i] < 0 || routed[i] >= visible) {
          detail::fail(ErrorCode::invalid_argument,
                       detail::concat(fn, ": routing.positions[", b, ",", t, ",", i, "] = ", routed[i],
                                      " is not a visible position (0..", visible - 1, ") of batch sequence ", b));
        }
      }
    }
  }
}

}  // namespace

struct SparseCrossAttention::State : AttentionCore {
  using AttentionCore::AttentionCore;
};

struct DenseCrossAttention::State : AttentionCore {
  using AttentionCore::AttentionCore;
};

SparseCrossAttention::SparseCrossAttention(const AttentionConfig& config, Backend backend)
    : state_(std::make_unique<State>("SparseCrossAttention", config, backend, "top_k")) {}
bool SparseCrossAttention::supports(const AttentionConfig& config, Backend backend, std::string* why) {
  std::string reason;
  if (backend == Backend::cuda && cuda_device_count() == 0) {
    reason = built_with_cuda() ? "no CUDA device is present" : "this build has no CUDA support";
  } else {
    reason = detail::compute_backend(resolve_backend(backend)).attention_unsupported(config);
  }
  if (why != nullptr) *why = reason;
  return reason.empty();
}

bool SparseCrossAttention::supports(const AttentionConfig& config, DType kv_dtype, Backend backend, std::string* why) {
  std::string reason;
  if (!detail::is_cache_dtype(kv_dtype)) {
    reason = detail::concat("the K/V dtype must be f32, f16, bf16 or e4m3, not ", dtype_name(kv_dtype));
  } else if (supports(config, backend, &reason)) {
    reason = detail::compute_backend(resolve_backend(backend)).attention_kv_unsupported(config, kv_dtype);
  }
  if (why != nullptr) *why = reason;
  return reason.empty();
}

SparseCrossAttention::~SparseCrossAttention() = default;
SparseCrossAttention::SparseCrossAttention(SparseCrossAttention&&) noexcept = default;
SparseCrossAttention& SparseCrossAttention::operator=(SparseCrossAttention&&) noexcept = default;
const AttentionConfig& SparseCrossAttention::config() const {
  return state_->config;
}
Backend SparseCrossAttention::backend() const {
  return state_->backend;
}
Device SparseCrossAttention::device() const {
  return state_->device;
}

std::size_t SparseCrossAttention::workspace_bytes(int max_sequences, int max_tokens, int top_k) const {
  return state_->bytes("SparseCrossAttention::workspace_bytes", {max_sequences, max_tokens, top_k});
}

void SparseCrossAttention::set_workspace(void* data, std::size_t bytes, int max_sequences, int max_tokens, int top_k) {
  state_->set_workspace("SparseCrossAttention::set_workspace", data, bytes, {max_sequences, max_tokens, top_k});
}

void SparseCrossAttention::reserve(int max_sequences, int max_tokens, int top_k) {
  state_->reserve("SparseCrossAttention::reserve", {max_sequences, max_tokens, top_k});
}

void SparseCrossAttention::forward(const CacheBatch& batch, const RoutingIndex& routing, const TensorView& q,
                                   const TensorView& out, Stream stream, const TensorView& lse) {
  const char* fn = "SparseCrossAttention::forward";
  State& s = *state_;
  const detail::DeviceGuard guard(s.device);
  const int tokens = s.check(fn, batch, q, out, lse);
  const std::int64_t sequences = batch.num_sequences();
  if (!routing.defined()) detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": routing is empty"));
  detail::check_positive(fn, "routing.top_k", routing.top_k);
  detail::check_tensor(fn, "routing.positions", routing.positions, DType::i32, s.device,
                       {sequences, tokens, routing.top_k});
  detail::check_tensor(fn, "routing.counts", routing.counts, DType::i32, s.device, {sequences, tokens});
  if (routing.slots.defined()) {
    detail::check_tensor(fn, "routing.slots", routing.slots, DType::i32, s.device, {sequences, tokens, routing.top_k});
  }
  if (routing.kv.defined()) {
    detail::check_routed_kv(fn, "routing.kv", routing.kv, batch.layout(), s.device, sequences, tokens, routing.top_k);
    if (s.backend == Backend::cuda) detail::check_vector_aligned(fn, "routing.kv", routing.kv);
  }
  if (s.backend == Backend::cpu) check_routing_values(fn, batch, routing, tokens);
  s.prepare(fn, static_cast<int>(sequences), tokens, routing.top_k, false, stream);
  s.forward(batch, &routing, q, out, lse, stream);
}

DenseCrossAttention::DenseCrossAttention(const AttentionConfig& config, Backend backend)
    : state_(std::make_unique<State>("DenseCrossAttention", config, backend, "max_length")) {}
DenseCrossAttention::~DenseCrossAttention() = default;
DenseCrossAttention::DenseCrossAttention(DenseCrossAttention&&) noexcept = default;
DenseCrossAttention& DenseCrossAttention::operator=(DenseCrossAttention&&) noexcept = default;
const AttentionConfig& DenseCrossAttention::config() const {
  return state_->config;
}
Backend DenseCrossAttention::backend() const {
  return state_->backend;
}
Device DenseCrossAttention::device() const {
  return state_->device;
}

std::size_t DenseCrossAttention::workspace_bytes(int max_sequences, int max_tokens, std::int64_t max_length) const {
  return state_->bytes("DenseCrossAttention::workspace_bytes", {max_sequences, max_tokens, max_length});
}

void DenseCrossAttention::set_workspace(void* data, std::size_t bytes, int max_sequences, int max_tokens,
                                        std::int64_t max_length) {
  state_->set_workspace("DenseCrossAttention::set_workspace", data, bytes, {max_sequences, max_tokens, max_length});
}

void DenseCrossAttention::reserve(int max_sequences, int max_tokens, std::int64_t max_length) {
  state_->reserve("DenseCrossAttention::reserve", {max_sequences, max_tokens, max_length});
}

void DenseCrossAttention::check_status() {
  state_->check_status("DenseCrossAttention::check_status");
}

void DenseCrossAttention::forward(const CacheBatch& batch, const TensorView& q, const TensorView& out, Stream stream,
                                  const TensorView& lse) {
  const char* fn = "DenseCrossAttention::forward";
  State& s = *state_;
  const detail::DeviceGuard guard(s.device);
  const int tokens = s.check(fn, batch, q, out, lse);
  s.prepare(fn, batch.num_sequences(), tokens, batch.max_length(), true, stream);
  s.forward(batch, nullptr, q, out, lse, stream);
}

}  // namespace clsa
