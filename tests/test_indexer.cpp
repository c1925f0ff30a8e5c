// CrossLayerIndexer against the double-precision oracle: routed sets, sinks, window, causality,
// ties, NaN, the needle, and CPU/CUDA agreement.
#include <algorithm>
#include <cmath>
#include <functional>
#include <iterator>
#include <limits>
#include <set>
#include <utility>

#include "catch.hpp"
#include "support.hpp"

namespace {

using clsa::DType;
using clsa::IndexerConfig;

/// Query-side inputs of one select() and what it routed, per row (b, t), sorted.
struct IndexerRun {
  int tokens = 0;
  std::vector<double> q;  // [B, T, H, Didx], as stored (rounded to the dtype)
  std::vector<double> w;  // [B, T, H]
  std::vector<std::vector<std::int32_t>> routed;
};

enum class QueryValues { gaussian, small_integers };

/// Random query-side inputs of one select(): q_idx [B, T, H, Didx] of the cache's dtype and head
/// weights [B, T, H], as host values (rounded as stored) and as tensors on the backend's device.
struct IndexerInputs {
  std::vector<double> q, w;
  clsa::Tensor q_tensor, w_tensor;
};

IndexerInputs make_inputs(const test::CacheFixture& fixture, const IndexerConfig& config, int tokens, test::Rng& rng,
                          QueryValues values, clsa::Backend backend, DType weights_dtype = DType::f32) {
  const std::int64_t sequences = static_cast<std::int64_t>(fixture.ids.size());
  IndexerInputs inputs;
  inputs.q.resize(static_cast<std::size_t>(sequences * tokens * config.num_heads * config.index_dim));
  inputs.w.resize(static_cast<std::size_t>(sequences * tokens * config.num_heads));
  for (double& x : inputs.q) {
    x = values == QueryValues::gaussian ? rng.normal() : rng.uniform(-3, 3);
    x = test::round_to(fixture.config.dtype, x);
  }
  for (double& x : inputs.w) {
    x = values == QueryValues::gaussian ? rng.normal() : rng.uniform(-2, 3);
    x = test::round_to(weights_dtype, x);
  }
  inputs.q_tensor = test::on_device(
      test::make_host(inputs.q, fixture.config.dtype, {sequences, tokens, config.num_heads, config.index_dim}),
      backend);
  inputs.w_tensor =
      test::on_device(test::make_host(inputs.w, weights_dtype, {sequences, tokens, config.num_heads}), backend);
  return inputs;
}

/// One select() of `tokens` query tokens per sequence, checked for the index's shape, order, -1
/// padding and pool slots; with calls > 1 the same indexer selects again on the same inputs (its
/// workspace reused), each time the same index.
IndexerRun run_indexer(test::CacheFixture& fixture, const IndexerConfig& config, int tokens, test::Rng& rng,
                       QueryValues values, clsa::Backend backend, DType weights_dtype = DType::f32, int calls = 1) {
  const std::int64_t sequences = static_cast<std::int64_t>(fixture.ids.size());
  IndexerInputs inputs = make_inputs(fixture, config, tokens, rng, values, backend, weights_dtype);
  IndexerRun run;
  run.tokens = tokens;
  run.q = std::move(inputs.q);
  run.w = std::move(inputs.w);
  clsa::CrossLayerIndexer indexer(config, backend);
  const clsa::CacheBatch batch = fixture.batch();
  const clsa::RoutingIndex routing = indexer.select(batch, inputs.q_tensor, inputs.w_tensor);
  REQUIRE(routing.num_sequences() == sequences);
  REQUIRE(routing.tokens() == tokens);
  const std::vector<std::int32_t> positions = test::read_ints(routing.positions);
  const std::vector<std::int32_t> counts = test::read_ints(routing.counts);
  REQUIRE(routing.slots.defined());
  const std::vector<std::int32_t> slots = test::read_ints(routing.slots);
  for (int call = 1; call < calls; ++call) {
    INFO("call " << call);
    const clsa::RoutingIndex again = indexer.select(batch, inputs.q_tensor, inputs.w_tensor);
    REQUIRE(test::read_ints(again.positions) == positions);
    REQUIRE(test::read_ints(again.counts) == counts);
    REQUIRE(test::read_ints(again.slots) == slots);
  }
  const int page_size = fixture.config.page_size;
  for (std::int64_t row = 0; row < sequences * tokens; ++row) {
    const std::int32_t count = counts[static_cast<std::size_t>(row)];
    REQUIRE(count >= 0);
    REQUIRE(count <= config.top_k);
    const auto first = positions.begin() + static_cast<std::ptrdiff_t>(row * config.top_k);
    // Each routed position's pool slot: its page (through the sequence's page table) and offset.
    const std::vector<std::int32_t> pages = fixture.cache.pages(fixture.ids[static_cast<std::size_t>(row / tokens)]);
    for (std::int32_t i = 0; i < count; ++i) {
      const std::int32_t position = *(first + i);
      const std::size_t at = static_cast<std::size_t>(row * config.top_k + i);
      REQUIRE(slots[at] == pages[static_cast<std::size_t>(position / page_size)] * page_size + position % page_size);
    }
    for (std::int32_t i = count; i < config.top_k; ++i)
      REQUIRE(slots[static_cast<std::size_t>(row * config.top_k + i)] == -1);
    std::vector<std::int32_t> routed(first, first + count);
    // Ascending, and unused slots hold -1.
    REQUIRE(std::is_sorted(routed.begin(), routed.end()));
    for (auto it = first + count; it != first + config.top_k; ++it) REQUIRE(*it == -1);
    run.routed.push_back(std::move(routed));
  }
  return run;
}

/// Oracle scores of row (b, t).
std::vector<double> row_scores(const test::CacheFixture& fixture, const IndexerConfig& config, const IndexerRun& run,
                               std::size_t b, int t) {
  const std::size_t row = b * static_cast<std::size_t>(run.tokens) + static_cast<std::size_t>(t);
  const std::int64_t visible = fixture.data[b].length - run.tokens + t + 1;
  return test::oracle_scores(fixture.data[b], config.index_dim,
                             run.q.data() + row * static_cast<std::size_t>(config.num_heads * config.index_dim),
                             run.w.data() + row * static_cast<std::size_t>(config.num_heads), config.num_heads, visible,
                             config.scale);
}

/// Every property of a routed row (test::routing_row_problem); with `tolerance` >= 0 also that it
/// is a best top-k of the oracle scores up to that relative tolerance.
void check_row(const std::vector<std::int32_t>& routed, const std::vector<double>& scores, const IndexerConfig& config,
               double tolerance) {
  const std::string problem =
      test::routing_row_problem(routed, scores, config.top_k, config.sink_tokens, config.local_window, tolerance);
  INFO(problem);
  REQUIRE(problem.empty());
}

IndexerConfig random_indexer_config(test::Rng& rng, int index_dim) {
  IndexerConfig config;
  config.num_heads = std::vector<int>{1, 4, 8, 16}[static_cast<std::size_t>(rng.uniform(0, 3))];
  config.index_dim = index_dim;
  config.top_k = rng.uniform(1, 200);
  config.sink_tokens = rng.uniform(0, std::min(8, config.top_k));
  config.local_window = rng.uniform(0, std::min(16, config.top_k - config.sink_tokens));
  config.scale = std::vector<float>{1.0f, 0.5f, 0.125f}[static_cast<std::size_t>(rng.uniform(0, 2))];
  return config;
}

/// An indexer of `heads` x `dim` routing `top_k` (sinks and window inside it), scale 1.
IndexerConfig indexer_config(int heads, int dim, int top_k, int sinks, int window) {
  IndexerConfig config;
  config.num_heads = heads;
  config.index_dim = dim;
  config.top_k = top_k;
  config.sink_tokens = sinks;
  config.local_window = window;
  return config;
}

clsa::CacheConfig cache_config_for(const IndexerConfig& config, DType dtype, int page_size) {
  clsa::CacheConfig cache;
  cache.num_kv_heads = 1;
  cache.head_dim = 64;
  cache.index_dim = config.index_dim;
  cache.page_size = page_size;
  cache.dtype = dtype;
  return cache;
}

}  // namespace

