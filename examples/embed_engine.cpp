// embed_engine: plays an inference engine that embeds libclsa.
//
// The engine owns everything a real one owns: the paged K/V/indexer-key pool (its own layout:
// K and V interleaved per page), the page allocator, the FlashInfer-style page tables
// (indptr, indices, last page lengths) and the workspaces. libclsa reads them where they are
// (CacheBatch::wrap, set_workspace): nothing is copied or allocated by the library per step.
//
// It runs a continuous-batching loop: sequences join with a prompt (prefilled in chunks, the last
// chunk's tokens querying the cache together: T > 1), decode one token per step, and leave at
// different times. Every step runs ONE indexer select and L sparse layers, and checks each
// layer's output against DenseCrossAttention: with top_k >= every length the two must agree.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <vector>

#include "clsa/clsa.hpp"

namespace {

constexpr int kLayers = 4;
constexpr int kQHeads = 8, kKvHeads = 2, kHeadDim = 64;
constexpr int kIndexHeads = 4, kIndexDim = 64;
constexpr int kPageSize = 16;
constexpr int kMaxSequences = 6;
constexpr int kMaxLength = 640;
constexpr int kTopK = 1024;    // >= every length: sparse must equal dense
constexpr int kMaxTokens = 8;  // query tokens per sequence in one call (prefill chunk tail)

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
    clsa::PagedCacheLayout l{};
    l.dtype = clsa::DType::bf16;
    l.device = device;
    l.num_kv_heads = kKvHeads;
    l.head_dim = kHeadDim;
    l.index_dim = kIndexDim;
    l.page_size = kPageSize;
    l.num_pages = pages;
    l.k = kv.view().data();
    l.v = static_cast<const clsa::bfloat16*>(kv.view().data()) + kPageSize * kKvHeads * kHeadDim;
    l.k_page_stride = l.v_page_stride = 2 * kPageSize * kKvHeads * kHeadDim;
    l.k_token_stride = l.v_token_stride = kKvHeads * kHeadDim;
    l.k_head_stride = l.v_head_stride = kHeadDim;
    l.index_keys = index_keys.view().data();
    l.index_page_stride = kPageSize * kIndexDim;
    l.index_token_stride = kIndexDim;
    return l;
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

/// Host bf16 data to a device tensor of the same size.
void upload(clsa::Tensor& target, const std::vector<clsa::bfloat16>& values) {
  clsa::copy_bytes(target.view().data(), target.device(), values.data(), clsa::Device::cpu(),
                   values.size() * sizeof(clsa::bfloat16));
}

/// The engine writes a token's K, V and indexer key into its own pool.
void write_token(EnginePool& pool, Sequence& seq, std::mt19937_64& rng) {
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
    clsa::copy_bytes(kv + ((static_cast<std::size_t>(page) * 2 + part) * kPageSize + slot) * row, pool.device,
                     values.data(), clsa::Device::cpu(), row * sizeof(clsa::bfloat16));
    std::vector<float>& host = part == 0 ? seq.host_k : seq.host_v;
    for (const clsa::bfloat16 x : values) host.push_back(clsa::to_float(x));
  }
  const std::vector<clsa::bfloat16> key = random_bf16(rng, kIndexDim);
  clsa::copy_bytes(keys + (static_cast<std::size_t>(page) * kPageSize + slot) * kIndexDim, pool.device, key.data(),
                   clsa::Device::cpu(), kIndexDim * sizeof(clsa::bfloat16));
  ++seq.length;
}

/// Host reference of one output row: query head `head` of the sequence's last token over every
/// position, from what the engine wrote (independent of libclsa's reading of the pool).
std::vector<float> reference_row(const Sequence& seq, const clsa::bfloat16* q, int head) {
  const int kv = head / (kQHeads / kKvHeads);
  std::vector<double> logits(static_cast<std::size_t>(seq.length));
  double top = -1e300;
  for (int p = 0; p < seq.length; ++p) {
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
    for (int p = 0; p < seq.length; ++p) {
      acc += logits[static_cast<std::size_t>(p)] *
             seq.host_v[(static_cast<std::size_t>(p) * kKvHeads + kv) * kHeadDim + d];
    }
    out[static_cast<std::size_t>(d)] = static_cast<float>(acc / total);
  }
  return out;
}

