// A batch from SharedKVCache::batch() has tables that grow; once a CUDA graph has captured a
// select() or forward() over it, they must not move (the graph holds their addresses). A refill
// that fits is written in place and the next replay follows it; a refill that would grow the
// tables raises Error(capacity_exceeded) naming reserve_batch and leaves the batch, and so the
// graph, as they were. On the CPU nothing is captured and refills grow freely.
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "catch.hpp"
#include "support.hpp"

#if CLSA_TEST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

using clsa::DType;
using clsa::SequenceId;

constexpr int kQHeads = 8, kKvHeads = 2, kHeadDim = 64;
constexpr int kIndexHeads = 4, kIndexDim = 64;
constexpr int kTopK = 64;
constexpr int kPageSize = 16;
constexpr int kMaxSequences = 4;
constexpr std::int64_t kMaxLength = 2048;
// Sequence 0 is long and 1 short: a batch made for {0} and refilled for {0, 1} grows room for
// more pages than {0, 1} hold. Sequence 2 is long enough that {0, 2} outgrows that room.
const std::vector<std::int64_t> kLengths = {600, 90, 900};

clsa::CacheConfig cache_config() {
  clsa::CacheConfig config;
  config.num_kv_heads = kKvHeads;
  config.head_dim = kHeadDim;
  config.index_dim = kIndexDim;
  config.page_size = kPageSize;
  config.max_pages = test::pages_for(kLengths, kPageSize, /*spare*/ 16);
  config.dtype = DType::bf16;
  return config;
}

clsa::IndexerConfig indexer_config() {
  clsa::IndexerConfig config;
  config.num_heads = kIndexHeads;
  config.index_dim = kIndexDim;
  config.top_k = kTopK;
  config.sink_tokens = 2;
  config.local_window = 8;
  config.scale = 1.0f;
  return config;
}

clsa::AttentionConfig attention_config() {
  clsa::AttentionConfig config;
  config.num_q_heads = kQHeads;
  config.num_kv_heads = kKvHeads;
  config.head_dim = kHeadDim;
  return config;
}

/// The components of one step (select + one sparse layer), planned for the same bounds wherever
/// they are made, so that fresh ones give the same bits as reused ones.
struct StepComponents {
  clsa::CrossLayerIndexer indexer;
  clsa::SparseCrossAttention attention;
  explicit StepComponents(clsa::Backend backend)
      : indexer(indexer_config(), backend), attention(attention_config(), backend) {
    indexer.reserve(kMaxSequences, 1, kMaxLength);
    attention.reserve(kMaxSequences, 1, kTopK);
  }
};

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
    q_idx = random({sequences, 1, kIndexHeads, kIndexDim}, DType::bf16, -1.0, 1.0);
    weights = random({sequences, 1, kIndexHeads}, DType::f32, 0.5, 1.5);
    q = random({sequences, 1, kQHeads, kHeadDim}, DType::bf16, -1.0, 1.0);
    out = random({sequences, 1, kQHeads, kHeadDim}, DType::bf16, -1.0, 1.0);
  }
};

/// The step as an engine enqueues (or captures) it.
clsa::RoutingIndex enqueue_step(StepComponents& components, const clsa::CacheBatch& batch, StepTensors& tensors,
                                clsa::Stream stream) {
  const clsa::RoutingIndex routing = components.indexer.select(batch, tensors.q_idx, tensors.weights, stream);
  components.attention.forward(batch, routing, tensors.q, tensors.out, stream);
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
  StepComponents fresh(fixture.backend);
  const clsa::CacheBatch batch = fixture.cache.batch(ids, stream);
  StepTensors tensors = inputs;  // shares the inputs
  tensors.out = clsa::Tensor::empty({static_cast<std::int64_t>(ids.size()), 1, kQHeads, kHeadDim}, DType::bf16,
                                    inputs.out.device());
  const clsa::RoutingIndex routing = enqueue_step(fresh, batch, tensors, stream);
  clsa::synchronize(stream);
  return read_result(routing, tensors.out);
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
  clsa::CacheBatch batch = fixture.cache.batch(std::vector<SequenceId>{fixture.ids[0]});
  fixture.cache.batch(first, batch);
  StepComponents components(backend);
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

#if CLSA_TEST_WITH_CUDA
namespace {

void check_cuda(cudaError_t status, const char* what) {
  INFO(what << ": " << cudaGetErrorString(status));
  REQUIRE(status == cudaSuccess);
}

}  // namespace

TEST_CASE("captured refill: a graph over a growable batch refuses a refill that would move its tables",
          "[cache][cuda]") {
  CLSA_SKIP_WITHOUT_GPU();
  const clsa::Backend backend = clsa::Backend::cuda;
  test::Rng rng(test::base_seed() + 170);
  test::CacheFixture fixture(cache_config(), backend, kLengths, rng);
  cudaStream_t cuda_stream = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&cuda_stream, cudaStreamNonBlocking), "cudaStreamCreate");
  const clsa::Stream stream(cuda_stream);
  // The fixture appended on the default stream, which a non-blocking stream does not wait for.
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize (appends)");

  // A growable batch (not reserve_batch): made for {0}, refilled for {0, 1}, it grew room for
  // more pages than {0, 1} hold.
  const std::vector<SequenceId> ids = {fixture.ids[0], fixture.ids[1]};
  clsa::CacheBatch batch = fixture.cache.batch(std::vector<SequenceId>{fixture.ids[0]}, stream);
  fixture.cache.batch(ids, batch, stream);
  REQUIRE_FALSE(batch.fixed_capacity());
  REQUIRE(batch.capacity() == 2);
  const std::int64_t page_capacity = batch.page_capacity();
  REQUIRE(page_capacity >= pages_held(fixture, ids) + 2);

  StepComponents components(backend);
  StepTensors tensors(2, rng, backend);
  // Eager calls leave the batch unmarked.
  enqueue_step(components, batch, tensors, stream);
  check_cuda(cudaStreamSynchronize(cuda_stream), "eager step");
  CHECK_FALSE(batch.captured());

  cudaGraph_t graph = nullptr;
  clsa::RoutingIndex routing;
  check_cuda(cudaStreamBeginCapture(cuda_stream, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
  try {
    routing = enqueue_step(components, batch, tensors, stream);
  } catch (...) {
    // Leave the stream out of capture mode before the error goes on.
    (void)cudaStreamEndCapture(cuda_stream, &graph);
    if (graph != nullptr) (void)cudaGraphDestroy(graph);
    throw;
  }
  check_cuda(cudaStreamEndCapture(cuda_stream, &graph), "cudaStreamEndCapture");
  cudaGraphExec_t exec = nullptr;
  check_cuda(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
  check_cuda(cudaGraphDestroy(graph), "cudaGraphDestroy");
  REQUIRE(batch.captured());
  const clsa::CacheBatch copy = batch;  // copies share the tables, and so the mark
  CHECK(copy.captured());

  // Poisons the output, replays, and reads what the replay wrote.
  auto replay = [&] {
    check_cuda(cudaMemsetAsync(tensors.out.view().data(), 0xff, tensors.out.bytes(), cuda_stream), "poison");
    check_cuda(cudaGraphLaunch(exec, cuda_stream), "cudaGraphLaunch");
    check_cuda(cudaStreamSynchronize(cuda_stream), "replay");
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

  check_cuda(cudaGraphExecDestroy(exec), "cudaGraphExecDestroy");
  check_cuda(cudaStreamDestroy(cuda_stream), "cudaStreamDestroy");
}
#endif
