// Cross-attention of query tokens over the shared cache: sparse over routed tokens (CLSA) or
// dense over every visible token (the YOCO baseline and the exact path).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "clsa/cache.hpp"
#include "clsa/indexer.hpp"
#include "clsa/tensor.hpp"
#include "clsa/types.hpp"

namespace clsa {

struct AttentionConfig {
  int num_q_heads = 32;        // a multiple of num_kv_heads (GQA group = num_q_heads / num_kv_heads)
  int num_kv_heads = 8;        // equal to the cache's
  int head_dim = 128;          // equal to the cache's: 64, 128 or 256
  float softmax_scale = 0.0f;  // 0 selects 1/sqrt(head_dim)
  // CUDA on sm_90+: forward() launches its kernel as a programmatic dependent of the kernel before
  // it on the stream (PDL): its CTAs are placed while that kernel drains and wait for it before
  // reading anything. Other backends and devices ignore it.
  bool enable_pdl = false;
};

/// out[b,t,h,:] = sum_p softmax_p(scale * q[b,t,h,:] . K[p, h/G, :]) * V[p, h/G, :] over the
/// routed positions p of query token (b,t). Optionally lse[b,t,h] = log sum_p exp(scale * q.K[p]).
/// One object may serve every layer (its configuration is the shape, not the weights).
class SparseCrossAttention {
 public:
  explicit SparseCrossAttention(const AttentionConfig& config, Backend backend = Backend::automatic);
  /// Whether `backend` has kernels for this configuration over f32, f16 and bf16 caches: when
  /// not, `why` (if given) receives the reason the constructor would raise as Error(unsupported).
  /// DenseCrossAttention runs on the same kernels and gives the same answers.
  static bool supports(const AttentionConfig& config, Backend backend = Backend::automatic, std::string* why = nullptr);
  /// Same over K/V of `kv_dtype` (e4m3 included): when not, `why` receives the reason that the
  /// constructor or forward() would raise as Error(unsupported). (The CUDA backend has no fp8
  /// kernels yet: e4m3 answers false there.)
  static bool supports(const AttentionConfig& config, DType kv_dtype, Backend backend = Backend::automatic,
                       std::string* why = nullptr);
  ~SparseCrossAttention();
  SparseCrossAttention(SparseCrossAttention&&) noexcept;
  SparseCrossAttention& operator=(SparseCrossAttention&&) noexcept;

  const AttentionConfig& config() const;
  Backend backend() const;
  Device device() const;

  /// Bytes of workspace forward() needs for batches up to these bounds (on device()).
  std::size_t workspace_bytes(int max_sequences, int max_tokens, int top_k) const;
  /// Plans for batches of up to `max_sequences` sequences, `max_tokens` query tokens each and
  /// routing of up to `top_k` positions per token, on the object's own workspace (allocated and
  /// zeroed here). The plan fixes the kernel variant, the split count of every batch size within
  /// the bounds and the workspace layout: calls within the bounds allocate nothing, never
  /// synchronise and give bitwise the same results as a fresh object planned with the same
  /// bounds. A forward() outside the bounds raises Error(capacity_exceeded). Without reserve()
  /// the object plans itself on its first forward() and grows as calls do.
  void reserve(int max_sequences, int max_tokens, int top_k);
  /// Same plan, on caller-provided workspace (`bytes` >= workspace_bytes() of the bounds at
  /// `data` on device(), 256-byte aligned, zeroed here, outliving its use).
  void set_workspace(void* data, std::size_t bytes, int max_sequences, int max_tokens, int top_k);
  /// q and out [B, T, num_q_heads, head_dim] of the cache's K/V dtype (over e4m3 K/V: q of f32,
  /// f16 or bf16 and out of q's dtype; K and V are dequantized with the cache's scales); lse
  /// (optional) f32 [B, T, num_q_heads]; routing from CrossLayerIndexer::select over the same
  /// batch. A query token with no routed position (an empty batch slot) gets out = 0 and lse = -inf.
  void forward(const CacheBatch& batch, const RoutingIndex& routing, const TensorView& q, const TensorView& out,
               Stream stream = {}, const TensorView& lse = {});

 private:
  struct State;
  std::unique_ptr<State> state_;
};

/// Full causal attention over the same cache: query t of a sequence of length n attends to
/// positions 0..n-T+t. Same tensors and rules as SparseCrossAttention, without routing.
class DenseCrossAttention {
 public:
  explicit DenseCrossAttention(const AttentionConfig& config, Backend backend = Backend::automatic);
  ~DenseCrossAttention();
  DenseCrossAttention(DenseCrossAttention&&) noexcept;
  DenseCrossAttention& operator=(DenseCrossAttention&&) noexcept;

  const AttentionConfig& config() const;
  Backend backend() const;
  Device device() const;

  std::size_t workspace_bytes(int max_sequences, int max_tokens, std::int64_t max_length) const;
  /// As SparseCrossAttention::reserve, with `max_length` the longest sequence instead of top_k. In
  /// a graph replay a sequence longer than max_length writes zeros for its rows and is reported
  /// (check_status()); eagerly it raises Error(capacity_exceeded) before anything runs.
  void reserve(int max_sequences, int max_tokens, std::int64_t max_length);
  void set_workspace(void* data, std::size_t bytes, int max_sequences, int max_tokens, std::int64_t max_length);
  /// Throws Error(capacity_exceeded) if a kernel launched earlier met a sequence beyond the plan
  /// (see CrossLayerIndexer::check_status), and clears that report; forward() runs it on entry.
  void check_status();

  void forward(const CacheBatch& batch, const TensorView& q, const TensorView& out, Stream stream = {},
               const TensorView& lse = {});

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace clsa
