// The indexer's exact top-k on the GPU (after the score pass of indexer_scores.cu), one kernel:
//
//   select_kernel  grid (cluster, rows): the `cluster` CTAs of a row (one thread-block cluster on
//                  sm_90) each hold a contiguous chunk of the row's candidate scores (between the
//                  sinks and the window) in registers. Three radix levels (11, 11 and 10 bits of the
//                  order-preserving score key) find the k-th largest key: each level builds a
//                  shared-memory histogram per CTA, the cluster sums them through distributed
//                  shared memory (each CTA owns a slice of the bins), and every CTA finds the same
//                  threshold bin. Where the score pass built the row's level-0 histogram in the
//                  workspace (one query row per score CTA), level 0 reads it instead (and the
//                  kernel zeroes it for the next call). Keys above the threshold are routed, and of
//                  the keys equal to it the lowest positions (the tie rule). One scan over the
//                  cluster places every routed position, so the row comes out in ascending order
//                  with no sort. Sinks, window, counts, -1 padding and the pool slots are written
//                  by the same kernel.
//   gather_kernel  (when the caller asked for RoutingIndex::kv) copies every routed token's K and
//                  V rows into the compact block [rows][2][kv_heads][top_k][dim]: one pass over
//                  the pool per step, after which every layer reads its K/V contiguously.
//
// Exact: nothing is dropped or approximated; the routed set is the CPU's (same key, same ties).
// Without clusters (sm_80) a row runs on one CTA that streams its chunk from L2 once per pass.
#include <cooperative_groups.h>

#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "indexer_common.cuh"

namespace clsa {
namespace cuda_kernels {
namespace indexer {

namespace {

constexpr int kLevels = 3;
constexpr int kReduceLoads = kBins / kSelectThreads;  // histogram bins per thread (the remote adds)
constexpr int kGatherTokens = 8;                      // routed tokens per gather CTA
constexpr int kGatherThreads = 256;

/// Bits of the score key known after radix level `level` (11, 22, 32).
__device__ __forceinline__ int known_bits(int level) {
  return level == 0 ? 11 : level == 1 ? 22 : 32;
}

/// The row's CTAs as one group: on sm_90 a thread-block cluster of SelectParams::cluster CTAs
/// (consecutive in grid.x), else one CTA.
struct RowGroup {
  int size;  // CTAs of the row
  int rank;  // this CTA's, 0..size-1 (its rank in the cluster)

  __device__ void sync() const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (size > 1) {
      cooperative_groups::this_cluster().sync();
      return;
    }
#endif
    __syncthreads();
  }
  /// sync() in two halves: arrive() releases this thread's earlier writes, wait() blocks until
  /// every thread of the row has arrived (and acquires their writes); work may go between.
  __device__ void arrive() const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (size > 1) asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#endif
  }
  __device__ void wait() const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (size > 1) {
      asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
      return;
    }
#endif
    __syncthreads();
  }
  /// `local`'s counterpart in the shared memory of CTA `peer` of the row.
  template <class T>
  __device__ T* peer(T* local, int peer_rank) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (size > 1) return cooperative_groups::this_cluster().map_shared_rank(local, peer_rank);
#endif
    (void)peer_rank;
    return local;
  }
};

struct SelectShared {
  unsigned hist[kBins];              // this CTA's histogram of the level
  unsigned reduced[kLevels][kBins];  // per level, the row's histogram: this CTA's slice of the bins
  cub::BlockScan<int, kSelectThreads>::TempStorage scan;
  int result[3];  // threshold search: bin, count above it, count in it
  int totals[2];  // this CTA's routed keys above the threshold and its ties
  int peer_totals[kMaxCluster][2];
};

