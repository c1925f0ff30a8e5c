// libFuzzer target over libclsa's public API on the CPU backend. From the input bytes it builds a
// cache (any config, valid or not), appends random tensors (wrong shapes, dtypes, strides, over
// capacity), makes a batch (unknown ids included), selects with any indexer config and runs sparse
// and dense attention. Every call must either raise clsa::Error (leaving the cache as it was) or
// produce a result that the double-precision oracle of the tests accepts; anything else aborts.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
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

  // A batch of some of the sequences (maybe an unknown one).
  std::vector<clsa::SequenceId> chosen;
  std::vector<std::size_t> chosen_index;
  for (int s = 0; s < sequence_count; ++s) {
    if (in.ConsumeBool()) {
      chosen.push_back(ids[static_cast<std::size_t>(s)]);
      chosen_index.push_back(static_cast<std::size_t>(s));
    }
  }
  if (in.ConsumeIntegralInRange<int>(0, 20) == 0) chosen.push_back(static_cast<clsa::SequenceId>(12345));
  clsa::CacheBatch batch;
  try {
    batch = cache->batch(chosen);
  } catch (const clsa::Error&) {
    return 0;
  }
  const std::int64_t B = batch.num_sequences();

  // The indexer, any configuration.
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
  const std::int64_t requested_tokens = in.ConsumeIntegralInRange<int>(1, 4);
  FuzzTensor q_idx = make_tensor(in, config.dtype, maybe_wrong(in, {B, requested_tokens, ic.num_heads, ic.index_dim}));
  FuzzTensor w = make_tensor(in, in.ConsumeBool() ? DType::f32 : DType::bf16,
                             maybe_wrong(in, {B, requested_tokens, ic.num_heads}));
  special_inputs = special_inputs || q_idx.special || w.special;
  clsa::RoutingIndex routing;
  try {
    routing = indexer->select(batch, q_idx.view, w.view);
  } catch (const clsa::Error&) {
    return 0;
  }
  const std::int64_t T = routing.positions.size(1);  // as accepted (a perturbed T may be consistent)
  // The routing: counts, order, range, forced positions, and (without NaN/inf inputs) a best
  // top-k of the oracle's scores up to rounding.
  const std::int32_t* positions = routing.positions.data_as<const std::int32_t>();
  const std::int32_t* counts = routing.counts.data_as<const std::int32_t>();
  for (std::int64_t b = 0; b < B; ++b) {
    const test::SequenceData& seq = stored[chosen_index[static_cast<std::size_t>(b)]];
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t row = b * T + t;
      const std::int64_t visible = seq.length - T + t + 1;
      const std::int64_t count = counts[row];
      FUZZ_REQUIRE(count == std::min<std::int64_t>(ic.top_k, visible));
      const std::int32_t* routed = positions + row * ic.top_k;
      for (std::int64_t i = count; i < ic.top_k; ++i) FUZZ_REQUIRE(routed[i] == -1);
      std::vector<double> scores(static_cast<std::size_t>(visible), 0.0);
      if (!special_inputs) {
        scores = test::oracle_scores(seq, I, q_idx.values.data() + row * ic.num_heads * I,
                                     w.values.data() + row * ic.num_heads, ic.num_heads, visible, ic.scale);
      }
      const std::string problem =
          test::routing_row_problem(std::vector<std::int32_t>(routed, routed + count), scores, ic.top_k, ic.sink_tokens,
                                    ic.local_window, special_inputs ? -1.0 : 1e-3);
      if (!problem.empty()) fail(problem.c_str());
    }
  }

  // Sparse and dense attention over the same batch.
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
  const int Hq = ac.num_q_heads;
  FuzzTensor q = make_tensor(in, config.dtype, maybe_wrong(in, {B, T, Hq, D}));
  special_inputs = special_inputs || q.special;
  std::vector<unsigned char> out_storage(static_cast<std::size_t>(std::max<std::int64_t>(B * T * Hq * D, 1)) * 4 + 64);
  const clsa::TensorView out(out_storage.data(), config.dtype, {B, T, Hq, D});
  for (bool use_sparse : {true, false}) {
    try {
      if (use_sparse) {
        sparse->forward(batch, routing, q.view, out);
      } else {
        dense->forward(batch, q.view, out);
      }
    } catch (const clsa::Error&) {
      continue;
    }
    if (special_inputs) continue;
    const double scale = 1.0 / std::sqrt(static_cast<double>(D));
    const double tolerance = config.dtype == DType::f32 ? 1e-4 : (config.dtype == DType::f16 ? 4e-3 : 3e-2);
    for (std::int64_t b = 0; b < B; ++b) {
      const test::SequenceData& seq = stored[chosen_index[static_cast<std::size_t>(b)]];
      for (std::int64_t t = 0; t < T; ++t) {
        const std::int64_t row = b * T + t;
        std::vector<std::int32_t> attended;
        if (use_sparse) {
          attended.assign(positions + row * ic.top_k, positions + row * ic.top_k + counts[row]);
        } else {
          for (std::int64_t p = 0; p < seq.length - T + t + 1; ++p) attended.push_back(static_cast<std::int32_t>(p));
        }
        std::vector<double> expected(static_cast<std::size_t>(Hq * D)), lse(static_cast<std::size_t>(Hq));
        test::oracle_attention(seq, attended, q.values.data() + row * Hq * D, Hq, H, D, scale, expected.data(),
                               lse.data());
        const std::vector<double> got = test::read_values(
            clsa::TensorView(static_cast<unsigned char*>(out.data()) +
                                 row * Hq * D * static_cast<std::int64_t>(clsa::dtype_size(config.dtype)),
                             config.dtype, {Hq * D}));
        for (std::size_t i = 0; i < expected.size(); ++i) {
          FUZZ_REQUIRE(std::abs(got[i] - expected[i]) <= tolerance * (1.0 + std::abs(expected[i])));
        }
      }
    }
  }
  return 0;
}
