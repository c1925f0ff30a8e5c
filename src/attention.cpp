// SparseCrossAttention and DenseCrossAttention: checks, the threaded CPU path, CUDA dispatch.
// Both run the same code: dense is attention over the contiguous range of visible positions.
#include "clsa/attention.hpp"

#include <cmath>
#include <utility>

#include "check.hpp"
#include "clsa/cpu/attention.hpp"
#include "cpu_util.hpp"
#include "cuda_check.hpp"
#include "memory.hpp"
#include "plan.hpp"
#include "run_status.hpp"
#include "thread_pool.hpp"

#if CLSA_WITH_CUDA
#include "../cuda/kernels.hpp"
#endif

namespace clsa {

namespace {

/// What sparse and dense attention share: configuration, device, plan, workspace and both paths.
struct AttentionCore {
  AttentionConfig config;
  Backend backend = Backend::cpu;
  Device device{};
  float scale = 0.0f;
  const char* span_name;  // "top_k" (sparse) or "max_length" (dense): the plan's span
  detail::Workspace workspace;
  detail::PlanBook plan_book;
  void* base = nullptr;  // the workspace the plan carved
#if CLSA_WITH_CUDA
  cuda_kernels::AttentionPlan cuda_plan;
  detail::RunStatusReport status;  // dense: sequences beyond the plan
#endif

  /// A plan-less copy of the configuration (for sizing plans on the side).
  AttentionCore(const AttentionCore& other, int /*probe*/)
      : config(other.config),
        backend(other.backend),
        device(other.device),
        scale(other.scale),
        span_name(other.span_name) {}

  AttentionCore(const char* fn, const AttentionConfig& c, Backend requested, const char* span)
      : config(c), span_name(span) {
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
    scale = c.softmax_scale > 0.0f ? c.softmax_scale : 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    backend = resolve_backend(requested);
    device = backend_device(backend);
    if (backend == Backend::cuda && c.head_dim != 64 && c.head_dim != 128 && c.head_dim != 256) {
      detail::fail(ErrorCode::unsupported,
                   detail::concat(fn, ": config.head_dim = ", c.head_dim, "; the CUDA path supports 64, 128 and 256"));
    }
    workspace.set_device(device);
#if CLSA_WITH_CUDA
    if (backend == Backend::cuda) status.allocate();
#endif
  }

  /// Floats of one CPU worker's scratch, rounded up so that every worker's scratch is aligned
  /// alike (Eigen's kernels, and so the rounding, may depend on alignment: results must not
  /// depend on which worker ran an item).
  std::size_t scratch_floats() const {
    const int group = config.num_q_heads / config.num_kv_heads;
    const std::size_t floats =
        cpu::attention_scratch(config.head_dim, group) + static_cast<std::size_t>(2 * group * config.head_dim);
    return (floats + 63) / 64 * 64;
  }

  /// Makes the backend's plan for `bounds` (no memory touched); returns the workspace bytes.
  std::size_t make_plan(const detail::Bounds& bounds) {
    if (backend == Backend::cpu) {
      detail::Carver counter;
      carve_cpu(counter, static_cast<std::size_t>(bounds.sequences) * static_cast<std::size_t>(bounds.tokens));
      return counter.used();
    }
#if CLSA_WITH_CUDA
    cuda_plan = cuda_kernels::plan_attention(bounds.sequences * bounds.tokens, bounds.span, config.num_q_heads,
                                             config.num_kv_heads, config.head_dim);
    return cuda_plan.bytes;
#else
    return 0;
#endif
  }

  /// Bytes a plan for these bounds needs, made on the side (this object's plan stays).
  std::size_t bytes(const char* fn, const detail::Bounds& bounds) const {
    detail::check_bounds(fn, bounds, span_name);
    const detail::DeviceGuard guard(device);
    AttentionCore probe(*this, 0);
    return probe.make_plan(bounds);
  }

