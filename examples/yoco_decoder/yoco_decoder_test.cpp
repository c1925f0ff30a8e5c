// yoco_decoder_test: the CPU DecoderOps against naive double-precision references (the same checks
// are to hold the CUDA ops to the CPU ones), and the decoding step allocating nothing of its own
// once warm. Exits 1 on the first failed expectation's report, after running everything.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cpu_decoder_ops.hpp"
#include "decoder.hpp"
#include "model.hpp"
#include "test_checks.hpp"

// Counts allocations (malloc, calloc, realloc and aligned operator new: plain operator new, Eigen's
// blocks and libclsa's vectors all come through malloc) while `counting` is set. glibc only, and
// not under AddressSanitizer, which owns the allocator.
#if defined(__SANITIZE_ADDRESS__)
#define YOCO_TEST_COUNTS_ALLOCATIONS 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define YOCO_TEST_COUNTS_ALLOCATIONS 0
#endif
#endif
#if !defined(YOCO_TEST_COUNTS_ALLOCATIONS) && defined(__GLIBC__)
#define YOCO_TEST_COUNTS_ALLOCATIONS 1
#endif
#ifndef YOCO_TEST_COUNTS_ALLOCATIONS
#define YOCO_TEST_COUNTS_ALLOCATIONS 0
#endif

