// Composes the three components through the installed headers and library; exits non-zero when
// the sparse result with top_k >= length differs from dense, or when the library, header and
// package versions differ. Needs clsa::clsa only (no Eigen).
#include <clsa/clsa.hpp>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

int main() {
  clsa::CacheConfig cache_config;
  cache_config.num_kv_heads = 2;
  cache_config.head_dim = 64;
  cache_config.index_dim = 64;
  cache_config.page_size = 16;
  cache_config.max_pages = 4;
  cache_config.dtype = clsa::DType::f32;
  clsa::SharedKVCache cache(cache_config, clsa::Backend::cpu);
  const clsa::SequenceId sequence = cache.add_sequence();
  const int tokens = 40;
  std::vector<float> k(tokens * 2 * 64), v(k.size()), index_keys(tokens * 64);
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = std::sin(0.1f * static_cast<float>(i));
    v[i] = std::cos(0.07f * static_cast<float>(i));
  }
  for (std::size_t i = 0; i < index_keys.size(); ++i) index_keys[i] = std::sin(0.3f * static_cast<float>(i));
  cache.append(sequence, clsa::TensorView(k.data(), clsa::DType::f32, {tokens, 2, 64}),
               clsa::TensorView(v.data(), clsa::DType::f32, {tokens, 2, 64}),
               clsa::TensorView(index_keys.data(), clsa::DType::f32, {tokens, 64}));
  const clsa::CacheBatch batch = cache.batch({sequence});

  clsa::IndexerConfig indexer_config;
  indexer_config.num_heads = 2;
  indexer_config.index_dim = 64;
  indexer_config.top_k = 64;  // >= length: routes everything
  clsa::CrossLayerIndexer indexer(indexer_config, clsa::Backend::cpu);
  std::vector<float> q_idx(2 * 64, 0.5f), weights(2, 1.0f);
  const clsa::RoutingIndex routing =
      indexer.select(batch, clsa::TensorView(q_idx.data(), clsa::DType::f32, {1, 1, 2, 64}),
                     clsa::TensorView(weights.data(), clsa::DType::f32, {1, 1, 2}));

  clsa::AttentionConfig attention_config;
  attention_config.num_q_heads = 4;
  attention_config.num_kv_heads = 2;
  attention_config.head_dim = 64;
  std::vector<float> q(4 * 64, 0.1f), sparse_out(q.size()), dense_out(q.size());
  clsa::SparseCrossAttention(attention_config, clsa::Backend::cpu)
      .forward(batch, routing, clsa::TensorView(q.data(), clsa::DType::f32, {1, 1, 4, 64}),
               clsa::TensorView(sparse_out.data(), clsa::DType::f32, {1, 1, 4, 64}));
  clsa::DenseCrossAttention(attention_config, clsa::Backend::cpu)
      .forward(batch, clsa::TensorView(q.data(), clsa::DType::f32, {1, 1, 4, 64}),
               clsa::TensorView(dense_out.data(), clsa::DType::f32, {1, 1, 4, 64}));
  float worst = 0.0f;
  for (std::size_t i = 0; i < q.size(); ++i) worst = std::fmax(worst, std::fabs(sparse_out[i] - dense_out[i]));
  std::printf("libclsa %s: sparse vs dense max difference %g\n", clsa::version(), static_cast<double>(worst));
  // One version everywhere: the library, its header and its CMake package.
  const bool same_version = std::strcmp(clsa::version(), CLSA_VERSION_STRING) == 0 &&
                            std::strcmp(CLSA_VERSION_STRING, CLSA_PACKAGE_VERSION) == 0;
  if (!same_version)
    std::printf("version mismatch: library %s, header %s, package %s\n", clsa::version(), CLSA_VERSION_STRING,
                CLSA_PACKAGE_VERSION);
  return worst < 1e-5f && same_version ? 0 : 1;
}
