// CrossLayerIndexer: argument checks, the threaded CPU path and dispatch to the CUDA kernels.
#include "clsa/indexer.hpp"

#include <algorithm>
#include <limits>

#include "check.hpp"
#include "clsa/cpu/indexer.hpp"
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

// CPU work decomposition: scores are computed for blocks of up to kRowBlock query rows over
// chunks of kPositionChunk cached positions, so one long sequence still spreads over all threads.
constexpr int kRowBlock = 16;
constexpr int kPositionChunk = 1024;

}  // namespace

struct CrossLayerIndexer::State {
  IndexerConfig config;
  Backend backend = Backend::cpu;
  Device device{};
  // One workspace holds everything: the RoutingIndex that select() returns (positions
  // [B, T, top_k], counts [B, T]) and the backend's scratch.
  detail::Workspace workspace;
  detail::PlanBook plan_book;  // bounds (span = max_length)
  void* base = nullptr;        // the workspace the plan carved
#if CLSA_WITH_CUDA
  cuda_kernels::IndexerPlan cuda_plan;
  detail::RunStatusReport status;
#endif

  /// The pieces of the workspace for `rows` query rows over sequences up to `max_length`.
  struct Pieces {
    std::int32_t* positions;
    std::int32_t* counts;
    float* queries;        // CPU: [rows, heads, dim]
    float* weights;        // CPU: [rows, heads]
    float* scores;         // CPU: [rows, max_length]
    float* scratch;        // CPU: per worker
    std::uint64_t* keys;   // CPU: per worker, [max_length]
    void* device_scratch;  // CUDA: the kernels' workspace
    std::size_t device_scratch_bytes;
  };
  Pieces carve(detail::Carver& carver, int sequences, int tokens, std::int64_t max_length) const {
    const std::size_t rows = static_cast<std::size_t>(sequences) * static_cast<std::size_t>(tokens);
    const std::size_t length = static_cast<std::size_t>(max_length);
    Pieces pieces{};
    pieces.positions = carver.take<std::int32_t>(rows * static_cast<std::size_t>(config.top_k));
    pieces.counts = carver.take<std::int32_t>(rows);
    if (backend == Backend::cpu) {
      const std::size_t heads = static_cast<std::size_t>(config.num_heads);
      const std::size_t workers = static_cast<std::size_t>(detail::ThreadPool::instance().size());
      pieces.queries = carver.take<float>(rows * heads * static_cast<std::size_t>(config.index_dim));
      pieces.weights = carver.take<float>(rows * heads);
      pieces.scores = carver.take<float>(rows * length);
      pieces.scratch = carver.take<float>(workers * scratch_floats());
      pieces.keys = carver.take<std::uint64_t>(workers * length);
    }
#if CLSA_WITH_CUDA
    if (backend == Backend::cuda) {
      pieces.device_scratch_bytes = cuda_plan.bytes;
      pieces.device_scratch = carver.take<unsigned char>(pieces.device_scratch_bytes);
    }
#endif
    return pieces;
  }
  /// Makes the backend's plan for `bounds` (no memory touched) and returns the workspace bytes.
  std::size_t make_plan(const detail::Bounds& bounds) {
#if CLSA_WITH_CUDA
    if (backend == Backend::cuda) {
      cuda_plan =
          cuda_kernels::plan_indexer(bounds.sequences, bounds.tokens, bounds.span, config.num_heads, config.index_dim);
    }
#endif
    detail::Carver counter;
    carve(counter, bounds.sequences, bounds.tokens, bounds.span);
    return counter.used();
  }
  /// Adopts a plan for `bounds`: the workspace is sized and zeroed (on `stream` when on_stream).
  /// All or nothing: a refused plan (bounds, caller memory) leaves the current one in place.
  void adopt(const char* fn, const detail::Bounds& bounds, bool fixed, Stream stream, bool on_stream,
             const detail::Workspace::External* external = nullptr) {
    State next;  // the plan is made on the side, then taken over
    next.config = config;
    next.backend = backend;
    const std::size_t needed = next.make_plan(bounds);
    base = workspace.adopt(fn, needed, stream, on_stream, external);
#if CLSA_WITH_CUDA
    cuda_plan = next.cuda_plan;
#endif
    plan_book.set(bounds, fixed);
  }
  /// Floats of one CPU worker's scratch, rounded up so that every worker's is aligned alike
  /// (results must not depend on which worker ran an item).
  std::size_t scratch_floats() const {
    return (cpu::index_scores_scratch(kPositionChunk, config.index_dim, kRowBlock, config.num_heads) + 63) / 64 * 64;
  }

