// Planned bounds. A component planned with reserve()/set_workspace() and a batch from
// reserve_batch() refuse an eager call beyond their bounds with Error(capacity_exceeded) before
// anything is written. In a CUDA-graph replay (no host checks) a sequence that grew past the
// planned max context routes nothing and gets zeros, the other rows stay exact, and the kernels'
// report surfaces through check_status(). And components work on the device they were created
// on whatever device is current when they are called, leaving the caller's device current.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
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

using clsa::Backend;
using clsa::DType;
using clsa::ErrorCode;
using clsa::SequenceId;

constexpr test::StepShape kShape{4, 2, 64, 4, 64, 16};  // Hq, Hkv, D, H_idx, D_idx, page size
constexpr int kKvHeads = kShape.kv_heads, kHeadDim = kShape.head_dim, kQHeads = kShape.q_heads;
constexpr int kIndexDim = kShape.index_dim, kPageSize = kShape.page_size;
constexpr double kSoftmaxScale = 0.125;  // 1 / sqrt(kHeadDim): softmax_scale 0

clsa::IndexerConfig bounds_indexer_config(int top_k) {
  return kShape.indexer_config(top_k, /*sink_tokens*/ 1, /*local_window*/ 2);
}

std::size_t index(std::int64_t i) {
  return static_cast<std::size_t>(i);
}

using test::StepInputs;

/// One step's inputs (one layer) on `device`.
StepInputs make_inputs(int sequences, int tokens, test::Rng& rng, clsa::Device device) {
  return test::random_step_inputs(kShape, sequences, tokens, rng, device);
}

/// Caller-owned outputs of one step (routing, sparse and dense attention) on a device.
struct StepOutputs {
  int top_k = 0;
  clsa::Tensor positions, counts, sparse_out, sparse_lse, dense_out, dense_lse;

  StepOutputs(int sequences, int tokens, int routed, clsa::Device device) : top_k(routed) {
    positions = clsa::Tensor::empty({sequences, tokens, routed}, DType::i32, device);
    counts = clsa::Tensor::empty({sequences, tokens}, DType::i32, device);
    sparse_out = clsa::Tensor::empty({sequences, tokens, kQHeads, kHeadDim}, DType::bf16, device);
    sparse_lse = clsa::Tensor::empty({sequences, tokens, kQHeads}, DType::f32, device);
    dense_out = clsa::Tensor::empty({sequences, tokens, kQHeads, kHeadDim}, DType::bf16, device);
    dense_lse = clsa::Tensor::empty({sequences, tokens, kQHeads}, DType::f32, device);
  }
  clsa::RoutingIndex routing() const { return clsa::RoutingIndex{positions.view(), counts.view(), top_k}; }
  std::vector<const clsa::Tensor*> all() const {
    return {&positions, &counts, &sparse_out, &sparse_lse, &dense_out, &dense_lse};
  }
};

/// The bytes of a contiguous tensor on any device.
std::vector<unsigned char> raw_bytes(const clsa::TensorView& tensor) {
  REQUIRE(tensor.is_contiguous());
  std::vector<unsigned char> bytes(index(tensor.numel()) * clsa::dtype_size(tensor.dtype()));
  clsa::copy_bytes(bytes.data(), clsa::Device::cpu(), tensor.data(), tensor.device(), bytes.size());
  return bytes;
}

/// Fills a contiguous tensor with 0xff bytes (NaN in every float dtype, -1 in int32), synchronously
/// on the legacy default stream: for the eager calls below, which run on it too.
void poison(const clsa::Tensor& tensor) {
  const std::vector<unsigned char> ones(tensor.bytes(), 0xff);
  clsa::copy_bytes(tensor.view().data(), tensor.device(), ones.data(), clsa::Device::cpu(), ones.size());
}

/// The sequence each batch slot holds, as stored; nullptr for a slot that must route nothing and
/// get zeros (an empty slot, or a sequence beyond the plan in a graph replay).
using Slots = std::vector<const test::SequenceData*>;

/// Routing against the oracle (exact data: the very same sets), -1 padding, count 0 for null slots.
void require_routing(const std::vector<std::int32_t>& positions, const std::vector<std::int32_t>& counts,
                     const Slots& slots, const StepInputs& in, const clsa::IndexerConfig& ic) {
  REQUIRE(counts.size() == slots.size() * index(in.tokens));
  REQUIRE(positions.size() == counts.size() * index(ic.top_k));
  for (std::size_t b = 0; b < slots.size(); ++b) {
    for (int t = 0; t < in.tokens; ++t) {
      const std::size_t row = b * index(in.tokens) + index(t);
      std::vector<std::int32_t> expected;
      if (slots[b] != nullptr) expected = in.oracle_row(*slots[b], static_cast<int>(b), t, ic);
      INFO("slot " << b << ", token " << t << ": routing vs the oracle");
      REQUIRE(counts[row] == static_cast<std::int32_t>(expected.size()));
      expected.resize(index(ic.top_k), -1);
      const std::vector<std::int32_t> routed(
          positions.begin() + static_cast<std::ptrdiff_t>(row * index(ic.top_k)),
          positions.begin() + static_cast<std::ptrdiff_t>((row + 1) * index(ic.top_k)));
      REQUIRE(routed == expected);
    }
  }
}

