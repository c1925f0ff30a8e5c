// Bad input: every class raises clsa::Error with the right code and a message naming the argument,
// and leaves outputs and the cache untouched.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "catch.hpp"
#include "support.hpp"

namespace {

using clsa::Backend;
using clsa::DType;
using clsa::ErrorCode;
using clsa::TensorView;

clsa::CacheConfig small_cache() {
  clsa::CacheConfig config;
  config.num_kv_heads = 2;
  config.head_dim = 64;
  config.index_dim = 64;
  config.page_size = 16;
  config.max_pages = 8;
  config.dtype = DType::bf16;
  return config;
}

}  // namespace

TEST_CASE("bad cache configurations are refused", "[errors]") {
  auto with = [](auto change) {
    clsa::CacheConfig config = small_cache();
    change(config);
    return config;
  };
  CLSA_REQUIRE_ERROR(clsa::SharedKVCache(with([](auto& c) { c.page_size = 24; }), Backend::cpu),
                     ErrorCode::invalid_argument, "page_size = 24");
  CLSA_REQUIRE_ERROR(clsa::SharedKVCache(with([](auto& c) { c.max_pages = 0; }), Backend::cpu),
                     ErrorCode::invalid_argument, "max_pages");
  CLSA_REQUIRE_ERROR(clsa::SharedKVCache(with([](auto& c) { c.head_dim = 0; }), Backend::cpu),
                     ErrorCode::invalid_argument, "head_dim");
  CLSA_REQUIRE_ERROR(clsa::SharedKVCache(with([](auto& c) { c.num_kv_heads = -1; }), Backend::cpu),
                     ErrorCode::invalid_argument, "num_kv_heads");
  CLSA_REQUIRE_ERROR(clsa::SharedKVCache(with([](auto& c) { c.dtype = DType::i32; }), Backend::cpu),
                     ErrorCode::dtype_mismatch, "dtype");
  CLSA_REQUIRE_ERROR(clsa::SharedKVCache(with([](auto& c) { c.max_pages = std::int64_t{1} << 40; }), Backend::cpu),
                     ErrorCode::invalid_argument, "int32");
}

TEST_CASE("bad appends are refused and change nothing", "[errors]") {
  clsa::SharedKVCache cache(small_cache(), Backend::cpu);
  const clsa::SequenceId id = cache.add_sequence();
  clsa::Tensor k = clsa::Tensor::empty({3, 2, 64}, DType::bf16);
  clsa::Tensor ik = clsa::Tensor::empty({3, 64}, DType::bf16);
  clsa::Tensor k_wrong_heads = clsa::Tensor::empty({3, 4, 64}, DType::bf16);
  clsa::Tensor k_f32 = clsa::Tensor::empty({3, 2, 64}, DType::f32);
  clsa::Tensor ik_short = clsa::Tensor::empty({2, 64}, DType::bf16);
  clsa::Tensor big = clsa::Tensor::empty({200, 2, 64}, DType::bf16);
  clsa::Tensor big_ik = clsa::Tensor::empty({200, 64}, DType::bf16);
  const TensorView on_gpu(k.view().data(), DType::bf16, {3, 2, 64}, clsa::Device::cuda(0));
  const TensorView inner_strided(k.view().data(), DType::bf16, {3, 2, 32}, {128, 64, 2});

  CLSA_REQUIRE_ERROR(cache.append(id, k_wrong_heads, k, ik), ErrorCode::shape_mismatch, "k is [3,4,64]");
  CLSA_REQUIRE_ERROR(cache.append(id, k, k_f32, ik), ErrorCode::dtype_mismatch, "v is [3,2,64] f32");
  CLSA_REQUIRE_ERROR(cache.append(id, k, k, ik_short), ErrorCode::shape_mismatch, "index_keys");
  CLSA_REQUIRE_ERROR(cache.append(id, on_gpu, k, ik), ErrorCode::device_mismatch, "cuda:0");
  CLSA_REQUIRE_ERROR(cache.append(id, inner_strided, k, ik), ErrorCode::shape_mismatch, "k is");
  CLSA_REQUIRE_ERROR(cache.append(id, TensorView(), k, ik), ErrorCode::invalid_argument, "k is empty");
  CLSA_REQUIRE_ERROR(cache.append(static_cast<clsa::SequenceId>(77), k, k, ik), ErrorCode::unknown_sequence,
                     "sequence 77");
  CLSA_REQUIRE_ERROR(cache.append(id, big, big, big_ik), ErrorCode::capacity_exceeded, "sequence");
  CHECK(cache.length(id) == 0);
  CHECK(cache.memory().pages_used == 0);
  CLSA_REQUIRE_ERROR(cache.batch(std::vector<clsa::SequenceId>{id, static_cast<clsa::SequenceId>(5)}),
                     ErrorCode::unknown_sequence, "sequences[1] = 5");
  CLSA_REQUIRE_ERROR(cache.batch(std::vector<clsa::SequenceId>{}), ErrorCode::invalid_argument, "empty");
  CLSA_REQUIRE_ERROR(cache.release(static_cast<clsa::SequenceId>(78)), ErrorCode::unknown_sequence, "78");
}