/// The threshold bin of the row's histogram of `level` (every CTA's `reduced` slice, or the score
/// pass's `row_histogram` in global memory where not nullptr; descending from the top bin): where
/// the running count reaches `needed`. All threads get bin, above and in-bin counts.
__device__ void find_threshold(SelectShared& sh, const RowGroup& group, int level, const unsigned* row_histogram,
                               int needed, int* bin, int* above, int* in_bin) {
  constexpr int kPerThread = kBins / kSelectThreads;
  const int bins_per_owner = kBins / group.size;
  int counts[kPerThread];  // bins in descending order: thread 0 holds the top ones
  int local = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int b = kBins - 1 - (static_cast<int>(threadIdx.x) * kPerThread + i);
    // The score pass's counts through L2 only (atomics of the grid before; never a stale L1 line).
    counts[i] = static_cast<int>(row_histogram != nullptr ? __ldcg(row_histogram + b)
                                                          : *group.peer(&sh.reduced[level][b], b / bins_per_owner));
    local += counts[i];
  }
  if (threadIdx.x == 0) {
    sh.result[0] = 0;  // only kept if the histogram holds fewer than `needed` (a bug)
    sh.result[1] = 0;
    sh.result[2] = 0;
  }
  int before = 0;
  cub::BlockScan<int, kSelectThreads>(sh.scan).ExclusiveSum(local, before);  // its barrier orders the reset
  int running = before;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    if (running < needed && running + counts[i] >= needed) {
      sh.result[0] = kBins - 1 - (static_cast<int>(threadIdx.x) * kPerThread + i);
      sh.result[1] = running;
      sh.result[2] = counts[i];
    }
    running += counts[i];
  }
  __syncthreads();
  *bin = sh.result[0];
  *above = sh.result[1];
  *in_bin = sh.result[2];
  __syncthreads();  // result is reused by the next search
}

/// Writes entry i of a row's routed positions and (when asked) its pool slot.
struct RowOutput {
  std::int32_t* positions;
  std::int32_t* slots;
  PagedRows paged;
  __device__ void put(int i, int position) const {
    positions[i] = position;
    if (slots != nullptr) slots[i] = position >= 0 ? static_cast<std::int32_t>(paged.pool_slot(position)) : -1;
  }
  /// Entries targets[i] (where >= 0) of positions first + i, first a multiple of N: every page
  /// lookup is issued before the first store (one lookup when a page holds the N positions).
  template <int N>
  __device__ void put_run(const int (&targets)[N], int first) const {
    if (slots != nullptr) {
      std::int32_t pool_slots[N];
      bool any = false;
#pragma unroll
      for (int i = 0; i < N; ++i) any = any || targets[i] >= 0;
      if (any && (1 << paged.page_shift) >= N) {
        const std::int64_t base = paged.pool_slot(first);
#pragma unroll
        for (int i = 0; i < N; ++i) pool_slots[i] = static_cast<std::int32_t>(base + i);
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) {
          pool_slots[i] = targets[i] >= 0 ? static_cast<std::int32_t>(paged.pool_slot(first + i)) : -1;
        }
      }
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (targets[i] >= 0) slots[targets[i]] = pool_slots[i];
      }
    }
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (targets[i] >= 0) positions[targets[i]] = first + i;
    }
  }
};

/// One row's chunk of scores as a thread holds them for a pass: positions first + i (i <
/// kSelectItems) of one tile, as score keys, with a bit per candidate position.
struct TileKeys {
  unsigned keys[kSelectItems];
  unsigned valid;  // bit i: position first + i lies in [sink_end, window_begin)
  int first;

  __device__ void load(const float* scores, int tile_begin, int lo, int hi) {
    first = tile_begin + static_cast<int>(threadIdx.x) * kSelectItems;
    valid = 0;
#pragma unroll
    for (int v = 0; v < kSelectItems / 4; ++v) {
      const int position = first + 4 * v;
      // The scores row is stride-long (a multiple of 64) and zeroed at adoption: a vector that
      // starts before `hi` stays in the row and reads initialised memory.
      const float4 x = position < hi ? __ldcg(reinterpret_cast<const float4*>(scores + position))
                                     : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      const float values[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        keys[4 * v + u] = score_key(values[u]);
        if (position + u >= lo && position + u < hi) valid |= 1u << (4 * v + u);
      }
    }
  }
};

