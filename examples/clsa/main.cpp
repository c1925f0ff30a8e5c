// clsa: the libclsa program. `clsa demo` runs a small CLSA cross-decoder end to end; `clsa bench`
// measures CLSA against dense and per-layer-indexer decoding.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <map>

#include "program.hpp"

namespace clsa_program {

clsa::Backend parse_backend(const std::string& name) {
  static const std::map<std::string, clsa::Backend> names = {
      {"automatic", clsa::Backend::automatic}, {"cpu", clsa::Backend::cpu}, {"cuda", clsa::Backend::cuda}};
  return names.at(name);
}

clsa::DType parse_dtype(const std::string& name) {
  static const std::map<std::string, clsa::DType> names = {
      {"f32", clsa::DType::f32}, {"f16", clsa::DType::f16}, {"bf16", clsa::DType::bf16}, {"e4m3", clsa::DType::e4m3}};
  return names.at(name);
}

bool backend_runs(const char* command, clsa::Backend backend, const StepShape& shape) {
  clsa::IndexerConfig indexer;
  indexer.num_heads = shape.index_heads;
  indexer.index_dim = shape.index_dim;
  indexer.top_k = shape.top_k;
  clsa::AttentionConfig attention;
  attention.num_q_heads = shape.q_heads;
  attention.num_kv_heads = shape.kv_heads;
  attention.head_dim = shape.head_dim;
  std::string why;
  if (clsa::CrossLayerIndexer::supports(indexer, shape.index_dtype, backend, &why) &&
      clsa::SparseCrossAttention::supports(attention, shape.kv_dtype, backend, &why)) {
    return true;
  }
  std::fprintf(stderr, "clsa %s: unsupported on %s: %s\n", command, clsa::backend_name(backend), why.c_str());
  return false;
}

}  // namespace clsa_program

