// The decoder's operations apart from libclsa's components, behind one backend-neutral interface:
// matrix products, RMSNorm, RoPE, SwiGLU, the residual add, the embedding lookup, and the
// self-decoder's sliding-window attention over its own per-layer window K/V cache. The step code
// (decoder.cpp) is written once over DecoderOps and libclsa; a backend implements DecoderOps
// (cpu_decoder_ops.cpp: Eigen; a CUDA one, cuBLAS and small kernels, comes with the GPU change).
//
// Every tensor is a clsa::TensorView on the ops' device, of the ops' dtype (i32 for tokens,
// positions and slots). Matrices are row-major [rows, cols] views whose rows may be strided
// (stride(0) >= cols, stride(1) == 1): column slices of a fused projection's output are used as
// they are. Head tensors are [rows, heads, head_dim] or [B, T, heads, head_dim] views, innermost
// stride 1. Calls are enqueued on stream() in order (the CPU runs them before returning).
#pragma once

#include <cstddef>
#include <cstdint>

#include "clsa/clsa.hpp"

namespace yoco {

/// The self-decoder's window K/V cache: for every self-decoder layer and decoder slot a ring of
/// `window` token rows, position p at ring row p % window. k and v are
/// [layers, slots, window, kv_heads, head_dim] tensors on the ops' device. Nothing else reads it.
struct WindowKvCache {
  int layers = 0;
  int slots = 0;
  int window = 0;
  int kv_heads = 0;
  int head_dim = 0;
  clsa::Tensor k, v;

  /// K and V bytes of one slot over all layers (what one sequence holds, whatever its length).
  std::size_t bytes_per_slot() const {
    return static_cast<std::size_t>(layers) * static_cast<std::size_t>(window) * 2 *
           static_cast<std::size_t>(kv_heads) * static_cast<std::size_t>(head_dim) * clsa::dtype_size(k.view().dtype());
  }
};

class DecoderOps {
 public:
  virtual ~DecoderOps() = default;
  DecoderOps() = default;
  DecoderOps(const DecoderOps&) = delete;
  DecoderOps& operator=(const DecoderOps&) = delete;

  virtual clsa::Backend backend() const = 0;
  virtual clsa::Device device() const = 0;
  /// The dtype of weights, activations and K/V (so also of the libclsa caches the decoder builds).
  virtual clsa::DType dtype() const = 0;
  /// The stream that libclsa's calls of the step go on (in order with these ops).
  virtual clsa::Stream stream() const = 0;

  /// A new tensor on device() (contents undefined).
  clsa::Tensor allocate(std::initializer_list<std::int64_t> shape, clsa::DType dtype) const {
    return clsa::Tensor::empty(shape, dtype, device());
  }
  /// A window cache for `layers` layers and `slots` sequences, of dtype().
  WindowKvCache allocate_window_cache(int layers, int slots, int window, int kv_heads, int head_dim) const;

  /// target := values (target.numel() floats, converted to target's dtype); target contiguous.
  virtual void upload(const clsa::TensorView& target, const float* values) = 0;
  /// target := values (i32, target.numel() of them); target contiguous.
  virtual void upload(const clsa::TensorView& target, const std::int32_t* values) = 0;
  /// values := source as f32 (source.numel() of them, row by row), once everything enqueued
  /// before has run. source is a matrix view.
  virtual void download(const clsa::TensorView& source, float* values) = 0;

