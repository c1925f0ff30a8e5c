// yoco_decoder_cuda_test: the CUDA DecoderOps against the CPU ops (which yoco_decoder_test holds
// to float64 references) on the same inputs, rounded to bf16 so that both sides read the same
// values; then whole decoding steps on CUDA: replayed from CUDA graphs against the same steps
// launched eagerly (bitwise), and against the CPU decoder (bf16 against f32, loosely). Exits 77
// (CTest's SKIPPED) where no CUDA device is present, 1 on the first failed expectation's report
// after running everything.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cpu_decoder_ops.hpp"
#include "cuda_decoder_ops.hpp"
#include "cuda_support.hpp"
#include "decoder.hpp"
#include "model.hpp"
#include "test_checks.hpp"

namespace {

using yoco_test::expect;
using yoco_test::worst_error;

/// Random values that bf16 holds exactly (both backends then read the same inputs).
std::vector<float> random_values(std::mt19937_64& rng, std::size_t count) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(count);
  for (float& x : values) x = clsa::to_float(clsa::to_bfloat16(normal(rng)));
  return values;
}

/// The same values on both backends: a host f32 tensor and a device bf16 tensor of one shape.
struct Pair {
  clsa::Tensor cpu, gpu;
};

Pair make_pair(yoco::CudaDecoderOps& gpu, std::initializer_list<std::int64_t> shape, const std::vector<float>& values) {
  Pair pair{clsa::Tensor::empty(shape, clsa::DType::f32), gpu.allocate(shape, clsa::DType::bf16)};
  std::copy(values.begin(), values.end(), pair.cpu.data_as<float>());
  gpu.upload(pair.gpu.view(), values.data());
  return pair;
}

Pair make_i32_pair(yoco::CudaDecoderOps& gpu, std::initializer_list<std::int64_t> shape,
                   const std::vector<std::int32_t>& values) {
  Pair pair{clsa::Tensor::empty(shape, clsa::DType::i32), gpu.allocate(shape, clsa::DType::i32)};
  std::copy(values.begin(), values.end(), pair.cpu.data_as<std::int32_t>());
  gpu.upload(pair.gpu.view(), values.data());
  return pair;
}

/// A contiguous tensor as a matrix [numel / last, last].
clsa::TensorView as_matrix(const clsa::TensorView& t) {
  const std::int64_t last = t.size(t.rank() - 1);
  return clsa::TensorView(t.data(), t.dtype(), {t.numel() / last, last}, t.device());
}

std::vector<float> read(yoco::DecoderOps& ops, const clsa::TensorView& view) {
  const clsa::TensorView matrix = view.rank() == 2 ? view : as_matrix(view);
  std::vector<float> values(static_cast<std::size_t>(matrix.size(0) * matrix.size(1)));
  ops.download(matrix, values.data());
  return values;
}

std::vector<float> read_cpu(const clsa::TensorView& view) {
  std::vector<float> values;
  for (std::int64_t r = 0; r < view.size(0); ++r) {
    const float* row = view.data_as<const float>() + r * view.stride(0);
    values.insert(values.end(), row, row + view.size(1));
  }
  return values;
}

constexpr double kOpTolerance = 1e-2;  // bf16 outputs (2^-9 relative) of f32 arithmetic

void test_matmul(yoco::CudaDecoderOps& gpu, yoco::CpuDecoderOps& cpu, std::mt19937_64& rng) {
  // x and out are column slices of wider matrices (row strides 100 and 140), as the decoder's are.
  for (int m : {1, 5, 70}) {
    const int k = 96, n = 130, x_stride = 100, out_stride = 140;
    const Pair x = make_pair(gpu, {m, x_stride}, random_values(rng, static_cast<std::size_t>(m) * x_stride));
    const Pair w = make_pair(gpu, {k, n}, random_values(rng, static_cast<std::size_t>(k) * n));
    const Pair out = make_pair(gpu, {m, out_stride}, std::vector<float>(static_cast<std::size_t>(m) * out_stride));
    cpu.matmul(yoco::columns_of(x.cpu.view(), 0, k), w.cpu.view(), yoco::columns_of(out.cpu.view(), 0, n));
    gpu.matmul(yoco::columns_of(x.gpu.view(), 0, k), w.gpu.view(), yoco::columns_of(out.gpu.view(), 0, n));
    const double error = worst_error(read(gpu, yoco::columns_of(out.gpu.view(), 0, n)),
                                     read_cpu(yoco::columns_of(out.cpu.view(), 0, n)));
    expect(error < kOpTolerance, "matmul M=" + std::to_string(m) + ": error " + std::to_string(error));
  }
}