float max_relative_error(const clsa::Tensor& a, const clsa::Tensor& b, std::vector<clsa::bfloat16>& host_a,
                         std::vector<clsa::bfloat16>& host_b, std::int64_t count) {
  clsa::copy_bytes(host_a.data(), clsa::Device::cpu(), a.view().data(), a.device(), count * sizeof(clsa::bfloat16));
  clsa::copy_bytes(host_b.data(), clsa::Device::cpu(), b.view().data(), b.device(), count * sizeof(clsa::bfloat16));
  float worst = 0.0f;
  for (std::int64_t i = 0; i < count; ++i) {
    const float x = clsa::to_float(host_a[static_cast<std::size_t>(i)]);
    const float y = clsa::to_float(host_b[static_cast<std::size_t>(i)]);
    const float error = std::abs(x - y) / (0.02f + std::abs(y));
    if (!(error <= worst)) worst = error;  // NaN shows as a failure
  }
  return worst;
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
  CLI11_PARSE(app, argc, argv);
  try {
    const std::map<std::string, clsa::Backend> backends = {
        {"automatic", clsa::Backend::automatic}, {"cpu", clsa::Backend::cpu}, {"cuda", clsa::Backend::cuda}};
    const clsa::Backend backend = clsa::resolve_backend(backends.at(backend_name));
    const clsa::Device device = clsa::backend_device(backend);
    std::mt19937_64 rng(seed);
    EnginePool pool(device, kMaxSequences * kMaxLength / kPageSize + kMaxSequences);
    const clsa::PagedCacheLayout layout = pool.layout();

    // The three components, each on engine-provided workspace sized once for the largest step.
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
    indexer.set_workspace(indexer_space.view().data(), indexer_space.bytes());
    sparse.set_workspace(sparse_space.view().data(), sparse_space.bytes());
    dense.set_workspace(dense_space.view().data(), dense_space.bytes());

    // Engine-owned page tables (device) and their host copies, sized for the largest batch.
    const int max_pages_listed = kMaxSequences * (kMaxLength / kPageSize + 1);
    clsa::Tensor indptr = clsa::Tensor::empty({kMaxSequences + 1}, clsa::DType::i32, device);
    clsa::Tensor indices = clsa::Tensor::empty({max_pages_listed}, clsa::DType::i32, device);
    clsa::Tensor last = clsa::Tensor::empty({kMaxSequences}, clsa::DType::i32, device);
    std::vector<std::int32_t> host_indptr(kMaxSequences + 1), host_indices(max_pages_listed), host_last(kMaxSequences);
    // Query and output buffers (the engine's activations).
    const std::int64_t q_elems = std::int64_t{kMaxSequences} * kMaxTokens * kQHeads * kHeadDim;
    clsa::Tensor q = clsa::Tensor::empty({q_elems}, clsa::DType::bf16, device);
    clsa::Tensor q_idx = clsa::Tensor::empty({std::int64_t{kMaxSequences} * kMaxTokens * kIndexHeads * kIndexDim},
                                             clsa::DType::bf16, device);
    clsa::Tensor weights =
        clsa::Tensor::empty({std::int64_t{kMaxSequences} * kMaxTokens * kIndexHeads}, clsa::DType::f32, device);
    clsa::Tensor sparse_out = clsa::Tensor::empty({q_elems}, clsa::DType::bf16, device);
    clsa::Tensor dense_out = clsa::Tensor::empty({q_elems}, clsa::DType::bf16, device);
    std::vector<clsa::bfloat16> host_a(static_cast<std::size_t>(q_elems)), host_b(static_cast<std::size_t>(q_elems));
    clsa::CacheBatch batch;

    std::printf(
        "embed_engine on %s: engine-owned pool of %d pages (K/V interleaved per page), %d layers, "
        "continuous batching up to %d sequences\n",
        clsa::device_name(device).c_str(), pool.pages, kLayers, kMaxSequences);
    std::vector<Sequence> active;
    int next_id = 0;
    int joined = 0, left = 0;
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
            write_token(pool, seq, rng);
            --seq.prompt;
          }
          now = seq.prompt;
          seq.prompt = 0;
        } else {
          --seq.decode_left;
        }
        // Every sequence queries with the same T: one with fewer new tokens re-queries its last
        // ones (the cache must hold >= T tokens; a fresh sequence's prompt ensures it).
        for (int i = 0; i < now; ++i) write_token(pool, seq, rng);
      }

      // The page tables of this step, built by the engine and handed over as they are.
      const int count = static_cast<int>(active.size());
      host_indptr[0] = 0;
      for (int b = 0; b < count; ++b) {
        const Sequence& seq = active[static_cast<std::size_t>(b)];
        std::copy(seq.pages.begin(), seq.pages.end(), host_indices.begin() + host_indptr[b]);
        host_indptr[b + 1] = host_indptr[b] + static_cast<std::int32_t>(seq.pages.size());
        host_last[b] = (seq.length - 1) % kPageSize + 1;
      }
      clsa::copy_bytes(indptr.view().data(), device, host_indptr.data(), clsa::Device::cpu(), (count + 1) * 4);
      clsa::copy_bytes(indices.view().data(), device, host_indices.data(), clsa::Device::cpu(), host_indptr[count] * 4);
      clsa::copy_bytes(last.view().data(), device, host_last.data(), clsa::Device::cpu(), count * 4);
      clsa::PageTableView tables;
      tables.num_sequences = count;
      tables.page_indptr = indptr.data_as<std::int32_t>();
      tables.page_indices = indices.data_as<std::int32_t>();
      tables.last_page_lengths = last.data_as<std::int32_t>();
      tables.host_page_indptr = host_indptr.data();
      tables.host_last_page_lengths = host_last.data();
      clsa::CacheBatch::wrap(layout, tables, batch);

      // One indexer select per step; its routing serves every layer.
      const std::int64_t rows = std::int64_t{count} * tokens;
      upload(q_idx, random_bf16(rng, static_cast<std::size_t>(rows * kIndexHeads * kIndexDim)));
      std::vector<float> w(static_cast<std::size_t>(rows * kIndexHeads), 0.25f);
      clsa::copy_bytes(weights.view().data(), device, w.data(), clsa::Device::cpu(), w.size() * sizeof(float));
      const clsa::TensorView q_idx_view(q_idx.view().data(), clsa::DType::bf16, {count, tokens, kIndexHeads, kIndexDim},
                                        device);
      const clsa::TensorView w_view(weights.view().data(), clsa::DType::f32, {count, tokens, kIndexHeads}, device);
      const clsa::RoutingIndex routing = indexer.select(batch, q_idx_view, w_view);
      const clsa::TensorView q_view(q.view().data(), clsa::DType::bf16, {count, tokens, kQHeads, kHeadDim}, device);
      const clsa::TensorView sparse_view(sparse_out.view().data(), clsa::DType::bf16,
                                         {count, tokens, kQHeads, kHeadDim}, device);
      const clsa::TensorView dense_view(dense_out.view().data(), clsa::DType::bf16, {count, tokens, kQHeads, kHeadDim},
                                        device);
      float step_worst = 0.0f;
      for (int layer = 0; layer < kLayers; ++layer) {
        const std::vector<clsa::bfloat16> q_host =
            random_bf16(rng, static_cast<std::size_t>(rows * kQHeads * kHeadDim));
        upload(q, q_host);
        sparse.forward(batch, routing, q_view, sparse_view);
        dense.forward(batch, q_view, dense_view);
        step_worst =
            std::max(step_worst, max_relative_error(sparse_out, dense_out, host_a, host_b, rows * kQHeads * kHeadDim));
        // And one row against the engine's own record of what it wrote: sequence 0's last token,
        // head `layer` (host_a holds the sparse output now).
        const std::size_t row_offset = (static_cast<std::size_t>(tokens - 1) * kQHeads + layer) * kHeadDim;
        const std::vector<float> expected = reference_row(active[0], q_host.data() + row_offset, layer);
        for (int d = 0; d < kHeadDim; ++d) {
          const float got = clsa::to_float(host_a[row_offset + static_cast<std::size_t>(d)]);
          const float error = std::abs(got - expected[static_cast<std::size_t>(d)]) /
                              (0.02f + std::abs(expected[static_cast<std::size_t>(d)]));
          if (!(error <= step_worst)) step_worst = error;
        }
      }
      worst = std::max(worst, step_worst);
      int shortest = kMaxLength, longest = 0;
      for (const Sequence& seq : active) {
        shortest = std::min(shortest, seq.length);
        longest = std::max(longest, seq.length);
      }
      if (step < 5 || step % 10 == 0 || step == steps - 1) {
        std::printf("step %3d: %d sequences (lengths %d..%d), T = %d, sparse vs dense max error %.2e\n", step, count,
                    shortest, longest, tokens, static_cast<double>(step_worst));
      }
    }
    std::printf("%d sequences joined, %d left; worst sparse-vs-dense error %.2e over %d steps: %s\n", joined, left,
                static_cast<double>(worst), steps, worst <= 0.02f ? "OK" : "MISMATCH");
    return worst <= 0.02f ? 0 : 1;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "embed_engine: %s\n", error.what());
    return 1;
  }
}
