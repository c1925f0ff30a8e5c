// SparseCrossAttention and DenseCrossAttention against the double-precision oracle.
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "catch.hpp"
#include "support.hpp"

namespace {

using clsa::DType;

struct AttentionCase {
  DType dtype = DType::bf16;
  int q_heads = 8, kv_heads = 2, dim = 128, tokens = 1, top_k = 64;
  std::vector<std::int64_t> lengths;
  float softmax_scale = 0.0f;
};

std::string describe(const AttentionCase& c) {
  return std::string("dtype ") + clsa::dtype_name(c.dtype) + " Hq " + std::to_string(c.q_heads) + " Hkv " +
         std::to_string(c.kv_heads) + " D " + std::to_string(c.dim) + " T " + std::to_string(c.tokens) + " top_k " +
         std::to_string(c.top_k) + " lengths " + test::describe(c.lengths);
}

/// Output, lse and the routed positions of one forward (sparse when `sparse`).
struct AttentionRun {
  std::vector<double> q, out, lse;
  std::vector<std::vector<std::int32_t>> positions;  // per row (b, t): what was attended
};

AttentionRun run_attention(test::CacheFixture& fixture, const AttentionCase& c, bool sparse, test::Rng& rng,
                           clsa::Backend backend) {
  const std::int64_t sequences = static_cast<std::int64_t>(c.lengths.size());
  const std::int64_t rows = sequences * c.tokens;
  AttentionRun run;
  run.q.resize(static_cast<std::size_t>(rows * c.q_heads * c.dim));
  for (double& x : run.q) x = test::round_to(c.dtype, rng.normal());
  const clsa::Tensor q =
      test::on_device(test::make_host(run.q, c.dtype, {sequences, c.tokens, c.q_heads, c.dim}), backend);
  // Poison the output: every element must be written.
  std::vector<double> poison(run.q.size(), std::numeric_limits<double>::quiet_NaN());
  const clsa::Tensor out =
      test::on_device(test::make_host(poison, c.dtype, {sequences, c.tokens, c.q_heads, c.dim}), backend);
  const clsa::Tensor lse =
      test::on_device(test::make_host(std::vector<double>(static_cast<std::size_t>(rows * c.q_heads), std::nan("")),
                                      DType::f32, {sequences, c.tokens, c.q_heads}),
                      backend);
  const clsa::CacheBatch batch = fixture.batch();
  clsa::AttentionConfig config;
  config.num_q_heads = c.q_heads;
  config.num_kv_heads = c.kv_heads;
  config.head_dim = c.dim;
  config.softmax_scale = c.softmax_scale;
  if (sparse) {
    // Routing from the indexer over the same cache (any valid routing would do: the oracle
    // attends over exactly the positions routed).
    clsa::IndexerConfig indexer_config;
    indexer_config.num_heads = 4;
    indexer_config.index_dim = fixture.config.index_dim;
    indexer_config.top_k = c.top_k;
    indexer_config.sink_tokens = std::min(4, c.top_k / 2);
    indexer_config.local_window = std::min(8, c.top_k / 2);
    std::vector<double> q_idx(static_cast<std::size_t>(rows * 4 * indexer_config.index_dim));
    for (double& x : q_idx) x = rng.normal();
    const clsa::Tensor qi =
        test::on_device(test::make_host(q_idx, c.dtype, {sequences, c.tokens, 4, indexer_config.index_dim}), backend);
    const clsa::Tensor w = test::on_device(test::make_host(std::vector<double>(static_cast<std::size_t>(rows * 4), 1.0),
                                                           DType::f32, {sequences, c.tokens, 4}),
                                           backend);
    clsa::CrossLayerIndexer indexer(indexer_config, backend);
    const clsa::RoutingIndex routing = indexer.select(batch, qi, w);
    REQUIRE(routing.slots.defined());
    clsa::SparseCrossAttention attention(config, backend);
    attention.forward(batch, routing, q, out, {}, lse);
    // The same routing without its pool slots (forward() then looks the pages up): the same bits.
    const clsa::Tensor out_lookup =
        test::on_device(test::make_host(poison, c.dtype, {sequences, c.tokens, c.q_heads, c.dim}), backend);
    attention.forward(batch, clsa::RoutingIndex{routing.positions, routing.counts, routing.top_k}, q, out_lookup);
    REQUIRE(test::read_values(out_lookup) == test::read_values(out));
    const std::vector<std::int32_t> positions = test::read_ints(routing.positions);
    const std::vector<std::int32_t> counts = test::read_ints(routing.counts);
    // The same routing with its K/V rows gathered once (RoutingIndex::kv): the same bits.
    indexer.gather_routed_kv(fixture.config);
    const clsa::RoutingIndex gathered = indexer.select(batch, qi, w);
    REQUIRE(gathered.kv.defined());
    REQUIRE(test::read_ints(gathered.positions) == positions);
    const clsa::Tensor out_gathered =
        test::on_device(test::make_host(poison, c.dtype, {sequences, c.tokens, c.q_heads, c.dim}), backend);
    attention.forward(batch, gathered, q, out_gathered);
    REQUIRE(test::read_values(out_gathered) == test::read_values(out));
    for (std::int64_t row = 0; row < rows; ++row) {
      const auto first = positions.begin() + static_cast<std::ptrdiff_t>(row * c.top_k);
      std::vector<std::int32_t> routed(first, first + counts[static_cast<std::size_t>(row)]);
      std::sort(routed.begin(), routed.end());
      run.positions.push_back(std::move(routed));
    }
  } else {
    clsa::DenseCrossAttention attention(config, backend);
    attention.forward(batch, q, out, {}, lse);
    for (std::int64_t row = 0; row < rows; ++row) {
      const std::int64_t visible = c.lengths[static_cast<std::size_t>(row / c.tokens)] - c.tokens + row % c.tokens + 1;
      std::vector<std::int32_t> all(static_cast<std::size_t>(visible));
      for (std::size_t p = 0; p < all.size(); ++p) all[p] = static_cast<std::int32_t>(p);
      run.positions.push_back(std::move(all));
    }
  }
  run.out = test::read_values(out);
  run.lse = test::read_values(lse);
  return run;
}

/// Oracle over the attended positions of each row; checks out and lse.
void check_against_oracle(const test::CacheFixture& fixture, const AttentionCase& c, const AttentionRun& run) {
  const double scale = c.softmax_scale > 0 ? c.softmax_scale : 1.0 / std::sqrt(static_cast<double>(c.dim));
  const std::size_t row_size = static_cast<std::size_t>(c.q_heads * c.dim);
  std::vector<double> expected(run.out.size());
  std::vector<double> expected_lse(run.lse.size());
  for (std::size_t row = 0; row < run.positions.size(); ++row) {
    const std::size_t b = row / static_cast<std::size_t>(c.tokens);
    test::oracle_attention(fixture.data[b], run.positions[row], run.q.data() + row * row_size, c.q_heads, c.kv_heads,
                           c.dim, scale, expected.data() + row * row_size,
                           expected_lse.data() + row * static_cast<std::size_t>(c.q_heads));
  }
  double rms = 0.0;
  for (double x : expected) rms += x * x;
  rms = std::sqrt(rms / static_cast<double>(expected.size()));
  const test::Tolerance tolerance = test::output_tolerance(c.dtype);
  INFO(describe(c) << " relative error " << test::relative_error(run.out, expected) << " rms " << rms);
  CHECK(test::tolerance_ratio(run.out, expected, tolerance.atol * rms, tolerance.rtol) <= 1.0);
  CHECK(test::tolerance_ratio(run.lse, expected_lse, 1e-4, 1e-4) <= 1.0);
}

AttentionCase random_case(test::Rng& rng, int trial, int max_length) {
  AttentionCase c;
  c.dtype = std::vector<DType>{DType::bf16, DType::f16, DType::f32}[static_cast<std::size_t>(trial % 3)];
  const int group = std::vector<int>{1, 3, 4, 8, 16}[static_cast<std::size_t>(trial % 5)];
  c.kv_heads = rng.uniform(1, 3);
  c.q_heads = c.kv_heads * group;
  c.dim = std::vector<int>{64, 128, 256}[static_cast<std::size_t>(rng.uniform(0, 2))];
  c.tokens = rng.uniform(1, 3);
  c.top_k = rng.uniform(16, 300);
  c.softmax_scale = trial % 5 == 0 ? 0.3f : 0.0f;
  for (int b = rng.uniform(1, 8); b > 0; --b) c.lengths.push_back(rng.uniform(c.tokens, max_length));
  return c;
}

clsa::CacheConfig cache_config_for(const AttentionCase& c, int page_size) {
  clsa::CacheConfig cache;
  cache.num_kv_heads = c.kv_heads;
  cache.head_dim = c.dim;
  cache.index_dim = 64;
  cache.page_size = page_size;
  cache.dtype = c.dtype;
  cache.max_pages = test::pages_for(c.lengths, page_size);
  return cache;
}

}  // namespace