/// Attention outputs against the oracle: over the oracle's routed set (sparse: `ic` given) or every
/// visible position (dense). Null slots: exactly +0 everywhere and lse -inf.
void require_attention(const std::vector<double>& out, const std::vector<double>& lse, const Slots& slots,
                       const StepInputs& in, const clsa::IndexerConfig* ic) {
  const test::Tolerance tolerance = test::output_tolerance(DType::bf16);
  const std::size_t head_values = index(kQHeads) * kHeadDim;
  REQUIRE(out.size() == slots.size() * index(in.tokens) * head_values);
  REQUIRE(lse.size() == slots.size() * index(in.tokens) * kQHeads);
  for (std::size_t b = 0; b < slots.size(); ++b) {
    for (int t = 0; t < in.tokens; ++t) {
      const std::size_t row = b * index(in.tokens) + index(t);
      INFO("slot " << b << ", token " << t << ": " << (ic != nullptr ? "sparse" : "dense") << " vs the oracle");
      const std::vector<double> got(out.begin() + static_cast<std::ptrdiff_t>(row * head_values),
                                    out.begin() + static_cast<std::ptrdiff_t>((row + 1) * head_values));
      const std::vector<double> got_lse(lse.begin() + static_cast<std::ptrdiff_t>(row * kQHeads),
                                        lse.begin() + static_cast<std::ptrdiff_t>((row + 1) * kQHeads));
      if (slots[b] == nullptr) {
        for (double x : got) {
          REQUIRE(x == 0.0);
          REQUIRE(!std::signbit(x));
        }
        for (double x : got_lse) REQUIRE(x == -std::numeric_limits<double>::infinity());
        continue;
      }
      std::vector<std::int32_t> attended;
      if (ic != nullptr) {
        attended = in.oracle_row(*slots[b], static_cast<int>(b), t, *ic);
      } else {
        attended.resize(index(slots[b]->length - in.tokens + t + 1));
        std::iota(attended.begin(), attended.end(), 0);
      }
      REQUIRE(!attended.empty());
      std::vector<double> expected(head_values), expected_lse(index(kQHeads));
      test::oracle_attention(*slots[b], attended, in.q[0].data() + row * head_values, kQHeads, kKvHeads, kHeadDim,
                             kSoftmaxScale, expected.data(), expected_lse.data());
      REQUIRE(test::tolerance_ratio(got, expected, tolerance.atol, tolerance.rtol) <= 1.0);
      REQUIRE(test::tolerance_ratio(got_lse, expected_lse, 2e-3, 2e-3) <= 1.0);
    }
  }
}

/// Plans a component: reserve() (its own workspace) or set_workspace() (caller memory sized by
/// workspace_bytes(); one byte less is refused with capacity_exceeded first, and changes nothing).
/// Returns the memory.
template <class Component>
clsa::Tensor plan(Component& component, bool external, int sequences, int tokens, std::int64_t span) {
  if (!external) {
    component.reserve(sequences, tokens, span);
    return {};
  }
  const std::size_t bytes = component.workspace_bytes(sequences, tokens, span);
  REQUIRE(bytes > 0);
  clsa::Tensor memory =
      clsa::Tensor::empty({static_cast<std::int64_t>((bytes + 3) / 4)}, DType::i32, component.device());
  CLSA_REQUIRE_ERROR(component.set_workspace(memory.view().data(), bytes - 1, sequences, tokens, span),
                     ErrorCode::capacity_exceeded, "the plan needs");
  // The refused memory was not taken: the component still plans on its own workspace.
  component.reserve(sequences, tokens, span);
  component.set_workspace(memory.view().data(), bytes, sequences, tokens, span);
  return memory;
}

}  // namespace

// ---------------------------------------------------------------- eager calls beyond the bounds

