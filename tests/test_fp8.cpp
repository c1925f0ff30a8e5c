// fp8 caches (issue 18, CPU backend): e4m3 indexer keys with per-token scales in DeepGEMM's / vLLM's
// page layout, e4m3 K/V with per-head or per-tensor scales; quantizing and pre-quantized appends,
// all or nothing; routed sets and attention against the float64 oracle on the dequantized values;
// a wrapped engine-owned vLLM-layout indexer cache; the errors; the engine's decode loop in fp8
// mode; and the CUDA backend's refusal while it has no fp8 kernels.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "fixtures.hpp"
#include "support.hpp"

namespace {

using clsa::Backend;
using clsa::DType;
using clsa::ErrorCode;
using clsa::ScaleFormat;
using clsa::SequenceId;

const DType kActivations[] = {DType::bf16, DType::f16, DType::f32};

/// A CPU cache config of e4m3 indexer keys and K/V of `kv_dtype` (e4m3: per-head scales when
/// per_head, else one; drawn from `rng`).
clsa::CacheConfig fp8_config(int kv_heads, int head_dim, int index_dim, int page_size, std::int64_t max_pages,
                             DType kv_dtype, DType index_dtype, ScaleFormat format, test::Rng& rng,
                             bool per_head = true) {
  clsa::CacheConfig config;
  config.num_kv_heads = kv_heads;
  config.head_dim = head_dim;
  config.index_dim = index_dim;
  config.page_size = page_size;
  config.max_pages = max_pages;
  config.dtype = kv_dtype;
  config.index_dtype = index_dtype;
  config.index_scale_format = format;
  if (kv_dtype == DType::e4m3) {
    // Scales that put N(0, 1) values at up to ~100..400 of the e4m3 range: some of the largest saturate.
    for (int h = 0; h < (per_head ? kv_heads : 1); ++h) {
      config.k_scales.push_back(static_cast<float>(rng.uniform_real(0.01, 0.04)));
      config.v_scales.push_back(static_cast<float>(rng.uniform_real(0.01, 0.04)));
    }
  }
  return config;
}

/// Host values of one dtype drawn from N(0, sigma), rounded to it.
std::vector<double> gaussian(test::Rng& rng, std::size_t count, DType dtype, double sigma = 1.0) {
  std::vector<double> values(count);
  for (double& x : values) x = test::round_to(dtype, sigma * rng.normal());
  return values;
}

/// Indexer keys that e4m3 holds exactly, whichever the scale format: each row is integers n in
/// [-14, 14] times 2^(e + 5) with one |n| = 14 (its absmax 448 * 2^e, so its scale is exactly 2^e in
/// both formats and the quantized values are the multiples 32 n of the e4m3 grid), e in [-9, -3] per
/// row. With small-integer queries and head weights every score is then exact in f32.
std::vector<double> exact_fp8_keys(test::Rng& rng, std::int64_t tokens, int dim) {
  std::vector<double> keys(static_cast<std::size_t>(tokens * dim));
  for (std::int64_t t = 0; t < tokens; ++t) {
    const double unit = std::ldexp(1.0, rng.uniform(-9, -3) + 5);
    double* row = keys.data() + t * dim;
    for (int d = 0; d < dim; ++d) row[d] = rng.uniform(-14, 14) * unit;
    row[rng.uniform(0, dim - 1)] = (rng.uniform(0, 1) ? 14 : -14) * unit;
  }
  return keys;
}

/// The routed rows of an index, each the ascending positions of its count.
std::vector<std::vector<std::int32_t>> routed_rows(const clsa::RoutingIndex& routing) {
  const std::vector<std::int32_t> positions = test::read_ints(routing.positions);
  const std::vector<std::int32_t> counts = test::read_ints(routing.counts);
  std::vector<std::vector<std::int32_t>> rows;
  for (std::size_t row = 0; row < counts.size(); ++row) {
    const auto first = positions.begin() + static_cast<std::ptrdiff_t>(row * static_cast<std::size_t>(routing.top_k));
    rows.emplace_back(first, first + counts[row]);
  }
  return rows;
}

/// Query-side inputs of one select(): q_idx of `dtype` and head weights, as stored and as tensors.
struct IndexerInputs {
  std::vector<double> q, w;
  clsa::Tensor q_t, w_t;
};

/// Small-integer queries (in [-3, 3]) and head weights (in [-2, 3]): exact scores over exact keys.
IndexerInputs exact_indexer_inputs(test::Rng& rng, int sequences, int tokens, const clsa::IndexerConfig& config,
                                   DType dtype) {
  IndexerInputs in;
  in.q.resize(static_cast<std::size_t>(sequences * tokens * config.num_heads * config.index_dim));
  in.w.resize(static_cast<std::size_t>(sequences * tokens * config.num_heads));
  for (double& x : in.q) x = rng.uniform(-3, 3);
  for (double& x : in.w) x = rng.uniform(-2, 3);
  in.q_t = test::make_host(in.q, dtype, {sequences, tokens, config.num_heads, config.index_dim});
  in.w_t = test::make_host(in.w, DType::f32, {sequences, tokens, config.num_heads});
  return in;
}

/// The oracle's routing of row (b, t) of a select() whose batch slot b holds `sequence`.
std::vector<std::int32_t> oracle_row(const test::SequenceData& sequence, const IndexerInputs& in,
                                     const clsa::IndexerConfig& config, int tokens, std::size_t b, int t) {
  const std::size_t row = b * static_cast<std::size_t>(tokens) + static_cast<std::size_t>(t);
  const std::size_t heads = static_cast<std::size_t>(config.num_heads);
  const std::int64_t visible = sequence.length - tokens + t + 1;
  const std::vector<double> scores = test::oracle_scores(
      sequence, config.index_dim, in.q.data() + row * heads * static_cast<std::size_t>(config.index_dim),
      in.w.data() + row * heads, config.num_heads, visible, config.scale);
  return test::oracle_routing(scores, config.top_k, config.sink_tokens, config.local_window);
}

/// Raw bytes of a host pool region.
std::vector<unsigned char> bytes_at(const void* base, std::int64_t offset, std::size_t count) {
  const auto* first = static_cast<const unsigned char*>(base) + offset;
  return std::vector<unsigned char>(first, first + count);
}

/// Everything a sequence holds in a host fp8 pool, as raw bytes: its K and V rows, and (addressed
/// by the vLLM / DeepGEMM page formula, not through the layout's fields) its index key bytes and
/// scales.
struct StoredBytes {
  std::vector<unsigned char> k, v, keys;
  std::vector<float> scales;
  friend bool operator==(const StoredBytes& a, const StoredBytes& b) {
    return a.k == b.k && a.v == b.v && a.keys == b.keys && a.scales == b.scales;
  }
};

StoredBytes stored_bytes(const clsa::SharedKVCache& cache, SequenceId id) {
  const clsa::CacheConfig& c = cache.config();
  const clsa::PagedCacheLayout l = cache.layout();
  const std::int64_t kv_element = static_cast<std::int64_t>(clsa::dtype_size(c.dtype));
  const std::vector<std::int32_t> pages = cache.pages(id);
  const std::int64_t P = c.page_size, D = c.index_dim;
  StoredBytes out;
  for (std::int64_t p = 0; p < cache.length(id); ++p) {
    const std::int64_t page = pages[static_cast<std::size_t>(p / P)], slot = p % P;
    for (int h = 0; h < c.num_kv_heads; ++h) {
      const std::size_t row = static_cast<std::size_t>(c.head_dim * kv_element);
      const auto k =
          bytes_at(l.k, (page * l.k_page_stride + slot * l.k_token_stride + h * l.k_head_stride) * kv_element, row);
      const auto v =
          bytes_at(l.v, (page * l.v_page_stride + slot * l.v_token_stride + h * l.v_head_stride) * kv_element, row);
      out.k.insert(out.k.end(), k.begin(), k.end());
      out.v.insert(out.v.end(), v.begin(), v.end());
    }
    // vLLM's indexer_k_quant_and_cache page: P x D e4m3 bytes, then P f32 scales.
    const std::int64_t page_base = page * P * (D + 4);
    const auto key = bytes_at(l.index_keys, page_base + slot * D, static_cast<std::size_t>(D));
    out.keys.insert(out.keys.end(), key.begin(), key.end());
    float scale = 0.0f;
    std::memcpy(&scale, static_cast<const unsigned char*>(l.index_keys) + page_base + P * D + slot * 4, sizeof scale);
    out.scales.push_back(scale);
  }
  return out;
}

/// Bytes of a host cache's K pool (V's is the same) and of its index-key pool (scales included).
std::pair<std::size_t, std::size_t> pool_sizes(const clsa::SharedKVCache& cache) {
  const clsa::CacheConfig& c = cache.config();
  const std::size_t tokens = static_cast<std::size_t>(c.max_pages * c.page_size);
  const std::size_t kv = tokens * static_cast<std::size_t>(c.num_kv_heads * c.head_dim) * clsa::dtype_size(c.dtype);
  const std::size_t index = tokens * (static_cast<std::size_t>(c.index_dim) * clsa::dtype_size(c.index_key_dtype()) +
                                      (c.index_key_dtype() == DType::e4m3 ? 4 : 0));
  return {kv, index};
}

/// A whole host pool (K, V, index keys with scales) as bytes, to tell that nothing was written.
std::vector<unsigned char> pool_bytes(const clsa::SharedKVCache& cache) {
  const clsa::PagedCacheLayout l = cache.layout();
  const auto [kv, index] = pool_sizes(cache);
  std::vector<unsigned char> all = bytes_at(l.k, 0, kv);
  const std::vector<unsigned char> v = bytes_at(l.v, 0, kv);
  const std::vector<unsigned char> keys = bytes_at(l.index_keys, 0, index);
  all.insert(all.end(), v.begin(), v.end());
  all.insert(all.end(), keys.begin(), keys.end());
  return all;
}

/// Zeroes a host cache's pools (a pool is not initialised; byte comparisons need a known start).
void zero_pools(const clsa::SharedKVCache& cache) {
  const clsa::PagedCacheLayout l = cache.layout();
  const auto [kv, index] = pool_sizes(cache);
  std::memset(const_cast<void*>(l.k), 0, kv);
  std::memset(const_cast<void*>(l.v), 0, kv);
  std::memset(const_cast<void*>(l.index_keys), 0, index);
}

}  // namespace

