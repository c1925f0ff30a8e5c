// Split-k gather attention over the paged cache (FlashDecoding style), sparse over routed
// positions or dense over a contiguous range, with an LSE merge of the splits.
//
// One CTA = (query row, kv head, up to 8 query heads of its GQA group, one split of the tokens).
// Every gathered K/V row is read once and serves all of the CTA's query heads:
//   0. the split's token positions -> (page, slot) in shared memory
//   1. one pass with online softmax: lanes cover a row's dimensions with 16-byte loads of K and
//      V; each lane group reduces the dot products of several tokens and heads at once (one
//      butterfly), updates its running max and sum, and accumulates P.V
//   2. lane groups combined in a fixed order through shared memory (bitwise reproducible)
// With one split the CTA writes the output. Otherwise it writes its (o, m, l) to the workspace,
// and the last CTA of its (row, kv head, head chunk) to finish, found with an atomic ticket,
// merges all splits by log-sum-exp in split order: no second launch.
#include <algorithm>

#include "../cuda/kernels.hpp"
#include "common.cuh"

namespace clsa {
namespace cuda_kernels {

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGroup = 8;     // query heads per CTA; larger groups use several CTAs
constexpr int kMaxChunk = 4096;  // tokens per split: 32 KiB of (page, slot) rows
constexpr int kMinChunk = 128;   // fewer, fuller splits: each split costs a merge
constexpr int kMaxSplits = 512;  // bounds the merge's shared memory

template <class Elem, int D, int GP>
struct Shape {
  static constexpr int kPerVector = ElemTraits<Elem>::kPerVector;
  static constexpr int kVectors = D / kPerVector;               // 16-byte vectors per row
  static constexpr int kLanes = kVectors < 32 ? kVectors : 32;  // lanes per token
  static constexpr int kChunks = kVectors / kLanes;             // vectors per lane per row
  static constexpr int kGroups = 32 / kLanes;                   // lane groups per warp
  static constexpr int kTokens = kLanes / GP;                   // tokens per butterfly
  static_assert(kTokens >= 1, "a lane group must hold every head's value");
};

struct Plan {
  int group = 1;        // G = Hq / Hkv
  int padded = 1;       // query heads per CTA, a power of two <= kMaxGroup
  int head_chunks = 1;  // CTAs per (row, kv head) along the group
  int splits = 1;
  int chunk = 32;  // tokens per split
};

struct Params {
  AttentionArgs a;
  Plan plan;
  int page_shift;
  float* partial_out;  // [rows, Hq, splits, D]
  float* partial_ml;   // [rows, Hq, splits, 2]
  unsigned* tickets;   // [rows, kv heads * head chunks], zero between calls
};

int next_power_of_two(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

/// Splits so that the grid fills the resident CTA slots (`slots` = multiprocessors x CTAs per
/// multiprocessor of the kernel variant) in whole waves, with kMinChunk..kMaxChunk tokens each.
Plan make_plan(int rows, int q_heads, int kv_heads, std::int64_t span, std::int64_t slots) {
  Plan plan;
  plan.group = q_heads / kv_heads;
  plan.padded = next_power_of_two(std::min(plan.group, kMaxGroup));
  plan.head_chunks = static_cast<int>(ceil_div(plan.group, plan.padded));
  span = std::max<std::int64_t>(span, 1);
  const std::int64_t units = std::int64_t{rows} * kv_heads * plan.head_chunks;
  const std::int64_t most = std::max<std::int64_t>(1, ceil_div(span, kMinChunk));
  std::int64_t splits = 1;
  for (std::int64_t waves = 1;; ++waves) {
    splits = std::min(most, std::max<std::int64_t>(1, slots * waves / units));
    if (ceil_div(span, splits) <= kMaxChunk || splits == most) break;
  }
  std::int64_t chunk = ceil_div(ceil_div(span, splits), 32) * 32;
  chunk = std::min<std::int64_t>(std::max<std::int64_t>(chunk, ceil_div(span, kMaxSplits)),
                                 std::max<std::int64_t>(span, 32));
  plan.chunk = static_cast<int>(chunk);
  plan.splits = static_cast<int>(ceil_div(span, chunk));
  return plan;
}

/// The most splits any kernel variant can plan for these bounds (workspace sizing): at most 16
/// CTAs of kThreads fit a multiprocessor.
std::int64_t most_splits(int rows, int kv_heads, int head_chunks, std::int64_t span) {
  // make_plan stops at the first wave count whose chunks fit kMaxChunk: one wave step past
  // ceil(span / kMaxChunk) at most.
  const std::int64_t units = std::int64_t{rows} * kv_heads * head_chunks;
  const std::int64_t per_wave = ceil_div(16LL * multiprocessor_count(), units);
  return std::max<std::int64_t>(std::min(ceil_div(span, 32), ceil_div(span, kMaxChunk) + per_wave + 1), 1);
}

/// Shared memory of the attention kernel: the split's (page, slot) rows, then the per-lane-group
/// partial results [groups][padded][dim] with their max and sum (later reused for the merge's
/// split weights).
__host__ __device__ inline std::size_t rows_bytes(const Plan& plan) {
  return (static_cast<std::size_t>(plan.chunk) * sizeof(int2) + 15) / 16 * 16;
}

std::size_t shared_bytes(const Plan& plan, int dim, int groups_per_cta) {
  const std::size_t combine = static_cast<std::size_t>(groups_per_cta) * plan.padded * (dim + 2) * sizeof(float);
  const std::size_t merge = static_cast<std::size_t>(plan.padded) * (2 * plan.splits + 2) * sizeof(float);
  return rows_bytes(plan) + std::max(combine, merge);
}

/// Sum over the `Lanes` lanes of a group of N = Lanes values per lane; afterwards lane i of the
/// group holds the total of value i. One butterfly: N-1 shuffles instead of N*log2(Lanes).
template <int Lanes>
__device__ __forceinline__ float butterfly_sum(float (&values)[Lanes], int lane_in_group) {
  int count = Lanes;
#pragma unroll
  for (int offset = Lanes / 2; offset >= 1; offset >>= 1) {
    const bool upper = (lane_in_group & offset) != 0;
    const int half = count / 2;
#pragma unroll
    for (int i = 0; i < Lanes / 2; ++i) {
      if (i < half) {
        const float send = upper ? values[i] : values[i + half];
        const float keep = upper ? values[i + half] : values[i];
        values[i] = keep + __shfl_xor_sync(kFullMask, send, offset);
      }
    }
    count = half;
  }
  return values[0];
}

template <class Elem, int D, int GP>
__global__ void __launch_bounds__(kThreads) attention_kernel(Params p) {
  using S = Shape<Elem, D, GP>;
  const AttentionArgs& a = p.a;
  const Plan& plan = p.plan;
  extern __shared__ __align__(16) unsigned char shared[];
  constexpr int kGroupsPerCta = kWarps * S::kGroups;
  int2* rows = reinterpret_cast<int2*>(shared);                            // [chunk]: (page, slot), page -1 = skip
  float* group_acc = reinterpret_cast<float*>(shared + rows_bytes(plan));  // [groups][GP][D]
  float* group_max = group_acc + kGroupsPerCta * GP * D;                   // [groups][GP]
  float* group_sum = group_max + kGroupsPerCta * GP;                       // [groups][GP]
  __shared__ unsigned ticket;

  const int row = blockIdx.x;
  const int kv_head = blockIdx.y / plan.head_chunks;
  const int head_chunk = blockIdx.y % plan.head_chunks;
  const int split = blockIdx.z;
  const int first_head = kv_head * plan.group + head_chunk * GP;
  const int heads_here = min(GP, plan.group - head_chunk * GP);
  const int b = row / a.tokens;
  const int t = row % a.tokens;
  const int length = sequence_length(a.lengths, a.page_indptr, a.last_page_lengths, a.layout.page_size, b);
  const int visible = visible_length(length, a.tokens, t);
  int count = visible;
  const std::int32_t* routed = nullptr;
  if (a.positions != nullptr) {
    count = min(max(a.counts[b * a.counts_stride_b + t * a.counts_stride_t], 0), a.top_k);
    routed = a.positions + b * a.positions_stride_b + t * a.positions_stride_t;
  }
  const int begin = split * plan.chunk;
  const int n = max(0, min(count, begin + plan.chunk) - begin);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int group_index = lane / S::kLanes;
  const int lane_in_group = lane % S::kLanes;
  const int group_lane = group_index * S::kLanes;  // first lane of this lane group

  // Phase 0: positions -> (page, slot); positions a query cannot see are skipped (page -1).
  const PagedRows paged{a.page_indices + a.page_indptr[b], p.page_shift, (1 << p.page_shift) - 1};
  for (int i = tid; i < n; i += kThreads) {
    const int position = routed != nullptr ? routed[begin + i] : begin + i;
    const bool valid = position >= 0 && position < visible;
    rows[i] = valid ? make_int2(static_cast<int>(paged.page(position)), static_cast<int>(paged.slot(position)))
                    : make_int2(-1, 0);
  }

  // The CTA's queries, pre-scaled, in registers: this lane's dimensions of each head.
  float q[S::kChunks][S::kPerVector][GP];
  {
    const Elem* q_row = static_cast<const Elem*>(a.q) + b * a.q_stride_b + t * a.q_stride_t;
#pragma unroll
    for (int c = 0; c < S::kChunks; ++c) {
#pragma unroll
      for (int g = 0; g < GP; ++g) {
        float values[S::kPerVector];
        if (g < heads_here) {
          const Elem* source =
              q_row + (first_head + g) * a.q_stride_h + (c * S::kLanes + lane_in_group) * S::kPerVector;
          widen_vector<Elem>(*reinterpret_cast<const uint4*>(source), values);
        }
#pragma unroll
        for (int e = 0; e < S::kPerVector; ++e) q[c][e][g] = g < heads_here ? values[e] * a.scale : 0.0f;
      }
    }
  }
  __syncthreads();

  const Elem* k_base = static_cast<const Elem*>(a.layout.k) + kv_head * a.layout.k_head_stride;
  const Elem* v_base = static_cast<const Elem*>(a.layout.v) + kv_head * a.layout.v_head_stride;
  auto load_row = [&](const Elem* base, std::int64_t page_stride, std::int64_t token_stride, int2 where, int c) {
    return where.x >= 0 ? load_vector(base + where.x * page_stride + where.y * token_stride +
                                      (c * S::kLanes + lane_in_group) * S::kPerVector)
                        : make_uint4(0, 0, 0, 0);
  };

  // One pass, online softmax (FlashDecoding): each lane group takes kTokens tokens at a time,
  // reads their K and V rows once (16-byte loads, issued together when they fit), reduces the
  // kTokens x GP logits in one butterfly, updates its running max and sum, accumulates P.V.
  // The loop bound is uniform over the warp (every lane takes part in the shuffles).
  float running_max[GP], running_sum[GP];
  float acc[S::kChunks][S::kPerVector][GP];
#pragma unroll
  for (int g = 0; g < GP; ++g) {
    running_max[g] = -INFINITY;
    running_sum[g] = 0.0f;
#pragma unroll
    for (int c = 0; c < S::kChunks; ++c) {
#pragma unroll
      for (int e = 0; e < S::kPerVector; ++e) acc[c][e][g] = 0.0f;
    }
  }
  constexpr bool kTogether = S::kTokens <= 8;  // K and V loads of a batch in one round trip
  constexpr int kBatch = kWarps * S::kGroups * S::kTokens;
  using KRows = uint4[S::kTokens][S::kChunks];
  using VRows = uint4[kTogether ? S::kTokens : 1][S::kChunks];
  // Loads of the batch starting at warp_base (and, when they fit, its V rows too).
  auto fetch = [&](int warp_base, int2(&where)[S::kTokens], KRows& k_raw, VRows& v_raw) {
    const int base = warp_base + group_index * S::kTokens;
#pragma unroll
    for (int j = 0; j < S::kTokens; ++j) where[j] = base + j < n ? rows[base + j] : make_int2(-1, 0);
#pragma unroll
    for (int j = 0; j < S::kTokens; ++j) {
#pragma unroll
      for (int c = 0; c < S::kChunks; ++c) {
        k_raw[j][c] = load_row(k_base, a.layout.k_page_stride, a.layout.k_token_stride, where[j], c);
        if constexpr (kTogether) {
          v_raw[j][c] = load_row(v_base, a.layout.v_page_stride, a.layout.v_token_stride, where[j], c);
        }
      }
    }
  };
  // Software pipeline (when K and V of a batch fit in registers): the next batch's loads are in
  // flight while this batch is reduced and accumulated.
  int2 where_next[S::kTokens];
  KRows k_next;
  VRows v_next;
  if constexpr (kTogether) fetch(warp * S::kGroups * S::kTokens, where_next, k_next, v_next);
  for (int warp_base = warp * S::kGroups * S::kTokens; warp_base < n; warp_base += kBatch) {
    int2 where[S::kTokens];
    KRows k_raw;
    VRows v_raw;
    if constexpr (kTogether) {
#pragma unroll
      for (int j = 0; j < S::kTokens; ++j) {
        where[j] = where_next[j];
#pragma unroll
        for (int c = 0; c < S::kChunks; ++c) {
          k_raw[j][c] = k_next[j][c];
          v_raw[j][c] = v_next[j][c];
        }
      }
      if (warp_base + kBatch < n) fetch(warp_base + kBatch, where_next, k_next, v_next);
    } else {
      fetch(warp_base, where, k_raw, v_raw);
    }
    float partial[S::kLanes];
#pragma unroll
    for (int j = 0; j < S::kTokens; ++j) {
#pragma unroll
      for (int g = 0; g < GP; ++g) partial[j * GP + g] = 0.0f;
#pragma unroll
      for (int c = 0; c < S::kChunks; ++c) {
        float k[S::kPerVector];
        widen_vector<Elem>(k_raw[j][c], k);
#pragma unroll
        for (int e = 0; e < S::kPerVector; ++e) {
#pragma unroll
          for (int g = 0; g < GP; ++g) partial[j * GP + g] = fmaf(q[c][e][g], k[e], partial[j * GP + g]);
        }
      }
    }
    // This lane now owns the logit of token (lane_in_group / GP), head (lane_in_group % GP).
    const float total = butterfly_sum<S::kLanes>(partial, lane_in_group);
    const int own_token = lane_in_group / GP;
    float logit = -INFINITY;
#pragma unroll
    for (int j = 0; j < S::kTokens; ++j) {
      if (j == own_token && where[j].x >= 0) logit = total;
    }
    float batch_max = logit;
#pragma unroll
    for (int offset = GP; offset < S::kLanes; offset <<= 1) {
      batch_max = fmaxf(batch_max, __shfl_xor_sync(kFullMask, batch_max, offset));
    }
    float new_max[GP], correction[GP];
#pragma unroll
    for (int g = 0; g < GP; ++g) {
      new_max[g] = fmaxf(running_max[g], __shfl_sync(kFullMask, batch_max, group_lane + g));
      correction[g] = running_max[g] == -INFINITY ? 0.0f : __expf(running_max[g] - new_max[g]);
      running_max[g] = new_max[g];
    }
    float own_max = new_max[0];
#pragma unroll
    for (int g = 1; g < GP; ++g) {
      if (lane_in_group % GP == g) own_max = new_max[g];
    }
    const float probability = logit == -INFINITY ? 0.0f : __expf(logit - own_max);
    float batch_sum = probability;
#pragma unroll
    for (int offset = GP; offset < S::kLanes; offset <<= 1) batch_sum += __shfl_xor_sync(kFullMask, batch_sum, offset);
#pragma unroll
    for (int g = 0; g < GP; ++g) {
      running_sum[g] = running_sum[g] * correction[g] + __shfl_sync(kFullMask, batch_sum, group_lane + g);
#pragma unroll
      for (int c = 0; c < S::kChunks; ++c) {
#pragma unroll
        for (int e = 0; e < S::kPerVector; ++e) acc[c][e][g] *= correction[g];
      }
    }
#pragma unroll
    for (int j = 0; j < S::kTokens; ++j) {
      float p[GP];
#pragma unroll
      for (int g = 0; g < GP; ++g) p[g] = __shfl_sync(kFullMask, probability, group_lane + j * GP + g);
#pragma unroll
      for (int c = 0; c < S::kChunks; ++c) {
        float v[S::kPerVector];
        if constexpr (kTogether) {
          widen_vector<Elem>(v_raw[j][c], v);
        } else {
          widen_vector<Elem>(load_row(v_base, a.layout.v_page_stride, a.layout.v_token_stride, where[j], c), v);
        }
#pragma unroll
        for (int e = 0; e < S::kPerVector; ++e) {
#pragma unroll
          for (int g = 0; g < GP; ++g) acc[c][e][g] = fmaf(p[g], v[e], acc[c][e][g]);
        }
      }
    }
  }

  // Deterministic combination (the same result on every run, graph replays included): every
  // lane group writes its (acc, max, sum); the groups are then combined in index order.
  {
    const int group_id = warp * S::kGroups + group_index;
#pragma unroll
    for (int c = 0; c < S::kChunks; ++c) {
#pragma unroll
      for (int e = 0; e < S::kPerVector; ++e) {
        const int d = (c * S::kLanes + lane_in_group) * S::kPerVector + e;
#pragma unroll
        for (int g = 0; g < GP; ++g) group_acc[(group_id * GP + g) * D + d] = acc[c][e][g];
      }
    }
    if (lane_in_group < GP) {
#pragma unroll
      for (int g = 0; g < GP; ++g) {
        if (g == lane_in_group) {
          group_max[group_id * GP + g] = running_max[g];
          group_sum[group_id * GP + g] = running_sum[g];
        }
      }
    }
  }
  __syncthreads();

  const int q_heads = a.q_heads;
  for (int i = tid; i < heads_here * D; i += kThreads) {
    const int g = i / D;
    const int d = i % D;
    float m = -INFINITY;
    for (int k = 0; k < kGroupsPerCta; ++k) m = fmaxf(m, group_max[k * GP + g]);
    float l = 0.0f;
    float o = 0.0f;
    for (int k = 0; k < kGroupsPerCta; ++k) {
      const float km = group_max[k * GP + g];
      const float weight = km == -INFINITY ? 0.0f : __expf(km - m);
      l += group_sum[k * GP + g] * weight;
      o += group_acc[(k * GP + g) * D + d] * weight;
    }
    const int head = first_head + g;
    if (plan.splits == 1) {
      Elem* out = static_cast<Elem*>(a.out) + b * a.out_stride_b + t * a.out_stride_t + head * a.out_stride_h;
      out[d] = narrow<Elem>(l > 0.0f ? o / l : 0.0f);
      if (d == 0 && a.lse != nullptr) a.lse[b * a.lse_stride_b + t * a.lse_stride_t + head] = m + logf(l);
    } else {
      const std::size_t slot = (static_cast<std::size_t>(row) * q_heads + head) * plan.splits + split;
      p.partial_out[slot * D + d] = o;
      if (d == 0) {
        p.partial_ml[slot * 2] = m;
        p.partial_ml[slot * 2 + 1] = l;
      }
    }
  }
  if (plan.splits == 1) return;

  // The last split to finish merges them all (threadFenceReduction pattern).
  __threadfence();
  __syncthreads();
  unsigned* counter = p.tickets + static_cast<std::size_t>(row) * gridDim.y + blockIdx.y;
  if (tid == 0) ticket = atomicAdd(counter, 1u);
  __syncthreads();
  if (ticket != static_cast<unsigned>(plan.splits - 1)) return;
  __threadfence();
  const int splits = plan.splits;
  float* weights = reinterpret_cast<float*>(shared + rows_bytes(plan));            // [GP][splits]
  float* merged_max = weights + GP * splits;                                       // [GP]
  float* inverse_sum = merged_max + GP;                                            // [GP]
  const std::size_t first = static_cast<std::size_t>(row) * q_heads + first_head;  // (row, head) of g = 0
  float* sums = inverse_sum + GP;                                                  // [GP][splits]
  for (int i = tid; i < heads_here * splits; i += kThreads) {
    const int g = i / splits;
    const int s = i % splits;
    const float2 ml = __ldcg(reinterpret_cast<const float2*>(p.partial_ml) + (first + g) * splits + s);
    weights[i] = ml.x;
    sums[i] = ml.y;
  }
  __syncthreads();
  if (tid < heads_here) {
    float m = -INFINITY;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, weights[tid * splits + s]);
    float l = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float ms = weights[tid * splits + s];
      const float weight = ms == -INFINITY ? 0.0f : __expf(ms - m);
      l += sums[tid * splits + s] * weight;
      weights[tid * splits + s] = weight;
    }
    merged_max[tid] = m;
    inverse_sum[tid] = l > 0.0f ? 1.0f / l : 0.0f;
    if (a.lse != nullptr) a.lse[b * a.lse_stride_b + t * a.lse_stride_t + first_head + tid] = m + logf(l);
  }
  __syncthreads();
  // Four dimensions per thread (16-byte loads), every split's load independent.
  for (int i = tid; i < heads_here * (D / 4); i += kThreads) {
    const int g = i / (D / 4);
    const int d4 = i % (D / 4);
    const float4* partial = reinterpret_cast<const float4*>(p.partial_out + (first + g) * splits * D) + d4;
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
    for (int s = 0; s < splits; ++s) {
      const float4 x = __ldcg(partial + static_cast<std::size_t>(s) * (D / 4));
      const float w = weights[g * splits + s];
      o.x = fmaf(w, x.x, o.x);
      o.y = fmaf(w, x.y, o.y);
      o.z = fmaf(w, x.z, o.z);
      o.w = fmaf(w, x.w, o.w);
    }
    const float inverse = inverse_sum[g];
    Elem* out = static_cast<Elem*>(a.out) + b * a.out_stride_b + t * a.out_stride_t +
                (first_head + g) * a.out_stride_h + d4 * 4;
    out[0] = narrow<Elem>(o.x * inverse);
    out[1] = narrow<Elem>(o.y * inverse);
    out[2] = narrow<Elem>(o.z * inverse);
    out[3] = narrow<Elem>(o.w * inverse);
  }
  if (tid == 0) *counter = 0;  // ready for the next call (and the next graph replay)
}

/// Workspace layout: tickets [rows * kv heads * head chunks], then the partial results of up to
/// most_splits() splits.
struct WorkspaceLayout {
  std::size_t tickets_bytes, partial_out_offset, partial_ml_offset, bytes;
  WorkspaceLayout(int rows, int q_heads, int kv_heads, int head_chunks, int dim, std::int64_t splits) {
    tickets_bytes = (static_cast<std::size_t>(rows) * kv_heads * head_chunks * sizeof(unsigned) + 255) / 256 * 256;
    const std::size_t partials = static_cast<std::size_t>(rows) * q_heads * static_cast<std::size_t>(splits);
    partial_out_offset = tickets_bytes;
    partial_ml_offset = partial_out_offset + partials * dim * sizeof(float);
    bytes = partial_ml_offset + partials * 2 * sizeof(float);
  }
};

template <class Elem, int D, int GP>
void launch(Params params, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  using S = Shape<Elem, D, GP>;
  constexpr auto kernel = attention_kernel<Elem, D, GP>;
  const AttentionArgs& a = params.a;
  const int rows = a.num_sequences * a.tokens;
  const std::int64_t span = a.positions != nullptr ? a.top_k : a.max_length;
  // Resident CTAs per multiprocessor of this variant (registers bound it; the shared memory of a
  // 1024-token split is a typical size), computed once.
  static const int resident = [] {
    Plan typical;
    typical.padded = GP;
    typical.chunk = 1024;
    const std::size_t shared = shared_bytes(typical, D, kWarps * S::kGroups);
    allow_shared_memory<kernel>(shared, "cudaFuncSetAttribute (attention)");
    int blocks = 0;
    detail::cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, shared),
                       "cudaOccupancyMaxActiveBlocksPerMultiprocessor (attention)");
    return std::max(blocks, 1);
  }();
  params.plan = make_plan(rows, a.q_heads, a.kv_heads, span, std::int64_t{resident} * multiprocessor_count());
  const Plan& plan = params.plan;
  const WorkspaceLayout layout(rows, a.q_heads, a.kv_heads, plan.head_chunks, D, plan.splits);
  if (plan.splits > 1) {
    if (layout.bytes > workspace_bytes) {
      detail::fail(ErrorCode::capacity_exceeded, "attention: workspace smaller than planned (internal)");
    }
    auto* base = static_cast<unsigned char*>(workspace);
    params.tickets = reinterpret_cast<unsigned*>(base);
    params.partial_out = reinterpret_cast<float*>(base + layout.partial_out_offset);
    params.partial_ml = reinterpret_cast<float*>(base + layout.partial_ml_offset);
  }
  const std::size_t shared = shared_bytes(plan, D, kWarps * S::kGroups);
  allow_shared_memory<kernel>(shared, "cudaFuncSetAttribute (attention)");
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(a.kv_heads * plan.head_chunks),
                  static_cast<unsigned>(plan.splits));
  kernel<<<grid, kThreads, shared, stream>>>(params);
  detail::cuda_check_launch("attention_kernel");
}

