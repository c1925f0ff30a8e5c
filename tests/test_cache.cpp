// SharedKVCache: paged storage, all-or-nothing appends, release, batch tables, memory statistics.
#include <algorithm>
#include <set>
#include <thread>
#include <tuple>

#include "catch.hpp"
#include "clsa/paged_view.hpp"
#include "support.hpp"

namespace {

using clsa::CacheConfig;
using clsa::DType;
using clsa::SequenceId;

/// K, V and indexer keys of a sequence as they sit in the pool, read through layout() and pages().
test::SequenceData read_back(const clsa::SharedKVCache& cache, SequenceId id) {
  // Reads exactly the sequence's token rows (never the unwritten rest of a page: the pool is not
  // zeroed, and compute-sanitizer initcheck would rightly flag reading it).
  const clsa::PagedCacheLayout layout = cache.layout();
  const CacheConfig& c = cache.config();
  const std::size_t element = clsa::dtype_size(c.dtype);
  const std::int64_t row = std::int64_t{c.num_kv_heads} * c.head_dim;
  auto token_row = [&](const void* pool, std::int64_t page_stride, std::int64_t token_stride, std::int64_t page,
                       std::int64_t offset, std::int64_t width) {
    void* data = static_cast<char*>(const_cast<void*>(pool)) +
                 static_cast<std::size_t>(page * page_stride + offset * token_stride) * element;
    return test::read_values(clsa::TensorView(data, c.dtype, {width}, cache.device()));
  };
  const std::vector<std::int32_t> pages = cache.pages(id);
  test::SequenceData out;
  out.length = cache.length(id);
  for (std::int64_t p = 0; p < out.length; ++p) {
    const std::int64_t page = pages[static_cast<std::size_t>(p / c.page_size)], offset = p % c.page_size;
    const std::vector<double> k = token_row(layout.k, layout.k_page_stride, layout.k_token_stride, page, offset, row);
    const std::vector<double> v = token_row(layout.v, layout.v_page_stride, layout.v_token_stride, page, offset, row);
    const std::vector<double> ik =
        token_row(layout.index_keys, layout.index_page_stride, layout.index_token_stride, page, offset, c.index_dim);
    out.k.insert(out.k.end(), k.begin(), k.end());
    out.v.insert(out.v.end(), v.begin(), v.end());
    out.index_keys.insert(out.index_keys.end(), ik.begin(), ik.end());
  }
  return out;
}

void require_same(const test::SequenceData& a, const test::SequenceData& b) {
  REQUIRE(a.length == b.length);
  REQUIRE(a.k == b.k);
  REQUIRE(a.v == b.v);
  REQUIRE(a.index_keys == b.index_keys);
}

}  // namespace

CLSA_BACKEND_TEST(cache_stores_what_was_appended, "appended tokens land in the pages of their sequence", "[cache]") {
  test::Rng rng(test::base_seed() + 1);
  for (DType dtype : {DType::f32, DType::f16, DType::bf16}) {
    CacheConfig config;
    config.num_kv_heads = rng.uniform(1, 4);
    config.head_dim = 64;
    config.index_dim = 64;
    config.page_size = 1 << rng.uniform(2, 5);
    config.dtype = dtype;
    std::vector<std::int64_t> lengths;
    for (int i = rng.uniform(1, 6); i > 0; --i) lengths.push_back(rng.uniform(1, 300));
    config.max_pages = test::pages_for(lengths, config.page_size);
    INFO("dtype " << clsa::dtype_name(dtype) << " page_size " << config.page_size << " lengths "
                  << test::describe(lengths));
    test::CacheFixture fixture(config, backend, lengths, rng);
    std::set<std::int32_t> all_pages;
    std::int64_t tokens = 0;
    for (std::size_t i = 0; i < lengths.size(); ++i) {
      REQUIRE(fixture.cache.length(fixture.ids[i]) == lengths[i]);
      const std::vector<std::int32_t> pages = fixture.cache.pages(fixture.ids[i]);
      REQUIRE(static_cast<std::int64_t>(pages.size()) == (lengths[i] + config.page_size - 1) / config.page_size);
      for (std::int32_t page : pages) REQUIRE(all_pages.insert(page).second);  // no page shared
      require_same(read_back(fixture.cache, fixture.ids[i]), fixture.data[i]);
      tokens += lengths[i];
    }
    const clsa::MemoryStats stats = fixture.cache.memory();
    CHECK(stats.tokens == tokens);
    CHECK(stats.sequences == static_cast<std::int64_t>(lengths.size()));
    CHECK(stats.pages_used == static_cast<std::int64_t>(all_pages.size()));
    CHECK(stats.pages_free == config.max_pages - stats.pages_used);
    const std::size_t element = clsa::dtype_size(dtype);
    CHECK(stats.kv_bytes_per_token == 2u * config.num_kv_heads * config.head_dim * element);
    CHECK(stats.index_bytes_per_token == config.index_dim * element);
    CHECK(stats.shared_cache_bytes() == static_cast<std::size_t>(tokens) * stats.bytes_per_token);
    CHECK(stats.per_layer_cache_bytes(16) == static_cast<std::size_t>(tokens) * stats.kv_bytes_per_token * 16);
  }
}

