// The CUDA decoder ops' own kernels (cuda_decoder_kernels.cu): bf16 in and out, f32 arithmetic.
// Host-side declarations only (no CUDA headers), for cuda_decoder_ops.cpp. Every launcher
// enqueues on `stream` and reports a failed launch as clsa::Error(cuda_error). Strides count
// elements; the innermost dimension of every tensor has stride 1.
#pragma once

#include <cstddef>
#include <cstdint>

struct CUstream_st;

namespace yoco {
namespace cuda_kernels {

/// Raw bf16 storage (the upper half of an IEEE binary32), as the kernels see it.
using bf16_bits = std::uint16_t;

/// out[m, :] = scale * table[tokens[m], :]; a token outside [0, vocab) gives a row of zeros (a
/// kernel cannot raise an error; the host checks tokens before they are uploaded).
void embed(const std::int32_t* tokens, std::int64_t rows, const bf16_bits* table, std::int64_t table_stride,
           std::int64_t vocab, std::int64_t width, float scale, bf16_bits* out, std::int64_t out_stride,
           CUstream_st* stream);

/// out[m, :] = x[m, :] / sqrt(mean(x[m, :]^2) + eps) * weight.
void rms_norm(const bf16_bits* x, std::int64_t x_stride, const bf16_bits* weight, float eps, bf16_bits* out,
              std::int64_t out_stride, std::int64_t rows, std::int64_t width, CUstream_st* stream);

/// In place: interleaved pairs of every head of row m rotated by positions[m] * theta^(-2i/head_dim)
/// (the angle in double, as the CPU ops compute it). x [rows, heads, head_dim] with strides
/// (row_stride, head_stride, 1).
void rope(bf16_bits* x, std::int64_t rows, int heads, int head_dim, std::int64_t row_stride, std::int64_t head_stride,
          const std::int32_t* positions, float theta, CUstream_st* stream);

/// out[m, i] = silu(gate_up[m, i]) * gate_up[m, width + i].
void swiglu(const bf16_bits* gate_up, std::int64_t gate_up_stride, bf16_bits* out, std::int64_t out_stride,
            std::int64_t rows, std::int64_t width, CUstream_st* stream);

/// x += y (each sum rounded once to bf16).
void add(bf16_bits* x, std::int64_t x_stride, const bf16_bits* y, std::int64_t y_stride, std::int64_t rows,
         std::int64_t width, CUstream_st* stream);

/// The self-decoder's sliding-window attention of one layer (DecoderOps::window_attention).
struct WindowAttentionArgs {
  const bf16_bits* q;
  std::int64_t q_b, q_t, q_h;
  const bf16_bits* k;
  std::int64_t k_b, k_t, k_h;
  const bf16_bits* v;
  std::int64_t v_b, v_t, v_h;
  bf16_bits* out;
  std::int64_t o_b, o_t, o_h;
  bf16_bits* ring_k;  // the window cache, [layers, slots, window, kv_heads, head_dim]
  bf16_bits* ring_v;
  const std::int32_t* slots;   // [batch]
  const std::int32_t* starts;  // [batch]
  int batch, tokens, q_heads, kv_heads, head_dim, window, layer, cache_slots;
  float scale;
  float* partials;                // device workspace of window_partial_floats() floats
  std::int64_t partial_capacity;  // its floats
  int splits = 1, chunk = 0;      // set by window_attention
};
/// The largest GQA group (q_heads / kv_heads) the kernel takes.
constexpr int kMaxWindowGroup = 8;
/// Floats of the workspace that window_attention's partial results need at most (a fixed size:
/// ~17 MB; the ops allocate it once).
std::int64_t window_partial_floats();
/// Attention of every query row over its window, then the store of the call's last
/// min(T, window) tokens into the ring (a later launch: the attention of the call's earlier
/// tokens still reads ring rows that those tokens replace). One block per (sequence, token, kv
/// head) and split of the window: the GQA group's query heads together, so each K/V row of the
/// window is read once per kv head (DRAM bytes of a decoding call: batch x kv_heads x
/// min(length, window) x head_dim x 2 (K, V) x 2 bytes). A call with few such rows (a decoding
/// step of a small batch) splits each window over up to window / 16 blocks so that the whole
/// device reads, and merges the splits' partial results in a second kernel; prefill chunks and
/// large batches run one block per row. A slot outside [0, cache_slots) or a negative start
/// skips the sequence (its output rows are left as they were).
void window_attention(const WindowAttentionArgs& args, CUstream_st* stream);

}  // namespace cuda_kernels
}  // namespace yoco
