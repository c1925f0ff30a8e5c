// The indexer's exact radix select on the GPU (after the score pass of indexer_scores.cu):
// filter_kernel finds each row's threshold bin of the first histogram, writes the positions above
// it and compacts the bin's members; finish_kernel ranks the survivors down to the position bits,
// adds sinks and window, and rewrites the routed set in ascending order.
#include <algorithm>

#include "indexer_common.cuh"

namespace clsa {
namespace cuda_kernels {
namespace indexer {

constexpr int kFinishThreads = 512;
constexpr int kFinishKeys = 4096;                           // candidates the fast paths hold
constexpr int kFinishItems = kFinishKeys / kFinishThreads;  // per thread, in registers
constexpr int kSharedBitmapWords = kFinishKeys * 2;         // rows up to 262144 sort in shared memory

/// Slot for each lane with `predicate` from one atomicAdd per warp (all 32 lanes must call it):
/// a single shared counter takes far fewer, uncontended atomics than one per element.
__device__ __forceinline__ unsigned warp_slot(unsigned* counter, bool predicate) {
  const unsigned mask = __ballot_sync(kFullMask, predicate);
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int leader = __ffs(static_cast<int>(mask)) - 1;
  unsigned base = 0;
  if (mask != 0 && lane == leader) base = atomicAdd(counter, static_cast<unsigned>(__popc(mask)));
  base = __shfl_sync(kFullMask, base, leader < 0 ? 0 : leader);
  return base + static_cast<unsigned>(__popc(mask & ((1u << lane) - 1u)));
}

/// Above-threshold positions of a tile go straight to the output; the threshold bin's members
/// become candidates (as routing keys), and hist1 counts their next digit. Each thread keeps its
/// kItems scores in registers; one block scan gives every thread its output slots, so each CTA
/// makes two global atomics in all.
__global__ void __launch_bounds__(kFilterThreads) filter_kernel(SelectParams p) {
  using Scan = cub::BlockScan<int, kFilterThreads>;
  constexpr int kItems = kFilterTile / kFilterThreads;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int result[2];
  __shared__ unsigned histogram[kBins];
  __shared__ unsigned bases[2];
  allow_dependents();
  wait_for_predecessor();  // the scores and hist0
  const IndexerArgs& a = p.a;
  const std::int64_t row = blockIdx.x;
  const int b = static_cast<int>(row / a.tokens);
  const int t = static_cast<int>(row % a.tokens);
  const RowPlan plan(a, b, t);
  const int tile_begin = plan.sink_end + static_cast<int>(blockIdx.y) * kFilterTile;
  if (!plan.selects || tile_begin >= plan.window_begin) return;
  const int tile_end = min(plan.window_begin, tile_begin + kFilterTile);
  const float* scores = p.scores + row * p.stride;
  float values[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int position = tile_begin + i * kFilterThreads + static_cast<int>(threadIdx.x);
    values[i] = position < tile_end ? scores[position] : 0.0f;
  }
  int above = 0;
  const int bin = threshold_bin<kFilterThreads>(p.hist0 + row * kBins, plan.needed, &above, result, scan_storage);
  for (int i = threadIdx.x; i < kBins; i += blockDim.x) histogram[i] = 0;
  int selected = 0;
  int candidates = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int position = tile_begin + i * kFilterThreads + static_cast<int>(threadIdx.x);
    const int d0 = digit(routing_key(values[i], position), 0);
    if (position < tile_end) {
      selected += d0 > bin ? 1 : 0;
      candidates += d0 == bin ? 1 : 0;
    }
  }
  // Both counts in one scan: each fits in 16 bits (a tile holds kFilterTile <= 65535 positions).
  int offsets = 0;
  int totals = 0;
  Scan(scan_storage).ExclusiveSum(selected | (candidates << 16), offsets, totals);
  unsigned* counters = p.counters + row * 4;
  if (threadIdx.x == 0) {
    bases[0] = atomicAdd(&counters[0], static_cast<unsigned>(totals & 0xffff));
    bases[1] = atomicAdd(&counters[1], static_cast<unsigned>(totals >> 16));
  }
  __syncthreads();
  std::int32_t* positions = a.positions + b * a.positions_stride_b + t * a.positions_stride_t;
  std::uint64_t* list = p.candidates + row * p.stride;
  int selected_slot = plan.forced + static_cast<int>(bases[0]) + (offsets & 0xffff);
  int candidate_slot = static_cast<int>(bases[1]) + (offsets >> 16);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int position = tile_begin + i * kFilterThreads + static_cast<int>(threadIdx.x);
    if (position >= tile_end) continue;
    const std::uint64_t key = routing_key(values[i], position);
    const int d0 = digit(key, 0);
    if (d0 > bin) {
      positions[selected_slot++] = position;
    } else if (d0 == bin) {
      list[candidate_slot++] = key;
      atomicAdd(&histogram[digit(key, 1)], 1u);
    }
  }
  __syncthreads();
  unsigned* global = p.hist1 + row * kBins;
  for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
    if (histogram[i] != 0) atomicAdd(&global[i], histogram[i]);
  }
  (void)above;
}

