// embed_engine: plays an inference engine that embeds libclsa.
//
// The engine owns everything a real one owns: the paged K/V/indexer-key pool (its own layout:
// K and V interleaved per page), the page allocator, the FlashInfer-style page tables
// (indptr, indices, last page lengths), its activations and the workspaces. libclsa reads them
// where they are (CacheBatch::wrap, set_workspace): nothing is copied or allocated by the library
// per step.
//
// It runs a continuous-batching loop the way an engine does. The components are planned once, on
// engine workspace, for the largest step. Sequences join with a prompt (prefilled in chunks, the
// last chunk's tokens querying the cache together: T > 1), decode one token per step and leave at
// different times, so the batch size changes from step to step; a step's batch is padded with
// empty slots up to a bucket (1, 2, 4 or 8 slots). The page tables and activations are allocated
// once for the largest bucket and never move: each step the engine rewrites its tables in place
// (on its stream) and wraps them again. On CUDA the step of each (bucket, T) -- one indexer
// select, the L sparse layers and, as the check, L dense layers -- is captured once as a CUDA
// graph and replayed; on the CPU the same loop runs eagerly.
//
// Every step is checked, and any failure makes the program exit 1: with top_k >= every length,
// sparse must equal dense on every row; every live row is held against the engine's own record of
// what it wrote (one head per layer); empty slots must route nothing and write zeros; outputs are
// poisoned (NaN) before each step, so a row the step did not write cannot pass.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "clsa/clsa.hpp"
#include "clsa/paged_view.hpp"
#include "cuda_support.hpp"
#include "engine_support.hpp"

namespace {

constexpr int kLayers = 4;
constexpr int kQHeads = 8, kKvHeads = 2, kHeadDim = 64;
constexpr int kIndexHeads = 4, kIndexDim = 64;
constexpr int kPageSize = 16;
constexpr int kMaxSequences = 8;
constexpr int kBuckets[] = {1, 2, 4, 8};  // slots a step's batch is padded to (the last is kMaxSequences)
constexpr int kMaxLength = 640;
constexpr int kTopK = 1024;    // >= every length: sparse must equal dense
constexpr int kMaxTokens = 8;  // query tokens per sequence in one call (prefill chunk tail)
constexpr std::int64_t kMaxRows = std::int64_t{kMaxSequences} * kMaxTokens;  // query rows of the largest step
constexpr std::int64_t kQSize = std::int64_t{kQHeads} * kHeadDim;            // one row's q (or output)
constexpr float kTolerance = 0.02f;

/// The engine's pool: [page][2 (K, V)][page_size][kv_heads][head_dim] and
/// [page][page_size][index_dim], bf16, on the engine's device.
struct EnginePool {
  clsa::Device device;
  int pages;
  clsa::Tensor kv, index_keys;
  std::vector<int> free_pages;

  EnginePool(clsa::Device on, int page_count) : device(on), pages(page_count) {
    kv = clsa::Tensor::empty({pages, 2, kPageSize, kKvHeads, kHeadDim}, clsa::DType::bf16, device);
    index_keys = clsa::Tensor::empty({pages, kPageSize, kIndexDim}, clsa::DType::bf16, device);
    for (int p = pages - 1; p >= 0; --p) free_pages.push_back(p);
  }

  clsa::PagedCacheLayout layout() const {
    clsa::CacheConfig shape;
    shape.num_kv_heads = kKvHeads;
    shape.head_dim = kHeadDim;
    shape.index_dim = kIndexDim;
    shape.page_size = kPageSize;
    shape.max_pages = pages;
    shape.dtype = clsa::DType::bf16;
    return engine_support::interleaved_layout(shape, device, pages, kv, index_keys, kIndexDim);
  }
};

/// The engine's page tables, FlashInfer-style, sized once for the largest bucket: device copies
/// (read by the kernels, and by every captured step: they never move) and host copies.
struct EngineTables {
  clsa::Tensor indptr, indices, last;  // on the engine's device
  std::vector<std::int32_t> host_indptr, host_indices, host_last;

