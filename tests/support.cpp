#include "support.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

namespace test {

std::uint64_t base_seed() {
  if (const char* value = std::getenv("CLSA_TEST_SEED")) return std::strtoull(value, nullptr, 10);
  return 20261126;
}

double round_to(DType dtype, double x) {
  switch (dtype) {
    case DType::f32:
      return static_cast<double>(static_cast<float>(x));
    case DType::bf16:
      return clsa::to_float(clsa::to_bfloat16(static_cast<float>(x)));
    case DType::f16:
      return clsa::to_float(clsa::to_float16(static_cast<float>(x)));
    case DType::i32:
      return std::nearbyint(x);
    case DType::e4m3:
      return clsa::to_float(clsa::to_float8_e4m3(static_cast<float>(x)));
  }
  return x;
}

clsa::Tensor make_host(const std::vector<double>& values, DType dtype, std::initializer_list<std::int64_t> shape) {
  clsa::Tensor tensor = clsa::Tensor::empty(shape, dtype);
  const std::size_t n = static_cast<std::size_t>(tensor.numel());
  for (std::size_t i = 0; i < n; ++i) {
    const float x = static_cast<float>(values[i]);
    switch (dtype) {
      case DType::f32:
        tensor.data_as<float>()[i] = x;
        break;
      case DType::bf16:
        tensor.data_as<clsa::bfloat16>()[i] = clsa::to_bfloat16(x);
        break;
      case DType::f16:
        tensor.data_as<clsa::float16>()[i] = clsa::to_float16(x);
        break;
      case DType::i32:
        tensor.data_as<std::int32_t>()[i] = static_cast<std::int32_t>(values[i]);
        break;
      case DType::e4m3:
        tensor.data_as<clsa::float8_e4m3>()[i] = clsa::to_float8_e4m3(x);
        break;
    }
  }
  return tensor;
}

namespace {

/// Contiguous host copy of a (possibly strided, possibly device) tensor.
clsa::Tensor host_copy(const clsa::TensorView& tensor) {
  std::int64_t shape[clsa::TensorView::kMaxRank];
  for (int d = 0; d < tensor.rank(); ++d) shape[d] = tensor.size(d);
  clsa::Tensor host = clsa::Tensor::empty(tensor.rank(), shape, tensor.dtype(), clsa::Device::cpu());
  if (tensor.is_contiguous()) {
    clsa::copy_bytes(host.view().data(), clsa::Device::cpu(), tensor.data(), tensor.device(), host.bytes());
    return host;
  }
  // Strided: copy the whole span, then gather on the host.
  std::int64_t span = 1;
  for (int d = 0; d < tensor.rank(); ++d) span += (tensor.size(d) - 1) * tensor.stride(d);
  const std::size_t element = clsa::dtype_size(tensor.dtype());
  std::vector<char> raw(static_cast<std::size_t>(span) * element);
  clsa::copy_bytes(raw.data(), clsa::Device::cpu(), tensor.data(), tensor.device(), raw.size());
  const std::int64_t n = tensor.numel();
  for (std::int64_t i = 0; i < n; ++i) {
    std::int64_t remainder = i;
    std::int64_t offset = 0;
    for (int d = tensor.rank() - 1; d >= 0; --d) {
      offset += (remainder % tensor.size(d)) * tensor.stride(d);
      remainder /= tensor.size(d);
    }
    std::copy_n(raw.data() + offset * static_cast<std::int64_t>(element), element,
                static_cast<char*>(host.view().data()) + i * static_cast<std::int64_t>(element));
  }
  return host;
}

}  // namespace

std::vector<double> read_values(const clsa::TensorView& tensor) {
  const clsa::Tensor host = host_copy(tensor);
  const std::size_t n = static_cast<std::size_t>(host.numel());
  std::vector<double> values(n);
  for (std::size_t i = 0; i < n; ++i) {
    switch (tensor.dtype()) {
      case DType::f32:
        values[i] = host.data_as<float>()[i];
        break;
      case DType::bf16:
        values[i] = clsa::to_float(host.data_as<clsa::bfloat16>()[i]);
        break;
      case DType::f16:
        values[i] = clsa::to_float(host.data_as<clsa::float16>()[i]);
        break;
      case DType::i32:
        values[i] = host.data_as<std::int32_t>()[i];
        break;
      case DType::e4m3:
        values[i] = clsa::to_float(host.data_as<clsa::float8_e4m3>()[i]);
        break;
    }
  }
  return values;
}

std::vector<std::int32_t> read_ints(const clsa::TensorView& tensor) {
  const clsa::Tensor host = host_copy(tensor);
  const std::int32_t* data = host.data_as<std::int32_t>();
  return std::vector<std::int32_t>(data, data + host.numel());
}

clsa::Device device_of(Backend backend) {
  return clsa::backend_device(clsa::resolve_backend(backend));
}

clsa::Tensor on_device(const clsa::Tensor& host, Backend backend) {
  const clsa::Device device = device_of(backend);
  return device.is_cpu() ? host : host.to(device);
}

std::int64_t pages_for(const std::vector<std::int64_t>& lengths, int page_size, std::int64_t spare) {
  std::int64_t pages = spare;
  for (std::int64_t length : lengths) pages += (length + page_size - 1) / page_size;
  return pages;
}

CacheFixture::CacheFixture(const clsa::CacheConfig& cache_config, Backend cache_backend,
                           const std::vector<std::int64_t>& lengths, Rng& rng, Values values)
    : config(cache_config), backend(cache_backend), cache(cache_config, cache_backend) {
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    ids.push_back(cache.add_sequence());
    data.emplace_back();
  }
  // Append in random chunks, interleaving sequences, so pages of different sequences mix.
  std::vector<std::int64_t> remaining = lengths;
  for (;;) {
    bool any = false;
    for (std::size_t i = 0; i < lengths.size(); ++i) {
      if (remaining[i] == 0) continue;
      any = true;
      const int largest = static_cast<int>(std::max<std::int64_t>(3 * config.page_size, lengths[i] / 8));
      const std::int64_t chunk = std::min<std::int64_t>(remaining[i], rng.uniform(1, largest));
      append_random(i, chunk, rng, values);
      remaining[i] -= chunk;
    }
    if (!any) break;
  }
}

