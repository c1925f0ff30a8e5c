// One decoder of the model (model.hpp) wired as one of three variants, with its caches and
// buffers; the step code, written once over DecoderOps and libclsa's components.
//
// Every variant runs the same layers with the same weights: RMSNorm, projections, RoPE,
// attention, output projection, residual add, RMSNorm, SwiGLU feed-forward, residual add; then
// the final RMSNorm and the logits. They differ only in where attention reads its K/V:
//
// - clsa: YOCO. The self-decoder (the first half of the layers) attends over a sliding window of
//   its own per-layer window cache (DecoderOps::window_attention). Its output, normalised, is
//   projected once per token into ONE SharedKVCache (K, V and an indexer key). Each step one
//   CrossLayerIndexer::select routes every query token to its top_k cached tokens and every
//   cross-decoder layer (the second half) runs SparseCrossAttention over that routing.
// - yoco_dense: the same YOCO wiring, the cross-decoder layers running DenseCrossAttention over
//   every cached token of the shared cache (no indexer).
// - standard: a standard Transformer made of the same layers: every layer attends densely over a
//   K/V cache of its own (one SharedKVCache per layer, DenseCrossAttention), the self-decoder
//   layers with their own K/V projections and no window, the upper layers with their own K/V
//   projection of their own input (ModelWeights::standard_kv, equal to YOCO's shared one). It is a
//   differently wired model: its outputs are not compared with YOCO's, only its time and memory.
//
// Prefill (join): the prompt runs through in chunks. YOCO runs the self-decoder over every prompt
// token and appends the shared K/V once; the cross-decoder then runs for the last prompt token only.
// The standard Transformer runs every layer over every prompt token. Decoding (step): one token
// per sequence, the whole model, for a batch of any live sequences (they join and leave freely).
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "clsa/clsa.hpp"
#include "cuda_support.hpp"
#include "decoder_ops.hpp"
#include "model.hpp"

namespace yoco {

enum class Variant { clsa, yoco_dense, standard };

/// "clsa", "yoco_dense" or "standard".
const char* variant_name(Variant variant);

struct DecoderLimits {
  int max_batch = 8;            // sequences decoded together (decoder slots)
  std::int64_t max_length = 0;  // longest sequence, prompt and decoded tokens
  int prefill_chunk = 512;      // prompt tokens per prefill pass
  /// Decoding steps replay CUDA graphs (ops on a CUDA stream only): the step's device work between
  /// its host-side library calls (SharedKVCache::append and the batch's table refill, which
  /// libclsa's API makes host calls) is captured once per batch size and section and replayed.
  /// YOCO variants: two sections a step (embedding .. shared K/V projection | indexer ..
  /// logits, the appends and the refill between them); the standard Transformer: layers + 1
  /// (its per-layer appends between them). Prefill passes run eagerly.
  bool graphs = false;
};

/// The CLSA variant's routing (the CrossLayerIndexer's configuration).
struct RoutingOptions {
  int top_k = 2048;
  int sink_tokens = 4;  // clamped so that sinks + local window <= top_k
  int local_window = 64;
  bool enable_pdl = false;  // the indexer's and attentions' kernels launch as programmatic dependents (CUDA sm_90+)
};

/// The K/V memory a decoder holds for its live sequences.
struct KvMemory {
  int sequences = 0;
  /// Tokens held in the variant's libclsa cache(s), every layer's cache counted (MemoryStats::tokens).
  std::int64_t cached_tokens = 0;
  /// Bytes of them that the variant uses: clsa K+V+indexer key once per token; yoco_dense K+V once
  /// per token; standard K+V once per token and layer.
  std::size_t cache_bytes = 0;
  /// The same per token of one sequence (the growth of a sequence's memory with its length).
  std::size_t bytes_per_token = 0;
  /// The self-decoder's window cache (YOCO variants; 0 for standard): bytes per token of one
  /// sequence over all self-decoder layers, and the tokens it keeps (the window): a sequence holds
  /// min(length, window) of them (its ring is allocated for `window`).
  std::size_t window_bytes_per_token = 0;
  int window = 0;
  /// What one sequence of `length` tokens holds.
  std::size_t bytes_per_sequence(std::int64_t length) const {
    return static_cast<std::size_t>(length) * bytes_per_token +
           static_cast<std::size_t>(std::min<std::int64_t>(length, window)) * window_bytes_per_token;
  }
};

class Decoder {
 public:
  Decoder(Variant variant, const ModelWeights& weights, DecoderOps& ops, const DecoderLimits& limits,
          const RoutingOptions& routing);
  ~Decoder();
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  Variant variant() const { return variant_; }
  const DecoderLimits& limits() const { return limits_; }

  /// Adds a sequence in a free slot and prefills its prompt; the logits of its last prompt token
  /// are then logits(1). Returns the slot.
  int join(const std::vector<std::int32_t>& prompt);
  /// The benchmark's join: a sequence whose cache holds `length` tokens of synthetic K/V (and
  /// indexer keys), appended in chunks without running the model, and whose window ring is left as
  /// it is (zeros for a fresh decoder). What a prefill of `length` tokens leaves, as far as a
  /// decoding step's time goes: the step reads every cached token whatever its values. Returns the
  /// slot; its logits are undefined until its first step.
  int join_synthetic(std::int64_t length);
  /// Releases the sequence in `slot` (its cache pages and its slot).
  void leave(int slot);
  /// One decoding step: the sequence in slots[b] is fed tokens[b]; logits(B) row b is its next-token
  /// logits. Allocates nothing once every batch size has run once.
  void step(const std::vector<int>& slots, const std::vector<std::int32_t>& tokens);

