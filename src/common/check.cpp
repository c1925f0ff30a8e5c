#include "common/check.hpp"

#include <cstdint>

namespace clsa {
namespace detail {

void fail(ErrorCode code, const std::string& message) {
  throw Error(code, message);
}

std::string shape_string(std::initializer_list<std::int64_t> shape) {
  std::string text = "[";
  bool first = true;
  for (std::int64_t extent : shape) {
    if (!first) text += ",";
    text += std::to_string(extent);
    first = false;
  }
  return text + "]";
}

void check_positive(const char* function, const char* name, std::int64_t value) {
  if (value <= 0) fail(ErrorCode::invalid_argument, concat(function, ": ", name, " = ", value, "; it must be > 0"));
}

namespace {

void check_layout(const char* function, const char* name, const TensorView& tensor, Device device,
                  std::initializer_list<std::int64_t> shape) {
  const std::string expected = shape_string(shape);
  if (!tensor.defined()) {
    fail(ErrorCode::invalid_argument, concat(function, ": ", name, " is empty (null data); expected shape ", expected));
  }
  bool shape_ok = tensor.rank() == static_cast<int>(shape.size());
  int dim = 0;
  for (std::int64_t extent : shape) {
    if (shape_ok && tensor.size(dim) != extent) shape_ok = false;
    ++dim;
  }
  if (!shape_ok) {
    fail(ErrorCode::shape_mismatch,
         concat(function, ": ", name, " is ", tensor.describe(), "; expected shape ", expected));
  }
  if (tensor.device() != device) {
    fail(ErrorCode::device_mismatch,
         concat(function, ": ", name, " is ", tensor.describe(), " but this call computes on ", device_name(device)));
  }
  for (int d = 0; d < tensor.rank(); ++d) {
    if (tensor.stride(d) < 0) {
      fail(ErrorCode::shape_mismatch,
           concat(function, ": ", name, " is ", tensor.describe(), "; negative strides are not supported"));
    }
  }
  if (tensor.rank() > 0 && tensor.size(tensor.rank() - 1) > 1 && tensor.stride(tensor.rank() - 1) != 1) {
    fail(ErrorCode::shape_mismatch,
         concat(function, ": ", name, " is ", tensor.describe(), "; its innermost stride must be 1"));
  }
}

}  // namespace

void check_tensor(const char* function, const char* name, const TensorView& tensor, DType dtype, Device device,
                  std::initializer_list<std::int64_t> shape) {
  check_layout(function, name, tensor, device, shape);
  if (tensor.dtype() != dtype) {
    fail(ErrorCode::dtype_mismatch,
         concat(function, ": ", name, " is ", tensor.describe(), "; expected dtype ", dtype_name(dtype)));
  }
}

void check_float_tensor(const char* function, const char* name, const TensorView& tensor, Device device,
                        std::initializer_list<std::int64_t> shape) {
  check_layout(function, name, tensor, device, shape);
  if (!is_activation_dtype(tensor.dtype())) {
    fail(ErrorCode::dtype_mismatch,
         concat(function, ": ", name, " is ", tensor.describe(), "; expected a float dtype (f32, f16, bf16)"));
  }
}

void check_vector_aligned(const char* function, const char* name, const TensorView& tensor) {
  const std::size_t element = dtype_size(tensor.dtype());
  bool aligned = reinterpret_cast<std::uintptr_t>(tensor.data()) % 16 == 0;
  for (int d = 0; d + 1 < tensor.rank(); ++d) {
    if (tensor.size(d) > 1 && (static_cast<std::size_t>(tensor.stride(d)) * element) % 16 != 0) aligned = false;
  }
  if (!aligned) {
    fail(ErrorCode::shape_mismatch, concat(function, ": ", name, " is ", tensor.describe(),
                                           "; the CUDA path needs its data pointer and outer strides "
                                           "aligned to 16 bytes"));
  }
}

void check_routed_kv(const char* function, const char* name, const TensorView& kv, const PagedCacheLayout& layout,
                     Device device, std::int64_t sequences, std::int64_t tokens, int top_k) {
  check_tensor(function, name, kv, layout.dtype, device,
               {sequences, tokens, 2, layout.num_kv_heads, top_k, layout.head_dim});
  if (!kv.is_contiguous()) {
    fail(ErrorCode::shape_mismatch, concat(function, ": ", name, " is ", kv.describe(), "; it must be contiguous"));
  }
}

}  // namespace detail
}  // namespace clsa