/// The selection of one query row by the CTAs of its cluster.
__global__ void __launch_bounds__(kSelectThreads) select_kernel(SelectParams p) {
  __shared__ SelectShared sh;
  allow_dependents();
  wait_for_predecessor();  // the scores
  const IndexerArgs& a = p.a;
  const RoutingRows& routing = a.routing.rows;
  const RowGroup group{p.cluster, static_cast<int>(blockIdx.x) % p.cluster};
  const std::int64_t row = blockIdx.x / p.cluster;
  const int b = static_cast<int>(row / a.tokens);
  const int t = static_cast<int>(row % a.tokens);
  const RowPlan plan(a, b, t);
  const RowOutput out{routing.row_positions(b, t), routing.row_slots(b, t),
                      PagedRows{a.page_indices + a.page_indptr[b], p.page_shift}};
  const int count = min(routing.top_k, plan.visible);
  const int stride = group.size * kSelectThreads;
  const int me = group.rank * kSelectThreads + static_cast<int>(threadIdx.x);
  if (me == 0) {
    routing.count(b, t) = count;
    if (t == 0) {
      const int length = paged_length(a.page_indptr, a.last_page_lengths, a.layout.page_size, b);
      if (length > a.max_length) {
        report(a.status, RunStatus::length_beyond_plan, b, length, static_cast<int>(a.max_length));
      }
    }
  }
  if (!plan.selects) {  // every visible position, or sinks + window fill top_k: already in order
    for (int i = me; i < routing.top_k; i += stride) {
      int position = -1;
      if (plan.visible <= routing.top_k) {
        position = i < plan.visible ? i : -1;
      } else {
        position = i < plan.sink_end ? i : plan.window_begin + (i - plan.sink_end);
      }
      out.put(i, position);
    }
    return;  // uniform over the row's CTAs: no cluster barrier is pending
  }
  // Forced positions: sinks first, the window last; the selected ones go between, in order.
  for (int i = me; i < plan.sink_end; i += stride) out.put(i, i);
  for (int i = plan.window_begin + me; i < plan.visible; i += stride) {
    out.put(plan.sink_end + plan.needed + (i - plan.window_begin), i);
  }

  // This CTA's chunk of the candidate range [sink_end, window_begin), 16-aligned (vector loads).
  const int lo = plan.sink_end;
  const int hi = plan.window_begin;
  const int aligned_lo = lo & ~(kSelectItems - 1);
  const int chunk = static_cast<int>(ceil_div(ceil_div(hi - aligned_lo, group.size), kSelectItems) * kSelectItems);
  const int chunk_begin = aligned_lo + group.rank * chunk;
  const int chunk_end = min(hi, chunk_begin + chunk);
  const int tiles = chunk_end > chunk_begin ? static_cast<int>(ceil_div(chunk_end - chunk_begin, kSelectTile)) : 0;
  const float* scores = p.scores + row * p.stride;
  TileKeys tile;
  if (tiles >= 1) tile.load(scores, chunk_begin, lo, chunk_end);
  const bool resident = tiles <= 1;  // the usual case: one tile, loaded once for every pass
  auto load_tile = [&](int index) {
    if (!resident) tile.load(scores, chunk_begin + index * kSelectTile, lo, chunk_end);
  };

  // Radix levels: `prefix` holds the threshold's top known_bits(level - 1) bits. Each CTA adds its
  // histogram's nonzero bins into the owners' slices of the level's row histogram (remote atomics:
  // the keys crowd into few bins), so one cluster barrier per level completes the row's histogram;
  // every level has its own `reduced` (zeroed here, before the first barrier), so none is reused
  // while a peer may still read it. With the score pass's histogram (`row_histogram`), level 0
  // reads that instead: no histogram, remote adds or barrier of its own.
  //
  // Cluster barriers, the same sequence in every CTA of the row (every condition below is uniform
  // over it): arrive after the zeroing; wait before the first remote adds (level 0, or level 1
  // with the score pass's histogram), or after the levels if the search ended at level 0 without
  // any; one sync per level with remote adds; the sync that publishes the totals; the final sync.
  unsigned* const row_histogram = p.histograms != nullptr ? p.histograms + row * kBins : nullptr;
  for (int i = threadIdx.x; i < kBins; i += kSelectThreads) {
    sh.hist[i] = 0;
#pragma unroll
    for (int level = 0; level < kLevels; ++level) sh.reduced[level][i] = 0;
  }
  __syncthreads();    // this CTA's histogram is zeroed
  group.arrive();     // and its `reduced`: the first remote adds wait for every CTA's
  bool waits = true;  // that arrive's wait is still to come
  const int bins_per_owner = kBins / group.size;
  unsigned prefix = 0;
  int known = 0;
  int remaining = plan.needed;
  for (int level = 0; level < kLevels; ++level) {
    const bool scored = level == 0 && row_histogram != nullptr;  // the row's histogram is the score pass's
    if (!scored) {
      for (int index = 0; index < tiles; ++index) {
        load_tile(index);
#pragma unroll
        for (int i = 0; i < kSelectItems; ++i) {
          const unsigned key = tile.keys[i];
          const bool in_bin = ((tile.valid >> i) & 1u) != 0 && (known == 0 || (key >> (32 - known)) == prefix);
          add_to_histogram(sh.hist, level_digit(key, level), in_bin);
        }
      }
      __syncthreads();  // this CTA's histogram is complete
      if (waits) {      // every CTA's `reduced` is zeroed
        group.wait();
        waits = false;
      }
#pragma unroll
      for (int k = 0; k < kReduceLoads; ++k) {
        const int bin = static_cast<int>(threadIdx.x) + k * kSelectThreads;
        const unsigned count = sh.hist[bin];
        sh.hist[bin] = 0;  // ready for the next level (only this thread reads or writes it until then)
        if (count != 0) atomicAdd(group.peer(&sh.reduced[level][bin], bin / bins_per_owner), count);
      }
      group.sync();  // the row's histogram of this level is complete in its owners' slices
    }
    int bin = 0, above = 0, in_bin = 0;
    find_threshold(sh, group, level, scored ? row_histogram : nullptr, remaining, &bin, &above, &in_bin);
    remaining -= above;
    prefix = (prefix << (level == 2 ? 10 : 11)) | static_cast<unsigned>(bin);
    known = known_bits(level);
    if (in_bin == remaining) break;  // the whole bin is routed: no need to look closer (uniform)
  }
  if (waits) group.wait();  // the search ended at level 0 with the score pass's histogram: no remote adds
  // Routed: keys whose top `known` bits exceed `prefix`, and the first `remaining` (in position
  // order) of those equal to it.
  auto classify = [&](int i, bool* over, bool* tie) {
    const unsigned key = tile.keys[i];
    const bool valid = ((tile.valid >> i) & 1u) != 0;
    const unsigned top = known == 32 ? key : key >> (32 - known);
    *over = valid && top > prefix;
    *tie = valid && top == prefix;
  };
  // This thread's keys above the threshold and ties in the tile, packed for one scan (each count
  // stays below 2^16 per tile).
  auto tile_counts = [&]() {
    int over_count = 0, tie_count = 0;
#pragma unroll
    for (int i = 0; i < kSelectItems; ++i) {
      bool over, tie;
      classify(i, &over, &tie);
      over_count += over ? 1 : 0;
      tie_count += tie ? 1 : 0;
    }
    return over_count | (tie_count << 16);
  };
  int tile_totals[2] = {0, 0};  // this CTA's keys above and ties (all tiles)
  int first_offsets = 0;        // this thread's place in the first tile's scan (all a resident CTA needs)
  for (int index = 0; index < tiles; ++index) {
    load_tile(index);
    int offsets = 0, total = 0;
    cub::BlockScan<int, kSelectThreads>(sh.scan).ExclusiveSum(tile_counts(), offsets, total);
    __syncthreads();
    if (index == 0) first_offsets = offsets;
    tile_totals[0] += total & 0xffff;
    tile_totals[1] += total >> 16;
  }
  if (threadIdx.x == 0) {
    sh.totals[0] = tile_totals[0];
    sh.totals[1] = tile_totals[1];
  }
  group.sync();  // every CTA's totals are published, and every CTA has read the score pass's histogram
  if (row_histogram != nullptr) {
    // Zero for the next call (the workspace invariant): each CTA its slice of the bins, whatever
    // its chunk held (tiles may be 0). Ordered after every CTA's level-0 reads by the sync above.
    for (int i = static_cast<int>(threadIdx.x); i < bins_per_owner; i += kSelectThreads) {
      row_histogram[group.rank * bins_per_owner + i] = 0;
    }
  }
  if (static_cast<int>(threadIdx.x) < group.rank) {
    const int* peer = group.peer(sh.totals, static_cast<int>(threadIdx.x));
    sh.peer_totals[threadIdx.x][0] = peer[0];
    sh.peer_totals[threadIdx.x][1] = peer[1];
  }
  __syncthreads();
  int over_before = 0, ties_before = 0;  // in the CTAs before this one (lower positions)
  for (int q = 0; q < group.rank; ++q) {
    over_before += sh.peer_totals[q][0];
    ties_before += sh.peer_totals[q][1];
  }
  for (int index = 0; index < tiles; ++index) {
    int offsets = first_offsets, total = 0;
    if (!resident) {  // tiles streamed: scan each again (the first tile's scan is kept only when resident)
      load_tile(index);
      cub::BlockScan<int, kSelectThreads>(sh.scan).ExclusiveSum(tile_counts(), offsets, total);
      __syncthreads();  // the scan storage is reused by the next tile
    }
    int over_seen = over_before + (offsets & 0xffff);
    int ties_seen = ties_before + (offsets >> 16);
    int targets[kSelectItems];  // where the thread's routed positions go in the row, or -1
#pragma unroll
    for (int i = 0; i < kSelectItems; ++i) {
      bool over, tie;
      classify(i, &over, &tie);
      targets[i] = over || (tie && ties_seen < remaining) ? plan.sink_end + over_seen + min(ties_seen, remaining) : -1;
      over_seen += over ? 1 : 0;
      ties_seen += tie ? 1 : 0;
    }
    out.put_run(targets, tile.first);
    over_before += total & 0xffff;
    ties_before += total >> 16;
  }
  group.sync();  // no CTA leaves while another may still read its shared memory
}

