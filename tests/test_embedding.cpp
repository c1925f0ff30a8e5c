// Embedding: engine-owned pools and page tables (no copy), caller-provided workspaces, multi-token
// queries, and no allocation on the hot path.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <new>
#include <numeric>

#include "catch.hpp"
#include "engine_support.hpp"
#include "support.hpp"

// Counts global allocations while `counting` is set (the no-allocation test below). Not under
// AddressSanitizer, which owns operator new itself.
#if defined(__SANITIZE_ADDRESS__)
#define CLSA_TEST_COUNTS_ALLOCATIONS 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CLSA_TEST_COUNTS_ALLOCATIONS 0
#endif
#endif
#ifndef CLSA_TEST_COUNTS_ALLOCATIONS
#define CLSA_TEST_COUNTS_ALLOCATIONS 1
#endif

#if CLSA_TEST_COUNTS_ALLOCATIONS
namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
}  // namespace

void* operator new(std::size_t size) {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t size, std::align_val_t alignment) {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
  const std::size_t align = static_cast<std::size_t>(alignment);
  if (void* p = std::aligned_alloc(align, (size + align - 1) / align * align)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}
void operator delete(void* p, std::align_val_t) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t, std::align_val_t) noexcept {
  std::free(p);
}
#endif

namespace {

using clsa::DType;

/// A pool the way an engine lays it out (FlashInfer NHD with K and V interleaved per page:
/// [page][2][page_size][heads][dim]; indexer keys [page][page_size][index_dim + 8] with padding),
/// its pages handed out in a shuffled order, filled from a CacheFixture's data.
struct EnginePool {
  clsa::Tensor kv, index_keys;  // on the backend's device
  clsa::Tensor indptr, indices, last, host_indptr, host_last;
  clsa::PagedCacheLayout layout{};

  EnginePool(const test::CacheFixture& fixture, test::Rng& rng) {
    const clsa::CacheConfig& c = fixture.config;
    const std::int64_t P = c.page_size, H = c.num_kv_heads, D = c.head_dim, I = c.index_dim + 8;
    std::vector<std::int32_t> page_counts;
    std::int64_t pages = 0;
    for (const test::SequenceData& seq : fixture.data) {
      page_counts.push_back(static_cast<std::int32_t>((seq.length + P - 1) / P));
      pages += page_counts.back();
    }
    pages += 3;  // unused pages too
    std::vector<std::int32_t> order(static_cast<std::size_t>(pages));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng.engine);
    std::vector<double> kv_values(static_cast<std::size_t>(pages * 2 * P * H * D), 7.0);  // padding: not 0
    std::vector<double> index_values(static_cast<std::size_t>(pages * P * I), -7.0);
    std::vector<double> indptr_values{0}, index_list, last_values;
    std::size_t next = 0;
    for (const test::SequenceData& seq : fixture.data) {
      const std::int32_t count = static_cast<std::int32_t>((seq.length + P - 1) / P);
      for (std::int32_t i = 0; i < count; ++i) index_list.push_back(order[next + static_cast<std::size_t>(i)]);
      for (std::int64_t p = 0; p < seq.length; ++p) {
        const std::int64_t page = order[next + static_cast<std::size_t>(p / P)];
        const std::int64_t slot = p % P;
        for (std::int64_t h = 0; h < H; ++h) {
          for (std::int64_t d = 0; d < D; ++d) {
            const std::size_t source = static_cast<std::size_t>((p * H + h) * D + d);
            kv_values[static_cast<std::size_t>((((page * 2 + 0) * P + slot) * H + h) * D + d)] = seq.k[source];
            kv_values[static_cast<std::size_t>((((page * 2 + 1) * P + slot) * H + h) * D + d)] = seq.v[source];
          }
        }
        for (std::int64_t d = 0; d < c.index_dim; ++d) {
          index_values[static_cast<std::size_t>((page * P + slot) * I + d)] =
              seq.index_keys[static_cast<std::size_t>(p * c.index_dim + d)];
        }
      }
      next += static_cast<std::size_t>(count);
      indptr_values.push_back(indptr_values.back() + count);
      last_values.push_back(static_cast<double>(seq.length - (count - 1) * P));
    }
    const std::int64_t B = static_cast<std::int64_t>(fixture.data.size());
    kv = test::on_device(test::make_host(kv_values, c.dtype, {pages, 2, P, H, D}), fixture.backend);
    index_keys = test::on_device(test::make_host(index_values, c.dtype, {pages, P, I}), fixture.backend);
    host_indptr = test::make_host(indptr_values, DType::i32, {B + 1});
    host_last = test::make_host(last_values, DType::i32, {B});
    indptr = test::on_device(host_indptr, fixture.backend);
    last = test::on_device(host_last, fixture.backend);
    indices = test::on_device(test::make_host(index_list, DType::i32, {static_cast<std::int64_t>(index_list.size())}),
                              fixture.backend);