CLSA_BACKEND_TEST(indexer_matches_oracle, "indexer routes a best top-k of the oracle scores over random shapes",
                  "[indexer]") {
  test::Rng rng(test::base_seed() + 10);
  for (int trial = 0; trial < 12; ++trial) {
    const DType dtype = std::vector<DType>{DType::f32, DType::f16, DType::bf16}[static_cast<std::size_t>(trial % 3)];
    const IndexerConfig config = random_indexer_config(rng, trial % 2 ? 128 : 64);
    std::vector<std::int64_t> lengths;
    const int tokens = rng.uniform(1, 4);
    for (int b = rng.uniform(1, 8); b > 0; --b) lengths.push_back(rng.uniform(tokens, 1500));
    clsa::CacheConfig cache = cache_config_for(config, dtype, 1 << rng.uniform(3, 6));
    cache.max_pages = test::pages_for(lengths, cache.page_size);
    INFO("trial " << trial << " dtype " << clsa::dtype_name(dtype) << " H " << config.num_heads << " D "
                  << config.index_dim << " T " << tokens << " lengths " << test::describe(lengths));
    test::CacheFixture fixture(cache, backend, lengths, rng);
    const DType weights_dtype = trial % 4 == 0 ? DType::bf16 : DType::f32;
    const IndexerRun run = run_indexer(fixture, config, tokens, rng, QueryValues::gaussian, backend, weights_dtype);
    for (std::size_t b = 0; b < lengths.size(); ++b) {
      for (int t = 0; t < tokens; ++t) {
        INFO("sequence " << b << " token " << t);
        check_row(run.routed[b * tokens + static_cast<std::size_t>(t)], row_scores(fixture, config, run, b, t), config,
                  1e-4);
      }
    }
  }
}