#if YOCO_TEST_COUNTS_ALLOCATIONS
namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
void count_allocation() {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace

extern "C" {
void* __libc_malloc(std::size_t size);
void* __libc_calloc(std::size_t count, std::size_t size);
void* __libc_realloc(void* pointer, std::size_t size);
void* malloc(std::size_t size) noexcept {
  count_allocation();
  return __libc_malloc(size);
}
void* calloc(std::size_t count, std::size_t size) noexcept {
  count_allocation();
  return __libc_calloc(count, size);
}
void* realloc(void* pointer, std::size_t size) noexcept {
  count_allocation();
  return __libc_realloc(pointer, size);
}
}  // extern "C"

void* operator new(std::size_t size, std::align_val_t alignment) {
  count_allocation();
  const std::size_t align = static_cast<std::size_t>(alignment);
  if (void* p = std::aligned_alloc(align, (size + align - 1) / align * align)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p, std::align_val_t) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t, std::align_val_t) noexcept {
  std::free(p);
}
#endif

namespace {

using yoco_test::expect;
using yoco_test::worst_error;

std::vector<float> random_values(std::mt19937_64& rng, std::size_t count) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(count);
  for (float& x : values) x = normal(rng);
  return values;
}

clsa::Tensor host_tensor(std::initializer_list<std::int64_t> shape, const std::vector<float>& values) {
  clsa::Tensor tensor = clsa::Tensor::empty(shape, clsa::DType::f32);
  std::copy(values.begin(), values.end(), tensor.data_as<float>());
  return tensor;
}

std::vector<float> contents(const clsa::Tensor& tensor) {
  return std::vector<float>(tensor.data_as<float>(), tensor.data_as<float>() + tensor.numel());
}

void test_matmul(yoco::CpuDecoderOps& ops, std::mt19937_64& rng) {
  // M = 1 takes Eigen's GEMV, M > 1 the GEMM on persistent blocks; x and out are strided views.
  for (int m : {1, 5, 70}) {
    const int k = 96, n = 130, x_stride = 100, out_stride = 140;
    const std::vector<float> x_values = random_values(rng, static_cast<std::size_t>(m) * x_stride);
    const std::vector<float> w_values = random_values(rng, static_cast<std::size_t>(k) * n);
    const clsa::Tensor x = host_tensor({m, x_stride}, x_values);
    const clsa::Tensor w = host_tensor({k, n}, w_values);
    clsa::Tensor out = clsa::Tensor::empty({m, out_stride}, clsa::DType::f32);
    ops.matmul(yoco::columns_of(x.view(), 0, k), w.view(), yoco::columns_of(out.view(), 0, n));
    std::vector<float> got;
    std::vector<double> expected;
    for (int r = 0; r < m; ++r) {
      for (int c = 0; c < n; ++c) {
        double sum = 0.0;
        for (int i = 0; i < k; ++i) {
          sum += static_cast<double>(x_values[static_cast<std::size_t>(r * x_stride + i)]) *
                 w_values[static_cast<std::size_t>(i * n + c)];
        }
        expected.push_back(sum);
        got.push_back(out.data_as<float>()[r * out_stride + c]);
      }
    }
    expect(worst_error(got, expected) < 1e-4, "matmul M=" + std::to_string(m));
  }
}

void test_elementwise(yoco::CpuDecoderOps& ops, std::mt19937_64& rng) {
  const int rows = 3, width = 48;
  const std::vector<float> x_values = random_values(rng, rows * width);
  std::vector<float> gain_values = random_values(rng, width);
  const clsa::Tensor x = host_tensor({rows, width}, x_values);
  const clsa::Tensor gain = host_tensor({width}, gain_values);
  clsa::Tensor out = clsa::Tensor::empty({rows, width}, clsa::DType::f32);
  const float eps = 1e-5f;
  ops.rms_norm(x.view(), gain.view(), eps, out.view());
  std::vector<double> expected;
  for (int r = 0; r < rows; ++r) {
    double squares = 0.0;
    for (int i = 0; i < width; ++i) squares += std::pow(x_values[static_cast<std::size_t>(r * width + i)], 2.0);
    const double inverse = 1.0 / std::sqrt(squares / width + eps);
    for (int i = 0; i < width; ++i) {
      expected.push_back(x_values[static_cast<std::size_t>(r * width + i)] * inverse *
                         gain_values[static_cast<std::size_t>(i)]);
    }
  }
  expect(worst_error(contents(out), expected) < 1e-5, "rms_norm");

  // swiglu: out = silu(gate) * up over [gate | up].
  clsa::Tensor half = clsa::Tensor::empty({rows, width / 2}, clsa::DType::f32);
  ops.swiglu(x.view(), half.view());
  expected.clear();
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < width / 2; ++i) {
      const double gate = x_values[static_cast<std::size_t>(r * width + i)];
      const double up = x_values[static_cast<std::size_t>(r * width + width / 2 + i)];
      expected.push_back(gate / (1.0 + std::exp(-gate)) * up);
    }
  }
  expect(worst_error(contents(half), expected) < 1e-5, "swiglu");

  // add, copy
  clsa::Tensor sum = host_tensor({rows, width}, x_values);
  ops.add(sum.view(), x.view());
  expected.clear();
  for (float value : x_values) expected.push_back(2.0 * value);
  expect(worst_error(contents(sum), expected) == 0.0, "add");
  clsa::Tensor copied = clsa::Tensor::empty({rows, width}, clsa::DType::f32);
  ops.copy(x.view(), copied.view());
  expect(contents(copied) == x_values, "copy");

  // embed: rows of the table, scaled.
  const std::vector<float> table_values = random_values(rng, 10 * width);
  const clsa::Tensor table = host_tensor({10, width}, table_values);
  clsa::Tensor tokens = clsa::Tensor::empty({3}, clsa::DType::i32);
  const std::int32_t token_values[] = {7, 0, 7};
  ops.upload(tokens.view(), token_values);
  ops.embed(tokens.view(), table.view(), 2.0f, out.view());
  expected.clear();
  for (std::int32_t token : token_values) {
    for (int i = 0; i < width; ++i) expected.push_back(2.0 * table_values[static_cast<std::size_t>(token * width + i)]);
  }
  expect(worst_error(contents(out), expected) == 0.0, "embed");

  // rope: interleaved pairs, at positions up to 300000 (the angle must not lose precision).
  const int heads = 2, head_dim = 64;
  const std::vector<float> q_values = random_values(rng, rows * heads * head_dim);
  clsa::Tensor q = host_tensor({rows, heads, head_dim}, q_values);
  clsa::Tensor positions = clsa::Tensor::empty({rows}, clsa::DType::i32);
  const std::int32_t position_values[] = {0, 17, 300000};
  ops.upload(positions.view(), position_values);
  const float theta = 10000.0f;
  ops.rope(q.view(), positions.view(), theta);
  expected.clear();
  for (int r = 0; r < rows; ++r) {
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < head_dim / 2; ++i) {
        const double angle = position_values[r] * std::pow(static_cast<double>(theta), -2.0 * i / head_dim);
        const std::size_t at = static_cast<std::size_t>((r * heads + h) * head_dim + 2 * i);
        expected.push_back(q_values[at] * std::cos(angle) - q_values[at + 1] * std::sin(angle));
        expected.push_back(q_values[at] * std::sin(angle) + q_values[at + 1] * std::cos(angle));
      }
    }
  }
  expect(worst_error(contents(q), expected) < 1e-5, "rope");
}

