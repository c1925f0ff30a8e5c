#include "cpu_decoder_ops.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

namespace yoco {

namespace {

using RowMajorMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixMap = Eigen::Map<RowMajorMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;
using ConstMatrixMap = Eigen::Map<const RowMajorMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;

[[noreturn]] void fail(clsa::ErrorCode code, const std::string& message) {
  throw clsa::Error(code, "CpuDecoderOps::" + message);
}

/// Checks that `view` is a host tensor of `dtype` and rank `rank` with innermost stride 1.
void check_view(const char* op, const char* name, const clsa::TensorView& view, int rank,
                clsa::DType dtype = clsa::DType::f32) {
  check_operand("CpuDecoderOps", op, name, view, rank, dtype, clsa::Device::cpu());
}

void check_extent(const char* op, const char* name, const clsa::TensorView& view, int dim, std::int64_t expected) {
  yoco::check_extent("CpuDecoderOps", op, name, view, dim, expected);
}

ConstMatrixMap const_matrix(const clsa::TensorView& view) {
  return ConstMatrixMap(view.data_as<const float>(), view.size(0), view.size(1), Eigen::OuterStride<>(view.stride(0)));
}

MatrixMap matrix(const clsa::TensorView& view) {
  return MatrixMap(view.data_as<float>(), view.size(0), view.size(1), Eigen::OuterStride<>(view.stride(0)));
}

}  // namespace

void ProductBlocks::plan(Eigen::Index m, Eigen::Index n, Eigen::Index k) {
  m_mc = n;
  m_nc = m;
  m_kc = k;
  Eigen::internal::computeProductBlockingSizes<float, float, 1, Eigen::Index>(m_kc, m_mc, m_nc, 1);
  const auto lhs_size = static_cast<std::size_t>(m_mc * m_kc), rhs_size = static_cast<std::size_t>(m_kc * m_nc);
  if (packed_lhs_.size() < lhs_size) packed_lhs_.resize(lhs_size);
  if (packed_rhs_.size() < rhs_size) packed_rhs_.resize(rhs_size);
  m_blockA = packed_lhs_.data();
  m_blockB = packed_rhs_.data();
}

void CpuDecoderOps::upload(const clsa::TensorView& target, const float* values) {
  if (!target.is_contiguous()) fail(clsa::ErrorCode::shape_mismatch, "upload: target " + target.describe());
  check_view("upload", "target", target, target.rank());
  std::memcpy(target.data(), values, static_cast<std::size_t>(target.numel()) * sizeof(float));
}

void CpuDecoderOps::upload(const clsa::TensorView& target, const std::int32_t* values) {
  if (!target.is_contiguous()) fail(clsa::ErrorCode::shape_mismatch, "upload: target " + target.describe());
  check_view("upload", "target", target, target.rank(), clsa::DType::i32);
  std::memcpy(target.data(), values, static_cast<std::size_t>(target.numel()) * sizeof(std::int32_t));
}

void CpuDecoderOps::download(const clsa::TensorView& source, float* values) {
  check_view("download", "source", source, 2);
  const ConstMatrixMap from = const_matrix(source);
  for (Eigen::Index r = 0; r < from.rows(); ++r) {
    std::memcpy(values + r * from.cols(), from.row(r).data(), static_cast<std::size_t>(from.cols()) * sizeof(float));
  }
}

void CpuDecoderOps::embed(const clsa::TensorView& tokens, const clsa::TensorView& table, float scale,
                          const clsa::TensorView& out) {
  check_view("embed", "tokens", tokens, 1, clsa::DType::i32);
  check_view("embed", "table", table, 2);
  check_view("embed", "out", out, 2);
  check_extent("embed", "out", out, 0, tokens.size(0));
  check_extent("embed", "out", out, 1, table.size(1));
  const ConstMatrixMap rows = const_matrix(table);
  MatrixMap result = matrix(out);
  for (std::int64_t m = 0; m < tokens.size(0); ++m) {
    const std::int32_t token = tokens.data_as<const std::int32_t>()[m * tokens.stride(0)];
    if (token < 0 || token >= table.size(0)) {
      fail(clsa::ErrorCode::invalid_argument,
           "embed: token " + std::to_string(token) + " outside the vocabulary of " + std::to_string(table.size(0)));
    }
    result.row(m) = scale * rows.row(token);
  }
}

void CpuDecoderOps::matmul(const clsa::TensorView& x, const clsa::TensorView& w, const clsa::TensorView& out) {
  check_view("matmul", "x", x, 2);
  check_view("matmul", "w", w, 2);
  check_view("matmul", "out", out, 2);
  check_extent("matmul", "w", w, 0, x.size(1));
  check_extent("matmul", "out", out, 0, x.size(0));
  check_extent("matmul", "out", out, 1, w.size(1));
  MatrixMap result = matrix(out);
  if (x.size(0) == 1) {
    result.noalias() = const_matrix(x) * const_matrix(w);  // Eigen's GEMV: no packing, no allocation
    return;
  }
  // out = 0, then out += x * w through Eigen's GEMM on persistent packing blocks.
  const Eigen::Index m = x.size(0), n = w.size(1), k = x.size(1);
  result.setZero();
  product_blocks_.plan(m, n, k);
  Eigen::internal::general_matrix_matrix_product<Eigen::Index, float, Eigen::RowMajor, false, float, Eigen::RowMajor,
                                                 false, Eigen::RowMajor, 1>::run(m, n, k, x.data_as<const float>(),
                                                                                 x.stride(0), w.data_as<const float>(),
                                                                                 w.stride(0), out.data_as<float>(), 1,
                                                                                 out.stride(0), 1.0f, product_blocks_);
}

void CpuDecoderOps::rms_norm(const clsa::TensorView& x, const clsa::TensorView& weight, float eps,
                             const clsa::TensorView& out) {
  check_view("rms_norm", "x", x, 2);
  check_view("rms_norm", "weight", weight, 1);
  check_view("rms_norm", "out", out, 2);
  check_extent("rms_norm", "weight", weight, 0, x.size(1));
  check_extent("rms_norm", "out", out, 0, x.size(0));
  check_extent("rms_norm", "out", out, 1, x.size(1));
  const ConstMatrixMap input = const_matrix(x);
  MatrixMap result = matrix(out);
  const Eigen::Map<const Eigen::RowVectorXf> gain(weight.data_as<const float>(), weight.size(0));
  const float columns = static_cast<float>(x.size(1));
  for (Eigen::Index r = 0; r < input.rows(); ++r) {
    const float inverse_rms = 1.0f / std::sqrt(input.row(r).squaredNorm() / columns + eps);
    result.row(r) = (input.row(r) * inverse_rms).cwiseProduct(gain);
  }
}

void CpuDecoderOps::rope(const clsa::TensorView& x, const clsa::TensorView& positions, float theta) {
  check_view("rope", "x", x, 3);
  check_view("rope", "positions", positions, 1, clsa::DType::i32);
  check_extent("rope", "positions", positions, 0, x.size(0));
  const int heads = static_cast<int>(x.size(1));
  const int head_dim = static_cast<int>(x.size(2));
  if (head_dim % 2 != 0) fail(clsa::ErrorCode::shape_mismatch, "rope: odd head_dim in " + x.describe());
  const int pairs = head_dim / 2;
  if (frequencies_theta_ != theta || frequencies_head_dim_ != head_dim) {
    inverse_frequencies_.resize(static_cast<std::size_t>(pairs));
    for (int i = 0; i < pairs; ++i) {
      inverse_frequencies_[static_cast<std::size_t>(i)] =
          std::pow(static_cast<double>(theta), -2.0 * i / static_cast<double>(head_dim));
    }
    frequencies_theta_ = theta;
    frequencies_head_dim_ = head_dim;
  }
  rotation_cos_.resize(static_cast<std::size_t>(pairs));
  rotation_sin_.resize(static_cast<std::size_t>(pairs));
  for (std::int64_t m = 0; m < x.size(0); ++m) {
    const double position = positions.data_as<const std::int32_t>()[m * positions.stride(0)];
    for (int i = 0; i < pairs; ++i) {
      // The angle in double: position * frequency reaches 5e5 radians at 512K tokens, where an f32
      // angle would be off by ~0.03.
      const double angle = position * inverse_frequencies_[static_cast<std::size_t>(i)];
      rotation_cos_[static_cast<std::size_t>(i)] = static_cast<float>(std::cos(angle));
      rotation_sin_[static_cast<std::size_t>(i)] = static_cast<float>(std::sin(angle));
    }
    for (int h = 0; h < heads; ++h) {
      float* head = x.data_as<float>() + m * x.stride(0) + h * x.stride(1);
      for (int i = 0; i < pairs; ++i) {
        const float c = rotation_cos_[static_cast<std::size_t>(i)], s = rotation_sin_[static_cast<std::size_t>(i)];
        const float even = head[2 * i], odd = head[2 * i + 1];
        head[2 * i] = even * c - odd * s;
        head[2 * i + 1] = even * s + odd * c;
      }
    }
  }
}

void CpuDecoderOps::swiglu(const clsa::TensorView& gate_up, const clsa::TensorView& out) {
  check_view("swiglu", "gate_up", gate_up, 2);
  check_view("swiglu", "out", out, 2);
  check_extent("swiglu", "gate_up", gate_up, 1, 2 * out.size(1));
  check_extent("swiglu", "out", out, 0, gate_up.size(0));
  const ConstMatrixMap input = const_matrix(gate_up);
  MatrixMap result = matrix(out);
  const Eigen::Index width = out.size(1);
  for (Eigen::Index r = 0; r < input.rows(); ++r) {
    const auto gate = input.row(r).head(width).array();
    const auto up = input.row(r).tail(width).array();
    result.row(r) = (gate / (1.0f + (-gate).exp()) * up).matrix();
  }
}

void CpuDecoderOps::add(const clsa::TensorView& x, const clsa::TensorView& y) {
  check_view("add", "x", x, 2);
  check_view("add", "y", y, 2);
  check_extent("add", "y", y, 0, x.size(0));
  check_extent("add", "y", y, 1, x.size(1));
  MatrixMap sum = matrix(x);
  sum += const_matrix(y);
}

void CpuDecoderOps::copy(const clsa::TensorView& source, const clsa::TensorView& target) {
  check_view("copy", "source", source, 2);
  check_view("copy", "target", target, 2);
  check_extent("copy", "target", target, 0, source.size(0));
  check_extent("copy", "target", target, 1, source.size(1));
  MatrixMap result = matrix(target);
  result = const_matrix(source);
}

void CpuDecoderOps::fill_zero(const clsa::TensorView& target) {
  if (!target.is_contiguous()) fail(clsa::ErrorCode::shape_mismatch, "fill_zero: target " + target.describe());
  check_view("fill_zero", "target", target, target.rank(), target.dtype());
  std::memset(target.data(), 0, static_cast<std::size_t>(target.numel()) * clsa::dtype_size(target.dtype()));
}

void CpuDecoderOps::window_attention(WindowKvCache& cache, int layer, const clsa::TensorView& slots,
                                     const clsa::TensorView& starts, const clsa::TensorView& q,
                                     const clsa::TensorView& k, const clsa::TensorView& v,
                                     const clsa::TensorView& out) {
  const char* op = "window_attention";
  check_window_attention("CpuDecoderOps", cache, layer, slots, starts, q, k, v, out, clsa::DType::f32,
                         clsa::Device::cpu());
  const std::int64_t batch = q.size(0), tokens = q.size(1);
  const int q_heads = static_cast<int>(q.size(2));
  const int kv_heads = cache.kv_heads, head_dim = cache.head_dim, window = cache.window;
  const int group = q_heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const std::int64_t ring_row = std::int64_t{kv_heads} * head_dim;  // one token of the ring
  const std::int64_t slot_rows = std::int64_t{window} * ring_row;   // one slot's ring
  auto ring_offset = [&](int slot, std::int64_t position) {
    return (std::int64_t{layer} * cache.slots + slot) * slot_rows + (position % window) * ring_row;
  };
  window_keys_.resize(static_cast<std::size_t>(window) * static_cast<std::size_t>(head_dim));
  window_values_.resize(window_keys_.size());
  window_probabilities_.resize(static_cast<std::size_t>(window));
  const std::int32_t* slot_of = slots.data_as<const std::int32_t>();
  const std::int32_t* start_of = starts.data_as<const std::int32_t>();
  const float* ring_k = cache.k.data_as<const float>();
  const float* ring_v = cache.v.data_as<const float>();

  for (std::int64_t b = 0; b < batch; ++b) {
    const int slot = slot_of[b * slots.stride(0)];
    const std::int64_t start = start_of[b * starts.stride(0)];
    if (slot < 0 || slot >= cache.slots || start < 0) {
      fail(clsa::ErrorCode::invalid_argument, std::string(op) + ": slot " + std::to_string(slot) + " of " +
                                                  std::to_string(cache.slots) + ", start " + std::to_string(start));
    }
    for (std::int64_t t = 0; t < tokens; ++t) {
      const std::int64_t position = start + t;
      const std::int64_t first = std::max<std::int64_t>(0, position - window + 1);
      const Eigen::Index count = static_cast<Eigen::Index>(position - first + 1);
      for (int kv_head = 0; kv_head < kv_heads; ++kv_head) {
        // Gather the visible keys and values: earlier calls' from the ring, this call's from k, v.
        for (std::int64_t p = first; p <= position; ++p) {
          const float* key;
          const float* value;
          if (p < start) {
            key = ring_k + ring_offset(slot, p) + kv_head * head_dim;
            value = ring_v + ring_offset(slot, p) + kv_head * head_dim;
          } else {
            key = k.data_as<const float>() + b * k.stride(0) + (p - start) * k.stride(1) + kv_head * k.stride(2);
            value = v.data_as<const float>() + b * v.stride(0) + (p - start) * v.stride(1) + kv_head * v.stride(2);
          }
          const std::size_t row = static_cast<std::size_t>(p - first) * static_cast<std::size_t>(head_dim);
          std::copy(key, key + head_dim, window_keys_.data() + row);
          std::copy(value, value + head_dim, window_values_.data() + row);
        }
        const Eigen::Map<const RowMajorMatrix> keys(window_keys_.data(), count, head_dim);
        const Eigen::Map<const RowMajorMatrix> values(window_values_.data(), count, head_dim);
        const ConstMatrixMap queries(
            q.data_as<const float>() + b * q.stride(0) + t * q.stride(1) + std::int64_t{kv_head} * group * q.stride(2),
            group, head_dim, Eigen::OuterStride<>(q.stride(2)));
        MatrixMap result(out.data_as<float>() + b * out.stride(0) + t * out.stride(1) +
                             std::int64_t{kv_head} * group * out.stride(2),
                         group, head_dim, Eigen::OuterStride<>(out.stride(2)));
        // One GEMV per query head of the group (Eigen's GEMM would allocate its packing blocks).
        Eigen::Map<Eigen::VectorXf> probabilities(window_probabilities_.data(), count);
        for (int g = 0; g < group; ++g) {
          probabilities.noalias() = keys * queries.row(g).transpose();
          probabilities = ((probabilities.array() - probabilities.maxCoeff()) * scale).exp().matrix();
          probabilities /= probabilities.sum();
          result.row(g).noalias() = probabilities.transpose() * values;
        }
      }
    }
    // The ring keeps the window: this call's last min(T, window) tokens replace the oldest.
    for (std::int64_t t = std::max<std::int64_t>(0, tokens - window); t < tokens; ++t) {
      float* key_row = cache.k.data_as<float>() + ring_offset(slot, start + t);
      float* value_row = cache.v.data_as<float>() + ring_offset(slot, start + t);
      for (int kv_head = 0; kv_head < kv_heads; ++kv_head) {
        const float* key = k.data_as<const float>() + b * k.stride(0) + t * k.stride(1) + kv_head * k.stride(2);
        const float* value = v.data_as<const float>() + b * v.stride(0) + t * v.stride(1) + kv_head * v.stride(2);
        std::copy(key, key + head_dim, key_row + kv_head * head_dim);
        std::copy(value, value + head_dim, value_row + kv_head * head_dim);
      }
    }
  }
}

}  // namespace yoco
