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
#include <iterator>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "clsa/paged_view.hpp"
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

/// A tensor of an activation dtype (f32, f16 or bf16) on the lane's device with a zeroed host
/// twin of the same size, for traffic to and from the model (f32 on the host side).
struct Staged {
  clsa::DType dtype;
  clsa::Tensor host, device;
  Staged(std::initializer_list<std::int64_t> shape, clsa::Device on, clsa::DType type)
      : dtype(type), host(clsa::Tensor::empty(shape, type)), device(clsa::Tensor::empty(shape, type, on)) {
    std::memset(host.view().data(), 0, host.bytes());
  }

  /// host[offset, offset + count) := values, rounded to the dtype.
  void set(std::int64_t offset, const float* values, std::int64_t count) {
    for (std::int64_t i = 0; i < count; ++i) {
      switch (dtype) {
        case clsa::DType::f32:
          host.data_as<float>()[offset + i] = values[i];
          break;
        case clsa::DType::f16:
          host.data_as<clsa::float16>()[offset + i] = clsa::to_float16(values[i]);
          break;
        default:
          host.data_as<clsa::bfloat16>()[offset + i] = clsa::to_bfloat16(values[i]);
          break;
      }
    }
  }
  float at(std::int64_t i) const {
    switch (dtype) {
      case clsa::DType::f32:
        return host.data_as<float>()[i];
      case clsa::DType::f16:
        return clsa::to_float(host.data_as<clsa::float16>()[i]);
      default:
        return clsa::to_float(host.data_as<clsa::bfloat16>()[i]);
    }
  }
  /// The first `count` elements of the device tensor := the host's (in stream order).
  void upload(const cuda_support::OwnedStream& lane, std::int64_t count) {
    lane.upload(device.view().data(), host.view().data(), static_cast<std::size_t>(count) * clsa::dtype_size(dtype));
  }
  void upload(const cuda_support::OwnedStream& lane) { upload(lane, host.numel()); }
  void download(const cuda_support::OwnedStream& lane) {
    lane.download(host.view().data(), device.view().data(), host.bytes());
  }
  /// The leading elements of the device tensor, as a tensor of `shape`.
  clsa::TensorView part(std::initializer_list<std::int64_t> shape) const {
    return clsa::TensorView(device.view().data(), dtype, shape, device.device());
  }
};