/// Copies the routed rows of K and V of gather CTA (row, token block) into RoutingRows::kv:
/// per token, per kv head, `dim` elements of K then of V, as 16-byte vectors (all of a thread's
/// loads in flight before its stores). Entries past the row's count are left as they are. A
/// programmatic dependent of the select kernel (sm_90): its CTAs are placed while the select runs
/// and wait for its counts and positions, so its launch leaves the step's critical path.
template <int kVectorsPerRow>
__global__ void __launch_bounds__(kGatherThreads) gather_kernel(SelectParams p) {
  const IndexerArgs& a = p.a;
  const RoutingRows& routing = a.routing.rows;
  const PagedCacheLayout& layout = a.layout;
  const int row = static_cast<int>(blockIdx.x);
  const int b = row / a.tokens;
  const int t = row % a.tokens;
  const int first = static_cast<int>(blockIdx.y) * kGatherTokens;
  wait_for_predecessor();  // the select kernel's counts and positions
  const int count = routing.count(b, t);
  const int tokens = min(kGatherTokens, count - first);
  if (tokens <= 0) return;
  __shared__ std::int64_t pool_slots[kGatherTokens];
  if (static_cast<int>(threadIdx.x) < tokens) {
    const int i = first + static_cast<int>(threadIdx.x);
    std::int64_t slot;
    if (routing.slots != nullptr) {
      slot = routing.row_slots(b, t)[i];
    } else {
      const PagedRows paged{a.page_indices + a.page_indptr[b], p.page_shift};
      slot = paged.pool_slot(routing.row_positions(b, t)[i]);
    }
    pool_slots[threadIdx.x] = slot;
  }
  __syncthreads();
  const std::int64_t element = p.element_bytes;
  const int heads = layout.num_kv_heads;
  // Work items: (token, kv head, K or V, vector) with the vector fastest.
  const int items = tokens * heads * 2 * kVectorsPerRow;
  // 8 vectors per thread in flight: the whole CTA's work in one batch at 8 kv heads of 256 bytes.
  constexpr int kBatch = 8;
  // Vectors per (row, K|V, head).
  const std::int64_t head_block = static_cast<std::int64_t>(routing.top_k) * kVectorsPerRow;
  uint4* kv = static_cast<uint4*>(routing.kv) + RoutingRows::kv_offset(row, heads, 0, head_block);
  for (int start = static_cast<int>(threadIdx.x); start < items; start += kBatch * kGatherThreads) {
    uint4 values[kBatch];
    std::int64_t targets[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int item = start + u * kGatherThreads;
      targets[u] = -1;
      if (item < items) {
        const int vector = item % kVectorsPerRow;
        const int head = (item / kVectorsPerRow) % heads;
        const int which = (item / (kVectorsPerRow * heads)) % 2;  // 0: K, 1: V
        const int token = item / (kVectorsPerRow * heads * 2);
        const PoolRow where = PoolRow::of_slot(pool_slots[token], p.page_shift);
        const char* pool = static_cast<const char*>(which == 0 ? layout.k : layout.v);
        const std::int64_t offset = which == 0 ? where.k_offset(layout, head) : where.v_offset(layout, head);
        // L2 only (ld.global.cg): read once, and never from an L1 line an earlier kernel left
        // on this multiprocessor (appends rewrite the pages of departed sequences).
        values[u] = __ldcg(reinterpret_cast<const uint4*>(pool + offset * element + vector * 16));
        targets[u] =
            (which * heads + head) * head_block + static_cast<std::int64_t>(first + token) * kVectorsPerRow + vector;
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (targets[u] >= 0) kv[targets[u]] = values[u];
    }
  }
}

using GatherKernel = void (*)(SelectParams);

/// The gather kernel for rows of `vectors` 16-byte vectors (head_dim x element / 16).
GatherKernel gather_kernel_for(int vectors) {
  switch (vectors) {
    case 8:
      return gather_kernel<8>;
    case 16:
      return gather_kernel<16>;
    case 32:
      return gather_kernel<32>;
    case 64:
      return gather_kernel<64>;
    default:
      return nullptr;
  }
}

}  // namespace