void CacheFixture::append_random(std::size_t i, std::int64_t tokens, Rng& rng, Values values) {
  auto draw = [&](std::int64_t count) {
    std::vector<double> out(static_cast<std::size_t>(count));
    for (double& x : out) x = values == Values::gaussian ? rng.normal() : static_cast<double>(rng.uniform(-3, 3));
    return out;
  };
  const std::int64_t row = std::int64_t{config.num_kv_heads} * config.head_dim;
  append_values(i, draw(tokens * row), draw(tokens * row), draw(tokens * config.index_dim));
}

void CacheFixture::append_values(std::size_t i, std::vector<double> k, std::vector<double> v,
                                 std::vector<double> index_keys) {
  // What goes in: values of the cache's dtypes, or bf16 values where the cache keeps e4m3 (append
  // quantizes them). What the oracle sees: the values as stored (e4m3: dequantized, exactly).
  const DType kv_dtype = config.dtype;
  const DType index_dtype = config.index_key_dtype();
  const DType kv_input = kv_dtype == DType::e4m3 ? DType::bf16 : kv_dtype;
  const DType index_input = index_dtype == DType::e4m3 ? DType::bf16 : index_dtype;
  for (auto* values : {&k, &v}) {
    for (double& x : *values) x = round_to(kv_input, x);
  }
  for (double& x : index_keys) x = round_to(index_input, x);
  const int heads = config.num_kv_heads;
  const int dim = config.head_dim;
  const std::int64_t tokens = static_cast<std::int64_t>(index_keys.size()) / config.index_dim;
  const clsa::Tensor k_t = on_device(make_host(k, kv_input, {tokens, heads, dim}), backend);
  const clsa::Tensor v_t = on_device(make_host(v, kv_input, {tokens, heads, dim}), backend);
  const clsa::Tensor i_t = on_device(make_host(index_keys, index_input, {tokens, config.index_dim}), backend);
  cache.append(ids[i], k_t, v_t, i_t);
  if (kv_dtype == DType::e4m3) {
    k = stored_kv(k, config.k_scales, heads, dim);
    v = stored_kv(v, config.v_scales, heads, dim);
  }
  if (index_dtype == DType::e4m3)
    index_keys = stored_index_keys(index_keys, config.index_dim, config.index_scale_format);
  SequenceData& sequence = data[i];
  sequence.k.insert(sequence.k.end(), k.begin(), k.end());
  sequence.v.insert(sequence.v.end(), v.begin(), v.end());
  sequence.index_keys.insert(sequence.index_keys.end(), index_keys.begin(), index_keys.end());
  sequence.length += tokens;
}

std::vector<std::pair<double, std::uint8_t>> e4m3_values() {
  std::vector<std::pair<double, std::uint8_t>> values;
  for (unsigned code = 0; code < 0x7fu; ++code) {
    const int exponent = static_cast<int>(code >> 3);
    const int mantissa = static_cast<int>(code & 7u);
    const double value = exponent == 0 ? std::ldexp(mantissa, -9) : std::ldexp(8 + mantissa, exponent - 10);
    values.emplace_back(value, static_cast<std::uint8_t>(code));
  }
  return values;
}

