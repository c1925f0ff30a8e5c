#include "cuda_decoder_ops.hpp"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "clsa/numeric.hpp"
#include "cuda_decoder_kernels.hpp"

namespace yoco {

namespace {

constexpr const char* kOps = "CudaDecoderOps";
constexpr std::size_t kBlasWorkspaceBytes = std::size_t{32} << 20;  // cuBLAS's advice for Hopper
constexpr int kSmallStagingSlots = 32;                              // a step uploads 4 small arrays
constexpr std::size_t kSmallStagingBytes = std::size_t{64} << 10;
constexpr int kLargeStagingSlots = 2;  // weights: convert one while the other copies
constexpr std::size_t kLargeStagingBytes = std::size_t{32} << 20;

[[noreturn]] void fail(clsa::ErrorCode code, const std::string& message) {
  throw clsa::Error(code, std::string(kOps) + "::" + message);
}

void check_cuda(cudaError_t status, const char* call) {
  if (status != cudaSuccess) fail(clsa::ErrorCode::cuda_error, std::string(call) + ": " + cudaGetErrorString(status));
}

void check_blas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    fail(clsa::ErrorCode::cuda_error, std::string(call) + ": " + cublasGetStatusString(status));
  }
}

cuda_kernels::bf16_bits* bits(const clsa::TensorView& view) {
  return static_cast<cuda_kernels::bf16_bits*>(view.data());
}

/// A [B, T, H, D] view's data and its (b, t, h) strides, into a kernel argument's four fields.
template <class Bits>
void heads_view(const clsa::TensorView& view, Bits*& data, std::int64_t& stride_b, std::int64_t& stride_t,
                std::int64_t& stride_h) {
  data = bits(view);
  stride_b = view.stride(0);
  stride_t = view.stride(1);
  stride_h = view.stride(2);
}

/// One pinned host buffer that an upload converts into, and the event after the copy out of it.
struct Staging {
  void* host = nullptr;
  std::size_t bytes = 0;
  cudaEvent_t copied = nullptr;
  bool pending = false;  // a copy out of it was enqueued and `copied` recorded after it
};

}  // namespace

struct CudaDecoderOps::State {
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  void* blas_workspace = nullptr;
  float* window_partials = nullptr;  // the window attention's split results
  std::vector<Staging> small, large;
  int next_small = 0, next_large = 0;
  Staging download;