CLSA_BACKEND_TEST(indexer_exact_on_exact_data, "indexer equals the oracle set exactly on exactly computable data",
                  "[indexer]") {
  // Small integers: every score is exact in f32, so the routed set is fully determined, ties and
  // ReLU plateaus of exact zeros included.
  test::Rng rng(test::base_seed() + 11);
  for (int trial = 0; trial < 12; ++trial) {
    const DType dtype = std::vector<DType>{DType::bf16, DType::f16, DType::f32}[static_cast<std::size_t>(trial % 3)];
    const IndexerConfig config = random_indexer_config(rng, trial % 2 ? 64 : 128);
    std::vector<std::int64_t> lengths;
    const int tokens = rng.uniform(1, 5);
    for (int b = rng.uniform(1, 6); b > 0; --b) lengths.push_back(rng.uniform(tokens, 3000));
    clsa::CacheConfig cache = cache_config_for(config, dtype, 64);
    cache.max_pages = test::pages_for(lengths, cache.page_size);
    INFO("trial " << trial << " dtype " << clsa::dtype_name(dtype) << " H " << config.num_heads << " top_k "
                  << config.top_k << " T " << tokens << " lengths " << test::describe(lengths));
    test::CacheFixture fixture(cache, backend, lengths, rng, test::Values::small_integers);
    const IndexerRun run = run_indexer(fixture, config, tokens, rng, QueryValues::small_integers, backend);
    std::size_t plateau_rows = 0;
    for (std::size_t b = 0; b < lengths.size(); ++b) {
      for (int t = 0; t < tokens; ++t) {
        const std::vector<double> scores = row_scores(fixture, config, run, b, t);
        const std::vector<std::int32_t> expected =
            test::oracle_routing(scores, config.top_k, config.sink_tokens, config.local_window);
        INFO("sequence " << b << " token " << t);
        REQUIRE(run.routed[b * tokens + static_cast<std::size_t>(t)] == expected);
        // Count rows where the cut falls inside a tie (what the tie rule decides).
        std::vector<double> sorted = scores;
        std::sort(sorted.begin(), sorted.end(), std::greater<>());
        if (static_cast<int>(sorted.size()) > config.top_k &&
            sorted[static_cast<std::size_t>(config.top_k)] == sorted[static_cast<std::size_t>(config.top_k - 1)]) {
          ++plateau_rows;
        }
      }
    }
    (void)plateau_rows;
  }
}

CLSA_BACKEND_TEST(indexer_ties_and_plateaus, "ties go to the lower position also across a plateau of zeros",
                  "[indexer]") {
  // All indexer keys equal except a few; negative query: every ReLU is 0 except at those few.
  test::Rng rng(test::base_seed() + 12);
  const IndexerConfig config = indexer_config(2, 64, 300, 2, 5);
  clsa::CacheConfig cache = cache_config_for(config, DType::bf16, 16);
  const std::int64_t length = 5000;
  cache.max_pages = test::pages_for({length}, cache.page_size);
  test::CacheFixture fixture(cache, backend, {}, rng);
  fixture.ids.push_back(fixture.cache.add_sequence());
  fixture.data.emplace_back();
  std::vector<double> keys(static_cast<std::size_t>(length * 64), 1.0);
  const std::vector<std::int64_t> special = {100, 2500, 4000, 4990};  // 4990 lies in the window
  for (std::int64_t p : special) {
    for (int d = 0; d < 64; ++d) keys[static_cast<std::size_t>(p * 64 + d)] = -1.0;
  }
  std::vector<double> kv(static_cast<std::size_t>(length * 64), 0.25);
  fixture.append_values(0, kv, kv, keys);
  IndexerRun run;
  run.tokens = 1;
  run.q.assign(2 * 64, -1.0);  // q . key = -64 (ReLU 0) except at the special keys (+64)
  run.w = {1.0, 2.0};
  const clsa::Tensor q = test::on_device(test::make_host(run.q, DType::bf16, {1, 1, 2, 64}), backend);
  const clsa::Tensor w = test::on_device(test::make_host(run.w, DType::f32, {1, 1, 2}), backend);
  clsa::CrossLayerIndexer indexer(config, backend);
  const clsa::RoutingIndex routing = indexer.select(fixture.batch(), q, w);
  const std::vector<std::int32_t> routed = test::read_ints(routing.positions);
  // Expected: sinks 0,1; window 4995..4999; specials 100, 2500, 4000 (4990 is routed as a
  // special too, it is not in the window); then the lowest-position zeros: 2, 3, ... until 300.
  std::set<std::int32_t> expected = {0, 1, 100, 2500, 4000, 4990, 4995, 4996, 4997, 4998, 4999};
  for (std::int32_t p = 2; expected.size() < 300; ++p) expected.insert(p);
  CHECK(std::vector<std::int32_t>(expected.begin(), expected.end()) == routed);
}

