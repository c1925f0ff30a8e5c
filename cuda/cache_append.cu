// Copy of appended tokens into their pages: one block per token, K and V rows of every kv head
// and the indexer key; 16-byte words when every row is 16-byte aligned, elements otherwise.
#include "common.cuh"
#include "kernels.hpp"

namespace clsa {
namespace cuda_kernels {

namespace {

/// AppendArgs with every stride and row length counted in Words.
struct WordArgs {
  AppendArgs a;
  int head_words, index_words;
  std::int64_t k_page, k_token, k_head, v_page, v_token, v_head, i_page, i_token;  // destination
  std::int64_t k_src_token, k_src_head, v_src_token, v_src_head, i_src_token;      // source
};

template <class Word>
__global__ void append_tokens_kernel(WordArgs w) {
  const AppendArgs& args = w.a;
  const PagedCacheLayout& l = args.layout;
  const int token = blockIdx.x;
  const std::int64_t position = args.first_position + token;
  const int shift = page_shift_of(l.page_size);
  // args.pages holds the sequence's pages from first_page on: positions relative to that page.
  const PoolRow where = PagedRows{args.pages, shift}.row(position - (std::int64_t{args.first_page} << shift));
  auto* k_dst = static_cast<Word*>(const_cast<void*>(l.k)) + where.page * w.k_page + where.offset * w.k_token;
  auto* v_dst = static_cast<Word*>(const_cast<void*>(l.v)) + where.page * w.v_page + where.offset * w.v_token;
  auto* i_dst = static_cast<Word*>(const_cast<void*>(l.index_keys)) + where.page * w.i_page + where.offset * w.i_token;
  const auto* k_src = static_cast<const Word*>(args.k) + token * w.k_src_token;
  const auto* v_src = static_cast<const Word*>(args.v) + token * w.v_src_token;
  const auto* i_src = static_cast<const Word*>(args.index_keys) + token * w.i_src_token;
  const int row = l.num_kv_heads * w.head_words;
  for (int e = threadIdx.x; e < row; e += blockDim.x) {
    const int head = e / w.head_words;
    const int d = e - head * w.head_words;
    k_dst[head * w.k_head + d] = k_src[head * w.k_src_head + d];
    v_dst[head * w.v_head + d] = v_src[head * w.v_src_head + d];
  }
  for (int d = threadIdx.x; d < w.index_words; d += blockDim.x) i_dst[d] = i_src[d];
}

template <class Word>
void launch(const AppendArgs& args, cudaStream_t stream) {
  const std::int64_t per_word = static_cast<std::int64_t>(sizeof(Word) / dtype_size(args.layout.dtype));
  const PagedCacheLayout& l = args.layout;
  WordArgs w{};
  w.a = args;
  w.head_words = static_cast<int>(l.head_dim / per_word);
  w.index_words = static_cast<int>(l.index_dim / per_word);
  w.k_page = l.k_page_stride / per_word;
  w.k_token = l.k_token_stride / per_word;
  w.k_head = l.k_head_stride / per_word;
  w.v_page = l.v_page_stride / per_word;
  w.v_token = l.v_token_stride / per_word;
  w.v_head = l.v_head_stride / per_word;
  w.i_page = l.index_page_stride / per_word;
  w.i_token = l.index_token_stride / per_word;
  w.k_src_token = args.k_token_stride / per_word;
  w.k_src_head = args.k_head_stride / per_word;
  w.v_src_token = args.v_token_stride / per_word;
  w.v_src_head = args.v_head_stride / per_word;
  w.i_src_token = args.index_token_stride / per_word;
  const int threads = std::min(256, std::max(32, l.num_kv_heads * w.head_words));
  append_tokens_kernel<Word><<<args.tokens, threads, 0, stream>>>(w);
  detail::cuda_check_launch("append_tokens_kernel");
}

bool all_aligned(const AppendArgs& a) {
  const std::int64_t element = static_cast<std::int64_t>(dtype_size(a.layout.dtype));
  const PagedCacheLayout& l = a.layout;
  const std::int64_t strides[] = {l.head_dim,          l.index_dim,          l.k_page_stride,     l.k_token_stride,
                                  l.k_head_stride,     l.v_page_stride,      l.v_token_stride,    l.v_head_stride,
                                  l.index_page_stride, l.index_token_stride, a.k_token_stride,    a.k_head_stride,
                                  a.v_token_stride,    a.v_head_stride,      a.index_token_stride};
  for (std::int64_t stride : strides) {
    if ((stride * element) % 16 != 0) return false;
  }
  const void* pointers[] = {l.k, l.v, l.index_keys, a.k, a.v, a.index_keys};
  for (const void* pointer : pointers) {
    if (reinterpret_cast<std::uintptr_t>(pointer) % 16 != 0) return false;
  }
  return true;
}

}  // namespace

void append_tokens(const AppendArgs& args, cudaStream_t stream) {
  if (args.tokens <= 0) return;
  if (all_aligned(args)) {
    launch<uint4>(args, stream);
  } else if (dtype_size(args.layout.dtype) == 4) {
    launch<std::uint32_t>(args, stream);
  } else {
    launch<std::uint16_t>(args, stream);
  }
}

}  // namespace cuda_kernels
}  // namespace clsa
