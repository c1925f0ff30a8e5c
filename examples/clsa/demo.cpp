// `clsa demo`: a small YOCO-style cross-decoder over one SharedKVCache, decoded with CLSA (one
// indexer per step, routing reused by every layer) and with dense attention, side by side.
//
// The model is random but not diffuse: cached tokens belong to topics, and the projections keep
// topic similarity (as trained models do), so attention concentrates on a few tokens and the
// sparse-vs-dense error means something. One "needle" token of the queries' topic is planted in
// the middle of the context; each step's query asks about that topic.
#include <Eigen/Core>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "program.hpp"

namespace clsa_program {

namespace {

using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vector = Eigen::RowVectorXf;

struct Dims {
  int model = 256;
  int q_heads = 8;
  int kv_heads = 2;
  int head_dim = 64;
  int index_heads = 4;
  int index_dim = 64;
};

struct Model {
  Dims dims;
  Matrix topics;                 // [topics, model], unit rows
  Matrix w_k, w_v, w_index_key;  // shared: [model, Hkv*D], [model, Hkv*D], [model, Didx]
  std::vector<Matrix> w_q, w_o;  // per layer: [model, Hq*D], [Hq*D, model]
  Matrix w_index_query;          // [model, Hidx*Didx]
  std::vector<float> index_head_weights;
};

Matrix gaussian(std::mt19937_64& rng, int rows, int cols, float stddev) {
  std::normal_distribution<float> normal(0.0f, stddev);
  Matrix m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  return m;
}

/// Queries keep key geometry: W_q's head h is 1.5 * W_k's kv head (h / group) plus a layer's own
/// random part, so q.k follows hidden-state similarity (sharply), as in a trained model.
Model make_model(std::mt19937_64& rng, int layers, int topics) {
  Model m;
  const Dims& d = m.dims;
  m.topics = gaussian(rng, topics, d.model, 1.0f);
  m.topics.rowwise().normalize();
  m.w_k = gaussian(rng, d.model, d.kv_heads * d.head_dim, 1.0f);
  m.w_v = gaussian(rng, d.model, d.kv_heads * d.head_dim, 1.0f);
  m.w_index_key = gaussian(rng, d.model, d.index_dim, 1.0f);
  const int group = d.q_heads / d.kv_heads;
  for (int l = 0; l < layers; ++l) {
    Matrix q = gaussian(rng, d.model, d.q_heads * d.head_dim, 0.25f);
    for (int h = 0; h < d.q_heads; ++h) {
      q.middleCols(h * d.head_dim, d.head_dim) += 1.5f * m.w_k.middleCols((h / group) * d.head_dim, d.head_dim);
    }
    m.w_q.push_back(q);
    m.w_o.push_back(gaussian(rng, d.q_heads * d.head_dim, d.model, 1.0f / std::sqrt(float(d.q_heads * d.head_dim))));
  }
  m.w_index_query = gaussian(rng, d.model, d.index_heads * d.index_dim, 0.25f);
  for (int h = 0; h < d.index_heads; ++h) m.w_index_query.middleCols(h * d.index_dim, d.index_dim) += m.w_index_key;
  for (int h = 0; h < d.index_heads; ++h) m.index_head_weights.push_back(1.0f / static_cast<float>(d.index_heads));
  return m;
}

/// Device tensor with a host twin of the same shape, for bf16 traffic to and from the model.
struct Staged {
  clsa::Tensor host, device;
  Staged(std::initializer_list<std::int64_t> shape, clsa::DType dtype, clsa::Device on)
      : host(clsa::Tensor::empty(shape, dtype)), device(clsa::Tensor::empty(shape, dtype, on)) {}