TEST_CASE("e4m3 is a one-byte dtype that host tensors hold", "[fp8]") {
  CHECK(clsa::dtype_size(DType::e4m3) == 1);
  CHECK(std::string(clsa::dtype_name(DType::e4m3)) == "e4m3");
  // Every finite code survives a tensor round trip through the test helpers (which the oracle uses).
  std::vector<double> values;
  for (const auto& [value, code] : test::e4m3_values()) {
    values.push_back(value);
    values.push_back(-value);
    (void)code;
  }
  const clsa::Tensor t = test::make_host(values, DType::e4m3, {static_cast<std::int64_t>(values.size())});
  CHECK(test::read_values(t) == values);
  CHECK(t.view().describe().find("e4m3") != std::string::npos);
}

TEST_CASE("fp8 append stores quantize_row_e4m3's keys and scales in the vLLM page layout, K/V with the config scales",
          "[fp8]") {
  test::Rng rng(test::base_seed() + 80);
  for (const ScaleFormat format : {ScaleFormat::f32, ScaleFormat::ue8m0}) {
    for (const DType source : kActivations) {
      const bool per_head = source != DType::f16;
      const int index_dim = source == DType::f32 ? 64 : 128;
      const int page_size = 1 << rng.uniform(2, 5);
      clsa::CacheConfig config =
          fp8_config(3, 64, index_dim, page_size, 40, DType::e4m3, DType::e4m3, format, rng, per_head);
      INFO("format " << (format == ScaleFormat::f32 ? "f32" : "ue8m0") << " source " << clsa::dtype_name(source)
                     << " page_size " << page_size << (per_head ? " per-head" : " per-tensor") << " scales");
      clsa::SharedKVCache cache(config, Backend::cpu);
      // The layout is the vLLM / DeepGEMM page: P x D values, then P f32 scales.
      const clsa::PagedCacheLayout l = cache.layout();
      REQUIRE(l.index_key_dtype() == DType::e4m3);
      CHECK(l.index_page_stride == std::int64_t{page_size} * (index_dim + 4));
      CHECK(l.index_token_stride == index_dim);
      CHECK(static_cast<const void*>(l.index_scales) ==
            static_cast<const unsigned char*>(l.index_keys) + std::int64_t{page_size} * index_dim);
      CHECK(l.index_scale_page_stride * 4 == l.index_page_stride);
      CHECK(l.index_scale_token_stride == 1);
      const SequenceId id = cache.add_sequence();
      std::vector<double> all_k, all_v, all_keys;
      for (int chunk = 0; chunk < 3; ++chunk) {
        const std::int64_t tokens = rng.uniform(1, 2 * page_size + 3);
        // Magnitudes spanning 1e-3..1e2: tiny rows (absmax below the 1e-4 floor too), saturating K/V.
        const double sigma = chunk == 0 ? 1e-3 : (chunk == 2 ? 1e2 : std::pow(10.0, rng.uniform(-3, 2)));
        std::vector<double> k = gaussian(rng, static_cast<std::size_t>(tokens * 3 * 64), source, sigma);
        std::vector<double> v = gaussian(rng, k.size(), source, sigma);
        std::vector<double> keys = gaussian(rng, static_cast<std::size_t>(tokens * index_dim), source, sigma);
        if (chunk == 1) std::fill(keys.begin(), keys.begin() + index_dim, 0.0);  // a row of zeros
        cache.append(id, test::make_host(k, source, {tokens, 3, 64}), test::make_host(v, source, {tokens, 3, 64}),
                     test::make_host(keys, source, {tokens, index_dim}));
        all_k.insert(all_k.end(), k.begin(), k.end());
        all_v.insert(all_v.end(), v.begin(), v.end());
        all_keys.insert(all_keys.end(), keys.begin(), keys.end());
      }
      const StoredBytes stored = stored_bytes(cache, id);
      const std::int64_t length = cache.length(id);
      REQUIRE(stored.scales.size() == static_cast<std::size_t>(length));
      // Keys: exactly quantize_row_e4m3 of the row (in its source dtype), scale and bytes.
      std::vector<clsa::float8_e4m3> codes(static_cast<std::size_t>(index_dim));
      for (std::int64_t t = 0; t < length; ++t) {
        float scale = 0.0f;
        const double* row = all_keys.data() + t * index_dim;
        if (source == DType::bf16) {
          std::vector<clsa::bfloat16> r(static_cast<std::size_t>(index_dim));
          for (int d = 0; d < index_dim; ++d)
            r[static_cast<std::size_t>(d)] = clsa::to_bfloat16(static_cast<float>(row[d]));
          scale = clsa::quantize_row_e4m3(r.data(), index_dim, codes.data(), format);
        } else if (source == DType::f16) {
          std::vector<clsa::float16> r(static_cast<std::size_t>(index_dim));
          for (int d = 0; d < index_dim; ++d)
            r[static_cast<std::size_t>(d)] = clsa::to_float16(static_cast<float>(row[d]));
          scale = clsa::quantize_row_e4m3(r.data(), index_dim, codes.data(), format);
        } else {
          std::vector<float> r(row, row + index_dim);
          scale = clsa::quantize_row_e4m3(r.data(), index_dim, codes.data(), format);
        }
        INFO("token " << t);
        REQUIRE(stored.scales[static_cast<std::size_t>(t)] == scale);
        for (int d = 0; d < index_dim; ++d)
          REQUIRE(stored.keys[static_cast<std::size_t>(t * index_dim + d)] == codes[static_cast<std::size_t>(d)].bits);
      }
      // K/V: the f32 quotient by the kv head's scale, rounded to the nearest e4m3 (the float64
      // oracle), saturating.
      std::size_t saturated = 0;
      for (std::size_t j = 0; j < all_k.size(); ++j) {
        const std::size_t head = j / 64 % 3;
        const float k_scale = config.k_scales[per_head ? head : 0];
        const float v_scale = config.v_scales[per_head ? head : 0];
        const double k_quotient = static_cast<float>(all_k[j]) / k_scale;
        const double v_quotient = static_cast<float>(all_v[j]) / v_scale;
        INFO("K/V element " << j);
        REQUIRE(stored.k[j] == test::nearest_e4m3(k_quotient));
        REQUIRE(stored.v[j] == test::nearest_e4m3(v_quotient));
        saturated += std::abs(k_quotient) > 464.0 ? 1 : 0;
      }
      CHECK(saturated > 0);  // the case was exercised
      // Bytes per token: e4m3 K/V and keys with their 4-byte scale.
      const clsa::MemoryStats stats = cache.memory();
      CHECK(stats.kv_bytes_per_token == 2u * 3 * 64);
      CHECK(stats.index_bytes_per_token == static_cast<std::size_t>(index_dim) + 4);
      CHECK(stats.pool_bytes == 40u * static_cast<std::size_t>(page_size) * (2 * 3 * 64 + index_dim + 4));
    }
  }
}

TEST_CASE("pre-quantized e4m3 appends store what quantizing appends store", "[fp8]") {
  test::Rng rng(test::base_seed() + 81);
  for (const ScaleFormat format : {ScaleFormat::f32, ScaleFormat::ue8m0}) {
    const clsa::CacheConfig config = fp8_config(2, 64, 128, 16, 30, DType::e4m3, DType::e4m3, format, rng);
    clsa::SharedKVCache quantizing(config, Backend::cpu), given(config, Backend::cpu);
    zero_pools(quantizing);
    zero_pools(given);
    const SequenceId a = quantizing.add_sequence(), b = given.add_sequence();
    for (int chunk = 0; chunk < 4; ++chunk) {
      const std::int64_t tokens = rng.uniform(1, 40);
      const std::vector<double> k = gaussian(rng, static_cast<std::size_t>(tokens * 2 * 64), DType::bf16, 3.0);
      const std::vector<double> v = gaussian(rng, k.size(), DType::bf16, 3.0);
      const std::vector<double> keys = gaussian(rng, static_cast<std::size_t>(tokens * 128), DType::bf16);
      quantizing.append(a, test::make_host(k, DType::bf16, {tokens, 2, 64}),
                        test::make_host(v, DType::bf16, {tokens, 2, 64}),
                        test::make_host(keys, DType::bf16, {tokens, 128}));
      // The engine quantized them itself: codes and per-token scales (keys in a wider strided row).
      clsa::Tensor k8 = clsa::Tensor::empty({tokens, 2, 64}, DType::e4m3);
      clsa::Tensor v8 = clsa::Tensor::empty({tokens, 2, 64}, DType::e4m3);
      clsa::Tensor wide = clsa::Tensor::empty({tokens, 160}, DType::e4m3);
      clsa::Tensor scales = clsa::Tensor::empty({tokens}, DType::f32);
      for (std::size_t j = 0; j < k.size(); ++j) {
        const std::size_t head = j / 64 % 2;
        k8.data_as<clsa::float8_e4m3>()[j] = clsa::to_float8_e4m3(static_cast<float>(k[j]) / config.k_scales[head]);
        v8.data_as<clsa::float8_e4m3>()[j] = clsa::to_float8_e4m3(static_cast<float>(v[j]) / config.v_scales[head]);
      }
      std::vector<clsa::bfloat16> row(128);
      for (std::int64_t t = 0; t < tokens; ++t) {
        for (int d = 0; d < 128; ++d)
          row[static_cast<std::size_t>(d)] =
              clsa::to_bfloat16(static_cast<float>(keys[static_cast<std::size_t>(t * 128 + d)]));
        scales.data_as<float>()[t] =
            clsa::quantize_row_e4m3(row.data(), 128, wide.data_as<clsa::float8_e4m3>() + t * 160 + 16, format);
      }
      const clsa::TensorView keys8(wide.data_as<clsa::float8_e4m3>() + 16, DType::e4m3, {tokens, 128}, {160, 1});
      given.append(b, k8, v8, keys8, {}, scales);
    }
    REQUIRE(given.length(b) == quantizing.length(a));
    CHECK(stored_bytes(given, b) == stored_bytes(quantizing, a));
    CHECK(pool_bytes(given) == pool_bytes(quantizing));  // nothing else written either
  }
}

