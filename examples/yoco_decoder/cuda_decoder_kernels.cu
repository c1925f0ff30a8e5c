// The CUDA decoder ops' own kernels: embedding, RMSNorm, RoPE, SwiGLU, the residual add and the
// self-decoder's sliding-window attention. bf16 storage, f32 arithmetic. Nothing here is tuned
// beyond reading every byte once where that is simple: the step's bytes are the weights' (cuBLAS)
// and the caches' (libclsa); these kernels move a few MB per step (README.md, "The GPU path").
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "clsa/types.hpp"
#include "cuda_decoder_kernels.hpp"

namespace yoco {
namespace cuda_kernels {

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kRowThreads = 256;     // threads of the row kernels (embed, rms_norm, ring store)
constexpr int kWindowThreads = 256;  // threads of the window attention kernel
constexpr int kElementwiseThreads = 256;
// The window attention's split of a decoding call's window over blocks (window_attention).
constexpr int kWindowTargetBlocks = 1024;  // ~8 blocks of 256 threads on each SM of an H100
constexpr int kWindowMinChunk = 16;        // positions per split, at least

void check_launch(const char* kernel) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    throw clsa::Error(clsa::ErrorCode::cuda_error,
                      std::string("CudaDecoderOps: launch of ") + kernel + ": " + cudaGetErrorString(status));
  }
}

