// `clsa demo`: a small YOCO-style cross-decoder over one SharedKVCache, decoded with CLSA (one
// indexer per step, routing reused by every layer) and with dense attention, side by side.
//
// The model is random but not diffuse: cached tokens belong to topics, and the projections keep
// topic similarity (as trained models do), so attention concentrates on a few tokens and the
// sparse-vs-dense error means something. One "needle" token of the queries' topic is planted in
// the middle of the context; each step's query asks about that topic.
//
// The decode loop runs the way an engine runs it. The components are created and planned once,
// before the loop, for the largest step (reserve); a batch bucket's page tables are reserved once
// (reserve_batch) and refilled in place every step. On CUDA one stream carries every copy, append,
// table refill and step, and each step (one indexer select and the L sparse layers; the dense
// baseline's L layers) is captured once per batch bucket as a CUDA graph and replayed while the
// context grows. Every layer's query is projected from the step's input x0 (the self-decoder's
// output), so a whole step is known before it runs; the residual stream adds the layers' outputs
// up on the host afterwards. The first step of a bucket (on CUDA: capture and first replay) is
// warm-up and is not counted in the means.
#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cuda_support.hpp"
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

/// Queries keep key geometry: W_q's head h is 3 * W_k's kv head (h / group) plus a layer's own
/// random part, so q.k follows hidden-state similarity sharply, as in a trained model, and the
/// attention mass stays on a few tokens however long the context grows.
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
      q.middleCols(h * d.head_dim, d.head_dim) += 3.0f * m.w_k.middleCols((h / group) * d.head_dim, d.head_dim);
    }
    m.w_q.push_back(q);
    m.w_o.push_back(gaussian(rng, d.q_heads * d.head_dim, d.model, 1.0f / std::sqrt(float(d.q_heads * d.head_dim))));
  }
  m.w_index_query = gaussian(rng, d.model, d.index_heads * d.index_dim, 0.25f);
  for (int h = 0; h < d.index_heads; ++h) m.w_index_query.middleCols(h * d.index_dim, d.index_dim) += m.w_index_key;
  for (int h = 0; h < d.index_heads; ++h) m.index_head_weights.push_back(1.0f / static_cast<float>(d.index_heads));
  return m;
}

/// A bf16 tensor on the lane's device with a zeroed host twin of the same size, for traffic to and
/// from the model (f32 on the host side).
struct Staged {
  clsa::Tensor host, device;
  Staged(std::initializer_list<std::int64_t> shape, clsa::Device on)
      : host(clsa::Tensor::empty(shape, clsa::DType::bf16)), device(clsa::Tensor::empty(shape, clsa::DType::bf16, on)) {
    std::memset(host.view().data(), 0, host.bytes());
  }

  /// host[offset, offset + count) := values, rounded to bf16.
  void set(std::int64_t offset, const float* values, std::int64_t count) {
    auto* staged = host.data_as<clsa::bfloat16>() + offset;
    for (std::int64_t i = 0; i < count; ++i) staged[i] = clsa::to_bfloat16(values[i]);
  }
  float at(std::int64_t i) const { return clsa::to_float(host.data_as<clsa::bfloat16>()[i]); }
  /// The first `count` elements of the device tensor := the host's (in stream order).
  void upload(const cuda_support::OwnedStream& lane, std::int64_t count) {
    lane.upload(device.view().data(), host.view().data(), static_cast<std::size_t>(count) * sizeof(clsa::bfloat16));
  }
  void upload(const cuda_support::OwnedStream& lane) { upload(lane, host.numel()); }
  void download(const cuda_support::OwnedStream& lane) {
    lane.download(host.view().data(), device.view().data(), host.bytes());
  }
};

/// Layer `layer`'s [slots, 1, heads, head_dim] part of a [layers, slots, 1, heads, head_dim] tensor.
clsa::TensorView layer_part(const clsa::Tensor& tensor, int layer, int slots, int heads, int head_dim) {
  const std::int64_t size = std::int64_t{slots} * heads * head_dim;
  return clsa::TensorView(tensor.data_as<clsa::bfloat16>() + layer * size, clsa::DType::bf16,
                          {slots, 1, heads, head_dim}, tensor.device());
}