int main(int argc, char** argv) {
  using namespace clsa_program;
  CLI::App app{"clsa: Cross-Layer Sparse Attention (libclsa " + std::string(clsa::version()) +
               ").\nOne shared KV cache, one indexer per decoding step, routing reused by every layer."};
  app.require_subcommand(1);
  const std::vector<std::string> backends = {"automatic", "cpu", "cuda"};

  DemoOptions demo;
  std::string demo_backend = "automatic";
  CLI::App* demo_command =
      app.add_subcommand("demo",
                         "Build a small random YOCO-style cross-decoder (its own query projection per layer, one "
                         "SharedKVCache), prefill a context with one planted needle, then decode steps with CLSA and "
                         "with dense attention; print per-step times, KV memory against per-layer caches, whether the "
                         "needle was routed, and the sparse-vs-dense output error.");
  demo_command
      ->add_option("--backend", demo_backend,
                   "automatic (CUDA when built with it and a GPU is present, else CPU), cpu or cuda")
      ->check(CLI::IsMember(backends))
      ->capture_default_str();
  demo_command->add_option("--context", demo.context, "tokens prefilled into the shared cache before decoding")
      ->check(CLI::Range(std::int64_t{64}, std::int64_t{1} << 24))
      ->capture_default_str();
  demo_command->add_option("--top-k", demo.top_k, "tokens each decoding step routes to (the indexer's top_k)")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  demo_command->add_option("--layers", demo.layers, "cross-decoder layers sharing the cache and the routing")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  demo_command->add_option("--steps", demo.steps, "decoding steps")->check(CLI::Range(1, 10000))->capture_default_str();
  demo_command->add_option("--seed", demo.seed, "random seed of the model and the data")->capture_default_str();
  std::string demo_dtype = "bf16", demo_index_dtype;
  const std::vector<std::string> dtypes = {"bf16", "f16", "f32", "e4m3"};
  demo_command
      ->add_option("--dtype", demo_dtype,
                   "K/V dtype of the shared cache; e4m3 keeps K and V in fp8 with per-kv-head scales calibrated from "
                   "the model's projections (queries and outputs stay bf16)")
      ->check(CLI::IsMember(dtypes))
      ->capture_default_str();
  demo_command
      ->add_option("--index-dtype", demo_index_dtype,
                   "dtype of the indexer keys (default: --dtype); e4m3 keeps one f32 scale per token and the demo "
                   "prints the routing recall of those keys against bf16 keys (mean and minimum overlap of the routed "
                   "sets)")
      ->check(CLI::IsMember(dtypes));

  BenchOptions bench;
  std::string bench_backend = "automatic";
  std::string bench_dtype = "bf16";
  CLI::App* bench_command = app.add_subcommand(
      "bench",
      "Time one decoding step of an L-layer cross-decoder three ways over the same SharedKVCache: "
      "dense (every layer full attention), per-layer indexer (every layer its own indexer + top-k, "
      "as DSA), and CLSA (one indexer, routing reused by every layer); also each component alone. "
      "Each row: median time, the fewest bytes the method must read, achieved GB/s, fraction of "
      "the copy bandwidth measured at start, how many times its byte floor at that bandwidth it takes "
      "(x floor), and dense/x, per-layer/x ratios; the step rows again with the L2 evicted between "
      "layers (--evict-l2-mb).");
  bench_command->add_option("--backend", bench_backend, "automatic, cpu or cuda")
      ->check(CLI::IsMember(backends))
      ->capture_default_str();
  bench_command
      ->add_option("--context", bench.contexts, "context lengths (default 8192 32768 131072; CPU 4096 16384 32768)")
      ->check(CLI::PositiveNumber);
  bench_command->add_option("--batch", bench.batches, "batch sizes (default 1 8 32; CPU 1 4)")
      ->check(CLI::PositiveNumber);
  bench_command->add_option("--layers", bench.layers, "cross-decoder layers L")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  bench_command->add_option("--q-heads", bench.q_heads, "query heads Hq")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  bench_command->add_option("--kv-heads", bench.kv_heads, "kv heads Hkv")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  bench_command->add_option("--head-dim", bench.head_dim, "head dimension D (64, 128, 256)")
      ->check(CLI::IsMember({64, 128, 256}))
      ->capture_default_str();
  bench_command->add_option("--index-heads", bench.index_heads, "indexer heads H_idx")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  bench_command->add_option("--index-dim", bench.index_dim, "indexer key dimension D_idx (64, 128)")
      ->check(CLI::IsMember({64, 128}))
      ->capture_default_str();
  bench_command->add_option("--top-k", bench.top_k, "routed tokens per query")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  bench_command
      ->add_option("--dtype", bench_dtype,
                   "K/V dtype of the cache, and the activations' (e4m3: K/V in fp8 with one scale each, activations "
                   "bf16)")
      ->check(CLI::IsMember(dtypes))
      ->capture_default_str();
  std::string bench_index_dtype;
  bench_command
      ->add_option("--index-dtype", bench_index_dtype,
                   "dtype of the indexer keys (default: --dtype); e4m3 keeps one f32 scale per token")
      ->check(CLI::IsMember(dtypes));
  bench_command->add_option("--iterations", bench.iterations, "timed runs per row (median; default 30 GPU, 3 CPU)")
      ->check(CLI::NonNegativeNumber);
  bench_command
      ->add_option("--evict-l2-mb", bench.evict_l2_mb,
                   "also time the step rows (and a 'sparse layer (cold L2)' row) with a stand-in for the decoder's "
                   "feed-forward weights before every cross-attention layer: a copy of a buffer of this many MiB "
                   "(half onto half) that evicts the L2; its own time, measured alone the same way, is subtracted. "
                   "Rows named '(L2 evicted)'. 0: off")
      ->check(CLI::Range(0, 1 << 16))
      ->capture_default_str();
  bench_command
      ->add_option("--routed-kv", bench.routed_kv,
                   "1: the indexer gathers the routed K/V rows once per step (gather_routed_kv) and every layer reads "
                   "them contiguously; 0: every layer gathers from the pool")
      ->check(CLI::Range(0, 1))
      ->capture_default_str();
  bench_command
      ->add_option("--l2-persist-mb", bench.l2_persist_mb,
                   "keep the routed K/V block in a persisting L2 carve-out of this many MiB (keep_routed_kv_in_l2, a "
                   "device-wide setting; the stand-in runs under it too); 0: off")
      ->check(CLI::Range(0, 1024))
      ->capture_default_str();
  bench_command->add_flag("--pdl", bench.enable_pdl,
                          "launch the indexer's and the attentions' kernels as programmatic dependents of the kernel "
                          "before them (IndexerConfig/AttentionConfig::enable_pdl; CUDA sm_90+)");
  bench_command->add_flag("--no-baselines", bench.no_baselines,
                          "time only the CLSA rows (no dense or per-layer-indexer steps)");
  bench_command->add_option("--json", bench.json, "also write the rows as JSON to this file");
  bench_command->add_option("--csv", bench.csv, "also write the rows as CSV to this file");
  bench_command->add_option("--seed", bench.seed, "random seed of the data")->capture_default_str();

  CLI11_PARSE(app, argc, argv);
  try {
    if (demo_command->parsed()) {
      demo.backend = parse_backend(demo_backend);
      demo.dtype = parse_dtype(demo_dtype);
      if (!demo_index_dtype.empty()) demo.index_dtype = parse_dtype(demo_index_dtype);
      return run_demo(demo);
    }
    if (bench_command->parsed()) {
      bench.backend = parse_backend(bench_backend);
      bench.dtype = parse_dtype(bench_dtype);
      if (!bench_index_dtype.empty()) bench.index_dtype = parse_dtype(bench_index_dtype);
      return run_bench(bench);
    }
  } catch (const clsa::Error& error) {
    std::fprintf(stderr, "clsa: error (%s): %s\n", clsa::error_code_name(error.code()), error.what());
    return 1;
  }
  return 0;
}