void test_elementwise(yoco::CudaDecoderOps& gpu, yoco::CpuDecoderOps& cpu, std::mt19937_64& rng) {
  const int rows = 3, width = 48;
  const std::vector<float> x_values = random_values(rng, rows * width);
  const Pair x = make_pair(gpu, {rows, width}, x_values);
  const Pair gain = make_pair(gpu, {width}, random_values(rng, width));
  Pair out = make_pair(gpu, {rows, width}, std::vector<float>(rows * width));
  cpu.rms_norm(x.cpu.view(), gain.cpu.view(), 1e-5f, out.cpu.view());
  gpu.rms_norm(x.gpu.view(), gain.gpu.view(), 1e-5f, out.gpu.view());
  expect(worst_error(read(gpu, out.gpu.view()), read_cpu(out.cpu.view())) < kOpTolerance, "rms_norm");

  Pair half = make_pair(gpu, {rows, width / 2}, std::vector<float>(rows * width / 2));
  cpu.swiglu(x.cpu.view(), half.cpu.view());
  gpu.swiglu(x.gpu.view(), half.gpu.view());
  expect(worst_error(read(gpu, half.gpu.view()), read_cpu(half.cpu.view())) < kOpTolerance, "swiglu");

  Pair sum = make_pair(gpu, {rows, width}, x_values);
  const Pair y = make_pair(gpu, {rows, width}, random_values(rng, rows * width));
  cpu.add(sum.cpu.view(), y.cpu.view());
  gpu.add(sum.gpu.view(), y.gpu.view());
  expect(worst_error(read(gpu, sum.gpu.view()), read_cpu(sum.cpu.view())) < kOpTolerance, "add");

  Pair copied = make_pair(gpu, {rows, width}, std::vector<float>(rows * width));
  gpu.copy(x.gpu.view(), copied.gpu.view());
  expect(read(gpu, copied.gpu.view()) == x_values, "copy");
  gpu.fill_zero(copied.gpu.view());
  expect(read(gpu, copied.gpu.view()) == std::vector<float>(rows * width, 0.0f), "fill_zero");

  const Pair table = make_pair(gpu, {10, width}, random_values(rng, 10 * width));
  const Pair tokens = make_i32_pair(gpu, {3}, {7, 0, 7});
  cpu.embed(tokens.cpu.view(), table.cpu.view(), 2.0f, out.cpu.view());
  gpu.embed(tokens.gpu.view(), table.gpu.view(), 2.0f, out.gpu.view());
  expect(worst_error(read(gpu, out.gpu.view()), read_cpu(out.cpu.view())) < kOpTolerance, "embed");

  // rope at positions up to 300000 (the angle in double on both sides), on a strided view.
  const int heads = 2, head_dim = 64, row = 160;
  const Pair q = make_pair(gpu, {rows, row}, random_values(rng, rows * row));
  const Pair positions = make_i32_pair(gpu, {rows}, {0, 17, 300000});
  cpu.rope(yoco::as_row_heads(yoco::columns_of(q.cpu.view(), 0, heads * head_dim), heads, head_dim),
           positions.cpu.view(), 10000.0f);
  gpu.rope(yoco::as_row_heads(yoco::columns_of(q.gpu.view(), 0, heads * head_dim), heads, head_dim),
           positions.gpu.view(), 10000.0f);
  expect(worst_error(read(gpu, q.gpu.view()), read_cpu(q.cpu.view())) < kOpTolerance, "rope");
}