    layout = engine_support::interleaved_layout(c, test::device_of(fixture.backend), pages, kv, index_keys, I);
  }

  clsa::PageTableView tables(int count) const {
    clsa::PageTableView t;
    t.num_sequences = count;
    t.page_indptr = indptr.data_as<std::int32_t>();
    t.page_indices = indices.data_as<std::int32_t>();
    t.last_page_lengths = last.data_as<std::int32_t>();
    t.host_page_indptr = host_indptr.data_as<std::int32_t>();
    t.host_last_page_lengths = host_last.data_as<std::int32_t>();
    return t;
  }
};

clsa::CacheConfig small_config(DType dtype) {
  clsa::CacheConfig c;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.index_dim = 64;
  c.page_size = 16;
  c.dtype = dtype;
  return c;
}

clsa::IndexerConfig small_indexer(int top_k) {
  clsa::IndexerConfig c;
  c.num_heads = 2;
  c.index_dim = 64;
  c.top_k = top_k;
  return c;
}

clsa::AttentionConfig small_attention(int q_heads) {
  clsa::AttentionConfig c;
  c.num_q_heads = q_heads;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  return c;
}

/// Indexer + sparse + dense over `batch`: routed positions and both outputs.
struct StepResult {
  std::vector<std::int32_t> positions;
  std::vector<double> sparse, dense;
};

StepResult run_step(const clsa::CacheBatch& batch, clsa::Backend backend, const clsa::Tensor& q_idx,
                    const clsa::Tensor& w, const clsa::Tensor& q, int tokens, int top_k) {
  const std::int64_t B = batch.num_sequences();
  clsa::IndexerConfig ic = small_indexer(top_k);
  ic.sink_tokens = 2;
  ic.local_window = 4;
  clsa::CrossLayerIndexer indexer(ic, backend);
  const clsa::AttentionConfig ac = small_attention(6);
  const clsa::Device device = test::device_of(backend);
  clsa::Tensor sparse_out = clsa::Tensor::empty({B, tokens, 6, 64}, q.view().dtype(), device);
  clsa::Tensor dense_out = clsa::Tensor::empty({B, tokens, 6, 64}, q.view().dtype(), device);
  const clsa::RoutingIndex routing = indexer.select(batch, q_idx, w);
  clsa::SparseCrossAttention(ac, backend).forward(batch, routing, q, sparse_out);
  clsa::DenseCrossAttention(ac, backend).forward(batch, q, dense_out);
  return {test::read_ints(routing.positions), test::read_values(sparse_out), test::read_values(dense_out)};
}

}  // namespace

CLSA_BACKEND_TEST(wrapped_engine_tables, "engine-owned pool and FlashInfer-style page tables without a copy",
                  "[embedding]") {
  test::Rng rng(test::base_seed() + 50);
  for (DType dtype : {DType::bf16, DType::f32}) {
    clsa::CacheConfig config = small_config(dtype);
    const std::vector<std::int64_t> lengths = {37, 160, 5, 99};
    config.max_pages = test::pages_for(lengths, config.page_size);
    test::CacheFixture fixture(config, backend, lengths, rng);
    const EnginePool engine(fixture, rng);
    const clsa::CacheBatch wrapped = clsa::CacheBatch::wrap(engine.layout, engine.tables(4));
    REQUIRE(wrapped.num_sequences() == 4);
    for (int b = 0; b < 4; ++b) CHECK(wrapped.length(b) == lengths[static_cast<std::size_t>(b)]);
    CHECK(wrapped.max_length() == 160);
    // Nothing copied: the kernels read the engine's own tables.
    CHECK(wrapped.device_last_page_lengths() == engine.tables(4).last_page_lengths);

    const int tokens = 2;
    auto random = [&](std::initializer_list<std::int64_t> shape, DType type) {
      std::int64_t n = 1;
      for (std::int64_t e : shape) n *= e;
      std::vector<double> values(static_cast<std::size_t>(n));
      for (double& x : values) x = rng.normal();
      return test::on_device(test::make_host(values, type, shape), backend);
    };
    const clsa::Tensor q_idx = random({4, tokens, 2, 64}, dtype);
    const clsa::Tensor w = random({4, tokens, 2}, DType::f32);
    const clsa::Tensor q = random({4, tokens, 6, 64}, dtype);
    const StepResult owned = run_step(fixture.batch(), backend, q_idx, w, q, tokens, 24);
    const StepResult engine_step = run_step(wrapped, backend, q_idx, w, q, tokens, 24);
    INFO("dtype " << clsa::dtype_name(dtype));
    CHECK(engine_step.positions == owned.positions);
    CHECK(engine_step.sparse == owned.sparse);
    CHECK(engine_step.dense == owned.dense);
  }
}