TEST_CASE("bad indexer configurations and inputs are refused", "[errors]") {
  clsa::IndexerConfig good;
  good.num_heads = 4;
  good.index_dim = 64;
  good.top_k = 32;
  auto with = [&](auto change) {
    clsa::IndexerConfig config = good;
    change(config);
    return config;
  };
  CLSA_REQUIRE_ERROR(clsa::CrossLayerIndexer(with([](auto& c) { c.top_k = 0; }), Backend::cpu),
                     ErrorCode::invalid_argument, "top_k = 0");
  CLSA_REQUIRE_ERROR(clsa::CrossLayerIndexer(with([](auto& c) { c.top_k = -3; }), Backend::cpu),
                     ErrorCode::invalid_argument, "top_k = -3");
  CLSA_REQUIRE_ERROR(
      clsa::CrossLayerIndexer(with([](auto& c) { c.sink_tokens = 30, c.local_window = 3; }), Backend::cpu),
      ErrorCode::invalid_argument, "exceeds config.top_k");
  CLSA_REQUIRE_ERROR(clsa::CrossLayerIndexer(with([](auto& c) { c.scale = 0.0f; }), Backend::cpu),
                     ErrorCode::invalid_argument, "scale");
  CLSA_REQUIRE_ERROR(clsa::CrossLayerIndexer(with([](auto& c) { c.scale = std::nanf(""); }), Backend::cpu),
                     ErrorCode::invalid_argument, "scale");
  CLSA_REQUIRE_ERROR(clsa::CrossLayerIndexer(with([](auto& c) { c.num_heads = 0; }), Backend::cpu),
                     ErrorCode::invalid_argument, "num_heads");

  test::Rng rng(test::base_seed() + 30);
  test::CacheFixture fixture(small_cache(), Backend::cpu, {20, 3}, rng);
  const clsa::CacheBatch batch = fixture.batch();
  clsa::CrossLayerIndexer indexer(good, Backend::cpu);
  clsa::Tensor q = clsa::Tensor::empty({2, 1, 4, 64}, DType::bf16);
  clsa::Tensor w = clsa::Tensor::empty({2, 1, 4}, DType::f32);
  clsa::Tensor q4 = clsa::Tensor::empty({2, 4, 4, 64}, DType::bf16);
  clsa::Tensor w4 = clsa::Tensor::empty({2, 4, 4}, DType::f32);
  clsa::Tensor q_f16 = clsa::Tensor::empty({2, 1, 4, 64}, DType::f16);
  clsa::Tensor q_dim = clsa::Tensor::empty({2, 1, 4, 128}, DType::bf16);
  clsa::Tensor w_int = clsa::Tensor::empty({2, 1, 4}, DType::i32);
  clsa::Tensor q_one = clsa::Tensor::empty({1, 1, 4, 64}, DType::bf16);
  CLSA_REQUIRE_ERROR(indexer.select(batch, q_dim, w), ErrorCode::shape_mismatch, "q_idx is [2,1,4,128]");
  CLSA_REQUIRE_ERROR(indexer.select(batch, q_one, w), ErrorCode::shape_mismatch, "q_idx");
  CLSA_REQUIRE_ERROR(indexer.select(batch, q_f16, w), ErrorCode::dtype_mismatch, "expected dtype bf16");
  CLSA_REQUIRE_ERROR(indexer.select(batch, q, w_int), ErrorCode::dtype_mismatch, "head_weights");
  CLSA_REQUIRE_ERROR(indexer.select(batch, q4, w4), ErrorCode::invalid_argument, "sequence 1 holds 3 tokens");
  // Caller-owned output of the wrong shape: nothing written.
  clsa::Tensor positions = clsa::Tensor::empty({2, 1, 16}, DType::i32);
  clsa::Tensor counts = clsa::Tensor::empty({2, 1}, DType::i32);
  std::fill(counts.data_as<std::int32_t>(), counts.data_as<std::int32_t>() + 2, 12345);
  clsa::RoutingIndex wrong{positions, counts, 16};
  CLSA_REQUIRE_ERROR(indexer.select(batch, q, w, wrong), ErrorCode::shape_mismatch, "out.positions");
  CHECK(counts.data_as<std::int32_t>()[0] == 12345);
  // A cache whose indexer keys have another dimension.
  clsa::IndexerConfig wide = good;
  wide.index_dim = 128;
  clsa::CrossLayerIndexer wide_indexer(wide, Backend::cpu);
  CLSA_REQUIRE_ERROR(wide_indexer.select(batch, q_dim, w), ErrorCode::shape_mismatch, "index_dim 64");
}