  /// Adopts a plan for `bounds`: the workspace is sized and zeroed (on `stream` when on_stream).
  /// All or nothing: a refused plan (bounds, caller memory) leaves the current one in place.
  void adopt(const char* fn, const detail::Bounds& bounds, bool fixed, Stream stream, bool on_stream,
             const detail::Workspace::External* external = nullptr) {
    AttentionCore next(*this, 0);  // the plan is made on the side, then taken over
    const std::size_t needed = next.make_plan(bounds);
    base = workspace.adopt(fn, needed, stream, on_stream, external);
#if CLSA_WITH_CUDA
    cuda_plan = next.cuda_plan;
#endif
    plan_book.set(bounds, fixed);
  }

  void reserve(const char* fn, const detail::Bounds& bounds) {
    detail::check_bounds(fn, bounds, span_name);
    const detail::DeviceGuard guard(device);
    adopt(fn, bounds, true, {}, false);
  }

  void set_workspace(const char* fn, void* data, std::size_t bytes, const detail::Bounds& bounds) {
    detail::check_bounds(fn, bounds, span_name);
    const detail::DeviceGuard guard(device);
    const detail::Workspace::External external{data, bytes};
    adopt(fn, bounds, true, {}, false, &external);
  }

  /// Plans (or checks against the plan) a call of `sequences` x `tokens` rows over `span`.
  void prepare(const char* fn, int sequences, int tokens, std::int64_t span, bool round_span, Stream stream) {
    const detail::Bounds call{sequences, tokens, std::max<std::int64_t>(span, 1)};
    if (plan_book.needs_plan(fn, call, span_name)) adopt(fn, plan_book.grown(call, round_span), false, stream, true);
  }

  /// CPU pieces: the queries widened to f32, then each worker's scratch.
  std::pair<float*, float*> carve_cpu(detail::Carver& carver, std::size_t rows) const {
    float* queries = carver.take<float>(rows * static_cast<std::size_t>(config.num_q_heads * config.head_dim));
    float* scratch =
        carver.take<float>(static_cast<std::size_t>(detail::ThreadPool::instance().size()) * scratch_floats());
    return {queries, scratch};
  }

  /// Checks shared by both: batch, q, out, lse; returns T.
  int check(const char* fn, const CacheBatch& batch, const TensorView& q, const TensorView& out,
            const TensorView& lse) {
#if CLSA_WITH_CUDA
    status.check(fn, "its rows were written as zeros");
#endif
    const AttentionConfig& c = config;
    if (batch.num_sequences() <= 0)
      detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": batch is empty (no sequences)"));
    const PagedCacheLayout& layout = batch.layout();
    if (batch.device() != device) {
      detail::fail(ErrorCode::device_mismatch, detail::concat(fn, ": batch lives on ", device_name(batch.device()),
                                                              " but this attention computes on ", device_name(device)));
    }
    if (layout.num_kv_heads != c.num_kv_heads || layout.head_dim != c.head_dim) {
      detail::fail(
          ErrorCode::shape_mismatch,
          detail::concat(fn, ": batch's cache has num_kv_heads ", layout.num_kv_heads, ", head_dim ", layout.head_dim,
                         " but config has num_kv_heads ", c.num_kv_heads, ", head_dim ", c.head_dim));
    }
    const std::int64_t sequences = batch.num_sequences();
    const std::int64_t tokens = q.defined() && q.rank() > 1 ? q.size(1) : 0;
    detail::check_tensor(fn, "q", q, layout.dtype, device, {sequences, tokens, c.num_q_heads, c.head_dim});
    detail::check_positive(fn, "q.size(1) (query tokens T)", tokens);
    detail::check_tensor(fn, "out", out, layout.dtype, device, {sequences, tokens, c.num_q_heads, c.head_dim});
    if (lse.defined()) detail::check_tensor(fn, "lse", lse, DType::f32, device, {sequences, tokens, c.num_q_heads});
    if (backend == Backend::cuda) detail::check_vector_aligned(fn, "q", q);
    for (int b = 0; b < batch.num_sequences(); ++b) {
      if (batch.length(b) > 0 && batch.length(b) < tokens) {
        detail::fail(ErrorCode::invalid_argument,
                     detail::concat(fn, ": batch sequence ", b, " holds ", batch.length(b),
                                    " tokens, fewer than the T = ", tokens, " query tokens (an empty slot holds 0)"));
      }
    }
    return static_cast<int>(tokens);
  }

