// DecoderOps on a CUDA device: bf16 weights, activations and K/V, f32 accumulation. Matrix
// products by cuBLAS (cublasGemmEx, bf16 in and out, f32 compute), the rest by this example's own
// kernels (cuda_decoder_kernels.cu). Every call is enqueued on the stream given at construction,
// allocates nothing and never waits for the device, so that a decoding step made of these calls
// and libclsa's can be captured in a CUDA graph; only upload and download wait (for their staging
// buffers and their data), and they stay outside the step. Built only with CLSA_WITH_CUDA.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "decoder_ops.hpp"

namespace yoco {

class CudaDecoderOps final : public DecoderOps {
 public:
  /// Ops on CUDA device `device` whose work goes on `stream` (a stream of that device; the
  /// caller keeps it alive). Creates the cuBLAS handle (bound to the stream, with a workspace of
  /// its own so that captured products allocate nothing) and pinned staging buffers.
  /// Error(unsupported) where no CUDA device is present.
  CudaDecoderOps(clsa::Stream stream, int device = 0);
  ~CudaDecoderOps() override;

  clsa::Backend backend() const override { return clsa::Backend::cuda; }
  clsa::Device device() const override;
  clsa::DType dtype() const override { return clsa::DType::bf16; }
  clsa::Stream stream() const override;

  /// Uploads convert on the host into pinned staging (a ring of buffers, each reused once the
  /// copy from it is done) and copy on the stream; they return before the copy has run.
  void upload(const clsa::TensorView& target, const float* values) override;
  void upload(const clsa::TensorView& target, const std::int32_t* values) override;
  /// Waits for the stream, then converts on the host.
  void download(const clsa::TensorView& source, float* values) override;

  void embed(const clsa::TensorView& tokens, const clsa::TensorView& table, float scale,
             const clsa::TensorView& out) override;
  void matmul(const clsa::TensorView& x, const clsa::TensorView& w, const clsa::TensorView& out) override;
  void rms_norm(const clsa::TensorView& x, const clsa::TensorView& weight, float eps,
                const clsa::TensorView& out) override;
  void rope(const clsa::TensorView& x, const clsa::TensorView& positions, float theta) override;
  void swiglu(const clsa::TensorView& gate_up, const clsa::TensorView& out) override;
  void add(const clsa::TensorView& x, const clsa::TensorView& y) override;
  void copy(const clsa::TensorView& source, const clsa::TensorView& target) override;
  void fill_zero(const clsa::TensorView& target) override;
  void window_attention(WindowKvCache& cache, int layer, const clsa::TensorView& slots, const clsa::TensorView& starts,
                        const clsa::TensorView& q, const clsa::TensorView& k, const clsa::TensorView& v,
                        const clsa::TensorView& out) override;

  /// Free and total memory of the device now (cudaMemGetInfo).
  void device_memory(std::size_t& free_bytes, std::size_t& total_bytes) const;
  /// Clears the runtime's last error that a refused allocation (out of memory) leaves behind, so
  /// that the next launch check does not report it (after a batch was tried that does not fit).
  void forget_failed_allocation();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace yoco
