// The decode loop the way an inference engine runs it: ONE set of components per backend, planned
// once for the largest batch, then hundreds of steps of continuous batching over one cache:
// batch sizes that change every step, sequences that grow, join and leave, T = 1 and T = 4. On
// CUDA the step (select + sparse layers + a dense layer) is captured once per batch bucket
// (empty slots pad a bucket) and replayed while the contexts grow.
//
// Every step is held against fresh objects planned with the same bounds and run eagerly on the
// same inputs (bitwise equal), empty slots must route nothing and write zeros, and on CUDA a CPU
// twin of the cache must route the same sets (exact data) with attention within tolerance.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <utility>

#include "catch.hpp"
#include "cuda_support.hpp"
#include "fixtures.hpp"
#include "support.hpp"

namespace {

using clsa::SequenceId;

constexpr int kMaxBatch = 32;
constexpr int kMaxTokens = 4;
constexpr std::int64_t kMaxLength = 2048;
constexpr int kLayers = 2;
constexpr int kBuckets[] = {1, 4, 16, 32};
constexpr test::StepShape kShape{8, 2, 64, 4, 64, 16};  // Hq, Hkv, D, H_idx, D_idx, page size
constexpr int kQHeads = kShape.q_heads, kKvHeads = kShape.kv_heads, kHeadDim = kShape.head_dim;
constexpr int kIndexHeads = kShape.index_heads, kIndexDim = kShape.index_dim;
constexpr int kTopK = 64;
constexpr int kMaxLive = 48;

int loop_steps() {
  // Sanitizer runs may shorten the loop; the default is what CI runs.
  if (const char* value = std::getenv("CLSA_ENGINE_LOOP_STEPS")) return std::max(1, std::atoi(value));
  return 200;
}

clsa::CacheConfig loop_cache_config() {
  return kShape.cache_config(kMaxLive * (kMaxLength / kShape.page_size + 1));
}

clsa::IndexerConfig loop_indexer_config() {
  return kShape.indexer_config(kTopK, /*sink_tokens*/ 2, /*local_window*/ 8);
}

/// What an engine builds once per backend: the components, planned for the largest step. gather:
/// the indexer gathers the routed K/V rows once per step (gather_routed_kv); pdl: their kernels
/// launch as programmatic dependents (enable_pdl).
test::Components loop_components(clsa::Backend backend, bool gather, bool pdl = false) {
  const clsa::CacheConfig cache_config = loop_cache_config();
  clsa::IndexerConfig indexer_config = loop_indexer_config();
  clsa::AttentionConfig attention_config = kShape.attention_config();
  indexer_config.enable_pdl = pdl;
  attention_config.enable_pdl = pdl;
  return test::Components(backend, indexer_config, attention_config, kMaxBatch, kMaxTokens, kMaxLength,
                          gather ? &cache_config : nullptr);
}

/// One step's input and output tensors for a batch of B slots and T tokens, on one device.
struct StepTensors {
  clsa::Tensor q_idx, weights, dense_out, dense_lse;
  std::vector<clsa::Tensor> q, sparse_out, sparse_lse;
  StepTensors(int slots, int tokens, clsa::Device device) {
    q_idx = clsa::Tensor::empty({slots, tokens, kIndexHeads, kIndexDim}, clsa::DType::bf16, device);
    weights = clsa::Tensor::empty({slots, tokens, kIndexHeads}, clsa::DType::f32, device);
    dense_out = clsa::Tensor::empty({slots, tokens, kQHeads, kHeadDim}, clsa::DType::bf16, device);
    dense_lse = clsa::Tensor::empty({slots, tokens, kQHeads}, clsa::DType::f32, device);
    for (int l = 0; l < kLayers; ++l) {
      q.push_back(clsa::Tensor::empty({slots, tokens, kQHeads, kHeadDim}, clsa::DType::bf16, device));
      sparse_out.push_back(clsa::Tensor::empty({slots, tokens, kQHeads, kHeadDim}, clsa::DType::bf16, device));
      sparse_lse.push_back(clsa::Tensor::empty({slots, tokens, kQHeads}, clsa::DType::f32, device));
    }
  }
};

using test::StepInputs;

/// One step's inputs on the host (the same values go to every backend).
StepInputs random_inputs(int slots, int tokens, test::Rng& rng) {
  return test::random_step_inputs(kShape, slots, tokens, rng, clsa::Device::cpu(), kLayers);
}

void upload(const StepInputs& inputs, StepTensors& tensors) {
  tensors.q_idx.copy_from(inputs.q_idx_t);
  tensors.weights.copy_from(inputs.weights_t);
  for (int l = 0; l < kLayers; ++l)
    tensors.q[static_cast<std::size_t>(l)].copy_from(inputs.q_t[static_cast<std::size_t>(l)]);
}

/// A step's results, read back to the host.
struct StepResult {
  std::vector<std::int32_t> positions, counts;
  std::vector<std::vector<double>> sparse, sparse_lse;
  std::vector<double> dense, dense_lse;
};

StepResult read_result(const clsa::RoutingIndex& routing, const StepTensors& tensors) {
  StepResult result;
  result.positions = test::read_ints(routing.positions);
  result.counts = test::read_ints(routing.counts);
  for (int l = 0; l < kLayers; ++l) {
    result.sparse.push_back(test::read_values(tensors.sparse_out[static_cast<std::size_t>(l)]));
    result.sparse_lse.push_back(test::read_values(tensors.sparse_lse[static_cast<std::size_t>(l)]));
  }
  result.dense = test::read_values(tensors.dense_out);
  result.dense_lse = test::read_values(tensors.dense_lse);
  return result;
}

/// The step as an engine enqueues it: one select, the sparse layers, one dense layer.
clsa::RoutingIndex enqueue_step(test::Components& components, const clsa::CacheBatch& batch, StepTensors& tensors,
                                clsa::Stream stream) {
  const clsa::RoutingIndex routing = components.indexer.select(batch, tensors.q_idx, tensors.weights, stream);
  for (int l = 0; l < kLayers; ++l) {
    const std::size_t i = static_cast<std::size_t>(l);
    components.sparse.forward(batch, routing, tensors.q[i], tensors.sparse_out[i], stream, tensors.sparse_lse[i]);
  }
  components.dense.forward(batch, tensors.q[0], tensors.dense_out, stream, tensors.dense_lse);
  return routing;
}

/// The cache population of the loop, mirrored into a CPU twin when the cache is on CUDA.
struct Population {
  clsa::CacheConfig config;
  clsa::SharedKVCache cache;
  std::unique_ptr<clsa::SharedKVCache> twin;
  struct Live {
    SequenceId id, twin_id;
    std::int64_t length;
    test::SequenceData data;  // for the oracle
  };
  std::vector<Live> live;
  clsa::Stream stream;  // appends go on the engine's stream, in order with the steps

