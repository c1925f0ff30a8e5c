// The lightning indexer on the GPU: a score pass over the indexer keys (tensor cores for 16-bit
// keys) that also builds the first radix histogram, then an exact multi-CTA radix select.
//
//   score_kernel   grid (token tiles of the planned max_length, sequences, row blocks): reads every
//                  visible indexer key once
//                  (16-byte loads), mma.sync m16n8k16 with the queries' heads as M, writes the
//                  f32 scores and adds the top 11 bits of each candidate's key to hist0[row].
//   filter_kernel  grid (rows, position tiles): finds the threshold bin of hist0, writes the
//                  positions above it, compacts the bin's members (as routing keys), builds hist1.
//   finish_kernel  one CTA per row: sinks and window, then the remaining radix passes over the
//                  (usually small) candidate set, down to the position bits (ties to the lower
//                  position), the -1 padding, and the routed set rewritten in ascending order;
//                  it leaves the row's histograms and counters zero for the next call.
//
// The routing key of a candidate is the 64-bit (score_key(score) << 32 | ~position): unique, so the
// selected set is exactly the CPU's. Candidate lists live in the workspace with room for every
// position: nothing is ever dropped.
#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "../cuda/kernels.hpp"
#include "common.cuh"

namespace clsa {
namespace cuda_kernels {

namespace {

constexpr int kBins = 2048;
constexpr int kScoreThreads = 128;
constexpr int kTokensPerWarp = 64;
constexpr int kScoreTile = kTokensPerWarp * kScoreThreads / 32;  // 256 positions per CTA
constexpr int kQueryBudget = 32 * 1024;                          // shared memory for queries
constexpr int kFilterThreads = 256;
constexpr int kFilterTile = 4096;

/// Workspace layout (all offsets 256-byte aligned).
struct Workspace {
  std::int64_t stride;  // scores / candidate row stride (positions)
  std::size_t scores, hist0, hist1, counters, bitmap, candidates, spare, end;

  Workspace(int rows, std::int64_t max_length) {
    auto align = [](std::size_t x) { return (x + 255) / 256 * 256; };
    stride = ceil_div(std::max<std::int64_t>(max_length, 1), 64) * 64;
    const std::size_t r = static_cast<std::size_t>(rows);
    const std::size_t row_bytes = static_cast<std::size_t>(stride) * 4;
    scores = 0;
    hist0 = align(scores + r * row_bytes);
    hist1 = hist0 + r * kBins * 4;
    counters = hist1 + r * kBins * 4;
    bitmap = counters + r * 4 * 4;
    candidates = align(bitmap + r * static_cast<std::size_t>(stride / 32) * 4);
    spare = align(candidates + 2 * r * row_bytes);  // 64-bit keys
    end = align(spare + 2 * r * row_bytes);
  }
};

struct SelectParams {
  IndexerArgs a;
  int page_shift;
  int rows_per_block;  // query tokens per score CTA (grid.z = ceil(T / rows_per_block))
  int padded_heads;    // heads rounded up to 16 (mma path)
  std::int64_t stride;
  float* scores;              // [rows][stride]
  unsigned* hist0;            // [rows][kBins]
  unsigned* hist1;            // [rows][kBins]
  unsigned* counters;         // [rows][4]: selected above the threshold bin, candidates
  unsigned* bitmap;           // [rows][stride / 32]: the routed set, to write it in position order
  std::uint64_t* candidates;  // [rows][stride]: routing keys of the threshold bin's members
  std::uint64_t* spare;       // [rows][stride]
};

/// Length of sequence b as the plan sees it: one longer than the plan's max_length counts as
/// empty (the finish kernel reports it), so no kernel reads or writes past the planned rows.
__device__ __forceinline__ int planned_length(const IndexerArgs& a, int b) {
  const int length = sequence_length(a.lengths, a.page_indptr, a.last_page_lengths, a.layout.page_size, b);
  return length <= a.max_length ? length : 0;
}

/// What a query row must do: its visible length and the candidate range between sinks and window.
struct RowPlan {
  int visible, sink_end, window_begin, forced, needed;
  bool selects;  // false when every visible position is routed (or sinks + window fill top_k)