/// Blocks of a grid-stride elementwise launch over `count` elements.
unsigned elementwise_blocks(std::int64_t count) {
  const std::int64_t blocks = (count + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<unsigned>(std::max<std::int64_t>(1, std::min<std::int64_t>(blocks, 65536)));
}

__device__ __forceinline__ float load(const bf16_bits* p) {
  return __bfloat162float(__ushort_as_bfloat16(*p));
}
__device__ __forceinline__ void store(bf16_bits* p, float x) {
  *p = __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}
/// The sum (or max) of `x` over the block, returned to every thread. blockDim.x is a multiple of
/// 32; `scratch` holds 32 floats.
__device__ float block_sum(float x, float* scratch) {
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  x = warp_sum(x);
  __syncthreads();  // the previous reduction's readers are done with scratch
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  return warp_sum(lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : 0.0f);
}
__device__ float block_max(float x, float* scratch) {
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  x = warp_max(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  return warp_max(lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : -INFINITY);
}

__global__ void embed_kernel(const std::int32_t* tokens, const bf16_bits* table, std::int64_t table_stride,
                             std::int64_t vocab, std::int64_t width, float scale, bf16_bits* out,
                             std::int64_t out_stride) {
  const std::int64_t m = blockIdx.x;
  const std::int32_t token = tokens[m];
  const bool inside = token >= 0 && token < vocab;
  const bf16_bits* row = table + (inside ? token : 0) * table_stride;
  for (std::int64_t i = threadIdx.x; i < width; i += blockDim.x) {
    store(out + m * out_stride + i, inside ? scale * load(row + i) : 0.0f);
  }
}

__global__ void rms_norm_kernel(const bf16_bits* x, std::int64_t x_stride, const bf16_bits* weight, float eps,
                                bf16_bits* out, std::int64_t out_stride, std::int64_t width) {
  __shared__ float scratch[32];
  const bf16_bits* row = x + static_cast<std::int64_t>(blockIdx.x) * x_stride;
  float squares = 0.0f;
  for (std::int64_t i = threadIdx.x; i < width; i += blockDim.x) {
    const float value = load(row + i);
    squares += value * value;
  }
  const float inverse_rms = 1.0f / sqrtf(block_sum(squares, scratch) / static_cast<float>(width) + eps);
  bf16_bits* result = out + static_cast<std::int64_t>(blockIdx.x) * out_stride;
  for (std::int64_t i = threadIdx.x; i < width; i += blockDim.x) {
    store(result + i, load(row + i) * inverse_rms * load(weight + i));
  }
}

__global__ void rope_kernel(bf16_bits* x, std::int64_t rows, int heads, int head_dim, std::int64_t row_stride,
                            std::int64_t head_stride, const std::int32_t* positions, float theta) {
  const int pairs = head_dim / 2;
  const std::int64_t total = rows * heads * pairs;
  for (std::int64_t e = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(e % pairs);
    const std::int64_t row_head = e / pairs;
    const int h = static_cast<int>(row_head % heads);
    const std::int64_t m = row_head / heads;
    // The angle in double: position * frequency reaches 5e5 radians at 512K tokens.
    const double angle =
        static_cast<double>(positions[m]) * pow(static_cast<double>(theta), -2.0 * i / static_cast<double>(head_dim));
    double sine, cosine;
    sincos(angle, &sine, &cosine);
    const float c = static_cast<float>(cosine), s = static_cast<float>(sine);
    bf16_bits* pair = x + m * row_stride + h * head_stride + 2 * i;
    const float even = load(pair), odd = load(pair + 1);
    store(pair, even * c - odd * s);
    store(pair + 1, even * s + odd * c);
  }
}

__global__ void swiglu_kernel(const bf16_bits* gate_up, std::int64_t gate_up_stride, bf16_bits* out,
                              std::int64_t out_stride, std::int64_t rows, std::int64_t width) {
  const std::int64_t total = rows * width;
  for (std::int64_t e = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t m = e / width, i = e % width;
    const float gate = load(gate_up + m * gate_up_stride + i);
    const float up = load(gate_up + m * gate_up_stride + width + i);
    store(out + m * out_stride + i, gate / (1.0f + expf(-gate)) * up);
  }
}

__global__ void add_kernel(bf16_bits* x, std::int64_t x_stride, const bf16_bits* y, std::int64_t y_stride,
                           std::int64_t rows, std::int64_t width) {
  const std::int64_t total = rows * width;
  for (std::int64_t e = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t m = e / width, i = e % width;
    store(x + m * x_stride + i, load(x + m * x_stride + i) + load(y + m * y_stride + i));
  }
}

/// Query row `row` = (b * tokens + t) * kv_heads + kv of the window attention: its sequence's ring
/// slot and start, its position and the first position of its window. `valid` is false for an
/// empty slot (or one outside the ring), which has nothing to do.
struct WindowRow {
  int b, t, kv, slot;
  std::int64_t start, position, first;
  bool valid;
  __device__ WindowRow(const WindowAttentionArgs& a, std::int64_t row) {
    kv = static_cast<int>(row % a.kv_heads);
    t = static_cast<int>((row / a.kv_heads) % a.tokens);
    b = static_cast<int>(row / a.kv_heads / a.tokens);
    slot = a.slots[b];
    start = a.starts[b];
    valid = slot >= 0 && slot < a.cache_slots && start >= 0;
    position = start + t;
    first = position - a.window + 1 > 0 ? position - a.window + 1 : 0;
  }
};

/// One block per (sequence, token, kv head, split): the group's query heads in shared memory
/// (f32); a score per position of the split's span and query head (a warp per position: each lane
/// dots head_dim / 32 elements of the key with every query head); the softmax per head; then P.V
/// (a thread per output element and a part of the positions, the parts summed in shared memory).
/// Every K and V row of the window is read once per kv head. With one split the block writes the
/// output; with several it writes its partial result (max, sum, unnormalised P.V per query head)
/// for window_combine_kernel.
__global__ void __launch_bounds__(kWindowThreads) window_attention_kernel(const WindowAttentionArgs a) {
  extern __shared__ float shared[];
  __shared__ float scratch[32];
  const int group = a.q_heads / a.kv_heads;
  const int D = a.head_dim;
  const std::int64_t row = blockIdx.x / a.splits;  // (b * tokens + t) * kv_heads + kv
  const int split = static_cast<int>(blockIdx.x % a.splits);
  const WindowRow w(a, row);
  if (!w.valid) return;
  const int kv = w.kv, t = w.t, b = w.b, slot = w.slot;
  const std::int64_t start = w.start, position = w.position, first = w.first;
  const std::int64_t begin = first + static_cast<std::int64_t>(split) * a.chunk;
  if (begin > position) return;  // the window of an early position is shorter: nothing to do
  const int count = static_cast<int>(position - begin + 1 < a.chunk ? position - begin + 1 : a.chunk);
  const int tid = static_cast<int>(threadIdx.x);

  float* queries = shared;                    // [group][D]
  float* scores = queries + group * D;        // [group][chunk]
  float* partial = scores + group * a.chunk;  // [parts][group][D]
  for (int e = tid; e < group * D; e += blockDim.x) {
    const int g = e / D, d = e % D;
    queries[e] = load(a.q + b * a.q_b + t * a.q_t + static_cast<std::int64_t>(kv * group + g) * a.q_h + d);
  }
  __syncthreads();

  const std::int64_t ring_row = static_cast<std::int64_t>(a.kv_heads) * D;
  const std::int64_t slot_base = (static_cast<std::int64_t>(a.layer) * a.cache_slots + slot) * a.window * ring_row +
                                 static_cast<std::int64_t>(kv) * D;
  // Position p's K (or V) row of this kv head: from the ring before the call's tokens, else from k (v).
  auto row_of = [&](const bf16_bits* ring, const bf16_bits* fresh, std::int64_t fresh_b, std::int64_t fresh_t,
                    std::int64_t fresh_h, std::int64_t p) -> const bf16_bits* {
    return p < start ? ring + slot_base + (p % a.window) * ring_row
                     : fresh + b * fresh_b + (p - start) * fresh_t + kv * fresh_h;
  };

  // Scores: a warp per position.
  const int warp = tid >> 5, lane = tid & 31, warps = static_cast<int>(blockDim.x) >> 5;
  const int per_lane = D / 32;
  for (int i = warp; i < count; i += warps) {
    const bf16_bits* key = row_of(a.ring_k, a.k, a.k_b, a.k_t, a.k_h, begin + i);
    float dots[kMaxWindowGroup];
#pragma unroll
    for (int g = 0; g < kMaxWindowGroup; ++g) dots[g] = 0.0f;
    for (int e = 0; e < per_lane; ++e) {
      const int d = lane * per_lane + e;
      const float k_d = load(key + d);
#pragma unroll
      for (int g = 0; g < kMaxWindowGroup; ++g) {
        if (g < group) dots[g] += k_d * queries[g * D + d];
      }
    }
#pragma unroll
    for (int g = 0; g < kMaxWindowGroup; ++g) {
      if (g < group) {
        const float dot = warp_sum(dots[g]);
        if (lane == 0) scores[g * a.chunk + i] = dot * a.scale;
      }
    }
  }
  __syncthreads();

  // Softmax of every query head's scores: exp(score - max) kept, with the max and the sum.
  float largest[kMaxWindowGroup], total[kMaxWindowGroup];
#pragma unroll
  for (int g = 0; g < kMaxWindowGroup; ++g) {
    largest[g] = 0.0f;
    total[g] = 1.0f;
    if (g >= group) continue;
    float* weights = scores + g * a.chunk;
    float top = -INFINITY;
    for (int i = tid; i < count; i += blockDim.x) top = fmaxf(top, weights[i]);
    top = block_max(top, scratch);
    float sum = 0.0f;
    for (int i = tid; i < count; i += blockDim.x) {
      const float weight = expf(weights[i] - top);
      weights[i] = weight;
      sum += weight;
    }
    largest[g] = top;
    total[g] = block_sum(sum, scratch);
  }
  __syncthreads();

  // P.V: thread (part, d) sums positions part, part + parts, ...
  const int parts = static_cast<int>(blockDim.x) / D;
  const int d = tid % D, part = tid / D;
  float acc[kMaxWindowGroup];
#pragma unroll
  for (int g = 0; g < kMaxWindowGroup; ++g) acc[g] = 0.0f;
#pragma unroll 4
  for (int i = part; i < count; i += parts) {
    const float v_d = load(row_of(a.ring_v, a.v, a.v_b, a.v_t, a.v_h, begin + i) + d);
#pragma unroll
    for (int g = 0; g < kMaxWindowGroup; ++g) {
      if (g < group) acc[g] += scores[g * a.chunk + i] * v_d;
    }
  }
#pragma unroll
  for (int g = 0; g < kMaxWindowGroup; ++g) {
    if (g < group) partial[(part * group + g) * D + d] = acc[g];
  }
  __syncthreads();
  if (part != 0) return;
  float* split_result = a.partials + (row * a.splits + split) * group * (D + 2);
#pragma unroll
  for (int g = 0; g < kMaxWindowGroup; ++g) {
    if (g >= group) continue;
    float sum = 0.0f;
    for (int p = 0; p < parts; ++p) sum += partial[(p * group + g) * D + d];
    if (a.splits == 1) {
      store(a.out + b * a.o_b + t * a.o_t + static_cast<std::int64_t>(kv * group + g) * a.o_h + d, sum / total[g]);
    } else {
      split_result[2 * group + g * D + d] = sum;
      if (d == 0) {
        split_result[g] = largest[g];
        split_result[group + g] = total[g];
      }
    }
  }
}

/// Merges the splits of each (sequence, token, kv head): a thread per output element.
__global__ void window_combine_kernel(const WindowAttentionArgs a) {
  const int group = a.q_heads / a.kv_heads;
  const int D = a.head_dim;
  const std::int64_t row = blockIdx.x;
  const WindowRow w(a, row);
  if (!w.valid) return;
  const int kv = w.kv, t = w.t, b = w.b;
  const int used = static_cast<int>((w.position - w.first + a.chunk) / a.chunk);  // splits that hold positions
  const int stride = group * (D + 2);
  const float* results = a.partials + row * a.splits * stride;
  for (int d = static_cast<int>(threadIdx.x); d < D; d += blockDim.x) {
    for (int g = 0; g < group; ++g) {
      float top = -INFINITY;
      for (int s = 0; s < used; ++s) top = fmaxf(top, results[s * stride + g]);
      float sum = 0.0f, value = 0.0f;
      for (int s = 0; s < used; ++s) {
        const float* split_result = results + s * stride;
        const float weight = expf(split_result[g] - top);
        sum += split_result[group + g] * weight;
        value += split_result[2 * group + g * D + d] * weight;
      }
      store(a.out + b * a.o_b + t * a.o_t + static_cast<std::int64_t>(kv * group + g) * a.o_h + d, value / sum);
    }
  }
}

/// The call's tokens first_token .. tokens-1 into the ring: one block per (sequence, token).
__global__ void window_store_kernel(const WindowAttentionArgs a, int first_token) {
  const int stored = a.tokens - first_token;
  const int b = static_cast<int>(blockIdx.x) / stored;
  const int t = first_token + static_cast<int>(blockIdx.x) % stored;
  const int slot = a.slots[b];
  const std::int64_t start = a.starts[b];
  if (slot < 0 || slot >= a.cache_slots || start < 0) return;
  const int D = a.head_dim;
  const std::int64_t ring_row = static_cast<std::int64_t>(a.kv_heads) * D;
  const std::int64_t at =
      ((static_cast<std::int64_t>(a.layer) * a.cache_slots + slot) * a.window + (start + t) % a.window) * ring_row;
  for (std::int64_t e = threadIdx.x; e < ring_row; e += blockDim.x) {
    const std::int64_t h = e / D, d = e % D;
    a.ring_k[at + e] = a.k[b * a.k_b + t * a.k_t + h * a.k_h + d];
    a.ring_v[at + e] = a.v[b * a.v_b + t * a.v_t + h * a.v_h + d];
  }
}

}  // namespace

void embed(const std::int32_t* tokens, std::int64_t rows, const bf16_bits* table, std::int64_t table_stride,
           std::int64_t vocab, std::int64_t width, float scale, bf16_bits* out, std::int64_t out_stride,
           CUstream_st* stream) {
  if (rows == 0) return;
  embed_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(tokens, table, table_stride, vocab, width,
                                                                        scale, out, out_stride);
  check_launch("embed_kernel");
}

void rms_norm(const bf16_bits* x, std::int64_t x_stride, const bf16_bits* weight, float eps, bf16_bits* out,
              std::int64_t out_stride, std::int64_t rows, std::int64_t width, CUstream_st* stream) {
  if (rows == 0) return;
  rms_norm_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(x, x_stride, weight, eps, out, out_stride,
                                                                           width);
  check_launch("rms_norm_kernel");
}

void rope(bf16_bits* x, std::int64_t rows, int heads, int head_dim, std::int64_t row_stride, std::int64_t head_stride,
          const std::int32_t* positions, float theta, CUstream_st* stream) {
  const std::int64_t total = rows * heads * (head_dim / 2);
  if (total == 0) return;
  rope_kernel<<<elementwise_blocks(total), kElementwiseThreads, 0, stream>>>(x, rows, heads, head_dim, row_stride,
                                                                             head_stride, positions, theta);
  check_launch("rope_kernel");
}

void swiglu(const bf16_bits* gate_up, std::int64_t gate_up_stride, bf16_bits* out, std::int64_t out_stride,
            std::int64_t rows, std::int64_t width, CUstream_st* stream) {
  if (rows * width == 0) return;
  swiglu_kernel<<<elementwise_blocks(rows * width), kElementwiseThreads, 0, stream>>>(gate_up, gate_up_stride, out,
                                                                                      out_stride, rows, width);
  check_launch("swiglu_kernel");
}

void add(bf16_bits* x, std::int64_t x_stride, const bf16_bits* y, std::int64_t y_stride, std::int64_t rows,
         std::int64_t width, CUstream_st* stream) {
  if (rows * width == 0) return;
  add_kernel<<<elementwise_blocks(rows * width), kElementwiseThreads, 0, stream>>>(x, x_stride, y, y_stride, rows,
                                                                                   width);
  check_launch("add_kernel");
}

namespace {

/// Dynamic shared memory of window_attention_kernel: the queries, a split's scores, the P.V parts.
std::size_t window_attention_shared_bytes(int chunk, int group, int head_dim) {
  const int parts = kWindowThreads / head_dim;
  return sizeof(float) * static_cast<std::size_t>(group) *
         (static_cast<std::size_t>(head_dim) + static_cast<std::size_t>(chunk) +
          static_cast<std::size_t>(parts) * static_cast<std::size_t>(head_dim));
}

}  // namespace

std::int64_t window_partial_floats() {
  return (2 * std::int64_t{kWindowTargetBlocks}) * kMaxWindowGroup * (256 + 2);
}

void window_attention(const WindowAttentionArgs& call, CUstream_st* stream) {
  if (call.batch == 0 || call.tokens == 0) return;
  WindowAttentionArgs args = call;
  const int group = args.q_heads / args.kv_heads;
  // Splits of the window: enough blocks to keep every SM reading (a decoding step of a few
  // sequences has few (sequence, kv head) rows), at least kWindowMinChunk positions each, within
  // the partials' room; one split (no merge) when the rows alone fill the device.
  const std::int64_t rows = static_cast<std::int64_t>(args.batch) * args.tokens * args.kv_heads;
  std::int64_t splits = 1;
  if (rows < kWindowTargetBlocks / 2) {
    splits = std::min<std::int64_t>((kWindowTargetBlocks + rows - 1) / rows,
                                    (args.window + kWindowMinChunk - 1) / kWindowMinChunk);
    splits = std::max<std::int64_t>(1, splits);
    if (rows * splits * group * (args.head_dim + 2) > args.partial_capacity) splits = 1;
  }
  args.chunk = static_cast<int>((args.window + splits - 1) / splits);
  args.splits = static_cast<int>((args.window + args.chunk - 1) / args.chunk);
  const std::size_t shared_bytes = window_attention_shared_bytes(args.chunk, group, args.head_dim);
  constexpr std::size_t kDefaultSharedLimit = 48 * 1024;
  if (shared_bytes > kDefaultSharedLimit) {
    // Above 48 KiB a kernel must opt in (a host-side attribute, not a stream operation).
    const cudaError_t status = cudaFuncSetAttribute(
        window_attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    if (status != cudaSuccess) {
      throw clsa::Error(clsa::ErrorCode::unsupported,
                        "CudaDecoderOps::window_attention: a window of " + std::to_string(args.window) +
                            " tokens needs " + std::to_string(shared_bytes) +
                            " bytes of shared memory per block: " + cudaGetErrorString(status));
    }
  }
  window_attention_kernel<<<static_cast<unsigned>(rows * args.splits), kWindowThreads, shared_bytes, stream>>>(args);
  check_launch("window_attention_kernel");
  if (args.splits > 1) {
    window_combine_kernel<<<static_cast<unsigned>(rows), args.head_dim, 0, stream>>>(args);
    check_launch("window_combine_kernel");
  }
  const int first_token = std::max(0, args.tokens - args.window);
  const std::int64_t stores = static_cast<std::int64_t>(args.batch) * (args.tokens - first_token);
  window_store_kernel<<<static_cast<unsigned>(stores), kRowThreads, 0, stream>>>(args, first_token);
  check_launch("window_store_kernel");
}

}  // namespace cuda_kernels
}  // namespace yoco