CLSA_BACKEND_TEST(wrapped_cache_pool, "SharedKVCache::wrap appends into an engine-owned pool", "[embedding]") {
  test::Rng rng(test::base_seed() + 51);
  const clsa::CacheConfig config = small_config(DType::bf16);
  // The engine's pool: index keys padded to 80 elements per token, K/V in one tensor.
  const std::int64_t pages = 6, P = 16, H = 2, D = 64, I = 80;
  const clsa::Device device = test::device_of(backend);
  const clsa::Tensor kv =
      test::on_device(test::make_host(std::vector<double>(static_cast<std::size_t>(pages * 2 * P * H * D), 3.0),
                                      DType::bf16, {pages, 2, P, H, D}),
                      backend);
  const clsa::Tensor ik = test::on_device(
      test::make_host(std::vector<double>(static_cast<std::size_t>(pages * P * I), 3.0), DType::bf16, {pages, P, I}),
      backend);
  const clsa::PagedCacheLayout pool = engine_support::interleaved_layout(config, device, pages, kv, ik, I);
  clsa::SharedKVCache cache = clsa::SharedKVCache::wrap(config, pool);
  CHECK(cache.config().max_pages == pages);
  CHECK(cache.device() == device);
  const clsa::SequenceId id = cache.add_sequence();
  const std::int64_t tokens = 40;
  std::vector<double> k(static_cast<std::size_t>(tokens * H * D)), v(k.size()),
      keys(static_cast<std::size_t>(tokens * 64));
  for (auto* values : {&k, &v, &keys}) {
    for (double& x : *values) x = test::round_to(DType::bf16, rng.normal());
  }
  cache.append(id, test::on_device(test::make_host(k, DType::bf16, {tokens, H, D}), backend),
               test::on_device(test::make_host(v, DType::bf16, {tokens, H, D}), backend),
               test::on_device(test::make_host(keys, DType::bf16, {tokens, 64}), backend));
  const std::vector<double> kv_now = test::read_values(kv);
  const std::vector<double> ik_now = test::read_values(ik);
  const std::vector<std::int32_t> page_list = cache.pages(id);
  REQUIRE(page_list.size() == 3);
  for (std::int64_t p = 0; p < tokens; ++p) {
    const std::int64_t page = page_list[static_cast<std::size_t>(p / P)];
    const std::int64_t slot = p % P;
    for (std::int64_t h = 0; h < H; ++h) {
      for (std::int64_t d = 0; d < D; d += 7) {
        const std::size_t source = static_cast<std::size_t>((p * H + h) * D + d);
        REQUIRE(kv_now[static_cast<std::size_t>((((page * 2 + 0) * P + slot) * H + h) * D + d)] == k[source]);
        REQUIRE(kv_now[static_cast<std::size_t>((((page * 2 + 1) * P + slot) * H + h) * D + d)] == v[source]);
      }
    }
    REQUIRE(ik_now[static_cast<std::size_t>((page * P + slot) * I + 5)] == keys[static_cast<std::size_t>(p * 64 + 5)]);
    REQUIRE(ik_now[static_cast<std::size_t>((page * P + slot) * I + 70)] == 3.0);  // padding untouched
  }
}

