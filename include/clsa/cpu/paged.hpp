// Header-only helpers of the CPU paths: addressing a paged pool and widening rows to float.
#pragma once

#include <array>
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

/// The value of every e4m3 code (exact in f32), built once: widening is one table lookup.
inline const float* e4m3_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> values{};
    for (unsigned code = 0; code < 256u; ++code) values[code] = to_float(float8_e4m3{static_cast<std::uint8_t>(code)});
    return values;
  }();
  return table.data();
}
template <>
inline void widen<float8_e4m3>(const float8_e4m3* src, int count, float* dst) {
  const float* values = e4m3_values();
  for (int i = 0; i < count; ++i) dst[i] = values[src[i].bits];
}

/// A sequence's view of a paged pool: position -> row pointers (clsa/paged_view.hpp addresses).
/// Elem is the storage type of the rows read: the K/V dtype's for key() and value(), the index
/// key dtype's for index_key() (they may differ: a view reads one or the other).
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
  /// e4m3 indexer keys: the f32 scale of the key at `position` (index_key() * it is the key).
  float index_scale(std::int64_t position) const {
    const PoolRow row = rows.row(position);
    return layout
        ->index_scales[row.page * layout->index_scale_page_stride + row.offset * layout->index_scale_token_stride];
  }
};

}  // namespace cpu
}  // namespace clsa