  /// Checks batch, q_idx and head_weights; returns T.
  int check_inputs(const char* fn, const CacheBatch& batch, const TensorView& q_idx, const TensorView& head_weights);
  /// Selects into `out`, or (out == nullptr) into the workspace's own index, returned in *returned.
  void run(const char* fn, const CacheBatch& batch, const TensorView& q_idx, const TensorView& head_weights,
           const RoutingIndex* out, RoutingIndex* returned, Stream stream);
  void select_cpu(const CacheBatch& batch, const TensorView& q_idx, const TensorView& head_weights,
                  const RoutingIndex& out, const Pieces& pieces);
#if CLSA_WITH_CUDA
  void select_cuda(const CacheBatch& batch, const TensorView& q_idx, const TensorView& head_weights,
                   const RoutingIndex& out, const Pieces& pieces, cudaStream_t stream);
#endif
};

CrossLayerIndexer::CrossLayerIndexer(const IndexerConfig& config, Backend backend) : state_(std::make_unique<State>()) {
  const char* fn = "CrossLayerIndexer";
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
  State& s = *state_;
  s.config = config;
  s.backend = resolve_backend(backend);
  s.device = backend_device(s.backend);
  s.workspace.set_device(s.device);
#if CLSA_WITH_CUDA
  if (s.backend == Backend::cuda) s.status.allocate();
#endif
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
  const char* fn = "CrossLayerIndexer::workspace_bytes";
  const detail::Bounds bounds{max_sequences, max_tokens, max_length};
  detail::check_bounds(fn, bounds, "max_length");
  const detail::DeviceGuard guard(state_->device);
  State probe_state;  // a plan made on the side: this object's plan stays as it is
  probe_state.config = state_->config;
  probe_state.backend = state_->backend;
  return probe_state.make_plan(bounds);
}

void CrossLayerIndexer::set_workspace(void* data, std::size_t bytes, int max_sequences, int max_tokens,
                                      std::int64_t max_length) {
  const char* fn = "CrossLayerIndexer::set_workspace";
  const detail::Bounds bounds{max_sequences, max_tokens, max_length};
  detail::check_bounds(fn, bounds, "max_length");
  const detail::DeviceGuard guard(state_->device);
  const detail::Workspace::External external{data, bytes};
  state_->adopt(fn, bounds, true, {}, false, &external);
}

void CrossLayerIndexer::reserve(int max_sequences, int max_tokens, std::int64_t max_length) {
  const char* fn = "CrossLayerIndexer::reserve";
  const detail::Bounds bounds{max_sequences, max_tokens, max_length};
  detail::check_bounds(fn, bounds, "max_length");
  const detail::DeviceGuard guard(state_->device);
  state_->adopt(fn, bounds, true, {}, false);
}

void CrossLayerIndexer::check_status() {
#if CLSA_WITH_CUDA
  state_->status.check("CrossLayerIndexer::check_status", "its query rows routed nothing");
#endif
}

int CrossLayerIndexer::State::check_inputs(const char* fn, const CacheBatch& batch, const TensorView& q_idx,
                                           const TensorView& head_weights) {
#if CLSA_WITH_CUDA
  status.check(fn, "its query rows routed nothing");
#endif
  const IndexerConfig& c = config;
  if (batch.num_sequences() <= 0) {
    detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": batch is empty (no sequences)"));
  }
  const PagedCacheLayout& layout = batch.layout();
  if (batch.device() != device) {
    detail::fail(ErrorCode::device_mismatch, detail::concat(fn, ": batch lives on ", device_name(batch.device()),
                                                            " but this indexer computes on ", device_name(device)));
  }
  if (layout.index_dim != c.index_dim) {
    detail::fail(ErrorCode::shape_mismatch, detail::concat(fn, ": batch's cache has index_dim ", layout.index_dim,
                                                           " but config.index_dim = ", c.index_dim));
  }
  const std::int64_t sequences = batch.num_sequences();
  const std::int64_t tokens = q_idx.defined() && q_idx.rank() > 1 ? q_idx.size(1) : 0;
  detail::check_tensor(fn, "q_idx", q_idx, layout.dtype, device, {sequences, tokens, c.num_heads, c.index_dim});
  detail::check_positive(fn, "q_idx.size(1) (query tokens T)", tokens);
  detail::check_float_tensor(fn, "head_weights", head_weights, device, {sequences, tokens, c.num_heads});
  for (int b = 0; b < batch.num_sequences(); ++b) {
    if (batch.length(b) > 0 && batch.length(b) < tokens) {
      detail::fail(
          ErrorCode::invalid_argument,
          detail::concat(fn, ": batch sequence ", b, " holds ", batch.length(b), " tokens, fewer than the T = ", tokens,
                         " query tokens (append the query tokens' keys first; an empty slot holds 0)"));
    }
  }