  /// The first `count` elements of the device tensor := values (rounded to bf16).
  void upload(const float* values, std::int64_t count) {
    auto* staged = host.data_as<clsa::bfloat16>();
    for (std::int64_t i = 0; i < count; ++i) staged[i] = clsa::to_bfloat16(values[i]);
    clsa::copy_bytes(device.view().data(), device.device(), staged, clsa::Device::cpu(),
                     static_cast<std::size_t>(count) * sizeof(clsa::bfloat16));
  }
  void download(float* values) {
    host.copy_from(device);
    const auto* staged = host.data_as<clsa::bfloat16>();
    for (std::int64_t i = 0; i < host.numel(); ++i) values[i] = clsa::to_float(staged[i]);
  }
};

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double relative_error(const Vector& a, const Vector& b) {
  return (a - b).norm() / b.norm();
}

std::string bytes_text(double bytes) {
  char text[64];
  if (bytes >= 1024.0 * 1024 * 1024) {
    std::snprintf(text, sizeof text, "%.2f GiB", bytes / (1024.0 * 1024 * 1024));
  } else {
    std::snprintf(text, sizeof text, "%.2f MiB", bytes / (1024.0 * 1024));
  }
  return text;
}

}  // namespace

int run_demo(const DemoOptions& options) {
  const clsa::Backend backend = clsa::resolve_backend(options.backend);
  const clsa::Device device = clsa::backend_device(backend);
  std::mt19937_64 rng(options.seed);
  const int topics = static_cast<int>(std::max<std::int64_t>(16, options.context / 64));
  const Model model = make_model(rng, options.layers, topics);
  const Dims& d = model.dims;
  const int group = d.q_heads / d.kv_heads;
  const std::int64_t capacity = options.context + options.steps;

  std::printf("libclsa %s demo: backend %s (%s), bf16 cache\n", clsa::version(), clsa::backend_name(backend),
              clsa::device_name(device).c_str());
  std::printf(
      "cross-decoder: %d layers, each its own query projection; Hq=%d Hkv=%d D=%d (GQA group %d); "
      "indexer H_idx=%d D_idx=%d top_k=%d\n",
      options.layers, d.q_heads, d.kv_heads, d.head_dim, group, d.index_heads, d.index_dim, options.top_k);

  clsa::CacheConfig cache_config;
  cache_config.num_kv_heads = d.kv_heads;
  cache_config.head_dim = d.head_dim;
  cache_config.index_dim = d.index_dim;
  cache_config.page_size = 64;
  cache_config.max_pages = (capacity + 63) / 64;
  cache_config.dtype = clsa::DType::bf16;
  clsa::SharedKVCache cache(cache_config, backend);
  const clsa::SequenceId sequence = cache.add_sequence();

  // ---- prefill: hidden states by topic, projected ONCE into the shared cache ----
  std::uniform_int_distribution<int> pick_topic(0, topics - 1);
  const int query_topic = pick_topic(rng);
  const std::int64_t needle =
      options.context / 3 + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(options.context / 3));
  std::normal_distribution<float> noise(0.0f, 0.3f / std::sqrt(static_cast<float>(d.model)));
  auto hidden_of_topic = [&](int topic, float strength) {
    Vector x = model.topics.row(topic) * strength;
    for (int i = 0; i < d.model; ++i) x[i] += noise(rng);
    return x;
  };
  const std::int64_t chunk = 2048;
  Staged k_chunk({chunk, d.kv_heads, d.head_dim}, clsa::DType::bf16, device);
  Staged v_chunk({chunk, d.kv_heads, d.head_dim}, clsa::DType::bf16, device);
  Staged index_chunk({chunk, d.index_dim}, clsa::DType::bf16, device);
  auto append_hidden = [&](const Matrix& hidden) {
    const std::int64_t tokens = hidden.rows();
    const Matrix k = hidden * model.w_k;
    const Matrix v = hidden * model.w_v;
    const Matrix index_keys = hidden * model.w_index_key;
    k_chunk.upload(k.data(), k.size());
    v_chunk.upload(v.data(), v.size());
    index_chunk.upload(index_keys.data(), index_keys.size());
    auto part = [&](const clsa::Tensor& t, std::initializer_list<std::int64_t> shape) {
      return clsa::TensorView(t.view().data(), clsa::DType::bf16, shape, device);
    };
    cache.append(sequence, part(k_chunk.device, {tokens, d.kv_heads, d.head_dim}),
                 part(v_chunk.device, {tokens, d.kv_heads, d.head_dim}),
                 part(index_chunk.device, {tokens, d.index_dim}));
  };
  const auto prefill_start = std::chrono::steady_clock::now();
  for (std::int64_t first = 0; first < options.context; first += chunk) {
    const std::int64_t tokens = std::min(chunk, options.context - first);
    Matrix hidden(tokens, d.model);
    for (std::int64_t t = 0; t < tokens; ++t) {
      const std::int64_t position = first + t;
      hidden.row(t) = position == needle ? hidden_of_topic(query_topic, 1.3f) : hidden_of_topic(pick_topic(rng), 1.0f);
    }
    append_hidden(hidden);
  }
  clsa::synchronize();
  std::printf(
      "prefill: %lld tokens (%d topics, one needle at position %lld) projected once into the shared cache "
      "in %.2f s\n",
      static_cast<long long>(options.context), topics, static_cast<long long>(needle), seconds_since(prefill_start));