CLSA_BACKEND_TEST(cache_batch_tables, "batch() builds the page tables of the sequences asked for", "[cache]") {
  test::Rng rng(test::base_seed() + 2);
  CacheConfig config;
  config.num_kv_heads = 2;
  config.head_dim = 64;
  config.index_dim = 64;
  config.page_size = 16;
  config.dtype = DType::bf16;
  const std::vector<std::int64_t> lengths = {5, 40, 1, 33, 16};
  config.max_pages = test::pages_for(lengths, config.page_size);
  test::CacheFixture fixture(config, backend, lengths, rng);
  // Ask in another order, with one sequence twice.
  const std::vector<SequenceId> order = {fixture.ids[3], fixture.ids[0], fixture.ids[3], fixture.ids[4]};
  clsa::CacheBatch batch = fixture.cache.batch(order);
  REQUIRE(batch.num_sequences() == 4);
  CHECK(batch.max_length() == 33);
  // The tables the kernels read: page_indptr [B+1], page_indices, last_page_lengths [B] (FlashInfer's
  // paged_kv_t): every length must come back from them through clsa::paged_length.
  auto read_table = [&](const std::int32_t* table, std::int64_t count) {
    return test::read_ints(clsa::TensorView(const_cast<std::int32_t*>(table), DType::i32, {count}, batch.device()));
  };
  const std::vector<std::int32_t> indptr = read_table(batch.device_page_indptr(), 5);
  const std::vector<std::int32_t> last = read_table(batch.device_last_page_lengths(), 4);
  CHECK(indptr.front() == 0);
  const std::vector<std::int32_t> indices = read_table(batch.device_page_indices(), indptr.back());
  for (std::size_t i = 0; i < order.size(); ++i) {
    CHECK(batch.length(static_cast<int>(i)) == fixture.cache.length(order[i]));
    CHECK(clsa::paged_length(indptr.data(), last.data(), config.page_size, static_cast<int>(i)) ==
          fixture.cache.length(order[i]));
    const std::vector<std::int32_t> pages = fixture.cache.pages(order[i]);
    CHECK(std::vector<std::int32_t>(indices.begin() + indptr[i], indices.begin() + indptr[i + 1]) == pages);
  }
  // Refilling a batch in place keeps its tables where they were when they fit.
  const std::int32_t* tables = batch.device_page_indptr();
  fixture.cache.batch(std::vector<SequenceId>{fixture.ids[1], fixture.ids[2]}, batch);
  CHECK(batch.device_page_indptr() == tables);
  CHECK(batch.num_sequences() == 2);
  CHECK(batch.max_length() == 40);

  // A refill that must grow gives the batch new tables; a copy keeps the old ones, whole (read
  // through them: the sanitizer builds would catch a dangling table).
  const clsa::CacheBatch copy = batch;
  fixture.cache.batch(std::vector<SequenceId>{fixture.ids[0], fixture.ids[1], fixture.ids[2], fixture.ids[3],
                                              fixture.ids[4], fixture.ids[1]},
                      batch);
  CHECK(batch.num_sequences() == 6);
  REQUIRE(copy.num_sequences() == 2);
  CHECK(copy.length(0) == 40);
  CHECK(copy.length(1) == 1);
  const std::vector<std::int32_t> copy_indptr = read_table(copy.device_page_indptr(), 3);
  const std::vector<std::int32_t> copy_last = read_table(copy.device_last_page_lengths(), 2);
  CHECK(clsa::paged_length(copy_indptr.data(), copy_last.data(), config.page_size, 0) == 40);
  CHECK(clsa::paged_length(copy_indptr.data(), copy_last.data(), config.page_size, 1) == 1);

  // A refill refused for an unknown sequence leaves the batch as it was.
  const clsa::SequenceId unknown = static_cast<clsa::SequenceId>(999);
  CHECK_THROWS_AS(fixture.cache.batch(std::vector<SequenceId>{fixture.ids[0], unknown}, batch), clsa::Error);
  CHECK(batch.num_sequences() == 6);
  CHECK(batch.length(5) == 40);
}

