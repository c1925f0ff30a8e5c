#include "model.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

namespace yoco {

namespace {

// How the random weights are structured (see model.hpp).
constexpr float kEmbeddingTopicShare = 0.8f;  // an embedding row: 0.8 topic direction + 0.6 its own (unit norm)
constexpr float kEmbeddingOwnShare = 0.6f;
// W_q head = a * W_k of its kv head + a random part, with a such that a token's query scores its own
// key (before RoPE) ~16 logits up, a key of its topic ~10 and an unrelated one ~N(0, a^2): attention
// as concentrated as a trained model's (the demo's model is sharper still). With a 2x smaller the
// attention mass spreads over unrelated tokens and no top-k captures it (README.md).
constexpr float kSameTokenLogit = 16.0f;
constexpr float kQueryOwnShare = 0.5f;  // the random part's scale against W_k's
constexpr float kIndexQueryOwnShare = 0.5f;
constexpr float kResidualBranchGain = 0.5f;  // W_out and W_down: updates smaller than the stream

/// splitmix64: a counter-based generator, so every weight tensor has its own reproducible stream.
class Random {
 public:
  explicit Random(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, 1).
  float uniform() { return static_cast<float>(next() >> 40) * (1.0f / 16777216.0f); }
  /// Zero mean, standard deviation `stddev` (uniform: the distribution does not matter here).
  float centered(float stddev) { return (2.0f * uniform() - 1.0f) * 1.7320508f * stddev; }
  std::int64_t below(std::int64_t bound) {
    return static_cast<std::int64_t>(next() % static_cast<std::uint64_t>(bound));
  }