  Population(clsa::Backend backend, bool with_twin) : config(loop_cache_config()), cache(config, backend) {
    if (with_twin) twin = std::make_unique<clsa::SharedKVCache>(config, clsa::Backend::cpu);
  }

  void append(Live& sequence, std::int64_t tokens, test::Rng& rng) {
    const std::int64_t row = std::int64_t{kKvHeads} * kHeadDim;
    auto draw = [&](std::int64_t count) {
      std::vector<double> values(static_cast<std::size_t>(count));
      for (double& x : values) x = rng.uniform(-3, 3);
      return values;
    };
    const std::vector<double> k = draw(tokens * row), v = draw(tokens * row), keys = draw(tokens * kIndexDim);
    const clsa::Tensor k_host = test::make_host(k, config.dtype, {tokens, kKvHeads, kHeadDim});
    const clsa::Tensor v_host = test::make_host(v, config.dtype, {tokens, kKvHeads, kHeadDim});
    const clsa::Tensor keys_host = test::make_host(keys, config.dtype, {tokens, kIndexDim});
    const clsa::Device device = cache.device();
    auto there = [&](const clsa::Tensor& host) { return device.is_cpu() ? host : host.to(device); };
    cache.append(sequence.id, there(k_host), there(v_host), there(keys_host), stream);
    if (twin) twin->append(sequence.twin_id, k_host, v_host, keys_host);
    sequence.data.k.insert(sequence.data.k.end(), k.begin(), k.end());
    sequence.data.v.insert(sequence.data.v.end(), v.begin(), v.end());
    sequence.data.index_keys.insert(sequence.data.index_keys.end(), keys.begin(), keys.end());
    sequence.data.length += tokens;
    sequence.length += tokens;
  }

  void join(test::Rng& rng) {
    Live sequence{cache.add_sequence(), twin ? twin->add_sequence() : clsa::empty_slot, 0, {}};
    const std::int64_t prompt = rng.uniform(8, kMaxLength - 16);
    append(sequence, prompt / 2, rng);  // a prompt in two chunks
    append(sequence, prompt - prompt / 2, rng);
    live.push_back(std::move(sequence));
  }

