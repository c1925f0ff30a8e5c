// Split-k gather attention over the paged cache (FlashDecoding style), sparse over routed
// positions or dense over a contiguous range, with an LSE merge of the splits.
//
// One CTA = (query row, kv head, up to 8 query heads of its GQA group, one split of the tokens).
// Every gathered K/V row is read once and serves all of the CTA's query heads:
//   0. the split's token positions -> (page, slot) in shared memory (the routed positions, the
//      count and the lengths are read in one round trip)
//   1. one pass with online softmax over the split's tokens, in one of two kernels:
//      - attention_kernel_mma (16-bit caches, head_dim 64 / 128): tensor cores. Each warp takes
//        16 tokens per step and issues all of their K and V loads (16-byte, straight into the
//        mma fragment registers) at once; S = Q.K^T and O^T += V^T.P^T are m16n8k16 products
//        (heads padded to the mma's 16 rows / 8 columns), with dimension and token orders permuted
//        so that every fragment comes from whole 16-byte loads;
//      - attention_kernel (f32 caches, head_dim 256): CUDA cores, lanes cover a row's dimensions
//        with 16-byte loads, each lane group reduces several tokens' dot products in one
//        butterfly, software-pipelined by one batch
//   2. warps / lane groups combined in a fixed order through shared memory (bitwise reproducible)
// With one split the CTA writes the output. Otherwise it writes its (o, m, l) to the workspace,
// and the last CTA of its (row, kv head, head chunk) to finish, found with an atomic ticket,
// merges all splits by log-sum-exp in split order: no second launch.
#include <algorithm>
#include <climits>
#include <vector>

#include <cuda/atomic>

#include "common.cuh"
#include "kernels.hpp"