  __device__ RowPlan(const IndexerArgs& a, int b, int t) {
    visible = visible_length(planned_length(a, b), a.tokens, t);
    sink_end = min(a.sinks, visible);
    window_begin = max(sink_end, visible - a.window);
    forced = sink_end + (visible - window_begin);
    needed = a.top_k - forced;
    selects = visible > a.top_k && needed > 0;
  }
};

__device__ __forceinline__ float relu_keep_nan(float x) {
  return x < 0.0f ? 0.0f : x;
}

/// Radix digit `level` of a routing key: 11, 11, 10 bits of the score key, then 11, 11, 10 bits
/// of the position part.
__device__ __forceinline__ int digit(std::uint64_t key, int level) {
  switch (level) {
    case 0:
      return static_cast<int>(key >> 53);
    case 1:
      return static_cast<int>((key >> 42) & 0x7ff);
    case 2:
      return static_cast<int>((key >> 32) & 0x3ff);
    case 3:
      return static_cast<int>((key >> 21) & 0x7ff);
    case 4:
      return static_cast<int>((key >> 10) & 0x7ff);
    default:
      return static_cast<int>(key & 0x3ff);
  }
}

/// A histogram's bins as one thread of a block holds them for threshold_bin: kBins / Threads
/// consecutive bins, in descending bin order.
template <int Threads>
struct HistogramSlice {
  int counts[kBins / Threads];
  __device__ void load(const unsigned* histogram) {
#pragma unroll
    for (int i = 0; i < kBins / Threads; ++i) {
      counts[i] = static_cast<int>(histogram[kBins - 1 - (threadIdx.x * (kBins / Threads) + i)]);
    }
  }
};

/// Threshold bin of a histogram: the bin where, counting from the top, `needed` is reached.
/// Returns the bin and, in `above`, how many lie in higher bins. Every thread of the block gets
/// the answer. `shared_result` holds two ints.
template <int Threads>
__device__ int threshold_bin(const HistogramSlice<Threads>& slice, int needed, int* above, int* shared_result,
                             typename cub::BlockScan<int, Threads>::TempStorage& scan_storage) {
  constexpr int kPerThread = kBins / Threads;
  if (threadIdx.x == 0) {
    shared_result[0] = 0;  // only reached if the histogram holds fewer than `needed` (a bug)
    shared_result[1] = 0;
  }
  int local = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) local += slice.counts[i];
  int before = 0;
  cub::BlockScan<int, Threads>(scan_storage).ExclusiveSum(local, before);  // its barrier orders the reset
  int running = before;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    if (running < needed && running + slice.counts[i] >= needed) {
      shared_result[0] = kBins - 1 - (static_cast<int>(threadIdx.x) * kPerThread + i);
      shared_result[1] = running;
    }
    running += slice.counts[i];
  }
  __syncthreads();
  *above = shared_result[1];
  const int bin = shared_result[0];
  __syncthreads();
  return bin;
}

template <int Threads>
__device__ int threshold_bin(const unsigned* histogram, int needed, int* above, int* shared_result,
                             typename cub::BlockScan<int, Threads>::TempStorage& scan_storage) {
  HistogramSlice<Threads> slice;
  slice.load(histogram);
  return threshold_bin<Threads>(slice, needed, above, shared_result, scan_storage);
}

// ---------------------------------------------------------------- score pass

__device__ __forceinline__ void mma_bf16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_f16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <class Elem>
__device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (std::is_same<Elem, __nv_bfloat16>::value) {
    mma_bf16(c, a, b0, b1);
  } else {
    mma_f16(c, a, b0, b1);
  }
}