CLSA_BACKEND_TEST(indexer_nan_scores, "NaN scores never crash and are never routed ahead of finite scores",
                  "[indexer]") {
  test::Rng rng(test::base_seed() + 13);
  const IndexerConfig config = indexer_config(4, 64, 64, 0, 0);
  clsa::CacheConfig cache = cache_config_for(config, DType::f32, 32);
  const std::int64_t length = 700;
  cache.max_pages = test::pages_for({length, length}, cache.page_size);
  test::CacheFixture fixture(cache, backend, {}, rng);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int i = 0; i < 2; ++i) {
    fixture.ids.push_back(fixture.cache.add_sequence());
    fixture.data.emplace_back();
    std::vector<double> keys(static_cast<std::size_t>(length * 64));
    for (double& x : keys) x = rng.normal();
    // Sequence 0: a few NaN keys; sequence 1: NaN everywhere but 10 positions.
    for (std::int64_t p = 0; p < length; ++p) {
      const bool poisoned = i == 0 ? p % 50 == 7 : p % 70 != 3;
      if (poisoned) keys[static_cast<std::size_t>(p * 64 + 13)] = nan;
    }
    std::vector<double> kv(static_cast<std::size_t>(length * 64), 0.5);
    fixture.append_values(static_cast<std::size_t>(i), kv, kv, keys);
  }
  const IndexerRun run = run_indexer(fixture, config, 1, rng, QueryValues::gaussian, backend);
  for (std::size_t b = 0; b < 2; ++b) {
    const std::vector<double> scores = row_scores(fixture, config, run, b, 0);
    const std::vector<std::int32_t>& routed = run.routed[b];
    check_row(routed, scores, config, -1.0);
    std::size_t finite = 0;
    for (double s : scores) finite += std::isnan(s) ? 0 : 1;
    std::size_t routed_finite = 0;
    for (std::int32_t p : routed) routed_finite += std::isnan(scores[static_cast<std::size_t>(p)]) ? 0 : 1;
    CHECK(routed_finite == std::min<std::size_t>(finite, 64));
    if (b == 1) {
      // 10 finite; the other 54 routed are NaN, the lowest positions among the NaN ones.
      std::vector<std::int32_t> nan_routed;
      for (std::int32_t p : routed) {
        if (std::isnan(scores[static_cast<std::size_t>(p)])) nan_routed.push_back(p);
      }
      std::vector<std::int32_t> lowest_nan;
      for (std::int32_t p = 0; lowest_nan.size() < nan_routed.size(); ++p) {
        if (std::isnan(scores[static_cast<std::size_t>(p)])) lowest_nan.push_back(p);
      }
      CHECK(nan_routed == lowest_nan);
    }
  }
}

CLSA_BACKEND_TEST(indexer_routes_all_when_top_k_covers, "top_k >= visible length routes every visible token",
                  "[indexer]") {
  test::Rng rng(test::base_seed() + 14);
  const IndexerConfig config = indexer_config(8, 128, 512, 4, 8);
  const std::vector<std::int64_t> lengths = {1, 7, 300, 512, 515};
  clsa::CacheConfig cache = cache_config_for(config, DType::bf16, 64);
  cache.max_pages = test::pages_for(lengths, cache.page_size);
  test::CacheFixture fixture(cache, backend, lengths, rng);
  const IndexerRun run = run_indexer(fixture, config, 1, rng, QueryValues::gaussian, backend);
  for (std::size_t b = 0; b < 4; ++b) {
    std::vector<std::int32_t> all(static_cast<std::size_t>(lengths[b]));
    for (std::size_t p = 0; p < all.size(); ++p) all[p] = static_cast<std::int32_t>(p);
    CHECK(run.routed[b] == all);
  }
  CHECK(run.routed[4].size() == 512);
}

