// A batch from SharedKVCache::batch() has tables that grow; once a CUDA graph has captured a
// select() or forward() over it, they must not move (the graph holds their addresses). A refill
// that fits is written in place and the next replay follows it; a refill that would grow the
// tables raises Error(capacity_exceeded) naming reserve_batch and leaves the batch, and so the
// graph, as they were; so does one that would give it other tables (a wrap into it, a refill of
// captured engine tables from the cache: Error(invalid_argument)). On the CPU nothing is captured
// and refills grow freely; one case marks a CPU batch by hand, as select() marks one, to pin every
// refusal without a GPU.
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "catch.hpp"
#include "cuda_support.hpp"
#include "fixtures.hpp"
#include "support.hpp"

#if CLSA_TEST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

using clsa::DType;
using clsa::SequenceId;

constexpr test::StepShape kShape{8, 2, 64, 4, 64, 16};  // Hq, Hkv, D, H_idx, D_idx, page size
constexpr int kPageSize = kShape.page_size;
constexpr int kTopK = 64;
constexpr int kMaxSequences = 4;
constexpr std::int64_t kMaxLength = 2048;
// Sequence 0 is long and 1 short: a batch made for {0} and refilled for {0, 1} grows room for
// more pages than {0, 1} hold. Sequence 2 is long enough that {0, 2} outgrows that room.
const std::vector<std::int64_t> kLengths = {600, 90, 900};

clsa::CacheConfig cache_config() {
  return kShape.cache_config(test::pages_for(kLengths, kPageSize, /*spare*/ 16));
}

/// The components of one step (select + one sparse layer), planned for the same bounds wherever
/// they are made, so that fresh ones give the same bits as reused ones.
test::Components step_components(clsa::Backend backend) {
  return test::Components(backend, kShape.indexer_config(kTopK, /*sink_tokens*/ 2, /*local_window*/ 8),
                          kShape.attention_config(), kMaxSequences, /*tokens*/ 1, kMaxLength);
}

/// One step's tensors for `sequences` slots and T = 1, seeded random values, on the backend's device.
struct StepTensors {
  clsa::Tensor q_idx, weights, q, out;
  StepTensors(std::int64_t sequences, test::Rng& rng, clsa::Backend backend) {
    auto random = [&](std::initializer_list<std::int64_t> shape, DType dtype, double lo, double hi) {
      std::int64_t count = 1;
      for (std::int64_t extent : shape) count *= extent;
      std::vector<double> values(static_cast<std::size_t>(count));
      for (double& x : values) x = rng.uniform_real(lo, hi);
      return test::on_device(test::make_host(values, dtype, shape), backend);
    };
    q_idx = random({sequences, 1, kShape.index_heads, kShape.index_dim}, DType::bf16, -1.0, 1.0);
    weights = random({sequences, 1, kShape.index_heads}, DType::f32, 0.5, 1.5);
    q = random({sequences, 1, kShape.q_heads, kShape.head_dim}, DType::bf16, -1.0, 1.0);
    out = random({sequences, 1, kShape.q_heads, kShape.head_dim}, DType::bf16, -1.0, 1.0);
  }
};

/// The step as an engine enqueues (or captures) it.
clsa::RoutingIndex enqueue_step(test::Components& components, const clsa::CacheBatch& batch, StepTensors& tensors,
                                clsa::Stream stream) {
  const clsa::RoutingIndex routing = components.indexer.select(batch, tensors.q_idx, tensors.weights, stream);
  components.sparse.forward(batch, routing, tensors.q, tensors.out, stream);
  return routing;
}

struct StepResult {
  std::vector<std::int32_t> positions, counts;
  std::vector<double> out;
};

/// Reads a step's results (the stream's work must be done).
StepResult read_result(const clsa::RoutingIndex& routing, const clsa::Tensor& out) {
  return {test::read_ints(routing.positions), test::read_ints(routing.counts), test::read_values(out)};
}

void require_same(const StepResult& actual, const StepResult& expected, const char* when) {
  INFO(when);
  REQUIRE(actual.counts == expected.counts);
  REQUIRE(actual.positions == expected.positions);
  REQUIRE(actual.out == expected.out);
}

/// The step eagerly on fresh objects: new components, a new batch of `ids`, a new output tensor,
/// the same inputs.
StepResult eager_on_fresh_objects(const test::CacheFixture& fixture, const std::vector<SequenceId>& ids,
                                  const StepTensors& inputs, clsa::Stream stream) {
  test::Components fresh = step_components(fixture.backend);
  const clsa::CacheBatch batch = fixture.cache.batch(ids, stream);
  StepTensors tensors = inputs;  // shares the inputs
  tensors.out = clsa::Tensor::empty({static_cast<std::int64_t>(ids.size()), 1, kShape.q_heads, kShape.head_dim},
                                    DType::bf16, inputs.out.device());
  const clsa::RoutingIndex routing = enqueue_step(fresh, batch, tensors, stream);
  clsa::synchronize(stream);
  return read_result(routing, tensors.out);
}