/// Window attention over calls that prefill in chunks (longer than the window, so the ring wraps
/// within a call) and decode two sequences in different slots, each call against a naive attention
/// over the sequence's whole history.
void test_window_attention(yoco::CpuDecoderOps& ops, std::mt19937_64& rng) {
  const int q_heads = 4, kv_heads = 2, head_dim = 64, window = 16, slots = 3, layers = 2, layer = 1;
  yoco::WindowKvCache cache = ops.allocate_window_cache(layers, slots, window, kv_heads, head_dim);
  struct History {
    int slot;
    std::vector<float> k, v;  // [position][kv_heads][head_dim]
  };
  std::vector<History> histories = {{2, {}, {}}, {0, {}, {}}};
  // (sequence, tokens) of each call: prefill chunks, then decode steps of both sequences together.
  const std::vector<std::vector<std::pair<int, int>>> calls = {{{0, 37}},        {{0, 20}},        {{1, 5}},
                                                               {{0, 1}, {1, 1}}, {{0, 1}, {1, 1}}, {{1, 1}, {0, 1}}};
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  const int group = q_heads / kv_heads;
  for (const std::vector<std::pair<int, int>>& call : calls) {
    const int batch = static_cast<int>(call.size());
    const int tokens = call[0].second;
    const std::size_t q_count = static_cast<std::size_t>(batch) * tokens * q_heads * head_dim;
    const std::size_t kv_count = static_cast<std::size_t>(batch) * tokens * kv_heads * head_dim;
    const std::vector<float> q_values = random_values(rng, q_count);
    const std::vector<float> k_values = random_values(rng, kv_count);
    const std::vector<float> v_values = random_values(rng, kv_count);
    const clsa::Tensor q = host_tensor({batch, tokens, q_heads, head_dim}, q_values);
    const clsa::Tensor k = host_tensor({batch, tokens, kv_heads, head_dim}, k_values);
    const clsa::Tensor v = host_tensor({batch, tokens, kv_heads, head_dim}, v_values);
    clsa::Tensor out = clsa::Tensor::empty({batch, tokens, q_heads, head_dim}, clsa::DType::f32);
    clsa::Tensor slot_tensor = clsa::Tensor::empty({batch}, clsa::DType::i32);
    clsa::Tensor start_tensor = clsa::Tensor::empty({batch}, clsa::DType::i32);
    std::vector<std::int32_t> slot_values, start_values;
    for (const auto& [sequence, count] : call) {
      History& history = histories[static_cast<std::size_t>(sequence)];
      slot_values.push_back(history.slot);
      start_values.push_back(static_cast<std::int32_t>(history.k.size() / (kv_heads * head_dim)));
    }
    ops.upload(slot_tensor.view(), slot_values.data());
    ops.upload(start_tensor.view(), start_values.data());
    ops.window_attention(cache, layer, slot_tensor.view(), start_tensor.view(), q.view(), k.view(), v.view(),
                         out.view());
    std::vector<double> expected;
    for (int b = 0; b < batch; ++b) {
      History& history = histories[static_cast<std::size_t>(call[static_cast<std::size_t>(b)].first)];
      const std::size_t row = static_cast<std::size_t>(kv_heads) * head_dim;
      const std::size_t first_new = static_cast<std::size_t>(b) * tokens * row;
      history.k.insert(history.k.end(), k_values.begin() + static_cast<std::ptrdiff_t>(first_new),
                       k_values.begin() + static_cast<std::ptrdiff_t>(first_new + tokens * row));
      history.v.insert(history.v.end(), v_values.begin() + static_cast<std::ptrdiff_t>(first_new),
                       v_values.begin() + static_cast<std::ptrdiff_t>(first_new + tokens * row));
      for (int t = 0; t < tokens; ++t) {
        const int position = start_values[static_cast<std::size_t>(b)] + t;
        const int first = std::max(0, position - window + 1);
        for (int h = 0; h < q_heads; ++h) {
          const float* query = q_values.data() + ((static_cast<std::size_t>(b) * tokens + t) * q_heads + h) * head_dim;
          const int kv = h / group;
          std::vector<double> weights;
          double largest = -1e300, total = 0.0;
          for (int p = first; p <= position; ++p) {
            double dot = 0.0;
            for (int d = 0; d < head_dim; ++d) dot += query[d] * history.k[p * row + kv * head_dim + d];
            weights.push_back(dot * scale);
            largest = std::max(largest, dot * scale);
          }
          for (double& w : weights) total += (w = std::exp(w - largest));
          for (int d = 0; d < head_dim; ++d) {
            double sum = 0.0;
            for (int p = first; p <= position; ++p)
              sum += weights[static_cast<std::size_t>(p - first)] * history.v[p * row + kv * head_dim + d];
            expected.push_back(sum / total);
          }
        }
      }
    }
    expect(worst_error(contents(out), expected) < 1e-5,
           "window_attention (a call of " + std::to_string(batch) + " x " + std::to_string(tokens) + " tokens)");
  }
}