struct FinishShared {
  cub::BlockScan<int, kFinishThreads>::TempStorage scan;
  int result[2];
  unsigned histogram[kBins];
  std::uint64_t keys[kFinishKeys];  // the fast paths' keys, then the bitmap of the sort
  unsigned next_slot;
  unsigned list_size;
};

/// One radix level over a candidate list: keys whose digit `level` is above `bin` are routed
/// (appended to `positions` at sh.next_slot), keys in `bin` go to `kept` (at sh.list_size).
/// Uniform trip count: warp_slot needs every lane of the warp.
__device__ void split_list(const std::uint64_t* list, int size, int level, int bin, std::int32_t* positions,
                           std::uint64_t* kept, FinishShared& sh) {
#pragma unroll 4
  for (int first = 0; first < size; first += kFinishThreads) {
    const int i = first + static_cast<int>(threadIdx.x);
    const std::uint64_t key = i < size ? list[i] : 0;
    const int d = i < size ? digit(key, level) : -1;
    const unsigned routed = warp_slot(&sh.next_slot, d > bin);
    if (d > bin) positions[routed] = routing_key_position(key);
    const unsigned slot = warp_slot(&sh.list_size, d == bin);
    if (d == bin) kept[slot] = key;
  }
}

/// Radix levels `level`.. over `size` live keys held kFinishItems per thread in registers: each
/// level routes the keys above its threshold bin and keeps the bin's. Keys are unique, so after
/// level 5 exactly `remaining` live.
__device__ void finish_in_registers(std::uint64_t (&keys)[kFinishItems], bool (&alive)[kFinishItems], int level,
                                    int size, int remaining, std::int32_t* positions, FinishShared& sh) {
  for (; remaining > 0; ++level) {
    if (remaining == size || level > 5) {
#pragma unroll
      for (int i = 0; i < kFinishItems; ++i) {
        const unsigned routed = warp_slot(&sh.next_slot, alive[i]);
        if (alive[i]) positions[routed] = routing_key_position(keys[i]);
      }
      return;
    }
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) sh.histogram[i] = 0;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kFinishItems; ++i) {
      if (alive[i]) atomicAdd(&sh.histogram[digit(keys[i], level)], 1u);
    }
    __syncthreads();
    int level_above = 0;
    const int bin = threshold_bin<kFinishThreads>(sh.histogram, remaining, &level_above, sh.result, sh.scan);
#pragma unroll
    for (int i = 0; i < kFinishItems; ++i) {
      const int d = alive[i] ? digit(keys[i], level) : -1;
      const unsigned routed = warp_slot(&sh.next_slot, d > bin);
      if (d > bin) positions[routed] = routing_key_position(keys[i]);
      alive[i] = d == bin;
    }
    remaining -= level_above;
    size = static_cast<int>(sh.histogram[bin]);
    __syncthreads();  // everyone has read histogram[bin] before the next level clears it
  }
}

/// The routed positions' pool slots (RoutingIndex::slots), once the row's positions are final:
/// every layer's attention then reads K and V without a page-table lookup. Called by the whole CTA.
__device__ void write_slots(const SelectParams& p, int b, int t, const std::int32_t* positions, int count) {
  const IndexerArgs& a = p.a;
  if (a.slots == nullptr) return;
  __syncthreads();  // other threads of the CTA wrote the positions
  std::int32_t* slots = a.slots + b * a.slots_stride_b + t * a.slots_stride_t;
  const PagedRows paged{a.page_indices + a.page_indptr[b], p.page_shift};
  for (int i = threadIdx.x; i < a.top_k; i += blockDim.x) {
    slots[i] = i < count ? static_cast<std::int32_t>(paged.pool_slot(positions[i])) : -1;
  }
}

