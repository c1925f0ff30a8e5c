// DecoderOps on the CPU: f32 throughout, Eigen for the products and the window attention.
// The reference for the GPU ops to come (their outputs are to match these within rounding).
#pragma once

#include <Eigen/Core>
#include <cstddef>
#include <vector>

#include "decoder_ops.hpp"

namespace yoco {

/// Eigen's GEMM routine (general_matrix_matrix_product, what `a * b` runs) with packing blocks that
/// persist between products: `noalias() = a * b` allocates them afresh for every product whose
/// blocks exceed EIGEN_STACK_ALLOCATION_LIMIT (128 KiB), i.e. every product of a decoding step.
/// Eigen 3.4's internal blocking interface; the blocks grow to the largest product seen.
class ProductBlocks final : public Eigen::internal::level3_blocking<float, float> {
 public:
  /// Blocking sizes and blocks for out[m, n] = x[m, k] * w[k, n], all row-major (Eigen computes
  /// the transposed, column-major product: rows n, columns m).
  void plan(Eigen::Index m, Eigen::Index n, Eigen::Index k);

 private:
  std::vector<float, Eigen::aligned_allocator<float>> packed_lhs_, packed_rhs_;
};

/// f32 on the host. The ops run on the calling thread (libclsa's components, which the decoder
/// calls in between, run on libclsa's own worker threads). Scratch vectors and product blocks keep
/// their capacity, so once every shape has run once no call allocates.
class CpuDecoderOps final : public DecoderOps {
 public:
  clsa::Backend backend() const override { return clsa::Backend::cpu; }
  clsa::Device device() const override { return clsa::Device::cpu(); }
  clsa::DType dtype() const override { return clsa::DType::f32; }
  clsa::Stream stream() const override { return {}; }

  void upload(const clsa::TensorView& target, const float* values) override;
  void upload(const clsa::TensorView& target, const std::int32_t* values) override;
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

 private:
  ProductBlocks product_blocks_;
  // rope: the inverse frequencies theta^(-2i/head_dim) of the last (theta, head_dim) asked for.
  std::vector<double> inverse_frequencies_;
  float frequencies_theta_ = 0.0f;
  int frequencies_head_dim_ = 0;
  std::vector<float> rotation_cos_, rotation_sin_;
  // window attention: one (query row, kv head)'s gathered keys, values and probabilities.
  std::vector<float> window_keys_, window_values_, window_probabilities_;
};

}  // namespace yoco