TEST_CASE("bad attention configurations and inputs are refused and write nothing", "[errors]") {
  clsa::AttentionConfig good;
  good.num_q_heads = 6;
  good.num_kv_heads = 2;
  good.head_dim = 64;
  auto with = [&](auto change) {
    clsa::AttentionConfig config = good;
    change(config);
    return config;
  };
  CLSA_REQUIRE_ERROR(clsa::SparseCrossAttention(with([](auto& c) { c.num_q_heads = 5; }), Backend::cpu),
                     ErrorCode::invalid_argument, "not a multiple");
  CLSA_REQUIRE_ERROR(clsa::DenseCrossAttention(with([](auto& c) { c.softmax_scale = -1.0f; }), Backend::cpu),
                     ErrorCode::invalid_argument, "softmax_scale");
  CLSA_REQUIRE_ERROR(clsa::DenseCrossAttention(with([](auto& c) { c.head_dim = 0; }), Backend::cpu),
                     ErrorCode::invalid_argument, "head_dim");

  test::Rng rng(test::base_seed() + 31);
  test::CacheFixture fixture(small_cache(), Backend::cpu, {20, 9}, rng);
  const clsa::CacheBatch batch = fixture.batch();
  clsa::IndexerConfig indexer_config;
  indexer_config.num_heads = 1;
  indexer_config.index_dim = 64;
  indexer_config.top_k = 8;
  clsa::CrossLayerIndexer indexer(indexer_config, Backend::cpu);
  clsa::Tensor q_idx = clsa::Tensor::empty({2, 1, 1, 64}, DType::bf16);
  clsa::Tensor w = clsa::Tensor::empty({2, 1, 1}, DType::f32);
  std::fill(q_idx.data_as<clsa::bfloat16>(), q_idx.data_as<clsa::bfloat16>() + 128, clsa::to_bfloat16(0.5f));
  std::fill(w.data_as<float>(), w.data_as<float>() + 2, 1.0f);
  const clsa::RoutingIndex routing = indexer.select(batch, q_idx, w);

  clsa::SparseCrossAttention sparse(good, Backend::cpu);
  clsa::DenseCrossAttention dense(good, Backend::cpu);
  clsa::Tensor q = clsa::Tensor::empty({2, 1, 6, 64}, DType::bf16);
  std::fill(q.data_as<clsa::bfloat16>(), q.data_as<clsa::bfloat16>() + q.numel(), clsa::to_bfloat16(0.25f));
  clsa::Tensor out = clsa::Tensor::empty({2, 1, 6, 64}, DType::bf16);
  const std::uint16_t poison = 0x7fc1;
  std::fill(reinterpret_cast<std::uint16_t*>(out.view().data()),
            reinterpret_cast<std::uint16_t*>(out.view().data()) + out.numel(), poison);
  auto untouched = [&] {
    const auto* bits = reinterpret_cast<const std::uint16_t*>(out.view().data());
    return std::all_of(bits, bits + out.numel(), [&](std::uint16_t b) { return b == poison; });
  };
  clsa::Tensor out_f32 = clsa::Tensor::empty({2, 1, 6, 64}, DType::f32);
  clsa::Tensor q_heads = clsa::Tensor::empty({2, 1, 8, 64}, DType::bf16);
  clsa::Tensor lse_wrong = clsa::Tensor::empty({2, 1, 5}, DType::f32);
  clsa::Tensor lse_bf16 = clsa::Tensor::empty({2, 1, 6}, DType::bf16);
  CLSA_REQUIRE_ERROR(sparse.forward(batch, routing, q_heads, out), ErrorCode::shape_mismatch, "q is [2,1,8,64]");
  CLSA_REQUIRE_ERROR(sparse.forward(batch, routing, q, out_f32), ErrorCode::dtype_mismatch, "out is");
  CLSA_REQUIRE_ERROR(dense.forward(batch, q, out, {}, lse_wrong), ErrorCode::shape_mismatch, "lse is [2,1,5]");
  CLSA_REQUIRE_ERROR(dense.forward(batch, q, out, {}, lse_bf16), ErrorCode::dtype_mismatch, "lse");
  CLSA_REQUIRE_ERROR(sparse.forward(batch, clsa::RoutingIndex{}, q, out), ErrorCode::invalid_argument, "routing");
  // Routing of another batch shape.
  clsa::Tensor q_three = clsa::Tensor::empty({1, 3, 6, 64}, DType::bf16);
  CLSA_REQUIRE_ERROR(sparse.forward(batch, routing, q_three, out), ErrorCode::shape_mismatch, "q is");
  // Routing that names positions the query cannot see.
  clsa::Tensor bad_positions = clsa::Tensor::empty({2, 1, 8}, DType::i32);
  clsa::Tensor bad_counts = clsa::Tensor::empty({2, 1}, DType::i32);
  for (int i = 0; i < 16; ++i) bad_positions.data_as<std::int32_t>()[i] = i % 8;  // all visible
  bad_counts.data_as<std::int32_t>()[0] = 8;
  bad_counts.data_as<std::int32_t>()[1] = 8;
  bad_positions.data_as<std::int32_t>()[8 + 3] = 9;
  CLSA_REQUIRE_ERROR(sparse.forward(batch, clsa::RoutingIndex{bad_positions, bad_counts, 8}, q, out),
                     ErrorCode::invalid_argument, "routing.positions[1,0,3] = 9");
  bad_positions.data_as<std::int32_t>()[8 + 3] = 3;
  bad_counts.data_as<std::int32_t>()[1] = -1;
  CLSA_REQUIRE_ERROR(sparse.forward(batch, clsa::RoutingIndex{bad_positions, bad_counts, 8}, q, out),
                     ErrorCode::invalid_argument, "routing.counts[1,0] = -1");
  bad_counts.data_as<std::int32_t>()[1] = 9;
  CLSA_REQUIRE_ERROR(sparse.forward(batch, clsa::RoutingIndex{bad_positions, bad_counts, 8}, q, out),
                     ErrorCode::invalid_argument, "routing.counts[1,0] = 9");
  // A cache of another head shape.
  clsa::AttentionConfig other = good;
  other.num_kv_heads = 3;
  other.num_q_heads = 6;
  clsa::DenseCrossAttention mismatched(other, Backend::cpu);
  CLSA_REQUIRE_ERROR(mismatched.forward(batch, q, out), ErrorCode::shape_mismatch, "num_kv_heads 2");
  CHECK(untouched());
  // And a good call writes.
  sparse.forward(batch, routing, q, out);
  CHECK_FALSE(untouched());
}