CLSA_BACKEND_TEST(cache_failed_append_changes_nothing, "a failed append leaves the cache exactly as it was",
                  "[cache]") {
  test::Rng rng(test::base_seed() + 3);
  CacheConfig config;
  config.num_kv_heads = 2;
  config.head_dim = 64;
  config.index_dim = 64;
  config.page_size = 8;
  config.max_pages = 6;
  config.dtype = DType::f16;
  test::CacheFixture fixture(config, backend, {10, 20}, rng);  // 2 + 3 pages used, 1 free
  const clsa::MemoryStats before = fixture.cache.memory();
  const test::SequenceData first = read_back(fixture.cache, fixture.ids[0]);
  const test::SequenceData second = read_back(fixture.cache, fixture.ids[1]);
  const std::vector<std::int32_t> pages_before = fixture.cache.pages(fixture.ids[0]);

  auto tensors = [&](std::int64_t tokens, DType dtype) {
    std::vector<double> values(static_cast<std::size_t>(tokens * 2 * 64), 0.5);
    return std::make_tuple(test::on_device(test::make_host(values, dtype, {tokens, 2, 64}), backend),
                           test::on_device(test::make_host(values, dtype, {tokens, 2, 64}), backend),
                           test::on_device(test::make_host(values, dtype, {tokens, 64}), backend));
  };
  {  // needs 2 new pages, 1 is free
    auto [k, v, ik] = tensors(15, DType::f16);
    CLSA_REQUIRE_ERROR(fixture.cache.append(fixture.ids[0], k, v, ik), clsa::ErrorCode::capacity_exceeded,
                       "1 of 6 pages are free");
  }
  {  // wrong dtype in the last tensor checked
    auto [k, v, ik] = tensors(3, DType::f16);
    auto [k2, v2, ik_wrong] = tensors(3, DType::f32);
    (void)k2;
    (void)v2;
    CLSA_REQUIRE_ERROR(fixture.cache.append(fixture.ids[1], k, v, ik_wrong), clsa::ErrorCode::dtype_mismatch,
                       "index_keys");
  }
  {  // unknown sequence
    auto [k, v, ik] = tensors(1, DType::f16);
    CLSA_REQUIRE_ERROR(fixture.cache.append(static_cast<SequenceId>(999), k, v, ik), clsa::ErrorCode::unknown_sequence,
                       "sequence 999");
  }
  const clsa::MemoryStats after = fixture.cache.memory();
  CHECK(after.pages_used == before.pages_used);
  CHECK(after.tokens == before.tokens);
  CHECK(fixture.cache.pages(fixture.ids[0]) == pages_before);
  require_same(read_back(fixture.cache, fixture.ids[0]), first);
  require_same(read_back(fixture.cache, fixture.ids[1]), second);
  // ...and it still works: 8 tokens fit in what is left (6 in the open page, 2 in the free one).
  auto [k, v, ik] = tensors(8, DType::f16);
  fixture.cache.append(fixture.ids[0], k, v, ik);
  CHECK(fixture.cache.length(fixture.ids[0]) == 18);
  CHECK(fixture.cache.memory().pages_free == 0);
}