CLSA_BACKEND_TEST(indexer_needle_at_64k, "a planted needle is routed at 64K tokens", "[indexer][needle]") {
  test::Rng rng(test::base_seed() + 15);
  const IndexerConfig config = indexer_config(4, 64, 64, 4, 16);
  const std::int64_t length = 65536;
  clsa::CacheConfig cache = cache_config_for(config, DType::bf16, 64);
  cache.max_pages = test::pages_for({length}, cache.page_size);
  for (int trial = 0; trial < 2; ++trial) {
    const std::int64_t needle = rng.uniform(1000, 60000);
    test::CacheFixture fixture(cache, backend, {needle}, rng);
    // Query first, then the needle key along the heads' weighted query direction.
    IndexerRun run;
    run.tokens = 1;
    run.q.resize(4 * 64);
    for (double& x : run.q) x = test::round_to(DType::bf16, rng.normal());
    run.w = {0.75, 1.0, 1.25, 1.0};
    std::vector<double> direction(64, 0.0);
    for (int h = 0; h < 4; ++h) {
      for (int d = 0; d < 64; ++d)
        direction[static_cast<std::size_t>(d)] +=
            run.w[static_cast<std::size_t>(h)] * run.q[static_cast<std::size_t>(h * 64 + d)];
    }
    double norm = 0.0;
    for (double x : direction) norm += x * x;
    for (double& x : direction) x *= 16.0 / std::sqrt(norm);
    fixture.append_values(0, std::vector<double>(64, 0.5), std::vector<double>(64, 0.5), direction);
    fixture.append_random(0, length - needle - 1, rng);
    REQUIRE(fixture.data[0].length == length);

    const clsa::Tensor q = test::on_device(test::make_host(run.q, DType::bf16, {1, 1, 4, 64}), backend);
    const clsa::Tensor w = test::on_device(test::make_host(run.w, DType::f32, {1, 1, 4}), backend);
    clsa::CrossLayerIndexer indexer(config, backend);
    const clsa::RoutingIndex routing = indexer.select(fixture.batch(), q, w);
    const std::vector<std::int32_t> routed = test::read_ints(routing.positions);
    INFO("needle at " << needle);
    CHECK(std::find(routed.begin(), routed.end(), static_cast<std::int32_t>(needle)) != routed.end());
    // The needle is the oracle's best score (so the test means something).
    const std::vector<double> scores =
        test::oracle_scores(fixture.data[0], 64, run.q.data(), run.w.data(), 4, length, config.scale);
    CHECK(std::max_element(scores.begin(), scores.end()) - scores.begin() == needle);
  }
}

TEST_CASE("CUDA and CPU indexers route the same set", "[indexer][cuda]") {
  CLSA_SKIP_WITHOUT_GPU();
  const std::uint64_t seed = test::base_seed() + 16;
  for (int trial = 0; trial < 6; ++trial) {
    const bool exact = trial % 2 == 0;
    const DType dtype = trial < 2 ? DType::bf16 : (trial < 4 ? DType::f16 : DType::f32);
    test::Rng config_rng(seed + static_cast<std::uint64_t>(trial));
    IndexerConfig config = random_indexer_config(config_rng, 128);
    config.top_k = config_rng.uniform(config.sink_tokens + config.local_window + 1, 2048);
    std::vector<std::int64_t> lengths;
    const int tokens = config_rng.uniform(1, 3);
    for (int b = config_rng.uniform(1, 5); b > 0; --b) lengths.push_back(config_rng.uniform(tokens, 20000));
    clsa::CacheConfig cache = cache_config_for(config, dtype, 64);
    cache.max_pages = test::pages_for(lengths, cache.page_size);
    const test::Values values = exact ? test::Values::small_integers : test::Values::gaussian;
    const QueryValues query_values = exact ? QueryValues::small_integers : QueryValues::gaussian;
    // Same seed, same data on both backends.
    test::Rng cpu_rng(seed * 7 + static_cast<std::uint64_t>(trial));
    test::Rng cuda_rng(seed * 7 + static_cast<std::uint64_t>(trial));
    test::CacheFixture cpu_fixture(cache, clsa::Backend::cpu, lengths, cpu_rng, values);
    test::CacheFixture cuda_fixture(cache, clsa::Backend::cuda, lengths, cuda_rng, values);
    const IndexerRun on_cpu = run_indexer(cpu_fixture, config, tokens, cpu_rng, query_values, clsa::Backend::cpu);
    const IndexerRun on_cuda = run_indexer(cuda_fixture, config, tokens, cuda_rng, query_values, clsa::Backend::cuda);
    REQUIRE(on_cpu.q == on_cuda.q);
    INFO("trial " << trial << " dtype " << clsa::dtype_name(dtype) << " top_k " << config.top_k << " lengths "
                  << test::describe(lengths));
    for (std::size_t row = 0; row < on_cpu.routed.size(); ++row) {
      if (exact) {
        REQUIRE(on_cpu.routed[row] == on_cuda.routed[row]);
      } else {
        // Different summation orders: sets may differ only at near-ties of the cut.
        const std::size_t b = row / static_cast<std::size_t>(tokens);
        const int t = static_cast<int>(row % static_cast<std::size_t>(tokens));
        const std::vector<double> scores = row_scores(cpu_fixture, config, on_cpu, b, t);
        check_row(on_cuda.routed[row], scores, config, 1e-4);
        std::vector<std::int32_t> differ;
        std::set_symmetric_difference(on_cpu.routed[row].begin(), on_cpu.routed[row].end(), on_cuda.routed[row].begin(),
                                      on_cuda.routed[row].end(), std::back_inserter(differ));
        REQUIRE(differ.size() <= 4);
      }
    }
  }
}

