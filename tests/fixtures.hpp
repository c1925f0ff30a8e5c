// Fixtures of whole decoding steps, for the suites that run steps the way an engine does
// (test_bounds, test_engine_loop): the shapes of a small cross-decoder and its configs, one step's
// random inputs with the oracle's routing of each query row, and the components an engine builds
// once. Built on support.hpp (data, caches and the oracle).
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "clsa/clsa.hpp"
#include "support.hpp"

namespace test {

/// The shapes of a small cross-decoder over a bf16 cache.
struct StepShape {
  int q_heads, kv_heads, head_dim;
  int index_heads, index_dim;
  int page_size;

  clsa::CacheConfig cache_config(std::int64_t max_pages) const {
    clsa::CacheConfig config;
    config.num_kv_heads = kv_heads;
    config.head_dim = head_dim;
    config.index_dim = index_dim;
    config.page_size = page_size;
    config.max_pages = max_pages;
    config.dtype = DType::bf16;
    return config;
  }
  /// An indexer over this shape's keys, with scale 1.
  clsa::IndexerConfig indexer_config(int top_k, int sink_tokens, int local_window) const {
    clsa::IndexerConfig config;
    config.num_heads = index_heads;
    config.index_dim = index_dim;
    config.top_k = top_k;
    config.sink_tokens = sink_tokens;
    config.local_window = local_window;
    config.scale = 1.0f;
    return config;
  }
  /// Attention with the default softmax scale (1 / sqrt(head_dim)).
  clsa::AttentionConfig attention_config() const {
    clsa::AttentionConfig config;
    config.num_q_heads = q_heads;
    config.num_kv_heads = kv_heads;
    config.head_dim = head_dim;
    return config;
  }
};

/// One step's inputs for B sequences x T query tokens and L layers: the values as stored (rounded
/// to their dtypes, row-major) for the oracle, and tensors holding them on one device. The
/// indexer's queries are small integers and its head weights integers, so every score is exact on
/// every backend and the routed sets must equal the oracle's.
struct StepInputs {
  StepShape shape{};
  int sequences = 0, tokens = 0;
  std::vector<double> q_idx, weights;  // [B, T, Hidx, Didx] (bf16), [B, T, Hidx] (f32)
  std::vector<std::vector<double>> q;  // per layer: [B, T, Hq, D] (bf16)
  clsa::Tensor q_idx_t, weights_t;
  std::vector<clsa::Tensor> q_t;

  /// The oracle's routed set of query row (b, t), whose sequence is stored as `sequence` (the
  /// step's T tokens are its last ones; token t sees all before it and itself).
  std::vector<std::int32_t> oracle_row(const SequenceData& sequence, int b, int t,
                                       const clsa::IndexerConfig& indexer) const {
    const std::size_t row = static_cast<std::size_t>(std::int64_t{b} * tokens + t);
    const std::int64_t visible = sequence.length - tokens + t + 1;
    const std::size_t heads = static_cast<std::size_t>(shape.index_heads);
    const std::vector<double> scores =
        oracle_scores(sequence, shape.index_dim, q_idx.data() + row * heads * static_cast<std::size_t>(shape.index_dim),
                      weights.data() + row * heads, shape.index_heads, visible, indexer.scale);
    return oracle_routing(scores, indexer.top_k, indexer.sink_tokens, indexer.local_window);
  }
};

/// Random inputs of one step (q_idx in [-2, 2], weights in [1, 3], queries 0.3 N(0, 1)) on `device`.
inline StepInputs random_step_inputs(const StepShape& shape, int sequences, int tokens, Rng& rng, clsa::Device device,
                                     int layers = 1) {
  StepInputs in;
  in.shape = shape;
  in.sequences = sequences;
  in.tokens = tokens;
  const std::int64_t rows = std::int64_t{sequences} * tokens;
  in.q_idx.resize(static_cast<std::size_t>(rows * shape.index_heads * shape.index_dim));
  in.weights.resize(static_cast<std::size_t>(rows * shape.index_heads));
  for (double& x : in.q_idx) x = rng.uniform(-2, 2);
  for (double& x : in.weights) x = rng.uniform(1, 3);
  const auto there = [&](const clsa::Tensor& host) { return device.is_cpu() ? host : host.to(device); };
  in.q_idx_t = there(make_host(in.q_idx, DType::bf16, {sequences, tokens, shape.index_heads, shape.index_dim}));
  in.weights_t = there(make_host(in.weights, DType::f32, {sequences, tokens, shape.index_heads}));
  for (int l = 0; l < layers; ++l) {
    std::vector<double> q(static_cast<std::size_t>(rows * shape.q_heads * shape.head_dim));
    for (double& x : q) x = round_to(DType::bf16, 0.3 * rng.normal());
    in.q_t.push_back(there(make_host(q, DType::bf16, {sequences, tokens, shape.q_heads, shape.head_dim})));
    in.q.push_back(std::move(q));
  }
  return in;
}

/// What an engine builds once: the indexer and both attentions on one backend, planned (reserve)
/// for up to `sequences` x `tokens` query rows over contexts of up to `max_length` tokens.
struct Components {
  clsa::CrossLayerIndexer indexer;
  clsa::SparseCrossAttention sparse;
  clsa::DenseCrossAttention dense;

  /// gather_from: when given, the indexer gathers the routed K/V rows of that cache once per step
  /// (gather_routed_kv).
  Components(clsa::Backend backend, const clsa::IndexerConfig& indexer_config,
             const clsa::AttentionConfig& attention_config, int sequences, int tokens, std::int64_t max_length,
             const clsa::CacheConfig* gather_from = nullptr)
      : indexer(indexer_config, backend), sparse(attention_config, backend), dense(attention_config, backend) {
    if (gather_from != nullptr) indexer.gather_routed_kv(*gather_from);
    indexer.reserve(sequences, tokens, max_length);
    sparse.reserve(sequences, tokens, indexer_config.top_k);
    dense.reserve(sequences, tokens, max_length);
  }
};

}  // namespace test