CLSA_BACKEND_TEST(indexer_beyond_plan, "bounds: an indexer call beyond its plan is refused and writes nothing",
                  "[bounds]") {
  test::Rng rng(test::base_seed() + 900);
  const std::vector<std::int64_t> lengths = {40, 64, 90, 30};
  test::CacheFixture fixture(kShape.cache_config(test::pages_for(lengths, kPageSize)), backend, lengths, rng,
                             test::Values::small_integers);
  const clsa::Device device = fixture.cache.device();
  const std::vector<SequenceId>& ids = fixture.ids;
  const clsa::IndexerConfig ic = bounds_indexer_config(16);
  const clsa::CacheBatch within = fixture.cache.batch({ids[0], ids[1]});            // 40 and 64 (= the planned length)
  const clsa::CacheBatch too_long = fixture.cache.batch({ids[0], ids[2]});          // 90 > 64
  const clsa::CacheBatch too_many = fixture.cache.batch({ids[0], ids[1], ids[3]});  // 3 > 2 sequences
  const StepInputs two = make_inputs(2, 2, rng, device);
  const StepInputs three_tokens = make_inputs(2, 3, rng, device);
  const StepInputs three_sequences = make_inputs(3, 2, rng, device);
  const Slots within_slots = {&fixture.data[0], &fixture.data[1]};

  for (const bool external : {false, true}) {
    INFO((external ? "set_workspace" : "reserve") << "(2 sequences, 2 tokens, max_length 64)");
    clsa::CrossLayerIndexer indexer(ic, backend);
    const clsa::Tensor workspace = plan(indexer, external, 2, 2, 64);
    const StepOutputs out(2, 2, ic.top_k, device);
    const StepOutputs out_tokens(2, 3, ic.top_k, device);
    const StepOutputs out_sequences(3, 2, ic.top_k, device);
    for (const StepOutputs* o : {&out, &out_tokens, &out_sequences}) {
      poison(o->positions);
      poison(o->counts);
    }
    const std::vector<unsigned char> poisoned = raw_bytes(out.positions);
    const auto untouched = [](const StepOutputs& o) {
      for (const clsa::Tensor* t : {&o.positions, &o.counts}) {
        for (unsigned char byte : raw_bytes(*t)) REQUIRE(byte == 0xff);
      }
    };
    CLSA_REQUIRE_ERROR(indexer.select(too_long, two.q_idx_t, two.weights_t, out.routing()),
                       ErrorCode::capacity_exceeded, "max_length 90");
    CLSA_REQUIRE_ERROR(indexer.select(within, three_tokens.q_idx_t, three_tokens.weights_t, out_tokens.routing()),
                       ErrorCode::capacity_exceeded, "3 query tokens");
    CLSA_REQUIRE_ERROR(
        indexer.select(too_many, three_sequences.q_idx_t, three_sequences.weights_t, out_sequences.routing()),
        ErrorCode::capacity_exceeded, "3 sequences");
    // The view-returning overload refuses alike.
    CLSA_REQUIRE_ERROR(indexer.select(too_long, two.q_idx_t, two.weights_t), ErrorCode::capacity_exceeded,
                       "planned for at most 2, 2 and 64");
    untouched(out);
    untouched(out_tokens);
    untouched(out_sequences);

    // Within the plan (one sequence exactly at the planned length): the oracle's routing.
    indexer.select(within, two.q_idx_t, two.weights_t, out.routing());
    CHECK(raw_bytes(out.positions) != poisoned);
    require_routing(test::read_ints(out.positions), test::read_ints(out.counts), within_slots, two, ic);
    // A refused call leaves the index select() returned (in the workspace) as it was, too.
    const clsa::RoutingIndex returned = indexer.select(within, two.q_idx_t, two.weights_t);
    const std::vector<unsigned char> positions_before = raw_bytes(returned.positions);
    const std::vector<unsigned char> counts_before = raw_bytes(returned.counts);
    CLSA_REQUIRE_ERROR(indexer.select(too_many, three_sequences.q_idx_t, three_sequences.weights_t),
                       ErrorCode::capacity_exceeded, "3 sequences");
    CLSA_REQUIRE_ERROR(indexer.select(too_long, two.q_idx_t, two.weights_t, out.routing()),
                       ErrorCode::capacity_exceeded, "max_length 90");
    CHECK(raw_bytes(returned.positions) == positions_before);
    CHECK(raw_bytes(returned.counts) == counts_before);
    CHECK(raw_bytes(out.positions) == positions_before);
    require_routing(test::read_ints(returned.positions), test::read_ints(returned.counts), within_slots, two, ic);
    indexer.check_status();  // nothing to report: no kernel met a sequence beyond the plan
  }
}

CLSA_BACKEND_TEST(sparse_beyond_plan, "bounds: a sparse attention call beyond its plan is refused and writes nothing",
                  "[bounds]") {
  test::Rng rng(test::base_seed() + 901);
  const std::vector<std::int64_t> lengths = {40, 64, 90};
  test::CacheFixture fixture(kShape.cache_config(test::pages_for(lengths, kPageSize)), backend, lengths, rng,
                             test::Values::small_integers);
  const clsa::Device device = fixture.cache.device();
  const std::vector<SequenceId>& ids = fixture.ids;
  const clsa::IndexerConfig ic = bounds_indexer_config(16);
  const clsa::IndexerConfig ic_wide = bounds_indexer_config(24);
  const clsa::CacheBatch pair = fixture.cache.batch({ids[0], ids[1]});
  const clsa::CacheBatch triple = fixture.cache.batch({ids[0], ids[1], ids[2]});
  const StepInputs two = make_inputs(2, 2, rng, device);
  const StepInputs three_tokens = make_inputs(2, 3, rng, device);
  const StepInputs three_sequences = make_inputs(3, 2, rng, device);
  // Routing from unplanned indexers (they plan themselves for any call).
  const StepOutputs out(2, 2, ic.top_k, device);
  const StepOutputs out_wide(2, 2, ic_wide.top_k, device);
  const StepOutputs out_tokens(2, 3, ic.top_k, device);
  const StepOutputs out_sequences(3, 2, ic.top_k, device);
  clsa::CrossLayerIndexer router(ic, backend);
  clsa::CrossLayerIndexer wide_router(ic_wide, backend);
  router.select(pair, two.q_idx_t, two.weights_t, out.routing());
  wide_router.select(pair, two.q_idx_t, two.weights_t, out_wide.routing());
  router.select(pair, three_tokens.q_idx_t, three_tokens.weights_t, out_tokens.routing());
  router.select(triple, three_sequences.q_idx_t, three_sequences.weights_t, out_sequences.routing());
  clsa::synchronize();

  for (const bool external : {false, true}) {
    INFO((external ? "set_workspace" : "reserve") << "(2 sequences, 2 tokens, top_k 16)");
    clsa::SparseCrossAttention sparse(kShape.attention_config(), backend);
    const clsa::Tensor workspace = plan(sparse, external, 2, 2, ic.top_k);
    for (const StepOutputs* o : {&out, &out_wide, &out_tokens, &out_sequences}) {
      poison(o->sparse_out);
      poison(o->sparse_lse);
    }
    const auto untouched = [](const StepOutputs& o) {
      for (const clsa::Tensor* t : {&o.sparse_out, &o.sparse_lse}) {
        for (unsigned char byte : raw_bytes(*t)) REQUIRE(byte == 0xff);
      }
    };
    CLSA_REQUIRE_ERROR(
        sparse.forward(pair, out_wide.routing(), two.q_t[0], out_wide.sparse_out, {}, out_wide.sparse_lse),
        ErrorCode::capacity_exceeded, "top_k 24");
    CLSA_REQUIRE_ERROR(sparse.forward(pair, out_tokens.routing(), three_tokens.q_t[0], out_tokens.sparse_out, {},
                                      out_tokens.sparse_lse),
                       ErrorCode::capacity_exceeded, "3 query tokens");
    CLSA_REQUIRE_ERROR(sparse.forward(triple, out_sequences.routing(), three_sequences.q_t[0], out_sequences.sparse_out,
                                      {}, out_sequences.sparse_lse),
                       ErrorCode::capacity_exceeded, "3 sequences");
    untouched(out_wide);
    untouched(out_tokens);
    untouched(out_sequences);

    // Within the plan: the oracle's attention over the oracle's routed sets.
    sparse.forward(pair, out.routing(), two.q_t[0], out.sparse_out, {}, out.sparse_lse);
    const std::vector<double> written = test::read_values(out.sparse_out);
    require_attention(written, test::read_values(out.sparse_lse), {&fixture.data[0], &fixture.data[1]}, two, &ic);
    // Refused for its shapes (checked first) or its bounds: nothing is written either way.
    CLSA_REQUIRE_ERROR(
        sparse.forward(triple, out_sequences.routing(), three_sequences.q_t[0], out.sparse_out, {}, out.sparse_lse),
        ErrorCode::shape_mismatch, "out is [2,2,4,64]");
    CLSA_REQUIRE_ERROR(sparse.forward(pair, out_wide.routing(), two.q_t[0], out.sparse_out, {}, out.sparse_lse),
                       ErrorCode::capacity_exceeded, "planned for at most 2, 2 and 16");
    CHECK(test::read_values(out.sparse_out) == written);
  }
}