CLSA_BACKEND_TEST(indexer_into_caller_tensors,
                  "select into caller tensors, with and without slots, equals the returned index", "[indexer]") {
  test::Rng rng(test::base_seed() + 14);
  const IndexerConfig config = indexer_config(4, 64, 48, 2, 8);
  const std::vector<std::int64_t> lengths = {700, 30, 1200};
  const int tokens = 2;
  clsa::CacheConfig cache = cache_config_for(config, DType::bf16, 16);
  cache.max_pages = test::pages_for(lengths, cache.page_size);
  test::CacheFixture fixture(cache, backend, lengths, rng);
  const std::int64_t sequences = static_cast<std::int64_t>(lengths.size());
  const IndexerInputs inputs = make_inputs(fixture, config, tokens, rng, QueryValues::gaussian, backend);
  const clsa::Tensor& q_t = inputs.q_tensor;
  const clsa::Tensor& w_t = inputs.w_tensor;
  const clsa::CacheBatch batch = fixture.batch();
  clsa::CrossLayerIndexer indexer(config, backend);
  const clsa::RoutingIndex returned = indexer.select(batch, q_t, w_t);
  const std::vector<std::int32_t> positions = test::read_ints(returned.positions);
  const std::vector<std::int32_t> counts = test::read_ints(returned.counts);
  const std::vector<std::int32_t> slots = test::read_ints(returned.slots);

  const clsa::Device device = test::device_of(backend);
  const clsa::Tensor out_positions = clsa::Tensor::empty({sequences, tokens, config.top_k}, DType::i32, device);
  const clsa::Tensor out_counts = clsa::Tensor::empty({sequences, tokens}, DType::i32, device);
  const clsa::Tensor out_slots = clsa::Tensor::empty({sequences, tokens, config.top_k}, DType::i32, device);
  indexer.select(batch, q_t, w_t,
                 clsa::RoutingIndex{out_positions.view(), out_counts.view(), config.top_k, out_slots.view()});
  CHECK(test::read_ints(out_positions.view()) == positions);
  CHECK(test::read_ints(out_counts.view()) == counts);
  CHECK(test::read_ints(out_slots.view()) == slots);
  // Without slots: the same positions and counts; the caller's index has no slots to fill.
  const clsa::Tensor other_positions = clsa::Tensor::empty({sequences, tokens, config.top_k}, DType::i32, device);
  const clsa::Tensor other_counts = clsa::Tensor::empty({sequences, tokens}, DType::i32, device);
  indexer.select(batch, q_t, w_t, clsa::RoutingIndex{other_positions.view(), other_counts.view(), config.top_k});
  CHECK(test::read_ints(other_positions.view()) == positions);
  CHECK(test::read_ints(other_counts.view()) == counts);
  // Slots of the wrong shape are refused, naming the argument.
  const clsa::Tensor short_slots = clsa::Tensor::empty({sequences, tokens, config.top_k - 1}, DType::i32, device);
  CLSA_REQUIRE_ERROR(
      indexer.select(batch, q_t, w_t,
                     clsa::RoutingIndex{out_positions.view(), out_counts.view(), config.top_k, short_slots.view()}),
      clsa::ErrorCode::shape_mismatch, "out.slots");
}