TEST_CASE("fp8 appends refuse NaN and infinities, bad scales and mismatched scale tensors, writing nothing", "[fp8]") {
  test::Rng rng(test::base_seed() + 82);
  const clsa::CacheConfig config = fp8_config(2, 64, 64, 8, 12, DType::e4m3, DType::e4m3, ScaleFormat::f32, rng);
  clsa::SharedKVCache cache(config, Backend::cpu);
  zero_pools(cache);
  const SequenceId id = cache.add_sequence();
  // 5 tokens first: the open page must be left as it was too.
  const auto tensors = [&](std::int64_t tokens, DType dtype) {
    return std::make_tuple(
        test::make_host(gaussian(rng, static_cast<std::size_t>(tokens * 128), dtype), dtype, {tokens, 2, 64}),
        test::make_host(gaussian(rng, static_cast<std::size_t>(tokens * 128), dtype), dtype, {tokens, 2, 64}),
        test::make_host(gaussian(rng, static_cast<std::size_t>(tokens * 64), dtype), dtype, {tokens, 64}));
  };
  {
    auto [k, v, keys] = tensors(5, DType::bf16);
    cache.append(id, k, v, keys);
  }
  const std::vector<unsigned char> before = pool_bytes(cache);
  const clsa::MemoryStats stats_before = cache.memory();
  const std::vector<std::int32_t> pages_before = cache.pages(id);
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (const DType dtype : kActivations) {
    for (const double bad : {nan, inf, -inf}) {
      auto [k, v, keys] = tensors(9, dtype);  // 9 tokens: would take two new pages
      INFO(clsa::dtype_name(dtype) << " value " << bad);
      auto poison = [&](clsa::Tensor& t, std::int64_t at) {
        switch (dtype) {
          case DType::bf16:
            t.data_as<clsa::bfloat16>()[at] = clsa::to_bfloat16(static_cast<float>(bad));
            break;
          case DType::f16:
            t.data_as<clsa::float16>()[at] = clsa::to_float16(static_cast<float>(bad));
            break;
          default:
            t.data_as<float>()[at] = static_cast<float>(bad);
            break;
        }
      };
      clsa::Tensor bad_k = test::make_host(test::read_values(k), dtype, {9, 2, 64});
      poison(bad_k, (7 * 2 + 1) * 64 + 5);
      CLSA_REQUIRE_ERROR(cache.append(id, bad_k, v, keys), ErrorCode::invalid_argument, "k[7,1,5]");
      clsa::Tensor bad_v = test::make_host(test::read_values(v), dtype, {9, 2, 64});
      poison(bad_v, 3);
      CLSA_REQUIRE_ERROR(cache.append(id, k, bad_v, keys), ErrorCode::invalid_argument, "v[0,0,3]");
      clsa::Tensor bad_keys = test::make_host(test::read_values(keys), dtype, {9, 64});
      poison(bad_keys, 8 * 64 + 63);
      CLSA_REQUIRE_ERROR(cache.append(id, k, v, bad_keys), ErrorCode::invalid_argument, "index_keys[8,63]");
    }
  }
  // Pre-quantized keys: their scales must be given, [T] f32, finite and > 0.
  auto [k, v, keys] = tensors(9, DType::bf16);
  clsa::Tensor keys8 = clsa::Tensor::empty({9, 64}, DType::e4m3);
  std::memset(keys8.view().data(), 0x38, keys8.bytes());  // 1.0 everywhere
  for (const double bad : {0.0, -0.5, nan, inf}) {
    clsa::Tensor scales = test::make_host(std::vector<double>(9, 0.25), DType::f32, {9});
    scales.data_as<float>()[4] = static_cast<float>(bad);
    INFO("scale " << bad);
    CLSA_REQUIRE_ERROR(cache.append(id, k, v, keys8, {}, scales), ErrorCode::invalid_argument, "index_scales[4]");
  }
  CLSA_REQUIRE_ERROR(cache.append(id, k, v, keys8), ErrorCode::invalid_argument, "index_scales is empty");
  const clsa::Tensor short_scales = test::make_host(std::vector<double>(8, 0.25), DType::f32, {8});
  CLSA_REQUIRE_ERROR(cache.append(id, k, v, keys8, {}, short_scales), ErrorCode::shape_mismatch, "index_scales");
  const clsa::Tensor bf16_scales = test::make_host(std::vector<double>(9, 0.25), DType::bf16, {9});
  CLSA_REQUIRE_ERROR(cache.append(id, k, v, keys8, {}, bf16_scales), ErrorCode::dtype_mismatch, "index_scales");
  const clsa::Tensor scales = test::make_host(std::vector<double>(9, 0.25), DType::f32, {9});
  CLSA_REQUIRE_ERROR(cache.append(id, k, v, keys, {}, scales), ErrorCode::invalid_argument, "index_scales");
  const clsa::Tensor keys_i32 = clsa::Tensor::empty({9, 64}, DType::i32);
  CLSA_REQUIRE_ERROR(cache.append(id, k, v, keys_i32), ErrorCode::dtype_mismatch, "index_keys");
  // Nothing was written, nothing reserved.
  CHECK(pool_bytes(cache) == before);
  CHECK(cache.length(id) == 5);
  CHECK(cache.pages(id) == pages_before);
  CHECK(cache.memory().pages_used == stats_before.pages_used);
  CHECK(cache.memory().tokens == stats_before.tokens);
  // ...and a good pre-quantized append goes in, with its scales.
  cache.append(id, k, v, keys8, {}, scales);
  CHECK(cache.length(id) == 14);
  CHECK(stored_bytes(cache, id).scales.back() == 0.25f);
}

TEST_CASE("routed sets over e4m3 indexer keys equal the float64 oracle on the dequantized keys", "[fp8]") {
  // Keys that e4m3 holds exactly (exact_fp8_keys) and small-integer queries: every score is exact,
  // so the routed set is fully determined, ties to the lower position included, in both scale
  // formats and with either K/V dtype beside the keys.
  test::Rng rng(test::base_seed() + 83);
  for (int trial = 0; trial < 12; ++trial) {
    clsa::IndexerConfig ic;
    ic.num_heads = std::vector<int>{1, 4, 8, 16}[static_cast<std::size_t>(rng.uniform(0, 3))];
    ic.index_dim = trial % 2 ? 128 : 64;
    ic.top_k = rng.uniform(1, 200);
    ic.sink_tokens = rng.uniform(0, std::min(8, ic.top_k));
    ic.local_window = rng.uniform(0, std::min(16, ic.top_k - ic.sink_tokens));
    ic.scale = std::vector<float>{1.0f, 0.5f, 0.125f}[static_cast<std::size_t>(rng.uniform(0, 2))];
    const int tokens = rng.uniform(1, 4);
    std::vector<std::int64_t> lengths;
    for (int b = rng.uniform(1, 6); b > 0; --b) lengths.push_back(rng.uniform(tokens, 2500));
    const ScaleFormat format = trial % 3 == 0 ? ScaleFormat::ue8m0 : ScaleFormat::f32;
    const DType kv_dtype = trial % 4 < 2 ? DType::bf16 : DType::e4m3;
    const int page_size = 1 << rng.uniform(3, 6);
    clsa::CacheConfig config = fp8_config(1, 64, ic.index_dim, page_size, test::pages_for(lengths, page_size), kv_dtype,
                                          DType::e4m3, format, rng);
    INFO("trial " << trial << " H " << ic.num_heads << " D " << ic.index_dim << " top_k " << ic.top_k << " T " << tokens
                  << " K/V " << clsa::dtype_name(kv_dtype) << " lengths " << test::describe(lengths));
    test::CacheFixture fixture(config, Backend::cpu, {}, rng);
    for (std::size_t b = 0; b < lengths.size(); ++b) {
      fixture.ids.push_back(fixture.cache.add_sequence());
      fixture.data.emplace_back();
      for (std::int64_t done = 0; done < lengths[b];) {
        const std::int64_t chunk = std::min<std::int64_t>(lengths[b] - done, rng.uniform(1, 700));
        const std::vector<double> keys = exact_fp8_keys(rng, chunk, ic.index_dim);
        fixture.append_values(b, gaussian(rng, static_cast<std::size_t>(chunk * 64), DType::bf16),
                              gaussian(rng, static_cast<std::size_t>(chunk * 64), DType::bf16), keys);
        // The keys went through quantization unchanged (what makes the scores exact).
        REQUIRE(std::equal(keys.begin(), keys.end(),
                           fixture.data[b].index_keys.end() - static_cast<std::ptrdiff_t>(keys.size())));
        done += chunk;
      }
    }
    const int sequences = static_cast<int>(lengths.size());
    const IndexerInputs in = exact_indexer_inputs(rng, sequences, tokens, ic, kActivations[trial % 3]);
    clsa::CrossLayerIndexer indexer(ic, Backend::cpu);
    const std::vector<std::vector<std::int32_t>> routed = routed_rows(indexer.select(fixture.batch(), in.q_t, in.w_t));
    for (std::size_t b = 0; b < lengths.size(); ++b) {
      for (int t = 0; t < tokens; ++t) {
        INFO("sequence " << b << " token " << t);
        REQUIRE(routed[b * static_cast<std::size_t>(tokens) + static_cast<std::size_t>(t)] ==
                oracle_row(fixture.data[b], in, ic, tokens, b, t));
      }
    }
  }
}