CLSA_BACKEND_TEST(cache_release_and_strided_append, "release returns pages; strided inputs append", "[cache]") {
  test::Rng rng(test::base_seed() + 4);
  CacheConfig config;
  config.num_kv_heads = 4;
  config.head_dim = 64;
  config.index_dim = 64;
  config.page_size = 16;
  config.max_pages = 8;
  config.dtype = DType::bf16;
  test::CacheFixture fixture(config, backend, {100}, rng);
  REQUIRE(fixture.cache.memory().pages_free == 1);
  fixture.cache.release(fixture.ids[0]);
  CHECK(fixture.cache.memory().pages_free == 8);
  CHECK(fixture.cache.memory().tokens == 0);
  CHECK_FALSE(fixture.cache.contains(fixture.ids[0]));
  CHECK_THROWS_AS(fixture.cache.length(fixture.ids[0]), clsa::Error);
  CHECK_THROWS_AS(fixture.cache.release(fixture.ids[0]), clsa::Error);

  // A fused [T, 3, Hkv, D] projection output: K, V are strided slices of it; the indexer keys a
  // slice of a wider row.
  const std::int64_t tokens = 37;
  std::vector<double> fused(static_cast<std::size_t>(tokens * 3 * 4 * 64));
  for (double& x : fused) x = test::round_to(DType::bf16, rng.normal());
  const clsa::Tensor fused_t = test::on_device(test::make_host(fused, DType::bf16, {tokens, 3, 4, 64}), backend);
  std::vector<double> wide(static_cast<std::size_t>(tokens * 96));
  for (double& x : wide) x = test::round_to(DType::bf16, rng.normal());
  const clsa::Tensor wide_t = test::on_device(test::make_host(wide, DType::bf16, {tokens, 96}), backend);
  const clsa::Device device = test::device_of(backend);
  auto* base = static_cast<clsa::bfloat16*>(fused_t.view().data());
  clsa::TensorView k(base, DType::bf16, {tokens, 4, 64}, {3 * 4 * 64, 64, 1}, device);
  clsa::TensorView v(base + 4 * 64, DType::bf16, {tokens, 4, 64}, {3 * 4 * 64, 64, 1}, device);
  clsa::TensorView ik(static_cast<clsa::bfloat16*>(wide_t.view().data()) + 16, DType::bf16, {tokens, 64}, {96, 1},
                      device);
  const SequenceId id = fixture.cache.add_sequence();
  CHECK(id != fixture.ids[0]);  // ids are never reused
  fixture.cache.append(id, k, v, ik);
  test::SequenceData expected;
  expected.length = tokens;
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (int part = 0; part < 2; ++part) {
      auto& dst = part == 0 ? expected.k : expected.v;
      const auto first = fused.begin() + static_cast<std::ptrdiff_t>((t * 3 + part) * 4 * 64);
      dst.insert(dst.end(), first, first + 4 * 64);
    }
    const auto first = wide.begin() + static_cast<std::ptrdiff_t>(t * 96 + 16);
    expected.index_keys.insert(expected.index_keys.end(), first, first + 64);
  }
  require_same(read_back(fixture.cache, id), expected);
}

CLSA_BACKEND_TEST(cache_concurrent_appends, "distinct sequences appended from several threads", "[cache][threads]") {
  test::Rng rng(test::base_seed() + 5);
  CacheConfig config;
  config.num_kv_heads = 2;
  config.head_dim = 64;
  config.index_dim = 64;
  config.page_size = 4;
  config.max_pages = 8 * 64;
  config.dtype = DType::f32;
  clsa::SharedKVCache cache(config, backend);
  constexpr int kThreads = 8;
  constexpr int kAppends = 40;
  std::vector<SequenceId> ids;
  for (int i = 0; i < kThreads; ++i) ids.push_back(cache.add_sequence());
  // Thread i appends token values that encode (i, position), one or two tokens at a time.
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      std::int64_t position = 0;
      for (int a = 0; a < kAppends; ++a) {
        const std::int64_t tokens = 1 + (a % 2);
        std::vector<double> kv(static_cast<std::size_t>(tokens * 2 * 64));
        std::vector<double> ik(static_cast<std::size_t>(tokens * 64));
        for (std::int64_t t = 0; t < tokens; ++t) {
          for (int j = 0; j < 128; ++j) kv[static_cast<std::size_t>(t * 128 + j)] = i * 1000 + position + t;
          for (int j = 0; j < 64; ++j) ik[static_cast<std::size_t>(t * 64 + j)] = -(i * 1000 + position + t);
        }
        const clsa::Tensor k = test::on_device(test::make_host(kv, DType::f32, {tokens, 2, 64}), backend);
        const clsa::Tensor key = test::on_device(test::make_host(ik, DType::f32, {tokens, 64}), backend);
        cache.append(ids[static_cast<std::size_t>(i)], k, k, key);
        position += tokens;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int i = 0; i < kThreads; ++i) {
    const test::SequenceData stored = read_back(cache, ids[static_cast<std::size_t>(i)]);
    REQUIRE(stored.length == kAppends / 2 * 3);
    for (std::int64_t p = 0; p < stored.length; ++p) {
      REQUIRE(stored.k[static_cast<std::size_t>(p * 128)] == i * 1000 + p);
      REQUIRE(stored.v[static_cast<std::size_t>(p * 128 + 127)] == i * 1000 + p);
      REQUIRE(stored.index_keys[static_cast<std::size_t>(p * 64 + 5)] == -(i * 1000 + p));
    }
  }
  CHECK(cache.memory().tokens == kThreads * kAppends / 2 * 3);
}