  /// CPU path; routing == nullptr means dense.
  void forward_cpu(const char* fn, const CacheBatch& batch, const RoutingIndex* routing, const TensorView& q,
                   const TensorView& out, const TensorView& lse) {
    const AttentionConfig& c = config;
    const PagedCacheLayout& layout = batch.layout();
    const int tokens = static_cast<int>(q.size(1));
    const int group = c.num_q_heads / c.num_kv_heads;
    const int dim = c.head_dim;
    const std::size_t rows = static_cast<std::size_t>(batch.num_sequences()) * static_cast<std::size_t>(tokens);
    (void)fn;
    detail::Carver carver(base);
    const std::pair<float*, float*> pieces = carve_cpu(carver, rows);
    float* const queries = pieces.first;
    float* const scratch = pieces.second;
    const std::size_t scratch_size = scratch_floats();
    detail::widen_to_f32(q, queries);
    detail::ThreadPool& pool = detail::ThreadPool::instance();
    const std::int32_t* indptr = batch.device_page_indptr();
    const std::int32_t* indices = batch.device_page_indices();

    detail::dispatch_float(layout.dtype, [&](auto tag) {
      using Elem = typename decltype(tag)::type;
      pool.parallel_for(static_cast<std::int64_t>(rows) * c.num_kv_heads, [&](std::int64_t item, int worker) {
        const std::int64_t row = item / c.num_kv_heads;
        const int kv_head = static_cast<int>(item % c.num_kv_heads);
        const int b = static_cast<int>(row / tokens);
        const int t = static_cast<int>(row % tokens);
        float* result = scratch + static_cast<std::size_t>(worker) * scratch_size;
        float* lse_values = result + group * dim;
        float* attend_scratch = lse_values + group;
        const cpu::PagedSequence<Elem> paged(layout, indices + indptr[b]);
        const float* query =
            queries + (static_cast<std::size_t>(row) * c.num_q_heads + static_cast<std::size_t>(kv_head) * group) * dim;
        if (routing != nullptr) {
          const std::int32_t* routed = routing->positions.data_as<const std::int32_t>() +
                                       b * routing->positions.stride(0) + t * routing->positions.stride(1);
          const int count =
              routing->counts
                  .data_as<const std::int32_t>()[b * routing->counts.stride(0) + t * routing->counts.stride(1)];
          cpu::attend(
              paged, kv_head, dim, count, [routed](int i) { return routed[i]; }, query, group, scale, result,
              lse_values, attend_scratch);
        } else {
          const int visible = static_cast<int>(std::max<std::int64_t>(batch.length(b) - tokens + t + 1, 0));
          cpu::attend(
              paged, kv_head, dim, visible, [](int i) { return i; }, query, group, scale, result, lse_values,
              attend_scratch);
        }
        Elem* destination = out.data_as<Elem>() + b * out.stride(0) + t * out.stride(1);
        for (int g = 0; g < group; ++g) {
          const int head = kv_head * group + g;
          Elem* head_out = destination + head * out.stride(2);
          for (int d = 0; d < dim; ++d) head_out[d] = from_float<Elem>(result[g * dim + d]);
          if (lse.defined())
            lse.data_as<float>()[b * lse.stride(0) + t * lse.stride(1) + head * lse.stride(2)] = lse_values[g];
        }
      });
    });
  }

#if CLSA_WITH_CUDA
  void forward_cuda(const char* fn, const CacheBatch& batch, const RoutingIndex* routing, const TensorView& q,
                    const TensorView& out, const TensorView& lse, cudaStream_t stream) {
    cuda_kernels::AttentionArgs args{};
    args.layout = batch.layout();
    args.lengths = batch.device_lengths();
    args.last_page_lengths = batch.device_last_page_lengths();
    args.page_indptr = batch.device_page_indptr();
    args.page_indices = batch.device_page_indices();
    args.num_sequences = batch.num_sequences();
    args.tokens = static_cast<int>(q.size(1));
    args.q = q.data();
    args.q_stride_b = q.stride(0);
    args.q_stride_t = q.stride(1);
    args.q_stride_h = q.stride(2);
    args.out = out.data();
    args.out_stride_b = out.stride(0);
    args.out_stride_t = out.stride(1);
    args.out_stride_h = out.stride(2);
    if (lse.defined()) {
      args.lse = lse.data_as<float>();
      args.lse_stride_b = lse.stride(0);
      args.lse_stride_t = lse.stride(1);
    }
    args.q_heads = config.num_q_heads;
    args.kv_heads = config.num_kv_heads;
    args.dim = config.head_dim;
    args.scale = scale;
    if (routing != nullptr) {
      args.positions = routing->positions.data_as<const std::int32_t>();
      args.positions_stride_b = routing->positions.stride(0);
      args.positions_stride_t = routing->positions.stride(1);
      args.counts = routing->counts.data_as<const std::int32_t>();
      args.counts_stride_b = routing->counts.stride(0);
      args.counts_stride_t = routing->counts.stride(1);
      args.top_k = routing->top_k;
    }
    args.status = status.device_view();
    (void)fn;
    cuda_kernels::attention(args, cuda_plan, base, stream);
  }
#endif

