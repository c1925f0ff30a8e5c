// The lightning indexer on the GPU, its score pass (this file: tensor cores for 16-bit keys, CUDA
// cores for f32) and its plan; the exact top-k that follows is in indexer_select.cu.
//
//   score_kernel   grid (token tiles of the planned max_length, sequences, row blocks): reads every
//                  visible indexer key once (16-byte loads), mma.sync m16n8k16 with the queries'
//                  heads as M, and writes the f32 scores of its tile. With one query row per CTA
//                  (16-bit keys) it also counts the first radix digit of its tile's candidate
//                  scores into the row's histogram in the workspace, so the select kernel starts
//                  at level 1.
//   select_kernel  (indexer_select.cu) a thread-block cluster per query row: radix select over the
//                  scores in L2, the routed set in ascending order, then the optional K/V gather.
#include <algorithm>

#include "indexer_common.cuh"

namespace clsa {
namespace cuda_kernels {

namespace indexer {
/// Head weight `offset` of w [B, T, H], widened to f32 from its dtype (f32, f16 or bf16): what
/// both score kernels stage beside the queries.
__device__ __forceinline__ float head_weight(const IndexerArgs& a, std::int64_t offset) {
  switch (a.weights_dtype) {
    case DType::f32:
      return static_cast<const float*>(a.weights)[offset];
    case DType::f16:
      return widen(static_cast<const __half*>(a.weights)[offset]);
    default:
      return widen(static_cast<const __nv_bfloat16*>(a.weights)[offset]);
  }
}

/// What a score CTA computes: query tokens [t_begin, t_begin + rows) of batch sequence b (fewer
/// than rows_per_block in a sequence's last block) against the kScoreTile positions from
/// tile_begin; length is the sequence's as the plan sees it (nothing to do from it on).
struct ScoreBlock {
  int b, t_begin, rows, length, tile_begin;
  __device__ explicit ScoreBlock(const SelectParams& p) {
    b = blockIdx.y;
    t_begin = blockIdx.z * p.rows_per_block;
    rows = min(p.a.tokens, t_begin + p.rows_per_block) - t_begin;
    length = planned_length(p.a, b);
    tile_begin = blockIdx.x * kScoreTile;
  }
};

/// The score pass's share of the select kernel's first radix level (SelectParams::histograms, one
/// query row per CTA): the level-0 digit of every score this CTA writes at a candidate position of
/// its row, [sink_end, window_begin) of the same RowPlan the select kernel uses, counted in shared
/// memory and added to the row's histogram at the end. `on` is false (uniform over the CTA) when
/// there is nothing to count: no histograms this call, a row that does not select, or a tile
/// without candidates.
struct FirstLevelCounts {
  unsigned* bins;  // kBins counts in the CTA's shared memory (allocated only where histograms are built)
  int lo, hi;      // the row's candidate positions
  bool on;

  /// Zeroes the bins when on (a __syncthreads() must follow before the first add()).
  __device__ FirstLevelCounts(const SelectParams& p, int b, int t, int tile_begin, unsigned* shared_bins) {
    bins = shared_bins;
    lo = hi = 0;
    on = false;
    if (p.histograms == nullptr || p.rows_per_block != 1) return;
    const RowPlan plan(p.a, b, t);
    if (!plan.selects || tile_begin >= plan.window_begin || tile_begin + kScoreTile <= plan.sink_end) return;
    on = true;
    lo = plan.sink_end;
    hi = plan.window_begin;
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) bins[i] = 0;
  }
  /// Counts `score` where `mine` (this lane stored it at `position`) and the position is a
  /// candidate. Warp-collective; only when on.
  __device__ void add(float score, int position, bool mine) const {
    add_to_histogram(bins, level_digit(score_key(score), 0), mine && position >= lo && position < hi);
  }
  /// Adds the CTA's nonzero counts to row (b, t)'s histogram, after every add() of the CTA.
  __device__ void flush(const SelectParams& p, int b, int t) const {
    if (!on) return;  // uniform over the CTA
    __syncthreads();
    unsigned* global = p.histograms + (std::int64_t{b} * p.a.tokens + t) * kBins;
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
      const unsigned count = bins[i];
      if (count != 0) atomicAdd(&global[i], count);
    }
  }
};

/// Scores with tensor cores (f16/bf16 keys, DIM 64 or 128). Queries of rows_per_block tokens x
/// padded_heads sit in shared memory as [row][head][DIM + 32] (padded against bank conflicts).
template <class Elem, int DIM>
__global__ void __launch_bounds__(kScoreThreads) score_kernel_mma(SelectParams p) {
  wait_for_predecessor();  // launched as a programmatic dependent (IndexerConfig::enable_pdl): nothing read before
  allow_dependents();      // the select kernels may be scheduled now; they wait for this grid
  const IndexerArgs& a = p.a;
  extern __shared__ __align__(16) unsigned char shared[];
  constexpr int kRowElems = DIM + 32;  // rows 64 bytes apart modulo 128: conflict-free A loads
  const int heads = a.heads;
  const int padded = p.padded_heads;
  const auto [b, t_begin, block_rows, length, tile_begin] = ScoreBlock(p);
  if (tile_begin >= length) return;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;  // the token of this lane in an n-tile; a row of C
  const int quad = lane % 4;   // threadID_in_group
  const PagedRows paged{a.page_indices + a.page_indptr[b], p.page_shift};
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
    key_rows[tile] = position < length ? keys + paged.index_offset(layout, position) + quad * 8 : nullptr;
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
  unsigned* const bins = reinterpret_cast<unsigned*>(weights + static_cast<std::size_t>(p.rows_per_block) * padded);
  const FirstLevelCounts counts(p, b, t_begin, tile_begin, bins);
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
    weights[i] = h < heads ? head_weight(a, b * a.w_stride_b + t * a.w_stride_t + h) : 0.0f;
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
            mma_16816<Elem>(c[half], a_even, raw[half][v].x, raw[half][v].y);
            mma_16816<Elem>(c[half], a_odd, raw[half][v].z, raw[half][v].w);
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
      // Every group of a quad holds the same totals, bit for bit (each shuffle step above adds
      // the same two values in both lanes of a pair), so groups 0..3 store the step's 16
      // positions, one each: group g the n-tile g / 2 and column g % 2. The first level counts
      // exactly the value each lane stores (r is 0 then).
      const int half = (group >> 1) & 1;
      const int col = group & 1;
      const float sum = half == 0 ? (col == 0 ? total[0][0] : total[0][1]) : (col == 0 ? total[1][0] : total[1][1]);
      const float value = a.scale * sum;
      const int position = warp_begin + n0 + half * 8 + quad * 2 + col;
      const bool mine = group < 4 && position < length;
      if (mine) p.scores[(std::int64_t{b} * a.tokens + t_begin + r) * p.stride + position] = value;
      if (counts.on) counts.add(value, position, mine);
    }
  }
  counts.flush(p, b, t_begin);
}

