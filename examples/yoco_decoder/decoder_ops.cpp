#include "decoder_ops.hpp"

#include <string>

namespace yoco {

namespace {

char* element_at(const clsa::TensorView& view, std::int64_t offset) {
  return static_cast<char*>(view.data()) + offset * static_cast<std::int64_t>(clsa::dtype_size(view.dtype()));
}

void require_matrix(const clsa::TensorView& view, const char* what) {
  if (view.rank() != 2 || view.stride(1) != 1) {
    throw clsa::Error(clsa::ErrorCode::shape_mismatch,
                      std::string(what) + ": expected a row-major matrix view, got " + view.describe());
  }
}

}  // namespace

WindowKvCache DecoderOps::allocate_window_cache(int layers, int slots, int window, int kv_heads, int head_dim) const {
  WindowKvCache cache;
  cache.layers = layers;
  cache.slots = slots;
  cache.window = window;
  cache.kv_heads = kv_heads;
  cache.head_dim = head_dim;
  cache.k = allocate({layers, slots, window, kv_heads, head_dim}, dtype());
  cache.v = allocate({layers, slots, window, kv_heads, head_dim}, dtype());
  return cache;
}

clsa::TensorView rows_of(const clsa::TensorView& matrix, std::int64_t first, std::int64_t count) {
  require_matrix(matrix, "rows_of");
  if (first < 0 || count < 0 || first + count > matrix.size(0)) {
    throw clsa::Error(clsa::ErrorCode::shape_mismatch, "rows_of: rows [" + std::to_string(first) + ", " +
                                                           std::to_string(first + count) + ") of " + matrix.describe());
  }
  return clsa::TensorView(element_at(matrix, first * matrix.stride(0)), matrix.dtype(), {count, matrix.size(1)},
                          {matrix.stride(0), 1}, matrix.device());
}

clsa::TensorView columns_of(const clsa::TensorView& matrix, std::int64_t first, std::int64_t count) {
  require_matrix(matrix, "columns_of");
  if (first < 0 || count < 0 || first + count > matrix.size(1)) {
    throw clsa::Error(clsa::ErrorCode::shape_mismatch, "columns_of: columns [" + std::to_string(first) + ", " +
                                                           std::to_string(first + count) + ") of " + matrix.describe());
  }
  return clsa::TensorView(element_at(matrix, first), matrix.dtype(), {matrix.size(0), count}, {matrix.stride(0), 1},
                          matrix.device());
}

clsa::TensorView as_heads(const clsa::TensorView& matrix, std::int64_t batch, std::int64_t tokens, int heads,
                          int head_dim) {
  require_matrix(matrix, "as_heads");
  if (matrix.size(0) != batch * tokens || matrix.size(1) != std::int64_t{heads} * head_dim) {
    throw clsa::Error(clsa::ErrorCode::shape_mismatch,
                      "as_heads: " + matrix.describe() + " is not [" + std::to_string(batch) + "*" +
                          std::to_string(tokens) + ", " + std::to_string(heads) + "*" + std::to_string(head_dim) + "]");
  }
  const std::int64_t row = matrix.stride(0);
  return clsa::TensorView(matrix.data(), matrix.dtype(), {batch, tokens, heads, head_dim},
                          {tokens * row, row, head_dim, 1}, matrix.device());
}

clsa::TensorView as_row_heads(const clsa::TensorView& matrix, int heads, int head_dim) {
  require_matrix(matrix, "as_row_heads");
  if (matrix.size(1) != std::int64_t{heads} * head_dim) {
    throw clsa::Error(clsa::ErrorCode::shape_mismatch, "as_row_heads: " + matrix.describe() + " has not " +
                                                           std::to_string(heads) + "*" + std::to_string(head_dim) +
                                                           " columns");
  }
  return clsa::TensorView(matrix.data(), matrix.dtype(), {matrix.size(0), heads, head_dim},
                          {matrix.stride(0), head_dim, 1}, matrix.device());
}

clsa::TensorView elements_of(const clsa::TensorView& tensor, std::int64_t first, std::int64_t count) {
  if (!tensor.is_contiguous() || first < 0 || count < 0 || first + count > tensor.numel()) {
    throw clsa::Error(clsa::ErrorCode::shape_mismatch, "elements_of: elements [" + std::to_string(first) + ", " +
                                                           std::to_string(first + count) + ") of " + tensor.describe());
  }
  return clsa::TensorView(element_at(tensor, first), tensor.dtype(), {count}, tensor.device());
}

}  // namespace yoco