/// What the loop keeps per batch bucket (a number of slots): the page tables (reserve_batch: fixed
/// device tables, refilled in place every step), the step's input and output tensors (every
/// layer's query and output: [layers, slots, 1, heads, head_dim]) and, on CUDA, the captured
/// steps, which read exactly these tables and tensors on every replay.
struct Bucket {
  int slots;
  clsa::CacheBatch batch;
  Staged q_index, q, sparse_out, dense_out;
  clsa::Tensor weights;
  clsa::RoutingIndex routing;  // the indexer's index, as select() returned it (at capture, on CUDA)
  int steps = 0;               // steps run in this bucket; the first is warm-up
  cuda_support::CapturedGraph clsa_step, dense_step;  // CUDA: the captured steps

  Bucket(int slot_count, const Dims& d, int layers, clsa::Device device)
      : slots(slot_count),
        q_index({slots, 1, d.index_heads, d.index_dim}, device),
        q({layers, slots, 1, d.q_heads, d.head_dim}, device),
        sparse_out({layers, slots, 1, d.q_heads, d.head_dim}, device),
        dense_out({layers, slots, 1, d.q_heads, d.head_dim}, device),
        weights(clsa::Tensor::empty({slots, 1, d.index_heads}, clsa::DType::f32, device)) {}
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
  const int layers = options.layers;
  const int q_size = d.q_heads * d.head_dim;  // one query token's q (or attention output) of one layer
  const std::int64_t capacity = options.context + options.steps;
  const bool graphs = device.is_cuda();  // on CUDA each step is a replayed CUDA graph
  // Where the demo's device work goes, in order: on CUDA one stream carries every copy, append,
  // table refill and step (graphs are captured from it and replayed on it), and events on it time
  // the steps; on the CPU the calls return when they are done and the wall clock times the steps.
  const cuda_support::OwnedStream lane(device);
  cuda_support::StreamTimer step_timer(lane, 3);

