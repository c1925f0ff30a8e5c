// CrossLayerIndexer: argument checks, the threaded CPU path and dispatch to the CUDA kernels.
#include "clsa/indexer.hpp"

#include <algorithm>
#include <limits>
#include <vector>

#include "check.hpp"
#include "clsa/cpu/indexer.hpp"
#include "cpu_util.hpp"
#include "cuda_check.hpp"
#include "memory.hpp"
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
  // The RoutingIndex returned by select(): positions [B, T, top_k] and counts [B, T].
  detail::Buffer positions, counts;
  // Workspace.
  detail::Buffer workspace;
  std::int64_t workspace_key = -1;  // layout of the last CUDA select (see cuda_kernels::index_select)
  std::vector<float> queries, weights, scores;
  std::vector<std::vector<float>> scratch;       // per CPU worker
  std::vector<std::vector<std::uint64_t>> keys;  // per CPU worker

  void select_cpu(const CacheBatch& batch, const TensorView& q_idx, const TensorView& head_weights,
                  const RoutingIndex& out);
#if CLSA_WITH_CUDA
  void select_cuda(const CacheBatch& batch, const TensorView& q_idx, const TensorView& head_weights,
                   const RoutingIndex& out, cudaStream_t stream);
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
  s.positions.set_device(s.device);
  s.counts.set_device(s.device);
  s.workspace.set_device(s.device);
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

void CrossLayerIndexer::reserve(int max_sequences, int max_tokens, std::int64_t max_length) {
  const char* fn = "CrossLayerIndexer::reserve";
  detail::check_positive(fn, "max_sequences", max_sequences);
  detail::check_positive(fn, "max_tokens", max_tokens);
  detail::check_positive(fn, "max_length", max_length);
  State& s = *state_;
  const std::size_t rows = static_cast<std::size_t>(max_sequences) * static_cast<std::size_t>(max_tokens);
  s.positions.ensure(rows * static_cast<std::size_t>(s.config.top_k) * sizeof(std::int32_t));
  s.counts.ensure(rows * sizeof(std::int32_t));
  if (s.backend == Backend::cpu) {
    const std::size_t heads = static_cast<std::size_t>(s.config.num_heads);
    s.queries.reserve(rows * heads * static_cast<std::size_t>(s.config.index_dim));
    s.weights.reserve(rows * heads);
    s.scores.reserve(rows * static_cast<std::size_t>(max_length));
    const int workers = detail::ThreadPool::instance().size();
    s.scratch.resize(static_cast<std::size_t>(workers));
    s.keys.resize(static_cast<std::size_t>(workers));
    for (auto& scratch : s.scratch) {
      scratch.reserve(cpu::index_scores_scratch(kPositionChunk, s.config.index_dim, kRowBlock, s.config.num_heads));
    }
    for (auto& keys : s.keys) keys.reserve(static_cast<std::size_t>(max_length));
  }
#if CLSA_WITH_CUDA
  if (s.backend == Backend::cuda) {
    s.workspace.ensure(
        cuda_kernels::indexer_workspace_bytes(max_sequences, max_tokens, max_length, s.config.num_heads));
  }
#endif
}

RoutingIndex CrossLayerIndexer::select(const CacheBatch& batch, const TensorView& q_idx, const TensorView& head_weights,
                                       Stream stream) {
  State& s = *state_;
  const std::int64_t sequences = batch.num_sequences();
  const std::int64_t tokens = q_idx.defined() && q_idx.rank() > 1 ? q_idx.size(1) : 0;
  const std::size_t rows = static_cast<std::size_t>(sequences * std::max<std::int64_t>(tokens, 1));
  RoutingIndex out;
  out.top_k = s.config.top_k;
  out.positions = TensorView(s.positions.ensure(rows * static_cast<std::size_t>(s.config.top_k) * sizeof(std::int32_t)),
                             DType::i32, {sequences, tokens, s.config.top_k}, s.device);
  out.counts = TensorView(s.counts.ensure(rows * sizeof(std::int32_t)), DType::i32, {sequences, tokens}, s.device);
  select(batch, q_idx, head_weights, out, stream);
  return out;
}

void CrossLayerIndexer::select(const CacheBatch& batch, const TensorView& q_idx, const TensorView& head_weights,
                               const RoutingIndex& out, Stream stream) {
  const char* fn = "CrossLayerIndexer::select";
  State& s = *state_;
  const IndexerConfig& c = s.config;
  if (batch.num_sequences() <= 0) {
    detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": batch is empty (no sequences)"));
  }
  const PagedCacheLayout& layout = batch.layout();
  if (batch.device() != s.device) {
    detail::fail(ErrorCode::device_mismatch, detail::concat(fn, ": batch lives on ", device_name(batch.device()),
                                                            " but this indexer computes on ", device_name(s.device)));
  }
  if (layout.index_dim != c.index_dim) {
    detail::fail(ErrorCode::shape_mismatch, detail::concat(fn, ": batch's cache has index_dim ", layout.index_dim,
                                                           " but config.index_dim = ", c.index_dim));
  }
  const std::int64_t sequences = batch.num_sequences();
  const std::int64_t tokens = q_idx.defined() && q_idx.rank() > 1 ? q_idx.size(1) : 0;
  detail::check_tensor(fn, "q_idx", q_idx, layout.dtype, s.device, {sequences, tokens, c.num_heads, c.index_dim});
  detail::check_positive(fn, "q_idx.size(1) (query tokens T)", tokens);
  detail::check_float_tensor(fn, "head_weights", head_weights, s.device, {sequences, tokens, c.num_heads});
  detail::check_tensor(fn, "out.positions", out.positions, DType::i32, s.device, {sequences, tokens, c.top_k});
  detail::check_tensor(fn, "out.counts", out.counts, DType::i32, s.device, {sequences, tokens});
  for (int b = 0; b < batch.num_sequences(); ++b) {
    if (batch.length(b) < tokens) {
      detail::fail(ErrorCode::invalid_argument, detail::concat(fn, ": batch sequence ", b, " holds ", batch.length(b),
                                                               " tokens, fewer than the T = ", tokens,
                                                               " query tokens (append the query tokens' keys first)"));
    }
  }
  if (s.backend == Backend::cpu) {
    s.select_cpu(batch, q_idx, head_weights, out);
    return;
  }