/// Scores with CUDA cores for f32 keys (any index_dim that is a multiple of 4).
__global__ void __launch_bounds__(kScoreThreads) score_kernel_f32(SelectParams p) {
  wait_for_predecessor();  // launched as a programmatic dependent (IndexerConfig::enable_pdl): nothing read before
  allow_dependents();      // the select kernels may be scheduled now; they wait for this grid
  const IndexerArgs& a = p.a;
  extern __shared__ __align__(16) unsigned char shared[];
  const int dim = a.dim;
  const int heads = a.heads;
  const auto [b, t_begin, block_rows, length, tile_begin] = ScoreBlock(p);
  if (tile_begin >= length) return;
  float* queries = reinterpret_cast<float*>(shared);  // [block_rows][heads][dim]
  float* weights = queries + static_cast<std::size_t>(p.rows_per_block) * heads * dim;
  for (int i = threadIdx.x; i < block_rows * heads * dim; i += blockDim.x) {
    const int r = i / (heads * dim);
    const int h = (i / dim) % heads;
    const int d = i % dim;
    queries[i] = static_cast<const float*>(a.q)[b * a.q_stride_b + (t_begin + r) * a.q_stride_t + h * a.q_stride_h + d];
  }
  for (int i = threadIdx.x; i < block_rows * heads; i += blockDim.x) {
    weights[i] = head_weight(a, b * a.w_stride_b + (t_begin + i / heads) * a.w_stride_t + i % heads);
  }
  __syncthreads();
  const PagedRows paged{a.page_indices + a.page_indptr[b], p.page_shift};
  const PagedCacheLayout& layout = a.layout;
  for (int i = threadIdx.x; i < kScoreTile; i += blockDim.x) {
    const int position = tile_begin + i;
    if (position >= length) break;
    const float* key = static_cast<const float*>(layout.index_keys) + paged.index_offset(layout, position);
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
}

}  // namespace indexer

namespace {

using namespace indexer;

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

/// Shared memory of one query row in the score kernel (its queries and head weights), and the rows
/// a CTA stages for T tokens.
std::size_t query_row_bytes(DType dtype, int heads, int dim) {
  if (dtype == DType::f32) return static_cast<std::size_t>(heads) * (dim + 1) * 4;
  return static_cast<std::size_t>(ceil_div(heads, 16) * 16) * ((dim + 32) * 2 + 4);
}
int rows_per_block(std::size_t row_bytes, int tokens) {
  return static_cast<int>(std::max<std::size_t>(1, std::min<std::size_t>(tokens, kQueryBudget / row_bytes)));
}

/// Whether the score pass builds the first radix level's row histograms (FirstLevelCounts): with
/// one query row per CTA, in the tensor-core kernel (the f32 one leaves level 0 to the select).
bool builds_histograms(DType dtype, int rows_per_block) {
  return dtype != DType::f32 && rows_per_block == 1;
}

/// Shared memory of a score CTA: its rows' queries and weights, then the first level's bins.
std::size_t score_shared_bytes(DType dtype, std::size_t row_bytes, int rows_per_block) {
  return row_bytes * static_cast<std::size_t>(rows_per_block) +
         (builds_histograms(dtype, rows_per_block) ? kBins * sizeof(unsigned) : 0);
}

}  // namespace

