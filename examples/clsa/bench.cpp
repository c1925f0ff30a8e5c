// `clsa bench`: one decoding step of an L-layer cross-decoder, timed three ways over the SAME
// SharedKVCache (dense, per-layer indexer, CLSA) and each component alone, against the fewest
// bytes each must read and the copy bandwidth measured at start. With --evict-l2-mb the step rows
// are timed again with a stand-in for the decoder's feed-forward weights streamed through the L2
// before every cross-attention layer (its own time measured alone and subtracted).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cuda_support.hpp"
#include "program.hpp"

namespace clsa_program {

namespace {

[[noreturn]] void fail(const std::string& message) {
  throw clsa::Error(clsa::ErrorCode::invalid_argument, message);
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

/// Times body(iteration) on the device or host: warm-up, then the median of `iterations` runs.
class Timer {
 public:
  Timer(clsa::Device device, int warmup, int iterations)
      : warmup_(warmup), iterations_(iterations), stream_(device), marks_(stream_, 2) {}

  /// The timed stream (the default stream {} on the CPU).
  const cuda_support::OwnedStream& owned_stream() const { return stream_; }
  clsa::Stream stream() const { return stream_.stream(); }

  /// Median seconds of body(i), i counting from 0 over warm-up and timed runs.
  double seconds(const std::function<void(int)>& body) {
    std::vector<double> samples;
    for (int i = 0; i < warmup_ + iterations_; ++i) {
      marks_.mark(0);
      body(i);
      marks_.mark(1);
      const double elapsed = marks_.seconds(0, 1);
      if (i >= warmup_) samples.push_back(elapsed);
    }
    return median(samples);
  }

  /// Same, with body(replica) captured once per replica as a CUDA graph and the graphs replayed
  /// in turn (what an engine does for decoding steps). Returns a negative value on the CPU.
  double graph_seconds(int replicas, const std::function<void(int)>& body) {
    if (!stream_.device().is_cuda()) return -1.0;
    std::vector<cuda_support::CapturedGraph> graphs;
    for (int r = 0; r < replicas; ++r)
      graphs.push_back(cuda_support::CapturedGraph::capture(stream(), [&] { body(r); }));
    return seconds([&](int i) { graphs[static_cast<std::size_t>(i % replicas)].replay(stream()); });
  }

  /// Bytes per second of a large device-to-device (or host) copy, counting read + write.
  double copy_bandwidth() {
    const clsa::Device device = stream_.device();
    const std::size_t bytes = device.is_cuda() ? (std::size_t{1} << 30) : (std::size_t{256} << 20);
    clsa::Tensor source = clsa::Tensor::empty({static_cast<std::int64_t>(bytes)}, clsa::DType::i32, device);
    clsa::Tensor target = clsa::Tensor::empty({static_cast<std::int64_t>(bytes)}, clsa::DType::i32, device);
    const std::size_t copy = bytes * 4;
    std::vector<int> host_fill(1 << 20, 7);
    for (std::size_t offset = 0; offset < copy; offset += host_fill.size() * 4) {
      clsa::copy_bytes(static_cast<char*>(source.view().data()) + offset, device, host_fill.data(), clsa::Device::cpu(),
                       std::min(host_fill.size() * 4, copy - offset));
    }
    const double s = seconds([&](int) { stream_.copy_on_device(target.view().data(), source.view().data(), copy); });
    return 2.0 * static_cast<double>(copy) / s;
  }

 private:
  int warmup_, iterations_;
  cuda_support::OwnedStream stream_;
  cuda_support::StreamTimer marks_;  // 0: before the body, 1: after it
};

/// What a real decoder does between two cross-attention layers, as far as the L2 is concerned: the
/// feed-forward block streams its weights (tens to hundreds of MB per layer) through the cache and
/// leaves none of the previous layer's KV, page tables or routing in it. The stand-in streams a
/// buffer of `bytes` instead, on the timed stream, so it captures into a CUDA graph with the step.
///
/// It is a device-to-device copy of the buffer's first half onto its second half
/// (cudaMemcpyAsync), not a cudaMemsetAsync of the whole buffer: (1) half of its traffic is reads,
/// as feed-forward weights are, whereas a memset leaves the whole L2 dirty and the next layer's
/// misses would pay for writing those lines back to DRAM, a cost no real decoder puts there;
/// (2) it is exactly what PyTorch's `copy_` issues, so scripts/bench_torch.py and
/// scripts/bench_flashinfer.py run the identical stand-in. Both halves pass through the L2 (every
/// DRAM access does), so the default 128 MiB touches more than twice the L2 of an H100 (50 MB) or
/// an H200 (60 MB). On the CPU backend it is the same copy with std::memcpy over a host buffer
/// (evicting the CPU's last-level cache instead).
class FeedForwardStandIn {
 public:
  FeedForwardStandIn(clsa::Device device, std::size_t bytes, const cuda_support::OwnedStream& stream)
      : device_(device), half_(bytes / 8 * 4), stream_(stream) {
    if (half_ == 0) return;
    const std::int64_t words = static_cast<std::int64_t>(2 * half_ / 4);
    buffer_ = clsa::Tensor::empty({words}, clsa::DType::i32, device_);
    const std::vector<int> zeros(static_cast<std::size_t>(std::min<std::int64_t>(words, 1 << 20)), 0);
    for (std::int64_t done = 0; done < words; done += static_cast<std::int64_t>(zeros.size())) {
      const std::size_t count = static_cast<std::size_t>(std::min<std::int64_t>(words - done, zeros.size()));
      clsa::copy_bytes(buffer_.data_as<int>() + done, device_, zeros.data(), clsa::Device::cpu(), count * 4);
    }
  }
  bool enabled() const { return half_ > 0; }
  std::size_t bytes() const { return 2 * half_; }
  void operator()() const {
    if (half_ == 0) return;
    char* base = static_cast<char*>(buffer_.view().data());
    stream_.copy_on_device(base + half_, base, half_);
  }

 private:
  clsa::Device device_;
  std::size_t half_;
  const cuda_support::OwnedStream& stream_;
  clsa::Tensor buffer_;
};

struct Row {
  std::string method;  // what was timed
  std::int64_t context;
  int batch;
  double seconds;
  double floor_bytes;           // the fewest bytes the method must read
  double dense_ratio;           // dense step / this (step rows only)
  double layer_ratio;           // per-layer-indexer step / this (CLSA rows only)
  double stand_in_seconds = 0;  // L2 stand-in time subtracted from `seconds` (evicted rows only)
};

/// Stores `x` as element i of a host tensor of `dtype` (f32, f16 or bf16), rounded to it.
void store(const clsa::Tensor& host, clsa::DType dtype, std::int64_t i, float x) {
  switch (dtype) {
    case clsa::DType::f32:
      host.data_as<float>()[i] = x;
      break;
    case clsa::DType::f16:
      host.data_as<clsa::float16>()[i] = clsa::to_float16(x);
      break;
    default:
      host.data_as<clsa::bfloat16>()[i] = clsa::to_bfloat16(x);
      break;
  }
}

/// Random cache content for a context: replicas x batch sequences of `context` tokens, appended
/// in chunks from windows of random device pools (every chunk distinct, never zeros): K/V values of
/// `kv_input`, indexer keys of `key_input` (the cache's dtypes, or bf16 where it keeps e4m3: append
/// quantizes them).
struct BenchCache {
  clsa::SharedKVCache cache;
  std::vector<clsa::SequenceId> ids;
  BenchCache(const clsa::CacheConfig& config, clsa::Backend backend, int sequences, std::int64_t context,
             clsa::DType kv_input, clsa::DType key_input, std::mt19937_64& rng)
      : cache(config, backend) {
    const clsa::Device device = cache.device();
    const std::int64_t chunk = std::min<std::int64_t>(4096, context);
    const std::int64_t row = std::int64_t{config.num_kv_heads} * config.head_dim;
    const std::int64_t window = chunk * std::max<std::int64_t>(row, config.index_dim);
    const std::int64_t pool_size = window + (std::int64_t{1} << 20);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto make_pool = [&](clsa::DType dtype) {
      clsa::Tensor host = clsa::Tensor::empty({pool_size}, dtype);
      for (std::int64_t i = 0; i < pool_size; ++i) store(host, dtype, i, normal(rng));
      return device.is_cpu() ? host : host.to(device);
    };
    const clsa::Tensor kv_pool = make_pool(kv_input);
    const clsa::Tensor key_pool = key_input == kv_input ? kv_pool : make_pool(key_input);
    std::uniform_int_distribution<std::int64_t> offset(0, (std::int64_t{1} << 20) / 8 - 1);
    auto window_at = [&](const clsa::Tensor& pool, std::int64_t elements, std::initializer_list<std::int64_t> shape) {
      const clsa::DType dtype = pool.view().dtype();
      return clsa::TensorView(
          static_cast<char*>(pool.view().data()) + elements * 8 * static_cast<std::int64_t>(clsa::dtype_size(dtype)),
          dtype, shape, device);
    };
    for (int s = 0; s < sequences; ++s) {
      ids.push_back(cache.add_sequence());
      for (std::int64_t done = 0; done < context; done += chunk) {
        const std::int64_t tokens = std::min(chunk, context - done);
        cache.append(ids.back(), window_at(kv_pool, offset(rng), {tokens, config.num_kv_heads, config.head_dim}),
                     window_at(kv_pool, offset(rng), {tokens, config.num_kv_heads, config.head_dim}),
                     window_at(key_pool, offset(rng), {tokens, config.index_dim}));
      }
    }
    clsa::synchronize();
  }
};

clsa::Tensor random_tensor(std::initializer_list<std::int64_t> shape, clsa::DType dtype, clsa::Device device,
                           std::mt19937_64& rng, float scale = 1.0f) {
  clsa::Tensor host = clsa::Tensor::empty(shape, dtype);
  std::normal_distribution<float> normal(0.0f, scale);
  for (std::int64_t i = 0; i < host.numel(); ++i) {
    const float x = normal(rng);
    store(host, dtype, i, dtype == clsa::DType::f32 ? std::abs(x) + 0.01f : x);  // f32 head weights: positive
  }
  return device.is_cpu() ? host : host.to(device);
}

std::string format_bytes(double bytes) {
  char text[32];
  if (bytes >= 1e9) {
    std::snprintf(text, sizeof text, "%.2f GB", bytes / 1e9);
  } else {
    std::snprintf(text, sizeof text, "%.1f MB", bytes / 1e6);
  }
  return text;
}

std::string format_time(double seconds) {
  char text[32];
  if (seconds >= 1e-1) {
    std::snprintf(text, sizeof text, "%.3f s", seconds);
  } else if (seconds >= 1e-3) {
    std::snprintf(text, sizeof text, "%.3f ms", seconds * 1e3);
  } else {
    std::snprintf(text, sizeof text, "%.1f us", seconds * 1e6);
  }
  return text;
}

}  // namespace

int run_bench(const BenchOptions& options) {
  const clsa::Backend backend = clsa::resolve_backend(options.backend);
  const clsa::Device device = clsa::backend_device(backend);
  const std::string description = cuda_support::device_description(device);
  const bool on_gpu = device.is_cuda();
  std::vector<std::int64_t> contexts = options.contexts;
  std::vector<int> batches = options.batches;
  if (contexts.empty())
    contexts = on_gpu ? std::vector<std::int64_t>{8192, 32768, 131072} : std::vector<std::int64_t>{4096, 16384, 32768};
  if (batches.empty()) batches = on_gpu ? std::vector<int>{1, 8, 32} : std::vector<int>{1, 4};
  const int iterations = options.iterations > 0 ? options.iterations : (on_gpu ? 30 : 3);
  const int warmup = on_gpu ? 5 : 1;
  if (options.q_heads % options.kv_heads != 0) fail("--q-heads must be a multiple of --kv-heads");

  // Dtypes: the cache's K/V and indexer keys as asked; the activations (queries, outputs) and what
  // append takes are the K/V dtype, bf16 where the cache keeps e4m3 (append quantizes).
  const clsa::DType kv_dtype = options.dtype;
  const clsa::DType index_dtype = options.index_dtype.value_or(options.dtype);
  const clsa::DType activation = kv_dtype == clsa::DType::e4m3 ? clsa::DType::bf16 : kv_dtype;
  const clsa::DType key_input = index_dtype == clsa::DType::e4m3 ? clsa::DType::bf16 : index_dtype;
  // Refused configurations end here, saying why (e.g. fp8 on the CUDA backend, which has no fp8
  // kernels yet).
  if (!backend_runs("bench", backend,
                    {options.index_heads, options.index_dim, options.top_k, options.q_heads, options.kv_heads,
                     options.head_dim, index_dtype, kv_dtype})) {
    return 1;
  }

  Timer timer(device, warmup, iterations);
  const double copy_bandwidth = timer.copy_bandwidth();
  const clsa::Stream stream = timer.stream();
  std::mt19937_64 rng(options.seed);
  const double bytes_per_token_kv =
      2.0 * options.kv_heads * options.head_dim * static_cast<double>(clsa::dtype_size(kv_dtype));
  // e4m3 keys: each with its f32 scale.
  const double bytes_per_token_index =
      static_cast<double>(options.index_dim) * static_cast<double>(clsa::dtype_size(index_dtype)) +
      (index_dtype == clsa::DType::e4m3 ? 4.0 : 0.0);
  const double l2_bytes = 50e6;

  std::printf("libclsa %s bench: backend %s (%s, %s), K/V %s, indexer keys %s, activations %s\n", clsa::version(),
              clsa::backend_name(backend), clsa::device_name(device).c_str(), description.c_str(),
              clsa::dtype_name(kv_dtype), clsa::dtype_name(index_dtype), clsa::dtype_name(activation));
  std::printf(
      "shape: L=%d layers, Hq=%d Hkv=%d D=%d, indexer H_idx=%d D_idx=%d top_k=%d; median of %d runs after %d "
      "warm-up, inputs rotated past the L2\n",
      options.layers, options.q_heads, options.kv_heads, options.head_dim, options.index_heads, options.index_dim,
      options.top_k, iterations, warmup);
  std::printf("measured copy bandwidth (read + write): %.0f GB/s\n", copy_bandwidth / 1e9);
  if (options.enable_pdl) std::printf("programmatic dependent launch: on (--pdl)\n");
  const std::size_t evict_bytes = static_cast<std::size_t>(options.evict_l2_mb) << 20;
  const FeedForwardStandIn stand_in(device, evict_bytes, timer.owned_stream());
  if (stand_in.enabled()) {
    std::printf(
        "L2 evicted rows: before each cross-attention layer a feed-forward stand-in copies %.0f MiB of a %.0f MiB "
        "%s buffer onto its other half (its own time, measured alone the same way, subtracted)\n",
        static_cast<double>(stand_in.bytes()) / 2 / (1 << 20), static_cast<double>(stand_in.bytes()) / (1 << 20),
        on_gpu ? "device" : "host");
  } else {
    std::printf("L2 evicted rows: off (--evict-l2-mb 0)\n");
  }
  if (options.l2_persist_mb > 0) {
    const std::size_t granted =
        clsa::keep_routed_kv_in_l2(device, static_cast<std::size_t>(options.l2_persist_mb) << 20);
    std::printf("routed K/V kept in a persisting L2 carve-out of %.1f MiB (asked %d MiB)\n",
                static_cast<double>(granted) / (1 << 20), options.l2_persist_mb);
  }
  std::printf("routed K/V: %s\n", options.routed_kv ? "gathered once per step by the indexer (gather_routed_kv)"
                                                    : "gathered from the pool by every layer");
  std::printf("x floor: time / (floor bytes / copy bandwidth)\n\n");

  std::vector<Row> rows;
  std::printf("%-30s %8s %4s %12s %11s %9s %7s %8s %9s %9s\n", "method", "context", "B", "time", "floor", "GB/s",
              "%copy", "x floor", "dense/x", "layer/x");
  for (const std::int64_t context : contexts) {
    // Replicas so that the data of one timed step exceeds the L2 several times over.
    int most_sequences = 0;
    auto replicas_for = [&](int batch) {
      const double step_bytes = batch * static_cast<double>(context) * (bytes_per_token_kv + bytes_per_token_index);
      return static_cast<int>(std::max(1.0, std::ceil(4.0 * l2_bytes / step_bytes)));
    };
    for (int batch : batches) most_sequences = std::max(most_sequences, batch * replicas_for(batch));
    clsa::CacheConfig cache_config;
    cache_config.num_kv_heads = options.kv_heads;
    cache_config.head_dim = options.head_dim;
    cache_config.index_dim = options.index_dim;
    cache_config.page_size = 64;
    cache_config.dtype = kv_dtype;
    cache_config.index_dtype = index_dtype;
    if (kv_dtype == clsa::DType::e4m3) {
      // The data is N(0, 1): one scale each for K and V puts +-4 at the top of the e4m3 range.
      cache_config.k_scales = {4.0f / clsa::kFloat8E4m3Max};
      cache_config.v_scales = {4.0f / clsa::kFloat8E4m3Max};
    }
    cache_config.max_pages = most_sequences * ((context + 63) / 64);
    BenchCache data(cache_config, backend, most_sequences, context, activation, key_input, rng);

    for (int batch : batches) {
      const int replicas = replicas_for(batch);
      std::vector<clsa::CacheBatch> views;
      for (int r = 0; r < replicas; ++r) {
        std::vector<clsa::SequenceId> ids(data.ids.begin() + r * batch, data.ids.begin() + (r + 1) * batch);
        views.push_back(data.cache.batch(ids));
      }
      clsa::IndexerConfig indexer_config;
      indexer_config.num_heads = options.index_heads;
      indexer_config.index_dim = options.index_dim;
      indexer_config.top_k = options.top_k;
      indexer_config.sink_tokens = 4;
      indexer_config.local_window = 64;
      indexer_config.scale = 1.0f / std::sqrt(static_cast<float>(options.index_dim));
      indexer_config.enable_pdl = options.enable_pdl;
      clsa::AttentionConfig attention_config;
      attention_config.num_q_heads = options.q_heads;
      attention_config.num_kv_heads = options.kv_heads;
      attention_config.head_dim = options.head_dim;
      attention_config.enable_pdl = options.enable_pdl;
      clsa::CrossLayerIndexer indexer(indexer_config, backend);
      clsa::SparseCrossAttention sparse(attention_config, backend);
      clsa::DenseCrossAttention dense(attention_config, backend);
      if (options.routed_kv) indexer.gather_routed_kv(cache_config);
      indexer.reserve(batch, 1, context);
      sparse.reserve(batch, 1, options.top_k);
      if (!options.no_baselines) dense.reserve(batch, 1, context);
      const clsa::Tensor q_idx =
          random_tensor({batch, 1, options.index_heads, options.index_dim}, key_input, device, rng);
      const clsa::Tensor weights = random_tensor({batch, 1, options.index_heads}, clsa::DType::f32, device, rng);
      std::vector<clsa::Tensor> queries, outputs;
      for (int l = 0; l < options.layers; ++l) {
        queries.push_back(random_tensor({batch, 1, options.q_heads, options.head_dim}, activation, device, rng, 0.3f));
        outputs.push_back(clsa::Tensor::empty({batch, 1, options.q_heads, options.head_dim}, activation, device));
      }
      // The routing that attention-only timings use (one per replica, computed once), with what the
      // step's own index carries: pool slots, and the routed K/V block when gathered.
      std::vector<clsa::Tensor> routed_positions, routed_counts, routed_slots, routed_kv;
      std::vector<clsa::RoutingIndex> routings;
      for (int r = 0; r < replicas; ++r) {
        routed_positions.push_back(clsa::Tensor::empty({batch, 1, options.top_k}, clsa::DType::i32, device));
        routed_counts.push_back(clsa::Tensor::empty({batch, 1}, clsa::DType::i32, device));
        routed_slots.push_back(clsa::Tensor::empty({batch, 1, options.top_k}, clsa::DType::i32, device));
        clsa::RoutingIndex routing{routed_positions.back(), routed_counts.back(), options.top_k, routed_slots.back()};
        if (options.routed_kv) {
          routed_kv.push_back(
              clsa::Tensor::empty({batch, 1, 2, options.kv_heads, options.top_k, options.head_dim}, kv_dtype, device));
          routing.kv = routed_kv.back();
        }
        routings.push_back(routing);
        indexer.select(views[static_cast<std::size_t>(r)], q_idx, weights, routings.back(), stream);
      }
      clsa::synchronize(stream);

      const double routed = static_cast<double>(std::min<std::int64_t>(options.top_k, context));
      const double index_bytes = batch * static_cast<double>(context) * bytes_per_token_index;
      const double sparse_bytes = batch * routed * bytes_per_token_kv;
      const double dense_bytes = batch * static_cast<double>(context) * bytes_per_token_kv;
      const int L = options.layers;
      auto view_of = [&](int i) -> const clsa::CacheBatch& { return views[static_cast<std::size_t>(i % replicas)]; };
      // The steps, with (evict) or without the feed-forward stand-in before each cross-attention
      // layer's work: before the select + first layer of the CLSA step, before each layer's select
      // + forward of the per-layer step, before each dense layer. L stand-ins per step in each.
      auto clsa_step_with = [&](int i, bool evict) {
        if (evict) stand_in();
        const clsa::RoutingIndex routing = indexer.select(view_of(i), q_idx, weights, stream);
        for (int l = 0; l < L; ++l) {
          if (evict && l > 0) stand_in();
          sparse.forward(view_of(i), routing, queries[static_cast<std::size_t>(l)],
                         outputs[static_cast<std::size_t>(l)], stream);
        }
      };
      auto per_layer_step_with = [&](int i, bool evict) {
        for (int l = 0; l < L; ++l) {
          if (evict) stand_in();
          const clsa::RoutingIndex routing = indexer.select(view_of(i), q_idx, weights, stream);
          sparse.forward(view_of(i), routing, queries[static_cast<std::size_t>(l)],
                         outputs[static_cast<std::size_t>(l)], stream);
        }
      };
      auto dense_step_with = [&](int i, bool evict) {
        for (int l = 0; l < L; ++l) {
          if (evict) stand_in();
          dense.forward(view_of(i), queries[static_cast<std::size_t>(l)], outputs[static_cast<std::size_t>(l)], stream);
        }
      };
      auto sparse_layer_with = [&](int i, bool evict) {
        if (evict) stand_in();
        sparse.forward(view_of(i), routings[static_cast<std::size_t>(i % replicas)], queries[0], outputs[0], stream);
      };
      auto clsa_step = [&](int i) { clsa_step_with(i, false); };
      const double t_indexer = timer.seconds([&](int i) { indexer.select(view_of(i), q_idx, weights, stream); });
      const double t_sparse = timer.seconds([&](int i) { sparse_layer_with(i, false); });
      const bool baselines = !options.no_baselines;
      const double t_dense_layer =
          baselines ? timer.seconds([&](int i) { dense.forward(view_of(i), queries[0], outputs[0], stream); }) : 0.0;
      const double t_clsa = timer.seconds(clsa_step);
      const double t_clsa_graph = timer.graph_seconds(replicas, clsa_step);
      const double t_per_layer = baselines ? timer.seconds([&](int i) { per_layer_step_with(i, false); }) : 0.0;
      const double t_dense = baselines ? timer.seconds([&](int i) { dense_step_with(i, false); }) : 0.0;
      const double clsa_best = t_clsa_graph > 0 ? std::min(t_clsa, t_clsa_graph) : t_clsa;

      const double clsa_bytes = index_bytes + L * sparse_bytes;
      const double per_layer_bytes = L * (index_bytes + sparse_bytes);
      std::vector<Row> all = {
          {"indexer (select)", context, batch, t_indexer, index_bytes, 0, 0},
          {"sparse layer", context, batch, t_sparse, sparse_bytes, 0, 0},
      };
      if (baselines) {
        all.push_back({"dense layer", context, batch, t_dense_layer, dense_bytes, 0, 0});
        all.push_back({"dense step", context, batch, t_dense, L * dense_bytes, 1.0, 0});
        all.push_back({"per-layer step", context, batch, t_per_layer, per_layer_bytes, t_dense / t_per_layer, 0});
      }
      all.push_back({"clsa step", context, batch, t_clsa, clsa_bytes, t_dense / t_clsa, t_per_layer / t_clsa});
      if (t_clsa_graph > 0) {
        all.push_back({"clsa step (graph)", context, batch, t_clsa_graph, clsa_bytes, t_dense / t_clsa_graph,
                       t_per_layer / t_clsa_graph});
      }
      if (stand_in.enabled()) {
        // The same rows with the stand-in in the timed step; the stand-ins alone (same count per
        // step, same eager or graph mode, same timer) are subtracted.
        auto stand_ins = [&](int count) {
          return [&, count](int) {
            for (int c = 0; c < count; ++c) stand_in();
          };
        };
        const double s_one = timer.seconds(stand_ins(1));
        const double s_step = timer.seconds(stand_ins(L));
        const double s_step_graph = timer.graph_seconds(replicas, stand_ins(L));
        const double e_sparse = timer.seconds([&](int i) { sparse_layer_with(i, true); }) - s_one;
        const double e_clsa = timer.seconds([&](int i) { clsa_step_with(i, true); }) - s_step;
        const double e_clsa_graph =
            t_clsa_graph > 0 ? timer.graph_seconds(replicas, [&](int i) { clsa_step_with(i, true); }) - s_step_graph
                             : -1.0;
        const double e_per_layer =
            baselines ? timer.seconds([&](int i) { per_layer_step_with(i, true); }) - s_step : 0.0;
        const double e_dense = baselines ? timer.seconds([&](int i) { dense_step_with(i, true); }) - s_step : 0.0;
        std::printf("stand-in alone: %s per layer (eager), %s per step of %d (graph)\n", format_time(s_one).c_str(),
                    format_time(s_step_graph).c_str(), L);
        all.push_back({"sparse layer (cold L2)", context, batch, e_sparse, sparse_bytes, 0, 0, s_one});
        if (baselines) {
          all.push_back({"dense step (L2 evicted)", context, batch, e_dense, L * dense_bytes, 1.0, 0, s_step});
          all.push_back({"per-layer step (L2 evicted)", context, batch, e_per_layer, per_layer_bytes,
                         e_dense / e_per_layer, 0, s_step});
        }
        all.push_back({"clsa step (L2 evicted)", context, batch, e_clsa, clsa_bytes, e_dense / e_clsa,
                       e_per_layer / e_clsa, s_step});
        if (t_clsa_graph > 0) {
          all.push_back({"clsa step (graph) (L2 evicted)", context, batch, e_clsa_graph, clsa_bytes,
                         e_dense / e_clsa_graph, e_per_layer / e_clsa_graph, s_step_graph});
        }
      }
      (void)clsa_best;
      for (const Row& row : all) {
        const double rate = row.floor_bytes / row.seconds;
        char dense_ratio[16] = "", layer_ratio[16] = "";
        if (row.dense_ratio > 0) std::snprintf(dense_ratio, sizeof dense_ratio, "%.1fx", row.dense_ratio);
        if (row.layer_ratio > 0) std::snprintf(layer_ratio, sizeof layer_ratio, "%.1fx", row.layer_ratio);
        std::printf("%-30s %8lld %4d %12s %11s %9.0f %6.1f%% %7.2fx %9s %9s\n", row.method.c_str(),
                    static_cast<long long>(row.context), row.batch, format_time(row.seconds).c_str(),
                    format_bytes(row.floor_bytes).c_str(), rate / 1e9, 100.0 * rate / copy_bandwidth,
                    copy_bandwidth / rate, dense_ratio, layer_ratio);
        rows.push_back(row);
      }
      std::printf("\n");
      std::fflush(stdout);
    }
  }

  auto rate = [&](const Row& row) { return row.floor_bytes / row.seconds; };
  if (!options.json.empty()) {
    std::ofstream out(options.json);
    out << "{\n  \"version\": \"" << clsa::version() << "\",\n  \"backend\": \"" << clsa::backend_name(backend)
        << "\",\n  \"device\": \"" << clsa::device_name(device) << "\",\n  \"device_name\": \"" << description
        << "\",\n  \"dtype\": \"" << clsa::dtype_name(kv_dtype) << "\",\n  \"index_dtype\": \""
        << clsa::dtype_name(index_dtype) << "\",\n  \"activation_dtype\": \"" << clsa::dtype_name(activation)
        << "\",\n  \"copy_bandwidth_bytes_per_s\": " << copy_bandwidth
        << ",\n  \"shape\": {\"layers\": " << options.layers << ", \"q_heads\": " << options.q_heads
        << ", \"kv_heads\": " << options.kv_heads << ", \"head_dim\": " << options.head_dim
        << ", \"index_heads\": " << options.index_heads << ", \"index_dim\": " << options.index_dim
        << ", \"top_k\": " << options.top_k << "},\n  \"evict_l2_bytes\": " << stand_in.bytes() << ",\n  \"rows\": [\n";
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const Row& row = rows[i];
      out << "    {\"method\": \"" << row.method << "\", \"context\": " << row.context << ", \"batch\": " << row.batch
          << ", \"seconds\": " << row.seconds << ", \"floor_bytes\": " << row.floor_bytes
          << ", \"bytes_per_s\": " << rate(row) << ", \"copy_fraction\": " << rate(row) / copy_bandwidth
          << ", \"x_floor\": " << copy_bandwidth / rate(row) << ", \"dense_over_this\": " << row.dense_ratio
          << ", \"per_layer_over_this\": " << row.layer_ratio << ", \"stand_in_seconds\": " << row.stand_in_seconds
          << "}" << (i + 1 < rows.size() ? ",\n" : "\n");
    }
    out << "  ]\n}\n";
    if (!out) fail("could not write " + options.json);
  }
  if (!options.csv.empty()) {
    std::ofstream out(options.csv);
    out << "method,context,batch,seconds,floor_bytes,bytes_per_s,copy_fraction,dense_over_this,per_layer_over_this,"
           "x_floor,stand_in_seconds\n";
    for (const Row& row : rows) {
      out << row.method << ',' << row.context << ',' << row.batch << ',' << row.seconds << ',' << row.floor_bytes << ','
          << rate(row) << ',' << rate(row) / copy_bandwidth << ',' << row.dense_ratio << ',' << row.layer_ratio << ','
          << copy_bandwidth / rate(row) << ',' << row.stand_in_seconds << '\n';
    }
    if (!out) fail("could not write " + options.csv);
  }
  return 0;
}

}  // namespace clsa_program