/// A growable batch (not reserve_batch) of sequences 0 and 1: made for {0}, then refilled for
/// {0, 1}, so that its tables have room for more pages than {0, 1} hold.
clsa::CacheBatch growable_batch(const test::CacheFixture& fixture, clsa::Stream stream) {
  clsa::CacheBatch batch = fixture.cache.batch(std::vector<SequenceId>{fixture.ids[0]}, stream);
  fixture.cache.batch(std::vector<SequenceId>{fixture.ids[0], fixture.ids[1]}, batch, stream);
  return batch;
}

/// Pages that the batch's tables need for these sequences (empty slots hold none).
std::int64_t pages_held(const test::CacheFixture& fixture, const std::vector<SequenceId>& ids) {
  std::int64_t pages = 0;
  for (SequenceId id : ids) {
    if (id != clsa::empty_slot) pages += (fixture.cache.length(id) + kPageSize - 1) / kPageSize;
  }
  return pages;
}

/// What a refused refill must leave as it was: the batch's sequences, lengths, room and tables.
struct BatchSnapshot {
  int num_sequences = 0;
  std::int64_t max_length = 0;
  std::vector<std::int32_t> lengths;
  int capacity = 0;
  std::int64_t page_capacity = 0;
  const std::int32_t* page_indptr = nullptr;
  const std::int32_t* page_indices = nullptr;
  const std::int32_t* last_page_lengths = nullptr;

  explicit BatchSnapshot(const clsa::CacheBatch& batch)
      : num_sequences(batch.num_sequences()),
        max_length(batch.max_length()),
        lengths(batch.lengths(), batch.lengths() + batch.num_sequences()),
        capacity(batch.capacity()),
        page_capacity(batch.page_capacity()),
        page_indptr(batch.device_page_indptr()),
        page_indices(batch.device_page_indices()),
        last_page_lengths(batch.device_last_page_lengths()) {}

  void require_unchanged(const clsa::CacheBatch& batch) const {
    REQUIRE(batch.num_sequences() == num_sequences);
    REQUIRE(batch.max_length() == max_length);
    REQUIRE(std::vector<std::int32_t>(batch.lengths(), batch.lengths() + batch.num_sequences()) == lengths);
    REQUIRE(batch.capacity() == capacity);
    REQUIRE(batch.page_capacity() == page_capacity);
    REQUIRE(batch.device_page_indptr() == page_indptr);
    REQUIRE(batch.device_page_indices() == page_indices);
    REQUIRE(batch.device_last_page_lengths() == last_page_lengths);
  }
};

/// The batch's tables handed over as an engine's (CacheBatch::wrap). CPU only: there its device
/// tables are host memory and serve as the host copies too.
clsa::PageTableView engine_tables_of(const clsa::CacheBatch& batch) {
  return {batch.num_sequences(),       batch.device_page_indptr(),
          batch.device_page_indices(), batch.device_last_page_lengths(),
          batch.device_page_indptr(),  batch.device_last_page_lengths()};
}

/// The message of the Error(capacity_exceeded) that `refill` must raise.
template <class Refill>
std::string refusal_of(Refill&& refill) {
  try {
    refill();
  } catch (const clsa::Error& error) {
    INFO("message: " << error.what());
    CHECK(error.code() == clsa::ErrorCode::capacity_exceeded);
    return error.what();
  }
  FAIL("the refill was not refused");
  return {};
}

}  // namespace