  // ---- decoding ----
  clsa::IndexerConfig indexer_config;
  indexer_config.num_heads = d.index_heads;
  indexer_config.index_dim = d.index_dim;
  indexer_config.top_k = options.top_k;
  indexer_config.sink_tokens = std::min(4, options.top_k / 4);
  indexer_config.local_window = std::min(64, options.top_k / 4);
  clsa::CrossLayerIndexer indexer(indexer_config, backend);
  clsa::AttentionConfig attention_config;
  attention_config.num_q_heads = d.q_heads;
  attention_config.num_kv_heads = d.kv_heads;
  attention_config.head_dim = d.head_dim;
  clsa::SparseCrossAttention sparse(attention_config, backend);  // one object serves every layer
  clsa::DenseCrossAttention dense(attention_config, backend);
  indexer.reserve(1, 1, capacity);
  sparse.reserve(1, 1, options.top_k);
  dense.reserve(1, 1, capacity);

  Staged q_index({1, 1, d.index_heads, d.index_dim}, clsa::DType::bf16, device);
  clsa::Tensor weights_host = clsa::Tensor::empty({1, 1, d.index_heads}, clsa::DType::f32);
  std::copy(model.index_head_weights.begin(), model.index_head_weights.end(), weights_host.data_as<float>());
  const clsa::Tensor weights = device.is_cpu() ? weights_host : weights_host.to(device);
  Staged q({1, 1, d.q_heads, d.head_dim}, clsa::DType::bf16, device);
  Staged out({1, 1, d.q_heads, d.head_dim}, clsa::DType::bf16, device);
  std::vector<float> attention_out(static_cast<std::size_t>(d.q_heads * d.head_dim));

  // Runs the L layers from x0; returns the final hidden state; adds library time to `seconds`.
  // `routing` null = dense. first_layer_out receives layer 0's attention output.
  auto run_layers = [&](const Vector& x0, const clsa::RoutingIndex* routing, const clsa::CacheBatch& batch,
                        double& seconds, Vector* first_layer_out) {
    Vector x = x0;
    for (int l = 0; l < options.layers; ++l) {
      const Vector query = x * model.w_q[static_cast<std::size_t>(l)];
      q.upload(query.data(), query.size());
      const auto start = std::chrono::steady_clock::now();
      if (routing != nullptr) {
        sparse.forward(batch, *routing, q.device, out.device);
      } else {
        dense.forward(batch, q.device, out.device);
      }
      clsa::synchronize();
      seconds += seconds_since(start);
      out.download(attention_out.data());
      const Eigen::Map<const Vector> o(attention_out.data(), d.q_heads * d.head_dim);
      if (l == 0 && first_layer_out != nullptr) *first_layer_out = o;
      // Residual update, normalised (as a pre-norm block would) to a tenth of the stream.
      const Vector update = o * model.w_o[static_cast<std::size_t>(l)];
      x += (0.1f * x.norm() / update.norm()) * update;
    }
    return x;
  };