CLSA_BACKEND_TEST(caller_workspace, "components run on caller-provided workspace; too small is an error",
                  "[embedding]") {
  test::Rng rng(test::base_seed() + 52);
  clsa::CacheConfig config = small_config(DType::bf16);
  const std::vector<std::int64_t> lengths = {200, 64};
  config.max_pages = test::pages_for(lengths, config.page_size);
  test::CacheFixture fixture(config, backend, lengths, rng);
  const clsa::CacheBatch batch = fixture.batch();
  const clsa::Device device = test::device_of(backend);
  const clsa::IndexerConfig ic = small_indexer(32);
  const clsa::AttentionConfig ac = small_attention(4);
  clsa::CrossLayerIndexer owned_indexer(ic, backend), indexer(ic, backend);
  clsa::SparseCrossAttention owned_sparse(ac, backend), sparse(ac, backend);
  clsa::DenseCrossAttention dense(ac, backend);
  const std::size_t indexer_bytes = indexer.workspace_bytes(2, 1, 200);
  const std::size_t sparse_bytes = sparse.workspace_bytes(2, 1, 32);
  const std::size_t dense_bytes = dense.workspace_bytes(2, 1, 200);
  CHECK(indexer_bytes > 0);
  CHECK(indexer.workspace_bytes(4, 1, 200) > indexer_bytes);
  const clsa::Tensor indexer_space =
      clsa::Tensor::empty({static_cast<std::int64_t>(indexer_bytes)}, DType::i32, device);
  const clsa::Tensor sparse_space =
      clsa::Tensor::empty({static_cast<std::int64_t>(sparse_bytes) + 1}, DType::i32, device);
  const clsa::Tensor dense_space =
      clsa::Tensor::empty({static_cast<std::int64_t>(dense_bytes) + 1}, DType::i32, device);
  indexer.set_workspace(indexer_space.view().data(), indexer_bytes, 2, 1, 200);
  sparse.set_workspace(sparse_space.view().data(), sparse_bytes, 2, 1, 32);
  dense.set_workspace(dense_space.view().data(), dense_bytes, 2, 1, 200);

  std::vector<double> values(2 * 2 * 64);
  for (double& x : values) x = rng.normal();
  const clsa::Tensor q_idx = test::on_device(test::make_host(values, DType::bf16, {2, 1, 2, 64}), backend);
  const clsa::Tensor w = test::on_device(test::make_host({1.0, 0.5, 0.25, 2.0}, DType::f32, {2, 1, 2}), backend);
  std::vector<double> q_values(2 * 4 * 64);
  for (double& x : q_values) x = rng.normal();
  const clsa::Tensor q = test::on_device(test::make_host(q_values, DType::bf16, {2, 1, 4, 64}), backend);
  clsa::Tensor out = clsa::Tensor::empty({2, 1, 4, 64}, DType::bf16, device);
  clsa::Tensor expected_out = clsa::Tensor::empty({2, 1, 4, 64}, DType::bf16, device);

  const clsa::RoutingIndex routing = indexer.select(batch, q_idx, w);
  const clsa::RoutingIndex expected_routing = owned_indexer.select(batch, q_idx, w);
  CHECK(test::read_ints(routing.positions) == test::read_ints(expected_routing.positions));
  CHECK(routing.positions.data() >= indexer_space.view().data());
  sparse.forward(batch, routing, q, out);
  owned_sparse.forward(batch, expected_routing, q, expected_out);
  CHECK(test::read_values(out) == test::read_values(expected_out));
  dense.forward(batch, q, out);

  // A plan larger than the workspace: a clear error, nothing allocated; a call beyond the plan's
  // bounds: a clear error too.
  clsa::IndexerConfig wide = ic;
  wide.top_k = 64;
  clsa::CrossLayerIndexer wide_indexer(wide, backend);
  CLSA_REQUIRE_ERROR(wide_indexer.set_workspace(indexer_space.view().data(), indexer_bytes, 2, 1, 200),
                     clsa::ErrorCode::capacity_exceeded, "set_workspace");
  CLSA_REQUIRE_ERROR(indexer.set_workspace(nullptr, 16, 2, 1, 200), clsa::ErrorCode::invalid_argument, "workspace");
  clsa::CrossLayerIndexer narrow_indexer(ic, backend);
  narrow_indexer.set_workspace(indexer_space.view().data(), indexer_bytes, 1, 1, 200);
  CLSA_REQUIRE_ERROR(narrow_indexer.select(batch, q_idx, w), clsa::ErrorCode::capacity_exceeded, "planned for");
}

