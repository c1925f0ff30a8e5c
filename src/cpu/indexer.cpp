// The indexer on the CPU: scores for blocks of query rows over chunks of positions (one long
// sequence still spreads over every thread), then an exact top-k per query row.
#include <algorithm>
#include <cstring>

#include "backend/memory.hpp"
#include "clsa/cpu/indexer.hpp"
#include "clsa/paged_view.hpp"
#include "cpu/backend.hpp"
#include "cpu/cpu_util.hpp"
#include "cpu/thread_pool.hpp"

namespace clsa {
namespace detail {

namespace {

constexpr int kRowBlock = 16;         // query rows scored together
constexpr int kPositionChunk = 1024;  // positions per work item

/// RoutingIndex::kv of query row `row` (b * T + t): the K and V rows of its `count` routed
/// positions, in routing order ([2][Hkv][top_k][head_dim], contiguous); rows past the count are
/// left alone.
void gather_routed_row(const PagedCacheLayout& layout, const PagedRows& paged, const std::int32_t* routed, int count,
                       const RoutingRows& routing, std::int64_t row) {
  const std::size_t element = dtype_size(layout.dtype);
  const std::size_t row_bytes = static_cast<std::size_t>(layout.head_dim) * element;
  const std::size_t head_bytes = static_cast<std::size_t>(routing.top_k) * row_bytes;
  const int heads = layout.num_kv_heads;
  const auto* k_pool = static_cast<const char*>(layout.k);
  const auto* v_pool = static_cast<const char*>(layout.v);
  for (int h = 0; h < heads; ++h) {
    char* k_rows = static_cast<char*>(routing.kv) + RoutingRows::kv_offset(row, heads, h, head_bytes);
    char* v_rows = static_cast<char*>(routing.kv) + RoutingRows::kv_offset(row, heads, heads + h, head_bytes);
    for (int i = 0; i < count; ++i) {
      std::memcpy(k_rows + static_cast<std::size_t>(i) * row_bytes,
                  k_pool + paged.k_offset(layout, routed[i], h) * static_cast<std::int64_t>(element), row_bytes);
      std::memcpy(v_rows + static_cast<std::size_t>(i) * row_bytes,
                  v_pool + paged.v_offset(layout, routed[i], h) * static_cast<std::int64_t>(element), row_bytes);
    }
  }
}

/// The CPU indexer's scratch for its bounds: queries and weights widened to f32, the scores
/// [rows, max_length], each worker's score scratch and routing-key scratch.
struct IndexerPlanCpu final : Plan {
  std::size_t rows = 0;     // planned query rows
  std::int64_t stride = 0;  // positions per scores row (the planned max_length)
  std::size_t scratch_floats = 0;
  struct Pieces {
    float* queries;
    float* weights;
    float* scores;
    float* scratch;
    std::uint64_t* keys;
  };
  /// Carves (or, with a counting carver, sizes) the pieces.
  Pieces carve(Carver& carver, const IndexerConfig& c) const {
    const std::size_t heads = static_cast<std::size_t>(c.num_heads);
    const std::size_t workers = static_cast<std::size_t>(ThreadPool::instance().size());
    const std::size_t length = static_cast<std::size_t>(stride);
    Pieces pieces{};
    pieces.queries = carver.take<float>(rows * heads * static_cast<std::size_t>(c.index_dim));
    pieces.weights = carver.take<float>(rows * heads);
    pieces.scores = carver.take<float>(rows * length);
    pieces.scratch = carver.take<float>(workers * scratch_floats);
    pieces.keys = carver.take<std::uint64_t>(workers * length);
    return pieces;
  }
};

}  // namespace

std::unique_ptr<Plan> plan_indexer_cpu(const IndexerConfig& config, const Bounds& bounds) {
  auto plan = std::make_unique<IndexerPlanCpu>();
  plan->stride = bounds.span;
  plan->rows = static_cast<std::size_t>(bounds.sequences) * static_cast<std::size_t>(bounds.tokens);
  // Rounded up so that every worker's scratch is aligned alike (results must not depend on
  // which worker ran an item).
  plan->scratch_floats =
      (cpu::index_scores_scratch(kPositionChunk, config.index_dim, kRowBlock, config.num_heads) + 63) / 64 * 64;
  Carver counter;
  plan->carve(counter, config);
  plan->workspace_bytes = counter.used();
  return plan;
}

void select_cpu(const IndexerConfig& c, const SelectCall& call, const Plan& base_plan, void* scratch) {
  const auto& plan = static_cast<const IndexerPlanCpu&>(base_plan);
  const BatchTables& batch = call.batch;
  const int sequences = batch.num_sequences;
  const int tokens = call.tokens;
  const int heads = c.num_heads;
  const int dim = c.index_dim;
  const std::int64_t stride = plan.stride;
  const std::size_t rows = static_cast<std::size_t>(sequences) * static_cast<std::size_t>(tokens);
  Carver carver(scratch);
  const IndexerPlanCpu::Pieces pieces = plan.carve(carver, c);

  widen_to_f32(call.q_idx, pieces.queries);
  widen_to_f32(call.head_weights, pieces.weights);
  ThreadPool& pool = ThreadPool::instance();

  // Work items of the score pass: (sequence, row block, position chunk).
  const int row_blocks = (tokens + kRowBlock - 1) / kRowBlock;
  const std::int64_t chunks = (batch.max_length + kPositionChunk - 1) / kPositionChunk;
  const std::int32_t* indptr = batch.page_indptr;
  const std::int32_t* indices = batch.page_indices;
  // The indexer keys' dtype (e4m3 keys: index_scores applies their per-token scales).
  dispatch_float(batch.layout.index_key_dtype(), [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    pool.parallel_for(std::int64_t{sequences} * row_blocks * chunks, [&](std::int64_t item, int worker) {
      const int b = static_cast<int>(item / (std::int64_t{row_blocks} * chunks));
      const int block = static_cast<int>(item / chunks % row_blocks);
      const std::int64_t chunk = item % chunks;
      const std::int64_t length = batch.host_lengths[b];
      const int first_row = block * kRowBlock;
      const int block_rows = std::min(kRowBlock, tokens - first_row);
      // Visible positions of the block's last row bound what must be scored.
      const std::int64_t visible = visible_length(length, tokens, first_row + block_rows - 1);
      const std::int64_t begin = chunk * kPositionChunk;
      if (begin >= visible) return;
      const int count = static_cast<int>(std::min<std::int64_t>(kPositionChunk, visible - begin));
      float* work = pieces.scratch + static_cast<std::size_t>(worker) * plan.scratch_floats;
      const cpu::PagedSequence<Elem> paged(batch.layout, indices + indptr[b]);
      const std::size_t row0 = static_cast<std::size_t>(b) * tokens + static_cast<std::size_t>(first_row);
      cpu::index_scores(paged, begin, count, dim, pieces.queries + row0 * heads * dim, pieces.weights + row0 * heads,
                        block_rows, heads, c.scale, pieces.scores + row0 * stride + begin, stride, work);
    });
  });

  // Selection, one query row per item.
  const RoutingRows routing = RoutingRows::of(call.out);
  pool.parallel_for(static_cast<std::int64_t>(rows), [&](std::int64_t row, int worker) {
    const int b = static_cast<int>(row / tokens);
    const int t = static_cast<int>(row % tokens);
    const int visible = visible_length(batch.host_lengths[b], tokens, t);
    std::uint64_t* key_scratch = pieces.keys + static_cast<std::size_t>(worker) * static_cast<std::size_t>(stride);
    std::int32_t* routed = routing.row_positions(b, t);
    const int count = cpu::select_row(pieces.scores + static_cast<std::size_t>(row) * stride, visible, c.top_k,
                                      c.sink_tokens, c.local_window, routed, key_scratch);
    std::fill(routed + count, routed + c.top_k, -1);
    routing.count(b, t) = count;
    const PagedRows paged{indices + indptr[b], page_shift_of(batch.layout.page_size)};
    if (routing.slots != nullptr) {
      std::int32_t* slots = routing.row_slots(b, t);
      for (int i = 0; i < count; ++i) slots[i] = static_cast<std::int32_t>(paged.pool_slot(routed[i]));
      std::fill(slots + count, slots + c.top_k, -1);
    }
    if (routing.kv != nullptr) gather_routed_row(batch.layout, paged, routed, count, routing, row);
  });
}

}  // namespace detail
}  // namespace clsa
