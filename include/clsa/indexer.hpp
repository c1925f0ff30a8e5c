// CrossLayerIndexer: one lightning-indexer pass and one top-k per decoding step; the RoutingIndex
// it returns is reused by every cross-decoder layer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "clsa/cache.hpp"
#include "clsa/tensor.hpp"
#include "clsa/types.hpp"

namespace clsa {

struct IndexerConfig {
  int num_heads = 16;    // H_idx
  int index_dim = 128;   // D_idx, equal to the cache's index_dim
  int top_k = 2048;      // tokens routed per query token (fewer when fewer are visible)
  int sink_tokens = 0;   // the first positions, always routed (counted inside top_k)
  int local_window = 0;  // the most recent visible positions, always routed (inside top_k)
  float scale = 1.0f;    // > 0; score = scale * sum_h w[h] * ReLU(q_idx[h] . k_idx[s])
  // CUDA on sm_90+: select() launches its first kernel as a programmatic dependent of the kernel
  // before it on the stream (PDL): its CTAs are placed while that kernel drains and wait for it
  // before reading anything. Other backends and devices ignore it.
  bool enable_pdl = false;
};

/// The routed tokens of every query token of a batch: positions [B, T, top_k] (int32; row (b,t)
/// holds counts[b,t] distinct positions in ascending order, then -1) and counts [B, T] (int32).
/// Both on the indexer's device. The same inputs give the same index on every backend and run.
///
/// slots (optional, [B, T, top_k] int32 like positions): where each routed position lives in the
/// cache pool, page * page_size + offset in the page, resolved through the batch's page table when
/// select() ran. select() fills it (when the caller's `out` has it); SparseCrossAttention then reads
/// K and V there without a page-table lookup per layer. It stays valid while the routed tokens
/// keep their pages (appends never move a token; an engine that remaps the pages of a wrapped pool
/// selects again). An index the caller builds may leave it undefined: forward() then looks the
/// pages up itself. Entries past counts[b,t] are unspecified.
///
/// kv (optional, contiguous [B, T, 2, Hkv, top_k, head_dim] of the cache's K/V dtype; e4m3 rows
/// as stored, their scales in the cache's layout): the routed
/// tokens' K (kv[b,t,0]) and V (kv[b,t,1]) rows copied out of the pool, row i holding routed
/// position i. select() fills it when asked (gather_routed_kv(), or an `out` that has it); every
/// SparseCrossAttention::forward() over this index then reads K and V there, contiguously, instead
/// of gathering the same rows from the pool once per layer. It is a copy: valid until the next
/// select() into it (appends and compactions do not reach it). Rows past counts[b,t] are
/// unspecified, and the CUDA kernels read (and discard) some of them ahead of the count, so a
/// caller-owned kv must be initialised memory (zero it once).
struct RoutingIndex {
  TensorView positions;
  TensorView counts;
  int top_k = 0;
  TensorView slots{};  // after top_k, so that RoutingIndex{positions, counts, top_k} leaves it undefined
  TensorView kv{};

  bool defined() const { return positions.defined(); }
  int num_sequences() const { return static_cast<int>(positions.size(0)); }
  int tokens() const { return static_cast<int>(positions.size(1)); }
};

/// Keeps the routed K/V blocks (RoutingIndex::kv) of every select() and forward() on `device` in
/// the L2 cache between layers, as persisting lines in a carve-out of up to `bytes` (the device's
/// persisting-L2 limit, a device-wide setting: this replaces whatever limit was set there, and the
/// rest of the program has that much less L2). Blocks larger than the carve-out keep a part of
/// their lines. 0 turns it off and releases the persisting lines. Returns the bytes granted (at
/// most the device's maximum); 0 on the CPU. Takes effect for launches made (or graphs captured)
/// after the call. Worth it for small batches whose block fits: the layers then read it from L2.
std::size_t keep_routed_kv_in_l2(Device device, std::size_t bytes);

/// Scores every visible cached token for every query token and keeps the top_k:
///   score[b,t,s] = scale * sum_h w[b,t,h] * ReLU(q_idx[b,t,h,:] . k_idx[b,s,:])
/// Query t of a sequence of length n sits at position n-T+t and sees positions 0..n-T+t. The
/// sink_tokens first and local_window last visible positions are always routed; the rest are the
/// highest scores, ties to the lower position, NaN below every finite score and -inf.
class CrossLayerIndexer {
 public:
  explicit CrossLayerIndexer(const IndexerConfig& config, Backend backend = Backend::automatic);
  /// Whether `backend` (resolved as the constructor would) has kernels for this configuration
  /// over indexer keys of `cache_dtype` (CacheConfig::index_key_dtype(): the cache's dtype unless
  /// index_dtype is set; what CUTLASS calls can_implement): when not, `why` (if given) receives
  /// the reason that select() would raise as Error(unsupported). Invalid configurations (the
  /// constructor's invalid_argument) are a separate question. (The CUDA backend has no fp8
  /// kernels yet: e4m3 answers false there.)
  static bool supports(const IndexerConfig& config, DType cache_dtype, Backend backend = Backend::automatic,
                       std::string* why = nullptr);
  ~CrossLayerIndexer();
  CrossLayerIndexer(CrossLayerIndexer&&) noexcept;
  CrossLayerIndexer& operator=(CrossLayerIndexer&&) noexcept;