/// Window attention over calls that prefill in chunks longer than the window (the ring wraps
/// within a call) and decode two sequences in different slots: the CUDA kernel against the CPU op
/// on every call, both keeping their own rings.
void test_window_attention(yoco::CudaDecoderOps& gpu, yoco::CpuDecoderOps& cpu, std::mt19937_64& rng, int q_heads,
                           int kv_heads, int head_dim, int window) {
  const int slots = 3, layers = 2, layer = 1;
  yoco::WindowKvCache cpu_cache = cpu.allocate_window_cache(layers, slots, window, kv_heads, head_dim);
  yoco::WindowKvCache gpu_cache = gpu.allocate_window_cache(layers, slots, window, kv_heads, head_dim);
  cpu.fill_zero(cpu_cache.k.view());
  cpu.fill_zero(cpu_cache.v.view());
  gpu.fill_zero(gpu_cache.k.view());
  gpu.fill_zero(gpu_cache.v.view());
  const int slot_of[2] = {2, 0};
  int length[2] = {0, 0};
  const std::vector<std::vector<std::pair<int, int>>> calls = {{{0, 37}},        {{0, 20}},        {{1, 5}},
                                                               {{0, 1}, {1, 1}}, {{0, 1}, {1, 1}}, {{1, 1}, {0, 1}}};
  for (const std::vector<std::pair<int, int>>& call : calls) {
    const int batch = static_cast<int>(call.size()), tokens = call[0].second;
    const std::size_t q_count = static_cast<std::size_t>(batch) * tokens * q_heads * head_dim;
    const std::size_t kv_count = static_cast<std::size_t>(batch) * tokens * kv_heads * head_dim;
    const Pair q = make_pair(gpu, {batch, tokens, q_heads, head_dim}, random_values(rng, q_count));
    const Pair k = make_pair(gpu, {batch, tokens, kv_heads, head_dim}, random_values(rng, kv_count));
    const Pair v = make_pair(gpu, {batch, tokens, kv_heads, head_dim}, random_values(rng, kv_count));
    Pair out = make_pair(gpu, {batch, tokens, q_heads, head_dim}, std::vector<float>(q_count));
    std::vector<std::int32_t> slot_values, start_values;
    for (const auto& [sequence, count] : call) {
      slot_values.push_back(slot_of[sequence]);
      start_values.push_back(length[sequence]);
      length[sequence] += count;
    }
    const Pair slot_tensor = make_i32_pair(gpu, {batch}, slot_values);
    const Pair start_tensor = make_i32_pair(gpu, {batch}, start_values);
    cpu.window_attention(cpu_cache, layer, slot_tensor.cpu.view(), start_tensor.cpu.view(), q.cpu.view(), k.cpu.view(),
                         v.cpu.view(), out.cpu.view());
    gpu.window_attention(gpu_cache, layer, slot_tensor.gpu.view(), start_tensor.gpu.view(), q.gpu.view(), k.gpu.view(),
                         v.gpu.view(), out.gpu.view());
    const double error = worst_error(read(gpu, out.gpu.view()), read_cpu(as_matrix(out.cpu.view())));
    expect(error < kOpTolerance, "window_attention (" + std::to_string(q_heads) + "/" + std::to_string(kv_heads) +
                                     " heads of " + std::to_string(head_dim) + ", window " + std::to_string(window) +
                                     ", a call of " + std::to_string(batch) + " x " + std::to_string(tokens) +
                                     " tokens): error " + std::to_string(error));
  }
  // The rings must hold the same last `window` tokens.
  expect(worst_error(read(gpu, gpu_cache.k.view()), read_cpu(as_matrix(cpu_cache.k.view()))) == 0.0 &&
             worst_error(read(gpu, gpu_cache.v.view()), read_cpu(as_matrix(cpu_cache.v.view()))) == 0.0,
         "window_attention: the rings differ");
}

/// Relative error of two logits rows (||a - b|| / ||b||).
double row_error(const float* got, const float* expected, int count) {
  double difference = 0.0, norm = 0.0;
  for (int i = 0; i < count; ++i) {
    difference += (static_cast<double>(got[i]) - expected[i]) * (static_cast<double>(got[i]) - expected[i]);
    norm += static_cast<double>(expected[i]) * expected[i];
  }
  return std::sqrt(difference / norm);
}