  EngineTables(clsa::Device device, int max_sequences, int max_pages) {
    indptr = clsa::Tensor::empty({max_sequences + 1}, clsa::DType::i32, device);
    indices = clsa::Tensor::empty({max_pages}, clsa::DType::i32, device);
    last = clsa::Tensor::empty({max_sequences}, clsa::DType::i32, device);
    host_indptr.assign(static_cast<std::size_t>(max_sequences) + 1, 0);
    host_indices.assign(static_cast<std::size_t>(max_pages), 0);
    host_last.assign(static_cast<std::size_t>(max_sequences), 0);
  }
};

struct Sequence {
  int id;
  std::vector<int> pages;
  int length = 0;
  int prompt = 0;  // tokens still to prefill
  int decode_left = 0;
  std::vector<float> host_k, host_v;  // what the engine wrote, [length][kv_heads][head_dim]
};

std::vector<clsa::bfloat16> random_bf16(std::mt19937_64& rng, std::size_t count) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<clsa::bfloat16> values(count);
  for (clsa::bfloat16& x : values) x = clsa::to_bfloat16(normal(rng));
  return values;
}

/// The engine writes a token's K, V and indexer key into its own pool (on its stream).
void write_token(EnginePool& pool, Sequence& seq, std::mt19937_64& rng, const cuda_support::OwnedStream& lane) {
  if (seq.length % kPageSize == 0) {
    if (pool.free_pages.empty()) throw std::runtime_error("engine: out of pages");
    seq.pages.push_back(pool.free_pages.back());
    pool.free_pages.pop_back();
  }
  const int page = seq.pages.back();
  const int slot = seq.length % kPageSize;
  const std::size_t row = kKvHeads * kHeadDim;
  auto* kv = static_cast<clsa::bfloat16*>(pool.kv.view().data());
  auto* keys = static_cast<clsa::bfloat16*>(pool.index_keys.view().data());
  for (int part = 0; part < 2; ++part) {
    const std::vector<clsa::bfloat16> values = random_bf16(rng, row);
    lane.upload(kv + ((static_cast<std::size_t>(page) * 2 + part) * kPageSize + slot) * row, values.data(),
                row * sizeof(clsa::bfloat16));
    std::vector<float>& host = part == 0 ? seq.host_k : seq.host_v;
    for (const clsa::bfloat16 x : values) host.push_back(clsa::to_float(x));
  }
  const std::vector<clsa::bfloat16> key = random_bf16(rng, kIndexDim);
  lane.upload(keys + (static_cast<std::size_t>(page) * kPageSize + slot) * kIndexDim, key.data(),
              kIndexDim * sizeof(clsa::bfloat16));
  ++seq.length;
}

/// Host reference of one output row: query head `head` of a query token that sees the sequence's
/// first `visible` positions, from what the engine wrote (independent of libclsa's reading of the
/// pool).
std::vector<float> reference_row(const Sequence& seq, int visible, const clsa::bfloat16* q, int head) {
  const int kv = head / (kQHeads / kKvHeads);
  std::vector<double> logits(static_cast<std::size_t>(visible));
  double top = -1e300;
  for (int p = 0; p < visible; ++p) {
    double dot = 0.0;
    for (int d = 0; d < kHeadDim; ++d) {
      dot += clsa::to_float(q[d]) * seq.host_k[(static_cast<std::size_t>(p) * kKvHeads + kv) * kHeadDim + d];
    }
    logits[static_cast<std::size_t>(p)] = dot / 8.0;  // 1 / sqrt(head_dim)
    top = std::max(top, logits[static_cast<std::size_t>(p)]);
  }
  double total = 0.0;
  for (double& x : logits) total += (x = std::exp(x - top));
  std::vector<float> out(kHeadDim, 0.0f);
  for (int d = 0; d < kHeadDim; ++d) {
    double acc = 0.0;
    for (int p = 0; p < visible; ++p) {
      acc += logits[static_cast<std::size_t>(p)] *
             seq.host_v[(static_cast<std::size_t>(p) * kKvHeads + kv) * kHeadDim + d];
    }
    out[static_cast<std::size_t>(d)] = static_cast<float>(acc / total);
  }
  return out;
}

/// |got - expected| relative to |expected| (with a floor); NaN counts as infinitely wrong.
float relative_error(float got, float expected) {
  const float error = std::abs(got - expected) / (0.02f + std::abs(expected));
  return std::isnan(error) ? std::numeric_limits<float>::infinity() : error;
}