/// Adds this CTA's scores of block rows to hist0 (top 11 bits of each candidate's key).
__device__ void add_first_histogram(const SelectParams& p, int b, int t_begin, int t_end, int tile_begin,
                                    unsigned* histogram) {
  const IndexerArgs& a = p.a;
  for (int t = t_begin; t < t_end; ++t) {
    const RowPlan plan(a, b, t);
    if (!plan.selects) continue;  // uniform over the CTA
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) histogram[i] = 0;
    __syncthreads();
    const std::int64_t row = std::int64_t{b} * a.tokens + t;
    const float* scores = p.scores + row * p.stride;
    for (int i = threadIdx.x; i < kScoreTile; i += blockDim.x) {
      const int position = tile_begin + i;
      if (position >= plan.sink_end && position < plan.window_begin) {
        atomicAdd(&histogram[score_key(scores[position]) >> 21], 1u);
      }
    }
    __syncthreads();
    unsigned* global = p.hist0 + row * kBins;
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
      if (histogram[i] != 0) atomicAdd(&global[i], histogram[i]);
    }
    __syncthreads();
  }
}

/// Scores with tensor cores (f16/bf16 keys, DIM 64 or 128). Queries of rows_per_block tokens x
/// padded_heads sit in shared memory as [row][head][DIM + 32] (padded against bank conflicts).
template <class Elem, int DIM>
__global__ void __launch_bounds__(kScoreThreads) score_kernel_mma(SelectParams p) {
  const IndexerArgs& a = p.a;
  extern __shared__ __align__(16) unsigned char shared[];
  constexpr int kRowElems = DIM + 32;  // rows 64 bytes apart modulo 128: conflict-free A loads
  const int heads = a.heads;
  const int padded = p.padded_heads;
  const int b = blockIdx.y;
  const int t_begin = blockIdx.z * p.rows_per_block;
  const int t_end = min(a.tokens, t_begin + p.rows_per_block);
  const int block_rows = t_end - t_begin;
  const int length = planned_length(a, b);
  const int tile_begin = blockIdx.x * kScoreTile;
  if (tile_begin >= length) return;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;  // the token of this lane in an n-tile; a row of C
  const int quad = lane % 4;   // threadID_in_group
  const PagedRows paged{a.page_indices + a.page_indptr[b], p.page_shift, (1 << p.page_shift) - 1};
  const PagedCacheLayout& layout = a.layout;
  const Elem* keys = static_cast<const Elem*>(layout.index_keys);
  constexpr int kVectors = DIM / 32;  // 16-byte loads per lane per token
  const int head_tiles = padded / 16;
  const int warp_begin = tile_begin + warp * kTokensPerWarp;
  // This lane's key rows in all of the warp's n-tiles, resolved up front (independent page-table
  // reads) so that the key loads never wait on a lookup; nullptr past the sequence's end.
  constexpr int kTiles = kTokensPerWarp / 8;
  const Elem* key_rows[kTiles];
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile) {
    const int position = warp_begin + tile * 8 + group;
    key_rows[tile] = position < length ? keys + paged.page(position) * layout.index_page_stride +
                                             paged.slot(position) * layout.index_token_stride + quad * 8
                                       : nullptr;
  }
  auto load_step = [&](int n0, uint4(&raw)[2][kVectors]) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const Elem* row = key_rows[n0 / 8 + half];
