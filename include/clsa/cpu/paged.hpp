// Header-only helpers of the CPU paths: addressing a paged pool and widening rows to float.
#pragma once

#include <cstdint>
#include <cstring>

#include "clsa/cache.hpp"
#include "clsa/numeric.hpp"

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

/// A sequence's view of a paged pool: position -> row pointers.
template <class Elem>
struct PagedSequence {
  const PagedCacheLayout* layout;
  const std::int32_t* pages;  // the sequence's page indices, in position order
  int page_shift;             // log2(page_size)

  PagedSequence(const PagedCacheLayout& l, const std::int32_t* sequence_pages)
      : layout(&l), pages(sequence_pages), page_shift(0) {
    while ((1 << page_shift) < l.page_size) ++page_shift;
  }
  std::int64_t page_of(std::int64_t position) const { return pages[position >> page_shift]; }
  std::int64_t slot_of(std::int64_t position) const { return position & (layout->page_size - 1); }

  const Elem* key(std::int64_t position, int kv_head) const {
    return static_cast<const Elem*>(layout->k) + page_of(position) * layout->k_page_stride +
           slot_of(position) * layout->k_token_stride + kv_head * layout->k_head_stride;
  }
  const Elem* value(std::int64_t position, int kv_head) const {
    return static_cast<const Elem*>(layout->v) + page_of(position) * layout->v_page_stride +
           slot_of(position) * layout->v_token_stride + kv_head * layout->v_head_stride;
  }
  const Elem* index_key(std::int64_t position) const {
    return static_cast<const Elem*>(layout->index_keys) + page_of(position) * layout->index_page_stride +
           slot_of(position) * layout->index_token_stride;
  }
};

}  // namespace cpu
}  // namespace clsa