#if CLSA_WITH_CUDA
  if (backend == Backend::cuda) {
    if (layout.dtype == DType::f32 ? c.index_dim % 4 != 0 : (c.index_dim != 64 && c.index_dim != 128)) {
      detail::fail(ErrorCode::unsupported,
                   detail::concat(fn, ": index_dim ", c.index_dim, " with ", dtype_name(layout.dtype),
                                  " keys; the CUDA path supports 64 and 128 (f16/bf16) or multiples of 4 (f32)"));
    }
    if (layout.dtype != DType::f32) detail::check_vector_aligned(fn, "q_idx", q_idx);
  }
#endif
  return static_cast<int>(tokens);
}

void CrossLayerIndexer::State::run(const char* fn, const CacheBatch& batch, const TensorView& q_idx,
                                   const TensorView& head_weights, const RoutingIndex* out, RoutingIndex* returned,
                                   Stream stream) {
  const int tokens = static_cast<int>(q_idx.size(1));
  const int sequences = batch.num_sequences();
  const detail::Bounds call{sequences, tokens, std::max<std::int64_t>(batch.max_length(), 1)};
  if (plan_book.needs_plan(fn, call, "max_length")) adopt(fn, plan_book.grown(call, true), false, stream, true);
  const detail::Bounds& bounds = plan_book.bounds();
  detail::Carver carver(base);
  const Pieces pieces = carve(carver, bounds.sequences, bounds.tokens, bounds.span);
  RoutingIndex target;
  if (out == nullptr) {
    target.top_k = config.top_k;
    target.positions = TensorView(pieces.positions, DType::i32, {sequences, tokens, config.top_k}, device);
    target.counts = TensorView(pieces.counts, DType::i32, {sequences, tokens}, device);
    *returned = target;
    out = &target;
  }
  if (backend == Backend::cpu) {
    select_cpu(batch, q_idx, head_weights, *out, pieces);
    return;
  }
#if CLSA_WITH_CUDA
  select_cuda(batch, q_idx, head_weights, *out, pieces, stream.cuda());
#endif
  (void)stream;
}

RoutingIndex CrossLayerIndexer::select(const CacheBatch& batch, const TensorView& q_idx, const TensorView& head_weights,
                                       Stream stream) {
  const char* fn = "CrossLayerIndexer::select";
  State& s = *state_;
  const detail::DeviceGuard guard(s.device);
  s.check_inputs(fn, batch, q_idx, head_weights);
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
  s.run(fn, batch, q_idx, head_weights, &out, nullptr, stream);
}

