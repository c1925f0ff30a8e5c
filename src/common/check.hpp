// Argument checking shared by every public entry point: each failure names the function, the
// argument and the shapes, and throws before anything is written.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>

#include "clsa/cache.hpp"
#include "clsa/tensor.hpp"
#include "clsa/types.hpp"

namespace clsa {
namespace detail {

[[noreturn]] void fail(ErrorCode code, const std::string& message);

/// "[2,1,32,128]"
std::string shape_string(std::initializer_list<std::int64_t> shape);

/// Builds a message from streamable parts.
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream stream;
  (stream << ... << parts);
  return stream.str();
}

inline bool is_power_of_two(std::int64_t x) {
  return x > 0 && (x & (x - 1)) == 0;
}

/// f32, f16 or bf16: the dtypes of activations (queries, outputs, head weights, values to quantize).
inline bool is_activation_dtype(DType dtype) {
  return dtype == DType::f32 || dtype == DType::f16 || dtype == DType::bf16;
}
/// What a cache may store: an activation dtype or e4m3.
inline bool is_cache_dtype(DType dtype) {
  return is_activation_dtype(dtype) || dtype == DType::e4m3;
}

/// Requires `value` (named `name`) to be positive.
void check_positive(const char* function, const char* name, std::int64_t value);

/// Requires `tensor` (named `name`) to be defined, of `dtype`, on `device`, with exactly `shape`,
/// innermost stride 1 and non-negative strides.
void check_tensor(const char* function, const char* name, const TensorView& tensor, DType dtype, Device device,
                  std::initializer_list<std::int64_t> shape);

/// Same, accepting any of f32, f16, bf16 (is_activation_dtype).
void check_float_tensor(const char* function, const char* name, const TensorView& tensor, Device device,
                        std::initializer_list<std::int64_t> shape);

/// RoutingIndex::kv (named `name`): contiguous [sequences, tokens, 2, Hkv, top_k, head_dim] of the
/// cache's dtype on `device`.
void check_routed_kv(const char* function, const char* name, const TensorView& kv, const PagedCacheLayout& layout,
                     Device device, std::int64_t sequences, std::int64_t tokens, int top_k);

/// For the CUDA kernels' 16-byte loads: the data pointer and every outer stride of `tensor`
/// must be multiples of 16 bytes.
void check_vector_aligned(const char* function, const char* name, const TensorView& tensor);

}  // namespace detail
}  // namespace clsa