bool indexer_supports(DType dtype, int dim) {
  return score_variant(dtype, dim) >= 0;
}

bool routed_kv_supported(DType dtype, int head_dim) {
  return gather_supported(dtype, head_dim);
}

IndexerPlan plan_indexer(int max_sequences, int max_tokens, std::int64_t max_length, int heads, int dim,
                         bool enable_pdl) {
  // Grid limits: y and z extents of a launch are at most 65535.
  const std::int64_t rows = std::int64_t{max_sequences} * max_tokens;
  if (max_sequences > 65535 || max_tokens > 65535 || rows > INT32_MAX / kMaxCluster || max_length > INT32_MAX / 2) {
    detail::fail(ErrorCode::capacity_exceeded,
                 detail::concat("bounds of ", max_sequences, " sequences x ", max_tokens, " query tokens, length ",
                                max_length, " exceed what the CUDA kernels' grids hold (at most 65535 sequences, ",
                                "65535 query tokens, ", INT32_MAX / 2, " positions)"));
  }
  IndexerPlan plan;
  plan.max_sequences = max_sequences;
  plan.max_tokens = max_tokens;
  plan.max_length = max_length;
  const Workspace w(static_cast<int>(rows), max_length);
  plan.stride = w.stride;
  plan.bytes = w.end;
  plan.dependent_launch = select_dependent_launch_ready();
  plan.score_dependent = enable_pdl;
  plan.cluster = plan_select_cluster(max_length);
  for (const ScoreVariant& v : kScoreVariants) {
    if (v.dim != dim && !(v.dim == 0 && dim % 4 == 0)) continue;
    // A call of T <= max_tokens tokens stages rows_per_block(row_bytes, T) rows: from 1 (with the
    // first level's bins) to the plan's most.
    const std::size_t row_bytes = query_row_bytes(v.dtype, heads, dim);
    const std::size_t most = std::max(score_shared_bytes(v.dtype, row_bytes, 1),
                                      score_shared_bytes(v.dtype, row_bytes, rows_per_block(row_bytes, max_tokens)));
    allow_shared_memory(reinterpret_cast<const void*>(v.kernel), most, "cudaFuncSetAttribute (indexer scores)");
    plan.score_dependent = plan.score_dependent && dependent_launch_ready(reinterpret_cast<const void*>(v.kernel));
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
  p.page_shift = page_shift_of(args.layout.page_size);
  p.stride = w.stride;
  p.scores = reinterpret_cast<float*>(base + w.scores);
  // CTAs per row: the plan's (from the length), halved while the rows would need more than one
  // wave of them (many rows fill the GPU anyway; fewer CTAs per row then stream more tiles each).
  p.cluster = plan.cluster;
  while (p.cluster > 1 && std::int64_t{rows} * p.cluster > multiprocessor_count()) p.cluster /= 2;
  p.element_bytes = static_cast<int>(dtype_size(args.layout.dtype));

  const DType dtype = args.layout.dtype;
  const int variant = score_variant(dtype, args.dim);
  if (variant < 0) detail::fail(ErrorCode::unsupported, "index_select: no score kernel (internal)");
  p.padded_heads = dtype == DType::f32 ? args.heads : static_cast<int>(ceil_div(args.heads, 16) * 16);
  const std::size_t row_bytes = query_row_bytes(dtype, args.heads, args.dim);
  p.rows_per_block = rows_per_block(row_bytes, args.tokens);
  // The select kernel reads level 0 from these when the score pass builds them, else builds it.
  p.histograms =
      builds_histograms(dtype, p.rows_per_block) ? reinterpret_cast<unsigned*>(base + w.histograms) : nullptr;
  const std::size_t shared = score_shared_bytes(dtype, row_bytes, p.rows_per_block);
  // Launch sizes come from the plan (max_length), never from the lengths of the moment.
  const dim3 grid(static_cast<unsigned>(ceil_div(plan.max_length, kScoreTile)),
                  static_cast<unsigned>(args.num_sequences),
                  static_cast<unsigned>(ceil_div(args.tokens, p.rows_per_block)));
  launch_kernel(kScoreVariants[variant].kernel, grid, dim3(kScoreThreads), shared, stream,
                LaunchAttributes{}.dependent(plan.score_dependent), "indexer score_kernel", p);
  try {
    launch_select(p, rows, plan.dependent_launch, stream);
  } catch (...) {
    // The select kernel consumes (and zeroes) the score pass's level-0 counts: where its launch
    // failed, zero them after the score pass so that the next call starts from zero as well.
    if (p.histograms != nullptr) {
      (void)cudaMemsetAsync(p.histograms, 0, static_cast<std::size_t>(rows) * kBins * sizeof(unsigned), stream);
    }
    throw;
  }
}

}  // namespace cuda_kernels
}  // namespace clsa