TEST_CASE("CUDA and CPU indexers route the same set over long rows (clusters, several tiles per CTA)",
          "[indexer][cuda]") {
  CLSA_SKIP_WITHOUT_GPU();
  const std::uint64_t seed = test::base_seed() + 17;
  const IndexerConfig config = indexer_config(4, 64, 2048, 4, 64);
  // 150000 positions: more than 16 CTAs of 8192 hold, so each CTA of a row streams two tiles; the
  // short rows ride in the same launch (trivial and barely-selecting rows).
  const std::vector<std::int64_t> lengths = {150000, 70001, 2100, 300};
  const int tokens = 2;
  clsa::CacheConfig cache = cache_config_for(config, DType::bf16, 64);
  cache.max_pages = test::pages_for(lengths, cache.page_size);
  test::Rng cpu_rng(seed), cuda_rng(seed);
  // Small integers: exact scores on both backends, with plateaus of equal (and zero) scores.
  test::CacheFixture cpu_fixture(cache, clsa::Backend::cpu, lengths, cpu_rng, test::Values::small_integers);
  test::CacheFixture cuda_fixture(cache, clsa::Backend::cuda, lengths, cuda_rng, test::Values::small_integers);
  const IndexerRun on_cpu =
      run_indexer(cpu_fixture, config, tokens, cpu_rng, QueryValues::small_integers, clsa::Backend::cpu);
  const IndexerRun on_cuda =
      run_indexer(cuda_fixture, config, tokens, cuda_rng, QueryValues::small_integers, clsa::Backend::cuda);
  REQUIRE(on_cpu.q == on_cuda.q);
  for (std::size_t row = 0; row < on_cpu.routed.size(); ++row) {
    INFO("row " << row);
    REQUIRE(on_cuda.routed[row].size() == on_cpu.routed[row].size());
    REQUIRE(on_cpu.routed[row] == on_cuda.routed[row]);
  }
}

TEST_CASE("CUDA decode rows (first radix level from the score pass) route the CPU's set, call after call",
          "[indexer][cuda]") {
  CLSA_SKIP_WITHOUT_GPU();
  const std::uint64_t seed = test::base_seed() + 19;
  // One query token and few heads: one query row per score CTA in both 16-bit kernels, so the score
  // pass builds each row's first histogram and the select kernel starts at level 1. The long rows
  // put every row on a cluster with several tiles per CTA; short rows that route everything (no
  // histogram), barely select, or leave most CTAs of their cluster without candidates ride in the
  // same launch. Repeated calls find the histograms zero again.
  struct Case {
    IndexerConfig config;
    std::vector<std::int64_t> lengths;
  };
  const Case cases[] = {{indexer_config(4, 64, 2048, 4, 64), {150000, 70001, 2100, 2048, 300, 9000}},
                        {indexer_config(4, 64, 40, 2, 6), {150000, 41, 40, 100, 3000}}};
  const int tokens = 1;
  for (const Case& c : cases) {
    for (const DType dtype : {DType::bf16, DType::f16}) {
      INFO("top_k " << c.config.top_k << " dtype " << clsa::dtype_name(dtype));
      clsa::CacheConfig cache = cache_config_for(c.config, dtype, 64);
      cache.max_pages = test::pages_for(c.lengths, cache.page_size);
      test::Rng cpu_rng(seed), cuda_rng(seed);
      // Small integers: exact scores on both backends, with plateaus of equal (and zero) scores.
      test::CacheFixture cpu_fixture(cache, clsa::Backend::cpu, c.lengths, cpu_rng, test::Values::small_integers);
      test::CacheFixture cuda_fixture(cache, clsa::Backend::cuda, c.lengths, cuda_rng, test::Values::small_integers);
      const IndexerRun on_cpu =
          run_indexer(cpu_fixture, c.config, tokens, cpu_rng, QueryValues::small_integers, clsa::Backend::cpu);
      const IndexerRun on_cuda = run_indexer(cuda_fixture, c.config, tokens, cuda_rng, QueryValues::small_integers,
                                             clsa::Backend::cuda, DType::f32, 3);
      REQUIRE(on_cpu.q == on_cuda.q);
      for (std::size_t row = 0; row < on_cpu.routed.size(); ++row) {
        INFO("row " << row);
        REQUIRE(on_cpu.routed[row] == on_cuda.routed[row]);
      }
    }
  }
}