  const IndexerConfig& config() const;
  Backend backend() const;
  Device device() const;

  /// Bytes of workspace that select() needs for batches up to these bounds (on device(); it
  /// holds the RoutingIndex that select() returns and the backend's scratch).
  std::size_t workspace_bytes(int max_sequences, int max_tokens, std::int64_t max_length) const;
  /// Plans for batches of up to `max_sequences` sequences, `max_tokens` query tokens each and
  /// sequences of up to `max_length` tokens, on the indexer's own workspace (allocated and zeroed
  /// here). The plan fixes grids and the workspace layout: every later select() within the bounds
  /// allocates nothing, never synchronises and launches the same grids, so a step captured in a
  /// CUDA graph stays valid while contexts grow up to max_length. A select() outside the bounds
  /// raises Error(capacity_exceeded); in a graph replay (no host checks) a sequence longer than
  /// max_length routes nothing for its query rows and is reported (check_status()).
  /// Without reserve() the indexer plans itself on its first select() and grows as calls do.
  void reserve(int max_sequences, int max_tokens, std::int64_t max_length);
  /// Same plan, on caller-provided workspace: `bytes` (>= workspace_bytes() of the bounds) at
  /// `data` on device(), 256-byte aligned, zeroed here, outliving the indexer's use.
  void set_workspace(void* data, std::size_t bytes, int max_sequences, int max_tokens, std::int64_t max_length);
  /// Throws Error(capacity_exceeded) if a kernel launched earlier (a CUDA-graph replay, say) met a
  /// sequence beyond the plan, and clears that report. Reliable once the stream work that may
  /// have reported is done; select() runs it on entry. Nothing to report on the CPU backend,
  /// whose calls check every length before they run.
  void check_status();

  /// q_idx [B, T, num_heads, index_dim] of the indexer keys' dtype (over e4m3 keys: f32, f16 or
  /// bf16, not quantized); head_weights [B, T, num_heads] of f32, f16 or bf16. e4m3 keys score as
  /// their values times their per-token scale. The returned index lives in this indexer and stays valid until its next
  /// select(); it is computed once per step and passed to every layer. A sequence of length 0
  /// (an empty batch slot) routes nothing: counts 0, positions -1.
  RoutingIndex select(const CacheBatch& batch, const TensorView& q_idx, const TensorView& head_weights,
                      Stream stream = {});
  /// Same, into caller-owned tensors (positions int32 [B, T, top_k], counts int32 [B, T], and
  /// slots int32 [B, T, top_k] when out.slots is defined; a pool of more than 2^31 token slots
  /// refuses out.slots with Error(invalid_argument); kv, contiguous [B, T, 2, Hkv, top_k,
  /// head_dim] of the cache's K/V dtype, when out.kv is defined).
  void select(const CacheBatch& batch, const TensorView& q_idx, const TensorView& head_weights, const RoutingIndex& out,
              Stream stream = {});

  /// Opt-in for decoding steps: the index that select() returns also carries `kv`, the routed
  /// tokens' K and V rows gathered once per step (RoutingIndex::kv), and every layer reads those
  /// contiguously. The block lives in this indexer's workspace: 2 x Hkv x top_k x head_dim x
  /// element bytes per query row of the plan (8 MiB per row for Hkv 8, top_k 2048, head_dim 128,
  /// bf16). `cache` gives Hkv, head_dim and the dtype; a select() over a cache of another geometry
  /// raises Error(shape_mismatch). Re-plans the workspace (set-up time, like reserve()); false
  /// turns it off. Error(unsupported) where the backend cannot gather such rows.
  void gather_routed_kv(const CacheConfig& cache, bool enabled = true);
  /// Whether gather_routed_kv() is on.
  bool gathers_routed_kv() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace clsa