#if CLSA_WITH_CUDA
  s.select_cuda(batch, q_idx, head_weights, out, stream.cuda());
#endif
  (void)stream;
}

void CrossLayerIndexer::State::select_cpu(const CacheBatch& batch, const TensorView& q_idx,
                                          const TensorView& head_weights, const RoutingIndex& out) {
  const IndexerConfig& c = config;
  const PagedCacheLayout& layout = batch.layout();
  const int sequences = batch.num_sequences();
  const int tokens = static_cast<int>(q_idx.size(1));
  const int heads = c.num_heads;
  const int dim = c.index_dim;
  const std::int64_t stride = batch.max_length();  // scores row stride
  const std::size_t rows = static_cast<std::size_t>(sequences) * static_cast<std::size_t>(tokens);

  queries.resize(rows * static_cast<std::size_t>(heads * dim));
  weights.resize(rows * static_cast<std::size_t>(heads));
  scores.resize(rows * static_cast<std::size_t>(stride));
  detail::widen_to_f32(q_idx, queries.data());
  detail::widen_to_f32(head_weights, weights.data());

  detail::ThreadPool& pool = detail::ThreadPool::instance();
  scratch.resize(static_cast<std::size_t>(pool.size()));
  keys.resize(static_cast<std::size_t>(pool.size()));

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
      std::vector<float>& work = scratch[static_cast<std::size_t>(worker)];
      work.resize(cpu::index_scores_scratch(count, dim, block_rows, heads));
      const cpu::PagedSequence<Elem> paged(layout, indices + indptr[b]);
      const std::size_t row0 = static_cast<std::size_t>(b) * tokens + static_cast<std::size_t>(first_row);
      cpu::index_scores(paged, begin, count, dim, queries.data() + row0 * heads * dim, weights.data() + row0 * heads,
                        block_rows, heads, c.scale, scores.data() + row0 * stride + begin, stride, work.data());
    });
  });

  // Selection, one query row per item.
  std::int32_t* routed_positions = out.positions.data_as<std::int32_t>();
  std::int32_t* routed_counts = out.counts.data_as<std::int32_t>();
  pool.parallel_for(static_cast<std::int64_t>(rows), [&](std::int64_t row, int worker) {
    const int b = static_cast<int>(row / tokens);
    const int t = static_cast<int>(row % tokens);
    const int visible = static_cast<int>(batch.length(b) - tokens + t + 1);
    std::vector<std::uint64_t>& key_scratch = keys[static_cast<std::size_t>(worker)];
    key_scratch.resize(static_cast<std::size_t>(visible));
    std::int32_t* routed = routed_positions + b * out.positions.stride(0) + t * out.positions.stride(1);
    const int count = cpu::select_row(scores.data() + static_cast<std::size_t>(row) * stride, visible, c.top_k,
                                      c.sink_tokens, c.local_window, routed, key_scratch.data());
    std::fill(routed + count, routed + c.top_k, -1);
    routed_counts[b * out.counts.stride(0) + t * out.counts.stride(1)] = count;
  });
}

#if CLSA_WITH_CUDA
void CrossLayerIndexer::State::select_cuda(const CacheBatch& batch, const TensorView& q_idx,
                                           const TensorView& head_weights, const RoutingIndex& out,
                                           cudaStream_t stream) {
  const IndexerConfig& c = config;
  const char* fn = "CrossLayerIndexer::select";
  if (batch.layout().dtype == DType::f32 ? c.index_dim % 4 != 0 : (c.index_dim != 64 && c.index_dim != 128)) {
    detail::fail(ErrorCode::unsupported,
                 detail::concat(fn, ": index_dim ", c.index_dim, " with ", dtype_name(batch.layout().dtype),
                                " keys; the CUDA path supports 64 and 128 (f16/bf16) or multiples of 4 (f32)"));
  }
  if (batch.layout().dtype != DType::f32) detail::check_vector_aligned(fn, "q_idx", q_idx);
  cuda_kernels::IndexerArgs args{};
  args.layout = batch.layout();
  args.lengths = batch.device_lengths();
  args.page_indptr = batch.device_page_indptr();
  args.page_indices = batch.device_page_indices();
  args.num_sequences = batch.num_sequences();
  args.tokens = static_cast<int>(q_idx.size(1));
  args.max_length = batch.max_length();
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
  const std::size_t bytes =
      cuda_kernels::indexer_workspace_bytes(args.num_sequences, args.tokens, args.max_length, c.num_heads);
  bool reallocated = false;
  void* work = workspace.ensure(bytes, &reallocated);
  // The kernels leave their histograms and counters zero; a new workspace or another layout
  // needs them cleared first.
  const std::int64_t key = cuda_kernels::indexer_workspace_key(args.num_sequences, args.tokens, args.max_length);
  const bool clear = reallocated || key != workspace_key;
  workspace_key = key;
  cuda_kernels::index_select(args, work, bytes, clear, stream);
}
#endif

}  // namespace clsa