  void forward(const char* fn, const CacheBatch& batch, const RoutingIndex* routing, const TensorView& q,
               const TensorView& out, const TensorView& lse, Stream stream) {
    if (backend == Backend::cpu) {
      forward_cpu(fn, batch, routing, q, out, lse);
      return;
    }
#if CLSA_WITH_CUDA
    forward_cuda(fn, batch, routing, q, out, lse, stream.cuda());
#endif
    (void)stream;
  }
};

/// CPU only (the values are on the host): every count in [0, top_k], every routed position
/// visible to its query token. The CUDA kernels skip positions outside that range instead.
void check_routing_values(const char* fn, const CacheBatch& batch, const RoutingIndex& routing, int tokens) {
  for (int b = 0; b < batch.num_sequences(); ++b) {
    for (int t = 0; t < tokens; ++t) {
      const std::int64_t visible = batch.length(b) - tokens + t + 1;
      const std::int32_t count =
          routing.counts.data_as<const std::int32_t>()[b * routing.counts.stride(0) + t * routing.counts.stride(1)];
      if (count < 0 || count > routing.top_k) {
        detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": routing.counts[", b, ",", t, "] = ", count,
                                                                 "; expected 0..top_k = ", routing.top_k));
      }
      const std::int32_t* routed = routing.positions.data_as<const std::int32_t>() + b * routing.positions.stride(0) +
                                   t * routing.positions.stride(1);
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
  if (s.backend == Backend::cpu) check_routing_values(fn, batch, routing, tokens);
  s.prepare(fn, static_cast<int>(sequences), tokens, routing.top_k, false, stream);
  s.forward(fn, batch, &routing, q, out, lse, stream);
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
#if CLSA_WITH_CUDA
  state_->status.check("DenseCrossAttention::check_status", "its rows were written as zeros");
#endif
}

void DenseCrossAttention::forward(const CacheBatch& batch, const TensorView& q, const TensorView& out, Stream stream,
                                  const TensorView& lse) {
  const char* fn = "DenseCrossAttention::forward";
  State& s = *state_;
  const detail::DeviceGuard guard(s.device);
  const int tokens = s.check(fn, batch, q, out, lse);
  s.prepare(fn, batch.num_sequences(), tokens, batch.max_length(), true, stream);
  s.forward(fn, batch, nullptr, q, out, lse, stream);
}

}  // namespace clsa