std::uint8_t nearest_e4m3(double x) {
  static const std::vector<std::pair<double, std::uint8_t>> values = e4m3_values();
  const std::uint8_t sign = std::signbit(x) ? 0x80u : 0u;
  const double magnitude = std::abs(x);
  std::uint8_t best = values.back().second;
  double best_distance = std::numeric_limits<double>::infinity();
  for (const auto& [value, code] : values) {
    const double distance = std::abs(value - magnitude);
    if (distance < best_distance || (distance == best_distance && (code & 1u) == 0)) {
      best = code;
      best_distance = distance;
    }
  }
  return static_cast<std::uint8_t>(sign | best);
}

std::vector<double> stored_kv(const std::vector<double>& values, const std::vector<float>& scales, int heads, int dim) {
  std::vector<double> stored(values.size());
  for (std::size_t j = 0; j < values.size(); ++j) {
    const std::size_t head = j / static_cast<std::size_t>(dim) % static_cast<std::size_t>(heads);
    const float scale = scales[scales.size() == 1 ? 0 : head];
    const float quotient = static_cast<float>(values[j]) / scale;  // as append computes it, in f32
    stored[j] = clsa::to_float(clsa::to_float8_e4m3(quotient)) * static_cast<double>(scale);
  }
  return stored;
}

std::vector<double> stored_index_keys(const std::vector<double>& values, int index_dim, clsa::ScaleFormat format) {
  std::vector<double> stored(values.size());
  std::vector<clsa::bfloat16> row(static_cast<std::size_t>(index_dim));
  std::vector<clsa::float8_e4m3> codes(static_cast<std::size_t>(index_dim));
  for (std::size_t first = 0; first < values.size(); first += static_cast<std::size_t>(index_dim)) {
    for (int d = 0; d < index_dim; ++d)
      row[static_cast<std::size_t>(d)] =
          clsa::to_bfloat16(static_cast<float>(values[first + static_cast<std::size_t>(d)]));
    const float scale = clsa::quantize_row_e4m3(row.data(), index_dim, codes.data(), format);
    for (int d = 0; d < index_dim; ++d) {
      stored[first + static_cast<std::size_t>(d)] =
          clsa::to_float(codes[static_cast<std::size_t>(d)]) * static_cast<double>(scale);
    }
  }
  return stored;
}

std::vector<double> oracle_scores(const SequenceData& sequence, int index_dim, const double* q, const double* w,
                                  int heads, std::int64_t visible, double scale) {
  std::vector<double> scores(static_cast<std::size_t>(visible));
  for (std::int64_t s = 0; s < visible; ++s) {
    const double* key = sequence.index_keys.data() + s * index_dim;
    double total = 0.0;
    for (int h = 0; h < heads; ++h) {
      double dot = 0.0;
      for (int d = 0; d < index_dim; ++d) dot += q[h * index_dim + d] * key[d];
      total += w[h] * (dot < 0.0 ? 0.0 : dot);
    }
    scores[static_cast<std::size_t>(s)] = scale * total;
  }
  return scores;
}

