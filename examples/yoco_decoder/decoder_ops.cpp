#include "decoder_ops.hpp"

#include <initializer_list>
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

void check_operand(const char* ops, const char* op, const char* name, const clsa::TensorView& view, int rank,
                   clsa::DType dtype, clsa::Device device) {
  // The message is built only on failure: checks run on every call of a decoding step.
  auto what = [&] { return std::string(ops) + "::" + op + ": " + name; };
  if (!view.defined()) throw clsa::Error(clsa::ErrorCode::invalid_argument, what() + " is undefined");
  if (view.device() != device) {
    throw clsa::Error(clsa::ErrorCode::device_mismatch,
                      what() + " is " + view.describe() + "; expected " + clsa::device_name(device));
  }
  if (view.dtype() != dtype) {
    throw clsa::Error(clsa::ErrorCode::dtype_mismatch,
                      what() + " is " + view.describe() + "; expected " + clsa::dtype_name(dtype));
  }
  if (view.rank() != rank || view.stride(rank - 1) != 1) {
    throw clsa::Error(clsa::ErrorCode::shape_mismatch, what() + " is " + view.describe() + "; expected rank " +
                                                           std::to_string(rank) + " with innermost stride 1");
  }
}

void check_extent(const char* ops, const char* op, const char* name, const clsa::TensorView& view, int dim,
                  std::int64_t expected) {
  if (view.size(dim) != expected) {
    throw clsa::Error(clsa::ErrorCode::shape_mismatch, std::string(ops) + "::" + op + ": " + name + " is " +
                                                           view.describe() + "; dimension " + std::to_string(dim) +
                                                           " should be " + std::to_string(expected));
  }
}

void check_window_attention(const char* ops, const WindowKvCache& cache, int layer, const clsa::TensorView& slots,
                            const clsa::TensorView& starts, const clsa::TensorView& q, const clsa::TensorView& k,
                            const clsa::TensorView& v, const clsa::TensorView& out, clsa::DType dtype,
                            clsa::Device device) {
  const char* op = "window_attention";
  check_operand(ops, op, "slots", slots, 1, clsa::DType::i32, device);
  check_operand(ops, op, "starts", starts, 1, clsa::DType::i32, device);
  check_operand(ops, op, "q", q, 4, dtype, device);
  check_operand(ops, op, "k", k, 4, dtype, device);
  check_operand(ops, op, "v", v, 4, dtype, device);
  check_operand(ops, op, "out", out, 4, dtype, device);
  check_operand(ops, op, "cache.k", cache.k.view(), 5, dtype, device);
  check_operand(ops, op, "cache.v", cache.v.view(), 5, dtype, device);
  const std::int64_t batch = q.size(0), tokens = q.size(1);
  check_extent(ops, op, "slots", slots, 0, batch);
  check_extent(ops, op, "starts", starts, 0, batch);
  for (const clsa::TensorView* kv : {&k, &v}) {
    check_extent(ops, op, "k/v", *kv, 0, batch);
    check_extent(ops, op, "k/v", *kv, 1, tokens);
    check_extent(ops, op, "k/v", *kv, 2, cache.kv_heads);
    check_extent(ops, op, "k/v", *kv, 3, cache.head_dim);
  }
  for (int d = 0; d < 4; ++d) check_extent(ops, op, "out", out, d, q.size(d));
  check_extent(ops, op, "q", q, 3, cache.head_dim);
  const int q_heads = static_cast<int>(q.size(2));
  if (q_heads % cache.kv_heads != 0 || layer < 0 || layer >= cache.layers) {
    throw clsa::Error(clsa::ErrorCode::invalid_argument,
                      std::string(ops) + "::" + op + ": layer " + std::to_string(layer) + " of " +
                          std::to_string(cache.layers) + ", q heads " + std::to_string(q_heads) + " over kv heads " +
                          std::to_string(cache.kv_heads));
  }
}

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