TEST_CASE("Backend::cuda without a GPU is a clear error; automatic falls back to the CPU", "[errors]") {
  clsa::SharedKVCache automatic(small_cache(), Backend::automatic);
  if (clsa::cuda_device_count() > 0) {
    CHECK(automatic.backend() == Backend::cuda);
    CHECK(automatic.device().is_cuda());
    return;
  }
  CHECK(automatic.backend() == Backend::cpu);
  CHECK(automatic.device().is_cpu());
  CLSA_REQUIRE_ERROR(clsa::SharedKVCache(small_cache(), Backend::cuda), ErrorCode::unsupported, "Backend::cuda");
  CLSA_REQUIRE_ERROR(clsa::SparseCrossAttention(clsa::AttentionConfig{}, Backend::cuda), ErrorCode::unsupported,
                     "CUDA");
}

TEST_CASE("tensors on another device than the component are refused", "[errors]") {
  test::Rng rng(test::base_seed() + 32);
  test::CacheFixture fixture(small_cache(), Backend::cpu, {10}, rng);
  clsa::AttentionConfig config;
  config.num_q_heads = 2;
  config.num_kv_heads = 2;
  config.head_dim = 64;
  clsa::DenseCrossAttention dense(config, Backend::cpu);
  clsa::Tensor q = clsa::Tensor::empty({1, 1, 2, 64}, DType::bf16);
  const TensorView q_elsewhere(q.view().data(), DType::bf16, {1, 1, 2, 64}, clsa::Device::cuda(0));
  CLSA_REQUIRE_ERROR(dense.forward(fixture.batch(), q_elsewhere, q), ErrorCode::device_mismatch, "q is");
}

