// The decoder's shape, its random weights and the structured data it reads.
//
// The weights are random but structured the way `clsa demo`'s model is (examples/clsa/demo.cpp):
// tokens belong to topics and their embeddings keep topic similarity, and every query projection is
// a multiple of the key projection it attends through plus a random part of its own, so that
// attention (and the indexer's score) follows hidden-state similarity as in a trained model and
// concentrates on a few tokens. The data is the demo's too, as tokens: a prompt of runs of random
// topics with one "needle" run of the sequence's query topic in its middle third, continued by
// tokens of that topic. (The demo builds hidden states, not tokens, so nothing of it is shared;
// unifying the two generators is left for when demo.cpp is not being changed.)
#pragma once

#include <cstdint>
#include <vector>

#include "decoder_ops.hpp"

namespace yoco {

struct ModelShape {
  int hidden = 3072;
  int q_heads = 24;
  int kv_heads = 8;
  int head_dim = 128;
  int ffn = 8192;   // SwiGLU intermediate size
  int layers = 26;  // the first half self-decoder, the rest cross-decoder (YOCO-3B: 26)
  int vocab = 100000;
  int window = 1024;  // the self-decoder's sliding window (tokens, the query's own included)
  int index_heads = 16;
  int index_dim = 128;
  float rope_theta = 10000.0f;
  float norm_eps = 1e-5f;
  int topics = 64;  // token topics of the structured random model and data

  int self_layers() const { return layers / 2; }
  int cross_layers() const { return layers - layers / 2; }
  int q_width() const { return q_heads * head_dim; }
  int kv_width() const { return kv_heads * head_dim; }
  int qkv_width() const { return q_width() + 2 * kv_width(); }
  /// Parameters of the YOCO model (indexer included); with_standard_kv adds the standard
  /// Transformer's own K/V projections of the upper layers.
  std::int64_t parameters(bool with_standard_kv) const;

  /// The YOCO-3B-like shape (the defaults above) and a small one that runs in a second.
  static ModelShape yoco_3b() { return ModelShape{}; }
  static ModelShape small();
};

/// One layer's weights, all on the ops' device. A self-decoder layer has qkv; a cross-decoder layer
/// has q, and standard_kv when the standard Transformer is built (see ModelWeights).
struct LayerWeights {
  clsa::Tensor attention_norm;  // [hidden]
  clsa::Tensor qkv;             // self-decoder: [hidden, q_width + 2 kv_width] = [W_q | W_k | W_v]
  clsa::Tensor q;               // cross-decoder: [hidden, q_width]
  clsa::Tensor standard_kv;     // cross-decoder, standard Transformer only: [hidden, 2 kv_width]
  clsa::Tensor out;             // [q_width, hidden]
  clsa::Tensor ffn_norm;        // [hidden]
  clsa::Tensor gate_up;         // [hidden, 2 ffn] = [W_gate | W_up]
  clsa::Tensor down;            // [ffn, hidden]
};

/// The model. YOCO's cross-decoder reads K/V made once from the self-decoder's output
/// (kv_norm, kv_projection: YOCO's CrossDecoder.kv_layer_norm, k_proj, v_proj); the indexer's
/// keys come from the same normalised output (index_key), its queries from that output at the
/// query token (index_query, one head block per indexer head), its head weights are 1/index_heads.
/// The standard Transformer has no shared K/V: each upper layer projects its own K/V from its own
/// input with standard_kv, a copy of kv_projection (same values, its own memory, so the step reads
/// per-layer projections as a standard model does).
struct ModelWeights {
  ModelShape shape;
  clsa::Tensor embedding;  // [vocab, hidden], scaled by sqrt(hidden) on lookup (YOCO's embed_scale)
  std::vector<LayerWeights> layers;
  clsa::Tensor kv_norm;        // [hidden]
  clsa::Tensor kv_projection;  // [hidden, 2 kv_width] = [W_k | W_v]
  clsa::Tensor index_key;      // [hidden, index_dim]
  clsa::Tensor index_query;    // [hidden, index_heads * index_dim]
  clsa::Tensor final_norm;     // [hidden]
  clsa::Tensor lm_head;        // [hidden, vocab]
};

/// Random structured weights (seeded, the same on every backend), uploaded through `ops`.
ModelWeights make_weights(const ModelShape& shape, std::uint64_t seed, bool with_standard_kv, DecoderOps& ops);

/// One sequence's tokens: a prompt and the tokens fed after it, one per decoding step.
struct SequenceTokens {
  std::vector<std::int32_t> prompt;
  std::vector<std::int32_t> continuation;
  int query_topic = 0;
  std::int64_t needle_start = 0;  // the needle run's first prompt position
};

/// The structured data of sequence `sequence`: a prompt of `prompt_length` tokens (runs of 8..32
/// tokens of random other topics; a needle run of 16 query-topic tokens in the middle third) and
/// `continuation_length` query-topic tokens.
SequenceTokens make_sequence_tokens(const ModelShape& shape, std::int64_t prompt_length, int continuation_length,
                                    std::uint64_t seed, int sequence);

}  // namespace yoco