  std::printf("libclsa %s demo: backend %s (%s), bf16 cache\n", clsa::version(), clsa::backend_name(backend),
              clsa::device_name(device).c_str());
  std::printf(
      "cross-decoder: %d layers, each its own query projection; Hq=%d Hkv=%d D=%d (GQA group %d); "
      "indexer H_idx=%d D_idx=%d top_k=%d\n",
      layers, d.q_heads, d.kv_heads, d.head_dim, group, d.index_heads, d.index_dim, options.top_k);

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
  Staged k_chunk({chunk, d.kv_heads, d.head_dim}, device);
  Staged v_chunk({chunk, d.kv_heads, d.head_dim}, device);
  Staged index_chunk({chunk, d.index_dim}, device);
  // Projects hidden states and appends them to the cache, on the lane (in order with the steps).
  auto append_hidden = [&](const Matrix& hidden) {
    const std::int64_t tokens = hidden.rows();
    const Matrix k = hidden * model.w_k;
    const Matrix v = hidden * model.w_v;
    const Matrix index_keys = hidden * model.w_index_key;
    k_chunk.set(0, k.data(), k.size());
    v_chunk.set(0, v.data(), v.size());
    index_chunk.set(0, index_keys.data(), index_keys.size());
    k_chunk.upload(lane, k.size());
    v_chunk.upload(lane, v.size());
    index_chunk.upload(lane, index_keys.size());
    auto part = [&](const clsa::Tensor& t, std::initializer_list<std::int64_t> shape) {
      return clsa::TensorView(t.view().data(), clsa::DType::bf16, shape, device);
    };
    cache.append(sequence, part(k_chunk.device, {tokens, d.kv_heads, d.head_dim}),
                 part(v_chunk.device, {tokens, d.kv_heads, d.head_dim}),
                 part(index_chunk.device, {tokens, d.index_dim}), lane.stream());
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
  lane.wait();
  std::printf(
      "prefill: %lld tokens (%d topics, one needle at position %lld) projected once into the shared cache "
      "in %.2f s\n",
      static_cast<long long>(options.context), topics, static_cast<long long>(needle), seconds_since(prefill_start));

  // ---- the components: created and planned once, before the loop, for its largest step ----
  const int max_slots = 1;  // the demo decodes one sequence
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
  indexer.reserve(max_slots, 1, capacity);
  sparse.reserve(max_slots, 1, options.top_k);
  dense.reserve(max_slots, 1, capacity);

  // Per batch bucket: reserved page tables, the step's tensors and (CUDA) its captured steps. The
  // demo decodes one sequence, so it uses the bucket of one slot; an engine keeps one per bucket
  // size (examples/embed_engine.cpp).
  std::map<int, std::unique_ptr<Bucket>> buckets;
  auto bucket_of = [&](int slots) -> Bucket& {
    std::unique_ptr<Bucket>& bucket = buckets[slots];
    if (!bucket) {
      bucket = std::make_unique<Bucket>(slots, d, layers, device);
      bucket->batch = cache.reserve_batch(slots, capacity);
      std::vector<float> weights;
      for (int b = 0; b < slots; ++b) {
        weights.insert(weights.end(), model.index_head_weights.begin(), model.index_head_weights.end());
      }
      lane.upload(bucket->weights.view().data(), weights.data(), weights.size() * sizeof(float));
    }
    return *bucket;
  };
  // A step as it is enqueued (and captured): one select whose routing every sparse layer reuses;
  // the dense baseline's layers.
  auto enqueue_clsa = [&](Bucket& b) {
    b.routing = indexer.select(b.batch, b.q_index.device, b.weights, lane.stream());
    for (int l = 0; l < layers; ++l) {
      sparse.forward(b.batch, b.routing, layer_part(b.q.device, l, b.slots, d.q_heads, d.head_dim),
                     layer_part(b.sparse_out.device, l, b.slots, d.q_heads, d.head_dim), lane.stream());
    }
  };
  auto enqueue_dense = [&](Bucket& b) {
    for (int l = 0; l < layers; ++l) {
      dense.forward(b.batch, layer_part(b.q.device, l, b.slots, d.q_heads, d.head_dim),
                    layer_part(b.dense_out.device, l, b.slots, d.q_heads, d.head_dim), lane.stream());
    }
  };
  // A step as it runs: on CUDA a replay of the bucket's captured graph, on the CPU the calls.
  auto run_clsa = [&](Bucket& b) {
    if (graphs) {
      b.clsa_step.replay(lane.stream());
    } else {
      enqueue_clsa(b);
    }
  };
  auto run_dense = [&](Bucket& b) {
    if (graphs) {
      b.dense_step.replay(lane.stream());
    } else {
      enqueue_dense(b);
    }
  };
  // Slot `slot`'s layer-`layer` attention output, from a downloaded [layers, slots, ...] tensor.
  auto attention_output = [&](const Staged& out, int slots, int layer, int slot) {
    Vector o(q_size);
    const std::int64_t offset = (std::int64_t{layer} * slots + slot) * q_size;
    for (int i = 0; i < q_size; ++i) o[i] = out.at(offset + i);
    return o;
  };
  // The residual stream through the L layers: each adds its output, normalised (as a pre-norm
  // block would) to a tenth of the stream.
  auto residual_stream = [&](const Vector& x0, const Staged& out, int slots, int slot) {
    Vector x = x0;
    for (int l = 0; l < layers; ++l) {
      const Vector update = attention_output(out, slots, l, slot) * model.w_o[static_cast<std::size_t>(l)];
      x += (0.1f * x.norm() / update.norm()) * update;
    }
    return x;
  };

  // ---- decoding ----
  std::printf("\n%4s %8s %12s %12s %8s %8s %14s %14s\n", "step", "tokens", "clsa_ms", "dense_ms", "speedup", "needle",
              "attn_err(l0)", "hidden_err");
  double total_clsa = 0.0, total_dense = 0.0;
  int timed_steps = 0, needle_routed_steps = 0, replays = 0;
  std::int64_t first_length = 0, last_length = 0;
  Bucket* last_bucket = nullptr;
  std::vector<std::int32_t> routed(static_cast<std::size_t>(options.top_k));
  for (int step = 0; step < options.steps; ++step) {
    // The new token: the self-decoder's output is appended to the ONE cache, then every
    // cross-decoder layer reads it. The step's batch refills its bucket's tables in place.
    const Vector x0 = hidden_of_topic(query_topic, 1.0f);
    append_hidden(Matrix(x0));
    const std::vector<clsa::SequenceId> ids = {sequence};
    Bucket& bucket = bucket_of(static_cast<int>(ids.size()));
    cache.batch(ids, bucket.batch, lane.stream());
    const int slot = 0;  // the sequence's slot in the bucket

    // The step's inputs, projected from x0: the indexer's query and every layer's query.
    const Vector query_index = x0 * model.w_index_query;
    bucket.q_index.set(std::int64_t{slot} * query_index.size(), query_index.data(), query_index.size());
    bucket.q_index.upload(lane);
    for (int l = 0; l < layers; ++l) {
      const Vector query = x0 * model.w_q[static_cast<std::size_t>(l)];
      bucket.q.set((std::int64_t{l} * bucket.slots + slot) * q_size, query.data(), query.size());
    }
    bucket.q.upload(lane);

    const bool warm_up = bucket.steps++ == 0;
    if (graphs && !bucket.clsa_step.captured()) {
      bucket.clsa_step = cuda_support::CapturedGraph::capture(lane.stream(), [&] { enqueue_clsa(bucket); });
      bucket.dense_step = cuda_support::CapturedGraph::capture(lane.stream(), [&] { enqueue_dense(bucket); });
    }
    step_timer.mark(0);
    run_clsa(bucket);
    step_timer.mark(1);
    run_dense(bucket);
    step_timer.mark(2);
    const double clsa_seconds = step_timer.seconds(0, 1);
    const double dense_seconds = step_timer.seconds(1, 2);
    if (graphs) {
      // A replay makes no host checks: kernels that met a sequence beyond the plan report it here.
      indexer.check_status();
      dense.check_status();
      ++replays;
    }

    bucket.sparse_out.download(lane);
    bucket.dense_out.download(lane);
    const std::int64_t top_k = bucket.routing.positions.size(2);
    routed.resize(static_cast<std::size_t>(top_k));
    lane.download(routed.data(), bucket.routing.positions.data_as<std::int32_t>() + slot * top_k,
                  routed.size() * sizeof(std::int32_t));
    const bool needle_routed =
        std::find(routed.begin(), routed.end(), static_cast<std::int32_t>(needle)) != routed.end();
    needle_routed_steps += needle_routed ? 1 : 0;
    const double attention_error = relative_error(attention_output(bucket.sparse_out, bucket.slots, 0, slot),
                                                  attention_output(bucket.dense_out, bucket.slots, 0, slot));
    const double hidden_error = relative_error(residual_stream(x0, bucket.sparse_out, bucket.slots, slot),
                                               residual_stream(x0, bucket.dense_out, bucket.slots, slot));
    last_length = bucket.batch.length(slot);
    if (step == 0) first_length = last_length;
    last_bucket = &bucket;
    if (!warm_up) {
      total_clsa += clsa_seconds;
      total_dense += dense_seconds;
      ++timed_steps;
    }
    std::printf("%4d %8lld %12.3f %12.3f %7.1fx %8s %14.2e %14.2e%s\n", step, static_cast<long long>(last_length),
                clsa_seconds * 1e3, dense_seconds * 1e3, dense_seconds / clsa_seconds,
                needle_routed ? "routed" : "MISSED", attention_error, hidden_error,
                warm_up ? (graphs ? "  warm-up (capture, first replay)" : "  warm-up") : "");
  }
  if (timed_steps > 0) {
    std::printf(
        "mean per step after warm-up (%d step%s): CLSA %.3f ms (1 indexer + %d sparse layers), dense %.3f ms "
        "(%d layers): %.1fx\n",
        timed_steps, timed_steps == 1 ? "" : "s", total_clsa * 1e3 / timed_steps, layers,
        total_dense * 1e3 / timed_steps, layers, total_dense / total_clsa);
  } else {
    std::printf("mean per step: no step after warm-up (run more than one step)\n");
  }
  if (graphs) {
    std::printf(
        "  times: device time of each step's CUDA-graph replay (events); the first step of a batch bucket captures "
        "its graphs and is not in the means\n");
    std::printf(
        "CUDA graphs: %zu bucket of %d slot, its CLSA step and dense step captured once and replayed %d times while "
        "the context grew from %lld to %lld tokens\n",
        buckets.size(), max_slots, replays, static_cast<long long>(first_length), static_cast<long long>(last_length));
  } else {
    std::printf(
        "  times: wall clock of the eager calls; the first step (first use of the threads and caches) is not in the "
        "means\n");
  }
  std::printf("needle routed in %d of %d steps\n", needle_routed_steps, options.steps);

  const clsa::MemoryStats stats = cache.memory();
  std::printf(
      "\nKV memory for %lld tokens: one shared cache %s (%zu B/token: K+V %zu, indexer key %zu) vs "
      "%d per-layer K/V caches %s: %.1fx less\n",
      static_cast<long long>(stats.tokens), bytes_text(static_cast<double>(stats.shared_cache_bytes())).c_str(),
      stats.bytes_per_token, stats.kv_bytes_per_token, stats.index_bytes_per_token, layers,
      bytes_text(static_cast<double>(stats.per_layer_cache_bytes(layers))).c_str(),
      static_cast<double>(stats.per_layer_cache_bytes(layers)) / static_cast<double>(stats.shared_cache_bytes()));

  // ---- fidelity: sparse error against dense falls as top_k grows ----
  // On the last step's batch and inputs (still in its bucket), eagerly. Each swept top_k gets an
  // indexer and an attention object of its own, planned for it: the loop's are planned for the
  // run's top_k and refuse more.
  Bucket& bucket = *last_bucket;
  const int slot = 0;
  std::printf("\nfidelity at the last step (layer-0 attention output, relative error vs dense):\n");
  std::printf(
      "  (the error is the softmax mass outside the routed tokens: small because this model's attention concentrates "
      "on\n   a few tokens, as a trained model's does; diffuse attention would leave more outside as the context "
      "grows)\n");
  const Vector dense_l0 = attention_output(bucket.dense_out, bucket.slots, 0, slot);
  Staged sweep_out({bucket.slots, 1, d.q_heads, d.head_dim}, device);
  for (int top_k = 16; top_k <= std::max<std::int64_t>(16, std::min<std::int64_t>(last_length, 4 * options.top_k));
       top_k *= 4) {
    clsa::IndexerConfig sweep = indexer_config;
    sweep.top_k = top_k;
    sweep.sink_tokens = std::min(4, top_k / 4);
    sweep.local_window = std::min(64, top_k / 4);
    clsa::CrossLayerIndexer sweep_indexer(sweep, backend);
    clsa::SparseCrossAttention sweep_sparse(attention_config, backend);
    sweep_indexer.reserve(bucket.slots, 1, capacity);
    sweep_sparse.reserve(bucket.slots, 1, top_k);
    const clsa::RoutingIndex routing =
        sweep_indexer.select(bucket.batch, bucket.q_index.device, bucket.weights, lane.stream());
    sweep_sparse.forward(bucket.batch, routing, layer_part(bucket.q.device, 0, bucket.slots, d.q_heads, d.head_dim),
                         sweep_out.device, lane.stream());
    sweep_out.download(lane);
    std::printf("  top_k %7d: %.2e%s\n", top_k,
                relative_error(attention_output(sweep_out, bucket.slots, 0, slot), dense_l0),
                top_k == options.top_k ? "  (this run's top_k)" : "");
  }
  return needle_routed_steps == options.steps ? 0 : 2;
}

}  // namespace clsa_program