#if CLSA_TEST_COUNTS_ALLOCATIONS
TEST_CASE("a decoding step on the CPU allocates nothing once set up", "[embedding]") {
  test::Rng rng(test::base_seed() + 53);
  clsa::CacheConfig config = small_config(DType::bf16);
  const std::vector<std::int64_t> lengths = {300, 77, 150};
  config.max_pages = test::pages_for(lengths, config.page_size);
  test::CacheFixture fixture(config, clsa::Backend::cpu, lengths, rng);
  clsa::CacheBatch batch = fixture.batch();
  const clsa::IndexerConfig ic = small_indexer(48);
  const clsa::AttentionConfig ac = small_attention(4);
  clsa::CrossLayerIndexer indexer(ic, clsa::Backend::cpu);
  clsa::SparseCrossAttention sparse(ac, clsa::Backend::cpu);
  indexer.reserve(3, 1, 400);
  sparse.reserve(3, 1, 48);
  std::vector<double> values(3 * 4 * 64, 0.5);
  const clsa::Tensor q_idx = test::make_host(values, DType::bf16, {3, 1, 2, 64});
  const clsa::Tensor w = test::make_host({1, 1, 1, 1, 1, 1}, DType::f32, {3, 1, 2});
  const clsa::Tensor q = test::make_host(values, DType::bf16, {3, 1, 4, 64});
  clsa::Tensor out = clsa::Tensor::empty({3, 1, 4, 64}, DType::bf16);
  const std::vector<clsa::SequenceId> ids = fixture.ids;
  // Warm: the thread pool starts, the batch tables reach their size.
  fixture.cache.batch(ids, batch);
  sparse.forward(batch, indexer.select(batch, q_idx, w), q, out);
  allocations = 0;
  counting = true;
  for (int step = 0; step < 5; ++step) {
    fixture.cache.batch(ids, batch);  // refill in place
    const clsa::RoutingIndex routing = indexer.select(batch, q_idx, w);
    for (int layer = 0; layer < 4; ++layer) sparse.forward(batch, routing, q, out);
  }
  counting = false;
  CHECK(allocations.load() == 0);
}
#endif

CLSA_BACKEND_TEST(multi_token_queries, "T = 16 and a 300-token prefill chunk are causal and match the oracle",
                  "[embedding]") {
  test::Rng rng(test::base_seed() + 54);
  for (int tokens : {16, 300}) {
    clsa::CacheConfig config = small_config(DType::f32);
    const std::vector<std::int64_t> lengths = {tokens + 40L, static_cast<std::int64_t>(tokens)};
    config.max_pages = test::pages_for(lengths, config.page_size);
    test::CacheFixture fixture(config, backend, lengths, rng);
    const std::int64_t rows = 2 * tokens;
    std::vector<double> q_idx_values(static_cast<std::size_t>(rows * 2 * 64)),
        q_values(static_cast<std::size_t>(rows * 6 * 64));
    std::vector<double> w_values(static_cast<std::size_t>(rows * 2), 1.0);
    for (double& x : q_idx_values) x = test::round_to(DType::f32, rng.normal());
    for (double& x : q_values) x = test::round_to(DType::f32, rng.normal());
    const clsa::Tensor q_idx = test::on_device(test::make_host(q_idx_values, DType::f32, {2, tokens, 2, 64}), backend);
    const clsa::Tensor w = test::on_device(test::make_host(w_values, DType::f32, {2, tokens, 2}), backend);
    const clsa::Tensor q = test::on_device(test::make_host(q_values, DType::f32, {2, tokens, 6, 64}), backend);
    const StepResult step = run_step(fixture.batch(), backend, q_idx, w, q, tokens, 24);
    INFO("T = " << tokens);
    for (std::int64_t row = 0; row < rows; ++row) {
      const std::size_t b = static_cast<std::size_t>(row / tokens);
      const std::int64_t visible = lengths[b] - tokens + row % tokens + 1;
      const std::vector<double> scores = test::oracle_scores(fixture.data[b], 64, q_idx_values.data() + row * 128,
                                                             w_values.data() + row * 2, 2, visible, 1.0);
      const std::vector<std::int32_t> expected = test::oracle_routing(scores, 24, 2, 4);
      std::vector<std::int32_t> routed(
          step.positions.begin() + row * 24,
          step.positions.begin() + row * 24 + static_cast<std::ptrdiff_t>(expected.size()));
      REQUIRE(routed == expected);  // causal: only positions <= n - T + t
      double out[6 * 64], lse[6];
      test::oracle_attention(fixture.data[b], routed, q_values.data() + row * 6 * 64, 6, 2, 64, 0.125, out, lse);
      for (int i = 0; i < 6 * 64; ++i) {
        REQUIRE(std::abs(step.sparse[static_cast<std::size_t>(row * 6 * 64 + i)] - out[i]) <=
                1e-4 * (1 + std::abs(out[i])));
      }
    }
  }
}

