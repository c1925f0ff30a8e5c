// Header-only helpers of the CPU paths: addressing a paged pool and widening rows to float.
#pragma once

#include <cstdint>
#include <cstring>

#include "clsa/cache.hpp"
#include "clsa/numeric.hpp"
#include "clsa/paged_view.hpp"

namespace clsa {
namespace cpu {

/// Widens `count` elements to float.
template <class Elem>
inline void widen(const Elem* src, int count, float* dst) {
  for (int i = 0; i < count; ++i) dst[i] = to_float(src[i]);
}
template <>
inline void widen<float>(const float* src, int count, float* dst) {
  std::memcpy(dst, src, sizeof(float) * static_cast<std::size_t>(count));
}
template <>
inline void widen<bfloat16>(const bfloat16* src, int count, float* dst) {
  // bf16 -> f32 is a shift; written on the raw bits so that the compiler vectorises it.
  const std::uint16_t* bits = reinterpret_cast<const std::uint16_t*>(src);
  std::uint32_t* out = reinterpret_cast<std::uint32_t*>(dst);
  for (int i = 0; i < count; ++i) out[i] = static_cast<std::uint32_t>(bits[i]) << 16;
}

/// A sequence's view of a paged pool: position -> row pointers (clsa/paged_view.hpp addresses).
template <class Elem>
struct PagedSequence {
  const PagedCacheLayout* layout;
  PagedRows rows;

  PagedSequence(const PagedCacheLayout& l, const std::int32_t* sequence_pages)
      : layout(&l), rows{sequence_pages, page_shift_of(l.page_size)} {}

  const Elem* key(std::int64_t position, int kv_head) const {
    return static_cast<const Elem*>(layout->k) + rows.k_offset(*layout, position, kv_head);
  }
  const Elem* value(std::int64_t position, int kv_head) const {
    return static_cast<const Elem*>(layout->v) + rows.v_offset(*layout, position, kv_head);
  }
  const Elem* index_key(std::int64_t position) const {
    return static_cast<const Elem*>(layout->index_keys) + rows.index_offset(*layout, position);
  }
};

}  // namespace cpu
}  // namespace clsa