#pragma unroll
      for (int v = 0; v < kVectors; ++v)
        raw[half][v] = row != nullptr ? load_vector(row + v * 32) : make_uint4(0, 0, 0, 0);
    }
  };
  uint4 next[2][kVectors];
  load_step(0, next);

  Elem* queries = reinterpret_cast<Elem*>(shared);  // [block_rows * padded][kRowElems]
  float* weights = reinterpret_cast<float*>(queries + static_cast<std::size_t>(p.rows_per_block) * padded * kRowElems);
  unsigned* histogram = reinterpret_cast<unsigned*>(weights + p.rows_per_block * padded);
  for (int i = threadIdx.x; i < block_rows * padded * (DIM / 8); i += blockDim.x) {
    const int r = i / (DIM / 8);
    const int v = i % (DIM / 8);
    const int t = t_begin + r / padded;
    const int h = r % padded;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (h < heads) {
      value = *reinterpret_cast<const uint4*>(static_cast<const Elem*>(a.q) + b * a.q_stride_b + t * a.q_stride_t +
                                              h * a.q_stride_h + v * 8);
    }
    *reinterpret_cast<uint4*>(queries + static_cast<std::size_t>(r) * kRowElems + v * 8) = value;
  }
  for (int i = threadIdx.x; i < block_rows * padded; i += blockDim.x) {
    const int t = t_begin + i / padded;
    const int h = i % padded;
    float w = 0.0f;
    if (h < heads) {
      const std::int64_t offset = b * a.w_stride_b + t * a.w_stride_t + h;
      switch (a.weights_dtype) {
        case DType::f32:
          w = static_cast<const float*>(a.weights)[offset];
          break;
        case DType::f16:
          w = __half2float(static_cast<const __half*>(a.weights)[offset]);
          break;
        default:
          w = __bfloat162float(static_cast<const __nv_bfloat16*>(a.weights)[offset]);
          break;
      }
    }
    weights[i] = w;
  }
  __syncthreads();

  // Two n-tiles (16 tokens) per step; the next step's 2 * kVectors loads per lane are issued
  // before this step's arithmetic (the first before the queries are staged).
#pragma unroll
  for (int n0 = 0; n0 < kTokensPerWarp; n0 += 16) {
    uint4 raw[2][kVectors];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int v = 0; v < kVectors; ++v) raw[half][v] = next[half][v];
    }
    if (n0 + 16 < kTokensPerWarp) load_step(n0 + 16, next);
    if (warp_begin + n0 >= length) break;  // uniform over the warp
    for (int r = 0; r < block_rows; ++r) {
      float total[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};  // [n-tile][column pair]
      for (int ht = 0; ht < head_tiles; ++ht) {
        const int m_row = r * padded + ht * 16;
        const Elem* q_low = queries + static_cast<std::size_t>(m_row + group) * kRowElems + quad * 8;
        const Elem* q_high = q_low + 8 * kRowElems;
        float c[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
#pragma unroll
        for (int v = 0; v < kVectors; ++v) {
          const uint4 low = *reinterpret_cast<const uint4*>(q_low + v * 32);
          const uint4 high = *reinterpret_cast<const uint4*>(q_high + v * 32);
          // Dimension order inside a 32-dim chunk is permuted identically for A and B (the sum
          // over k does not care): k-step 2v takes words 0,1; k-step 2v+1 takes words 2,3.
          const unsigned a_even[4] = {low.x, high.x, low.y, high.y};
          const unsigned a_odd[4] = {low.z, high.z, low.w, high.w};
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            mma<Elem>(c[half], a_even, raw[half][v].x, raw[half][v].y);
            mma<Elem>(c[half], a_odd, raw[half][v].z, raw[half][v].w);
          }
        }
        const float w_low = weights[r * padded + ht * 16 + group];
        const float w_high = weights[r * padded + ht * 16 + group + 8];
        const bool low_valid = ht * 16 + group < heads;
        const bool high_valid = ht * 16 + group + 8 < heads;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
#pragma unroll
          for (int col = 0; col < 2; ++col) {
            float value = (low_valid ? w_low * relu_keep_nan(c[half][col]) : 0.0f) +
                          (high_valid ? w_high * relu_keep_nan(c[half][col + 2]) : 0.0f);
            value += __shfl_xor_sync(kFullMask, value, 4);
            value += __shfl_xor_sync(kFullMask, value, 8);
            value += __shfl_xor_sync(kFullMask, value, 16);
            total[half][col] += value;
          }
        }
      }
      if (group == 0) {
        const std::int64_t row = std::int64_t{b} * a.tokens + t_begin + r;
        float* out = p.scores + row * p.stride;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int position = warp_begin + n0 + half * 8 + quad * 2;
          if (position < length) out[position] = a.scale * total[half][0];
          if (position + 1 < length) out[position + 1] = a.scale * total[half][1];
        }
      }
    }
  }
  __syncthreads();
  add_first_histogram(p, b, t_begin, t_end, tile_begin, histogram);
}