/// Decoding steps of every variant at a small shape allocate nothing of their own once warm:
/// what they allocate is libclsa's SharedKVCache::append (which copies the sequence's page list,
/// src/cache.cpp), at most once per append.
void test_step_allocations(yoco::CpuDecoderOps& ops) {
#if YOCO_TEST_COUNTS_ALLOCATIONS
  yoco::ModelShape shape = yoco::ModelShape::small();
  const yoco::ModelWeights weights = yoco::make_weights(shape, 3, true, ops);
  yoco::DecoderLimits limits;
  limits.max_batch = 3;
  limits.max_length = 400;
  limits.prefill_chunk = 64;
  yoco::RoutingOptions routing;
  routing.top_k = 48;
  for (yoco::Variant variant : {yoco::Variant::clsa, yoco::Variant::yoco_dense, yoco::Variant::standard}) {
    yoco::Decoder decoder(variant, weights, ops, limits, routing);
    std::vector<int> slots;
    for (int i = 0; i < 3; ++i) slots.push_back(decoder.join(std::vector<std::int32_t>(100 + 30 * i, 5 + i)));
    const std::vector<std::int32_t> tokens = {1, 2, 3};
    decoder.step(slots, tokens);  // warm: every buffer, block and table at its size
    decoder.step({slots[0]}, {4});
    const int steps = 8;
    allocations = 0;
    counting = true;
    for (int step = 0; step < steps; ++step) decoder.step(slots, tokens);
    counting = false;
    const long appends = steps * 3L * (variant == yoco::Variant::standard ? shape.layers : 1);
    std::printf("%s: %ld allocations in %d steps of 3 sequences (%ld cache appends)\n", yoco::variant_name(variant),
                allocations.load(), steps, appends);
    expect(allocations.load() <= appends,
           std::string(yoco::variant_name(variant)) + ": the step allocates beyond libclsa's appends");
  }
#else
  (void)ops;
  std::printf("step allocations: not counted in this build (AddressSanitizer or not glibc)\n");
#endif
}

}  // namespace

int main() {
  try {
    yoco::CpuDecoderOps ops;
    std::mt19937_64 rng(11);
    test_matmul(ops, rng);
    test_elementwise(ops, rng);
    test_window_attention(ops, rng);
    test_step_allocations(ops);
  } catch (const clsa::Error& error) {
    std::printf("FAILED: error (%s): %s\n", clsa::error_code_name(error.code()), error.what());
    return 1;
  }
  return yoco_test::exit_code();
}