CLSA_BACKEND_TEST(dense_beyond_plan, "bounds: a dense attention call beyond its plan is refused and writes nothing",
                  "[bounds]") {
  test::Rng rng(test::base_seed() + 902);
  const std::vector<std::int64_t> lengths = {40, 64, 90};
  test::CacheFixture fixture(kShape.cache_config(test::pages_for(lengths, kPageSize)), backend, lengths, rng,
                             test::Values::small_integers);
  const clsa::Device device = fixture.cache.device();
  const std::vector<SequenceId>& ids = fixture.ids;
  const clsa::CacheBatch within = fixture.cache.batch({ids[1], ids[0]});
  const clsa::CacheBatch too_long = fixture.cache.batch({ids[0], ids[2]});
  const clsa::CacheBatch too_many = fixture.cache.batch({ids[0], ids[1], ids[0]});
  const StepInputs two = make_inputs(2, 2, rng, device);
  const StepInputs three_tokens = make_inputs(2, 3, rng, device);
  const StepInputs three_sequences = make_inputs(3, 2, rng, device);

  for (const bool external : {false, true}) {
    INFO((external ? "set_workspace" : "reserve") << "(2 sequences, 2 tokens, max_length 64)");
    clsa::DenseCrossAttention dense(kShape.attention_config(), backend);
    const clsa::Tensor workspace = plan(dense, external, 2, 2, 64);
    const StepOutputs out(2, 2, 1, device);
    const StepOutputs out_tokens(2, 3, 1, device);
    const StepOutputs out_sequences(3, 2, 1, device);
    for (const StepOutputs* o : {&out, &out_tokens, &out_sequences}) {
      poison(o->dense_out);
      poison(o->dense_lse);
    }
    const auto untouched = [](const StepOutputs& o) {
      for (const clsa::Tensor* t : {&o.dense_out, &o.dense_lse}) {
        for (unsigned char byte : raw_bytes(*t)) REQUIRE(byte == 0xff);
      }
    };
    CLSA_REQUIRE_ERROR(dense.forward(too_long, two.q_t[0], out.dense_out, {}, out.dense_lse),
                       ErrorCode::capacity_exceeded, "max_length 90");
    CLSA_REQUIRE_ERROR(dense.forward(within, three_tokens.q_t[0], out_tokens.dense_out, {}, out_tokens.dense_lse),
                       ErrorCode::capacity_exceeded, "3 query tokens");
    CLSA_REQUIRE_ERROR(
        dense.forward(too_many, three_sequences.q_t[0], out_sequences.dense_out, {}, out_sequences.dense_lse),
        ErrorCode::capacity_exceeded, "3 sequences");
    untouched(out);
    untouched(out_tokens);
    untouched(out_sequences);

    // Within the plan (one sequence exactly at the planned length): the oracle.
    dense.forward(within, two.q_t[0], out.dense_out, {}, out.dense_lse);
    const std::vector<double> written = test::read_values(out.dense_out);
    require_attention(written, test::read_values(out.dense_lse), {&fixture.data[1], &fixture.data[0]}, two, nullptr);
    CLSA_REQUIRE_ERROR(dense.forward(too_long, two.q_t[0], out.dense_out, {}, out.dense_lse),
                       ErrorCode::capacity_exceeded, "planned for at most 2, 2 and 64");
    CHECK(test::read_values(out.dense_out) == written);
    dense.check_status();  // nothing to report
  }
}