/// Scores with CUDA cores for f32 keys (any index_dim that is a multiple of 4).
__global__ void __launch_bounds__(kScoreThreads) score_kernel_f32(SelectParams p) {
  const IndexerArgs& a = p.a;
  extern __shared__ __align__(16) unsigned char shared[];
  const int dim = a.dim;
  const int heads = a.heads;
  const int b = blockIdx.y;
  const int t_begin = blockIdx.z * p.rows_per_block;
  const int t_end = min(a.tokens, t_begin + p.rows_per_block);
  const int block_rows = t_end - t_begin;
  const int length = planned_length(a, b);
  const int tile_begin = blockIdx.x * kScoreTile;
  if (tile_begin >= length) return;
  float* queries = reinterpret_cast<float*>(shared);  // [block_rows][heads][dim]
  float* weights = queries + static_cast<std::size_t>(p.rows_per_block) * heads * dim;
  unsigned* histogram = reinterpret_cast<unsigned*>(weights + p.rows_per_block * heads);
  for (int i = threadIdx.x; i < block_rows * heads * dim; i += blockDim.x) {
    const int r = i / (heads * dim);
    const int h = (i / dim) % heads;
    const int d = i % dim;
    queries[i] = static_cast<const float*>(a.q)[b * a.q_stride_b + (t_begin + r) * a.q_stride_t + h * a.q_stride_h + d];
  }
  for (int i = threadIdx.x; i < block_rows * heads; i += blockDim.x) {
    const std::int64_t offset = b * a.w_stride_b + (t_begin + i / heads) * a.w_stride_t + i % heads;
    float w;
    switch (a.weights_dtype) {
      case DType::f32:
        w = static_cast<const float*>(a.weights)[offset];
        break;
      case DType::f16:
        w = __half2float(static_cast<const __half*>(a.weights)[offset]);
        break;
      default:
        w = __bfloat162float(static_cast<const __nv_bfloat16*>(a.weights)[offset]);
        break;
    }
    weights[i] = w;
  }
  __syncthreads();
  const PagedRows paged{a.page_indices + a.page_indptr[b], p.page_shift, (1 << p.page_shift) - 1};
  const PagedCacheLayout& layout = a.layout;
  for (int i = threadIdx.x; i < kScoreTile; i += blockDim.x) {
    const int position = tile_begin + i;
    if (position >= length) break;
    const float* key = static_cast<const float*>(layout.index_keys) + paged.page(position) * layout.index_page_stride +
                       paged.slot(position) * layout.index_token_stride;
    for (int r = 0; r < block_rows; ++r) {
      float total = 0.0f;
      for (int h = 0; h < heads; ++h) {
        const float* q = queries + (static_cast<std::size_t>(r) * heads + h) * dim;
        float dot = 0.0f;
        for (int d = 0; d < dim; d += 4) {
          const float4 k4 = *reinterpret_cast<const float4*>(key + d);
          dot = fmaf(q[d], k4.x, dot);
          dot = fmaf(q[d + 1], k4.y, dot);
          dot = fmaf(q[d + 2], k4.z, dot);
          dot = fmaf(q[d + 3], k4.w, dot);
        }
        total += weights[r * heads + h] * relu_keep_nan(dot);
      }
      p.scores[(std::int64_t{b} * a.tokens + t_begin + r) * p.stride + position] = a.scale * total;
    }
  }
  __syncthreads();
  add_first_histogram(p, b, t_begin, t_end, tile_begin, histogram);
}

