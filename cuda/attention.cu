// Split-k gather attention over the paged cache (FlashDecoding style), sparse over routed
// positions or dense over a contiguous range, with an LSE merge of the splits.
//
// One CTA = (query row, kv head, up to 8 query heads of its GQA group, one split of the tokens).
// Every gathered K/V row is read once and serves all of the CTA's query heads:
//   0. the split's token positions -> (page, slot) in shared memory
//   1. one pass with online softmax: lanes cover a row's dimensions with 16-byte loads of K and
//      V; each lane group reduces the dot products of several tokens and heads at once (one
//      butterfly), updates its running max and sum, and accumulates P.V
//   2. lane groups and warps combined in a fixed order (bitwise reproducible)
// then the split's (o, m, l) go to the workspace, or the output directly when there is one split.
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
constexpr int kCtasPerMultiprocessor = 3;

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
};

int next_power_of_two(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

Plan make_plan(int rows, int q_heads, int kv_heads, std::int64_t span) {
  Plan plan;
  plan.group = q_heads / kv_heads;
  plan.padded = next_power_of_two(std::min(plan.group, kMaxGroup));
  plan.head_chunks = static_cast<int>(ceil_div(plan.group, plan.padded));
  span = std::max<std::int64_t>(span, 1);
  const std::int64_t units = std::int64_t{rows} * kv_heads * plan.head_chunks;
  const std::int64_t target = std::int64_t{kCtasPerMultiprocessor} * multiprocessor_count();
  std::int64_t splits = std::min(std::max<std::int64_t>(ceil_div(target, units), 1), ceil_div(span, 32));
  std::int64_t chunk = ceil_div(ceil_div(span, splits), 32) * 32;
  if (chunk > kMaxChunk) chunk = kMaxChunk;
  plan.chunk = static_cast<int>(chunk);
  plan.splits = static_cast<int>(ceil_div(span, chunk));
  return plan;
}

/// Shared memory of the attention kernel: the split's (page, slot) rows, then the per-warp partial
/// results [kWarps][padded][dim] with their max and sum.
__host__ __device__ inline std::size_t rows_bytes(const Plan& plan) {
  return (static_cast<std::size_t>(plan.chunk) * sizeof(int2) + 15) / 16 * 16;
}

std::size_t shared_bytes(const Plan& plan, int dim) {
  return rows_bytes(plan) + static_cast<std::size_t>(kWarps) * plan.padded * (dim + 2) * sizeof(float);
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
  int2* rows = reinterpret_cast<int2*>(shared);                           // [chunk]: (page, slot), page -1 = skip
  float* warp_acc = reinterpret_cast<float*>(shared + rows_bytes(plan));  // [kWarps][GP][D]
  float* warp_max = warp_acc + kWarps * GP * D;                           // [kWarps][GP]
  float* warp_sum = warp_max + kWarps * GP;                               // [kWarps][GP]

  const int row = blockIdx.x;
  const int kv_head = blockIdx.y / plan.head_chunks;
  const int head_chunk = blockIdx.y % plan.head_chunks;
  const int split = blockIdx.z;
  const int first_head = kv_head * plan.group + head_chunk * GP;
  const int heads_here = min(GP, plan.group - head_chunk * GP);
  const int b = row / a.tokens;
  const int t = row % a.tokens;
  const int length = a.lengths[b];
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
  for (int warp_base = warp * S::kGroups * S::kTokens; warp_base < n; warp_base += kBatch) {
    const int base = warp_base + group_index * S::kTokens;
    int2 where[S::kTokens];
#pragma unroll
    for (int j = 0; j < S::kTokens; ++j) where[j] = base + j < n ? rows[base + j] : make_int2(-1, 0);
    uint4 k_raw[S::kTokens][S::kChunks];
    uint4 v_raw[kTogether ? S::kTokens : 1][S::kChunks];
#pragma unroll
    for (int j = 0; j < S::kTokens; ++j) {
#pragma unroll
      for (int c = 0; c < S::kChunks; ++c) {
        k_raw[j][c] = load_row(k_base, a.layout.k_page_stride, a.layout.k_token_stride, where[j], c);
        if constexpr (kTogether)
          v_raw[j][c] = load_row(v_base, a.layout.v_page_stride, a.layout.v_token_stride, where[j], c);
      }
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

  // Deterministic reduction (the same result on every run, graph replays included): lane groups
  // of a warp by a shuffle butterfly (each pair combined symmetrically), then warps in a fixed
  // order through shared memory.
#pragma unroll
  for (int offset = S::kLanes; offset < 32; offset <<= 1) {
#pragma unroll
    for (int g = 0; g < GP; ++g) {
      const float other_max = __shfl_xor_sync(kFullMask, running_max[g], offset);
      const float other_sum = __shfl_xor_sync(kFullMask, running_sum[g], offset);
      const float merged = fmaxf(running_max[g], other_max);
      const float mine = running_max[g] == -INFINITY ? 0.0f : __expf(running_max[g] - merged);
      const float theirs = other_max == -INFINITY ? 0.0f : __expf(other_max - merged);
      running_sum[g] = running_sum[g] * mine + other_sum * theirs;
#pragma unroll
      for (int c = 0; c < S::kChunks; ++c) {
#pragma unroll
        for (int e = 0; e < S::kPerVector; ++e) {
          acc[c][e][g] = acc[c][e][g] * mine + __shfl_xor_sync(kFullMask, acc[c][e][g], offset) * theirs;
        }
      }
      running_max[g] = merged;
    }
  }
  if (group_index == 0) {
#pragma unroll
    for (int c = 0; c < S::kChunks; ++c) {
#pragma unroll
      for (int e = 0; e < S::kPerVector; ++e) {
        const int d = (c * S::kLanes + lane_in_group) * S::kPerVector + e;
#pragma unroll
        for (int g = 0; g < GP; ++g) warp_acc[(warp * GP + g) * D + d] = acc[c][e][g];
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int g = 0; g < GP; ++g) {
        warp_max[warp * GP + g] = running_max[g];
        warp_sum[warp * GP + g] = running_sum[g];
      }
    }
  }
  __syncthreads();

  // Combine the warps and write: the final output when there is one split, else this split's
  // (o, m, l) for the merge.
  const int q_heads = a.q_heads;
  for (int i = tid; i < heads_here * D; i += kThreads) {
    const int g = i / D;
    const int d = i % D;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, warp_max[w * GP + g]);
    float l = 0.0f;
    float o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wm = warp_max[w * GP + g];
      const float weight = wm == -INFINITY ? 0.0f : __expf(wm - m);
      l += warp_sum[w * GP + g] * weight;
      o += warp_acc[(w * GP + g) * D + d] * weight;
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
}

/// Combines the splits of each (row, head) by their log-sum-exp: the split weights are computed
/// once into shared memory, then every dimension sums over the splits with independent loads.
template <class Elem>
__global__ void __launch_bounds__(kThreads) merge_kernel(Params p) {
  extern __shared__ float weights[];  // [splits]
  __shared__ float reduction[kWarps];
  const AttentionArgs& a = p.a;
  const int row = blockIdx.x;
  const int head = blockIdx.y;
  const int b = row / a.tokens;
  const int t = row % a.tokens;
  const int splits = p.plan.splits;
  const int tid = threadIdx.x;
  const std::size_t first = (static_cast<std::size_t>(row) * a.q_heads + head) * splits;
  // Block-wide max and sum in a fixed order (deterministic).
  auto block_reduce = [&](float value, bool is_max) {
#pragma unroll
    for (int offset = 16; offset >= 1; offset >>= 1) {
      const float other = __shfl_xor_sync(kFullMask, value, offset);
      value = is_max ? fmaxf(value, other) : value + other;
    }
    if (tid % 32 == 0) reduction[tid / 32] = value;
    __syncthreads();
    float total = reduction[0];
    for (int w = 1; w < kWarps; ++w) total = is_max ? fmaxf(total, reduction[w]) : total + reduction[w];
    __syncthreads();
    return total;
  };
  float local_max = -INFINITY;
  for (int s = tid; s < splits; s += kThreads) local_max = fmaxf(local_max, p.partial_ml[(first + s) * 2]);
  const float m = block_reduce(local_max, true);
  float local_sum = 0.0f;
  for (int s = tid; s < splits; s += kThreads) {
    const float ms = p.partial_ml[(first + s) * 2];
    const float weight = ms == -INFINITY ? 0.0f : __expf(ms - m);
    weights[s] = weight;
    local_sum += p.partial_ml[(first + s) * 2 + 1] * weight;
  }
  const float l = block_reduce(local_sum, false);  // its barrier also publishes `weights`
  const float inverse = l > 0.0f ? 1.0f / l : 0.0f;
  Elem* out = static_cast<Elem*>(a.out) + b * a.out_stride_b + t * a.out_stride_t + head * a.out_stride_h;
  const float* partial = p.partial_out + first * a.dim;
  for (int d = tid; d < a.dim; d += kThreads) {
    float o = 0.0f;
#pragma unroll 8
    for (int s = 0; s < splits; ++s) o += partial[static_cast<std::size_t>(s) * a.dim + d] * weights[s];
    out[d] = narrow<Elem>(o * inverse);
  }
  if (tid == 0 && a.lse != nullptr) a.lse[b * a.lse_stride_b + t * a.lse_stride_t + head] = m + logf(l);
}

template <class Elem, int D, int GP>
void launch(const Params& params, cudaStream_t stream) {
  const Plan& plan = params.plan;
  const std::size_t shared = shared_bytes(plan, D);
  constexpr auto kernel = attention_kernel<Elem, D, GP>;
  allow_shared_memory<kernel>(shared, "cudaFuncSetAttribute (attention)");
  const int rows = params.a.num_sequences * params.a.tokens;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(params.a.kv_heads * plan.head_chunks),
                  static_cast<unsigned>(plan.splits));
  kernel<<<grid, kThreads, shared, stream>>>(params);
  detail::cuda_check_launch("attention_kernel");
  if (plan.splits > 1) {
    const std::size_t merge_shared = static_cast<std::size_t>(plan.splits) * sizeof(float);
    constexpr auto merge = merge_kernel<Elem>;
    allow_shared_memory<merge>(merge_shared, "cudaFuncSetAttribute (attention merge)");
    merge<<<dim3(static_cast<unsigned>(rows), static_cast<unsigned>(params.a.q_heads)), kThreads, merge_shared,
            stream>>>(params);
    detail::cuda_check_launch("attention merge_kernel");
  }
}

template <class Elem, int D>
void launch_group(const Params& params, cudaStream_t stream) {
  switch (params.plan.padded) {
    case 1:
      return launch<Elem, D, 1>(params, stream);
    case 2:
      return launch<Elem, D, 2>(params, stream);
    case 4:
      return launch<Elem, D, 4>(params, stream);
    default:
      return launch<Elem, D, 8>(params, stream);
  }
}

template <class Elem>
void launch_dim(const Params& params, cudaStream_t stream) {
  switch (params.a.dim) {
    case 64:
      return launch_group<Elem, 64>(params, stream);
    case 128:
      return launch_group<Elem, 128>(params, stream);
    default:
      return launch_group<Elem, 256>(params, stream);
  }
}

}  // namespace

std::size_t attention_workspace_bytes(int num_sequences, int tokens, int q_heads, int dim, std::int64_t span) {
  // Bounded over every kv head count (the plan depends on it only through the group size).
  const int rows = num_sequences * tokens;
  std::size_t most = 0;
  for (int kv_heads = 1; kv_heads <= q_heads; ++kv_heads) {
    if (q_heads % kv_heads != 0) continue;
    const Plan plan = make_plan(rows, q_heads, kv_heads, span);
    if (plan.splits == 1) continue;
    most = std::max(most, static_cast<std::size_t>(rows) * q_heads * plan.splits * (dim + 2) * sizeof(float));
  }
  return most;
}

void attention(const AttentionArgs& args, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  Params params{};
  params.a = args;
  const int rows = args.num_sequences * args.tokens;
  const std::int64_t span = args.positions != nullptr ? args.top_k : args.max_length;
  params.plan = make_plan(rows, args.q_heads, args.kv_heads, span);
  params.page_shift = log2_exact(args.layout.page_size);
  const std::size_t partials = static_cast<std::size_t>(rows) * args.q_heads * params.plan.splits;
  if (params.plan.splits > 1) {
    if (partials * (args.dim + 2) * sizeof(float) > workspace_bytes) {
      detail::fail(ErrorCode::capacity_exceeded, "attention: workspace smaller than planned (internal)");
    }
    params.partial_out = static_cast<float*>(workspace);
    params.partial_ml = params.partial_out + partials * args.dim;
  }
  switch (args.layout.dtype) {
    case DType::f32:
      return launch_dim<float>(params, stream);
    case DType::f16:
      return launch_dim<__half>(params, stream);
    default:
      return launch_dim<__nv_bfloat16>(params, stream);
  }
}

}  // namespace cuda_kernels
}  // namespace clsa
