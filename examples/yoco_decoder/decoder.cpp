#include "decoder.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace yoco {

namespace {

/// The index key width of the caches that hold no indexer keys a variant uses (yoco_dense,
/// standard): every SharedKVCache has one; this is the least it allows. Zeros are appended.
constexpr int kUnusedIndexDim = 64;
constexpr int kPageSize = 64;

[[noreturn]] void fail(clsa::ErrorCode code, const std::string& message) {
  throw clsa::Error(code, "Decoder::" + message);
}

clsa::CacheConfig cache_config(const ModelShape& shape, clsa::DType dtype, int index_dim, const DecoderLimits& limits) {
  clsa::CacheConfig config;
  config.num_kv_heads = shape.kv_heads;
  config.head_dim = shape.head_dim;
  config.index_dim = index_dim;
  config.page_size = kPageSize;
  config.max_pages = std::int64_t{limits.max_batch} * ((limits.max_length + kPageSize - 1) / kPageSize);
  config.dtype = dtype;
  return config;
}

}  // namespace

const char* variant_name(Variant variant) {
  switch (variant) {
    case Variant::clsa:
      return "clsa";
    case Variant::yoco_dense:
      return "yoco_dense";
    case Variant::standard:
      return "standard";
  }
  return "?";
}

Decoder::Decoder(Variant variant, const ModelWeights& weights, DecoderOps& ops, const DecoderLimits& limits,
                 const RoutingOptions& routing)
    : variant_(variant),
      weights_(weights),
      shape_(weights.shape),
      ops_(ops),
      limits_(limits),
      max_rows_(std::max(limits.max_batch, limits.prefill_chunk)) {
  const ModelShape& s = shape_;
  if (limits.max_batch < 1 || limits.prefill_chunk < 1 || limits.max_length < 1) {
    fail(clsa::ErrorCode::invalid_argument, "Decoder: max_batch, prefill_chunk and max_length must be positive");
  }
  if (limits.graphs && ops.stream().cuda() == nullptr) {
    fail(clsa::ErrorCode::invalid_argument, "Decoder: graphs need ops on a CUDA stream");
  }
  if (variant == Variant::standard && s.cross_layers() > 0 && !weights.layers.back().standard_kv.view().defined()) {
    fail(clsa::ErrorCode::invalid_argument, "Decoder: the standard variant needs weights made with_standard_kv");
  }
  const clsa::Backend backend = ops.backend();
  const clsa::DType dtype = ops.dtype();
  clsa::AttentionConfig attention;
  attention.num_q_heads = s.q_heads;
  attention.num_kv_heads = s.kv_heads;
  attention.head_dim = s.head_dim;
  attention.enable_pdl = routing.enable_pdl;
  const std::int64_t max_length = limits.max_length;
  const int max_batch = limits.max_batch;

  if (variant == Variant::standard) {
    layer_caches_.reserve(static_cast<std::size_t>(s.layers));
    for (int l = 0; l < s.layers; ++l) {
      layer_caches_.emplace_back(cache_config(s, dtype, kUnusedIndexDim, limits), backend);
      layer_batches_.push_back(layer_caches_.back().reserve_batch(max_batch, max_length));
    }
    // One object serves every layer; prefill chunks query with T = prefill_chunk tokens.
    dense_ = std::make_unique<clsa::DenseCrossAttention>(attention, backend);
    dense_->reserve(max_batch, limits.prefill_chunk, max_length);
  } else {
    const int index_dim = variant == Variant::clsa ? s.index_dim : kUnusedIndexDim;
    shared_cache_ = std::make_unique<clsa::SharedKVCache>(cache_config(s, dtype, index_dim, limits), backend);
    shared_batch_ = shared_cache_->reserve_batch(max_batch, max_length);
    window_cache_ = ops.allocate_window_cache(s.self_layers(), max_batch, s.window, s.kv_heads, s.head_dim);
    ops.fill_zero(window_cache_.k.view());
    ops.fill_zero(window_cache_.v.view());
    if (variant == Variant::clsa) {
      clsa::IndexerConfig indexer;
      indexer.num_heads = s.index_heads;
      indexer.index_dim = s.index_dim;
      indexer.top_k = routing.top_k;
      indexer.sink_tokens = std::min(routing.sink_tokens, routing.top_k / 2);
      indexer.local_window = std::min(routing.local_window, routing.top_k - indexer.sink_tokens);
      indexer.scale = 1.0f / std::sqrt(static_cast<float>(s.index_dim));
      indexer.enable_pdl = routing.enable_pdl;
      indexer_ = std::make_unique<clsa::CrossLayerIndexer>(indexer, backend);
      indexer_->reserve(max_batch, 1, max_length);
      sparse_ = std::make_unique<clsa::SparseCrossAttention>(attention, backend);
      sparse_->reserve(max_batch, 1, routing.top_k);
    } else {
      dense_ = std::make_unique<clsa::DenseCrossAttention>(attention, backend);
      dense_->reserve(max_batch, 1, max_length);
    }
  }

  const std::int64_t rows = max_rows_;
  x_ = ops.allocate({rows, s.hidden}, dtype);
  normed_ = ops.allocate({rows, s.hidden}, dtype);
  qkv_ = ops.allocate({rows, s.qkv_width()}, dtype);
  attention_ = ops.allocate({rows, s.q_width()}, dtype);
  branch_ = ops.allocate({rows, s.hidden}, dtype);
  gate_up_ = ops.allocate({rows, 2 * std::int64_t{s.ffn}}, dtype);
  ffn_ = ops.allocate({rows, s.ffn}, dtype);
  logits_ = ops.allocate({max_batch, s.vocab}, dtype);
  self_output_ = ops.allocate({max_batch, s.hidden}, dtype);
  tokens_ = ops.allocate({rows}, clsa::DType::i32);
  positions_ = ops.allocate({rows}, clsa::DType::i32);
  window_slots_ = ops.allocate({max_batch}, clsa::DType::i32);
  window_starts_ = ops.allocate({max_batch}, clsa::DType::i32);
  if (variant != Variant::standard) shared_kv_ = ops.allocate({rows, 2 * std::int64_t{s.kv_width()}}, dtype);
  if (variant == Variant::clsa) {
    index_keys_ = ops.allocate({rows, s.index_dim}, dtype);
    index_queries_ = ops.allocate({max_batch, std::int64_t{s.index_heads} * s.index_dim}, dtype);
    head_weights_ = ops.allocate({max_batch, 1, s.index_heads}, dtype);
    const std::vector<float> weights_of_heads(static_cast<std::size_t>(max_batch) * s.index_heads,
                                              1.0f / static_cast<float>(s.index_heads));
    ops.upload(head_weights_.view(), weights_of_heads.data());
  } else {
    unused_index_keys_ = ops.allocate({rows, kUnusedIndexDim}, dtype);
    const std::vector<float> zeros(static_cast<std::size_t>(rows) * kUnusedIndexDim, 0.0f);
    ops.upload(unused_index_keys_.view(), zeros.data());
  }

  slots_.resize(static_cast<std::size_t>(max_batch));
  host_tokens_.resize(static_cast<std::size_t>(rows));
  host_positions_.resize(static_cast<std::size_t>(rows));
  host_slots_.resize(static_cast<std::size_t>(max_batch));
  host_starts_.resize(static_cast<std::size_t>(max_batch));
  batch_ids_.reserve(static_cast<std::size_t>(max_batch));
}

