// A whole decoding step (one indexer select + L sparse layers) captured in a CUDA graph and
// replayed gives exactly the eager results: nothing allocates or synchronises inside the calls.
#include <algorithm>
#include <cstdlib>

#include "catch.hpp"
#include "cuda_support.hpp"
#include "fixtures.hpp"
#include "support.hpp"

TEST_CASE("a CUDA graph of a full CLSA step replays exactly like eager calls", "[graph][cuda]") {
  CLSA_SKIP_WITHOUT_GPU();
  using clsa::DType;
  test::Rng rng(test::base_seed() + 40);
  constexpr test::StepShape kShape{16, 4, 128, 16, 128, 64};  // Hq, Hkv, D, H_idx, D_idx, page size
  const std::vector<std::int64_t> lengths = {5000, 1200, 9000};
  test::CacheFixture fixture(kShape.cache_config(test::pages_for(lengths, kShape.page_size)), clsa::Backend::cuda,
                             lengths, rng);
  const clsa::CacheBatch batch = fixture.batch();

  constexpr int kLayers = 16;  // a full cross-decoder step at the reference depth
  const std::int64_t sequences = 3;
  const clsa::IndexerConfig indexer_config = kShape.indexer_config(512, /*sink_tokens*/ 4, /*local_window*/ 32);
  clsa::CrossLayerIndexer indexer(indexer_config, clsa::Backend::cuda);
  clsa::SparseCrossAttention attention(kShape.attention_config(), clsa::Backend::cuda);
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
  const cuda_support::OwnedStream owned_stream(fixture.cache.device());
  const clsa::Stream stream = owned_stream.stream();
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
  owned_stream.wait();
  const std::vector<std::vector<double>> eager = read_all();

  const cuda_support::CapturedGraph graph = cuda_support::CapturedGraph::capture(stream, step);
  // Poison the outputs, then replay many times.
  for (const clsa::Tensor& out : outputs) owned_stream.fill(out.view().data(), 0xff, out.bytes());
  // Sanitizer runs replay fewer times (racecheck keeps shadow state per launch).
  const char* replays_env = std::getenv("CLSA_GRAPH_REPLAYS");
  const int replays = replays_env != nullptr ? std::max(1, std::atoi(replays_env)) : 1000;
  for (int replay = 0; replay < replays; ++replay) graph.replay(stream);
  owned_stream.wait();
  const std::vector<std::vector<double>> replayed = read_all();
  for (int l = 0; l < kLayers; ++l) {
    INFO("layer " << l);
    CHECK(replayed[static_cast<std::size_t>(l)] == eager[static_cast<std::size_t>(l)]);
  }
}