namespace clsa {
namespace cuda_kernels {

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGroup = 8;     // query heads per CTA; larger groups use several CTAs
constexpr int kMaxChunk = 4096;  // tokens per split: 32 KiB of (page, slot) rows
constexpr int kMinChunk = 128;   // fewer, fuller splits: each split costs a merge
constexpr int kMaxSplits = 512;  // bounds the merge's work
constexpr int kMmaWarps = 8;     // the tensor-core kernel: 16 tokens per warp and step
constexpr int kMmaThreads = kMmaWarps * 32;

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

/// How one call splits its work: a pure function of the call's rows and the AttentionPlan, so the
/// same batch size always gets the same splits (and the same bits).
struct SplitPlan {
  int group = 1;        // G = Hq / Hkv
  int padded = 1;       // query heads per CTA, a power of two <= kMaxGroup
  int head_chunks = 1;  // CTAs per (row, kv head) along the group
  int splits = 1;
  int chunk = 32;  // tokens per split
};

struct Params {
  AttentionArgs a;
  SplitPlan plan;
  int max_length;  // dense: the plan's span; longer sequences are reported and write zeros
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
/// multiprocessor of the kernel variant) in whole waves, with kMinChunk..kMaxChunk tokens each:
/// the fewest waves w whose split count slots * w / units reaches ceil(span / kMaxChunk).
SplitPlan make_split_plan(int rows, int q_heads, int kv_heads, std::int64_t span, std::int64_t slots) {
  SplitPlan plan;
  plan.group = q_heads / kv_heads;
  plan.padded = next_power_of_two(std::min(plan.group, kMaxGroup));
  plan.head_chunks = static_cast<int>(ceil_div(plan.group, plan.padded));
  span = std::max<std::int64_t>(span, 1);
  const std::int64_t units = std::int64_t{rows} * kv_heads * plan.head_chunks;
  const std::int64_t most = std::max<std::int64_t>(1, ceil_div(span, kMinChunk));
  const std::int64_t wanted = std::min(most, ceil_div(span, kMaxChunk));
  std::int64_t splits = std::min(most, std::max<std::int64_t>(1, slots / units));
  if (splits < wanted) splits = std::min(most, slots * ceil_div(wanted * units, slots) / units);
  std::int64_t chunk = ceil_div(ceil_div(span, splits), 32) * 32;
  chunk = std::min<std::int64_t>(std::max<std::int64_t>(chunk, ceil_div(span, kMaxSplits)),
                                 std::max<std::int64_t>(span, 32));
  plan.chunk = static_cast<int>(chunk);
  plan.splits = static_cast<int>(ceil_div(span, chunk));
  return plan;
}

/// Shared memory of the attention kernel: the split's (page, slot) rows, then the per-lane-group
/// partial results [groups][padded][dim] with their max and sum.
__host__ __device__ inline std::size_t rows_bytes(const SplitPlan& plan) {
  return (static_cast<std::size_t>(plan.chunk) * sizeof(int2) + 15) / 16 * 16;
}

std::size_t shared_bytes(const SplitPlan& plan, int dim, int groups_per_cta) {
  return rows_bytes(plan) + static_cast<std::size_t>(groups_per_cta) * plan.padded * (dim + 2) * sizeof(float);
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

/// What a CTA's split covers: its query row and the number of its tokens; the tokens' (page, slot)
/// are in `rows` (page -1 for positions the query cannot see) after the caller's next barrier.
struct SplitWork {
  int b, t;  // sequence and query token of the row
  int n;     // tokens in this split
};

template <int Threads>
__device__ SplitWork split_rows(const Params& p, int2* rows) {
  const AttentionArgs& a = p.a;
  const SplitPlan& plan = p.plan;
  const int split = blockIdx.z;
  SplitWork work;
  work.b = static_cast<int>(blockIdx.x) / a.tokens;
  work.t = static_cast<int>(blockIdx.x) % a.tokens;
  int length = paged_length(a.page_indptr, a.last_page_lengths, a.layout.page_size, work.b);
  if (length > p.max_length) {
    // Beyond the plan (dense: its splits do not cover it): reported, and the rows write zeros.
    if (threadIdx.x == 0 && work.t == 0 && blockIdx.y == 0 && split == 0) {
      report(a.status, RunStatus::length_beyond_plan, work.b, length, p.max_length);
    }
    length = 0;
  }
  const int visible = visible_length(length, a.tokens, work.t);
  const RoutingRows& routing = a.routing.rows;
  int count = visible;
  const std::int32_t* routed = nullptr;
  const std::int32_t* slots = nullptr;
  if (routing.positions != nullptr) {
    count = routing.clamped_count(work.b, work.t);
    routed = routing.row_positions(work.b, work.t);
    slots = routing.row_slots(work.b, work.t);
  }
  const int begin = split * plan.chunk;
  work.n = max(0, min(count, begin + plan.chunk) - begin);
  // The routed positions (and their pool slots) are read before the count is known (every entry
  // below top_k exists), so that the count, the lengths and the positions take one round trip;
  // with slots there is no page-table lookup after it. Slots outside the pool are skipped like
  // positions outside the visible range.
  const int in_split = routed != nullptr ? min(plan.chunk, routing.top_k - begin) : work.n;
  if (slots != nullptr) {
    for (int i = threadIdx.x; i < in_split; i += Threads) {
      const int position = routed[begin + i];
      const int slot = slots[begin + i];
      const PoolRow where = PoolRow::of_slot(slot, p.page_shift);
      const bool valid =
          i < work.n && position >= 0 && position < visible && slot >= 0 && where.page < a.layout.num_pages;
      rows[i] = valid ? make_int2(static_cast<int>(where.page), static_cast<int>(where.offset)) : make_int2(-1, 0);
    }
    return work;
  }
  const PagedRows paged{a.page_indices + a.page_indptr[work.b], p.page_shift};
  for (int i = threadIdx.x; i < in_split; i += Threads) {
    const int position = routed != nullptr ? routed[begin + i] : begin + i;
    const bool valid = i < work.n && position >= 0 && position < visible;
    rows[i] = valid ? make_int2(static_cast<int>(paged.page(position)), static_cast<int>(paged.slot(position)))
                    : make_int2(-1, 0);
  }
  return work;
}

/// After every one of the CTA's `groups` warps or lane groups has written its (acc, max, sum) for
/// the `gp` heads of the chunk to shared memory (and a barrier): the groups combined in index order
/// (deterministic, graph replays included), then the output (one split) or the split's partial
/// result and, by the last split to finish, the merge of all splits.
template <class Elem, int D, int Threads>
__device__ void combine_and_merge(const Params& p, unsigned char* shared, int groups, int gp, const SplitWork& work,
                                  int first_head, int heads_here) {
  const AttentionArgs& a = p.a;
  const SplitPlan& plan = p.plan;
  const float* group_acc = reinterpret_cast<const float*>(shared + rows_bytes(plan));  // [groups][gp][D]
  const float* group_max = group_acc + groups * gp * D;                                // [groups][gp]
  const float* group_sum = group_max + groups * gp;                                    // [groups][gp]
  __shared__ unsigned ticket;
  const int tid = threadIdx.x;
  const int row = blockIdx.x;
  const int split = blockIdx.z;
  const int b = work.b;
  const int t = work.t;
  const int q_heads = a.q_heads;
  for (int i = tid; i < heads_here * D; i += Threads) {
    const int g = i / D;
    const int d = i % D;
    float m = -INFINITY;
    for (int k = 0; k < groups; ++k) m = fmaxf(m, group_max[k * gp + g]);
    float l = 0.0f;
    float o = 0.0f;
    for (int k = 0; k < groups; ++k) {
      const float km = group_max[k * gp + g];
      const float weight = km == -INFINITY ? 0.0f : __expf(km - m);
      l += group_sum[k * gp + g] * weight;
      o += group_acc[(k * gp + g) * D + d] * weight;
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

  // The last split to finish merges them all. Thread 0's acq_rel ticket, after the barrier,
  // releases every thread's partial writes (and acquires the other splits' for the last CTA).
  __syncthreads();
  unsigned* counter = p.tickets + static_cast<std::size_t>(row) * gridDim.y + blockIdx.y;
  if (tid == 0) {
    cuda::atomic_ref<unsigned, cuda::thread_scope_device> ticket_ref(*counter);
    ticket = ticket_ref.fetch_add(1u, cuda::memory_order_acq_rel);
  }
  __syncthreads();
  if (ticket != static_cast<unsigned>(plan.splits - 1)) return;
  const int splits = plan.splits;
  const std::size_t first = static_cast<std::size_t>(row) * q_heads + first_head;  // (row, head) of g = 0
  // One pass per (head, four dimensions): a running log-sum-exp over the splits in split order, the
  // loads of 16 splits issued together (they do not depend on the running state).
  for (int i = tid; i < heads_here * (D / 4); i += Threads) {
    const int g = i / (D / 4);
    const int d4 = i % (D / 4);
    const float4* partial = reinterpret_cast<const float4*>(p.partial_out + (first + g) * splits * D) + d4;
    const float2* ml = reinterpret_cast<const float2*>(p.partial_ml) + (first + g) * splits;
    float m = -INFINITY;
    float l = 0.0f;
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 16
    for (int s = 0; s < splits; ++s) {
      const float2 split_ml = __ldcg(ml + s);
      const float4 x = __ldcg(partial + static_cast<std::size_t>(s) * (D / 4));
      const float new_max = fmaxf(m, split_ml.x);
      const float keep = m == -INFINITY ? 0.0f : __expf(m - new_max);
      const float take = split_ml.x == -INFINITY ? 0.0f : __expf(split_ml.x - new_max);
      l = l * keep + split_ml.y * take;
      o.x = o.x * keep + x.x * take;
      o.y = o.y * keep + x.y * take;
      o.z = o.z * keep + x.z * take;
      o.w = o.w * keep + x.w * take;
      m = new_max;
    }
    const float inverse = l > 0.0f ? 1.0f / l : 0.0f;
    if (d4 == 0 && a.lse != nullptr) a.lse[b * a.lse_stride_b + t * a.lse_stride_t + first_head + g] = m + logf(l);
    Elem* out = static_cast<Elem*>(a.out) + b * a.out_stride_b + t * a.out_stride_t +
                (first_head + g) * a.out_stride_h + d4 * 4;
    out[0] = narrow<Elem>(o.x * inverse);
    out[1] = narrow<Elem>(o.y * inverse);
    out[2] = narrow<Elem>(o.z * inverse);
    out[3] = narrow<Elem>(o.w * inverse);
  }
  if (tid == 0) *counter = 0;  // ready for the next call (and the next graph replay)
}

template <class Elem, int D, int GP>
__global__ void __launch_bounds__(kThreads) attention_kernel(Params p) {
  using S = Shape<Elem, D, GP>;
  const AttentionArgs& a = p.a;
  const SplitPlan& plan = p.plan;
  extern __shared__ __align__(16) unsigned char shared[];
  constexpr int kGroupsPerCta = kWarps * S::kGroups;
  int2* rows = reinterpret_cast<int2*>(shared);                            // [chunk]: (page, slot), page -1 = skip
  float* group_acc = reinterpret_cast<float*>(shared + rows_bytes(plan));  // [groups][GP][D]
  float* group_max = group_acc + kGroupsPerCta * GP * D;                   // [groups][GP]
  float* group_sum = group_max + kGroupsPerCta * GP;                       // [groups][GP]

  const int kv_head = blockIdx.y / plan.head_chunks;
  const int head_chunk = blockIdx.y % plan.head_chunks;
  const int first_head = kv_head * plan.group + head_chunk * GP;
  const int heads_here = min(GP, plan.group - head_chunk * GP);
  const SplitWork work = split_rows<kThreads>(p, rows);
  const int b = work.b;
  const int t = work.t;
  const int n = work.n;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int group_index = lane / S::kLanes;
  const int lane_in_group = lane % S::kLanes;
  const int group_lane = group_index * S::kLanes;  // first lane of this lane group

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

  // Vector c of this lane of the K or V row at (page, slot) `where` (zeros for a skipped row).
  const int lane_elements = lane_in_group * S::kPerVector;
  auto load_k = [&](int2 where, int c) {
    return where.x >= 0 ? load_vector(static_cast<const Elem*>(a.layout.k) +
                                      PoolRow{where.x, where.y}.k_offset(a.layout, kv_head) +
                                      c * S::kLanes * S::kPerVector + lane_elements)
                        : make_uint4(0, 0, 0, 0);
  };
  auto load_v = [&](int2 where, int c) {
    return where.x >= 0 ? load_vector(static_cast<const Elem*>(a.layout.v) +
                                      PoolRow{where.x, where.y}.v_offset(a.layout, kv_head) +
                                      c * S::kLanes * S::kPerVector + lane_elements)
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
        k_raw[j][c] = load_k(where[j], c);
        if constexpr (kTogether) {
          v_raw[j][c] = load_v(where[j], c);
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
          widen_vector<Elem>(load_v(where[j], c), v);
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

  combine_and_merge<Elem, D, kThreads>(p, shared, kGroupsPerCta, GP, work, first_head, heads_here);
}

/// The tensor-core kernel (f16 / bf16 caches, D = 64 or 128), kMmaWarps warps of 16 tokens per
/// step. Lane (g, q) = (lane / 4, lane % 4) of a warp:
///   S = Q.K^T, m16n8k16 with M = heads (rows >= the chunk's heads are zero), N = 8 tokens, K = 16
///     dimensions. Dimensions are permuted alike in A and B (the sum does not care): the lane
///     loads 16 bytes of Q / of K row (token g of an n-tile) at dims 8q + 32v .. +7, whose words
///     (x, y) and (z, w) are the fragments of two k-steps. The lane then holds the logits of head g
///     at tokens 2q, 2q+1 of each n-tile.
///   O^T += V^T.P^T, M = 16 dimensions, N = 8 heads, K = 16 tokens. P^T's fragment is the lane's own
///     probabilities (tokens 2q, 2q+1, 8+2q, 9+2q of the step, head g); V^T's rows are permuted so
///     that m-tile mt's rows g and g+8 are dims E*g + 2mt and E*g + 2mt + 1 (E = D / 8): the lane
///     loads dims [E*g, E*g + E) of its four tokens (16-byte loads) and pairs their halves.
///
/// With kBlock the K and V rows come from the routed block that select() gathered (RoutingRows::kv:
/// per query row and kv head, top_k rows of K, then of V, contiguous): no positions, no page
/// tables. The first step's loads are issued before the routed count arrives (every row below top_k
/// exists in the block; rows past the count are masked), so the count and the K/V take one round
/// trip.
template <class Elem, int D, bool kBlock>
__global__ void __launch_bounds__(kMmaThreads, 2) attention_kernel_mma(Params p) {
  static_assert(D == 64 || D == 128, "the tensor-core kernel takes head_dim 64 or 128");
  constexpr int kKVectors = D / 32;         // 16-byte K loads per lane and token (and Q)
  constexpr int kDimsPerRow = D / 8;        // E: output dims per lane row g
  constexpr int kVVectors = D / 64;         // 16-byte V loads per lane and token
  constexpr int kMTiles = kDimsPerRow / 2;  // m-tiles of O^T
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;
  const AttentionArgs& a = p.a;
  const SplitPlan& plan = p.plan;
  extern __shared__ __align__(16) unsigned char shared[];
  const int gp = plan.padded;                                              // heads of a chunk (<= 8)
  int2* rows = reinterpret_cast<int2*>(shared);                            // [chunk]: (page, slot), page -1 = skip
  float* group_acc = reinterpret_cast<float*>(shared + rows_bytes(plan));  // [warps][gp][D]
  float* group_max = group_acc + kMmaWarps * gp * D;                       // [warps][gp]
  float* group_sum = group_max + kMmaWarps * gp;                           // [warps][gp]

  const int kv_head = blockIdx.y / plan.head_chunks;
  const int head_chunk = blockIdx.y % plan.head_chunks;
  const int first_head = kv_head * plan.group + head_chunk * gp;
  const int heads_here = min(gp, plan.group - head_chunk * gp);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int q = lane % 4;

  // The queries of head g as A fragments (independent of the rows' round trip).
  unsigned q_words[kKVectors][4];
  {
    uint4 raw = make_uint4(0, 0, 0, 0);
    const Elem* q_row = static_cast<const Elem*>(a.q) + (blockIdx.x / a.tokens) * a.q_stride_b +
                        (blockIdx.x % a.tokens) * a.q_stride_t + (first_head + g) * a.q_stride_h + q * 8;
#pragma unroll
    for (int v = 0; v < kKVectors; ++v) {
      if (g < heads_here) raw = *reinterpret_cast<const uint4*>(q_row + v * 32);
      q_words[v][0] = raw.x;
      q_words[v][1] = raw.y;
      q_words[v][2] = raw.z;
      q_words[v][3] = raw.w;
    }
  }
  SplitWork work;
  int in_memory;  // rows of the split that exist (block: the loop's bound before the count is known)
  const Elem* k_base;
  const Elem* v_base;
  if constexpr (kBlock) {
    work.b = static_cast<int>(blockIdx.x) / a.tokens;
    work.t = static_cast<int>(blockIdx.x) % a.tokens;
    const int begin = static_cast<int>(blockIdx.z) * plan.chunk;
    const RoutingRows& routing = a.routing.rows;
    in_memory = min(plan.chunk, routing.top_k - begin);
    const std::size_t head_rows = static_cast<std::size_t>(routing.top_k) * D;  // elements per (row, K|V, kv head)
    const Elem* block = static_cast<const Elem*>(routing.kv) +
                        RoutingRows::kv_offset(blockIdx.x, a.kv_heads, kv_head, head_rows) +
                        static_cast<std::size_t>(begin) * D;
    k_base = block + q * 8;
    v_base = block + static_cast<std::size_t>(a.kv_heads) * head_rows + g * kDimsPerRow;
    const int count = routing.clamped_count(work.b, work.t);
    work.n = max(0, min(count, begin + plan.chunk) - begin);
  } else {
    work = split_rows<kMmaThreads>(p, rows);
    in_memory = work.n;
    __syncthreads();
    k_base = static_cast<const Elem*>(a.layout.k) + q * 8;  // rows at PoolRow offsets below
    v_base = static_cast<const Elem*>(a.layout.v) + g * kDimsPerRow;
  }
  const int n = work.n;
  const float logit_scale = a.scale * kLog2e;  // logits in log2 units: exp2f below
  float acc[kMTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.0f;
  float running_max = -INFINITY;  // head g, log2 units
  float running_sum = 0.0f;       // head g, this lane's tokens
  // Warp-uniform loop (the shuffles and the mma need the whole warp).
  for (int base = warp * 16; base < in_memory; base += 16 * kMmaWarps) {
    // Every K and V load of the step at once: K rows of tokens g, 8 + g; V rows of 2q, 2q+1, 8+2q, 9+2q.
    // Rows that are not loaded (skipped or past the split) read as zeros and form no address.
    bool k_loaded[2], v_loaded[4], v_routed[4];
    std::int64_t k_offset[2], v_offset[4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int index = base + 8 * j + g;
      if constexpr (kBlock) {
        k_loaded[j] = index < in_memory;
        k_offset[j] = static_cast<std::int64_t>(index) * D;
      } else {
        const int2 where = index < n ? rows[index] : make_int2(-1, 0);
        k_loaded[j] = where.x >= 0;
        k_offset[j] = k_loaded[j] ? PoolRow{where.x, where.y}.k_offset(a.layout, kv_head) : 0;
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int index = base + (j >> 1) * 8 + 2 * q + (j & 1);
      if constexpr (kBlock) {
        v_loaded[j] = index < in_memory;
        v_routed[j] = index < n;
        v_offset[j] = static_cast<std::int64_t>(index) * D;
      } else {
        const int2 where = index < n ? rows[index] : make_int2(-1, 0);
        v_loaded[j] = v_routed[j] = where.x >= 0;
        v_offset[j] = v_loaded[j] ? PoolRow{where.x, where.y}.v_offset(a.layout, kv_head) : 0;
      }
    }
    uint4 k_raw[2][kKVectors], v_raw[4][kVVectors];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int v = 0; v < kKVectors; ++v)
        k_raw[j][v] = k_loaded[j] ? load_vector(k_base + k_offset[j] + v * 32) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int u = 0; u < kVVectors; ++u)
        v_raw[j][u] = v_loaded[j] ? load_vector(v_base + v_offset[j] + u * 8) : make_uint4(0, 0, 0, 0);
    }

    if constexpr (kBlock) {
      // Rows past the count were loaded ahead of it: whatever they hold must not reach P.V.
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int u = 0; u < kVVectors; ++u) {
          if (!v_routed[j]) v_raw[j][u] = make_uint4(0, 0, 0, 0);
        }
      }
    }
    // S = Q.K^T for the two n-tiles; this lane: head g, tokens 2q, 2q+1 of each.
    float s[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
      for (int v = 0; v < kKVectors; ++v) {
        const unsigned even[4] = {q_words[v][0], 0u, q_words[v][1], 0u};
        const unsigned odd[4] = {q_words[v][2], 0u, q_words[v][3], 0u};
        mma_16816<Elem>(s[j], even, k_raw[j][v].x, k_raw[j][v].y);
        mma_16816<Elem>(s[j], odd, k_raw[j][v].z, k_raw[j][v].w);
      }
    }
    // Online softmax of head g over the step (the tokens of v_where, in the same order).
    float logit[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) logit[j] = v_routed[j] ? s[j >> 1][j & 1] * logit_scale : -INFINITY;
    float step_max = fmaxf(fmaxf(logit[0], logit[1]), fmaxf(logit[2], logit[3]));
    step_max = fmaxf(step_max, __shfl_xor_sync(kFullMask, step_max, 1));
    step_max = fmaxf(step_max, __shfl_xor_sync(kFullMask, step_max, 2));
    const float new_max = fmaxf(running_max, step_max);
    const float correction = new_max == -INFINITY ? 1.0f : exp2f(running_max - new_max);
    float probability[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) probability[j] = logit[j] == -INFINITY ? 0.0f : exp2f(logit[j] - new_max);
    running_sum = running_sum * correction + ((probability[0] + probability[1]) + (probability[2] + probability[3]));
    running_max = new_max;
    // The accumulator columns are heads 2q and 2q+1: their corrections come from rows g = 2q, 2q+1.
    const float correction_even = __shfl_sync(kFullMask, correction, 8 * q);
    const float correction_odd = __shfl_sync(kFullMask, correction, 8 * q + 4);
    // P as 16-bit head + tail (two products): the weights keep ~16 mantissa bits, so the result
    // stays as close to f32 softmax as the CUDA-core kernel's.
    unsigned p_head[2], p_tail[2];
    split_pair<Elem>(probability[0], probability[1], p_head[0], p_tail[0]);
    split_pair<Elem>(probability[2], probability[3], p_head[1], p_tail[1]);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      acc[mt][0] *= correction_even;
      acc[mt][1] *= correction_odd;
      acc[mt][2] *= correction_even;
      acc[mt][3] *= correction_odd;
      const unsigned* w0 = reinterpret_cast<const unsigned*>(&v_raw[0][mt / 4]);
      const unsigned* w1 = reinterpret_cast<const unsigned*>(&v_raw[1][mt / 4]);
      const unsigned* w2 = reinterpret_cast<const unsigned*>(&v_raw[2][mt / 4]);
      const unsigned* w3 = reinterpret_cast<const unsigned*>(&v_raw[3][mt / 4]);
      const unsigned frag[4] = {
          __byte_perm(w0[mt % 4], w1[mt % 4], 0x5410), __byte_perm(w0[mt % 4], w1[mt % 4], 0x7632),
          __byte_perm(w2[mt % 4], w3[mt % 4], 0x5410), __byte_perm(w2[mt % 4], w3[mt % 4], 0x7632)};
      mma_16816<Elem>(acc[mt], frag, p_head[0], p_head[1]);
      mma_16816<Elem>(acc[mt], frag, p_tail[0], p_tail[1]);
    }
    if (base + 16 * kMmaWarps >= n) break;  // block: the first step ran ahead of the count
  }

  // Each warp's (acc, max, sum) to shared memory; max in natural-log units like the other kernel.
  running_sum += __shfl_xor_sync(kFullMask, running_sum, 1);
  running_sum += __shfl_xor_sync(kFullMask, running_sum, 2);
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    const int d = kDimsPerRow * g + 2 * mt;
    if (2 * q < heads_here) {
      group_acc[(warp * gp + 2 * q) * D + d] = acc[mt][0];
      group_acc[(warp * gp + 2 * q) * D + d + 1] = acc[mt][2];
    }
    if (2 * q + 1 < heads_here) {
      group_acc[(warp * gp + 2 * q + 1) * D + d] = acc[mt][1];
      group_acc[(warp * gp + 2 * q + 1) * D + d + 1] = acc[mt][3];
    }
  }
  if (q == 0 && g < heads_here) {
    group_max[warp * gp + g] = running_max * kLn2;
    group_sum[warp * gp + g] = running_sum;
  }
  __syncthreads();
  combine_and_merge<Elem, D, kMmaThreads>(p, shared, kMmaWarps, gp, work, first_head, heads_here);
}

/// A kernel variant: element type, head dim and query heads per CTA.
struct Variant {
  DType dtype;
  int dim;
  int padded;
  void (*kernel)(Params);
  int threads;
  int groups_per_cta;            // warps or lane groups whose partial results the CTA combines
  void (*block_kernel)(Params);  // the kernel that reads a routed K/V block, or nullptr (reads the pool)
};

template <class Elem, int D>
void add_cuda_core_variants(std::vector<Variant>& variants, DType dtype) {
  variants.push_back(
      {dtype, D, 1, attention_kernel<Elem, D, 1>, kThreads, kWarps * Shape<Elem, D, 1>::kGroups, nullptr});
  variants.push_back(
      {dtype, D, 2, attention_kernel<Elem, D, 2>, kThreads, kWarps * Shape<Elem, D, 2>::kGroups, nullptr});
  variants.push_back(
      {dtype, D, 4, attention_kernel<Elem, D, 4>, kThreads, kWarps * Shape<Elem, D, 4>::kGroups, nullptr});
  variants.push_back(
      {dtype, D, 8, attention_kernel<Elem, D, 8>, kThreads, kWarps * Shape<Elem, D, 8>::kGroups, nullptr});
}

/// One tensor-core kernel serves every chunk width (its heads are a run-time count).
template <class Elem, int D>
void add_tensor_core_variants(std::vector<Variant>& variants, DType dtype) {
  for (int padded = 1; padded <= kMaxGroup; padded *= 2) {
    variants.push_back({dtype, D, padded, attention_kernel_mma<Elem, D, false>, kMmaThreads, kMmaWarps,
                        attention_kernel_mma<Elem, D, true>});
  }
}

const std::vector<Variant>& variants() {
  static const std::vector<Variant> all = [] {
    std::vector<Variant> v;
    add_cuda_core_variants<float, 64>(v, DType::f32);
    add_cuda_core_variants<float, 128>(v, DType::f32);
    add_cuda_core_variants<float, 256>(v, DType::f32);
    add_tensor_core_variants<__half, 64>(v, DType::f16);
    add_tensor_core_variants<__half, 128>(v, DType::f16);
    add_cuda_core_variants<__half, 256>(v, DType::f16);
    add_tensor_core_variants<__nv_bfloat16, 64>(v, DType::bf16);
    add_tensor_core_variants<__nv_bfloat16, 128>(v, DType::bf16);
    add_cuda_core_variants<__nv_bfloat16, 256>(v, DType::bf16);
    return v;
  }();
  return all;
}

int dtype_slot(DType dtype) {
  return dtype == DType::f32 ? 0 : dtype == DType::f16 ? 1 : 2;
}

SplitPlan split_plan(const AttentionPlan& plan, int slot, int rows) {
  return make_split_plan(rows, plan.q_heads, plan.kv_heads, plan.span, plan.slots[slot]);
}

}  // namespace

bool attention_supports(int dim) {
  for (const Variant& v : variants()) {
    if (v.dim == dim) return true;
  }
  return false;
}

AttentionPlan plan_attention(int max_rows, std::int64_t span, int q_heads, int kv_heads, int dim) {
  const int group = q_heads / kv_heads;
  const int padded = next_power_of_two(std::min(group, kMaxGroup));
  const std::int64_t head_chunks = ceil_div(group, padded);
  if (std::int64_t{kv_heads} * head_chunks > 65535) {
    detail::fail(ErrorCode::unsupported,
                 detail::concat(kv_heads, " kv heads x ", head_chunks, " head chunks exceed a grid's 65535"));
  }
  AttentionPlan plan;
  plan.max_rows = max_rows;
  plan.span = std::max<std::int64_t>(span, 1);
  plan.q_heads = q_heads;
  plan.kv_heads = kv_heads;
  plan.dim = dim;
  std::size_t partials = 0;
  const DType dtypes[3] = {DType::f32, DType::f16, DType::bf16};
  for (int slot = 0; slot < 3; ++slot) {
    for (std::size_t i = 0; i < variants().size(); ++i) {
      const Variant& v = variants()[i];
      if (v.dtype == dtypes[slot] && v.dim == dim && v.padded == padded) plan.variant[slot] = static_cast<int>(i);
    }
    if (plan.variant[slot] < 0) {
      detail::fail(ErrorCode::unsupported,
                   detail::concat("head_dim ", dim, "; the CUDA path supports 64, 128 and 256"));
    }
    const Variant& v = variants()[static_cast<std::size_t>(plan.variant[slot])];
    // Resident CTAs per multiprocessor of this variant (registers bound it; the shared memory of
    // a 1024-token split is a typical size).
    SplitPlan typical;
    typical.padded = padded;
    typical.chunk = 1024;
    const void* kernel = reinterpret_cast<const void*>(v.kernel);
    const int resident = resident_blocks(kernel, v.threads, shared_bytes(typical, dim, v.groups_per_cta),
                                         "cudaOccupancyMaxActiveBlocksPerMultiprocessor (attention)");
    plan.slots[slot] = std::int64_t{resident} * multiprocessor_count();
    // Room for the partial results of the call with the most (rows x splits) of any batch size
    // within the bounds: the layout is the same for all of them.
    std::size_t shared = 0;
    for (int rows = 1; rows <= max_rows; ++rows) {
      const SplitPlan splits = split_plan(plan, slot, rows);
      shared = std::max(shared, shared_bytes(splits, dim, v.groups_per_cta));
      if (splits.splits > 1) {
        partials = std::max(partials, static_cast<std::size_t>(rows) * static_cast<std::size_t>(splits.splits));
      }
    }
    allow_shared_memory(kernel, shared, "cudaFuncSetAttribute (attention)");
    if (v.block_kernel != nullptr) {
      allow_shared_memory(reinterpret_cast<const void*>(v.block_kernel), shared, "cudaFuncSetAttribute (attention)");
    }
  }
  partials *= static_cast<std::size_t>(q_heads);
  const std::size_t tickets = static_cast<std::size_t>(max_rows) * kv_heads * static_cast<std::size_t>(head_chunks);
  plan.partial_out_offset = (tickets * sizeof(unsigned) + 255) / 256 * 256;
  plan.partial_ml_offset = plan.partial_out_offset + partials * dim * sizeof(float);
  plan.bytes = plan.partial_ml_offset + partials * 2 * sizeof(float);
  return plan;
}

void attention(const AttentionArgs& args, const AttentionPlan& plan, void* workspace, cudaStream_t stream) {
  const int slot = dtype_slot(args.layout.dtype);
  const Variant& v = variants()[static_cast<std::size_t>(plan.variant[slot])];
  const int rows = args.num_sequences * args.tokens;
  Params params{};
  params.a = args;
  params.plan = split_plan(plan, slot, rows);
  const RoutingArgs& routing = args.routing;
  params.max_length =
      routing.rows.positions != nullptr ? INT_MAX : static_cast<int>(std::min<std::int64_t>(plan.span, INT_MAX));
  params.page_shift = page_shift_of(args.layout.page_size);
  auto* base = static_cast<unsigned char*>(workspace);
  params.tickets = reinterpret_cast<unsigned*>(base);
  params.partial_out = reinterpret_cast<float*>(base + plan.partial_out_offset);
  params.partial_ml = reinterpret_cast<float*>(base + plan.partial_ml_offset);
  const SplitPlan& splits = params.plan;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(args.kv_heads * splits.head_chunks),
                  static_cast<unsigned>(splits.splits));
  const std::size_t shared = shared_bytes(splits, v.dim, v.groups_per_cta);
  if (routing.rows.kv != nullptr && routing.rows.positions != nullptr && v.block_kernel != nullptr) {
    launch_kernel(v.block_kernel, grid, dim3(static_cast<unsigned>(v.threads)), shared, stream,
                  LaunchAttributes{}.persisting(routing.rows.kv, routing.kv_bytes, routing.kv_l2_hit_ratio),
                  "attention_kernel (block)", params);
    return;
  }
  v.kernel<<<grid, v.threads, shared, stream>>>(params);
  detail::cuda_check_launch("attention_kernel");
}

}  // namespace cuda_kernels
}  // namespace clsa
