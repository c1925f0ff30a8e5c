// What the examples and the tests that play an engine share beyond libclsa: the layout of a pool
// laid out the way an engine lays it out, written once for every place that hands one to
// CacheBatch::wrap or SharedKVCache::wrap.
#pragma once

#include <cstdint>

#include "clsa/cache.hpp"
#include "clsa/tensor.hpp"
#include "clsa/types.hpp"

namespace engine_support {

/// The layout of an engine pool with K and V interleaved per page (FlashInfer NHD):
/// kv [pages][2][page_size][heads][dim], index keys [pages][page_size][index_row] (index_row >=
/// index_dim: padded rows), both of config.dtype on `device`.
inline clsa::PagedCacheLayout interleaved_layout(const clsa::CacheConfig& c, clsa::Device device, std::int64_t pages,
                                                 const clsa::TensorView& kv, const clsa::TensorView& index_keys,
                                                 std::int64_t index_row) {
  const std::int64_t P = c.page_size, H = c.num_kv_heads, D = c.head_dim;
  clsa::PagedCacheLayout layout{};
  layout.dtype = c.dtype;
  layout.device = device;
  layout.num_kv_heads = c.num_kv_heads;
  layout.head_dim = c.head_dim;
  layout.index_dim = c.index_dim;
  layout.page_size = c.page_size;
  layout.num_pages = pages;
  layout.k = kv.data();
  layout.v = static_cast<char*>(kv.data()) + P * H * D * static_cast<std::int64_t>(clsa::dtype_size(c.dtype));
  layout.k_page_stride = layout.v_page_stride = 2 * P * H * D;
  layout.k_token_stride = layout.v_token_stride = H * D;
  layout.k_head_stride = layout.v_head_stride = D;
  layout.index_keys = index_keys.data();
  layout.index_page_stride = P * index_row;
  layout.index_token_stride = index_row;
  return layout;
}

}  // namespace engine_support