TEST_CASE("captured refill: on the CPU a growable batch grows freely", "[cache]") {
  const clsa::Backend backend = clsa::Backend::cpu;
  test::Rng rng(test::base_seed() + 170);
  test::CacheFixture fixture(cache_config(), backend, kLengths, rng);
  const std::vector<SequenceId> first = {fixture.ids[0], fixture.ids[1]};
  clsa::CacheBatch batch = growable_batch(fixture, {});
  test::Components components = step_components(backend);
  StepTensors tensors(2, rng, backend);
  const clsa::RoutingIndex routing = enqueue_step(components, batch, tensors, {});
  require_same(read_result(routing, tensors.out), eager_on_fresh_objects(fixture, first, tensors, {}),
               "a step over the batch");
  CHECK_FALSE(batch.captured());

  // More sequences and more pages than the tables hold: they grow (new tables).
  const std::vector<SequenceId> more = {fixture.ids[0], fixture.ids[1], fixture.ids[2]};
  REQUIRE(static_cast<int>(more.size()) > batch.capacity());
  REQUIRE(pages_held(fixture, more) > batch.page_capacity());
  const clsa::CacheBatch before = batch;  // keeps the old tables
  fixture.cache.batch(more, batch);
  CHECK(batch.device_page_indptr() != before.device_page_indptr());
  CHECK(before.num_sequences() == 2);
  CHECK(batch.capacity() >= 3);
  CHECK(batch.page_capacity() >= pages_held(fixture, more));
  CHECK(batch.num_sequences() == 3);
  CHECK(batch.length(2) == kLengths[2]);
  CHECK_FALSE(batch.captured());

  StepTensors grown_tensors(3, rng, backend);
  const clsa::RoutingIndex grown_routing = enqueue_step(components, batch, grown_tensors, {});
  require_same(read_result(grown_routing, grown_tensors.out), eager_on_fresh_objects(fixture, more, grown_tensors, {}),
               "a step over the grown batch");
  CHECK_FALSE(batch.captured());
}

TEST_CASE("captured refill: a captured batch refuses what would move or replace its tables (marked by hand, cpu)",
          "[cache]") {
  // select() and forward() mark a batch only while their stream captures a CUDA graph, so only on
  // CUDA (the test below). The refusals are host code that does not depend on the backend: here
  // the batch is marked as select() marks it (clsa::detail::mark_captured), to check them all
  // without a GPU.
  const clsa::Backend backend = clsa::Backend::cpu;
  test::Rng rng(test::base_seed() + 171);
  test::CacheFixture fixture(cache_config(), backend, kLengths, rng);
  const std::vector<SequenceId> ids = {fixture.ids[0], fixture.ids[1]};
  clsa::CacheBatch batch = growable_batch(fixture, {});
  clsa::detail::mark_captured(batch);
  REQUIRE(batch.captured());
  const BatchSnapshot before(batch);

  // Refills that would grow the tables (more pages, then more sequences than they hold):
  // capacity_exceeded naming reserve_batch, the batch as it was.
  const std::vector<SequenceId> more_pages = {fixture.ids[0], fixture.ids[2]};
  REQUIRE(pages_held(fixture, more_pages) > batch.page_capacity());
  CLSA_REQUIRE_ERROR(fixture.cache.batch(more_pages, batch), clsa::ErrorCode::capacity_exceeded,
                     "SharedKVCache::reserve_batch(max_sequences, max_length)");
  before.require_unchanged(batch);
  const std::vector<SequenceId> more_sequences = {fixture.ids[0], fixture.ids[1], clsa::empty_slot};
  CLSA_REQUIRE_ERROR(fixture.cache.batch(more_sequences, batch), clsa::ErrorCode::capacity_exceeded,
                     "3 sequences holding");
  before.require_unchanged(batch);

  // Engine tables wrapped into it would replace the tables: invalid_argument, the batch as it was.
  CLSA_REQUIRE_ERROR(clsa::CacheBatch::wrap(batch.layout(), engine_tables_of(batch), batch),
                     clsa::ErrorCode::invalid_argument, "must not move while the graph lives");
  before.require_unchanged(batch);
  CHECK(batch.captured());

  // A refill that fits is still written in place.
  const std::vector<SequenceId> swapped = {fixture.ids[1], fixture.ids[0]};
  fixture.cache.batch(swapped, batch);
  CHECK(batch.device_page_indptr() == before.page_indptr);
  CHECK(batch.length(0) == kLengths[1]);
  CHECK(batch.captured());

  // Captured engine tables refilled from the cache would be replaced by the cache's:
  // invalid_argument, the wrapped batch as it was.
  clsa::CacheBatch wrapped = clsa::CacheBatch::wrap(batch.layout(), engine_tables_of(batch));
  clsa::detail::mark_captured(wrapped);
  REQUIRE(wrapped.captured());
  const BatchSnapshot before_wrapped(wrapped);
  CLSA_REQUIRE_ERROR(fixture.cache.batch(ids, wrapped), clsa::ErrorCode::invalid_argument,
                     "would give it other tables than the graph reads");
  before_wrapped.require_unchanged(wrapped);
  CHECK(wrapped.captured());
}