template <class Elem, int D>
void launch_group(const Params& params, void* workspace, std::size_t bytes, cudaStream_t stream) {
  const int group = params.a.q_heads / params.a.kv_heads;
  switch (next_power_of_two(std::min(group, kMaxGroup))) {
    case 1:
      return launch<Elem, D, 1>(params, workspace, bytes, stream);
    case 2:
      return launch<Elem, D, 2>(params, workspace, bytes, stream);
    case 4:
      return launch<Elem, D, 4>(params, workspace, bytes, stream);
    default:
      return launch<Elem, D, 8>(params, workspace, bytes, stream);
  }
}

template <class Elem>
void launch_dim(const Params& params, void* workspace, std::size_t bytes, cudaStream_t stream) {
  switch (params.a.dim) {
    case 64:
      return launch_group<Elem, 64>(params, workspace, bytes, stream);
    case 128:
      return launch_group<Elem, 128>(params, workspace, bytes, stream);
    default:
      return launch_group<Elem, 256>(params, workspace, bytes, stream);
  }
}

}  // namespace

std::size_t attention_workspace_bytes(int num_sequences, int tokens, int q_heads, int dim, std::int64_t span) {
  // Bounded over every kv head count and kernel variant.
  const int rows = num_sequences * tokens;
  std::size_t most = 0;
  for (int kv_heads = 1; kv_heads <= q_heads; ++kv_heads) {
    if (q_heads % kv_heads != 0) continue;
    const int group = q_heads / kv_heads;
    const int head_chunks = static_cast<int>(ceil_div(group, next_power_of_two(std::min(group, kMaxGroup))));
    const std::int64_t splits = most_splits(rows, kv_heads, head_chunks, std::max<std::int64_t>(span, 1));
    most = std::max(most, WorkspaceLayout(rows, q_heads, kv_heads, head_chunks, dim, splits).bytes);
  }
  return most;
}

void attention(const AttentionArgs& args, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  Params params{};
  params.a = args;
  params.page_shift = log2_exact(args.layout.page_size);
  switch (args.layout.dtype) {
    case DType::f32:
      return launch_dim<float>(params, workspace, workspace_bytes, stream);
    case DType::f16:
      return launch_dim<__half>(params, workspace, workspace_bytes, stream);
    default:
      return launch_dim<__nv_bfloat16>(params, workspace, workspace_bytes, stream);
  }
}

}  // namespace cuda_kernels
}  // namespace clsa