Decoder::~Decoder() {
  // The graphs go first (the last member): let a replay in flight finish before its buffers go.
  if (graphs_.empty()) return;
  try {
    clsa::synchronize(ops_.stream());
  } catch (const clsa::Error&) {  // a failed stream: nothing left to wait for
  }
}

int Decoder::join(const std::vector<std::int32_t>& prompt) {
  const auto free_slot = std::find_if(slots_.begin(), slots_.end(), [](const Slot& slot) { return !slot.live; });
  if (free_slot == slots_.end()) {
    fail(clsa::ErrorCode::capacity_exceeded, "join: all " + std::to_string(slots_.size()) + " slots are taken");
  }
  if (prompt.empty() || static_cast<std::int64_t>(prompt.size()) >= limits_.max_length) {
    fail(clsa::ErrorCode::invalid_argument,
         "join: a prompt of " + std::to_string(prompt.size()) +
             " tokens (1 .. max_length - 1 = " + std::to_string(limits_.max_length - 1) + ")");
  }
  const int slot = static_cast<int>(free_slot - slots_.begin());
  Slot& state = *free_slot;
  state.live = true;
  state.length = 0;
  if (shared_cache_) state.shared = shared_cache_->add_sequence();
  state.per_layer.clear();
  for (clsa::SharedKVCache& cache : layer_caches_) state.per_layer.push_back(cache.add_sequence());

  const std::int64_t length = static_cast<std::int64_t>(prompt.size());
  for (std::int64_t first = 0; first < length; first += limits_.prefill_chunk) {
    const int tokens = static_cast<int>(std::min<std::int64_t>(limits_.prefill_chunk, length - first));
    for (int t = 0; t < tokens; ++t) {
      host_tokens_[static_cast<std::size_t>(t)] = prompt[static_cast<std::size_t>(first + t)];
      host_positions_[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(first + t);
    }
    run_pass(Pass{1, tokens, &slot, first + tokens == length});
  }
  return slot;
}

int Decoder::join_synthetic(std::int64_t length) {
  const auto free_slot = std::find_if(slots_.begin(), slots_.end(), [](const Slot& slot) { return !slot.live; });
  if (free_slot == slots_.end()) {
    fail(clsa::ErrorCode::capacity_exceeded,
         "join_synthetic: all " + std::to_string(slots_.size()) + " slots are taken");
  }
  if (length < 1 || length >= limits_.max_length) {
    fail(clsa::ErrorCode::invalid_argument,
         "join_synthetic: a context of " + std::to_string(length) +
             " tokens (1 .. max_length - 1 = " + std::to_string(limits_.max_length - 1) + ")");
  }
  const ModelShape& s = shape_;
  const int index_width = variant_ == Variant::clsa ? s.index_dim : kUnusedIndexDim;
  const std::int64_t kv_width = 2 * std::int64_t{s.kv_width()};
  if (!synthetic_.view().defined()) {
    // Rows of K, V and indexer key values in [-1, 1), from a fixed seed, appended over and over.
    synthetic_ = ops_.allocate({max_rows_, kv_width + index_width}, ops_.dtype());
    std::vector<float> values(static_cast<std::size_t>(synthetic_.numel()));
    std::uint64_t state = 0x9e3779b97f4a7c15ull;
    for (float& value : values) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      value = static_cast<float>(state >> 40) * (2.0f / 16777216.0f) - 1.0f;
    }
    ops_.upload(synthetic_.view(), values.data());
  }
  const int slot = static_cast<int>(free_slot - slots_.begin());
  Slot& state = *free_slot;
  state.live = true;
  state.length = length;
  if (shared_cache_) state.shared = shared_cache_->add_sequence();
  state.per_layer.clear();
  for (clsa::SharedKVCache& cache : layer_caches_) state.per_layer.push_back(cache.add_sequence());
  const clsa::TensorView rows = synthetic_.view();
  for (std::int64_t first = 0; first < length; first += max_rows_) {
    const std::int64_t count = std::min<std::int64_t>(max_rows_, length - first);
    const clsa::TensorView chunk = rows_of(rows, 0, count);
    const clsa::TensorView k = as_row_heads(columns_of(chunk, 0, s.kv_width()), s.kv_heads, s.head_dim);
    const clsa::TensorView v = as_row_heads(columns_of(chunk, s.kv_width(), s.kv_width()), s.kv_heads, s.head_dim);
    const clsa::TensorView index_keys = columns_of(chunk, kv_width, index_width);
    if (shared_cache_) shared_cache_->append(state.shared, k, v, index_keys, ops_.stream());
    for (std::size_t l = 0; l < layer_caches_.size(); ++l) {
      layer_caches_[l].append(state.per_layer[l], k, v, index_keys, ops_.stream());
    }
  }
  return slot;
}

