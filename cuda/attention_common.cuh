// What the attention kernels share (attention_cuda_core.cu: CUDA cores; attention_tensor_core.cu:
// tensor cores; attention.cu: plans and launches): the split plan and the kernels' parameters, each
// split's rows and the merge of the splits.
//
// Split-k gather attention over the paged cache (FlashDecoding style), sparse over routed
// positions or dense over a contiguous range, with an LSE merge of the splits. One CTA = (query
// row, kv head, up to 8 query heads of its GQA group, one split of the tokens). Every gathered
// K/V row is read once and serves all of the CTA's query heads:
//   0. the split's token positions -> (page, slot) in shared memory (the routed positions, the
//      count and the lengths are read in one round trip): split_rows
//   1. one pass with online softmax over the split's tokens, in one of the two kernel families
//   2. warps / lane groups combined in a fixed order through shared memory (bitwise
//      reproducible): combine_and_merge
// With one split the CTA writes the output. Otherwise it writes its (o, m, l) to the workspace,
// and the last CTA of its (row, kv head, head chunk) to finish, found with an atomic ticket,
// merges all splits by log-sum-exp in split order: no second launch.
#pragma once

#include <vector>

#include <cuda/atomic>

#include "common.cuh"
#include "kernels.hpp"

namespace clsa {
namespace cuda_kernels {
namespace attention_kernels {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGroup = 8;     // query heads per CTA; larger groups use several CTAs
constexpr int kMaxChunk = 4096;  // tokens per split: 32 KiB of (page, slot) rows
constexpr int kMinChunk = 128;   // fewer, fuller splits: each split costs a merge
constexpr int kMaxSplits = 512;  // bounds the merge's work
constexpr int kMmaWarps = 8;     // the tensor-core kernel: 16 tokens per warp and step
constexpr int kMmaThreads = kMmaWarps * 32;

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

/// Shared memory of the attention kernel: the split's (page, slot) rows, then the per-lane-group
/// partial results [groups][padded][dim] with their max and sum.
__host__ __device__ inline std::size_t rows_bytes(const SplitPlan& plan) {
  return (static_cast<std::size_t>(plan.chunk) * sizeof(int2) + 15) / 16 * 16;
}

/// Where the partial accumulator of (group k, head g) at dimension d sits: row k * gp + g of
/// kRowFloats floats. Plain rows (kSpread false) hold the D dimensions in order. Spread rows (the
/// tensor-core kernel, whose lanes hold dims [D/8 * g', D/8 * (g' + 1)) of heads 2q and 2q + 1)
/// hold eight blocks of D/8 dimensions with one float after each, and rows are kRowFloats apart so
/// that the 32 lanes of every fragment store fall into 32 different banks.
template <int D, bool kSpread>
struct AccLayout {
  static constexpr int kBlock = D / 8;
  /// The first row stride >= 8 * (kBlock + 1) at which the fragment stores are conflict-free.
  static constexpr int spread_row_floats() {
    for (int stride = 8 * (kBlock + 1);; ++stride) {
      bool free = true;
      for (int mt = 0; mt < kBlock / 2 && free; ++mt) {
        unsigned banks = 0;
        for (int lane = 0; lane < 32; ++lane) {
          const unsigned bank =
              static_cast<unsigned>(2 * (lane % 4) * stride + (kBlock + 1) * (lane / 4) + 2 * mt) % 32;
          free = free && (banks & (1u << bank)) == 0;
          banks |= 1u << bank;
        }
      }
      if (free) return stride;
    }
  }
  static constexpr int kRowFloats = kSpread ? spread_row_floats() : D;
  __host__ __device__ static constexpr int at(int row, int d) {
    return kSpread ? row * kRowFloats + (d / kBlock) * (kBlock + 1) + d % kBlock : row * D + d;
  }
};

/// `row_floats`: AccLayout::kRowFloats of the kernel's partial accumulators.
inline std::size_t shared_bytes(const SplitPlan& plan, int row_floats, int groups_per_cta) {
  return rows_bytes(plan) + static_cast<std::size_t>(groups_per_cta) * plan.padded * (row_floats + 2) * sizeof(float);
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
template <class Elem, int D, int Threads, bool kSpread>
__device__ void combine_and_merge(const Params& p, unsigned char* shared, int groups, int gp, const SplitWork& work,
                                  int first_head, int heads_here) {
  using Layout = AccLayout<D, kSpread>;
  const AttentionArgs& a = p.a;
  const SplitPlan& plan = p.plan;
  float* group_acc = reinterpret_cast<float*>(shared + rows_bytes(plan));  // [groups][gp] rows of Layout
  float* group_max = group_acc + groups * gp * Layout::kRowFloats;         // [groups][gp]
  const float* group_sum = group_max + groups * gp;                        // [groups][gp]
  __shared__ unsigned ticket;
  __shared__ float head_max[kMaxGroup];
  __shared__ float head_sum[kMaxGroup];
  const int tid = threadIdx.x;
  const int row = blockIdx.x;
  const int split = blockIdx.z;
  const int b = work.b;
  const int t = work.t;
  const int q_heads = a.q_heads;
  // Per head: the max over the groups, each group's weight (in place of its max) and the sum.
  if (tid < heads_here) {
    const int g = tid;
    float m = -INFINITY;
    for (int k = 0; k < groups; ++k) m = fmaxf(m, group_max[k * gp + g]);
    float l = 0.0f;
    for (int k = 0; k < groups; ++k) {
      const float km = group_max[k * gp + g];
      const float weight = km == -INFINITY ? 0.0f : __expf(km - m);
      l += group_sum[k * gp + g] * weight;
      group_max[k * gp + g] = weight;
    }
    head_max[g] = m;
    head_sum[g] = l;
  }
  __syncthreads();
  const float* group_weight = group_max;
  for (int i = tid; i < heads_here * D; i += Threads) {
    const int g = i / D;
    const int d = i % D;
    const float m = head_max[g];
    const float l = head_sum[g];
    float o = 0.0f;
    for (int k = 0; k < groups; ++k) o += group_acc[Layout::at(k * gp + g, d)] * group_weight[k * gp + g];
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

/// A kernel variant: element type, head dim and query heads per CTA.
struct Variant {
  DType dtype;
  int dim;
  int padded;
  void (*kernel)(Params);
  int threads;
  int groups_per_cta;            // warps or lane groups whose partial results the CTA combines
  void (*block_kernel)(Params);  // the kernel that reads a routed K/V block, or nullptr (reads the pool)
  int acc_row_floats;            // AccLayout::kRowFloats of its partial accumulators
};

/// The kernels of each family, one Variant per (dtype, head_dim, query heads per CTA) they serve.
std::vector<Variant> cuda_core_variants();
std::vector<Variant> tensor_core_variants();

}  // namespace attention_kernels
}  // namespace cuda_kernels
}  // namespace clsa