TEST_CASE("routed sets over quantized gaussian e4m3 keys are a best top-k of the oracle on the dequantized keys",
          "[fp8]") {
  test::Rng rng(test::base_seed() + 84);
  for (int trial = 0; trial < 8; ++trial) {
    clsa::IndexerConfig ic;
    ic.num_heads = std::vector<int>{4, 8, 16}[static_cast<std::size_t>(rng.uniform(0, 2))];
    ic.index_dim = trial % 2 ? 128 : 64;
    ic.top_k = rng.uniform(16, 300);
    ic.sink_tokens = 2;
    ic.local_window = 8;
    const int tokens = rng.uniform(1, 3);
    std::vector<std::int64_t> lengths;
    for (int b = rng.uniform(1, 5); b > 0; --b) lengths.push_back(rng.uniform(tokens, 2000));
    const ScaleFormat format = trial % 2 ? ScaleFormat::ue8m0 : ScaleFormat::f32;
    clsa::CacheConfig config =
        fp8_config(1, 64, ic.index_dim, 64, test::pages_for(lengths, 64), DType::bf16, DType::e4m3, format, rng);
    INFO("trial " << trial << " lengths " << test::describe(lengths));
    test::CacheFixture fixture(config, Backend::cpu, lengths, rng);
    const int sequences = static_cast<int>(lengths.size());
    IndexerInputs in;
    in.q = gaussian(rng, static_cast<std::size_t>(sequences * tokens * ic.num_heads * ic.index_dim), DType::bf16);
    in.w = gaussian(rng, static_cast<std::size_t>(sequences * tokens * ic.num_heads), DType::f32);
    in.q_t = test::make_host(in.q, DType::bf16, {sequences, tokens, ic.num_heads, ic.index_dim});
    in.w_t = test::make_host(in.w, DType::f32, {sequences, tokens, ic.num_heads});
    clsa::CrossLayerIndexer indexer(ic, Backend::cpu);
    const std::vector<std::vector<std::int32_t>> routed = routed_rows(indexer.select(fixture.batch(), in.q_t, in.w_t));
    std::size_t equal_rows = 0;
    for (std::size_t b = 0; b < lengths.size(); ++b) {
      for (int t = 0; t < tokens; ++t) {
        const std::size_t row = b * static_cast<std::size_t>(tokens) + static_cast<std::size_t>(t);
        const std::int64_t visible = fixture.data[b].length - tokens + t + 1;
        const std::vector<double> scores = test::oracle_scores(
            fixture.data[b], ic.index_dim, in.q.data() + row * static_cast<std::size_t>(ic.num_heads * ic.index_dim),
            in.w.data() + row * static_cast<std::size_t>(ic.num_heads), ic.num_heads, visible, ic.scale);
        const std::string problem =
            test::routing_row_problem(routed[row], scores, ic.top_k, ic.sink_tokens, ic.local_window, 1e-4);
        INFO("sequence " << b << " token " << t << ": " << problem);
        REQUIRE(problem.empty());
        equal_rows += routed[row] == test::oracle_routing(scores, ic.top_k, ic.sink_tokens, ic.local_window) ? 1 : 0;
      }
    }
    // Differences are near-ties of the cut only: most rows are the oracle's set exactly.
    CHECK(2 * equal_rows >= routed.size());
  }
}

TEST_CASE("attention over e4m3 K/V matches the float64 oracle on the dequantized K/V", "[fp8]") {
  // The oracle sees exactly the stored values (test::stored_kv), so what remains is f32 arithmetic
  // and the rounding of `out` to q's dtype: the per-dtype output tolerance of the other caches'
  // attention tests (bf16 1.5e-2, f16 2e-3, f32 2e-5, relative, with atol scaled by the output's
  // rms), and lse within 1e-4.
  test::Rng rng(test::base_seed() + 85);
  for (int trial = 0; trial < 12; ++trial) {
    const DType q_dtype = kActivations[trial % 3];
    const int group = std::vector<int>{1, 3, 4, 8}[static_cast<std::size_t>(trial % 4)];
    const int kv_heads = rng.uniform(1, 3);
    const int q_heads = kv_heads * group;
    const int dim = std::vector<int>{64, 128, 256}[static_cast<std::size_t>(rng.uniform(0, 2))];
    const int tokens = rng.uniform(1, 3);
    const int top_k = rng.uniform(16, 300);
    std::vector<std::int64_t> lengths;
    for (int b = rng.uniform(1, 6); b > 0; --b) lengths.push_back(rng.uniform(tokens, 1000));
    const DType index_dtype = trial % 2 ? DType::e4m3 : DType::bf16;
    const int page_size = 1 << rng.uniform(3, 6);
    const clsa::CacheConfig config = fp8_config(kv_heads, dim, 64, page_size, test::pages_for(lengths, page_size),
                                                DType::e4m3, index_dtype, ScaleFormat::f32, rng, trial % 3 != 2);
    INFO("trial " << trial << " q " << clsa::dtype_name(q_dtype) << " Hq " << q_heads << " Hkv " << kv_heads << " D "
                  << dim << " T " << tokens << " top_k " << top_k << " lengths " << test::describe(lengths));
    test::CacheFixture fixture(config, Backend::cpu, lengths, rng);
    const int sequences = static_cast<int>(lengths.size());
    const std::int64_t rows = std::int64_t{sequences} * tokens;
    clsa::AttentionConfig ac;
    ac.num_q_heads = q_heads;
    ac.num_kv_heads = kv_heads;
    ac.head_dim = dim;
    std::string why;
    CHECK(clsa::SparseCrossAttention::supports(ac, DType::e4m3, Backend::cpu, &why));
    CHECK(why.empty());
    const std::vector<double> q = gaussian(rng, static_cast<std::size_t>(rows * q_heads * dim), q_dtype);
    const clsa::Tensor q_t = test::make_host(q, q_dtype, {sequences, tokens, q_heads, dim});
    const std::vector<double> poison(q.size(), std::numeric_limits<double>::quiet_NaN());
    // Routing from the indexer over the cache's keys (any routing would do: the oracle attends over
    // what was routed).
    clsa::IndexerConfig ic;
    ic.num_heads = 4;
    ic.index_dim = 64;
    ic.top_k = top_k;
    ic.sink_tokens = 2;
    ic.local_window = 4;
    const IndexerInputs in = exact_indexer_inputs(rng, sequences, tokens, ic, DType::bf16);
    clsa::CrossLayerIndexer indexer(ic, Backend::cpu);
    const clsa::CacheBatch batch = fixture.batch();
    const clsa::RoutingIndex routing = indexer.select(batch, in.q_t, in.w_t);
    const std::vector<std::vector<std::int32_t>> routed = routed_rows(routing);
    std::vector<double> sparse_out;  // for the gathered-block run below
    for (const bool sparse : {true, false}) {
      INFO((sparse ? "sparse" : "dense"));
      const clsa::Tensor out = test::make_host(poison, q_dtype, {sequences, tokens, q_heads, dim});
      const clsa::Tensor lse =
          test::make_host(std::vector<double>(static_cast<std::size_t>(rows * q_heads), std::nan("")), DType::f32,
                          {sequences, tokens, q_heads});
      if (sparse) {
        clsa::SparseCrossAttention attention(ac, Backend::cpu);
        attention.forward(batch, routing, q_t, out, {}, lse);
      } else {
        clsa::DenseCrossAttention attention(ac, Backend::cpu);
        attention.forward(batch, q_t, out, {}, lse);
      }
      const double softmax_scale = 1.0 / std::sqrt(static_cast<double>(dim));
      std::vector<double> expected(q.size()), expected_lse(static_cast<std::size_t>(rows * q_heads));
      const std::size_t row_size = static_cast<std::size_t>(q_heads * dim);
      for (std::size_t row = 0; row < static_cast<std::size_t>(rows); ++row) {
        const std::size_t b = row / static_cast<std::size_t>(tokens);
        std::vector<std::int32_t> positions = routed[row];
        if (!sparse) {
          positions.resize(static_cast<std::size_t>(
              lengths[b] - tokens + static_cast<std::int64_t>(row % static_cast<std::size_t>(tokens)) + 1));
          std::iota(positions.begin(), positions.end(), 0);
        }
        test::oracle_attention(fixture.data[b], positions, q.data() + row * row_size, q_heads, kv_heads, dim,
                               softmax_scale, expected.data() + row * row_size,
                               expected_lse.data() + row * static_cast<std::size_t>(q_heads));
      }
      double rms = 0.0;
      for (double x : expected) rms += x * x;
      rms = std::sqrt(rms / static_cast<double>(expected.size()));
      const std::vector<double> got = test::read_values(out);
      if (sparse) sparse_out = got;
      const test::Tolerance tolerance = test::output_tolerance(q_dtype);
      INFO("relative error " << test::relative_error(got, expected));
      CHECK(test::tolerance_ratio(got, expected, tolerance.atol * rms, tolerance.rtol) <= 1.0);
      CHECK(test::tolerance_ratio(test::read_values(lse), expected_lse, 1e-4, 1e-4) <= 1.0);
    }
    // The routed K/V block gathered once per step holds the e4m3 rows as stored; attention over the
    // index that carries it gives the same bits. (Re-planning the indexer for the block invalidates
    // the index it returned before.)
    indexer.gather_routed_kv(config);
    const clsa::RoutingIndex gathered = indexer.select(batch, in.q_t, in.w_t);
    REQUIRE(routed_rows(gathered) == routed);
    REQUIRE(gathered.kv.defined());
    REQUIRE(gathered.kv.dtype() == DType::e4m3);
    {
      // Row i of a query row's block: the K (V) of its i-th routed position, e4m3 as stored (its
      // value times the kv head's scale is what the cache holds).
      const std::vector<double> block = test::read_values(gathered.kv);
      const std::size_t head_rows = static_cast<std::size_t>(top_k * dim);
      for (std::size_t row = 0; row < routed.size(); ++row) {
        const test::SequenceData& data = fixture.data[row / static_cast<std::size_t>(tokens)];
        for (std::size_t i = 0; i < routed[row].size(); ++i) {
          for (int h = 0; h < kv_heads; ++h) {
            const float k_scale = config.k_scales[config.k_scales.size() == 1 ? 0 : static_cast<std::size_t>(h)];
            const float v_scale = config.v_scales[config.v_scales.size() == 1 ? 0 : static_cast<std::size_t>(h)];
            const std::size_t source = (static_cast<std::size_t>(routed[row][i]) * static_cast<std::size_t>(kv_heads) +
                                        static_cast<std::size_t>(h)) *
                                       static_cast<std::size_t>(dim);
            const std::size_t k_at =
                ((row * 2 + 0) * static_cast<std::size_t>(kv_heads) + static_cast<std::size_t>(h)) * head_rows +
                i * static_cast<std::size_t>(dim);
            const std::size_t v_at = k_at + static_cast<std::size_t>(kv_heads) * head_rows;
            for (int d = 0; d < dim; ++d) {
              INFO("row " << row << " routed " << i << " head " << h << " dim " << d);
              REQUIRE(block[k_at + static_cast<std::size_t>(d)] * k_scale ==
                      data.k[source + static_cast<std::size_t>(d)]);
              REQUIRE(block[v_at + static_cast<std::size_t>(d)] * v_scale ==
                      data.v[source + static_cast<std::size_t>(d)]);
            }
          }
        }
      }
    }
    clsa::SparseCrossAttention attention(ac, Backend::cpu);
    const clsa::Tensor out_gathered = test::make_host(poison, q_dtype, {sequences, tokens, q_heads, dim});
    attention.forward(batch, gathered, q_t, out_gathered);
    CHECK(test::read_values(out_gathered) == sparse_out);
  }
}