std::vector<std::int32_t> oracle_routing(const std::vector<double>& scores, int top_k, int sinks, int window) {
  const int visible = static_cast<int>(scores.size());
  std::vector<std::int32_t> chosen;
  if (top_k >= visible) {
    chosen.resize(static_cast<std::size_t>(visible));
    std::iota(chosen.begin(), chosen.end(), 0);
    return chosen;
  }
  std::vector<bool> forced(static_cast<std::size_t>(visible), false);
  for (int p = 0; p < std::min(sinks, visible); ++p) forced[static_cast<std::size_t>(p)] = true;
  for (int p = std::max(0, visible - window); p < visible; ++p) forced[static_cast<std::size_t>(p)] = true;
  std::vector<std::int32_t> rest;
  for (int p = 0; p < visible; ++p) {
    if (forced[static_cast<std::size_t>(p)]) {
      chosen.push_back(p);
    } else {
      rest.push_back(p);
    }
  }
  std::sort(rest.begin(), rest.end(), [&](std::int32_t a, std::int32_t b) {
    const double sa = scores[static_cast<std::size_t>(a)];
    const double sb = scores[static_cast<std::size_t>(b)];
    const bool na = std::isnan(sa);
    const bool nb = std::isnan(sb);
    if (na != nb) return nb;  // the finite (or infinite) one first
    if (!na && sa != sb) return sa > sb;
    return a < b;
  });
  const std::size_t needed = static_cast<std::size_t>(top_k) - chosen.size();
  chosen.insert(chosen.end(), rest.begin(), rest.begin() + static_cast<std::ptrdiff_t>(needed));
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

std::string routing_row_problem(const std::vector<std::int32_t>& routed, const std::vector<double>& scores, int top_k,
                                int sinks, int window, double tolerance) {
  const int visible = static_cast<int>(scores.size());
  const std::string where = "(visible " + std::to_string(visible) + ", top_k " + std::to_string(top_k) + ", sinks " +
                            std::to_string(sinks) + ", window " + std::to_string(window) + ")";
  if (static_cast<int>(routed.size()) != std::min(top_k, visible)) {
    return "routed " + std::to_string(routed.size()) + " positions " + where;
  }
  for (std::size_t i = 0; i < routed.size(); ++i) {
    if (routed[i] < 0 || routed[i] >= visible)
      return "position " + std::to_string(routed[i]) + " out of range " + where;
    if (i > 0 && routed[i] <= routed[i - 1]) return "positions not strictly ascending " + where;
  }
  std::vector<bool> is_routed(static_cast<std::size_t>(visible), false);
  for (std::int32_t p : routed) is_routed[static_cast<std::size_t>(p)] = true;
  for (int p = 0; p < visible; ++p) {
    const bool forced = p < sinks || p >= visible - window;
    if (forced && !is_routed[static_cast<std::size_t>(p)])
      return "sink or window position " + std::to_string(p) + " not routed " + where;
  }
  if (tolerance < 0.0) return "";
  // Candidates between sinks and window: NaN ranks below everything.
  auto rank_value = [](double s) { return std::isnan(s) ? -std::numeric_limits<double>::infinity() : s; };
  double lowest_routed = std::numeric_limits<double>::infinity();
  double highest_unrouted = -std::numeric_limits<double>::infinity();
  double largest = 0.0;
  for (int p = std::min(sinks, visible); p < visible - window; ++p) {
    const double s = rank_value(scores[static_cast<std::size_t>(p)]);
    if (std::isfinite(s)) largest = std::max(largest, std::abs(s));
    if (is_routed[static_cast<std::size_t>(p)]) {
      lowest_routed = std::min(lowest_routed, s);
    } else {
      highest_unrouted = std::max(highest_unrouted, s);
    }
  }
  if (highest_unrouted > lowest_routed + tolerance * largest + 1e-12) {
    return "an unrouted score " + std::to_string(highest_unrouted) + " beats a routed " +
           std::to_string(lowest_routed) + " " + where;
  }
  return "";
}

void oracle_attention(const SequenceData& sequence, const std::vector<std::int32_t>& positions, const double* q,
                      int q_heads, int kv_heads, int dim, double scale, double* out, double* lse) {
  const int group = q_heads / kv_heads;
  std::vector<double> logits(positions.size());
  for (int h = 0; h < q_heads; ++h) {
    const int kv = h / group;
    double max_logit = -std::numeric_limits<double>::infinity();
    for (std::size_t i = 0; i < positions.size(); ++i) {
      const double* key = sequence.k.data() + (static_cast<std::int64_t>(positions[i]) * kv_heads + kv) * dim;
      double dot = 0.0;
      for (int d = 0; d < dim; ++d) dot += q[h * dim + d] * key[d];
      logits[i] = scale * dot;
      max_logit = std::max(max_logit, logits[i]);
    }
    double total = 0.0;
    for (double& logit : logits) {
      logit = std::exp(logit - max_logit);
      total += logit;
    }
    for (int d = 0; d < dim; ++d) {
      double acc = 0.0;
      for (std::size_t i = 0; i < positions.size(); ++i) {
        acc += logits[i] * sequence.v[(static_cast<std::size_t>(positions[i]) * kv_heads + kv) * dim + d];
      }
      out[h * dim + d] = acc / total;
    }
    lse[h] = max_logit + std::log(total);
  }
}

double tolerance_ratio(const std::vector<double>& actual, const std::vector<double>& expected, double atol,
                       double rtol) {
  double worst = 0.0;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const double ratio = std::abs(actual[i] - expected[i]) / (atol + rtol * std::abs(expected[i]));
    if (!(ratio <= worst)) worst = ratio;  // NaN propagates as a failure
  }
  return worst;
}

double relative_error(const std::vector<double>& actual, const std::vector<double>& expected) {
  double diff = 0.0;
  double norm = 0.0;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    diff += (actual[i] - expected[i]) * (actual[i] - expected[i]);
    norm += expected[i] * expected[i];
  }
  return std::sqrt(diff / norm);
}

Tolerance output_tolerance(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return {2e-5, 2e-5};
    case DType::f16:
      return {2e-3, 2e-3};
    case DType::bf16:
      return {1.5e-2, 1.5e-2};
    case DType::i32:
    case DType::e4m3:  // never an output dtype
      break;
  }
  return {0.0, 0.0};
}

std::string describe(const std::vector<std::int64_t>& values) {
  std::string text = "[";
  for (std::size_t i = 0; i < values.size(); ++i) text += (i ? "," : "") + std::to_string(values[i]);
  return text + "]";
}

}  // namespace test