void CrossLayerIndexer::State::select_cpu(const CacheBatch& batch, const TensorView& q_idx,
                                          const TensorView& head_weights, const RoutingIndex& out,
                                          const Pieces& pieces) {
  const IndexerConfig& c = config;
  const PagedCacheLayout& layout = batch.layout();
  const int sequences = batch.num_sequences();
  const int tokens = static_cast<int>(q_idx.size(1));
  const int heads = c.num_heads;
  const int dim = c.index_dim;
  const std::int64_t stride = plan_book.bounds().span;  // scores row stride
  const std::size_t rows = static_cast<std::size_t>(sequences) * static_cast<std::size_t>(tokens);

  float* queries = pieces.queries;
  float* weights = pieces.weights;
  float* scores = pieces.scores;
  detail::widen_to_f32(q_idx, queries);
  detail::widen_to_f32(head_weights, weights);
  detail::ThreadPool& pool = detail::ThreadPool::instance();
  const std::size_t scratch_size = scratch_floats();

  // Work items of the score pass: (sequence, row block, position chunk).
  const int row_blocks = (tokens + kRowBlock - 1) / kRowBlock;
  const std::int64_t chunks = (batch.max_length() + kPositionChunk - 1) / kPositionChunk;
  const std::int32_t* indptr = batch.device_page_indptr();
  const std::int32_t* indices = batch.device_page_indices();

  detail::dispatch_float(layout.dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    pool.parallel_for(std::int64_t{sequences} * row_blocks * chunks, [&](std::int64_t item, int worker) {
      const int b = static_cast<int>(item / (std::int64_t{row_blocks} * chunks));
      const int block = static_cast<int>(item / chunks % row_blocks);
      const std::int64_t chunk = item % chunks;
      const std::int64_t length = batch.length(b);
      const int first_row = block * kRowBlock;
      const int block_rows = std::min(kRowBlock, tokens - first_row);
      // Visible positions of the block's last row bound what must be scored.
      const std::int64_t visible = length - tokens + first_row + block_rows;
      const std::int64_t begin = chunk * kPositionChunk;
      if (begin >= visible) return;
      const int count = static_cast<int>(std::min<std::int64_t>(kPositionChunk, visible - begin));
      float* work = pieces.scratch + static_cast<std::size_t>(worker) * scratch_size;
      const cpu::PagedSequence<Elem> paged(layout, indices + indptr[b]);
      const std::size_t row0 = static_cast<std::size_t>(b) * tokens + static_cast<std::size_t>(first_row);
      cpu::index_scores(paged, begin, count, dim, queries + row0 * heads * dim, weights + row0 * heads, block_rows,
                        heads, c.scale, scores + row0 * stride + begin, stride, work);
    });
  });

  // Selection, one query row per item.
  std::int32_t* routed_positions = out.positions.data_as<std::int32_t>();
  std::int32_t* routed_counts = out.counts.data_as<std::int32_t>();
  pool.parallel_for(static_cast<std::int64_t>(rows), [&](std::int64_t row, int worker) {
    const int b = static_cast<int>(row / tokens);
    const int t = static_cast<int>(row % tokens);
    const int visible = static_cast<int>(std::max<std::int64_t>(batch.length(b) - tokens + t + 1, 0));
    std::uint64_t* key_scratch = pieces.keys + static_cast<std::size_t>(worker) * static_cast<std::size_t>(stride);
    std::int32_t* routed = routed_positions + b * out.positions.stride(0) + t * out.positions.stride(1);
    const int count = cpu::select_row(scores + static_cast<std::size_t>(row) * stride, visible, c.top_k, c.sink_tokens,
                                      c.local_window, routed, key_scratch);
    std::fill(routed + count, routed + c.top_k, -1);
    routed_counts[b * out.counts.stride(0) + t * out.counts.stride(1)] = count;
  });
}

#if CLSA_WITH_CUDA
void CrossLayerIndexer::State::select_cuda(const CacheBatch& batch, const TensorView& q_idx,
                                           const TensorView& head_weights, const RoutingIndex& out,
                                           const Pieces& pieces, cudaStream_t stream) {
  const IndexerConfig& c = config;
  cuda_kernels::IndexerArgs args{};
  args.layout = batch.layout();
  args.lengths = batch.device_lengths();
  args.last_page_lengths = batch.device_last_page_lengths();
  args.page_indptr = batch.device_page_indptr();
  args.page_indices = batch.device_page_indices();
  args.num_sequences = batch.num_sequences();
  args.tokens = static_cast<int>(q_idx.size(1));
  args.max_length = cuda_plan.max_length;
  args.q = q_idx.data();
  args.q_stride_b = q_idx.stride(0);
  args.q_stride_t = q_idx.stride(1);
  args.q_stride_h = q_idx.stride(2);
  args.weights = head_weights.data();
  args.weights_dtype = head_weights.dtype();
  args.w_stride_b = head_weights.stride(0);
  args.w_stride_t = head_weights.stride(1);
  args.heads = c.num_heads;
  args.dim = c.index_dim;
  args.top_k = c.top_k;
  args.sinks = c.sink_tokens;
  args.window = c.local_window;
  args.scale = c.scale;
  args.positions = out.positions.data_as<std::int32_t>();
  args.positions_stride_b = out.positions.stride(0);
  args.positions_stride_t = out.positions.stride(1);
  args.counts = out.counts.data_as<std::int32_t>();
  args.counts_stride_b = out.counts.stride(0);
  args.counts_stride_t = out.counts.stride(1);
  args.status = status.device_view();
  cuda_kernels::index_select(args, cuda_plan, pieces.device_scratch, stream);
}
#endif

}  // namespace clsa