  /// A staging buffer of at least `bytes` (<= kLargeStagingBytes), once the copy out of it is done.
  Staging& acquire(std::size_t bytes) {
    Staging& slot = bytes <= kSmallStagingBytes ? small[static_cast<std::size_t>(next_small++ % kSmallStagingSlots)]
                                                : large[static_cast<std::size_t>(next_large++ % kLargeStagingSlots)];
    if (slot.pending) check_cuda(cudaEventSynchronize(slot.copied), "cudaEventSynchronize (staging)");
    slot.pending = false;
    return slot;
  }
  /// Copies `bytes` of `slot` to `target` on the stream and marks the slot busy until then.
  void send(Staging& slot, void* target, std::size_t bytes) {
    check_cuda(cudaMemcpyAsync(target, slot.host, bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync (upload)");
    check_cuda(cudaEventRecord(slot.copied, stream), "cudaEventRecord (staging)");
    slot.pending = true;
  }
  /// Uploads `count` values to `target` (contiguous, on the device) through the staging buffers,
  /// chunk by chunk, each value stored as `convert(value)` of type Staged.
  template <class Staged, class Source, class Convert>
  void upload(void* target, const Source* values, std::int64_t count, Convert convert) {
    const std::int64_t per_chunk = static_cast<std::int64_t>(kLargeStagingBytes / sizeof(Staged));
    for (std::int64_t done = 0; done < count; done += per_chunk) {
      const std::int64_t n = std::min(per_chunk, count - done);
      const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(Staged);
      Staging& slot = acquire(bytes);
      auto* staged = static_cast<Staged*>(slot.host);
      for (std::int64_t i = 0; i < n; ++i) staged[i] = convert(values[done + i]);
      send(slot, static_cast<char*>(target) + static_cast<std::size_t>(done) * sizeof(Staged), bytes);
    }
  }
};

CudaDecoderOps::CudaDecoderOps(clsa::Stream stream, int device) : state_(std::make_unique<State>()) {
  if (clsa::cuda_device_count() <= device) {
    fail(clsa::ErrorCode::unsupported, "CudaDecoderOps: no CUDA device " + std::to_string(device) + " (" +
                                           std::to_string(clsa::cuda_device_count()) + " present)");
  }
  State& s = *state_;
  s.device = device;
  s.stream = stream.cuda();
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  auto make_staging = [](std::size_t bytes) {
    Staging slot;
    slot.bytes = bytes;
    check_cuda(cudaMallocHost(&slot.host, bytes), "cudaMallocHost (staging)");
    check_cuda(cudaEventCreateWithFlags(&slot.copied, cudaEventDisableTiming), "cudaEventCreate (staging)");
    return slot;
  };
  for (int i = 0; i < kSmallStagingSlots; ++i) s.small.push_back(make_staging(kSmallStagingBytes));
  for (int i = 0; i < kLargeStagingSlots; ++i) s.large.push_back(make_staging(kLargeStagingBytes));
  s.download = make_staging(kLargeStagingBytes);
  check_blas(cublasCreate(&s.blas), "cublasCreate");
  check_blas(cublasSetStream(s.blas, s.stream), "cublasSetStream");
  check_cuda(cudaMalloc(&s.blas_workspace, kBlasWorkspaceBytes), "cudaMalloc (cuBLAS workspace)");
  check_blas(cublasSetWorkspace(s.blas, s.blas_workspace, kBlasWorkspaceBytes), "cublasSetWorkspace");
  check_cuda(cudaMalloc(reinterpret_cast<void**>(&s.window_partials),
                        static_cast<std::size_t>(cuda_kernels::window_partial_floats()) * sizeof(float)),
             "cudaMalloc (window attention partials)");
}

CudaDecoderOps::~CudaDecoderOps() {
  State& s = *state_;
  (void)cudaStreamSynchronize(s.stream);
  if (s.blas != nullptr) (void)cublasDestroy(s.blas);
  if (s.blas_workspace != nullptr) (void)cudaFree(s.blas_workspace);
  if (s.window_partials != nullptr) (void)cudaFree(s.window_partials);
  auto release = [](Staging& slot) {
    if (slot.copied != nullptr) (void)cudaEventDestroy(slot.copied);
    if (slot.host != nullptr) (void)cudaFreeHost(slot.host);
  };
  for (Staging& slot : s.small) release(slot);
  for (Staging& slot : s.large) release(slot);
  release(s.download);
}

clsa::Device CudaDecoderOps::device() const {
  return clsa::Device::cuda(state_->device);
}

clsa::Stream CudaDecoderOps::stream() const {
  return clsa::Stream(state_->stream);
}

void CudaDecoderOps::device_memory(std::size_t& free_bytes, std::size_t& total_bytes) const {
  check_cuda(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
}

void CudaDecoderOps::forget_failed_allocation() {
  (void)cudaGetLastError();
}

void CudaDecoderOps::upload(const clsa::TensorView& target, const float* values) {
  if (!target.is_contiguous()) fail(clsa::ErrorCode::shape_mismatch, "upload: target " + target.describe());
  check_operand(kOps, "upload", "target", target, target.rank(), clsa::DType::bf16, device());
  state_->upload<clsa::bfloat16>(target.data(), values, target.numel(), [](float x) { return clsa::to_bfloat16(x); });
}

void CudaDecoderOps::upload(const clsa::TensorView& target, const std::int32_t* values) {
  if (!target.is_contiguous()) fail(clsa::ErrorCode::shape_mismatch, "upload: target " + target.describe());
  check_operand(kOps, "upload", "target", target, target.rank(), clsa::DType::i32, device());
  state_->upload<std::int32_t>(target.data(), values, target.numel(), [](std::int32_t x) { return x; });
}

void CudaDecoderOps::download(const clsa::TensorView& source, float* values) {
  check_operand(kOps, "download", "source", source, 2, clsa::DType::bf16, device());
  State& s = *state_;
  const std::int64_t rows = source.size(0), cols = source.size(1);
  if (rows == 0 || cols == 0) return;
  const std::size_t row_bytes = static_cast<std::size_t>(cols) * sizeof(clsa::bfloat16);
  if (row_bytes > s.download.bytes) fail(clsa::ErrorCode::shape_mismatch, "download: rows of " + source.describe());
  const std::int64_t rows_per_chunk = static_cast<std::int64_t>(s.download.bytes / row_bytes);
  const auto* staged = static_cast<const clsa::bfloat16*>(s.download.host);
  for (std::int64_t first = 0; first < rows; first += rows_per_chunk) {
    const std::int64_t n = std::min(rows_per_chunk, rows - first);
    check_cuda(cudaMemcpy2DAsync(s.download.host, row_bytes, bits(source) + first * source.stride(0),
                                 static_cast<std::size_t>(source.stride(0)) * sizeof(clsa::bfloat16), row_bytes,
                                 static_cast<std::size_t>(n), cudaMemcpyDeviceToHost, s.stream),
               "cudaMemcpy2DAsync (download)");
    check_cuda(cudaStreamSynchronize(s.stream), "cudaStreamSynchronize (download)");
    for (std::int64_t i = 0; i < n * cols; ++i) values[first * cols + i] = clsa::to_float(staged[i]);
  }
}

void CudaDecoderOps::embed(const clsa::TensorView& tokens, const clsa::TensorView& table, float scale,
                           const clsa::TensorView& out) {
  check_operand(kOps, "embed", "tokens", tokens, 1, clsa::DType::i32, device());
  check_operand(kOps, "embed", "table", table, 2, dtype(), device());
  check_operand(kOps, "embed", "out", out, 2, dtype(), device());
  check_extent(kOps, "embed", "out", out, 0, tokens.size(0));
  check_extent(kOps, "embed", "out", out, 1, table.size(1));
  if (!tokens.is_contiguous()) fail(clsa::ErrorCode::shape_mismatch, "embed: tokens " + tokens.describe());
  cuda_kernels::embed(tokens.data_as<const std::int32_t>(), tokens.size(0), bits(table), table.stride(0), table.size(0),
                      table.size(1), scale, bits(out), out.stride(0), state_->stream);
}

void CudaDecoderOps::matmul(const clsa::TensorView& x, const clsa::TensorView& w, const clsa::TensorView& out) {
  check_operand(kOps, "matmul", "x", x, 2, dtype(), device());
  check_operand(kOps, "matmul", "w", w, 2, dtype(), device());
  check_operand(kOps, "matmul", "out", out, 2, dtype(), device());
  check_extent(kOps, "matmul", "w", w, 0, x.size(1));
  check_extent(kOps, "matmul", "out", out, 0, x.size(0));
  check_extent(kOps, "matmul", "out", out, 1, w.size(1));
  const std::int64_t m = x.size(0), n = w.size(1), k = x.size(1);
  if (m == 0 || n == 0) return;
  // Row-major out[m, n] = x[m, k] w[k, n] is column-major out^T = w^T x^T: cuBLAS sees w as an
  // n x k matrix (leading dimension w's row stride), x as k x m, out as n x m.
  const float alpha = 1.0f, beta = 0.0f;
  check_blas(cublasGemmEx(state_->blas, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                          static_cast<int>(k), &alpha, w.data(), CUDA_R_16BF, static_cast<int>(w.stride(0)), x.data(),
                          CUDA_R_16BF, static_cast<int>(x.stride(0)), &beta, out.data(), CUDA_R_16BF,
                          static_cast<int>(out.stride(0)), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
             "cublasGemmEx");
}

void CudaDecoderOps::rms_norm(const clsa::TensorView& x, const clsa::TensorView& weight, float eps,
                              const clsa::TensorView& out) {
  check_operand(kOps, "rms_norm", "x", x, 2, dtype(), device());
  check_operand(kOps, "rms_norm", "weight", weight, 1, dtype(), device());
  check_operand(kOps, "rms_norm", "out", out, 2, dtype(), device());
  check_extent(kOps, "rms_norm", "weight", weight, 0, x.size(1));
  check_extent(kOps, "rms_norm", "out", out, 0, x.size(0));
  check_extent(kOps, "rms_norm", "out", out, 1, x.size(1));
  cuda_kernels::rms_norm(bits(x), x.stride(0), bits(weight), eps, bits(out), out.stride(0), x.size(0), x.size(1),
                         state_->stream);
}

void CudaDecoderOps::rope(const clsa::TensorView& x, const clsa::TensorView& positions, float theta) {
  check_operand(kOps, "rope", "x", x, 3, dtype(), device());
  check_operand(kOps, "rope", "positions", positions, 1, clsa::DType::i32, device());
  check_extent(kOps, "rope", "positions", positions, 0, x.size(0));
  if (x.size(2) % 2 != 0) fail(clsa::ErrorCode::shape_mismatch, "rope: odd head_dim in " + x.describe());
  if (!positions.is_contiguous()) fail(clsa::ErrorCode::shape_mismatch, "rope: positions " + positions.describe());
  cuda_kernels::rope(bits(x), x.size(0), static_cast<int>(x.size(1)), static_cast<int>(x.size(2)), x.stride(0),
                     x.stride(1), positions.data_as<const std::int32_t>(), theta, state_->stream);
}

void CudaDecoderOps::swiglu(const clsa::TensorView& gate_up, const clsa::TensorView& out) {
  check_operand(kOps, "swiglu", "gate_up", gate_up, 2, dtype(), device());
  check_operand(kOps, "swiglu", "out", out, 2, dtype(), device());
  check_extent(kOps, "swiglu", "gate_up", gate_up, 1, 2 * out.size(1));
  check_extent(kOps, "swiglu", "out", out, 0, gate_up.size(0));
  cuda_kernels::swiglu(bits(gate_up), gate_up.stride(0), bits(out), out.stride(0), out.size(0), out.size(1),
                       state_->stream);
}

void CudaDecoderOps::add(const clsa::TensorView& x, const clsa::TensorView& y) {
  check_operand(kOps, "add", "x", x, 2, dtype(), device());
  check_operand(kOps, "add", "y", y, 2, dtype(), device());
  check_extent(kOps, "add", "y", y, 0, x.size(0));
  check_extent(kOps, "add", "y", y, 1, x.size(1));
  cuda_kernels::add(bits(x), x.stride(0), bits(y), y.stride(0), x.size(0), x.size(1), state_->stream);
}

void CudaDecoderOps::copy(const clsa::TensorView& source, const clsa::TensorView& target) {
  check_operand(kOps, "copy", "source", source, 2, dtype(), device());
  check_operand(kOps, "copy", "target", target, 2, dtype(), device());
  check_extent(kOps, "copy", "target", target, 0, source.size(0));
  check_extent(kOps, "copy", "target", target, 1, source.size(1));
  if (source.size(0) == 0 || source.size(1) == 0) return;
  const std::size_t element = sizeof(clsa::bfloat16);
  check_cuda(cudaMemcpy2DAsync(target.data(), static_cast<std::size_t>(target.stride(0)) * element, source.data(),
                               static_cast<std::size_t>(source.stride(0)) * element,
                               static_cast<std::size_t>(source.size(1)) * element,
                               static_cast<std::size_t>(source.size(0)), cudaMemcpyDeviceToDevice, state_->stream),
             "cudaMemcpy2DAsync (copy)");
}

void CudaDecoderOps::fill_zero(const clsa::TensorView& target) {
  if (!target.is_contiguous()) fail(clsa::ErrorCode::shape_mismatch, "fill_zero: target " + target.describe());
  check_operand(kOps, "fill_zero", "target", target, target.rank(), target.dtype(), device());
  check_cuda(
      cudaMemsetAsync(target.data(), 0, static_cast<std::size_t>(target.numel()) * clsa::dtype_size(target.dtype()),
                      state_->stream),
      "cudaMemsetAsync (fill_zero)");
}

void CudaDecoderOps::window_attention(WindowKvCache& cache, int layer, const clsa::TensorView& slots,
                                      const clsa::TensorView& starts, const clsa::TensorView& q,
                                      const clsa::TensorView& k, const clsa::TensorView& v,
                                      const clsa::TensorView& out) {
  check_window_attention(kOps, cache, layer, slots, starts, q, k, v, out, dtype(), device());
  const int group = static_cast<int>(q.size(2)) / cache.kv_heads;
  const int head_dim = cache.head_dim;
  if (group > cuda_kernels::kMaxWindowGroup || head_dim % 32 != 0 || 256 % head_dim != 0) {
    fail(clsa::ErrorCode::unsupported, "window_attention: head_dim " + std::to_string(head_dim) + " and " +
                                           std::to_string(group) +
                                           " query heads per kv head; the kernel takes head_dim 32, 64, 128 or 256 "
                                           "and up to " +
                                           std::to_string(cuda_kernels::kMaxWindowGroup) + " query heads per kv head");
  }
  if (!slots.is_contiguous() || !starts.is_contiguous()) {
    fail(clsa::ErrorCode::shape_mismatch, "window_attention: slots and starts must be contiguous");
  }
  cuda_kernels::WindowAttentionArgs a{};
  heads_view(q, a.q, a.q_b, a.q_t, a.q_h);
  heads_view(k, a.k, a.k_b, a.k_t, a.k_h);
  heads_view(v, a.v, a.v_b, a.v_t, a.v_h);
  heads_view(out, a.out, a.o_b, a.o_t, a.o_h);
  a.ring_k = bits(cache.k.view());
  a.ring_v = bits(cache.v.view());
  a.slots = slots.data_as<const std::int32_t>();
  a.starts = starts.data_as<const std::int32_t>();
  a.batch = static_cast<int>(q.size(0));
  a.tokens = static_cast<int>(q.size(1));
  a.q_heads = static_cast<int>(q.size(2));
  a.kv_heads = cache.kv_heads;
  a.head_dim = head_dim;
  a.window = cache.window;
  a.layer = layer;
  a.cache_slots = cache.slots;
  a.scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  a.partials = state_->window_partials;
  a.partial_capacity = cuda_kernels::window_partial_floats();
  cuda_kernels::window_attention(a, state_->stream);
}

}  // namespace yoco