CLSA_BACKEND_TEST(sparse_attention_matches_oracle, "sparse attention matches the oracle over the routed tokens",
                  "[attention]") {
  test::Rng rng(test::base_seed() + 20);
  for (int trial = 0; trial < 16; ++trial) {
    const AttentionCase c = random_case(rng, trial, 1200);
    INFO("trial " << trial << " " << describe(c));
    test::CacheFixture fixture(cache_config_for(c, 1 << rng.uniform(3, 6)), backend, c.lengths, rng);
    const AttentionRun run = run_attention(fixture, c, true, rng, backend);
    check_against_oracle(fixture, c, run);
  }
}

CLSA_BACKEND_TEST(dense_attention_matches_oracle, "dense attention matches the oracle over every visible token",
                  "[attention]") {
  test::Rng rng(test::base_seed() + 21);
  for (int trial = 0; trial < 12; ++trial) {
    const AttentionCase c = random_case(rng, trial, 900);
    INFO("trial " << trial << " " << describe(c));
    test::CacheFixture fixture(cache_config_for(c, 1 << rng.uniform(3, 6)), backend, c.lengths, rng);
    const AttentionRun run = run_attention(fixture, c, false, rng, backend);
    check_against_oracle(fixture, c, run);
  }
}

CLSA_BACKEND_TEST(sparse_equals_dense_when_top_k_covers, "sparse attention with top_k >= length equals dense",
                  "[attention]") {
  test::Rng rng(test::base_seed() + 22);
  for (int trial = 0; trial < 6; ++trial) {
    AttentionCase c = random_case(rng, trial, 400);
    c.top_k = 400;
    INFO("trial " << trial << " " << describe(c));
    test::CacheFixture fixture(cache_config_for(c, 32), backend, c.lengths, rng);
    test::Rng sparse_rng(test::base_seed() + 100 + static_cast<std::uint64_t>(trial));
    test::Rng dense_rng(test::base_seed() + 100 + static_cast<std::uint64_t>(trial));
    const AttentionRun sparse = run_attention(fixture, c, true, sparse_rng, backend);
    const AttentionRun dense = run_attention(fixture, c, false, dense_rng, backend);
    REQUIRE(sparse.q == dense.q);
    REQUIRE(sparse.positions == dense.positions);
    const test::Tolerance tolerance = test::output_tolerance(c.dtype);
    // Same positions, different order of accumulation at most: within one rounding of the dtype.
    CHECK(test::tolerance_ratio(sparse.out, dense.out, tolerance.atol * 0.1, tolerance.rtol) <= 1.0);
    CHECK(test::tolerance_ratio(sparse.lse, dense.lse, 1e-5, 1e-5) <= 1.0);
  }
}

CLSA_BACKEND_TEST(attention_long_context, "sparse and dense attention at 16K tokens with the reference head shape",
                  "[attention]") {
  test::Rng rng(test::base_seed() + 23);
  AttentionCase c;
  c.dtype = DType::bf16;
  c.q_heads = 32;
  c.kv_heads = 8;
  c.dim = 128;
  c.top_k = 2048;
  c.lengths = {16384, 3000};
  test::CacheFixture fixture(cache_config_for(c, 64), backend, c.lengths, rng);
  for (bool sparse : {true, false}) {
    INFO((sparse ? "sparse " : "dense ") << describe(c));
    const AttentionRun run = run_attention(fixture, c, sparse, rng, backend);
    check_against_oracle(fixture, c, run);
  }
}
