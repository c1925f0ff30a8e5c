// libFuzzer target over libclsa's public API on the CPU backend. From the input bytes it builds a
// cache (any config, valid or not), appends random tensors (wrong shapes, dtypes, strides, over
// capacity), makes a batch (unknown ids and empty slots included; growable, or reserved with any
// bounds and refilled), plans the components (none, reserve() or set_workspace() with any bounds,
// workspaces of any size and alignment), selects with any indexer config and runs sparse and dense
// attention. Every call must either raise clsa::Error (leaving the cache, the batch and every
// output as they were; capacity_exceeded exactly when a planned bound is exceeded) or produce a
// result that the double-precision oracle of the tests accepts; anything else aborts.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "../support.hpp"
#include "clsa/clsa.hpp"

namespace {

using clsa::DType;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz_api: %s\n", what);
  std::abort();
}

#define FUZZ_REQUIRE(condition)         \
  do {                                  \
    if (!(condition)) fail(#condition); \
  } while (false)

std::size_t index(std::int64_t i) {
  return static_cast<std::size_t>(i);
}

/// A value from the input: mostly small floats, sometimes NaN or +-inf.
double next_value(FuzzedDataProvider& in, bool* special) {
  const int kind = in.ConsumeIntegralInRange<int>(0, 31);
  if (kind == 0) {
    *special = true;
    return std::numeric_limits<double>::quiet_NaN();
  }
  if (kind == 1) {
    *special = true;
    return in.ConsumeBool() ? std::numeric_limits<double>::infinity() : -std::numeric_limits<double>::infinity();
  }
  return in.ConsumeIntegralInRange<int>(-64, 64) / 16.0;
}

DType pick_dtype(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 12)) {
    case 0:
      return DType::i32;  // invalid
    case 1:
    case 2:
    case 3:
    case 4:
      return DType::f32;
    case 5:
    case 6:
    case 7:
    case 8:
      return DType::f16;
    default:
      return DType::bf16;
  }
}

/// A host tensor of `dtype` with the given extents, outer dimensions padded (strided) at random,
/// values from the input (rounded to dtype and kept in `values`, row-major, unpadded).
struct FuzzTensor {
  std::vector<unsigned char> storage;
  clsa::TensorView view;
  std::vector<double> values;
  bool special = false;
};

FuzzTensor make_tensor(FuzzedDataProvider& in, DType dtype, std::vector<std::int64_t> shape) {
  FuzzTensor t;
  const int rank = static_cast<int>(shape.size());
  std::vector<std::int64_t> strides(shape.size());
  std::int64_t span = 1;  // innermost stride 1; outer dimensions sometimes padded (strided views)
  for (int d = rank - 1; d >= 0; --d) {
    strides[static_cast<std::size_t>(d)] = span;
    const std::int64_t padding =
        d > 0 && in.ConsumeIntegralInRange<int>(0, 3) == 0 ? in.ConsumeIntegralInRange<int>(1, 3) : 0;
    span = span * shape[static_cast<std::size_t>(d)] + padding;
  }
  std::int64_t count = 1;
  for (std::int64_t e : shape) count *= e;
  const std::size_t element = clsa::dtype_size(dtype == DType::i32 ? DType::f32 : dtype);
  t.storage.assign(static_cast<std::size_t>(std::max<std::int64_t>(span, 1)) * element + 64, 0);
  for (std::int64_t i = 0; i < count; ++i) {
    double x = next_value(in, &t.special);
    if (dtype != DType::i32) x = test::round_to(dtype, x);
    t.values.push_back(x);
    std::int64_t offset = 0, remainder = i;
    for (int d = rank - 1; d >= 0; --d) {
      offset += (remainder % shape[static_cast<std::size_t>(d)]) * strides[static_cast<std::size_t>(d)];
      remainder /= shape[static_cast<std::size_t>(d)];
    }
    unsigned char* at = t.storage.data() + offset * static_cast<std::int64_t>(element);
    const float f = static_cast<float>(x);
    switch (dtype) {
      case DType::f16: {
        const clsa::float16 h = clsa::to_float16(f);
        std::memcpy(at, &h, 2);
        break;
      }
      case DType::bf16: {
        const clsa::bfloat16 b = clsa::to_bfloat16(f);
        std::memcpy(at, &b, 2);
        break;
      }
      default:
        std::memcpy(at, &f, 4);
        break;
    }
  }
  t.view = clsa::TensorView(t.storage.data(), dtype, rank, shape.data(), strides.data(), clsa::Device::cpu());
  return t;
}