/// Decoding on CUDA: graph replays equal eager launches bitwise (steps of 3 sequences and of 2,
/// contexts growing, the shared cache's tables refilled between replays), and the CUDA decoder
/// (bf16) follows the CPU decoder (f32) within a loose bound, from prompts and from synthetic
/// contexts (join_synthetic, what the table runs).
void test_decoding(yoco::CudaDecoderOps& gpu, yoco::CpuDecoderOps& cpu) {
  const yoco::ModelShape shape = yoco::ModelShape::small();
  const yoco::ModelWeights gpu_weights = yoco::make_weights(shape, 5, true, gpu);
  const yoco::ModelWeights cpu_weights = yoco::make_weights(shape, 5, true, cpu);
  yoco::DecoderLimits limits;
  limits.max_batch = 3;
  limits.max_length = 400;
  limits.prefill_chunk = 64;
  yoco::RoutingOptions routing;
  routing.top_k = 48;
  constexpr double kBackendTolerance = 0.1;  // the whole model in bf16 against f32
  for (yoco::Variant variant : {yoco::Variant::clsa, yoco::Variant::yoco_dense, yoco::Variant::standard}) {
    const std::string name = yoco::variant_name(variant);
    yoco::DecoderLimits graph_limits = limits;
    graph_limits.graphs = true;
    yoco::Decoder replayed(variant, gpu_weights, gpu, graph_limits, routing);
    yoco::Decoder eager(variant, gpu_weights, gpu, limits, routing);
    yoco::Decoder reference(variant, cpu_weights, cpu, limits, routing);
    std::vector<int> slots;
    for (int i = 0; i < 3; ++i) {
      const std::vector<std::int32_t> prompt(static_cast<std::size_t>(100 + 30 * i), 5 + i);
      slots.push_back(replayed.join(prompt));
      const int eager_slot = eager.join(prompt), reference_slot = reference.join(prompt);
      expect(eager_slot == slots.back() && reference_slot == slots.back(), name + ": slots differ");
    }
    const std::vector<std::vector<int>> batches = {{0, 1, 2}, {0, 1, 2}, {2, 0}, {0, 1, 2}, {2, 0}, {0, 1, 2}};
    double worst = 0.0;
    bool bitwise = true;
    for (std::size_t s = 0; s < batches.size(); ++s) {
      std::vector<int> step_slots;
      std::vector<std::int32_t> tokens;
      for (int b : batches[s]) {
        step_slots.push_back(slots[static_cast<std::size_t>(b)]);
        tokens.push_back(static_cast<std::int32_t>((37 * (s + 1) + 11 * static_cast<std::size_t>(b)) % 1024));
      }
      replayed.step(step_slots, tokens);
      eager.step(step_slots, tokens);
      reference.step(step_slots, tokens);
      const int rows = static_cast<int>(step_slots.size());
      std::vector<float> a(static_cast<std::size_t>(rows) * shape.vocab), b(a.size()), c(a.size());
      gpu.download(replayed.logits(rows), a.data());
      gpu.download(eager.logits(rows), b.data());
      cpu.download(reference.logits(rows), c.data());
      bitwise = bitwise && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
      for (int r = 0; r < rows; ++r) {
        const std::size_t at = static_cast<std::size_t>(r) * shape.vocab;
        worst = std::max(worst, row_error(b.data() + at, c.data() + at, shape.vocab));
      }
    }
    replayed.check_status();
    expect(bitwise, name + ": logits of graph replays differ from eager launches");
    expect(replayed.graphs_captured() > 0 && replayed.graph_replays() > replayed.graphs_captured(),
           name + ": no graph was replayed");
    expect(worst < kBackendTolerance, name + ": CUDA logits against the CPU decoder's: relative error " +
                                          std::to_string(worst) + " (bound " + std::to_string(kBackendTolerance) + ")");
    std::printf("%s: %d graphs captured, %lld replays; CUDA vs CPU logits: max relative error %.2e\n", name.c_str(),
                replayed.graphs_captured(), static_cast<long long>(replayed.graph_replays()), worst);

    // Synthetic contexts: the same K/V values on both backends (the window rings start at zero).
    yoco::Decoder synthetic(variant, gpu_weights, gpu, graph_limits, routing);
    yoco::Decoder synthetic_reference(variant, cpu_weights, cpu, limits, routing);
    std::vector<int> synthetic_slots;
    for (std::int64_t length : {200, 250}) {
      synthetic_slots.push_back(synthetic.join_synthetic(length));
      expect(synthetic_reference.join_synthetic(length) == synthetic_slots.back(), name + ": synthetic slots differ");
    }
    double synthetic_worst = 0.0;
    for (int s = 0; s < 3; ++s) {
      const std::vector<std::int32_t> tokens = {static_cast<std::int32_t>(3 + s), static_cast<std::int32_t>(900 - s)};
      synthetic.step(synthetic_slots, tokens);
      synthetic_reference.step(synthetic_slots, tokens);
      std::vector<float> a(static_cast<std::size_t>(2) * shape.vocab), c(a.size());
      gpu.download(synthetic.logits(2), a.data());
      cpu.download(synthetic_reference.logits(2), c.data());
      for (int r = 0; r < 2; ++r) {
        const std::size_t at = static_cast<std::size_t>(r) * shape.vocab;
        synthetic_worst = std::max(synthetic_worst, row_error(a.data() + at, c.data() + at, shape.vocab));
      }
    }
    expect(synthetic.length(synthetic_slots[0]) == 203, name + ": a synthetic context's length");
    expect(synthetic_worst < kBackendTolerance,
           name + ": synthetic contexts, CUDA against CPU: relative error " + std::to_string(synthetic_worst));
  }
}

}  // namespace

int main() {
  if (clsa::cuda_device_count() == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  try {
    const cuda_support::OwnedStream lane(clsa::Device::cuda(0));
    yoco::CudaDecoderOps gpu(lane.stream());
    yoco::CpuDecoderOps cpu;
    std::mt19937_64 rng(17);
    test_matmul(gpu, cpu, rng);
    test_elementwise(gpu, cpu, rng);
    test_window_attention(gpu, cpu, rng, 4, 2, 64, 16);
    test_window_attention(gpu, cpu, rng, 24, 8, 128, 24);  // the 3B shape's heads
    test_decoding(gpu, cpu);
  } catch (const clsa::Error& error) {
    std::printf("FAILED: error (%s): %s\n", clsa::error_code_name(error.code()), error.what());
    return 1;
  }
  return yoco_test::exit_code();
}
