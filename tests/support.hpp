// Test support: seeded random problems, caches filled from them on any backend, and the plain
// double-precision oracle every component is compared with. The oracle shares no code with the
// library (beyond the dtype rounding of inputs, which it needs to see the stored values).
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "clsa/clsa.hpp"

namespace test {

using clsa::Backend;
using clsa::DType;

/// The seed of every random test: CLSA_TEST_SEED if set, else a fixed default; printed on failure.
std::uint64_t base_seed();

struct Rng {
  std::mt19937_64 engine;
  explicit Rng(std::uint64_t seed) : engine(seed) {}
  double normal() { return std::normal_distribution<double>(0.0, 1.0)(engine); }
  int uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(engine); }
  double uniform_real(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(engine); }
};

/// x rounded to the nearest value of dtype (what storing it in dtype keeps).
double round_to(DType dtype, double x);

/// Host tensor of dtype holding `values` (rounded to dtype), shape as given.
clsa::Tensor make_host(const std::vector<double>& values, DType dtype, std::initializer_list<std::int64_t> shape);
/// Values of a tensor on any device, as doubles.
std::vector<double> read_values(const clsa::TensorView& tensor);
std::vector<std::int32_t> read_ints(const clsa::TensorView& tensor);
/// The device a backend computes on.
clsa::Device device_of(Backend backend);
/// `host` copied to the backend's device (itself for the CPU).
clsa::Tensor on_device(const clsa::Tensor& host, Backend backend);

/// The cached data of one sequence, as stored (rounded to the cache dtype).
struct SequenceData {
  std::int64_t length = 0;
  std::vector<double> k, v;        // [length, Hkv, D]
  std::vector<double> index_keys;  // [length, Didx]
};

/// How cache entries are drawn.
enum class Values {
  gaussian,       // N(0, 1)
  small_integers  // integers in [-3, 3]: every product and sum is exact in f32 and bf16
};

/// A SharedKVCache on a backend, filled with random sequences of the given lengths, appended in
/// random chunks; the data is kept for the oracle.
struct CacheFixture {
  clsa::CacheConfig config;
  Backend backend;
  clsa::SharedKVCache cache;
  std::vector<clsa::SequenceId> ids;
  std::vector<SequenceData> data;

  CacheFixture(const clsa::CacheConfig& config, Backend backend, const std::vector<std::int64_t>& lengths, Rng& rng,
               Values values = Values::gaussian);
  /// Appends `tokens` random tokens to sequence i (and to its data).
  void append_random(std::size_t i, std::int64_t tokens, Rng& rng, Values values = Values::gaussian);
  /// Appends the given tokens (k, v [tokens, Hkv, D], index_keys [tokens, Didx], any values; they
  /// are rounded to the cache dtype) to sequence i. Where the cache keeps e4m3, the values are
  /// rounded to bf16 and appended as such (append quantizes them); the data keeps them as stored,
  /// dequantized (stored_kv, stored_index_keys).
  void append_values(std::size_t i, std::vector<double> k, std::vector<double> v, std::vector<double> index_keys);
  clsa::CacheBatch batch() const { return cache.batch(ids); }
};

/// Every finite non-negative e4m3 value with its code, ascending (codes 0x00..0x7e), computed in
/// float64 from the format's definition (no library code).
std::vector<std::pair<double, std::uint8_t>> e4m3_values();
/// The float64 oracle of e4m3 rounding: the code of the e4m3 value nearest x (ties to the even
/// code), +-448 beyond the range (saturation).
std::uint8_t nearest_e4m3(double x);

/// What an e4m3 K/V cache keeps of bf16 values [.., heads, dim] (their f32 quotients by the kv
/// head's scale rounded to e4m3, saturating), dequantized: e4m3 value * scale.
std::vector<double> stored_kv(const std::vector<double>& values, const std::vector<float>& scales, int heads, int dim);
/// What an e4m3 indexer-key cache keeps of bf16 keys [.., index_dim] (quantize_row_e4m3 per key,
/// which test_numeric holds against the float64 oracle), dequantized: e4m3 value * scale.
std::vector<double> stored_index_keys(const std::vector<double>& values, int index_dim, clsa::ScaleFormat format);

/// Pages for sequences of these lengths, with some spare.
std::int64_t pages_for(const std::vector<std::int64_t>& lengths, int page_size, std::int64_t spare = 4);

// ---- oracle ----

/// score[s] = scale * sum_h w[h] * max(0, q[h] . key[s]) for s in [0, visible); NaN stays NaN.
std::vector<double> oracle_scores(const SequenceData& sequence, int index_dim, const double* q, const double* w,
                                  int heads, std::int64_t visible, double scale);

/// The routed set by definition: sinks, window, then the highest scores (NaN last, ties to the
/// lower position); ascending.
std::vector<std::int32_t> oracle_routing(const std::vector<double>& scores, int top_k, int sinks, int window);

/// What is wrong with a routed row (ascending positions) of a query token that sees
/// scores.size() positions, or "" when nothing is: the count, order, range, sinks and window,
/// and (tolerance >= 0) that no unrouted candidate's oracle score beats a routed one's by more
/// than tolerance * max|score| (NaN scores rank last, as routing orders them).
std::string routing_row_problem(const std::vector<std::int32_t>& routed, const std::vector<double>& scores, int top_k,
                                int sinks, int window, double tolerance);

/// Softmax attention of Hq query heads over `positions` of the sequence (GQA: head h reads kv
/// head h / (Hq/Hkv)). q [Hq, D]; writes out [Hq, D] and lse [Hq].
void oracle_attention(const SequenceData& sequence, const std::vector<std::int32_t>& positions, const double* q,
                      int q_heads, int kv_heads, int dim, double scale, double* out, double* lse);

/// Largest |a - b| / (atol + rtol * |b|) over all entries (<= 1 means within tolerance).
double tolerance_ratio(const std::vector<double>& actual, const std::vector<double>& expected, double atol,
                       double rtol);
/// ||a - b|| / ||b||.
double relative_error(const std::vector<double>& actual, const std::vector<double>& expected);

/// Output tolerances per dtype: absolute and relative, for attention outputs of O(1).
struct Tolerance {
  double atol, rtol;
};
Tolerance output_tolerance(DType dtype);

std::string describe(const std::vector<std::int64_t>& values);

}  // namespace test