TEST_CASE("bad engine tables and pools are refused", "[embedding][errors]") {
  test::Rng rng(test::base_seed() + 55);
  clsa::CacheConfig config = small_config(DType::bf16);
  config.max_pages = 16;
  test::CacheFixture fixture(config, clsa::Backend::cpu, {40, 20}, rng);
  EnginePool engine(fixture, rng);
  auto* indptr = engine.host_indptr.data_as<std::int32_t>();
  auto* last = engine.host_last.data_as<std::int32_t>();
  const clsa::PagedCacheLayout good = engine.layout;

  // A refused re-wrap leaves the batch it refills as it was (here: the one sequence of 40 tokens).
  clsa::CacheBatch rewrapped = clsa::CacheBatch::wrap(good, engine.tables(1));
  last[1] = 17;
  CLSA_REQUIRE_ERROR(clsa::CacheBatch::wrap(good, engine.tables(2), rewrapped), clsa::ErrorCode::invalid_argument,
                     "last_page_lengths[1] = 17");
  CHECK(rewrapped.num_sequences() == 1);
  CHECK(rewrapped.length(0) == 40);
  CHECK(rewrapped.max_length() == 40);
  clsa::CacheBatch own = fixture.cache.batch({fixture.ids[1]});  // libclsa's own tables, then a refused wrap
  CLSA_REQUIRE_ERROR(clsa::CacheBatch::wrap(good, engine.tables(2), own), clsa::ErrorCode::invalid_argument,
                     "last_page_lengths[1] = 17");
  CHECK(own.num_sequences() == 1);
  CHECK(own.length(0) == 20);
  CHECK(own.lengths()[0] == 20);
  CLSA_REQUIRE_ERROR(clsa::CacheBatch::wrap(good, engine.tables(2)), clsa::ErrorCode::invalid_argument,
                     "last_page_lengths[1] = 17");
  last[1] = 0;
  CLSA_REQUIRE_ERROR(clsa::CacheBatch::wrap(good, engine.tables(2)), clsa::ErrorCode::invalid_argument, "1..16");
  last[1] = 4;
  indptr[0] = 1;
  CLSA_REQUIRE_ERROR(clsa::CacheBatch::wrap(good, engine.tables(2)), clsa::ErrorCode::invalid_argument,
                     "page_indptr[0] = 1");
  indptr[0] = 0;
  const std::int32_t saved = engine.indices.data_as<std::int32_t>()[2];
  engine.indices.data_as<std::int32_t>()[2] = 99;
  CLSA_REQUIRE_ERROR(clsa::CacheBatch::wrap(good, engine.tables(2)), clsa::ErrorCode::invalid_argument,
                     "page_indices[2] = 99");
  engine.indices.data_as<std::int32_t>()[2] = saved;
  CLSA_REQUIRE_ERROR(clsa::CacheBatch::wrap(good, engine.tables(0)), clsa::ErrorCode::invalid_argument,
                     "num_sequences");
  clsa::PageTableView missing = engine.tables(2);
  missing.host_last_page_lengths = nullptr;
  CLSA_REQUIRE_ERROR(clsa::CacheBatch::wrap(good, missing), clsa::ErrorCode::invalid_argument, "null pointer");
  clsa::PagedCacheLayout bad = good;
  bad.page_size = 12;
  CLSA_REQUIRE_ERROR(clsa::CacheBatch::wrap(bad, engine.tables(2)), clsa::ErrorCode::invalid_argument,
                     "page_size = 12");
  bad = good;
  bad.v = nullptr;
  CLSA_REQUIRE_ERROR(clsa::CacheBatch::wrap(bad, engine.tables(2)), clsa::ErrorCode::invalid_argument, "null");
  bad = good;
  bad.k_token_stride = -1;
  CLSA_REQUIRE_ERROR(clsa::CacheBatch::wrap(bad, engine.tables(2)), clsa::ErrorCode::shape_mismatch, "k_token_stride");
  bad = good;
  bad.head_dim = 32;
  CLSA_REQUIRE_ERROR(clsa::SharedKVCache::wrap(config, bad), clsa::ErrorCode::shape_mismatch, "head_dim 32");
  // A good wrap still works after all that.
  CHECK(clsa::CacheBatch::wrap(good, engine.tables(2)).max_length() == 40);
}