  /// The logits of the last join (rows 1) or step (rows B): [rows, vocab] on the ops' device.
  clsa::TensorView logits(int rows) const;
  std::int64_t length(int slot) const;
  KvMemory memory() const;

  /// Graphs captured so far and replays (DecoderLimits::graphs).
  int graphs_captured() const { return static_cast<int>(graphs_.size()); }
  std::int64_t graph_replays() const { return graph_replays_; }
  /// Raises Error(capacity_exceeded) when a replayed step met a sequence beyond the libclsa
  /// components' plans (their check_status()); call it once the stream's work is done.
  void check_status();

  /// The self-check tap: when on, every pass copies the hidden state of its output rows after the
  /// first half of the layers (the self-decoder's output) to self_decoder_output(rows).
  void tap_self_decoder_output(bool enabled) { tap_ = enabled; }
  clsa::TensorView self_decoder_output(int rows) const;

 private:
  enum class Attention { window, own_cache, shared_sparse, shared_dense };
  /// The sequences of one pass: `batch` sequences in slots `slots`, `tokens` tokens each; host_tokens_
  /// and host_positions_ hold them.
  struct Pass {
    int batch;
    int tokens;
    const int* slots;
    bool last;  // decode, or a prompt's last chunk: the pass ends in logits
  };

  void run_pass(const Pass& pass);
  /// Device work of the pass between two host-side calls: run now, or (a decoding step with
  /// graphs on) replayed from the graph captured for (batch, section) -- captured on first use.
  /// `enqueue` must only enqueue device work (ops and libclsa's select/forward).
  template <class Enqueue>
  void run_section(const Pass& pass, int section, Enqueue&& enqueue);
  /// The first half of layer `layer` over the rows x [batch * tokens, hidden]: pre-norm, its
  /// projections (q, and k and v where the layer attends over K/V of its own), RoPE.
  void project(int layer, Attention attention, const clsa::TensorView& x, const Pass& pass,
               const clsa::TensorView& positions);
  /// The second half: attention, output projection, residual, feed-forward block, residual.
  void attend(int layer, Attention attention, const clsa::TensorView& x, const Pass& pass);
  /// YOCO: the shared cache's K/V (and the CLSA indexer keys) of the pass's rows (device work).
  void project_shared(const clsa::TensorView& x, const Pass& pass, const clsa::TensorView& positions);
  /// YOCO: those rows appended once to the shared cache (host calls).
  void append_shared(const Pass& pass);
  /// Standard: layer `layer`'s K/V rows (left in qkv_ by project) appended to its cache, and its
  /// batch refilled (host calls).
  void append_own(int layer, const Pass& pass);
  void fill_batch(const Pass& pass, int layer);

  Variant variant_;
  const ModelWeights& weights_;
  const ModelShape& shape_;
  DecoderOps& ops_;
  DecoderLimits limits_;
  int max_rows_;
  bool tap_ = false;

  std::unique_ptr<clsa::SharedKVCache> shared_cache_;  // YOCO variants
  std::vector<clsa::SharedKVCache> layer_caches_;      // standard: one per layer
  std::unique_ptr<clsa::CrossLayerIndexer> indexer_;   // clsa
  std::unique_ptr<clsa::SparseCrossAttention> sparse_;
  std::unique_ptr<clsa::DenseCrossAttention> dense_;
  clsa::CacheBatch shared_batch_;
  std::vector<clsa::CacheBatch> layer_batches_;
  clsa::RoutingIndex routing_;
  WindowKvCache window_cache_;

  struct Slot {
    bool live = false;
    std::int64_t length = 0;
    clsa::SequenceId shared = clsa::empty_slot;
    std::vector<clsa::SequenceId> per_layer;
  };
  std::vector<Slot> slots_;

  // Device buffers, sized once for the largest pass (rows = max(max_batch, prefill_chunk)).
  clsa::Tensor x_, normed_, qkv_, attention_, branch_, gate_up_, ffn_, shared_kv_, index_keys_, index_queries_,
      head_weights_, unused_index_keys_, logits_, self_output_;
  clsa::Tensor tokens_, positions_, window_slots_, window_starts_;  // i32
  // Host staging of the pass's tokens, positions, window slots and starts; the batch's sequence ids.
  std::vector<std::int32_t> host_tokens_, host_positions_, host_slots_, host_starts_;
  std::vector<clsa::SequenceId> batch_ids_;
  // join_synthetic's rows: [rows, 2 kv_width + index width], allocated on first use.
  clsa::Tensor synthetic_;

  // The captured sections of decoding steps, by (batch size, section).
  std::map<std::pair<int, int>, cuda_support::CapturedGraph> graphs_;
  std::int64_t graph_replays_ = 0;
};

}  // namespace yoco