// ---------------------------------------------------------------- selection

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

/// One CTA per row: forced positions, the radix levels after the first over the candidates,
/// counts, padding, and the routed set rewritten in ascending order. Level 1 uses hist1 and one
/// coalesced pass over the candidate keys; its threshold bin's members (usually a handful) are
/// ranked directly in shared memory, or (up to kFinishKeys) run the remaining levels in
/// registers. Very large ties (plateaus) take a global-memory path. Last, the row's histograms
/// and counters are zeroed for the next call (the workspace is cleared only when its layout
/// changes).
__global__ void __launch_bounds__(kFinishThreads) finish_kernel(SelectParams p) {
  __shared__ FinishShared sh;
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
      const int length = sequence_length(a.lengths, a.page_indptr, a.last_page_lengths, a.layout.page_size, b);
      if (length > a.max_length) {
        report(a.status, RunStatus::length_beyond_plan, b, length, static_cast<int>(a.max_length));
      }
    }
  }
  if (plan.visible <= a.top_k) {
    for (int i = threadIdx.x; i < a.top_k; i += blockDim.x) positions[i] = i < plan.visible ? i : -1;
    return;
  }
  for (int i = threadIdx.x; i < plan.sink_end; i += blockDim.x) positions[i] = i;
  for (int i = plan.window_begin + static_cast<int>(threadIdx.x); i < plan.visible; i += blockDim.x) {
    positions[plan.sink_end + (i - plan.window_begin)] = i;
  }
  if (!plan.selects) return;  // sinks and window fill top_k: already in order

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
}

using ScoreKernel = void (*)(SelectParams);

/// The score kernels that exist: (dtype, index_dim) -> kernel; dim 0 means any multiple of 4.
struct ScoreVariant {
  DType dtype;
  int dim;
  ScoreKernel kernel;
};
const ScoreVariant kScoreVariants[] = {
    {DType::bf16, 64, score_kernel_mma<__nv_bfloat16, 64>},
    {DType::bf16, 128, score_kernel_mma<__nv_bfloat16, 128>},
    {DType::f16, 64, score_kernel_mma<__half, 64>},
    {DType::f16, 128, score_kernel_mma<__half, 128>},
    {DType::f32, 0, score_kernel_f32},
};

int score_variant(DType dtype, int dim) {
  for (int i = 0; i < static_cast<int>(sizeof(kScoreVariants) / sizeof(kScoreVariants[0])); ++i) {
    const ScoreVariant& v = kScoreVariants[i];
    if (v.dtype == dtype && (v.dim == dim || (v.dim == 0 && dim % 4 == 0))) return i;
  }
  return -1;
}

/// Shared memory of one query row in the score kernel, and the rows a CTA stages for T tokens.
std::size_t query_row_bytes(DType dtype, int heads, int dim) {
  if (dtype == DType::f32) return static_cast<std::size_t>(heads) * (dim + 1) * 4;
  return static_cast<std::size_t>(ceil_div(heads, 16) * 16) * ((dim + 32) * 2 + 4);
}
int rows_per_block(std::size_t row_bytes, int tokens) {
  return static_cast<int>(std::max<std::size_t>(1, std::min<std::size_t>(tokens, kQueryBudget / row_bytes)));
}

}  // namespace

bool indexer_supports(DType dtype, int dim) {
  return score_variant(dtype, dim) >= 0;
}