TEST_CASE("a wrapped engine-owned vLLM-layout e4m3 indexer cache routes as appending the same keys does", "[fp8]") {
  // The engine's DSA indexer cache: [pages, P * (D + 4)] bytes, a page's P x D e4m3 values, then
  // its P f32 scales (vLLM's indexer_k_quant_and_cache), pages handed out in a shuffled order; its
  // K/V in a bf16 pool of FlashInfer's NHD pages. The same keys appended to a libclsa cache must
  // route the same sets.
  test::Rng rng(test::base_seed() + 86);
  for (const ScaleFormat format : {ScaleFormat::f32, ScaleFormat::ue8m0}) {
    const std::vector<std::int64_t> lengths = {700, 64, 1500, 33};
    const std::int64_t P = 64, D = 128, H = 2, HD = 64;
    clsa::CacheConfig config =
        fp8_config(static_cast<int>(H), static_cast<int>(HD), static_cast<int>(D), static_cast<int>(P),
                   test::pages_for(lengths, 64), DType::bf16, DType::e4m3, format, rng);
    test::CacheFixture owned(config, Backend::cpu, {}, rng);
    // The engine's pool, written the engine's way (vLLM's indexer_k_quant_and_cache: each key
    // quantized with quantize_row_e4m3, values then scale at the page formula's places), and the
    // same keys appended to libclsa's own cache.
    std::int64_t pages = 3;
    for (std::int64_t length : lengths) pages += (length + P - 1) / P;
    std::vector<std::int32_t> order(static_cast<std::size_t>(pages));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng.engine);
    std::vector<unsigned char> index_pool(static_cast<std::size_t>(pages * P * (D + 4)), 0x7f);  // NaN codes: unused
    clsa::Tensor kv_pool = clsa::Tensor::empty({pages, 2, P, H, HD}, DType::bf16);
    std::vector<std::int32_t> indptr{0}, indices, last;
    std::vector<clsa::bfloat16> row(static_cast<std::size_t>(D));
    std::vector<clsa::float8_e4m3> codes(static_cast<std::size_t>(D));
    std::size_t next = 0;
    for (std::size_t b = 0; b < lengths.size(); ++b) {
      const std::int64_t length = lengths[b];
      const std::vector<double> keys = gaussian(rng, static_cast<std::size_t>(length * D), DType::bf16);
      const std::vector<double> k = gaussian(rng, static_cast<std::size_t>(length * H * HD), DType::bf16);
      const std::vector<double> v = gaussian(rng, k.size(), DType::bf16);
      owned.ids.push_back(owned.cache.add_sequence());
      owned.data.emplace_back();
      owned.append_values(b, k, v, keys);
      const std::int64_t count = (length + P - 1) / P;
      for (std::int64_t i = 0; i < count; ++i) indices.push_back(order[next + static_cast<std::size_t>(i)]);
      for (std::int64_t p = 0; p < length; ++p) {
        const std::int64_t page = order[next + static_cast<std::size_t>(p / P)], slot = p % P;
        for (std::int64_t d = 0; d < D; ++d)
          row[static_cast<std::size_t>(d)] =
              clsa::to_bfloat16(static_cast<float>(keys[static_cast<std::size_t>(p * D + d)]));
        const float scale = clsa::quantize_row_e4m3(row.data(), static_cast<int>(D), codes.data(), format);
        unsigned char* page_base = index_pool.data() + page * P * (D + 4);
        std::memcpy(page_base + slot * D, codes.data(), static_cast<std::size_t>(D));
        std::memcpy(page_base + P * D + slot * 4, &scale, sizeof scale);
        for (int part = 0; part < 2; ++part) {
          const std::vector<double>& values = part == 0 ? k : v;
          clsa::bfloat16* to = kv_pool.data_as<clsa::bfloat16>() + ((page * 2 + part) * P + slot) * H * HD;
          for (std::int64_t j = 0; j < H * HD; ++j)
            to[j] = clsa::to_bfloat16(static_cast<float>(values[static_cast<std::size_t>(p * H * HD + j)]));
        }
      }
      next += static_cast<std::size_t>(count);
      indptr.push_back(static_cast<std::int32_t>(indices.size()));
      last.push_back(static_cast<std::int32_t>(length - (count - 1) * P));
    }
    clsa::PagedCacheLayout engine{};
    engine.dtype = DType::bf16;
    engine.index_dtype = DType::e4m3;
    engine.device = clsa::Device::cpu();
    engine.num_kv_heads = static_cast<int>(H);
    engine.head_dim = static_cast<int>(HD);
    engine.index_dim = static_cast<int>(D);
    engine.page_size = static_cast<int>(P);
    engine.num_pages = pages;
    engine.k = kv_pool.data_as<clsa::bfloat16>();
    engine.v = kv_pool.data_as<clsa::bfloat16>() + P * H * HD;
    engine.k_page_stride = engine.v_page_stride = 2 * P * H * HD;
    engine.k_token_stride = engine.v_token_stride = H * HD;
    engine.k_head_stride = engine.v_head_stride = HD;
    engine.index_keys = index_pool.data();
    engine.index_page_stride = P * (D + 4);
    engine.index_token_stride = D;
    engine.index_scales = reinterpret_cast<const float*>(index_pool.data() + P * D);
    engine.index_scale_page_stride = P * (D + 4) / 4;
    engine.index_scale_token_stride = 1;
    clsa::PageTableView tables;
    tables.num_sequences = static_cast<int>(lengths.size());
    tables.page_indptr = tables.host_page_indptr = indptr.data();
    tables.page_indices = indices.data();
    tables.last_page_lengths = tables.host_last_page_lengths = last.data();
    const clsa::CacheBatch wrapped = clsa::CacheBatch::wrap(engine, tables);
    CHECK(wrapped.layout().index_key_dtype() == DType::e4m3);

    clsa::IndexerConfig ic;
    ic.num_heads = 8;
    ic.index_dim = static_cast<int>(D);
    ic.top_k = 96;
    ic.sink_tokens = 2;
    ic.local_window = 8;
    const int tokens = 2;
    IndexerInputs in;
    in.q = gaussian(rng, static_cast<std::size_t>(4 * tokens * 8 * D), DType::bf16);
    in.w = gaussian(rng, static_cast<std::size_t>(4 * tokens * 8), DType::f32);
    in.q_t = test::make_host(in.q, DType::bf16, {4, tokens, 8, D});
    in.w_t = test::make_host(in.w, DType::f32, {4, tokens, 8});
    clsa::CrossLayerIndexer indexer(ic, Backend::cpu);
    const auto from_owned = routed_rows(indexer.select(owned.batch(), in.q_t, in.w_t));
    const auto from_engine = routed_rows(indexer.select(wrapped, in.q_t, in.w_t));
    CHECK(from_engine == from_owned);
    // Sparse attention over both reads the same K/V rows: the same bits.
    clsa::AttentionConfig ac;
    ac.num_q_heads = 4;
    ac.num_kv_heads = static_cast<int>(H);
    ac.head_dim = static_cast<int>(HD);
    const clsa::Tensor q = test::make_host(gaussian(rng, static_cast<std::size_t>(4 * tokens * 4 * HD), DType::bf16),
                                           DType::bf16, {4, tokens, 4, HD});
    const clsa::Tensor out_owned = clsa::Tensor::empty({4, tokens, 4, HD}, DType::bf16);
    const clsa::Tensor out_engine = clsa::Tensor::empty({4, tokens, 4, HD}, DType::bf16);
    clsa::SparseCrossAttention attention(ac, Backend::cpu);
    attention.forward(owned.batch(), indexer.select(owned.batch(), in.q_t, in.w_t), q, out_owned);
    attention.forward(wrapped, indexer.select(wrapped, in.q_t, in.w_t), q, out_engine);
    CHECK(test::read_values(out_engine) == test::read_values(out_owned));

    // SharedKVCache::wrap over the same kind of pool: appends land in the vLLM page as the owned
    // cache's do.
    std::vector<unsigned char> fresh(static_cast<std::size_t>(pages * P * (D + 4)), 0);
    clsa::Tensor fresh_kv = clsa::Tensor::empty({pages, 2, P, H, HD}, DType::bf16);
    clsa::PagedCacheLayout pool = engine;
    pool.index_keys = fresh.data();
    pool.index_scales = reinterpret_cast<const float*>(fresh.data() + P * D);
    pool.k = fresh_kv.data_as<clsa::bfloat16>();
    pool.v = fresh_kv.data_as<clsa::bfloat16>() + P * H * HD;
    clsa::CacheConfig pool_config = config;
    clsa::SharedKVCache cache = clsa::SharedKVCache::wrap(pool_config, pool);
    const SequenceId id = cache.add_sequence();
    const std::int64_t count = 100;
    const std::vector<double> keys = gaussian(rng, static_cast<std::size_t>(count * D), DType::bf16);
    const std::vector<double> kv = gaussian(rng, static_cast<std::size_t>(count * H * HD), DType::bf16);
    const clsa::Tensor keys_t = test::make_host(keys, DType::bf16, {count, D});
    const clsa::Tensor kv_t = test::make_host(kv, DType::bf16, {count, H, HD});
    cache.append(id, kv_t, kv_t, keys_t);
    clsa::SharedKVCache reference(config, Backend::cpu);
    const SequenceId ref = reference.add_sequence();
    reference.append(ref, kv_t, kv_t, keys_t);
    const std::vector<std::int32_t> wrapped_pages = cache.pages(id), ref_pages = reference.pages(ref);
    REQUIRE(wrapped_pages.size() == ref_pages.size());
    const clsa::PagedCacheLayout ref_layout = reference.layout();
    for (std::size_t i = 0; i < wrapped_pages.size(); ++i) {
      const std::int64_t tokens_in_page = std::min<std::int64_t>(P, count - static_cast<std::int64_t>(i) * P);
      const unsigned char* a = fresh.data() + wrapped_pages[i] * P * (D + 4);
      const unsigned char* b = static_cast<const unsigned char*>(ref_layout.index_keys) + ref_pages[i] * P * (D + 4);
      CHECK(std::memcmp(a, b, static_cast<std::size_t>(tokens_in_page * D)) == 0);
      CHECK(std::memcmp(a + P * D, b + P * D, static_cast<std::size_t>(tokens_in_page * 4)) == 0);
    }
  }
}