int bucket_for(int sequences) {
  for (const int bucket : kBuckets) {
    if (bucket >= sequences) return bucket;
  }
  return kMaxSequences;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "embed_engine: an inference engine's continuous-batching loop over engine-owned memory, "
      "checked against dense attention"};
  std::string backend_name = "automatic";
  int steps = 40;
  std::uint64_t seed = 7;
  app.add_option("--backend", backend_name, "automatic, cpu or cuda")
      ->check(CLI::IsMember({"automatic", "cpu", "cuda"}))
      ->capture_default_str();
  app.add_option("--steps", steps, "decoding steps")->check(CLI::Range(1, 100000))->capture_default_str();
  app.add_option("--seed", seed, "random seed")->capture_default_str();
  int unavailable_exit_code = 1;
  app.add_option("--unavailable-exit-code", unavailable_exit_code,
                 "exit status when the backend is not available here (a test runner's skip code)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    const std::map<std::string, clsa::Backend> backends = {
        {"automatic", clsa::Backend::automatic}, {"cpu", clsa::Backend::cpu}, {"cuda", clsa::Backend::cuda}};
    const clsa::Backend backend = clsa::resolve_backend(backends.at(backend_name));
    const clsa::Device device = clsa::backend_device(backend);
    const bool on_cuda = device.is_cuda();
    std::mt19937_64 rng(seed);
    // The engine's stream: every write to the pool, table refill, input copy and step goes on it, in
    // order (graphs are captured from it and replayed on it).
    const cuda_support::OwnedStream lane(device);
    EnginePool pool(device, kMaxSequences * kMaxLength / kPageSize + kMaxSequences);
    const clsa::PagedCacheLayout layout = pool.layout();

    // The three components, each on engine-provided workspace, planned once for the largest step.
    clsa::IndexerConfig indexer_config{kIndexHeads, kIndexDim, kTopK, 4, 16, 1.0f / 8.0f};
    clsa::AttentionConfig attention_config{kQHeads, kKvHeads, kHeadDim, 0.0f};
    clsa::CrossLayerIndexer indexer(indexer_config, backend);
    clsa::SparseCrossAttention sparse(attention_config, backend);
    clsa::DenseCrossAttention dense(attention_config, backend);
    auto workspace_for = [&](std::size_t bytes) {
      return clsa::Tensor::empty({static_cast<std::int64_t>(bytes)}, clsa::DType::i32, device);  // 4x room
    };
    const clsa::Tensor indexer_space = workspace_for(indexer.workspace_bytes(kMaxSequences, kMaxTokens, kMaxLength));
    const clsa::Tensor sparse_space = workspace_for(sparse.workspace_bytes(kMaxSequences, kMaxTokens, kTopK));
    const clsa::Tensor dense_space = workspace_for(dense.workspace_bytes(kMaxSequences, kMaxTokens, kMaxLength));
    indexer.set_workspace(indexer_space.view().data(), indexer_space.bytes(), kMaxSequences, kMaxTokens, kMaxLength);
    sparse.set_workspace(sparse_space.view().data(), sparse_space.bytes(), kMaxSequences, kMaxTokens, kTopK);
    dense.set_workspace(dense_space.view().data(), dense_space.bytes(), kMaxSequences, kMaxTokens, kMaxLength);

    // Engine-owned page tables and activations, for the largest bucket: they never move. A step of
    // `slots` sequences and T tokens uses the first slots + 1 (indptr), slots (last page lengths)
    // and slots * T (activation rows) entries; activations hold every layer: [layer][row][head][dim].
    EngineTables tables(device, kMaxSequences, kMaxSequences * (kMaxLength / kPageSize + 1));
    clsa::Tensor q = clsa::Tensor::empty({kLayers * kMaxRows * kQSize}, clsa::DType::bf16, device);
    clsa::Tensor sparse_out = clsa::Tensor::empty({kLayers * kMaxRows * kQSize}, clsa::DType::bf16, device);
    clsa::Tensor dense_out = clsa::Tensor::empty({kLayers * kMaxRows * kQSize}, clsa::DType::bf16, device);
    clsa::Tensor q_idx = clsa::Tensor::empty({kMaxRows * kIndexHeads * kIndexDim}, clsa::DType::bf16, device);
    clsa::Tensor weights = clsa::Tensor::empty({kMaxRows * kIndexHeads}, clsa::DType::f32, device);
    {
      const std::vector<float> w(static_cast<std::size_t>(kMaxRows * kIndexHeads), 0.25f);
      lane.upload(weights.view().data(), w.data(), w.size() * sizeof(float));
    }
    clsa::CacheBatch batch;  // wraps the engine's tables; wrapped again (no allocation) every step

    auto layer_rows = [&](const clsa::Tensor& t, int layer, int slots, int tokens) {
      return clsa::TensorView(t.data_as<clsa::bfloat16>() + layer * kMaxRows * kQSize, clsa::DType::bf16,
                              {slots, tokens, kQHeads, kHeadDim}, device);
    };
    // The step as the engine enqueues (and captures) it: one select whose routing every layer
    // reuses, and per layer the sparse attention and, as its check, the dense one.
    auto enqueue_step = [&](int slots, int tokens) {
      const clsa::TensorView q_idx_view(q_idx.view().data(), clsa::DType::bf16, {slots, tokens, kIndexHeads, kIndexDim},
                                        device);
      const clsa::TensorView w_view(weights.view().data(), clsa::DType::f32, {slots, tokens, kIndexHeads}, device);
      const clsa::RoutingIndex routing = indexer.select(batch, q_idx_view, w_view, lane.stream());
      for (int layer = 0; layer < kLayers; ++layer) {
        const clsa::TensorView q_view = layer_rows(q, layer, slots, tokens);
        sparse.forward(batch, routing, q_view, layer_rows(sparse_out, layer, slots, tokens), lane.stream());
        dense.forward(batch, q_view, layer_rows(dense_out, layer, slots, tokens), lane.stream());
      }
      return routing;
    };
    // One captured step per (bucket, T), replayed whenever a step has that shape.
    struct CapturedStep {
      cuda_support::CapturedGraph graph;
      clsa::RoutingIndex routing;  // as select() returned it at capture; each replay rewrites it
    };
    std::map<std::pair<int, int>, std::unique_ptr<CapturedStep>> captured;

    std::printf(
        "embed_engine on %s: engine-owned pool of %d pages (K/V interleaved per page), %d layers, continuous "
        "batching of up to %d sequences padded to buckets of 1, 2, 4, 8 slots, %s\n",
        clsa::device_name(device).c_str(), pool.pages, kLayers, kMaxSequences,
        on_cuda ? "one CUDA graph per (bucket, T) replayed" : "eager calls");
    std::vector<Sequence> active;
    std::vector<std::int32_t> counts(static_cast<std::size_t>(kMaxRows));
    std::vector<clsa::bfloat16> sparse_host(static_cast<std::size_t>(kMaxRows * kQSize));
    std::vector<clsa::bfloat16> dense_host(static_cast<std::size_t>(kMaxRows * kQSize));
    std::set<int> batch_sizes, buckets_used;
    int next_id = 0;
    int joined = 0, left = 0, captures = 0, replays = 0, failures = 0;
    float worst = 0.0f;
    std::uniform_int_distribution<int> prompt_length(8, 300), decode_length(3, 30), coin(0, 3);
    for (int step = 0; step < steps; ++step) {
      // Sequences leave when done; new ones join while there is room.
      for (auto it = active.begin(); it != active.end();) {
        if (it->prompt == 0 && it->decode_left == 0) {
          pool.free_pages.insert(pool.free_pages.end(), it->pages.begin(), it->pages.end());
          it = active.erase(it);
          ++left;
        } else {
          ++it;
        }
      }
      while (static_cast<int>(active.size()) < kMaxSequences && (active.empty() || coin(rng) == 0)) {
        Sequence seq;
        seq.id = next_id++;
        seq.prompt = prompt_length(rng);
        seq.decode_left = decode_length(rng);
        active.push_back(seq);
        ++joined;
      }
      // This step's tokens: the rest of a prompt (all but its last chunk are written without
      // querying, the way a prefill fills the cache), or one decoded token.
      int tokens = 1;
      for (Sequence& seq : active) {
        if (seq.prompt > 0) tokens = std::max(tokens, std::min(seq.prompt, kMaxTokens));
      }
      for (Sequence& seq : active) {
        int now = 1;
        if (seq.prompt > 0) {
          while (seq.prompt > tokens) {
            write_token(pool, seq, rng, lane);
            --seq.prompt;
          }
          now = seq.prompt;
          seq.prompt = 0;
        } else {
          --seq.decode_left;
        }
        // Every sequence queries with the same T: one with fewer new tokens re-queries its last
        // ones (the cache must hold >= T tokens; a fresh sequence's prompt ensures it).
        for (int i = 0; i < now; ++i) write_token(pool, seq, rng, lane);
      }

      // The batch: the live sequences in slots 0..count-1, empty slots (no pages, last page length
      // 0) up to the bucket. The engine rewrites its tables in place, on its stream (the previous
      // step is done: its results were read back), and wraps them again.
      const int count = static_cast<int>(active.size());
      const int slots = bucket_for(count);
      batch_sizes.insert(count);
      buckets_used.insert(slots);
      tables.host_indptr[0] = 0;
      for (int b = 0; b < slots; ++b) {
        const std::size_t i = static_cast<std::size_t>(b);
        if (b < count) {
          const Sequence& seq = active[i];
          std::copy(seq.pages.begin(), seq.pages.end(), tables.host_indices.begin() + tables.host_indptr[i]);
          tables.host_indptr[i + 1] = tables.host_indptr[i] + static_cast<std::int32_t>(seq.pages.size());
          tables.host_last[i] = (seq.length - 1) % kPageSize + 1;
        } else {
          tables.host_indptr[i + 1] = tables.host_indptr[i];
          tables.host_last[i] = 0;
        }
      }
      const std::size_t listed = static_cast<std::size_t>(tables.host_indptr[static_cast<std::size_t>(slots)]);
      lane.upload(tables.indptr.view().data(), tables.host_indptr.data(), (static_cast<std::size_t>(slots) + 1) * 4);
      lane.upload(tables.indices.view().data(), tables.host_indices.data(), listed * 4);
      lane.upload(tables.last.view().data(), tables.host_last.data(), static_cast<std::size_t>(slots) * 4);
      clsa::PageTableView view;
      view.num_sequences = slots;
      view.page_indptr = tables.indptr.data_as<std::int32_t>();
      view.page_indices = tables.indices.data_as<std::int32_t>();
      view.last_page_lengths = tables.last.data_as<std::int32_t>();
      view.host_page_indptr = tables.host_indptr.data();
      view.host_last_page_lengths = tables.host_last.data();
      clsa::CacheBatch::wrap(layout, view, batch);

      // The step's inputs (every layer's query), and its outputs poisoned.
      const std::int64_t rows = std::int64_t{slots} * tokens;
      const std::vector<clsa::bfloat16> q_idx_host =
          random_bf16(rng, static_cast<std::size_t>(rows * kIndexHeads * kIndexDim));
      lane.upload(q_idx.view().data(), q_idx_host.data(), q_idx_host.size() * sizeof(clsa::bfloat16));
      std::vector<std::vector<clsa::bfloat16>> q_host;
      for (int layer = 0; layer < kLayers; ++layer) {
        q_host.push_back(random_bf16(rng, static_cast<std::size_t>(rows * kQSize)));
        lane.upload(layer_rows(q, layer, slots, tokens).data(), q_host.back().data(),
                    q_host.back().size() * sizeof(clsa::bfloat16));
      }
      lane.fill(sparse_out.view().data(), 0xff, sparse_out.bytes());
      lane.fill(dense_out.view().data(), 0xff, dense_out.bytes());

      clsa::RoutingIndex routing;
      bool captured_now = false;
      if (on_cuda) {
        std::unique_ptr<CapturedStep>& step_graph = captured[{slots, tokens}];
        if (!step_graph) {
          step_graph = std::make_unique<CapturedStep>();
          CapturedStep& fresh = *step_graph;
          fresh.graph =
              cuda_support::CapturedGraph::capture(lane.stream(), [&] { fresh.routing = enqueue_step(slots, tokens); });
          captured_now = true;
          ++captures;
        }
        step_graph->graph.replay(lane.stream());
        lane.wait();
        ++replays;
        // A replay makes no host checks: kernels that met a sequence beyond the plan report it here.
        indexer.check_status();
        dense.check_status();
        routing = step_graph->routing;
      } else {
        routing = enqueue_step(slots, tokens);
      }

      // ---- checks ----
      float step_worst = 0.0f;
      auto fail = [&](const std::string& what) {
        if (failures++ < 10) std::fprintf(stderr, "embed_engine: step %d: %s\n", step, what.c_str());
      };
      // The counts on the host, addressed through the routing view with the index's own strides.
      lane.download(counts.data(), routing.counts.data(), static_cast<std::size_t>(rows) * sizeof(std::int32_t));
      clsa::RoutingRows host_rows = clsa::RoutingRows::of(routing);
      host_rows.counts = counts.data();
      for (int b = 0; b < slots; ++b) {
        for (int t = 0; t < tokens; ++t) {
          const int visible = b < count ? active[static_cast<std::size_t>(b)].length - tokens + t + 1 : 0;
          const std::int32_t got = host_rows.count(b, t);
          if (got != std::min(visible, kTopK)) {
            fail("slot " + std::to_string(b) + " token " + std::to_string(t) + " routed " + std::to_string(got) +
                 " positions; expected " + std::to_string(std::min(visible, kTopK)));
          }
        }
      }
      const std::size_t row_elems = static_cast<std::size_t>(kQSize);
      for (int layer = 0; layer < kLayers; ++layer) {
        const std::size_t bytes = static_cast<std::size_t>(rows) * row_elems * sizeof(clsa::bfloat16);
        lane.download(sparse_host.data(), layer_rows(sparse_out, layer, slots, tokens).data(), bytes);
        lane.download(dense_host.data(), layer_rows(dense_out, layer, slots, tokens).data(), bytes);
        // Sparse against dense on every row (top_k >= every length: the same tokens); empty slots
        // must be exactly zero in both.
        for (std::size_t i = 0; i < static_cast<std::size_t>(rows) * row_elems; ++i) {
          const float s = clsa::to_float(sparse_host[i]);
          const float d = clsa::to_float(dense_host[i]);
          step_worst = std::max(step_worst, relative_error(s, d));
          const int slot = static_cast<int>(i / (static_cast<std::size_t>(tokens) * row_elems));
          if (slot >= count && !(s == 0.0f && d == 0.0f)) {
            fail("layer " + std::to_string(layer) + ": empty slot " + std::to_string(slot) + " has output " +
                 std::to_string(s) + " (sparse), " + std::to_string(d) + " (dense); expected 0");
            break;
          }
        }
        // Every live row against the engine's own record of what it wrote: one head per layer.
        const int head = (layer + step) % kQHeads;
        for (int b = 0; b < count; ++b) {
          const Sequence& seq = active[static_cast<std::size_t>(b)];
          for (int t = 0; t < tokens; ++t) {
            const std::size_t offset = ((static_cast<std::size_t>(b) * tokens + t) * kQHeads + head) * kHeadDim;
            const std::vector<float> expected = reference_row(
                seq, seq.length - tokens + t + 1, q_host[static_cast<std::size_t>(layer)].data() + offset, head);
            for (int d = 0; d < kHeadDim; ++d) {
              step_worst = std::max(step_worst, relative_error(clsa::to_float(sparse_host[offset + d]),
                                                               expected[static_cast<std::size_t>(d)]));
            }
          }
        }
      }
      if (!(step_worst <= kTolerance)) {
        fail("max error " + std::to_string(step_worst) + " > " + std::to_string(kTolerance));
      }
      worst = std::max(worst, step_worst);
      int shortest = kMaxLength, longest = 0;
      for (const Sequence& seq : active) {
        shortest = std::min(shortest, seq.length);
        longest = std::max(longest, seq.length);
      }
      if (step < 5 || step % 10 == 0 || step == steps - 1 || captured_now) {
        std::printf("step %3d: %d sequences in %d slots (lengths %d..%d), T = %d, %s: max error %.2e\n", step, count,
                    slots, shortest, longest, tokens,
                    on_cuda ? (captured_now ? "graph captured + replayed" : "graph replayed") : "eager",
                    static_cast<double>(step_worst));
      }
    }
    std::string sizes, used;
    for (const int size : batch_sizes) sizes += (sizes.empty() ? "" : " ") + std::to_string(size);
    for (const int size : buckets_used) used += (used.empty() ? "" : " ") + std::to_string(size);
    std::printf("%d sequences joined, %d left; batch sizes %s in buckets of %s slots\n", joined, left, sizes.c_str(),
                used.c_str());
    if (on_cuda) {
      std::printf("CUDA graphs: %d captured (one per bucket and T), %d replays\n", captures, replays);
    }
    const bool ok = failures == 0 && worst <= kTolerance;
    std::printf(
        "worst error (sparse vs dense, and vs the engine's own record) %.2e over %d steps; %d failed checks: %s\n",
        static_cast<double>(worst), steps, failures, ok ? "OK" : "MISMATCH");
    return ok ? 0 : 1;
  } catch (const clsa::Error& error) {
    std::fprintf(stderr, "embed_engine: %s\n", error.what());
    return error.code() == clsa::ErrorCode::unsupported ? unavailable_exit_code : 1;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "embed_engine: %s\n", error.what());
    return 1;
  }
}