IndexerPlan plan_indexer(int max_sequences, int max_tokens, std::int64_t max_length, int heads, int dim) {
  // Grid limits: y and z extents of a launch are at most 65535.
  const std::int64_t rows = std::int64_t{max_sequences} * max_tokens;
  const std::int64_t filter_tiles = ceil_div(max_length, kFilterTile);
  if (max_sequences > 65535 || max_tokens > 65535 || filter_tiles > 65535 || rows > INT32_MAX) {
    detail::fail(ErrorCode::capacity_exceeded,
                 detail::concat("bounds of ", max_sequences, " sequences x ", max_tokens, " query tokens, length ",
                                max_length, " exceed what the CUDA kernels' grids hold (at most 65535 sequences, ",
                                "65535 query tokens, ", std::int64_t{65535} * kFilterTile, " positions)"));
  }
  IndexerPlan plan;
  plan.max_sequences = max_sequences;
  plan.max_tokens = max_tokens;
  plan.max_length = max_length;
  const Workspace w(static_cast<int>(rows), max_length);
  plan.stride = w.stride;
  plan.bytes = w.end;
  for (const ScoreVariant& v : kScoreVariants) {
    if (v.dim != dim && !(v.dim == 0 && dim % 4 == 0)) continue;
    const std::size_t row_bytes = query_row_bytes(v.dtype, heads, dim);
    allow_shared_memory(reinterpret_cast<const void*>(v.kernel),
                        row_bytes * rows_per_block(row_bytes, max_tokens) + kBins * 4,
                        "cudaFuncSetAttribute (indexer scores)");
  }
  return plan;
}

void index_select(const IndexerArgs& args, const IndexerPlan& plan, void* workspace, cudaStream_t stream) {
  const int rows = args.num_sequences * args.tokens;
  const Workspace w(plan.max_sequences * plan.max_tokens, plan.max_length);
  auto* base = static_cast<unsigned char*>(workspace);
  SelectParams p{};
  p.a = args;
  p.a.max_length = plan.max_length;
  p.page_shift = log2_exact(args.layout.page_size);
  p.stride = w.stride;
  p.scores = reinterpret_cast<float*>(base + w.scores);
  p.hist0 = reinterpret_cast<unsigned*>(base + w.hist0);
  p.hist1 = reinterpret_cast<unsigned*>(base + w.hist1);
  p.counters = reinterpret_cast<unsigned*>(base + w.counters);
  p.bitmap = reinterpret_cast<unsigned*>(base + w.bitmap);
  p.candidates = reinterpret_cast<std::uint64_t*>(base + w.candidates);
  p.spare = reinterpret_cast<std::uint64_t*>(base + w.spare);

  const DType dtype = args.layout.dtype;
  const int variant = score_variant(dtype, args.dim);
  if (variant < 0) detail::fail(ErrorCode::unsupported, "index_select: no score kernel (internal)");
  p.padded_heads = dtype == DType::f32 ? args.heads : static_cast<int>(ceil_div(args.heads, 16) * 16);
  const std::size_t row_bytes = query_row_bytes(dtype, args.heads, args.dim);
  p.rows_per_block = rows_per_block(row_bytes, args.tokens);
  const std::size_t shared = row_bytes * p.rows_per_block + kBins * 4;
  // Launch sizes come from the plan (max_length), never from the lengths of the moment.
  const dim3 grid(static_cast<unsigned>(ceil_div(plan.max_length, kScoreTile)),
                  static_cast<unsigned>(args.num_sequences),
                  static_cast<unsigned>(ceil_div(args.tokens, p.rows_per_block)));
  kScoreVariants[variant].kernel<<<grid, kScoreThreads, shared, stream>>>(p);
  detail::cuda_check_launch("indexer score_kernel");
  filter_kernel<<<dim3(static_cast<unsigned>(rows), static_cast<unsigned>(ceil_div(plan.max_length, kFilterTile))),
                  kFilterThreads, 0, stream>>>(p);
  detail::cuda_check_launch("indexer filter_kernel");
  finish_kernel<<<static_cast<unsigned>(rows), kFinishThreads, 0, stream>>>(p);
  detail::cuda_check_launch("indexer finish_kernel");
}

}  // namespace cuda_kernels
}  // namespace clsa