/// Host memory of `bytes` (plus slack) whose data() is 256-byte aligned, or deliberately misaligned.
struct Workspace {
  std::vector<unsigned char> storage;
  unsigned char* aligned = nullptr;
  void* data = nullptr;
  Workspace(std::size_t bytes, bool misaligned) : storage(bytes + 512, 0) {
    const std::uintptr_t address = reinterpret_cast<std::uintptr_t>(storage.data());
    aligned = storage.data() + (256 - address % 256) % 256;
    data = aligned + (misaligned ? 16 : 0);
  }
};

/// Bounds a component is planned for: sequences, query tokens and its span (max_length or top_k).
struct Plan {
  bool fixed = false;  // reserve() or set_workspace() succeeded
  std::int64_t sequences = 0, tokens = 0, span = 0;
  bool covers(std::int64_t b, std::int64_t t, std::int64_t s) const {
    return b <= sequences && t <= tokens && std::max<std::int64_t>(s, 1) <= span;
  }
};

/// Plans `component` from the input: not at all (it plans itself), reserve(), or set_workspace()
/// on host memory sized by workspace_bytes() (sometimes one byte short or misaligned: refused).
/// Bounds may be invalid (<= 0: refused with invalid_argument). Owns the workspace it provides.
template <class Component>
Plan plan_component(FuzzedDataProvider& in, Component& component, std::unique_ptr<Workspace>& workspace) {
  Plan plan;
  const int how = in.ConsumeIntegralInRange<int>(0, 2);
  if (how == 0) return plan;
  const int sequences = in.ConsumeIntegralInRange<int>(0, 5);
  const int tokens = in.ConsumeIntegralInRange<int>(0, 4);
  const int span = in.ConsumeIntegralInRange<int>(-1, 160);
  const bool valid = sequences > 0 && tokens > 0 && span > 0;
  try {
    if (how == 1) {
      component.reserve(sequences, tokens, span);
    } else {
      const std::size_t bytes = component.workspace_bytes(sequences, tokens, span);
      FUZZ_REQUIRE(valid && bytes > 0);
      const int flaw = in.ConsumeIntegralInRange<int>(0, 7);  // 1: one byte short, 2: misaligned
      workspace = std::make_unique<Workspace>(bytes, flaw == 2);
      try {
        component.set_workspace(workspace->data, flaw == 1 ? bytes - 1 : bytes, sequences, tokens, span);
        FUZZ_REQUIRE(flaw != 1 && flaw != 2);
      } catch (const clsa::Error& error) {
        FUZZ_REQUIRE(flaw == 1 || flaw == 2);
        FUZZ_REQUIRE(error.code() ==
                     (flaw == 1 ? clsa::ErrorCode::capacity_exceeded : clsa::ErrorCode::invalid_argument));
        // Refused; planned again, correctly.
        component.set_workspace(workspace->aligned, bytes, sequences, tokens, span);
      }
    }
    FUZZ_REQUIRE(valid);
    plan = Plan{true, sequences, tokens, span};
  } catch (const clsa::Error& error) {
    FUZZ_REQUIRE(!valid);
    FUZZ_REQUIRE(error.code() == clsa::ErrorCode::invalid_argument);
  }
  return plan;
}

