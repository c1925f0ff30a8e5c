// A whole decoding step (one indexer select + L sparse layers) captured in a CUDA graph and
// replayed gives exactly the eager results: nothing allocates or synchronises inside the calls.
#include <algorithm>
#include <cstdlib>

#include "catch.hpp"
#include "support.hpp"

#if CLSA_TEST_WITH_CUDA
#include <cuda_runtime_api.h>

namespace {

void check(cudaError_t status, const char* what) {
  INFO(what << ": " << cudaGetErrorString(status));
  REQUIRE(status == cudaSuccess);
}

}  // namespace

TEST_CASE("a CUDA graph of a full CLSA step replays exactly like eager calls", "[graph][cuda]") {
  CLSA_SKIP_WITHOUT_GPU();
  using clsa::DType;
  test::Rng rng(test::base_seed() + 40);
  clsa::CacheConfig cache_config;
  cache_config.num_kv_heads = 4;
  cache_config.head_dim = 128;
  cache_config.index_dim = 128;
  cache_config.page_size = 64;
  const std::vector<std::int64_t> lengths = {5000, 1200, 9000};
  cache_config.max_pages = test::pages_for(lengths, 64);
  cache_config.dtype = DType::bf16;
  test::CacheFixture fixture(cache_config, clsa::Backend::cuda, lengths, rng);
  const clsa::CacheBatch batch = fixture.batch();

  constexpr int kLayers = 16;  // a full cross-decoder step at the reference depth
  const std::int64_t sequences = 3;
  clsa::IndexerConfig indexer_config;
  indexer_config.num_heads = 16;
  indexer_config.index_dim = 128;
  indexer_config.top_k = 512;
  indexer_config.sink_tokens = 4;
  indexer_config.local_window = 32;
  clsa::CrossLayerIndexer indexer(indexer_config, clsa::Backend::cuda);
  clsa::AttentionConfig attention_config;
  attention_config.num_q_heads = 16;
  attention_config.num_kv_heads = 4;
  attention_config.head_dim = 128;
  clsa::SparseCrossAttention attention(attention_config, clsa::Backend::cuda);
  indexer.reserve(4, 1, 10000);
  attention.reserve(4, 1, indexer_config.top_k);

  auto random_tensor = [&](std::initializer_list<std::int64_t> shape, DType dtype) {
    std::int64_t n = 1;
    for (std::int64_t e : shape) n *= e;
    std::vector<double> values(static_cast<std::size_t>(n));
    for (double& x : values) x = rng.normal();
    return test::on_device(test::make_host(values, dtype, shape), clsa::Backend::cuda);
  };
  const clsa::Tensor q_idx = random_tensor({sequences, 1, 16, 128}, DType::bf16);
  const clsa::Tensor weights = random_tensor({sequences, 1, 16}, DType::f32);
  std::vector<clsa::Tensor> queries, outputs;
  for (int l = 0; l < kLayers; ++l) {
    queries.push_back(random_tensor({sequences, 1, 16, 128}, DType::bf16));
    outputs.push_back(random_tensor({sequences, 1, 16, 128}, DType::bf16));
  }
  cudaStream_t stream = nullptr;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  auto step = [&] {
    const clsa::RoutingIndex routing = indexer.select(batch, q_idx, weights, stream);
    for (int l = 0; l < kLayers; ++l)
      attention.forward(batch, routing, queries[static_cast<std::size_t>(l)], outputs[static_cast<std::size_t>(l)],
                        stream);
  };
  auto read_all = [&] {
    std::vector<std::vector<double>> values;
    for (const clsa::Tensor& out : outputs) values.push_back(test::read_values(out));
    return values;
  };

  step();
  check(cudaStreamSynchronize(stream), "eager step");
  const std::vector<std::vector<double>> eager = read_all();

  cudaGraph_t graph = nullptr;
  check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
  step();
  check(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
  cudaGraphExec_t exec = nullptr;
  check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
  // Poison the outputs, then replay many times.
  for (clsa::Tensor& out : outputs) check(cudaMemsetAsync(out.view().data(), 0xff, out.bytes(), stream), "poison");
  // Sanitizer runs replay fewer times (racecheck keeps shadow state per launch).
  const char* replays_env = std::getenv("CLSA_GRAPH_REPLAYS");
  const int replays = replays_env != nullptr ? std::max(1, std::atoi(replays_env)) : 1000;
  for (int replay = 0; replay < replays; ++replay) check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
  check(cudaStreamSynchronize(stream), "replays");
  const std::vector<std::vector<double>> replayed = read_all();
  for (int l = 0; l < kLayers; ++l) {
    INFO("layer " << l);
    CHECK(replayed[static_cast<std::size_t>(l)] == eager[static_cast<std::size_t>(l)]);
  }
  check(cudaGraphExecDestroy(exec), "cudaGraphExecDestroy");
  check(cudaGraphDestroy(graph), "cudaGraphDestroy");
  check(cudaStreamDestroy(stream), "cudaStreamDestroy");
}
#endif