  /// out[m, :] = scale * table[tokens[m], :]. tokens i32 [M], table [vocab, H], out [M, H].
  virtual void embed(const clsa::TensorView& tokens, const clsa::TensorView& table, float scale,
                     const clsa::TensorView& out) = 0;
  /// out = x * w. x [M, K], w [K, N], out [M, N] (out may not overlap x).
  virtual void matmul(const clsa::TensorView& x, const clsa::TensorView& w, const clsa::TensorView& out) = 0;
  /// out[m, :] = x[m, :] / sqrt(mean(x[m, :]^2) + eps) * weight. x, out [M, N], weight [N].
  virtual void rms_norm(const clsa::TensorView& x, const clsa::TensorView& weight, float eps,
                        const clsa::TensorView& out) = 0;
  /// In place, the rotary embedding of row m at position positions[m], interleaved pairs (2i, 2i+1)
  /// rotated by positions[m] * theta^(-2i / head_dim). x [M, heads, head_dim], positions i32 [M].
  virtual void rope(const clsa::TensorView& x, const clsa::TensorView& positions, float theta) = 0;
  /// out = silu(gate) * up, gate_up [M, 2F] = [gate | up], out [M, F].
  virtual void swiglu(const clsa::TensorView& gate_up, const clsa::TensorView& out) = 0;
  /// x += y: the residual add. x, y [M, N].
  virtual void add(const clsa::TensorView& x, const clsa::TensorView& y) = 0;
  /// target := source, matrices of one shape (the decoder's self-check tap; not in the step).
  virtual void copy(const clsa::TensorView& source, const clsa::TensorView& target) = 0;
  /// target := 0 (every byte), a contiguous tensor of any dtype (set-up: the window cache).
  virtual void fill_zero(const clsa::TensorView& target) = 0;
  /// Sliding-window causal attention of one self-decoder layer over its window cache. Sequence b
  /// of the call sits in decoder slot slots[b] and its T query tokens at positions starts[b] ..
  /// starts[b] + T - 1; query position p attends to positions max(0, p - window + 1) .. p: those
  /// before starts[b] from the slot's ring, the others from k and v (the call's own tokens,
  /// already rotated). Then the last min(T, window) tokens' K/V are written into the ring.
  /// q, out [B, T, q_heads, head_dim]; k, v [B, T, kv_heads, head_dim]; slots, starts i32 [B].
  /// GQA: query head h reads kv head h / (q_heads / kv_heads); softmax scale 1/sqrt(head_dim).
  virtual void window_attention(WindowKvCache& cache, int layer, const clsa::TensorView& slots,
                                const clsa::TensorView& starts, const clsa::TensorView& q, const clsa::TensorView& k,
                                const clsa::TensorView& v, const clsa::TensorView& out) = 0;
};

/// Checks operand `name` of `ops`::`op`: defined, on `device`, of `dtype`, of rank `rank` with
/// innermost stride 1; else Error naming them and the view.
void check_operand(const char* ops, const char* op, const char* name, const clsa::TensorView& view, int rank,
                   clsa::DType dtype, clsa::Device device);
/// Checks that dimension `dim` of operand `name` of `ops`::`op` is `expected`.
void check_extent(const char* ops, const char* op, const char* name, const clsa::TensorView& view, int dim,
                  std::int64_t expected);
/// The checks of window_attention's operands that need no device data, for every backend: ranks,
/// dtypes (cache, q, k, v and out of `dtype`; slots and starts i32), devices, extents, the layer
/// and the GQA grouping. (Slots and start positions are values on the device; each backend checks
/// them where it reads them.)
void check_window_attention(const char* ops, const WindowKvCache& cache, int layer, const clsa::TensorView& slots,
                            const clsa::TensorView& starts, const clsa::TensorView& q, const clsa::TensorView& k,
                            const clsa::TensorView& v, const clsa::TensorView& out, clsa::DType dtype,
                            clsa::Device device);

/// Rows [first, first + count) of a matrix view.
clsa::TensorView rows_of(const clsa::TensorView& matrix, std::int64_t first, std::int64_t count);
/// Columns [first, first + count) of a matrix view (its row stride kept).
clsa::TensorView columns_of(const clsa::TensorView& matrix, std::int64_t first, std::int64_t count);
/// A matrix view [B * T, heads * head_dim] (row-strided) as [B, T, heads, head_dim].
clsa::TensorView as_heads(const clsa::TensorView& matrix, std::int64_t batch, std::int64_t tokens, int heads,
                          int head_dim);
/// A matrix view [M, heads * head_dim] as [M, heads, head_dim].
clsa::TensorView as_row_heads(const clsa::TensorView& matrix, int heads, int head_dim);
/// Elements [first, first + count) of a contiguous tensor, as a 1-D view.
clsa::TensorView elements_of(const clsa::TensorView& tensor, std::int64_t first, std::int64_t count);

}  // namespace yoco