namespace {

/// Everything a CacheBatch shows: host view, table addresses, and the device tables' contents.
struct BatchState {
  int sequences = 0;
  std::int64_t max_length = 0;
  std::vector<std::int32_t> host_lengths;
  const std::int32_t *tables_address = nullptr, *indptr_address = nullptr, *indices_address = nullptr;
  std::vector<std::int32_t> last_page_lengths, indptr, indices;  // device tables, whole capacity
};

std::vector<std::int32_t> read_table(const std::int32_t* table, std::int64_t count, clsa::Device device) {
  std::vector<std::int32_t> values(index(count));
  clsa::copy_bytes(values.data(), clsa::Device::cpu(), table, device, values.size() * sizeof(std::int32_t));
  return values;
}

BatchState state_of(const clsa::CacheBatch& batch) {
  BatchState state;
  state.sequences = batch.num_sequences();
  state.max_length = batch.max_length();
  state.host_lengths.assign(batch.lengths(), batch.lengths() + batch.num_sequences());
  state.tables_address = batch.device_page_indptr();
  state.indptr_address = batch.device_page_indptr();
  state.indices_address = batch.device_page_indices();
  state.last_page_lengths = read_table(batch.device_last_page_lengths(), batch.capacity(), batch.device());
  state.indptr = read_table(batch.device_page_indptr(), batch.capacity() + 1, batch.device());
  state.indices = read_table(batch.device_page_indices(), batch.page_capacity(), batch.device());
  return state;
}

void require_unchanged(const BatchState& now, const BatchState& before) {
  CHECK(now.sequences == before.sequences);
  CHECK(now.max_length == before.max_length);
  CHECK(now.host_lengths == before.host_lengths);
  CHECK(now.tables_address == before.tables_address);
  CHECK(now.indptr_address == before.indptr_address);
  CHECK(now.indices_address == before.indices_address);
  CHECK(now.last_page_lengths == before.last_page_lengths);
  CHECK(now.indptr == before.indptr);
  CHECK(now.indices == before.indices);
}

}  // namespace

CLSA_BACKEND_TEST(batch_beyond_capacity,
                  "bounds: a refill beyond a reserved batch's capacity is refused and leaves the batch as it was",
                  "[bounds]") {
  test::Rng rng(test::base_seed() + 903);
  const std::vector<std::int64_t> lengths = {40, 64, 90, 30};  // 3, 4, 6 and 2 pages of 16
  test::CacheFixture fixture(kShape.cache_config(test::pages_for(lengths, kPageSize)), backend, lengths, rng,
                             test::Values::small_integers);
  const clsa::Device device = fixture.cache.device();
  const std::vector<SequenceId>& ids = fixture.ids;
  clsa::CacheBatch batch = fixture.cache.reserve_batch(2, 64);  // 2 sequences, 2 * 4 pages
  REQUIRE(batch.fixed_capacity());
  REQUIRE(batch.capacity() == 2);
  REQUIRE(batch.page_capacity() == 8);
  REQUIRE(batch.num_sequences() == 0);
  const std::int32_t* tables = batch.device_page_indptr();

  fixture.cache.batch({ids[0], ids[1]}, batch);  // 7 pages
  const clsa::CacheBatch copy = batch;           // copies share the tables
  const BatchState before = state_of(batch);
  CHECK(before.host_lengths == std::vector<std::int32_t>{40, 64});
  CHECK(before.indptr == std::vector<std::int32_t>{0, 3, 7});
  CLSA_REQUIRE_ERROR(fixture.cache.batch({ids[0], ids[1], ids[3]}, batch), ErrorCode::capacity_exceeded, "3 sequences");
  require_unchanged(state_of(batch), before);
  CLSA_REQUIRE_ERROR(fixture.cache.batch({ids[1], ids[2]}, batch), ErrorCode::capacity_exceeded, "holding 10 pages");
  require_unchanged(state_of(batch), before);
  CLSA_REQUIRE_ERROR(fixture.cache.batch({clsa::empty_slot, ids[3], ids[3]}, batch), ErrorCode::capacity_exceeded,
                     "reserved for 2 sequences and 8 pages");
  require_unchanged(state_of(batch), before);
  require_unchanged(state_of(copy), before);

  // A refill within the capacity (an empty slot, then a sequence whose pages are not the first
  // ones) writes the same tables in place; the batch is then read as it says.
  fixture.cache.batch({clsa::empty_slot, ids[2]}, batch);
  const BatchState after = state_of(batch);
  CHECK(batch.device_page_indptr() == tables);
  CHECK(after.tables_address == before.tables_address);
  CHECK(after.indices_address == before.indices_address);
  CHECK(after.host_lengths == std::vector<std::int32_t>{0, 90});
  CHECK(after.max_length == 90);
  CHECK(after.last_page_lengths == std::vector<std::int32_t>{0, 90 - 5 * kPageSize});  // 6 pages
  CHECK(after.indptr == std::vector<std::int32_t>{0, 0, 6});
  const std::vector<std::int32_t> pages = fixture.cache.pages(ids[2]);
  CHECK(std::vector<std::int32_t>(after.indices.begin(), after.indices.begin() + 6) == pages);
  clsa::DenseCrossAttention dense(kShape.attention_config(), backend);
  dense.reserve(2, 2, 90);
  const StepInputs two = make_inputs(2, 2, rng, device);
  const StepOutputs out(2, 2, 1, device);
  poison(out.dense_out);
  poison(out.dense_lse);
  dense.forward(batch, two.q_t[0], out.dense_out, {}, out.dense_lse);
  require_attention(test::read_values(out.dense_out), test::read_values(out.dense_lse), {nullptr, &fixture.data[2]},
                    two, nullptr);
}

// ---------------------------------------------------------------- CUDA: graph replay past the plan