/// One CTA per row: forced positions, the radix levels after the first over the candidates,
/// counts, padding, and the routed set rewritten in ascending order. Level 1 uses hist1 and one
/// coalesced pass over the candidate keys; its threshold bin's members (usually a handful) are
/// ranked directly in shared memory, or (up to kFinishKeys) run the remaining levels in
/// registers. Very large ties (plateaus) take a global-memory path. Last, the row's histograms
/// and counters are zeroed for the next call (the workspace is cleared only when its layout
/// changes).
__global__ void __launch_bounds__(kFinishThreads) finish_kernel(SelectParams p) {
  __shared__ FinishShared sh;
  wait_for_predecessor();  // the filter's positions, candidates, hist1 and counters
  const IndexerArgs& a = p.a;
  const std::int64_t row = blockIdx.x;
  const int b = static_cast<int>(row / a.tokens);
  const int t = static_cast<int>(row % a.tokens);
  const RowPlan plan(a, b, t);
  std::int32_t* positions = a.positions + b * a.positions_stride_b + t * a.positions_stride_t;
  const int count = min(a.top_k, plan.visible);
  if (threadIdx.x == 0) {
    a.counts[b * a.counts_stride_b + t * a.counts_stride_t] = count;
    if (t == 0) {
      const int length = paged_length(a.page_indptr, a.last_page_lengths, a.layout.page_size, b);
      if (length > a.max_length) {
        report(a.status, RunStatus::length_beyond_plan, b, length, static_cast<int>(a.max_length));
      }
    }
  }
  if (plan.visible <= a.top_k) {
    for (int i = threadIdx.x; i < a.top_k; i += blockDim.x) positions[i] = i < plan.visible ? i : -1;
    write_slots(p, b, t, positions, count);
    return;
  }
  for (int i = threadIdx.x; i < plan.sink_end; i += blockDim.x) positions[i] = i;
  for (int i = plan.window_begin + static_cast<int>(threadIdx.x); i < plan.visible; i += blockDim.x) {
    positions[plan.sink_end + (i - plan.window_begin)] = i;
  }
  if (!plan.selects) {  // sinks and window fill top_k: already in order
    write_slots(p, b, t, positions, count);
    return;
  }

  // Both histograms and the candidate count in one round trip.
  unsigned* hist0 = p.hist0 + row * kBins;
  unsigned* hist1 = p.hist1 + row * kBins;
  unsigned* counters = p.counters + row * 4;
  HistogramSlice<kFinishThreads> slice0, slice1;
  slice0.load(hist0);
  slice1.load(hist1);
  int size = static_cast<int>(counters[1]);
  int above = 0;
  threshold_bin<kFinishThreads>(slice0, plan.needed, &above, sh.result, sh.scan);
  int remaining = plan.needed - above;  // still to take from the candidates (bin0's members)
  const std::uint64_t* list = p.candidates + row * p.stride;
  if (threadIdx.x == 0) {
    sh.next_slot = static_cast<unsigned>(plan.forced + above);
    sh.list_size = 0;
  }
  __syncthreads();
  const bool all_in = remaining > 0 && remaining == size;
  int level_above = 0;
  const int bin1 =
      threshold_bin<kFinishThreads>(slice1, all_in ? 0 : max(remaining, 1), &level_above, sh.result, sh.scan);

  if (all_in) {
    for (int i = threadIdx.x; i < size; i += blockDim.x) positions[sh.next_slot + i] = routing_key_position(list[i]);
  } else if (remaining > 0) {
    const int survivors = static_cast<int>(hist1[bin1]);
    const bool fast = survivors <= kFinishKeys;
    std::uint64_t* next = fast ? sh.keys : p.spare + row * p.stride;
    // Uniform trip count (warp_slot needs every lane of the warp).
    split_list(list, size, 1, bin1, positions, next, sh);
    __syncthreads();
    remaining -= level_above;
    size = survivors;
    if (fast && size <= kFinishThreads) {
      // Few survivors (the usual case): rank them directly, one key per thread; keys are unique,
      // so the ranks below `remaining` are exactly the keys to route.
      const bool mine = static_cast<int>(threadIdx.x) < size;
      const std::uint64_t key = mine ? sh.keys[threadIdx.x] : 0;
      int rank = 0;
      for (int j = 0; j < size; ++j) rank += sh.keys[j] > key ? 1 : 0;
      if (mine && rank < remaining) positions[sh.next_slot + rank] = routing_key_position(key);
    } else if (fast) {
      std::uint64_t keys[kFinishItems];
      bool alive[kFinishItems];
#pragma unroll
      for (int i = 0; i < kFinishItems; ++i) {
        const int index = i * kFinishThreads + static_cast<int>(threadIdx.x);
        alive[i] = index < size;
        keys[i] = alive[i] ? sh.keys[index] : 0;
      }
      __syncthreads();  // sh.keys is reused below
      finish_in_registers(keys, alive, 2, size, remaining, positions, sh);
    } else {
      // Levels 2.. over global lists, compacting between the two buffers (level L writes
      // buffers[L % 2]; level 1 wrote the spare one).
      std::uint64_t* buffers[2] = {p.candidates + row * p.stride, p.spare + row * p.stride};
      list = buffers[1];
      for (int level = 2; remaining > 0; ++level) {
        if (remaining == size || level > 5) {
          for (int i = threadIdx.x; i < size; i += blockDim.x) {
            positions[sh.next_slot + i] = routing_key_position(list[i]);
          }
          break;
        }
        for (int i = threadIdx.x; i < kBins; i += blockDim.x) sh.histogram[i] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < size; i += blockDim.x) atomicAdd(&sh.histogram[digit(list[i], level)], 1u);
        __syncthreads();
        int above_bin = 0;
        const int bin = threshold_bin<kFinishThreads>(sh.histogram, remaining, &above_bin, sh.result, sh.scan);
        std::uint64_t* compacted = buffers[level % 2];
        if (threadIdx.x == 0) sh.list_size = 0;
        __syncthreads();
        split_list(list, size, level, bin, positions, compacted, sh);
        __syncthreads();
        remaining -= above_bin;
        size = static_cast<int>(sh.list_size);
        list = compacted;
        __syncthreads();
      }
    }
  }

  // Rewrite the routed set in ascending position order (deterministic output, ordered gathers):
  // mark it in a bitmap (shared memory when the row fits), then compact it with a block scan.
  __syncthreads();
  const int words = (plan.visible + 31) / 32;
  const bool shared_fits = words <= kSharedBitmapWords;
  unsigned* bitmap = shared_fits ? reinterpret_cast<unsigned*>(sh.keys) : p.bitmap + row * (p.stride / 32);
  if (shared_fits) {
    for (int w = threadIdx.x; w < words; w += blockDim.x) bitmap[w] = 0;
    __syncthreads();
  }
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    const int position = positions[i];
    atomicOr(&bitmap[position >> 5], 1u << (position & 31));
  }
  // Clear this row's selection state for the next call.
  for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
    hist0[i] = 0;
    hist1[i] = 0;
  }
  if (threadIdx.x < 4) counters[threadIdx.x] = 0;
  __syncthreads();
  const int per_thread = (words + kFinishThreads - 1) / kFinishThreads;
  const int first_word = static_cast<int>(threadIdx.x) * per_thread;
  const int last_word = min(words, first_word + per_thread);
  int local = 0;
  for (int w = first_word; w < last_word; ++w) local += __popc(bitmap[w]);
  int offset = 0;
  cub::BlockScan<int, kFinishThreads>(sh.scan).ExclusiveSum(local, offset);
  for (int w = first_word; w < last_word; ++w) {
    unsigned bits = bitmap[w];
    if (!shared_fits) bitmap[w] = 0;
    while (bits != 0) {
      const int bit = __ffs(static_cast<int>(bits)) - 1;
      positions[offset++] = w * 32 + bit;
      bits &= bits - 1;
    }
  }
  write_slots(p, b, t, positions, count);
}

void launch_select(const SelectParams& p, int rows, std::int64_t max_length, bool dependent, cudaStream_t stream) {
  // Both follow the score pass as programmatic dependents: their launch overlaps its tail.
  launch_after(dependent, filter_kernel,
               dim3(static_cast<unsigned>(rows), static_cast<unsigned>(ceil_div(max_length, kFilterTile))),
               dim3(kFilterThreads), 0, stream, "indexer filter_kernel", p);
  launch_after(dependent, finish_kernel, dim3(static_cast<unsigned>(rows)), dim3(kFinishThreads), 0, stream,
               "indexer finish_kernel", p);
}

bool select_dependent_launch_ready() {
  return dependent_launch_ready(reinterpret_cast<const void*>(filter_kernel)) &&
         dependent_launch_ready(reinterpret_cast<const void*>(finish_kernel));
}

}  // namespace indexer
}  // namespace cuda_kernels
}  // namespace clsa