 private:
  std::uint64_t state_;
};

std::uint64_t stream_seed(std::uint64_t seed, std::uint64_t tensor) {
  Random mix(seed * 0x100000001b3ull + tensor);
  return mix.next();
}

/// A host matrix [rows, cols], row-major.
struct HostMatrix {
  std::int64_t rows, cols;
  std::vector<float> values;
  HostMatrix(std::int64_t r, std::int64_t c) : rows(r), cols(c), values(static_cast<std::size_t>(r * c)) {}
  float& at(std::int64_t r, std::int64_t c) { return values[static_cast<std::size_t>(r * cols + c)]; }
  void fill(Random& random, float stddev) {
    for (float& x : values) x = random.centered(stddev);
  }
};

clsa::Tensor upload_matrix(DecoderOps& ops, const HostMatrix& m) {
  clsa::Tensor tensor = ops.allocate({m.rows, m.cols}, ops.dtype());
  ops.upload(tensor.view(), m.values.data());
  return tensor;
}

/// An RMSNorm gain: 1 with a little noise.
clsa::Tensor norm_gain(DecoderOps& ops, const ModelShape& shape, Random random) {
  std::vector<float> gain(static_cast<std::size_t>(shape.hidden));
  for (float& g : gain) g = 1.0f + random.centered(0.05f);
  clsa::Tensor tensor = ops.allocate({shape.hidden}, ops.dtype());
  ops.upload(tensor.view(), gain.data());
  return tensor;
}

/// Query columns [first, first + q_width) of `m` := alignment * the key columns at key_first
/// of each head's kv head + a random part.
void align_queries(HostMatrix& m, std::int64_t first, const HostMatrix& keys, std::int64_t key_first,
                   const ModelShape& shape, Random& random) {
  const int group = shape.q_heads / shape.kv_heads;
  const float alignment = kSameTokenLogit / std::sqrt(static_cast<float>(shape.head_dim));
  const float own = kQueryOwnShare / std::sqrt(static_cast<float>(shape.hidden));
  for (std::int64_t r = 0; r < m.rows; ++r) {
    for (int h = 0; h < shape.q_heads; ++h) {
      for (int d = 0; d < shape.head_dim; ++d) {
        const float key =
            keys.values[static_cast<std::size_t>(r * keys.cols + key_first + (h / group) * shape.head_dim + d)];
        m.at(r, first + h * shape.head_dim + d) = alignment * key + random.centered(own);
      }
    }
  }
}

/// A layer's output projection and feed-forward network (shared by both layer kinds).
void make_layer_tail(LayerWeights& layer, const ModelShape& shape, std::uint64_t seed, std::uint64_t id,
                     DecoderOps& ops) {
  Random random(stream_seed(seed, id));
  HostMatrix out(shape.q_width(), shape.hidden);
  out.fill(random, kResidualBranchGain / std::sqrt(static_cast<float>(shape.q_width())));
  layer.out = upload_matrix(ops, out);
  layer.ffn_norm = norm_gain(ops, shape, Random(stream_seed(seed, id + 1)));
  HostMatrix gate_up(shape.hidden, 2 * std::int64_t{shape.ffn});
  gate_up.fill(random, 1.0f / std::sqrt(static_cast<float>(shape.hidden)));
  layer.gate_up = upload_matrix(ops, gate_up);
  HostMatrix down(shape.ffn, shape.hidden);
  down.fill(random, kResidualBranchGain / std::sqrt(static_cast<float>(shape.ffn)));
  layer.down = upload_matrix(ops, down);
}

/// Unit-norm random direction in `values` (size n).
void unit_direction(Random& random, float* values, int n) {
  double norm = 0.0;
  for (int i = 0; i < n; ++i) {
    values[i] = random.centered(1.0f);
    norm += static_cast<double>(values[i]) * values[i];
  }
  const float inverse = static_cast<float>(1.0 / std::sqrt(norm));
  for (int i = 0; i < n; ++i) values[i] *= inverse;
}

}  // namespace

ModelShape ModelShape::small() {
  ModelShape shape;
  shape.hidden = 256;
  shape.q_heads = 4;
  shape.kv_heads = 2;
  shape.head_dim = 64;
  shape.ffn = 512;
  shape.layers = 4;
  shape.vocab = 1024;
  shape.window = 64;
  shape.index_heads = 4;
  shape.index_dim = 64;
  shape.topics = 16;
  return shape;
}

std::int64_t ModelShape::parameters(bool with_standard_kv) const {
  const std::int64_t h = hidden;
  const std::int64_t ffn_and_norms = 3 * h * ffn + 2 * h;
  const std::int64_t self_layer = h * qkv_width() + std::int64_t{q_width()} * h + ffn_and_norms;
  const std::int64_t cross_layer = 2 * h * q_width() + ffn_and_norms;
  const std::int64_t shared_kv = h + h * 2 * kv_width();
  const std::int64_t indexer = h * index_dim + h * std::int64_t{index_heads} * index_dim;
  const std::int64_t embeddings = 2 * std::int64_t{vocab} * h + h;
  return self_layers() * self_layer + cross_layers() * cross_layer + shared_kv + indexer + embeddings +
         (with_standard_kv ? cross_layers() * h * 2 * kv_width() : 0);
}

ModelWeights make_weights(const ModelShape& shape, std::uint64_t seed, bool with_standard_kv, DecoderOps& ops) {
  if (shape.layers < 2 || shape.q_heads % shape.kv_heads != 0 || shape.vocab < shape.topics || shape.topics < 2) {
    throw clsa::Error(clsa::ErrorCode::invalid_argument,
                      "make_weights: need layers >= 2, q_heads a multiple of kv_heads and vocab >= topics >= 2");
  }
  ModelWeights weights;
  weights.shape = shape;
  const float unit = 1.0f / std::sqrt(static_cast<float>(shape.hidden));  // keeps a unit-RMS input's outputs ~1
  std::uint64_t id = 0;

  {  // embedding: topic direction + the token's own direction, unit norm
    Random random(stream_seed(seed, id++));
    HostMatrix topic_directions(shape.topics, shape.hidden);
    for (int t = 0; t < shape.topics; ++t) unit_direction(random, &topic_directions.at(t, 0), shape.hidden);
    HostMatrix embedding(shape.vocab, shape.hidden);
    std::vector<float> own(static_cast<std::size_t>(shape.hidden));
    for (int v = 0; v < shape.vocab; ++v) {
      unit_direction(random, own.data(), shape.hidden);
      const float* topic = &topic_directions.at(v % shape.topics, 0);
      for (int i = 0; i < shape.hidden; ++i) {
        embedding.at(v, i) = kEmbeddingTopicShare * topic[i] + kEmbeddingOwnShare * own[static_cast<std::size_t>(i)];
      }
    }
    weights.embedding = upload_matrix(ops, embedding);
  }

  HostMatrix kv_projection(shape.hidden, 2 * std::int64_t{shape.kv_width()});
  {
    Random random(stream_seed(seed, id++));
    kv_projection.fill(random, unit);
  }
  for (int l = 0; l < shape.layers; ++l) {
    LayerWeights layer;
    layer.attention_norm = norm_gain(ops, shape, Random(stream_seed(seed, id++)));
    Random random(stream_seed(seed, id++));
    if (l < shape.self_layers()) {
      HostMatrix qkv(shape.hidden, shape.qkv_width());
      qkv.fill(random, unit);  // K and V columns; the Q columns are replaced below
      align_queries(qkv, 0, qkv, shape.q_width(), shape, random);
      layer.qkv = upload_matrix(ops, qkv);
    } else {
      HostMatrix q(shape.hidden, shape.q_width());
      align_queries(q, 0, kv_projection, 0, shape, random);
      layer.q = upload_matrix(ops, q);
      if (with_standard_kv) layer.standard_kv = upload_matrix(ops, kv_projection);
    }
    make_layer_tail(layer, shape, seed, id, ops);
    id += 2;
    weights.layers.push_back(std::move(layer));
  }

  weights.kv_norm = norm_gain(ops, shape, Random(stream_seed(seed, id++)));
  weights.kv_projection = upload_matrix(ops, kv_projection);
  {
    Random random(stream_seed(seed, id++));
    HostMatrix index_key(shape.hidden, shape.index_dim);
    index_key.fill(random, unit);
    HostMatrix index_query(shape.hidden, std::int64_t{shape.index_heads} * shape.index_dim);
    for (std::int64_t r = 0; r < index_query.rows; ++r) {
      for (int h = 0; h < shape.index_heads; ++h) {
        for (int d = 0; d < shape.index_dim; ++d) {
          index_query.at(r, h * shape.index_dim + d) = index_key.at(r, d) + random.centered(kIndexQueryOwnShare * unit);
        }
      }
    }
    weights.index_key = upload_matrix(ops, index_key);
    weights.index_query = upload_matrix(ops, index_query);
  }
  weights.final_norm = norm_gain(ops, shape, Random(stream_seed(seed, id++)));
  {
    Random random(stream_seed(seed, id++));
    HostMatrix lm_head(shape.hidden, shape.vocab);
    lm_head.fill(random, unit);
    weights.lm_head = upload_matrix(ops, lm_head);
  }
  return weights;
}

SequenceTokens make_sequence_tokens(const ModelShape& shape, std::int64_t prompt_length, int continuation_length,
                                    std::uint64_t seed, int sequence) {
  Random random(stream_seed(seed ^ 0x5eed5eed5eedull, static_cast<std::uint64_t>(sequence)));
  SequenceTokens tokens;
  tokens.query_topic = static_cast<int>(random.below(shape.topics));
  const std::int64_t tokens_per_topic = shape.vocab / shape.topics;
  auto token_of = [&](int topic) {
    return static_cast<std::int32_t>(topic + shape.topics * random.below(tokens_per_topic));
  };
  constexpr std::int64_t kNeedleLength = 16;
  tokens.needle_start = prompt_length / 3 + random.below(std::max<std::int64_t>(1, prompt_length / 3 - kNeedleLength));
  tokens.prompt.reserve(static_cast<std::size_t>(prompt_length));
  while (static_cast<std::int64_t>(tokens.prompt.size()) < prompt_length) {
    const std::int64_t at = static_cast<std::int64_t>(tokens.prompt.size());
    if (at >= tokens.needle_start && at < tokens.needle_start + kNeedleLength) {
      tokens.prompt.push_back(token_of(tokens.query_topic));
      continue;
    }
    int topic = static_cast<int>(random.below(shape.topics - 1));
    if (topic >= tokens.query_topic) ++topic;  // any topic but the query's
    const std::int64_t run = 8 + random.below(25);
    for (std::int64_t i = 0; i < run && static_cast<std::int64_t>(tokens.prompt.size()) < prompt_length; ++i) {
      const std::int64_t position = static_cast<std::int64_t>(tokens.prompt.size());
      if (position == tokens.needle_start) break;  // the needle interrupts the run
      tokens.prompt.push_back(token_of(topic));
    }
  }
  for (int i = 0; i < continuation_length; ++i) tokens.continuation.push_back(token_of(tokens.query_topic));
  return tokens;
}

}  // namespace yoco