void Decoder::check_status() {
  if (indexer_) indexer_->check_status();
  if (dense_) dense_->check_status();
}

void Decoder::leave(int slot) {
  Slot& state = slots_.at(static_cast<std::size_t>(slot));
  if (!state.live) fail(clsa::ErrorCode::invalid_argument, "leave: slot " + std::to_string(slot) + " is free");
  if (shared_cache_) shared_cache_->release(state.shared);
  for (std::size_t l = 0; l < layer_caches_.size(); ++l) layer_caches_[l].release(state.per_layer[l]);
  state.live = false;
  state.length = 0;
  state.shared = clsa::empty_slot;
}

void Decoder::step(const std::vector<int>& slots, const std::vector<std::int32_t>& tokens) {
  const int batch = static_cast<int>(slots.size());
  if (batch < 1 || batch > limits_.max_batch || tokens.size() != slots.size()) {
    fail(clsa::ErrorCode::invalid_argument, "step: " + std::to_string(batch) + " slots and " +
                                                std::to_string(tokens.size()) + " tokens (1 .. max_batch " +
                                                std::to_string(limits_.max_batch) + ")");
  }
  for (int b = 0; b < batch; ++b) {
    const Slot& state = slots_.at(static_cast<std::size_t>(slots[static_cast<std::size_t>(b)]));
    if (!state.live || state.length >= limits_.max_length) {
      fail(clsa::ErrorCode::invalid_argument,
           "step: slot " + std::to_string(slots[static_cast<std::size_t>(b)]) + " is free or at max_length");
    }
    host_tokens_[static_cast<std::size_t>(b)] = tokens[static_cast<std::size_t>(b)];
    host_positions_[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(state.length);
  }
  run_pass(Pass{batch, 1, slots.data(), true});
}

clsa::TensorView Decoder::logits(int rows) const {
  return rows_of(logits_.view(), 0, rows);
}

clsa::TensorView Decoder::self_decoder_output(int rows) const {
  return rows_of(self_output_.view(), 0, rows);
}

std::int64_t Decoder::length(int slot) const {
  return slots_.at(static_cast<std::size_t>(slot)).length;
}

KvMemory Decoder::memory() const {
  KvMemory memory;
  memory.sequences =
      static_cast<int>(std::count_if(slots_.begin(), slots_.end(), [](const Slot& s) { return s.live; }));
  if (shared_cache_) {
    const clsa::MemoryStats stats = shared_cache_->memory();
    memory.cached_tokens = stats.tokens;
    // The dense variant's cache holds (zero) indexer keys that libclsa requires and it never reads.
    memory.bytes_per_token = variant_ == Variant::clsa ? stats.bytes_per_token : stats.kv_bytes_per_token;
    memory.cache_bytes = static_cast<std::size_t>(stats.tokens) * memory.bytes_per_token;
    memory.window = window_cache_.window;
    memory.window_bytes_per_token = window_cache_.bytes_per_slot() / static_cast<std::size_t>(window_cache_.window);
  }
  for (const clsa::SharedKVCache& cache : layer_caches_) {
    const clsa::MemoryStats stats = cache.memory();
    memory.cached_tokens += stats.tokens;
    memory.cache_bytes += static_cast<std::size_t>(stats.tokens) * stats.kv_bytes_per_token;
    memory.bytes_per_token += stats.kv_bytes_per_token;
  }
  return memory;
}

void Decoder::fill_batch(const Pass& pass, int layer) {
  batch_ids_.clear();
  for (int b = 0; b < pass.batch; ++b) {
    const Slot& state = slots_[static_cast<std::size_t>(pass.slots[b])];
    batch_ids_.push_back(layer < 0 ? state.shared : state.per_layer[static_cast<std::size_t>(layer)]);
  }
  if (layer < 0) {
    shared_cache_->batch(batch_ids_, shared_batch_, ops_.stream());
  } else {
    layer_caches_[static_cast<std::size_t>(layer)].batch(batch_ids_, layer_batches_[static_cast<std::size_t>(layer)],
                                                         ops_.stream());
  }
}

template <class Enqueue>
void Decoder::run_section(const Pass& pass, int section, Enqueue&& enqueue) {
  if (!limits_.graphs || pass.tokens != 1) {
    enqueue();
    return;
  }
  const std::pair<int, int> key{pass.batch, section};
  auto found = graphs_.find(key);
  if (found == graphs_.end()) {
    found = graphs_.emplace(key, cuda_support::CapturedGraph::capture(ops_.stream(), enqueue)).first;
  }
  found->second.replay(ops_.stream());
  ++graph_replays_;
}

void Decoder::run_pass(const Pass& pass) {
  const ModelShape& s = shape_;
  const int rows = pass.batch * pass.tokens;
  // The pass's inputs: tokens and positions; the window attention's slots and first positions.
  for (int b = 0; b < pass.batch; ++b) {
    host_slots_[static_cast<std::size_t>(b)] = pass.slots[b];
    host_starts_[static_cast<std::size_t>(b)] = host_positions_[static_cast<std::size_t>(b * pass.tokens)];
  }
  ops_.upload(elements_of(tokens_.view(), 0, rows), host_tokens_.data());
  ops_.upload(elements_of(positions_.view(), 0, rows), host_positions_.data());
  ops_.upload(elements_of(window_slots_.view(), 0, pass.batch), host_slots_.data());
  ops_.upload(elements_of(window_starts_.view(), 0, pass.batch), host_starts_.data());
  const clsa::TensorView positions = elements_of(positions_.view(), 0, rows);

  const clsa::TensorView x = rows_of(x_.view(), 0, rows);
  // The rows that produce logits (and, in YOCO, run the cross-decoder): every row of a decoding
  // step; a prompt's last token.
  const int out_first = pass.tokens == 1 ? 0 : rows - 1;
  const int out_rows = pass.tokens == 1 ? pass.batch : 1;
  const Pass out_pass{out_rows, 1, pass.slots, pass.last};
  const clsa::TensorView out_x = rows_of(x, out_first, out_rows);
  const clsa::TensorView out_positions = elements_of(positions_.view(), out_first, out_rows);
  auto embed = [&] {
    ops_.embed(elements_of(tokens_.view(), 0, rows), weights_.embedding.view(), std::sqrt(static_cast<float>(s.hidden)),
               x);
  };
  auto final_logits = [&] {
    const clsa::TensorView normed = rows_of(normed_.view(), 0, out_rows);
    ops_.rms_norm(out_x, weights_.final_norm.view(), s.norm_eps, normed);
    ops_.matmul(normed, weights_.lm_head.view(), logits(out_rows));
  };

  // The device work runs in sections between the host-side calls (appends, table refills).
  if (variant_ == Variant::standard) {
    run_section(pass, 0, [&] {
      embed();
      project(0, Attention::own_cache, x, pass, positions);
    });
    for (int l = 0; l < s.layers; ++l) {
      append_own(l, pass);
      run_section(pass, l + 1, [&] {
        attend(l, Attention::own_cache, x, pass);
        if (l == s.self_layers() - 1 && tap_ && pass.last) ops_.copy(out_x, self_decoder_output(out_rows));
        if (l + 1 < s.layers) {
          project(l + 1, Attention::own_cache, x, pass, positions);
        } else if (pass.last) {
          final_logits();
        }
      });
    }
  } else {
    run_section(pass, 0, [&] {
      embed();
      for (int l = 0; l < s.self_layers(); ++l) {
        project(l, Attention::window, x, pass, positions);
        attend(l, Attention::window, x, pass);
      }
      if (tap_ && pass.last) ops_.copy(out_x, self_decoder_output(out_rows));
      project_shared(x, pass, positions);
    });
    append_shared(pass);
    if (pass.last) {
      fill_batch(out_pass, -1);
      run_section(pass, 1, [&] {
        if (variant_ == Variant::clsa) {
          // One indexer pass per step: queries from the normalised self-decoder output of the out
          // rows (project_shared left it in normed_), against every cached indexer key.
          const clsa::TensorView queries = rows_of(index_queries_.view(), 0, out_rows);
          ops_.matmul(rows_of(normed_.view(), out_first, out_rows), weights_.index_query.view(), queries);
          const clsa::TensorView head_weights(head_weights_.view().data(), head_weights_.view().dtype(),
                                              {out_rows, 1, s.index_heads}, head_weights_.view().device());
          routing_ = indexer_->select(shared_batch_, as_heads(queries, out_rows, 1, s.index_heads, s.index_dim),
                                      head_weights, ops_.stream());
        }
        const Attention cross = variant_ == Variant::clsa ? Attention::shared_sparse : Attention::shared_dense;
        for (int l = s.self_layers(); l < s.layers; ++l) {
          project(l, cross, out_x, out_pass, out_positions);
          attend(l, cross, out_x, out_pass);
        }
        final_logits();
      });
    }
  }
  for (int b = 0; b < pass.batch; ++b) slots_[static_cast<std::size_t>(pass.slots[b])].length += pass.tokens;
}

void Decoder::project_shared(const clsa::TensorView& x, const Pass& pass, const clsa::TensorView& positions) {
  const ModelShape& s = shape_;
  const int rows = pass.batch * pass.tokens;
  const clsa::TensorView normed = rows_of(normed_.view(), 0, rows);
  ops_.rms_norm(x, weights_.kv_norm.view(), s.norm_eps, normed);
  const clsa::TensorView kv = rows_of(shared_kv_.view(), 0, rows);
  ops_.matmul(normed, weights_.kv_projection.view(), kv);
  ops_.rope(as_row_heads(columns_of(kv, 0, s.kv_width()), s.kv_heads, s.head_dim), positions, s.rope_theta);
  if (variant_ == Variant::clsa) ops_.matmul(normed, weights_.index_key.view(), rows_of(index_keys_.view(), 0, rows));
}

void Decoder::append_shared(const Pass& pass) {
  const ModelShape& s = shape_;
  const int rows = pass.batch * pass.tokens;
  const clsa::TensorView kv = rows_of(shared_kv_.view(), 0, rows);
  const clsa::TensorView k = columns_of(kv, 0, s.kv_width());
  const clsa::TensorView v = columns_of(kv, s.kv_width(), s.kv_width());
  const clsa::TensorView index_keys =
      variant_ == Variant::clsa ? rows_of(index_keys_.view(), 0, rows) : rows_of(unused_index_keys_.view(), 0, rows);
  for (int b = 0; b < pass.batch; ++b) {
    const std::int64_t first = std::int64_t{b} * pass.tokens;
    shared_cache_->append(slots_[static_cast<std::size_t>(pass.slots[b])].shared,
                          as_row_heads(rows_of(k, first, pass.tokens), s.kv_heads, s.head_dim),
                          as_row_heads(rows_of(v, first, pass.tokens), s.kv_heads, s.head_dim),
                          rows_of(index_keys, first, pass.tokens), ops_.stream());
  }
}

void Decoder::append_own(int layer, const Pass& pass) {
  const ModelShape& s = shape_;
  const int rows = pass.batch * pass.tokens;
  const clsa::TensorView qkv = rows_of(qkv_.view(), 0, rows);
  const clsa::TensorView k = columns_of(qkv, s.q_width(), s.kv_width());
  const clsa::TensorView v = columns_of(qkv, s.q_width() + s.kv_width(), s.kv_width());
  clsa::SharedKVCache& cache = layer_caches_[static_cast<std::size_t>(layer)];
  for (int b = 0; b < pass.batch; ++b) {
    const std::int64_t first = std::int64_t{b} * pass.tokens;
    cache.append(slots_[static_cast<std::size_t>(pass.slots[b])].per_layer[static_cast<std::size_t>(layer)],
                 as_row_heads(rows_of(k, first, pass.tokens), s.kv_heads, s.head_dim),
                 as_row_heads(rows_of(v, first, pass.tokens), s.kv_heads, s.head_dim),
                 rows_of(unused_index_keys_.view(), 0, pass.tokens), ops_.stream());
  }
  fill_batch(pass, layer);
}

void Decoder::project(int layer, Attention attention, const clsa::TensorView& x, const Pass& pass,
                      const clsa::TensorView& positions) {
  const ModelShape& s = shape_;
  const LayerWeights& w = weights_.layers[static_cast<std::size_t>(layer)];
  const int rows = pass.batch * pass.tokens;
  const clsa::TensorView normed = rows_of(normed_.view(), 0, rows);
  const clsa::TensorView qkv = rows_of(qkv_.view(), 0, rows);
  const clsa::TensorView q = columns_of(qkv, 0, s.q_width());
  const clsa::TensorView k = columns_of(qkv, s.q_width(), s.kv_width());

  // Attention block, first half: pre-norm, projections, RoPE.
  ops_.rms_norm(x, w.attention_norm.view(), s.norm_eps, normed);
  const bool own_kv = attention == Attention::window || attention == Attention::own_cache;
  if (w.qkv.view().defined()) {
    ops_.matmul(normed, w.qkv.view(), qkv);  // self-decoder layer: [W_q | W_k | W_v]
  } else {
    ops_.matmul(normed, w.q.view(), q);  // cross-decoder layer; the standard Transformer adds its own K/V
    if (own_kv) ops_.matmul(normed, w.standard_kv.view(), columns_of(qkv, s.q_width(), 2 * s.kv_width()));
  }
  ops_.rope(as_row_heads(q, s.q_heads, s.head_dim), positions, s.rope_theta);
  if (own_kv) ops_.rope(as_row_heads(k, s.kv_heads, s.head_dim), positions, s.rope_theta);
}

void Decoder::attend(int layer, Attention attention, const clsa::TensorView& x, const Pass& pass) {
  const ModelShape& s = shape_;
  const LayerWeights& w = weights_.layers[static_cast<std::size_t>(layer)];
  const int rows = pass.batch * pass.tokens;
  const clsa::TensorView normed = rows_of(normed_.view(), 0, rows);
  const clsa::TensorView qkv = rows_of(qkv_.view(), 0, rows);
  const clsa::TensorView q = columns_of(qkv, 0, s.q_width());
  const clsa::TensorView k = columns_of(qkv, s.q_width(), s.kv_width());
  const clsa::TensorView v = columns_of(qkv, s.q_width() + s.kv_width(), s.kv_width());
  const clsa::TensorView out = rows_of(attention_.view(), 0, rows);
  const clsa::TensorView branch = rows_of(branch_.view(), 0, rows);

  // Attention block, second half: attention, output projection, residual.
  const clsa::TensorView q_heads = as_heads(q, pass.batch, pass.tokens, s.q_heads, s.head_dim);
  const clsa::TensorView out_heads = as_heads(out, pass.batch, pass.tokens, s.q_heads, s.head_dim);
  switch (attention) {
    case Attention::window:
      ops_.window_attention(window_cache_, layer, elements_of(window_slots_.view(), 0, pass.batch),
                            elements_of(window_starts_.view(), 0, pass.batch), q_heads,
                            as_heads(k, pass.batch, pass.tokens, s.kv_heads, s.head_dim),
                            as_heads(v, pass.batch, pass.tokens, s.kv_heads, s.head_dim), out_heads);
      break;
    case Attention::own_cache:  // append_own put this pass's K/V in the layer's cache
      dense_->forward(layer_batches_[static_cast<std::size_t>(layer)], q_heads, out_heads, ops_.stream());
      break;
    case Attention::shared_sparse:
      sparse_->forward(shared_batch_, routing_, q_heads, out_heads, ops_.stream());
      break;
    case Attention::shared_dense:
      dense_->forward(shared_batch_, q_heads, out_heads, ops_.stream());
      break;
  }
  ops_.matmul(out, w.out.view(), branch);
  ops_.add(x, branch);

  // Feed-forward block: pre-norm, SwiGLU, residual.
  ops_.rms_norm(x, w.ffn_norm.view(), s.norm_eps, normed);
  const clsa::TensorView gate_up = rows_of(gate_up_.view(), 0, rows);
  const clsa::TensorView ffn = rows_of(ffn_.view(), 0, rows);
  ops_.matmul(normed, w.gate_up.view(), gate_up);
  ops_.swiglu(gate_up, ffn);
  ops_.matmul(ffn, w.down.view(), branch);
  ops_.add(x, branch);
}

}  // namespace yoco