int plan_select_cluster(std::int64_t max_length) {
  // One tile per CTA where the cluster can be that large (a power of two: the bins split evenly).
  const std::int64_t tiles = ceil_div(std::max<std::int64_t>(max_length, 1), kSelectTile);
  int wanted = 1;
  while (wanted < kMaxCluster && wanted < tiles) wanted *= 2;
  return largest_cluster(reinterpret_cast<const void*>(select_kernel), kSelectThreads, 0, wanted);
}

bool gather_supported(DType dtype, int dim) {
  const std::size_t bytes = static_cast<std::size_t>(dim) * dtype_size(dtype);
  return bytes % 16 == 0 && gather_kernel_for(static_cast<int>(bytes / 16)) != nullptr;
}

void launch_select(const SelectParams& p, int rows, bool dependent, cudaStream_t stream) {
  launch_kernel(select_kernel, dim3(static_cast<unsigned>(p.cluster * rows)), dim3(kSelectThreads), 0, stream,
                LaunchAttributes{}.dependent(dependent).cluster(p.cluster), "indexer select_kernel", p);
  const RoutingArgs& routing = p.a.routing;
  if (routing.rows.kv == nullptr) return;
  const IndexerArgs& a = p.a;
  const int vectors = static_cast<int>(static_cast<std::size_t>(a.layout.head_dim) * dtype_size(a.layout.dtype) / 16);
  launch_kernel(
      gather_kernel_for(vectors),
      dim3(static_cast<unsigned>(rows), static_cast<unsigned>(ceil_div(routing.rows.top_k, kGatherTokens))),
      dim3(kGatherThreads), 0, stream,
      LaunchAttributes{}.dependent(dependent).persisting(routing.rows.kv, routing.kv_bytes, routing.kv_l2_hit_ratio),
      "indexer gather_kernel", p);
}

bool select_dependent_launch_ready() {
  return dependent_launch_ready(reinterpret_cast<const void*>(select_kernel));
}

}  // namespace indexer
}  // namespace cuda_kernels
}  // namespace clsa