#if CLSA_TEST_WITH_CUDA
TEST_CASE("captured refill: a graph over a growable batch refuses a refill that would move its tables",
          "[cache][cuda]") {
  CLSA_SKIP_WITHOUT_GPU();
  using cuda_support::check_cuda;
  const clsa::Backend backend = clsa::Backend::cuda;
  test::Rng rng(test::base_seed() + 170);
  test::CacheFixture fixture(cache_config(), backend, kLengths, rng);
  const cuda_support::OwnedStream owned_stream(fixture.cache.device());  // non-blocking
  const clsa::Stream stream = owned_stream.stream();
  // The fixture appended on the default stream, which a non-blocking stream does not wait for.
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize (appends)");

  const std::vector<SequenceId> ids = {fixture.ids[0], fixture.ids[1]};
  clsa::CacheBatch batch = growable_batch(fixture, stream);
  REQUIRE_FALSE(batch.fixed_capacity());
  REQUIRE(batch.capacity() == 2);
  const std::int64_t page_capacity = batch.page_capacity();
  REQUIRE(page_capacity >= pages_held(fixture, ids) + 2);

  test::Components components = step_components(backend);
  StepTensors tensors(2, rng, backend);
  // Eager calls leave the batch unmarked.
  enqueue_step(components, batch, tensors, stream);
  owned_stream.wait();
  CHECK_FALSE(batch.captured());

  clsa::RoutingIndex routing;
  const cuda_support::CapturedGraph graph =
      cuda_support::CapturedGraph::capture(stream, [&] { routing = enqueue_step(components, batch, tensors, stream); });
  REQUIRE(batch.captured());
  const clsa::CacheBatch copy = batch;  // copies share the tables, and so the mark
  CHECK(copy.captured());

  // Poisons the output, replays, and reads what the replay wrote.
  auto replay = [&] {
    owned_stream.fill(tensors.out.view().data(), 0xff, tensors.out.bytes());
    graph.replay(stream);
    owned_stream.wait();
    components.indexer.check_status();
    return read_result(routing, tensors.out);
  };
  const StepResult captured = replay();
  require_same(captured, eager_on_fresh_objects(fixture, ids, tensors, stream), "the first replay");

  // Sequence 1 grows past a page boundary; the refill still fits the tables: written in place.
  const BatchSnapshot before_fit(batch);
  fixture.append_random(1, kPageSize + 3, rng);
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize (append)");
  REQUIRE(pages_held(fixture, ids) <= page_capacity);
  fixture.cache.batch(ids, batch, stream);
  CHECK(batch.device_page_indptr() == before_fit.page_indptr);
  CHECK(batch.device_page_indices() == before_fit.page_indices);
  CHECK(batch.device_last_page_lengths() == before_fit.last_page_lengths);
  CHECK(batch.page_capacity() == page_capacity);
  CHECK(batch.length(1) == kLengths[1] + kPageSize + 3);
  const StepResult after_fit = replay();
  require_same(after_fit, eager_on_fresh_objects(fixture, ids, tensors, stream), "a replay after a refill that fits");
  CHECK(after_fit.positions != captured.positions);  // the replay read the refilled tables

  // Refills that would grow the tables (more pages, then more sequences than they hold) are
  // refused and change nothing.
  const BatchSnapshot before_refusals(batch);
  const std::vector<SequenceId> more_pages = {fixture.ids[0], fixture.ids[2]};
  REQUIRE(pages_held(fixture, more_pages) > page_capacity);
  const std::string pages_message = refusal_of([&] { fixture.cache.batch(more_pages, batch, stream); });
  CHECK_THAT(pages_message, CLSA_CONTAINS("reserve_batch"));
  CHECK_THAT(pages_message,
             CLSA_CONTAINS("2 sequences holding " + std::to_string(pages_held(fixture, more_pages)) + " pages"));
  CHECK_THAT(pages_message, CLSA_CONTAINS("capacity 2 sequences and " + std::to_string(page_capacity) + " pages"));
  before_refusals.require_unchanged(batch);
  const std::vector<SequenceId> more_sequences = {fixture.ids[0], fixture.ids[1], clsa::empty_slot};
  const std::string sequences_message = refusal_of([&] { fixture.cache.batch(more_sequences, batch, stream); });
  CHECK_THAT(sequences_message, CLSA_CONTAINS("reserve_batch"));
  CHECK_THAT(sequences_message, CLSA_CONTAINS("3 sequences holding"));
  before_refusals.require_unchanged(batch);
  CHECK(batch.captured());

  // The graph still replays over the tables as they were.
  const StepResult after_refusals = replay();
  require_same(after_refusals, after_fit, "a replay after the refused refills");
  require_same(after_refusals, eager_on_fresh_objects(fixture, ids, tensors, stream),
               "a replay after the refused refills, against fresh objects");

  // And keeps following refills that fit (the same sequences, in the other order).
  const std::vector<SequenceId> swapped = {fixture.ids[1], fixture.ids[0]};
  fixture.cache.batch(swapped, batch, stream);
  CHECK(batch.device_page_indptr() == before_fit.page_indptr);
  require_same(replay(), eager_on_fresh_objects(fixture, swapped, tensors, stream), "a replay after a swap");
}
#endif