CLSA_BACKEND_TEST(indexer_gathers_routed_kv, "gather_routed_kv: the index carries each routed token's K and V rows",
                  "[indexer]") {
  test::Rng rng(test::base_seed() + 18);
  const IndexerConfig config = indexer_config(4, 64, 40, 2, 6);
  const std::vector<std::int64_t> lengths = {700, 30, 1200};
  const int tokens = 2;
  clsa::CacheConfig cache = cache_config_for(config, DType::bf16, 16);
  cache.num_kv_heads = 2;
  cache.max_pages = test::pages_for(lengths, cache.page_size);
  test::CacheFixture fixture(cache, backend, lengths, rng);
  const std::int64_t sequences = static_cast<std::int64_t>(lengths.size());
  const IndexerInputs inputs = make_inputs(fixture, config, tokens, rng, QueryValues::gaussian, backend);
  const clsa::CacheBatch batch = fixture.batch();
  clsa::CrossLayerIndexer indexer(config, backend);
  indexer.reserve(4, tokens, 2048);
  CHECK_FALSE(indexer.gathers_routed_kv());
  const std::size_t plain_bytes = indexer.workspace_bytes(4, tokens, 2048);
  indexer.gather_routed_kv(cache);
  REQUIRE(indexer.gathers_routed_kv());
  // The block is part of the workspace: 2 x Hkv x top_k x D x 2 bytes per planned row.
  CHECK(indexer.workspace_bytes(4, tokens, 2048) >= plain_bytes + 4 * tokens * 2 * 2 * 40 * 64 * 2);
  const clsa::RoutingIndex routing = indexer.select(batch, inputs.q_tensor, inputs.w_tensor);
  REQUIRE(routing.kv.defined());
  REQUIRE(routing.kv.rank() == 6);
  CHECK(routing.kv.size(2) == 2);
  CHECK(routing.kv.size(3) == 2);
  CHECK(routing.kv.size(4) == 40);
  CHECK(routing.kv.size(5) == 64);
  const std::vector<std::int32_t> positions = test::read_ints(routing.positions);
  const std::vector<std::int32_t> counts = test::read_ints(routing.counts);
  const std::vector<double> kv = test::read_values(routing.kv);
  const std::size_t head_rows = 40 * 64;
  auto check_block = [&](const std::vector<double>& block) {
    for (std::int64_t b = 0; b < sequences; ++b) {
      for (int t = 0; t < tokens; ++t) {
        const std::size_t row = static_cast<std::size_t>(b * tokens + t);
        const test::SequenceData& data = fixture.data[static_cast<std::size_t>(b)];
        for (int i = 0; i < counts[row]; ++i) {
          const std::size_t position = static_cast<std::size_t>(positions[row * 40 + static_cast<std::size_t>(i)]);
          for (int h = 0; h < 2; ++h) {
            for (int d = 0; d < 64; ++d) {
              const std::size_t source =
                  (position * 2 + static_cast<std::size_t>(h)) * 64 + static_cast<std::size_t>(d);
              const std::size_t k_at = ((row * 2 + 0) * 2 + static_cast<std::size_t>(h)) * head_rows +
                                       static_cast<std::size_t>(i) * 64 + static_cast<std::size_t>(d);
              const std::size_t v_at = k_at + 2 * head_rows;
              INFO("row " << row << " routed " << i << " position " << position << " head " << h << " dim " << d);
              REQUIRE(block[k_at] == data.k[source]);
              REQUIRE(block[v_at] == data.v[source]);
            }
          }
        }
      }
    }
  };
  check_block(kv);
  // Into caller tensors: the same rows (zeroed first: rows past the count are left as they are).
  const clsa::Device device = test::device_of(backend);
  const clsa::Tensor out_positions = clsa::Tensor::empty({sequences, tokens, 40}, DType::i32, device);
  const clsa::Tensor out_counts = clsa::Tensor::empty({sequences, tokens}, DType::i32, device);
  const clsa::Tensor out_kv = test::on_device(
      test::make_host(std::vector<double>(static_cast<std::size_t>(sequences * tokens) * 2 * 2 * head_rows, 0.0),
                      DType::bf16, {sequences, tokens, 2, 2, 40, 64}),
      backend);
  clsa::RoutingIndex out{out_positions.view(), out_counts.view(), 40};
  out.kv = out_kv.view();
  indexer.select(batch, inputs.q_tensor, inputs.w_tensor, out);
  CHECK(test::read_ints(out_positions.view()) == positions);
  check_block(test::read_values(out_kv.view()));
  // A block of another shape or dtype is refused, naming it; so is a cache of another geometry.
  const clsa::Tensor short_kv = clsa::Tensor::empty({sequences, tokens, 2, 2, 39, 64}, DType::bf16, device);
  out.kv = short_kv.view();
  CLSA_REQUIRE_ERROR(indexer.select(batch, inputs.q_tensor, inputs.w_tensor, out), clsa::ErrorCode::shape_mismatch,
                     "out.kv");
  const clsa::Tensor f16_kv = clsa::Tensor::empty({sequences, tokens, 2, 2, 40, 64}, DType::f16, device);
  out.kv = f16_kv.view();
  CLSA_REQUIRE_ERROR(indexer.select(batch, inputs.q_tensor, inputs.w_tensor, out), clsa::ErrorCode::dtype_mismatch,
                     "out.kv");
  clsa::CacheConfig other = cache;
  other.num_kv_heads = 1;
  indexer.gather_routed_kv(other);
  CLSA_REQUIRE_ERROR(indexer.select(batch, inputs.q_tensor, inputs.w_tensor), clsa::ErrorCode::shape_mismatch,
                     "gather_routed_kv");
  indexer.gather_routed_kv(cache, false);
  CHECK_FALSE(indexer.select(batch, inputs.q_tensor, inputs.w_tensor).kv.defined());
}