/// Perturbs a shape now and then (wrong rank or extent): the call must then raise clsa::Error.
std::vector<std::int64_t> maybe_wrong(FuzzedDataProvider& in, std::vector<std::int64_t> shape) {
  switch (in.ConsumeIntegralInRange<int>(0, 15)) {
    case 0:
      shape[in.ConsumeIntegralInRange<std::size_t>(0, shape.size() - 1)] += 1;
      break;
    case 1:
      shape.push_back(1);
      break;
    default:
      break;
  }
  return shape;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  clsa::CacheConfig config;
  config.num_kv_heads = in.ConsumeIntegralInRange<int>(0, 3);
  config.head_dim = 8 * in.ConsumeIntegralInRange<int>(0, 4);
  config.index_dim = 8 * in.ConsumeIntegralInRange<int>(0, 3);
  config.page_size = in.ConsumeIntegralInRange<int>(0, 17);
  config.max_pages = in.ConsumeIntegralInRange<int>(-1, 48);
  config.dtype = pick_dtype(in);
  std::unique_ptr<clsa::SharedKVCache> cache;
  try {
    cache = std::make_unique<clsa::SharedKVCache>(config, clsa::Backend::cpu);
  } catch (const clsa::Error&) {
    return 0;
  }
  const int H = config.num_kv_heads, D = config.head_dim, I = config.index_dim;

  // Sequences and appends (some invalid); the oracle keeps what was stored.
  const int sequence_count = in.ConsumeIntegralInRange<int>(1, 4);
  std::vector<clsa::SequenceId> ids;
  std::vector<test::SequenceData> stored(static_cast<std::size_t>(sequence_count));
  bool special_inputs = false;
  for (int s = 0; s < sequence_count; ++s) ids.push_back(cache->add_sequence());
  for (int round = in.ConsumeIntegralInRange<int>(0, 6); round > 0 && in.remaining_bytes() > 0; --round) {
    const int s = in.ConsumeIntegralInRange<int>(0, sequence_count - 1);
    const std::int64_t tokens = in.ConsumeIntegralInRange<int>(0, 48);
    const DType dtype = in.ConsumeIntegralInRange<int>(0, 7) == 0 ? pick_dtype(in) : config.dtype;
    FuzzTensor k = make_tensor(in, dtype, maybe_wrong(in, {tokens, H, D}));
    FuzzTensor v = make_tensor(in, dtype, maybe_wrong(in, {tokens, H, D}));
    FuzzTensor keys = make_tensor(in, dtype, maybe_wrong(in, {tokens, I}));
    const clsa::SequenceId target = in.ConsumeIntegralInRange<int>(0, 20) == 0 ? static_cast<clsa::SequenceId>(999)
                                                                               : ids[static_cast<std::size_t>(s)];
    const clsa::MemoryStats before = cache->memory();
    try {
      cache->append(target, k.view, v.view, keys.view);
      test::SequenceData& seq = stored[static_cast<std::size_t>(s)];
      seq.k.insert(seq.k.end(), k.values.begin(), k.values.end());
      seq.v.insert(seq.v.end(), v.values.begin(), v.values.end());
      seq.index_keys.insert(seq.index_keys.end(), keys.values.begin(), keys.values.end());
      seq.length += k.view.size(0);  // the tokens it took (the extent may have been perturbed alike)
      special_inputs = special_inputs || k.special || v.special || keys.special;
    } catch (const clsa::Error&) {
      const clsa::MemoryStats after = cache->memory();
      FUZZ_REQUIRE(after.tokens == before.tokens && after.pages_used == before.pages_used);
    }
  }
  for (int s = 0; s < sequence_count; ++s) {
    FUZZ_REQUIRE(cache->length(ids[static_cast<std::size_t>(s)]) == stored[static_cast<std::size_t>(s)].length);
  }

  // A batch of some of the sequences, empty slots among them (maybe an unknown id): growable, or
  // reserved with any bounds and then refilled.
  const test::SequenceData empty_sequence;
  std::vector<clsa::SequenceId> chosen;
  std::vector<const test::SequenceData*> slots;  // what each slot holds, as stored
  std::int64_t chosen_pages = 0;
  for (int s = 0; s < sequence_count; ++s) {
    if (in.ConsumeIntegralInRange<int>(0, 5) == 0) {
      chosen.push_back(clsa::empty_slot);
      slots.push_back(&empty_sequence);
    }
    if (in.ConsumeBool()) {
      chosen.push_back(ids[static_cast<std::size_t>(s)]);
      slots.push_back(&stored[static_cast<std::size_t>(s)]);
      chosen_pages += static_cast<std::int64_t>(cache->pages(ids[static_cast<std::size_t>(s)]).size());
    }
  }
  const bool unknown = in.ConsumeIntegralInRange<int>(0, 20) == 0;
  if (unknown) chosen.push_back(static_cast<clsa::SequenceId>(12345));
  // What SharedKVCache::batch must refuse, in the order it checks.
  const clsa::ErrorCode refusal = chosen.empty() ? clsa::ErrorCode::invalid_argument
                                  : unknown      ? clsa::ErrorCode::unknown_sequence
                                                 : clsa::ErrorCode::capacity_exceeded;
  clsa::CacheBatch batch;
  if (in.ConsumeBool()) {
    const int max_sequences = in.ConsumeIntegralInRange<int>(0, 5);
    const int max_length = in.ConsumeIntegralInRange<int>(0, 160);
    try {
      batch = cache->reserve_batch(max_sequences, max_length);
      FUZZ_REQUIRE(max_sequences > 0 && max_length > 0);
    } catch (const clsa::Error& error) {
      FUZZ_REQUIRE(max_sequences <= 0 || max_length <= 0);
      FUZZ_REQUIRE(error.code() == clsa::ErrorCode::invalid_argument);
      return 0;
    }
    const std::int64_t page_capacity =
        std::int64_t{max_sequences} * ((max_length + config.page_size - 1) / config.page_size);
    FUZZ_REQUIRE(batch.fixed_capacity() && batch.capacity() == max_sequences && batch.num_sequences() == 0);
    FUZZ_REQUIRE(batch.page_capacity() == page_capacity);
    const std::int32_t* tables = batch.device_page_indptr();
    const bool fits = static_cast<std::int64_t>(chosen.size()) <= max_sequences && chosen_pages <= page_capacity;
    try {
      cache->batch(chosen, batch);
      FUZZ_REQUIRE(!chosen.empty() && !unknown && fits);
    } catch (const clsa::Error& error) {
      FUZZ_REQUIRE(chosen.empty() || unknown || !fits);
      FUZZ_REQUIRE(error.code() == refusal);
      // Left as it was.
      FUZZ_REQUIRE(batch.num_sequences() == 0 && batch.max_length() == 0 && batch.device_page_indptr() == tables);
      return 0;
    }
    FUZZ_REQUIRE(batch.device_page_indptr() == tables);  // refilled in place
  } else {
    try {
      batch = cache->batch(chosen);
      FUZZ_REQUIRE(!chosen.empty() && !unknown);
    } catch (const clsa::Error& error) {
      FUZZ_REQUIRE(chosen.empty() || unknown);
      FUZZ_REQUIRE(error.code() == refusal);
      return 0;
    }
  }
  const std::int64_t B = batch.num_sequences();
  FUZZ_REQUIRE(B == static_cast<std::int64_t>(slots.size()));
  for (std::int64_t b = 0; b < B; ++b) FUZZ_REQUIRE(batch.length(static_cast<int>(b)) == slots[index(b)]->length);

  // The indexer, any configuration, planned any way.
  clsa::IndexerConfig ic;
  ic.num_heads = in.ConsumeIntegralInRange<int>(0, 3);
  ic.index_dim = in.ConsumeIntegralInRange<int>(0, 9) == 0 ? I + 8 : I;
  ic.top_k = in.ConsumeIntegralInRange<int>(-2, 64);
  ic.sink_tokens = in.ConsumeIntegralInRange<int>(-1, 8);
  ic.local_window = in.ConsumeIntegralInRange<int>(0, 8);
  ic.scale = in.ConsumeIntegralInRange<int>(0, 9) == 0 ? -1.0f : 0.5f;
  std::unique_ptr<clsa::CrossLayerIndexer> indexer;
  try {
    indexer = std::make_unique<clsa::CrossLayerIndexer>(ic, clsa::Backend::cpu);
  } catch (const clsa::Error&) {
    return 0;
  }
  std::unique_ptr<Workspace> indexer_workspace;
  const Plan indexer_plan = plan_component(in, *indexer, indexer_workspace);
  const std::int64_t requested_tokens = in.ConsumeIntegralInRange<int>(1, 4);
  FuzzTensor q_idx = make_tensor(in, config.dtype, maybe_wrong(in, {B, requested_tokens, ic.num_heads, ic.index_dim}));
  FuzzTensor w = make_tensor(in, in.ConsumeBool() ? DType::f32 : DType::bf16,
                             maybe_wrong(in, {B, requested_tokens, ic.num_heads}));
  special_inputs = special_inputs || q_idx.special || w.special;
  // T as a call would accept it (a perturbed T may be consistent).
  const std::int64_t T = q_idx.view.rank() > 1 ? q_idx.view.size(1) : requested_tokens;
  // Into the indexer's own index, or into caller-owned tensors, poisoned: a refused call writes
  // nothing there.
  constexpr std::int32_t kPoison = 0x5a5a5a5a;
  const bool caller_owned = in.ConsumeBool();
  std::vector<std::int32_t> owned_positions(index(B * T * ic.top_k), kPoison), owned_counts(index(B * T), kPoison);
  clsa::RoutingIndex routing;
  try {
    if (caller_owned) {
      routing.positions = clsa::TensorView(owned_positions.data(), DType::i32, {B, T, ic.top_k});
      routing.counts = clsa::TensorView(owned_counts.data(), DType::i32, {B, T});
      routing.top_k = ic.top_k;
      indexer->select(batch, q_idx.view, w.view, routing);
    } else {
      routing = indexer->select(batch, q_idx.view, w.view);
    }
  } catch (const clsa::Error& error) {
    for (std::int32_t x : owned_positions) FUZZ_REQUIRE(x == kPoison);
    for (std::int32_t x : owned_counts) FUZZ_REQUIRE(x == kPoison);
    if (error.code() == clsa::ErrorCode::capacity_exceeded) {
      FUZZ_REQUIRE(indexer_plan.fixed && !indexer_plan.covers(B, T, batch.max_length()));
    }
    return 0;
  }
  FUZZ_REQUIRE(routing.positions.size(1) == T);
  FUZZ_REQUIRE(!indexer_plan.fixed || indexer_plan.covers(B, T, batch.max_length()));
  // The routing: counts (0 for empty slots), order, range, forced positions, and (without NaN/inf
  // inputs) a best top-k of the oracle's scores up to rounding.
  const std::int32_t* positions = routing.positions.data_as<const std::int32_t>();
  const std::int32_t* counts = routing.counts.data_as<const std::int32_t>();
  for (std::int64_t b = 0; b < B; ++b) {
    const test::SequenceData& seq = *slots[index(b)];
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t row = b * T + t;
      const std::int64_t visible = std::max<std::int64_t>(0, seq.length - T + t + 1);
      const std::int64_t count = counts[row];
      FUZZ_REQUIRE(count == std::min<std::int64_t>(ic.top_k, visible));
      const std::int32_t* routed = positions + row * ic.top_k;
      for (std::int64_t i = count; i < ic.top_k; ++i) FUZZ_REQUIRE(routed[i] == -1);
      std::vector<double> scores(index(visible), 0.0);
      if (!special_inputs && visible > 0) {
        scores = test::oracle_scores(seq, I, q_idx.values.data() + row * ic.num_heads * I,
                                     w.values.data() + row * ic.num_heads, ic.num_heads, visible, ic.scale);
      }
      const std::string problem =
          test::routing_row_problem(std::vector<std::int32_t>(routed, routed + count), scores, ic.top_k, ic.sink_tokens,
                                    ic.local_window, special_inputs ? -1.0 : 1e-3);
      if (!problem.empty()) fail(problem.c_str());
    }
  }

  // Sparse and dense attention over the same batch, each planned any way.
  clsa::AttentionConfig ac;
  ac.num_kv_heads = in.ConsumeIntegralInRange<int>(0, 9) == 0 ? H + 1 : H;
  ac.num_q_heads =
      ac.num_kv_heads * in.ConsumeIntegralInRange<int>(1, 3) + (in.ConsumeIntegralInRange<int>(0, 15) == 0 ? 1 : 0);
  ac.head_dim = D;
  std::unique_ptr<clsa::SparseCrossAttention> sparse;
  std::unique_ptr<clsa::DenseCrossAttention> dense;
  try {
    sparse = std::make_unique<clsa::SparseCrossAttention>(ac, clsa::Backend::cpu);
    dense = std::make_unique<clsa::DenseCrossAttention>(ac, clsa::Backend::cpu);
  } catch (const clsa::Error&) {
    return 0;
  }
  std::unique_ptr<Workspace> sparse_workspace, dense_workspace;
  const Plan sparse_plan = plan_component(in, *sparse, sparse_workspace);
  const Plan dense_plan = plan_component(in, *dense, dense_workspace);
  const int Hq = ac.num_q_heads;
  FuzzTensor q = make_tensor(in, config.dtype, maybe_wrong(in, {B, T, Hq, D}));
  special_inputs = special_inputs || q.special;
  constexpr unsigned char kPoisonByte = 0xa5;
  const std::size_t out_bytes = index(std::max<std::int64_t>(B * T * Hq * D, 1)) * 4 + 64;
  std::vector<unsigned char> out_storage(out_bytes), lse_storage(index(std::max<std::int64_t>(B * T * Hq, 1)) * 4);
  const clsa::TensorView out(out_storage.data(), config.dtype, {B, T, Hq, D});
  const clsa::TensorView lse_view(lse_storage.data(), DType::f32, {B, T, Hq});
  for (bool use_sparse : {true, false}) {
    const Plan& plan = use_sparse ? sparse_plan : dense_plan;
    const std::int64_t span = use_sparse ? ic.top_k : batch.max_length();
    const bool with_lse = in.ConsumeBool();
    const clsa::TensorView lse = with_lse ? lse_view : clsa::TensorView();
    std::fill(out_storage.begin(), out_storage.end(), kPoisonByte);
    std::fill(lse_storage.begin(), lse_storage.end(), kPoisonByte);
    try {
      if (use_sparse) {
        sparse->forward(batch, routing, q.view, out, {}, lse);
      } else {
        dense->forward(batch, q.view, out, {}, lse);
      }
    } catch (const clsa::Error& error) {
      for (unsigned char byte : out_storage) FUZZ_REQUIRE(byte == kPoisonByte);
      for (unsigned char byte : lse_storage) FUZZ_REQUIRE(byte == kPoisonByte);
      if (error.code() == clsa::ErrorCode::capacity_exceeded) FUZZ_REQUIRE(plan.fixed && !plan.covers(B, T, span));
      continue;
    }
    FUZZ_REQUIRE(!plan.fixed || plan.covers(B, T, span));
    if (special_inputs) continue;
    const double scale = 1.0 / std::sqrt(static_cast<double>(D));
    const double tolerance = config.dtype == DType::f32 ? 1e-4 : (config.dtype == DType::f16 ? 4e-3 : 3e-2);
    const std::vector<double> got = test::read_values(out);
    const std::vector<double> got_lse = with_lse ? test::read_values(lse) : std::vector<double>();
    for (std::int64_t b = 0; b < B; ++b) {
      const test::SequenceData& seq = *slots[index(b)];
      for (std::int64_t t = 0; t < T; ++t) {
        const std::int64_t row = b * T + t;
        std::vector<std::int32_t> attended;
        if (use_sparse) {
          attended.assign(positions + row * ic.top_k, positions + row * ic.top_k + counts[row]);
        } else {
          for (std::int64_t p = 0; p < seq.length - T + t + 1; ++p) attended.push_back(static_cast<std::int32_t>(p));
        }
        std::vector<double> expected(index(Hq * D), 0.0);
        std::vector<double> expected_lse(index(Hq), -std::numeric_limits<double>::infinity());
        if (!attended.empty()) {  // else nothing to attend to (an empty slot): zeros, lse -inf
          test::oracle_attention(seq, attended, q.values.data() + row * Hq * D, Hq, H, D, scale, expected.data(),
                                 expected_lse.data());
        }
        for (std::size_t i = 0; i < expected.size(); ++i) {
          const double x = got[index(row * Hq * D) + i];
          FUZZ_REQUIRE(std::abs(x - expected[i]) <= tolerance * (1.0 + std::abs(expected[i])));
        }
        for (std::size_t h = 0; h < expected_lse.size() && with_lse; ++h) {
          const double x = got_lse[index(row * Hq) + h];
          if (std::isinf(expected_lse[h])) {
            FUZZ_REQUIRE(x == expected_lse[h]);
          } else {
            FUZZ_REQUIRE(std::abs(x - expected_lse[h]) <= 1e-3 * (1.0 + std::abs(expected_lse[h])));
          }
        }
      }
    }
  }
  return 0;
}
