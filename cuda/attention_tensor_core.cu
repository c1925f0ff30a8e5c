// The tensor-core attention kernel (16-bit caches, head_dim 64 / 128): each warp takes 16 tokens
// per step and issues all of their K and V loads (16-byte, straight into the mma fragment
// registers) at once; S = Q.K^T and O^T += V^T.P^T are m16n8k16 products (heads padded to the
// mma's 16 rows / 8 columns), with dimension and token orders permuted so that every fragment comes
// from whole 16-byte loads. A second instance reads the routed K/V block that select() gathered.
// What all attention kernels share is in attention_common.cuh.
#include <vector>

#include "attention_common.cuh"

namespace clsa {
namespace cuda_kernels {
namespace attention_kernels {

namespace {

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
  wait_for_predecessor();  // launched as a programmatic dependent (AttentionConfig::enable_pdl): nothing read before
  constexpr int kKVectors = D / 32;         // 16-byte K loads per lane and token (and Q)
  constexpr int kDimsPerRow = D / 8;        // E: output dims per lane row g
  constexpr int kVVectors = D / 64;         // 16-byte V loads per lane and token
  constexpr int kMTiles = kDimsPerRow / 2;  // m-tiles of O^T
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;
  const AttentionArgs& a = p.a;
  const SplitPlan& plan = p.plan;
  extern __shared__ __align__(16) unsigned char shared[];
  const int gp = plan.padded;                    // heads of a chunk (<= 8)
  int2* rows = reinterpret_cast<int2*>(shared);  // [chunk]: (page, slot), page -1 = skip
  using Layout = AccLayout<D, true>;
  float* group_acc = reinterpret_cast<float*>(shared + rows_bytes(plan));  // [warps][gp] rows of Layout
  float* group_max = group_acc + kMmaWarps * gp * Layout::kRowFloats;      // [warps][gp]
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
      group_acc[Layout::at(warp * gp + 2 * q, d)] = acc[mt][0];
      group_acc[Layout::at(warp * gp + 2 * q, d + 1)] = acc[mt][2];
    }
    if (2 * q + 1 < heads_here) {
      group_acc[Layout::at(warp * gp + 2 * q + 1, d)] = acc[mt][1];
      group_acc[Layout::at(warp * gp + 2 * q + 1, d + 1)] = acc[mt][3];
    }
  }
  if (q == 0 && g < heads_here) {
    group_max[warp * gp + g] = running_max * kLn2;
    group_sum[warp * gp + g] = running_sum;
  }
  __syncthreads();
  combine_and_merge<Elem, D, kMmaThreads, true>(p, shared, kMmaWarps, gp, work, first_head, heads_here);
}

/// One tensor-core kernel serves every chunk width (its heads are a run-time count).
template <class Elem, int D>
void add_tensor_core_variants(std::vector<Variant>& variants, DType dtype) {
  for (int padded = 1; padded <= kMaxGroup; padded *= 2) {
    variants.push_back({dtype, D, padded, attention_kernel_mma<Elem, D, false>, kMmaThreads, kMmaWarps,
                        attention_kernel_mma<Elem, D, true>, AccLayout<D, true>::kRowFloats});
  }
}

}  // namespace

std::vector<Variant> tensor_core_variants() {
  std::vector<Variant> v;
  add_tensor_core_variants<__half, 64>(v, DType::f16);
  add_tensor_core_variants<__half, 128>(v, DType::f16);
  add_tensor_core_variants<__nv_bfloat16, 64>(v, DType::bf16);
  add_tensor_core_variants<__nv_bfloat16, 128>(v, DType::bf16);
  return v;
}

}  // namespace attention_kernels
}  // namespace cuda_kernels
}  // namespace clsa
