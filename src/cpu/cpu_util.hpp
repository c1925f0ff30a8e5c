// Small CPU-side helpers shared by the components: dtype dispatch and tensor widening.
#pragma once

#include <cstdint>

#include "clsa/numeric.hpp"
#include "clsa/tensor.hpp"
#include "common/check.hpp"

namespace clsa {
namespace detail {

template <class T>
struct TypeTag {
  using type = T;
};

/// Calls body(TypeTag<Elem>{}) with Elem the storage type of a float dtype (e4m3 included).
template <class Body>
decltype(auto) dispatch_float(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::f32:
      return body(TypeTag<float>{});
    case DType::f16:
      return body(TypeTag<float16>{});
    case DType::bf16:
      return body(TypeTag<bfloat16>{});
    case DType::e4m3:
      return body(TypeTag<float8_e4m3>{});
    case DType::i32:
      break;
  }
  fail(ErrorCode::dtype_mismatch, "expected a float dtype, got i32");
}

/// Same for the activation dtypes (f32, f16, bf16) only: what queries, outputs and values to be
/// quantized are.
template <class Body>
decltype(auto) dispatch_activation(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::f32:
      return body(TypeTag<float>{});
    case DType::f16:
      return body(TypeTag<float16>{});
    case DType::bf16:
      return body(TypeTag<bfloat16>{});
    case DType::e4m3:
    case DType::i32:
      break;
  }
  fail(ErrorCode::dtype_mismatch, concat("expected f32, f16 or bf16, got ", dtype_name(dtype)));
}

/// Copies a host tensor of an activation dtype (f32, f16, bf16) and any strides (innermost stride 1) into a
/// contiguous f32 array of numel() entries, in row-major order.
void widen_to_f32(const TensorView& tensor, float* out);

}  // namespace detail
}  // namespace clsa
