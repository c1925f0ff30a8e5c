// The CUDA-core attention kernel (f32 caches, and head_dim 256 of every dtype): lanes cover a
// row's dimensions with 16-byte loads, each lane group reduces several tokens' dot products in one
// butterfly, software-pipelined by one batch. What all attention kernels share is in
// attention_common.cuh.
#include <vector>

#include "attention_common.cuh"

namespace clsa {
namespace cuda_kernels {
namespace attention_kernels {

namespace {

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
  wait_for_predecessor();  // launched as a programmatic dependent (AttentionConfig::enable_pdl): nothing read before
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

  combine_and_merge<Elem, D, kThreads, false>(p, shared, kGroupsPerCta, GP, work, first_head, heads_here);
}

template <class Elem, int D>
void add_cuda_core_variants(std::vector<Variant>& variants, DType dtype) {
  variants.push_back(
      {dtype, D, 1, attention_kernel<Elem, D, 1>, kThreads, kWarps * Shape<Elem, D, 1>::kGroups, nullptr, D});
  variants.push_back(
      {dtype, D, 2, attention_kernel<Elem, D, 2>, kThreads, kWarps * Shape<Elem, D, 2>::kGroups, nullptr, D});
  variants.push_back(
      {dtype, D, 4, attention_kernel<Elem, D, 4>, kThreads, kWarps * Shape<Elem, D, 4>::kGroups, nullptr, D});
  variants.push_back(
      {dtype, D, 8, attention_kernel<Elem, D, 8>, kThreads, kWarps * Shape<Elem, D, 8>::kGroups, nullptr, D});
}

}  // namespace

std::vector<Variant> cuda_core_variants() {
  std::vector<Variant> v;
  add_cuda_core_variants<float, 64>(v, DType::f32);
  add_cuda_core_variants<float, 128>(v, DType::f32);
  add_cuda_core_variants<float, 256>(v, DType::f32);
  add_cuda_core_variants<__half, 256>(v, DType::f16);
  add_cuda_core_variants<__nv_bfloat16, 256>(v, DType::bf16);
  return v;
}

}  // namespace attention_kernels
}  // namespace cuda_kernels
}  // namespace clsa