  void leave(std::size_t i) {
    cache.release(live[i].id);
    if (twin) twin->release(live[i].twin_id);
    live.erase(live.begin() + static_cast<std::ptrdiff_t>(i));
  }
};

int bucket_for(int sequences) {
  for (int bucket : kBuckets) {
    if (bucket >= sequences) return bucket;
  }
  return kMaxBatch;
}

/// Requires a and b to be bitwise equal, naming the step and what differs.
void require_same(const StepResult& a, const StepResult& b, int step) {
  INFO("step " << step << ": reused components vs fresh ones, same inputs");
  REQUIRE(a.counts == b.counts);
  REQUIRE(a.positions == b.positions);
  for (int l = 0; l < kLayers; ++l) {
    INFO("sparse layer " << l);
    REQUIRE(a.sparse[static_cast<std::size_t>(l)] == b.sparse[static_cast<std::size_t>(l)]);
    REQUIRE(a.sparse_lse[static_cast<std::size_t>(l)] == b.sparse_lse[static_cast<std::size_t>(l)]);
  }
  REQUIRE(a.dense == b.dense);
  REQUIRE(a.dense_lse == b.dense_lse);
}

/// Empty slots (rows of slots >= live) route nothing and write zeros (lse -inf).
void require_empty_slots(const StepResult& result, int live, int slots, int tokens, int step) {
  INFO("step " << step << ": empty slots " << live << ".." << slots - 1);
  for (int b = live; b < slots; ++b) {
    for (int t = 0; t < tokens; ++t) {
      const std::size_t row = static_cast<std::size_t>(b * tokens + t);
      REQUIRE(result.counts[row] == 0);
      for (int i = 0; i < kTopK; ++i) REQUIRE(result.positions[row * kTopK + static_cast<std::size_t>(i)] == -1);
      for (int h = 0; h < kQHeads; ++h) {
        const std::size_t head = row * kQHeads + static_cast<std::size_t>(h);
        REQUIRE(std::isinf(result.dense_lse[head]));
        REQUIRE(result.dense_lse[head] < 0);
        for (int d = 0; d < kHeadDim; ++d) {
          REQUIRE(result.dense[head * kHeadDim + static_cast<std::size_t>(d)] == 0.0);
          REQUIRE(result.sparse[0][head * kHeadDim + static_cast<std::size_t>(d)] == 0.0);
        }
      }
    }
  }
}

/// Routing of every live row against the double-precision oracle (exact data: equal sets).
void require_oracle_routing(const StepResult& result, const std::vector<const test::SequenceData*>& sequences,
                            const StepInputs& inputs, int step) {
  const int tokens = inputs.tokens;
  const clsa::IndexerConfig ic = loop_indexer_config();
  for (std::size_t b = 0; b < sequences.size(); ++b) {
    for (int t = 0; t < tokens; ++t) {
      const std::size_t row = b * static_cast<std::size_t>(tokens) + static_cast<std::size_t>(t);
      const std::vector<std::int32_t> expected = inputs.oracle_row(*sequences[b], static_cast<int>(b), t, ic);
      const std::vector<std::int32_t> routed(
          result.positions.begin() + static_cast<std::ptrdiff_t>(row * kTopK),
          result.positions.begin() + static_cast<std::ptrdiff_t>(row * kTopK + expected.size()));
      INFO("step " << step << ", slot " << b << ", token " << t << ": routing vs the oracle");
      REQUIRE(result.counts[row] == static_cast<std::int32_t>(expected.size()));
      REQUIRE(routed == expected);
    }
  }
}

/// A captured step of one (bucket, T): its tensors, the batch it reads, the graph.
struct CapturedStep {
  std::unique_ptr<StepTensors> tensors;
  clsa::CacheBatch batch;
  clsa::RoutingIndex routing;
  cuda_support::CapturedGraph graph;
};

void run_engine_loop(clsa::Backend backend, bool gather, bool pdl = false) {
  const bool on_cuda = backend == clsa::Backend::cuda;
  test::Rng rng(test::base_seed() + 80);
  Population population(backend, on_cuda);
  const clsa::Device device = population.cache.device();
  test::Components components = loop_components(backend, gather, pdl);  // the engine's one set of components
  std::unique_ptr<test::Components> twin_components;                    // CUDA: the CPU reference twin (reads the pool)
  if (on_cuda) twin_components = std::make_unique<test::Components>(loop_components(clsa::Backend::cpu, false));
  clsa::CacheBatch cpu_batch = population.cache.reserve_batch(kMaxBatch, kMaxLength);  // CPU backend
  clsa::CacheBatch twin_batch;
  std::map<std::pair<int, int>, std::unique_ptr<StepTensors>> eager_tensors;  // CPU backend, by (slots, T)
  const cuda_support::OwnedStream engine_stream(device);  // CUDA: the engine's stream (none on the CPU)
  population.stream = engine_stream.stream();
  std::map<std::pair<int, int>, std::unique_ptr<CapturedStep>> graphs;  // CUDA: by (bucket, T)
  const int pattern[] = {1, 16, 3, 32, 1, 7, 32, 2, 24, 5, 12, 32, 9, 1, 20};
  const int steps = loop_steps();
  int replays = 0, captures = 0, most_live = 0;
  std::int64_t longest = 0;
  for (int step = 0; step < steps; ++step) {
    // Sequences leave (done, or at random) and join (a prompt, prefilled in two chunks).
    for (std::size_t i = population.live.size(); i-- > 0;) {
      if (population.live[i].length >= kMaxLength - 8 || rng.uniform(0, 39) == 0) population.leave(i);
    }
    const int sequences = step < static_cast<int>(sizeof(pattern) / sizeof(pattern[0]))
                              ? pattern[step]
                              : (rng.uniform(0, 3) == 0 ? kMaxBatch : rng.uniform(1, kMaxBatch));
    while (static_cast<int>(population.live.size()) < std::min(kMaxLive, sequences + rng.uniform(0, 4))) {
      population.join(rng);
    }
    const int tokens = step % 3 == 2 ? kMaxTokens : 1;
    // This step's batch: `sequences` live ones in random order, each given T new tokens.
    std::vector<std::size_t> order(population.live.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng.engine);
    order.resize(static_cast<std::size_t>(sequences));
    const int slots =
        on_cuda ? bucket_for(sequences) : std::min(kMaxBatch, sequences + step % 2);  // CPU: sometimes an empty slot
    std::vector<SequenceId> ids(static_cast<std::size_t>(slots), clsa::empty_slot);
    std::vector<SequenceId> twin_ids(static_cast<std::size_t>(slots), clsa::empty_slot);
    std::vector<const test::SequenceData*> data;
    for (std::size_t b = 0; b < order.size(); ++b) {
      Population::Live& sequence = population.live[order[b]];
      population.append(sequence, tokens, rng);
      ids[b] = sequence.id;
      twin_ids[b] = sequence.twin_id;
      data.push_back(&sequence.data);
      longest = std::max(longest, sequence.length);
    }
    most_live = std::max(most_live, static_cast<int>(population.live.size()));
    const StepInputs inputs = random_inputs(slots, tokens, rng);

    StepResult result;
    const clsa::CacheBatch* batch = &cpu_batch;
    StepTensors* tensors = nullptr;
    if (!on_cuda) {
      population.cache.batch(ids, cpu_batch);
      auto& owned = eager_tensors[{slots, tokens}];
      if (!owned) owned = std::make_unique<StepTensors>(slots, tokens, device);
      tensors = owned.get();
      upload(inputs, *tensors);
      const clsa::RoutingIndex routing = enqueue_step(components, cpu_batch, *tensors, {});
      result = read_result(routing, *tensors);
    }
    if (on_cuda) {
      const clsa::Stream stream = engine_stream.stream();
      auto& captured = graphs[{slots, tokens}];
      const bool fresh_bucket = !captured;
      if (fresh_bucket) {
        captured = std::make_unique<CapturedStep>();
        captured->tensors = std::make_unique<StepTensors>(slots, tokens, device);
        captured->batch = population.cache.reserve_batch(slots, kMaxLength);
      }
      // Refill the bucket's tables in place and copy the inputs in, on the stream; then replay.
      population.cache.batch(ids, captured->batch, stream);
      tensors = captured->tensors.get();
      upload(inputs, *tensors);
      if (fresh_bucket) {
        CapturedStep& fresh = *captured;
        fresh.graph = cuda_support::CapturedGraph::capture(
            stream, [&] { fresh.routing = enqueue_step(components, fresh.batch, *tensors, stream); });
        ++captures;
      }
      // Poison the outputs: every value read back must have been written by this replay.
      for (const clsa::Tensor* out : {&tensors->dense_out, &tensors->sparse_out[0], &tensors->sparse_out[1]}) {
        engine_stream.fill(out->view().data(), 0xff, out->bytes());
      }
      captured->graph.replay(stream);
      engine_stream.wait();
      ++replays;
      components.indexer.check_status();
      components.dense.check_status();
      result = read_result(captured->routing, *tensors);
      batch = &captured->batch;
    }
    // Fresh objects planned with the same bounds, eagerly on the same batch and inputs.
    {
      test::Components fresh = loop_components(backend, gather, pdl);
      StepTensors fresh_tensors(slots, tokens, device);
      upload(inputs, fresh_tensors);
      const clsa::RoutingIndex routing = enqueue_step(fresh, *batch, fresh_tensors, engine_stream.stream());
      engine_stream.wait();
      require_same(result, read_result(routing, fresh_tensors), step);
    }
    require_empty_slots(result, sequences, slots, tokens, step);
    if (!on_cuda && step % 10 == 0) require_oracle_routing(result, data, inputs, step);
    if (on_cuda) {
      // The CPU backend on a twin of the cache: the same routed sets (exact data), attention
      // within the bf16 tolerance.
      population.twin->batch(twin_ids, twin_batch);
      StepTensors twin_tensors(slots, tokens, clsa::Device::cpu());
      upload(inputs, twin_tensors);
      const StepResult expected =
          read_result(enqueue_step(*twin_components, twin_batch, twin_tensors, {}), twin_tensors);
      INFO("step " << step << ": CUDA vs the CPU backend");
      REQUIRE(result.counts == expected.counts);
      REQUIRE(result.positions == expected.positions);
      const test::Tolerance tolerance = test::output_tolerance(clsa::DType::bf16);
      for (int l = 0; l < kLayers; ++l) {
        const std::vector<double>& got = result.sparse[static_cast<std::size_t>(l)];
        const std::vector<double>& want = expected.sparse[static_cast<std::size_t>(l)];
        // Name the worst query row, so that a failure says where to look.
        std::size_t worst = 0;
        double worst_error = -1.0;
        for (std::size_t i = 0; i < got.size(); ++i) {
          const double error = std::abs(got[i] - want[i]);
          if (!(error <= worst_error)) {
            worst_error = error;
            worst = i;
          }
        }
        const std::size_t row = worst / (kQHeads * kHeadDim);
        INFO("layer " << l << ", worst row " << row << " (slot " << row / static_cast<std::size_t>(tokens) << ", token "
                      << row % static_cast<std::size_t>(tokens) << " of " << tokens << ", " << slots << " slots), head "
                      << worst % (kQHeads * kHeadDim) / kHeadDim << ": routed count " << result.counts[row] << ", got "
                      << got[worst] << ", want " << want[worst]);
        REQUIRE(test::tolerance_ratio(got, want, tolerance.atol, tolerance.rtol) <= 1.0);
      }
      REQUIRE(test::tolerance_ratio(result.dense, expected.dense, tolerance.atol, tolerance.rtol) <= 1.0);
    }
  }
  // The loop did what it claims: many sizes, growth, graphs replayed far more than captured.
  CHECK(most_live >= kMaxBatch);
  CHECK(longest > kMaxLength - 64);
  if (on_cuda) {
    CHECK(captures <= static_cast<int>(sizeof(kBuckets) / sizeof(kBuckets[0])) * 2);
    CHECK(replays == steps);
  }
}

}  // namespace

TEST_CASE("engine loop: one set of components, changing batches, growing contexts (cpu)", "[engine_loop]") {
  run_engine_loop(clsa::Backend::cpu, false);
}

TEST_CASE("engine loop: the same with the routed K/V gathered once per step (cpu)", "[engine_loop]") {
  run_engine_loop(clsa::Backend::cpu, true);
}

TEST_CASE("engine loop: one graph per batch bucket replayed while contexts grow (cuda)", "[engine_loop][cuda]") {
  CLSA_SKIP_WITHOUT_GPU();
  run_engine_loop(clsa::Backend::cuda, false);
}

TEST_CASE("engine loop: graphs over the routed K/V gathered once per step (cuda)", "[engine_loop][cuda]") {
  CLSA_SKIP_WITHOUT_GPU();
  run_engine_loop(clsa::Backend::cuda, true);
}

TEST_CASE("engine loop: graphs with programmatic dependent launch (cuda)", "[engine_loop][cuda]") {
  CLSA_SKIP_WITHOUT_GPU();
  run_engine_loop(clsa::Backend::cuda, true, /*pdl*/ true);
}