#if CLSA_TEST_WITH_CUDA
namespace {

const char* const kOutputNames[] = {"positions", "counts", "sparse out", "sparse lse", "dense out", "dense lse"};

/// Every output of a step, as bytes (for "nothing was written" and bitwise comparisons).
std::vector<std::vector<unsigned char>> snapshot(const StepOutputs& out) {
  std::vector<std::vector<unsigned char>> bytes;
  for (const clsa::Tensor* tensor : out.all()) bytes.push_back(raw_bytes(*tensor));
  return bytes;
}

/// One step's results read back: bytes for bitwise comparisons, values for the oracle.
struct StepValues {
  std::vector<std::vector<unsigned char>> bytes;
  std::vector<std::int32_t> positions, counts;
  std::vector<double> sparse, sparse_lse, dense, dense_lse;
};

StepValues read_step(const StepOutputs& out) {
  StepValues values;
  values.bytes = snapshot(out);
  values.positions = test::read_ints(out.positions);
  values.counts = test::read_ints(out.counts);
  values.sparse = test::read_values(out.sparse_out);
  values.sparse_lse = test::read_values(out.sparse_lse);
  values.dense = test::read_values(out.dense_out);
  values.dense_lse = test::read_values(out.dense_lse);
  return values;
}

/// Requires two steps' outputs to be bitwise equal, naming the output that differs.
void require_same(const StepValues& actual, const StepValues& expected, const std::string& what) {
  INFO(what);
  REQUIRE(actual.bytes.size() == expected.bytes.size());
  for (std::size_t i = 0; i < expected.bytes.size(); ++i) {
    INFO("output: " << kOutputNames[i]);
    REQUIRE(actual.bytes[i] == expected.bytes[i]);
  }
}

using cuda_support::check_cuda;

int current_device() {
  int device = -1;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

/// Makes a device current for the test's own CUDA calls, restoring the caller's after.
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) : previous_(current_device()) {
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~ScopedDevice() { (void)cudaSetDevice(previous_); }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

 private:
  int previous_;
};

/// Waits for every device (uploads by cudaMemcpy from pageable memory may still be in flight for
/// the non-blocking streams below).
void synchronize_devices() {
  for (int d = 0; d < clsa::cuda_device_count(); ++d) {
    const ScopedDevice scope(d);
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }
}

/// Poisons every output with 0xff bytes on `stream` (of `device`): whatever is read back later was
/// written by the work enqueued after this.
void poison_async(const StepOutputs& out, cudaStream_t stream, int device) {
  const ScopedDevice scope(device);
  for (const clsa::Tensor* tensor : out.all()) {
    check_cuda(cudaMemsetAsync(tensor->view().data(), 0xff, tensor->bytes(), stream), "poison");
  }
}

/// The components of one engine on CUDA, planned for B slots, T tokens, contexts up to `max_length`.
test::Components engine_components(const clsa::IndexerConfig& ic, int slots, int tokens, std::int64_t max_length) {
  return test::Components(Backend::cuda, ic, kShape.attention_config(), slots, tokens, max_length);
}

/// One step as an engine enqueues it: select, a sparse layer, a dense layer.
void enqueue_step(test::Components& engine, const clsa::CacheBatch& batch, const StepInputs& in, const StepOutputs& out,
                  clsa::Stream stream) {
  engine.indexer.select(batch, in.q_idx_t, in.weights_t, out.routing(), stream);
  engine.sparse.forward(batch, out.routing(), in.q_t[0], out.sparse_out, stream, out.sparse_lse);
  engine.dense.forward(batch, in.q_t[0], out.dense_out, stream, out.dense_lse);
}

void run_replay_past_plan() {
  test::Rng rng(test::base_seed() + 910);
  constexpr int kSlots = 3, kTokens = 2, kTopK = 32;
  constexpr std::int64_t kPlanned = 256;  // the components' max context
  constexpr std::int64_t kGrowth = 40;    // sequence 1: 240 -> 280 tokens
  const std::vector<std::int64_t> lengths = {200, 240, 120};
  const clsa::CacheConfig config =
      kShape.cache_config(test::pages_for({200 + kTokens, 240 + kGrowth, 120 + kTokens}, kPageSize, 8));
  test::CacheFixture fixture(config, Backend::cuda, lengths, rng, test::Values::small_integers);
  const clsa::Device device = fixture.cache.device();
  const std::vector<SequenceId> ids = fixture.ids;
  const clsa::IndexerConfig ic = bounds_indexer_config(kTopK);

  test::Components engine = engine_components(ic, kSlots, kTokens, kPlanned);
  const cuda_support::OwnedStream owned_stream(device);
  const cudaStream_t stream = owned_stream.stream().cuda();
  // The batch has room for twice the planned context: only the components' plan is exceeded.
  clsa::CacheBatch batch = fixture.cache.reserve_batch(kSlots, 2 * kPlanned);
  const std::int32_t* const tables = batch.device_page_indptr();
  fixture.cache.batch(ids, batch, stream);
  const StepInputs in = make_inputs(kSlots, kTokens, rng, device);
  const StepOutputs out(kSlots, kTokens, kTopK, device);
  poison_async(out, stream, device.index);
  synchronize_devices();

  const cuda_support::CapturedGraph graph =
      cuda_support::CapturedGraph::capture(stream, [&] { enqueue_step(engine, batch, in, out, stream); });
  const auto replay = [&] {
    poison_async(out, stream, device.index);
    graph.replay(stream);
    owned_stream.wait();
    return read_step(out);
  };
  // Fresh components planned alike, run eagerly on the same inputs over `slot_ids`.
  const auto fresh_eager = [&](const std::vector<SequenceId>& slot_ids) {
    test::Components fresh = engine_components(ic, kSlots, kTokens, kPlanned);
    const clsa::CacheBatch eager_batch = fixture.cache.batch(slot_ids, stream);
    const StepOutputs eager_out(kSlots, kTokens, kTopK, device);
    poison_async(eager_out, stream, device.index);
    enqueue_step(fresh, eager_batch, in, eager_out, stream);
    check_cuda(cudaStreamSynchronize(stream), "eager step");
    fresh.indexer.check_status();
    fresh.dense.check_status();
    return read_step(eager_out);
  };

  // 1. Every sequence within the plan: nothing reported, the eager results, the oracle's.
  {
    const StepValues first = replay();
    engine.indexer.check_status();
    engine.dense.check_status();
    require_same(first, fresh_eager(ids), "first replay vs fresh components, eagerly");
    const Slots slots = {&fixture.data[0], &fixture.data[1], &fixture.data[2]};
    require_routing(first.positions, first.counts, slots, in, ic);
    require_attention(first.sparse, first.sparse_lse, slots, in, &ic);
    require_attention(first.dense, first.dense_lse, slots, in, nullptr);
  }

  // 2. Sequence 1 grows past the plan (the cache and the batch have room); the others take T
  //    tokens as in a decoding step. The batch is refilled in place on the stream; replay.
  fixture.append_random(1, kGrowth, rng, test::Values::small_integers);
  fixture.append_random(0, kTokens, rng, test::Values::small_integers);
  fixture.append_random(2, kTokens, rng, test::Values::small_integers);
  synchronize_devices();  // the fixture appends on the legacy default stream
  fixture.cache.batch(ids, batch, stream);
  REQUIRE(batch.device_page_indptr() == tables);
  REQUIRE(batch.length(1) == 240 + kGrowth);
  const StepValues second = replay();
  CLSA_REQUIRE_ERROR(engine.indexer.check_status(), ErrorCode::capacity_exceeded,
                     "batch sequence 1 holding 280 tokens, beyond the planned max_length 256");
  CLSA_REQUIRE_ERROR(engine.dense.check_status(), ErrorCode::capacity_exceeded,
                     "batch sequence 1 holding 280 tokens, beyond the planned max_length 256");
  engine.indexer.check_status();  // the reports were cleared
  engine.dense.check_status();
  // Slot 1: nothing routed, zeros (lse -inf). Slots 0 and 2: bitwise what fresh components compute
  // eagerly with slot 1 left empty, and the oracle's.
  const StepValues expected = fresh_eager({ids[0], clsa::empty_slot, ids[2]});
  require_same(second, expected, "replay past the plan vs fresh components (slot 1 empty), eagerly");
  const Slots slots = {&fixture.data[0], nullptr, &fixture.data[2]};
  require_routing(second.positions, second.counts, slots, in, ic);
  require_attention(second.sparse, second.sparse_lse, slots, in, &ic);
  require_attention(second.dense, second.dense_lse, slots, in, nullptr);

  // 3. Eagerly, the same batch is refused before anything is enqueued.
  CLSA_REQUIRE_ERROR(engine.indexer.select(batch, in.q_idx_t, in.weights_t, out.routing(), stream),
                     ErrorCode::capacity_exceeded, "max_length 280");
  CLSA_REQUIRE_ERROR(engine.dense.forward(batch, in.q_t[0], out.dense_out, stream, out.dense_lse),
                     ErrorCode::capacity_exceeded, "max_length 280");
  check_cuda(cudaStreamSynchronize(stream), "after the refused calls");
  require_same(read_step(out), second, "outputs after the refused eager calls");

  // 4. Back within the plan (slot 1 emptied): the same graph replays cleanly.
  fixture.cache.batch({ids[0], clsa::empty_slot, ids[2]}, batch, stream);
  REQUIRE(batch.device_page_indptr() == tables);
  const StepValues third = replay();
  engine.indexer.check_status();
  engine.dense.check_status();
  require_same(third, expected, "replay with slot 1 emptied vs fresh components, eagerly");
}

// ---------------------------------------------------------------- CUDA: two devices

/// Components created on `home` (current at construction), then used with `caller` current for
/// everything else; results bitwise equal to those with `home` current, the caller's device kept.
void run_on_another_device(int home, int caller) {
  INFO("components created on cuda:" << home << ", called with cuda:" << caller << " current");
  test::Rng rng(test::base_seed() + 920 + static_cast<std::uint64_t>(home));
  const clsa::Device device = clsa::Device::cuda(home);
  const auto require_current = [](int expected, const char* after) {
    INFO("the current device after " << after);
    REQUIRE(current_device() == expected);
  };
  const clsa::IndexerConfig ic = bounds_indexer_config(32);
  constexpr int kSlots = 2, kTokens = 2;
  constexpr std::int64_t kMaxLength = 512;

  check_cuda(cudaSetDevice(home), "cudaSetDevice");
  auto owned_stream = std::make_unique<cuda_support::OwnedStream>(device);  // a stream of the components' device
  const cudaStream_t stream = owned_stream->stream().cuda();
  auto cache = std::make_unique<clsa::SharedKVCache>(kShape.cache_config(96), Backend::cuda);
  auto indexer = std::make_unique<clsa::CrossLayerIndexer>(ic, Backend::cuda);
  auto sparse = std::make_unique<clsa::SparseCrossAttention>(kShape.attention_config(), Backend::cuda);
  auto dense = std::make_unique<clsa::DenseCrossAttention>(kShape.attention_config(), Backend::cuda);
  REQUIRE(cache->device() == device);
  REQUIRE(indexer->device() == device);
  REQUIRE(sparse->device() == device);
  REQUIRE(dense->device() == device);

  // From here on the caller's device is current: sequences, appends, plans, batch.
  check_cuda(cudaSetDevice(caller), "cudaSetDevice");
  std::vector<SequenceId> ids;
  std::vector<test::SequenceData> data(kSlots);
  const auto append = [&](std::size_t i, std::int64_t tokens) {
    const std::int64_t row = std::int64_t{kKvHeads} * kHeadDim;
    const auto draw = [&](std::int64_t count) {
      std::vector<double> values(index(count));
      for (double& x : values) x = rng.uniform(-3, 3);
      return values;
    };
    const std::vector<double> k = draw(tokens * row), v = draw(tokens * row), keys = draw(tokens * kIndexDim);
    const clsa::Tensor k_t = test::make_host(k, DType::bf16, {tokens, kKvHeads, kHeadDim}).to(device);
    const clsa::Tensor v_t = test::make_host(v, DType::bf16, {tokens, kKvHeads, kHeadDim}).to(device);
    const clsa::Tensor keys_t = test::make_host(keys, DType::bf16, {tokens, kIndexDim}).to(device);
    synchronize_devices();
    cache->append(ids[i], k_t, v_t, keys_t, stream);
    require_current(caller, "SharedKVCache::append");
    check_cuda(cudaStreamSynchronize(stream), "append");  // k_t, v_t, keys_t are freed next
    test::SequenceData& d = data[i];
    d.k.insert(d.k.end(), k.begin(), k.end());
    d.v.insert(d.v.end(), v.begin(), v.end());
    d.index_keys.insert(d.index_keys.end(), keys.begin(), keys.end());
    d.length += tokens;
  };
  for (int s = 0; s < kSlots; ++s) ids.push_back(cache->add_sequence());
  append(0, 170);
  append(1, 90);
  append(0, 130);  // sequence 0: 300 tokens in two chunks
  append(1, 60);
  CHECK(indexer->workspace_bytes(kSlots, kTokens, kMaxLength) > 0);
  require_current(caller, "CrossLayerIndexer::workspace_bytes");
  indexer->reserve(kSlots, kTokens, kMaxLength);
  require_current(caller, "CrossLayerIndexer::reserve");
  sparse->reserve(kSlots, kTokens, ic.top_k);
  require_current(caller, "SparseCrossAttention::reserve");
  dense->reserve(kSlots, kTokens, kMaxLength);
  require_current(caller, "DenseCrossAttention::reserve");
  clsa::CacheBatch batch = cache->reserve_batch(kSlots, kMaxLength);
  require_current(caller, "SharedKVCache::reserve_batch");
  cache->batch(ids, batch, stream);
  require_current(caller, "SharedKVCache::batch");
  const StepInputs in = make_inputs(kSlots, kTokens, rng, device);
  const StepOutputs out(kSlots, kTokens, ic.top_k, device);
  synchronize_devices();
  require_current(caller, "the uploads");

  // Tensors on another device than the components' are refused.
  const clsa::Tensor q_elsewhere = in.q_t[0].to(clsa::Device::cuda(caller));
  CLSA_REQUIRE_ERROR(dense->forward(batch, q_elsewhere, out.dense_out, stream, out.dense_lse),
                     ErrorCode::device_mismatch, "but this call computes on cuda:" + std::to_string(home));
  require_current(caller, "a refused DenseCrossAttention::forward");

  const auto step = [&](int current) {
    check_cuda(cudaSetDevice(current), "cudaSetDevice");
    poison_async(out, stream, home);
    indexer->select(batch, in.q_idx_t, in.weights_t, out.routing(), stream);
    require_current(current, "CrossLayerIndexer::select");
    sparse->forward(batch, out.routing(), in.q_t[0], out.sparse_out, stream, out.sparse_lse);
    require_current(current, "SparseCrossAttention::forward");
    dense->forward(batch, in.q_t[0], out.dense_out, stream, out.dense_lse);
    require_current(current, "DenseCrossAttention::forward");
    check_cuda(cudaStreamSynchronize(stream), "step");
    indexer->check_status();
    dense->check_status();
    require_current(current, "check_status");
    return read_step(out);
  };
  const auto require_oracle = [&](const StepValues& values) {
    const Slots slots = {&data[0], &data[1]};
    require_routing(values.positions, values.counts, slots, in, ic);
    require_attention(values.sparse, values.sparse_lse, slots, in, &ic);
    require_attention(values.dense, values.dense_lse, slots, in, nullptr);
  };

  const StepValues at_home = step(home);
  require_oracle(at_home);
  require_same(step(caller), at_home, "called with another device current vs with the own device current");

  // The contexts grow (appended with the caller's device current), the batch is refilled in place.
  check_cuda(cudaSetDevice(caller), "cudaSetDevice");
  append(0, kTokens);
  append(1, kTokens + 5);
  cache->batch(ids, batch, stream);
  require_current(caller, "SharedKVCache::batch (refill)");
  const StepValues away = step(caller);
  require_oracle(away);
  require_same(step(home), away, "with the own device current vs called with another device current");

  // Destroyed with the caller's device current: still the caller's after.
  check_cuda(cudaSetDevice(caller), "cudaSetDevice");
  batch = clsa::CacheBatch();
  dense.reset();
  sparse.reset();
  indexer.reset();
  cache.reset();
  require_current(caller, "the components' destruction");
  owned_stream.reset();
}

}  // namespace
#endif

TEST_CASE("bounds: a replay past the planned max context is reported, not corrupting", "[bounds][cuda]") {
  CLSA_SKIP_WITHOUT_GPU();
#if CLSA_TEST_WITH_CUDA
  run_replay_past_plan();
#endif
}

TEST_CASE("multi-GPU: components run on their own device whatever device is current", "[multi_gpu][cuda]") {
  CLSA_SKIP_WITHOUT_GPU();
  if (clsa::cuda_device_count() < 2) CLSA_SKIP("needs 2 CUDA devices");
#if CLSA_TEST_WITH_CUDA
  int original = 0;
  REQUIRE(cudaGetDevice(&original) == cudaSuccess);
  run_on_another_device(1, 0);
  run_on_another_device(0, 1);
  REQUIRE(cudaSetDevice(original) == cudaSuccess);
#endif
}