TEST_CASE("CUDA-only limits are clear errors", "[errors][cuda]") {
  CLSA_SKIP_WITHOUT_GPU();
  clsa::AttentionConfig odd;
  odd.num_q_heads = 2;
  odd.num_kv_heads = 2;
  odd.head_dim = 96;
  CLSA_REQUIRE_ERROR(clsa::DenseCrossAttention(odd, Backend::cuda), ErrorCode::unsupported, "head_dim = 96");
  test::Rng rng(test::base_seed() + 33);
  clsa::CacheConfig config = small_cache();
  test::CacheFixture fixture(config, Backend::cuda, {20}, rng);
  clsa::AttentionConfig good;
  good.num_q_heads = 2;
  good.num_kv_heads = 2;
  good.head_dim = 64;
  clsa::DenseCrossAttention dense(good, Backend::cuda);
  const clsa::Device device = test::device_of(Backend::cuda);
  const clsa::Tensor buffer = clsa::Tensor::empty({2 * 64 + 8}, DType::bf16, device);
  // A view one element past an aligned pointer: 16-byte loads cannot read it.
  const TensorView shifted(static_cast<clsa::bfloat16*>(buffer.view().data()) + 1, DType::bf16, {1, 1, 2, 64}, device);
  const TensorView out(buffer.view().data(), DType::bf16, {1, 1, 2, 64}, device);
  CLSA_REQUIRE_ERROR(dense.forward(fixture.batch(), shifted, out), ErrorCode::shape_mismatch, "16 bytes");
  clsa::IndexerConfig wide;
  wide.num_heads = 2;
  wide.index_dim = 96;
  wide.top_k = 8;
  clsa::CacheConfig wide_cache = small_cache();
  wide_cache.index_dim = 96;
  test::CacheFixture wide_fixture(wide_cache, Backend::cuda, {20}, rng);
  const clsa::Tensor q_idx = clsa::Tensor::empty({1, 1, 2, 96}, DType::bf16, device);
  const clsa::Tensor w = clsa::Tensor::empty({1, 1, 2}, DType::f32, device);
  clsa::CrossLayerIndexer indexer(wide, Backend::cuda);
  CLSA_REQUIRE_ERROR(indexer.select(wide_fixture.batch(), q_idx, w), ErrorCode::unsupported, "index_dim 96");

  // supports() answers the same question before anything is built, with the same reason.
  std::string why;
  CHECK_FALSE(clsa::SparseCrossAttention::supports(odd, Backend::cuda, &why));
  CHECK(why.find("head_dim = 96") != std::string::npos);
  CHECK(clsa::SparseCrossAttention::supports(good, Backend::cuda, &why));
  CHECK(why.empty());
  CHECK_FALSE(clsa::CrossLayerIndexer::supports(wide, DType::bf16, Backend::cuda, &why));
  CHECK(why.find("index_dim 96") != std::string::npos);
  CHECK(clsa::CrossLayerIndexer::supports(wide, DType::f32, Backend::cuda));  // f32 keys: any multiple of 4
  wide.index_dim = 128;
  CHECK(clsa::CrossLayerIndexer::supports(wide, DType::bf16, Backend::cuda));
}

TEST_CASE("supports(): the CPU backend runs every configuration; CUDA without a device does not", "[errors]") {
  clsa::AttentionConfig odd;
  odd.num_q_heads = 2;
  odd.num_kv_heads = 2;
  odd.head_dim = 96;
  clsa::IndexerConfig wide;
  wide.num_heads = 2;
  wide.index_dim = 96;
  wide.top_k = 8;
  std::string why = "unchanged";
  CHECK(clsa::SparseCrossAttention::supports(odd, Backend::cpu, &why));
  CHECK(why.empty());
  CHECK(clsa::CrossLayerIndexer::supports(wide, DType::bf16, Backend::cpu));
  CHECK_FALSE(clsa::CrossLayerIndexer::supports(wide, DType::i32, Backend::cpu, &why));
  CHECK(why.find("dtype") != std::string::npos);
  if (clsa::cuda_device_count() == 0) {
    CHECK_FALSE(clsa::SparseCrossAttention::supports(odd, Backend::cuda, &why));
    CHECK_FALSE(why.empty());
  }
}