namespace {
/// A valid CPU configuration of e4m3 K/V (two kv heads, per-head scales) and e4m3 indexer keys.
clsa::CacheConfig good_fp8_config() {
  test::Rng rng(test::base_seed() + 87);
  return fp8_config(2, 64, 64, 16, 8, DType::e4m3, DType::e4m3, ScaleFormat::f32, rng);
}
}  // namespace

TEST_CASE("fp8 cache configurations that do not fit are refused, naming the field", "[fp8]") {
  const clsa::CacheConfig good = good_fp8_config();
  auto with = [&](auto change) {
    clsa::CacheConfig config = good;
    change(config);
    return config;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (const float bad : {0.0f, -1.0f, nan, inf, -inf}) {
    INFO("scale " << bad);
    CLSA_REQUIRE_ERROR(clsa::SharedKVCache(with([&](auto& c) { c.k_scales[1] = bad; }), Backend::cpu),
                       ErrorCode::invalid_argument, "config.k_scales[1]");
    CLSA_REQUIRE_ERROR(clsa::SharedKVCache(with([&](auto& c) { c.v_scales = {bad}; }), Backend::cpu),
                       ErrorCode::invalid_argument, "config.v_scales[0]");
  }
  CLSA_REQUIRE_ERROR(clsa::SharedKVCache(with([](auto& c) { c.k_scales.clear(); }), Backend::cpu),
                     ErrorCode::invalid_argument, "config.k_scales has 0 entries");
  CLSA_REQUIRE_ERROR(clsa::SharedKVCache(with([](auto& c) {
                                           c.v_scales = {1.0f, 1.0f, 1.0f};
                                         }),
                                         Backend::cpu),
                     ErrorCode::invalid_argument, "config.v_scales has 3 entries");
  CLSA_REQUIRE_ERROR(clsa::SharedKVCache(with([](auto& c) { c.dtype = DType::bf16; }), Backend::cpu),
                     ErrorCode::invalid_argument, "config.k_scales has 2 entries but config.dtype is bf16");
  CLSA_REQUIRE_ERROR(clsa::SharedKVCache(with([](auto& c) { c.index_dtype = DType::i32; }), Backend::cpu),
                     ErrorCode::dtype_mismatch, "config.index_dtype = i32");
  CLSA_REQUIRE_ERROR(clsa::SharedKVCache(with([](auto& c) {
                                           c.index_dim = 3;
                                           c.page_size = 2;
                                         }),
                                         Backend::cpu),
                     ErrorCode::invalid_argument, "config.index_dim * page_size");
  // Per-tensor scales and an unset index dtype (= dtype) are fine.
  const clsa::SharedKVCache per_tensor(with([](auto& c) {
                                         c.k_scales = {0.5f};
                                         c.index_dtype.reset();
                                       }),
                                       Backend::cpu);
  CHECK(per_tensor.layout().index_key_dtype() == DType::e4m3);
  CHECK(per_tensor.layout().index_dtype.has_value());
  CHECK(per_tensor.layout().k_scales[1] == 0.5f);
}

TEST_CASE("fp8 pool layouts that do not fit are refused, naming the field", "[fp8]") {
  const clsa::CacheConfig good = good_fp8_config();
  clsa::SharedKVCache cache(good, Backend::cpu);
  const clsa::PagedCacheLayout layout = cache.layout();
  auto wrap_with = [&](auto change) {
    clsa::PagedCacheLayout l = layout;
    change(l);
    return clsa::SharedKVCache::wrap(good, l);
  };
  CHECK(wrap_with([](auto&) {}).config().max_pages == 8);
  CLSA_REQUIRE_ERROR(wrap_with([](auto& l) { l.index_scales = nullptr; }), ErrorCode::invalid_argument,
                     "index_scales is null");
  CLSA_REQUIRE_ERROR(wrap_with([](auto& l) {
                       l.index_scales =
                           reinterpret_cast<const float*>(reinterpret_cast<const char*>(l.index_scales) + 1);
                     }),
                     ErrorCode::invalid_argument, "index_scales is not 4-byte aligned");
  CLSA_REQUIRE_ERROR(wrap_with([](auto& l) { l.index_scale_page_stride = -1; }), ErrorCode::shape_mismatch,
                     "index_scale_page_stride = -1");
  CLSA_REQUIRE_ERROR(wrap_with([](auto& l) { l.k_scales = nullptr; }), ErrorCode::invalid_argument, "k_scales is null");
  const float negative[] = {0.5f, -2.0f};
  CLSA_REQUIRE_ERROR(wrap_with([&](auto& l) { l.v_scales = negative; }), ErrorCode::invalid_argument,
                     "v_scales[1 * v_scale_stride]");
  const float other[] = {0.5f, 0.5f};
  CLSA_REQUIRE_ERROR(wrap_with([&](auto& l) { l.k_scales = other; }), ErrorCode::invalid_argument,
                     "config.k_scales[0]");
  CLSA_REQUIRE_ERROR(wrap_with([](auto& l) { l.index_dtype = DType::bf16; }), ErrorCode::invalid_argument,
                     "index_scales is set, but the indexer keys are bf16");
  CLSA_REQUIRE_ERROR(wrap_with([](auto& l) {
                       l.index_dtype = DType::bf16;
                       l.index_scales = nullptr;
                     }),
                     ErrorCode::shape_mismatch, "index dtype bf16");
  CLSA_REQUIRE_ERROR(wrap_with([](auto& l) {
                       l.dtype = DType::bf16;
                       l.k_scales = l.v_scales = nullptr;
                     }),
                     ErrorCode::shape_mismatch, "dtype bf16");
  {
    clsa::PagedCacheLayout l = layout;
    l.dtype = DType::bf16;
    CLSA_REQUIRE_ERROR(clsa::validate_layout("engine pool", l), ErrorCode::invalid_argument,
                       "engine pool: pool k_scales is set, but dtype is bf16");
  }
}

TEST_CASE("fp8 calls take activations of f32, f16 or bf16; supports() answers for every dtype", "[fp8]") {
  // q_idx over e4m3 keys is f32, f16 or bf16 (never e4m3); head weights never e4m3; over e4m3
  // K/V, out has q's dtype; over a mixed cache, q_idx has the keys' dtype.
  test::Rng rng(test::base_seed() + 90);
  const clsa::CacheConfig good = good_fp8_config();
  clsa::SharedKVCache cache(good, Backend::cpu);
  const SequenceId id = cache.add_sequence();
  cache.append(id, test::make_host(gaussian(rng, 8 * 128, DType::bf16), DType::bf16, {8, 2, 64}),
               test::make_host(gaussian(rng, 8 * 128, DType::bf16), DType::bf16, {8, 2, 64}),
               test::make_host(gaussian(rng, 8 * 64, DType::bf16), DType::bf16, {8, 64}));
  const clsa::CacheBatch batch = cache.batch({id});
  clsa::IndexerConfig ic;
  ic.num_heads = 2;
  ic.index_dim = 64;
  ic.top_k = 4;
  clsa::CrossLayerIndexer indexer(ic, Backend::cpu);
  const clsa::Tensor q8 = clsa::Tensor::empty({1, 1, 2, 64}, DType::e4m3);
  const clsa::Tensor q16 = test::make_host(std::vector<double>(128, 1.0), DType::f16, {1, 1, 2, 64});
  const clsa::Tensor w = test::make_host(std::vector<double>(2, 1.0), DType::f32, {1, 1, 2});
  const clsa::Tensor w8 = clsa::Tensor::empty({1, 1, 2}, DType::e4m3);
  CLSA_REQUIRE_ERROR(indexer.select(batch, q8, w), ErrorCode::dtype_mismatch, "q_idx is [1,1,2,64] e4m3");
  CLSA_REQUIRE_ERROR(indexer.select(batch, q16, w8), ErrorCode::dtype_mismatch, "head_weights");
  CHECK(indexer.select(batch, q16, w).counts.defined());  // f16 queries over e4m3 keys
  clsa::AttentionConfig ac;
  ac.num_q_heads = 2;
  ac.num_kv_heads = 2;
  ac.head_dim = 64;
  clsa::DenseCrossAttention dense(ac, Backend::cpu);
  const clsa::Tensor q = test::make_host(std::vector<double>(128, 0.5), DType::bf16, {1, 1, 2, 64});
  const clsa::Tensor out_f16 = clsa::Tensor::empty({1, 1, 2, 64}, DType::f16);
  const clsa::Tensor out_bf16 = clsa::Tensor::empty({1, 1, 2, 64}, DType::bf16);
  const clsa::Tensor out8 = clsa::Tensor::empty({1, 1, 2, 64}, DType::e4m3);
  CLSA_REQUIRE_ERROR(dense.forward(batch, q, out_f16), ErrorCode::dtype_mismatch, "out is [1,1,2,64] f16");
  CLSA_REQUIRE_ERROR(dense.forward(batch, out8, out8), ErrorCode::dtype_mismatch, "q is [1,1,2,64] e4m3");
  dense.forward(batch, q, out_bf16);
  // A mixed cache: q_idx has the keys' dtype, q the K/V's.
  clsa::CacheConfig mixed = good;
  mixed.dtype = DType::bf16;
  mixed.k_scales.clear();
  mixed.v_scales.clear();
  mixed.index_dtype = DType::f16;
  clsa::SharedKVCache mixed_cache(mixed, Backend::cpu);
  const SequenceId m = mixed_cache.add_sequence();
  CLSA_REQUIRE_ERROR(mixed_cache.append(m, test::make_host(std::vector<double>(128, 1.0), DType::bf16, {1, 2, 64}),
                                        test::make_host(std::vector<double>(128, 1.0), DType::bf16, {1, 2, 64}),
                                        test::make_host(std::vector<double>(64, 1.0), DType::bf16, {1, 64})),
                     ErrorCode::dtype_mismatch, "index_keys is [1,64] bf16");
  mixed_cache.append(m, test::make_host(std::vector<double>(128, 1.0), DType::bf16, {1, 2, 64}),
                     test::make_host(std::vector<double>(128, 1.0), DType::bf16, {1, 2, 64}),
                     test::make_host(std::vector<double>(64, 1.0), DType::f16, {1, 64}));
  const clsa::Tensor q_bf16 = test::make_host(std::vector<double>(128, 1.0), DType::bf16, {1, 1, 2, 64});
  CLSA_REQUIRE_ERROR(indexer.select(mixed_cache.batch({m}), q_bf16, w), ErrorCode::dtype_mismatch, "q_idx");
  CHECK(indexer.select(mixed_cache.batch({m}), q16, w).counts.defined());
  const clsa::MemoryStats stats = mixed_cache.memory();
  CHECK(stats.kv_bytes_per_token == 2u * 2 * 64 * 2);
  CHECK(stats.index_bytes_per_token == 64u * 2);

  // supports(): the CPU runs every float dtype; nothing runs i32.
  std::string why;
  CHECK(clsa::CrossLayerIndexer::supports(ic, DType::e4m3, Backend::cpu, &why));
  CHECK(why.empty());
  CHECK_FALSE(clsa::CrossLayerIndexer::supports(ic, DType::i32, Backend::cpu, &why));
  CHECK(why.find("i32") != std::string::npos);
  CHECK(clsa::SparseCrossAttention::supports(ac, DType::e4m3, Backend::cpu, &why));
  CHECK_FALSE(clsa::SparseCrossAttention::supports(ac, DType::i32, Backend::cpu, &why));
  CHECK(why.find("i32") != std::string::npos);
}

TEST_CASE("the CUDA backend refuses fp8 caches cleanly until it has fp8 kernels", "[fp8][cuda]") {
  CLSA_SKIP_WITHOUT_GPU();
  test::Rng rng(test::base_seed() + 88);
  const clsa::CacheConfig fp8 = fp8_config(2, 64, 64, 16, 8, DType::e4m3, DType::e4m3, ScaleFormat::f32, rng);
  CLSA_REQUIRE_ERROR(clsa::SharedKVCache(fp8, Backend::cuda), ErrorCode::unsupported, "e4m3 K/V");
  clsa::CacheConfig keys_only = fp8;
  keys_only.dtype = DType::bf16;
  keys_only.k_scales.clear();
  keys_only.v_scales.clear();
  CLSA_REQUIRE_ERROR(clsa::SharedKVCache(keys_only, Backend::cuda), ErrorCode::unsupported, "e4m3 indexer keys");
  clsa::CacheConfig mixed = keys_only;
  mixed.index_dtype = DType::f16;
  CLSA_REQUIRE_ERROR(clsa::SharedKVCache(mixed, Backend::cuda), ErrorCode::unsupported, "indexer keys of f16");
  clsa::IndexerConfig ic;
  ic.num_heads = 16;
  ic.index_dim = 128;
  std::string why;
  CHECK_FALSE(clsa::CrossLayerIndexer::supports(ic, DType::e4m3, Backend::cuda, &why));
  CHECK(why.find("e4m3") != std::string::npos);
  clsa::AttentionConfig ac;
  CHECK_FALSE(clsa::SparseCrossAttention::supports(ac, DType::e4m3, Backend::cuda, &why));
  CHECK(why.find("e4m3") != std::string::npos);
  CHECK(clsa::SparseCrossAttention::supports(ac, DType::bf16, Backend::cuda, &why));
  clsa::CrossLayerIndexer indexer(ic, Backend::cuda);
  clsa::CacheConfig gather = fp8;
  CLSA_REQUIRE_ERROR(indexer.gather_routed_kv(gather), ErrorCode::unsupported, "e4m3");
  // An engine's fp8 pool on the device is refused when wrapped, before any kernel could read it.
  const clsa::Device device = test::device_of(Backend::cuda);
  const clsa::Tensor pool = clsa::Tensor::empty({8 * 16 * (64 + 4) + 8 * 16 * 2 * 64 * 2}, DType::e4m3, device);
  clsa::PagedCacheLayout l{};
  l.dtype = DType::bf16;
  l.index_dtype = DType::e4m3;
  l.device = device;
  l.num_kv_heads = 2;
  l.head_dim = 64;
  l.index_dim = 64;
  l.page_size = 16;
  l.num_pages = 8;
  l.index_keys = pool.view().data();
  l.index_page_stride = 16 * 68;
  l.index_token_stride = 64;
  l.index_scales = reinterpret_cast<const float*>(static_cast<const char*>(pool.view().data()) + 16 * 64);
  l.index_scale_page_stride = 16 * 68 / 4;
  l.index_scale_token_stride = 1;
  l.k = static_cast<const char*>(pool.view().data()) + 8 * 16 * 68;
  l.v = static_cast<const char*>(l.k) + 8 * 16 * 2 * 64;
  l.k_page_stride = l.v_page_stride = 16 * 2 * 64;
  l.k_token_stride = l.v_token_stride = 2 * 64;
  l.k_head_stride = l.v_head_stride = 64;
  const std::vector<std::int32_t> indptr = {0, 1}, indices = {0}, last = {1};
  const clsa::Tensor indptr_t = test::on_device(test::make_host({0, 1}, DType::i32, {2}), Backend::cuda);
  const clsa::Tensor indices_t = test::on_device(test::make_host({0}, DType::i32, {1}), Backend::cuda);
  const clsa::Tensor last_t = test::on_device(test::make_host({1}, DType::i32, {1}), Backend::cuda);
  clsa::PageTableView tables;
  tables.num_sequences = 1;
  tables.page_indptr = indptr_t.data_as<std::int32_t>();
  tables.page_indices = indices_t.data_as<std::int32_t>();
  tables.last_page_lengths = last_t.data_as<std::int32_t>();
  tables.host_page_indptr = indptr.data();
  tables.host_last_page_lengths = last.data();
  CLSA_REQUIRE_ERROR(clsa::CacheBatch::wrap(l, tables), ErrorCode::unsupported, "e4m3 indexer keys");
}

TEST_CASE("fp8 decode loop: one indexer and attention set over hundreds of steps, changing batches, growing contexts",
          "[fp8]") {
  // The engine contract (docs/design.md section 4) in fp8 mode: components built and planned once,
  // then steps with batch sizes and T changing every step, sequences growing, joining and leaving,
  // empty slots padding the batch. Every step: routed sets equal the oracle's on the dequantized
  // keys (exact keys, see exact_fp8_keys), attention within tolerance of the oracle on the
  // dequantized K/V; every 10th step also bitwise equal to fresh objects planned with the same bounds.
  constexpr test::StepShape kShape{8, 2, 64, 4, 64, 16};  // Hq, Hkv, D, H_idx, D_idx, page size
  constexpr int kMaxBatch = 8, kMaxTokens = 2, kTopK = 48, kLayers = 2;
  constexpr std::int64_t kMaxLength = 768;
  const int steps = [] {
    if (const char* value = std::getenv("CLSA_ENGINE_LOOP_STEPS")) return std::max(1, std::atoi(value));
    return 200;
  }();
  test::Rng rng(test::base_seed() + 89);
  for (const bool fp8_kv : {true, false}) {
    INFO((fp8_kv ? "e4m3 K/V and e4m3 indexer keys (ue8m0)" : "bf16 K/V and e4m3 indexer keys (f32 scales)"));
    clsa::CacheConfig config = kShape.cache_config(24 * (kMaxLength / kShape.page_size + 1));
    config.index_dtype = DType::e4m3;
    config.index_scale_format = fp8_kv ? ScaleFormat::ue8m0 : ScaleFormat::f32;
    if (fp8_kv) {
      config.dtype = DType::e4m3;
      config.k_scales = {0.01f, 0.02f};
      config.v_scales = {0.015f};
    }
    const clsa::IndexerConfig ic = kShape.indexer_config(kTopK, 2, 6);
    const clsa::AttentionConfig ac = kShape.attention_config();
    test::Components components(Backend::cpu, ic, ac, kMaxBatch, kMaxTokens, kMaxLength);
    test::CacheFixture fixture(config, Backend::cpu, {}, rng);
    std::vector<std::size_t> live;  // fixture indices of the live sequences
    auto append = [&](std::size_t i, std::int64_t tokens) {
      const std::size_t kv = static_cast<std::size_t>(tokens * kShape.kv_heads * kShape.head_dim);
      fixture.append_values(i, gaussian(rng, kv, DType::bf16, 2.0), gaussian(rng, kv, DType::bf16, 2.0),
                            exact_fp8_keys(rng, tokens, kShape.index_dim));
    };
    auto join = [&] {
      fixture.ids.push_back(fixture.cache.add_sequence());
      fixture.data.emplace_back();
      append(fixture.ids.size() - 1, rng.uniform(kMaxTokens, 300));
      live.push_back(fixture.ids.size() - 1);
    };
    for (int i = 0; i < 12; ++i) join();
    clsa::CacheBatch batch;
    std::size_t routed_rows_checked = 0, empty_rows = 0;
    for (int step = 0; step < steps; ++step) {
      INFO("step " << step);
      // Sequences that reached the bound leave, others finish now and then; new ones join.
      for (std::size_t j = live.size(); j-- > 0;) {
        if (fixture.data[live[j]].length + kMaxTokens > kMaxLength || (live.size() > 4 && rng.uniform(0, 29) == 0)) {
          fixture.cache.release(fixture.ids[live[j]]);
          live.erase(live.begin() + static_cast<std::ptrdiff_t>(j));
        }
      }
      if (live.size() < 4 || rng.uniform(0, 5) == 0) join();
      const int tokens = rng.uniform(1, kMaxTokens);
      const int slots = rng.uniform(1, kMaxBatch);
      std::vector<std::size_t> chosen = live;
      std::shuffle(chosen.begin(), chosen.end(), rng.engine);
      chosen.resize(std::min<std::size_t>(chosen.size(), static_cast<std::size_t>(slots)));
      std::vector<SequenceId> ids;
      std::vector<const test::SequenceData*> data;  // the batch's slots, for the oracle
      for (std::size_t i : chosen) {
        append(i, tokens);
        ids.push_back(fixture.ids[i]);
        data.push_back(&fixture.data[i]);
      }
      const test::SequenceData empty;
      if (step % 3 == 0 && static_cast<int>(ids.size()) < kMaxBatch) {  // an empty slot in the middle
        ids.insert(ids.begin() + static_cast<std::ptrdiff_t>(ids.size() / 2), clsa::empty_slot);
        data.insert(data.begin() + static_cast<std::ptrdiff_t>(data.size() / 2), &empty);
      }
      const int b_count = static_cast<int>(ids.size());
      fixture.cache.batch(ids, batch);
      const IndexerInputs in = exact_indexer_inputs(rng, b_count, tokens, ic, kActivations[step % 3]);
      const DType q_dtype = fp8_kv ? kActivations[(step / 3) % 3] : DType::bf16;
      std::vector<std::vector<double>> q;
      std::vector<clsa::Tensor> q_t, out_t, lse_t;
      const std::int64_t rows = std::int64_t{b_count} * tokens;
      for (int l = 0; l <= kLayers; ++l) {  // layer kLayers: the dense layer
        q.push_back(gaussian(rng, static_cast<std::size_t>(rows * kShape.q_heads * kShape.head_dim), q_dtype, 0.3));
        q_t.push_back(test::make_host(q.back(), q_dtype, {b_count, tokens, kShape.q_heads, kShape.head_dim}));
        out_t.push_back(clsa::Tensor::empty({b_count, tokens, kShape.q_heads, kShape.head_dim}, q_dtype));
        lse_t.push_back(clsa::Tensor::empty({b_count, tokens, kShape.q_heads}, DType::f32));
      }
      auto run = [&](test::Components& c, std::vector<clsa::Tensor>& outs, std::vector<clsa::Tensor>& lses) {
        const clsa::RoutingIndex routing = c.indexer.select(batch, in.q_t, in.w_t);
        for (int l = 0; l < kLayers; ++l) {
          const std::size_t i = static_cast<std::size_t>(l);
          c.sparse.forward(batch, routing, q_t[i], outs[i], {}, lses[i]);
        }
        c.dense.forward(batch, q_t[kLayers], outs[kLayers], {}, lses[kLayers]);
        return routed_rows(routing);
      };
      const std::vector<std::vector<std::int32_t>> routed = run(components, out_t, lse_t);
      const double softmax_scale = 1.0 / std::sqrt(static_cast<double>(kShape.head_dim));
      const std::size_t row_size = static_cast<std::size_t>(kShape.q_heads * kShape.head_dim);
      for (int l = 0; l <= kLayers; ++l) {
        const std::size_t li = static_cast<std::size_t>(l);
        std::vector<double> expected(q[li].size(), 0.0);
        std::vector<double> expected_lse(static_cast<std::size_t>(rows * kShape.q_heads),
                                         -std::numeric_limits<double>::infinity());
        for (std::size_t b = 0; b < data.size(); ++b) {
          for (int t = 0; t < tokens; ++t) {
            const std::size_t row = b * static_cast<std::size_t>(tokens) + static_cast<std::size_t>(t);
            if (data[b]->length == 0) {
              if (l == 0) {
                REQUIRE(routed[row].empty());
                ++empty_rows;
              }
              continue;
            }
            std::vector<std::int32_t> positions;
            if (l < kLayers) {
              positions = routed[row];
              if (l == 0) {
                REQUIRE(positions == oracle_row(*data[b], in, ic, tokens, b, t));
                ++routed_rows_checked;
              }
            } else {
              positions.resize(static_cast<std::size_t>(data[b]->length - tokens + t + 1));
              std::iota(positions.begin(), positions.end(), 0);
            }
            test::oracle_attention(*data[b], positions, q[li].data() + row * row_size, kShape.q_heads, kShape.kv_heads,
                                   kShape.head_dim, softmax_scale, expected.data() + row * row_size,
                                   expected_lse.data() + row * static_cast<std::size_t>(kShape.q_heads));
          }
        }
        double rms = 0.0;
        for (double x : expected) rms += x * x;
        rms = std::sqrt(rms / static_cast<double>(expected.size())) + 1e-30;
        const test::Tolerance tolerance = test::output_tolerance(q_dtype);
        INFO("layer " << l << (l == kLayers ? " (dense)" : " (sparse)"));
        REQUIRE(test::tolerance_ratio(test::read_values(out_t[li]), expected, tolerance.atol * rms, tolerance.rtol) <=
                1.0);
        const std::vector<double> lse = test::read_values(lse_t[li]);
        for (std::size_t i = 0; i < lse.size(); ++i) {
          if (std::isinf(expected_lse[i])) {
            REQUIRE(lse[i] == expected_lse[i]);  // empty slot: -inf
          } else {
            REQUIRE(std::abs(lse[i] - expected_lse[i]) <= 1e-4 * (1 + std::abs(expected_lse[i])));
          }
        }
      }
      if (step % 10 == 0) {
        test::Components fresh(Backend::cpu, ic, ac, kMaxBatch, kMaxTokens, kMaxLength);
        std::vector<clsa::Tensor> fresh_out, fresh_lse;
        for (std::size_t l = 0; l < out_t.size(); ++l) {
          fresh_out.push_back(clsa::Tensor::empty({b_count, tokens, kShape.q_heads, kShape.head_dim}, q_dtype));
          fresh_lse.push_back(clsa::Tensor::empty({b_count, tokens, kShape.q_heads}, DType::f32));
        }
        REQUIRE(run(fresh, fresh_out, fresh_lse) == routed);
        for (std::size_t l = 0; l < out_t.size(); ++l) {
          REQUIRE(test::read_values(fresh_out[l]) == test::read_values(out_t[l]));
          REQUIRE(test::read_values(fresh_lse[l]) == test::read_values(lse_t[l]));
        }
      }
    }
    CHECK(routed_rows_checked > static_cast<std::size_t>(steps));
    CHECK(empty_rows > 0);
  }
}
