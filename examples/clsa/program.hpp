// The `clsa` program's subcommands.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "clsa/clsa.hpp"

namespace clsa_program {

struct DemoOptions {
  clsa::Backend backend = clsa::Backend::automatic;
  clsa::DType dtype = clsa::DType::bf16;   // K/V (e4m3: activations bf16, scales calibrated from the model)
  std::optional<clsa::DType> index_dtype;  // the indexer keys; unset: dtype
  std::int64_t context = 4096;
  int top_k = 256;
  int layers = 4;
  int steps = 6;
  std::uint64_t seed = 1;
};

int run_demo(const DemoOptions& options);

struct BenchOptions {
  clsa::Backend backend = clsa::Backend::automatic;
  std::vector<std::int64_t> contexts;  // empty: 8K, 32K, 128K on a GPU; 4K, 16K, 32K on the CPU
  std::vector<int> batches;            // empty: 1, 8, 32 on a GPU; 1, 4 on the CPU
  int layers = 16;
  int q_heads = 32;
  int kv_heads = 8;
  int head_dim = 128;
  int index_heads = 16;
  int index_dim = 128;
  int top_k = 2048;
  clsa::DType dtype = clsa::DType::bf16;   // K/V (e4m3: activations bf16, one K and one V scale)
  std::optional<clsa::DType> index_dtype;  // the indexer keys; unset: dtype
  int iterations = 0;                      // 0: 30 on a GPU, 3 on the CPU
  int evict_l2_mb = 128;      // L2 evicted rows: MiB streamed by the feed-forward stand-in per layer; 0: off
  int routed_kv = 1;          // 1: the indexer gathers the routed K/V rows once per step (gather_routed_kv)
  int l2_persist_mb = 0;      // > 0: keep_routed_kv_in_l2 with this many MiB
  bool no_baselines = false;  // only the CLSA rows
  bool enable_pdl = false;    // the indexer's and the attentions' kernels launch as programmatic dependents
  std::string json, csv;
  std::uint64_t seed = 1;
};

int run_bench(const BenchOptions& options);

/// Parses "automatic", "cpu" or "cuda".
clsa::Backend parse_backend(const std::string& name);
/// Parses "f32", "f16", "bf16" or "e4m3".
clsa::DType parse_dtype(const std::string& name);

/// The shapes of a subcommand's step: the indexer's and the sparse attention's, and their caches'
/// dtypes.
struct StepShape {
  int index_heads, index_dim, top_k;
  int q_heads, kv_heads, head_dim;
  clsa::DType index_dtype, kv_dtype;
};

/// Whether `backend` runs a CrossLayerIndexer and a SparseCrossAttention of `shape`; if not, says
/// why on stderr ("clsa <command>: unsupported on <backend>: <why>"): refused configurations end
/// there, before any cache is allocated.
bool backend_runs(const char* command, clsa::Backend backend, const StepShape& shape);

}  // namespace clsa_program