/// Layer `layer`'s [slots, 1, heads, head_dim] part of a [layers, slots, 1, heads, head_dim] tensor.
clsa::TensorView layer_part(const clsa::Tensor& tensor, int layer, int slots, int heads, int head_dim) {
  const std::int64_t size = std::int64_t{slots} * heads * head_dim;
  const std::size_t element = clsa::dtype_size(tensor.view().dtype());
  return clsa::TensorView(static_cast<char*>(tensor.view().data()) + static_cast<std::size_t>(layer * size) * element,
                          tensor.view().dtype(), {slots, 1, heads, head_dim}, tensor.device());
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

  /// activation: q's and the outputs' dtype; query: the indexer query's.
  Bucket(int slot_count, const Dims& d, int layers, clsa::Device device, clsa::DType activation, clsa::DType query)
      : slots(slot_count),
        q_index({slots, 1, d.index_heads, d.index_dim}, device, query),
        q({layers, slots, 1, d.q_heads, d.head_dim}, device, activation),
        sparse_out({layers, slots, 1, d.q_heads, d.head_dim}, device, activation),
        dense_out({layers, slots, 1, d.q_heads, d.head_dim}, device, activation),
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

  // Dtypes: K/V and indexer keys as asked; what append() takes and the activations are the
  // 16-bit (or f32) dtype, bf16 where the cache keeps e4m3 (append quantizes).
  const clsa::DType kv_dtype = options.dtype;
  const clsa::DType index_dtype = options.index_dtype.value_or(options.dtype);
  const clsa::DType activation = kv_dtype == clsa::DType::e4m3 ? clsa::DType::bf16 : kv_dtype;
  const clsa::DType key_input = index_dtype == clsa::DType::e4m3 ? clsa::DType::bf16 : index_dtype;
  const bool fp8_keys = index_dtype == clsa::DType::e4m3;
  std::printf("libclsa %s demo: backend %s (%s), K/V %s, indexer keys %s%s\n", clsa::version(),
              clsa::backend_name(backend), clsa::device_name(device).c_str(), clsa::dtype_name(kv_dtype),
              clsa::dtype_name(index_dtype), fp8_keys ? " (one f32 scale per token)" : "");
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
  cache_config.dtype = kv_dtype;
  cache_config.index_dtype = index_dtype;
  if (kv_dtype == clsa::DType::e4m3) {
    // The engine's calibration: per kv head, the largest |K| (|V|) any hidden state of norm <= 1.5
    // can make, |x| * the largest column norm of the head's projection, mapped to 448.
    for (const Matrix* w : {&model.w_k, &model.w_v}) {
      std::vector<float>& scales = w == &model.w_k ? cache_config.k_scales : cache_config.v_scales;
      for (int h = 0; h < d.kv_heads; ++h) {
        const float largest = w->middleCols(h * d.head_dim, d.head_dim).colwise().norm().maxCoeff();
        scales.push_back(1.5f * largest / clsa::kFloat8E4m3Max);
      }
    }
  }
  // What every backend must run for this demo: refused configurations end here, saying why.
  if (!backend_runs(
          "demo", backend,
          {d.index_heads, d.index_dim, options.top_k, d.q_heads, d.kv_heads, d.head_dim, index_dtype, kv_dtype})) {
    return 1;
  }
  clsa::SharedKVCache cache(cache_config, backend);
  const clsa::SequenceId sequence = cache.add_sequence();
  // fp8 keys: a twin cache with the same tokens and bf16 keys, and an indexer over it, for the
  // routing recall of the fp8 keys (the K/V are the same; only the keys' dtype differs).
  std::unique_ptr<clsa::SharedKVCache> reference;
  clsa::SequenceId reference_sequence = clsa::empty_slot;
  if (fp8_keys) {
    clsa::CacheConfig reference_config = cache_config;
    reference_config.dtype = activation;
    reference_config.index_dtype = clsa::DType::bf16;
    reference_config.k_scales.clear();
    reference_config.v_scales.clear();
    reference = std::make_unique<clsa::SharedKVCache>(reference_config, backend);
    reference_sequence = reference->add_sequence();
  }

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
  Staged k_chunk({chunk, d.kv_heads, d.head_dim}, device, activation);
  Staged v_chunk({chunk, d.kv_heads, d.head_dim}, device, activation);
  Staged index_chunk({chunk, d.index_dim}, device, key_input);
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
    const clsa::TensorView k_part = k_chunk.part({tokens, d.kv_heads, d.head_dim});
    const clsa::TensorView v_part = v_chunk.part({tokens, d.kv_heads, d.head_dim});
    const clsa::TensorView index_part = index_chunk.part({tokens, d.index_dim});
    cache.append(sequence, k_part, v_part, index_part, lane.stream());
    if (reference) reference->append(reference_sequence, k_part, v_part, index_part, lane.stream());
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
      bucket = std::make_unique<Bucket>(slots, d, layers, device, activation, key_input);
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

  // The recall reference (fp8 keys): the same indexer configuration over the bf16-key twin,
  // planned once like the loop's, on a batch of its own.
  std::unique_ptr<clsa::CrossLayerIndexer> reference_indexer;
  clsa::CacheBatch reference_batch;
  if (reference) {
    reference_indexer = std::make_unique<clsa::CrossLayerIndexer>(indexer_config, backend);
    reference_indexer->reserve(max_slots, 1, capacity);
    reference_batch = reference->reserve_batch(max_slots, capacity);
  }
  std::vector<std::int32_t> reference_routed(static_cast<std::size_t>(options.top_k));
  double recall_sum = 0.0, recall_min = 1.0;

  // ---- decoding ----
  std::printf("\n%4s %8s %12s %12s %8s %8s %14s %14s%s\n", "step", "tokens", "clsa_ms", "dense_ms", "speedup", "needle",
              "attn_err(l0)", "hidden_err", reference ? "  recall(bf16 keys)" : "");
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
    lane.download(routed.data(), clsa::RoutingRows::of(bucket.routing).row_positions(slot, 0),
                  routed.size() * sizeof(std::int32_t));
    const bool needle_routed =
        std::find(routed.begin(), routed.end(), static_cast<std::int32_t>(needle)) != routed.end();
    needle_routed_steps += needle_routed ? 1 : 0;
    // Routing recall of the fp8 keys: the share of the bf16 keys' routed set (same queries, same
    // tokens) that the fp8 keys routed too.
    char recall_text[32] = "";
    if (reference) {
      reference->batch(ids, reference_batch, lane.stream());
      const clsa::RoutingIndex expected =
          reference_indexer->select(reference_batch, bucket.q_index.device, bucket.weights, lane.stream());
      reference_routed.resize(static_cast<std::size_t>(top_k));
      lane.download(reference_routed.data(), clsa::RoutingRows::of(expected).row_positions(slot, 0),
                    reference_routed.size() * sizeof(std::int32_t));
      std::vector<std::int32_t> mine, theirs;
      for (std::int32_t p : routed) {
        if (p >= 0) mine.push_back(p);
      }
      for (std::int32_t p : reference_routed) {
        if (p >= 0) theirs.push_back(p);
      }
      std::vector<std::int32_t> both;
      std::set_intersection(mine.begin(), mine.end(), theirs.begin(), theirs.end(), std::back_inserter(both));
      const double recall =
          theirs.empty() ? 1.0 : static_cast<double>(both.size()) / static_cast<double>(theirs.size());
      recall_sum += recall;
      recall_min = std::min(recall_min, recall);
      std::snprintf(recall_text, sizeof recall_text, "  %17.4f", recall);
    }
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
    std::printf("%4d %8lld %12.3f %12.3f %7.1fx %8s %14.2e %14.2e%s%s\n", step, static_cast<long long>(last_length),
                clsa_seconds * 1e3, dense_seconds * 1e3, dense_seconds / clsa_seconds,
                needle_routed ? "routed" : "MISSED", attention_error, hidden_error, recall_text,
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
  if (reference) {
    std::printf(
        "routing recall of the e4m3 keys against bf16 keys (the share of the bf16 keys' routed set also routed, "
        "same queries): mean %.4f, min %.4f over %d steps\n",
        recall_sum / options.steps, recall_min, options.steps);
  }

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
  Staged sweep_out({bucket.slots, 1, d.q_heads, d.head_dim}, device, activation);
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