  const clsa::MemoryStats stats_before = cache.memory();
  std::printf("\n%4s %8s %12s %12s %8s %8s %14s %14s\n", "step", "tokens", "clsa_ms", "dense_ms", "speedup", "needle",
              "attn_err(l0)", "hidden_err");
  double total_clsa = 0.0, total_dense = 0.0;
  int needle_routed_steps = 0;
  Vector last_x0;
  clsa::CacheBatch batch;
  for (int step = 0; step < options.steps; ++step) {
    // The new token: the self-decoder's output is appended to the ONE cache, then every
    // cross-decoder layer reads it.
    const Vector x0 = hidden_of_topic(query_topic, 1.0f);
    Matrix token(1, d.model);
    token.row(0) = x0;
    append_hidden(token);
    cache.batch({sequence}, batch);

    double clsa_seconds = 0.0;
    const Vector query_index = x0 * model.w_index_query;
    q_index.upload(query_index.data(), query_index.size());
    auto start = std::chrono::steady_clock::now();
    const clsa::RoutingIndex routing = indexer.select(batch, q_index.device, weights);
    clsa::synchronize();
    clsa_seconds += seconds_since(start);
    const std::vector<std::int32_t> routed = [&] {
      std::vector<std::int32_t> host(static_cast<std::size_t>(options.top_k));
      clsa::copy_bytes(host.data(), clsa::Device::cpu(), routing.positions.data(), device, host.size() * 4);
      return host;
    }();
    const bool needle_routed =
        std::find(routed.begin(), routed.end(), static_cast<std::int32_t>(needle)) != routed.end();
    needle_routed_steps += needle_routed ? 1 : 0;

    Vector sparse_l0, dense_l0;
    const Vector sparse_x = run_layers(x0, &routing, batch, clsa_seconds, &sparse_l0);
    double dense_seconds = 0.0;
    const Vector dense_x = run_layers(x0, nullptr, batch, dense_seconds, &dense_l0);
    total_clsa += clsa_seconds;
    total_dense += dense_seconds;
    last_x0 = x0;
    std::printf("%4d %8lld %12.3f %12.3f %7.1fx %8s %14.2e %14.2e\n", step, static_cast<long long>(batch.length(0)),
                clsa_seconds * 1e3, dense_seconds * 1e3, dense_seconds / clsa_seconds,
                needle_routed ? "routed" : "MISSED", relative_error(sparse_l0, dense_l0),
                relative_error(sparse_x, dense_x));
  }
  std::printf("mean per step: CLSA %.3f ms (1 indexer + %d sparse layers), dense %.3f ms (%d layers): %.1fx\n",
              total_clsa * 1e3 / options.steps, options.layers, total_dense * 1e3 / options.steps, options.layers,
              total_dense / total_clsa);
  std::printf("needle routed in %d of %d steps\n", needle_routed_steps, options.steps);
  (void)stats_before;

  const clsa::MemoryStats stats = cache.memory();
  std::printf(
      "\nKV memory for %lld tokens: one shared cache %s (%zu B/token: K+V %zu, indexer key %zu) vs "
      "%d per-layer K/V caches %s: %.1fx less\n",
      static_cast<long long>(stats.tokens), bytes_text(static_cast<double>(stats.shared_cache_bytes())).c_str(),
      stats.bytes_per_token, stats.kv_bytes_per_token, stats.index_bytes_per_token, options.layers,
      bytes_text(static_cast<double>(stats.per_layer_cache_bytes(options.layers))).c_str(),
      static_cast<double>(stats.per_layer_cache_bytes(options.layers)) /
          static_cast<double>(stats.shared_cache_bytes()));

  // ---- fidelity: sparse error against dense falls as top_k grows ----
  std::printf("\nfidelity at the last step (layer-0 attention output, relative error vs dense):\n");
  double unused = 0.0;
  Vector dense_l0;
  run_layers(last_x0, nullptr, batch, unused, &dense_l0);
  const Vector query_index = last_x0 * model.w_index_query;
  q_index.upload(query_index.data(), query_index.size());
  for (int top_k = 16; top_k <= std::max<std::int64_t>(16, std::min<std::int64_t>(batch.length(0), 4 * options.top_k));
       top_k *= 4) {
    clsa::IndexerConfig sweep = indexer_config;
    sweep.top_k = top_k;
    sweep.sink_tokens = std::min(4, top_k / 4);
    sweep.local_window = std::min(64, top_k / 4);
    clsa::CrossLayerIndexer sweep_indexer(sweep, backend);
    const clsa::RoutingIndex routing = sweep_indexer.select(batch, q_index.device, weights);
    Vector sparse_l0;
    run_layers(last_x0, &routing, batch, unused, &sparse_l0);
    std::printf("  top_k %7d: %.2e\n", top_k, relative_error(sparse_l0, dense_l0));
  }
  return needle_routed_steps == options.steps ? 0 : 2;
}

}  // namespace clsa_program
