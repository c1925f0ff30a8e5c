// yoco_decoder: a whole YOCO-style decoder built on libclsa, decoded three ways with the same
// weights and the same step code: CLSA (one shared cache, one indexer per step whose routing every
// cross-decoder layer reuses), YOCO with dense cross-attention, and a standard Transformer with a
// K/V cache per layer. Reports per variant the prefill and decode step times, the KV memory per
// sequence, and for CLSA against YOCO dense the logits' relative error and top-1 agreement.
//
// A program of its own (not a `clsa bench --model` mode): the model, its ops and the step code
// live in examples/yoco_decoder/, and the run shape is its own (README.md there).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "cpu_decoder_ops.hpp"
#include "cuda_support.hpp"
#include "decoder.hpp"
#include "model.hpp"
#include "table.hpp"
#if YOCO_WITH_CUDA
#include "cuda_decoder_ops.hpp"
#endif

namespace {

using yoco::Variant;

/// A shape whose every field is 0 ("not given").
yoco::ModelShape unset_shape() {
  yoco::ModelShape shape;
  shape.hidden = shape.q_heads = shape.kv_heads = shape.head_dim = shape.ffn = shape.layers = shape.vocab = 0;
  shape.window = shape.index_heads = shape.index_dim = shape.topics = 0;
  shape.rope_theta = shape.norm_eps = 0.0f;
  return shape;
}

struct Options {
  std::string backend = "cpu";
  std::string shape = "yoco-3b";
  yoco::ModelShape overrides = unset_shape();  // 0: the preset's
  yoco::RoutingOptions routing;
  std::int64_t context = 4096;
  int tokens = 100;
  int batch = 4;
  int join_every = 1;
  int prefill_chunk = 512;
  std::vector<std::string> variants = {"clsa", "yoco_dense", "standard"};
  std::vector<std::string> checks;
  bool per_step = false;
  std::uint64_t seed = 1;
  bool graphs = true;  // CUDA: decoding steps replay captured graphs
  int unavailable_exit_code = 1;
  bool table = false;  // the table instead of the schedule
  yoco::TableOptions table_options;
};

/// The largest relative error of CLSA's logits against YOCO dense's (per row) that --check exact
/// accepts on CUDA, where the sparse and dense kernels split their sums differently and every
/// activation is rounded to bf16: well below what routing fewer tokens gives (--check sparse
/// requires a row above it).
constexpr double kCudaExactTolerance = 5e-3;
/// The self-decoder check's tolerance on CUDA (bf16 activations; 1e-4 in f32 on the CPU).
constexpr double kCudaSelfDecoderTolerance = 1e-2;

/// A failed self-check: the message, and the program exits 1.
struct CheckFailure {
  std::string message;
};

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::string bytes_text(double bytes) {
  char text[32];
  if (bytes >= 1024.0 * 1024 * 1024) {
    std::snprintf(text, sizeof text, "%.2f GiB", bytes / (1024.0 * 1024 * 1024));
  } else if (bytes >= 1024.0 * 1024) {
    std::snprintf(text, sizeof text, "%.2f MiB", bytes / (1024.0 * 1024));
  } else {
    std::snprintf(text, sizeof text, "%.1f KiB", bytes / 1024.0);
  }
  return text;
}

/// One variant's decoder and what the run measured of it.
struct VariantRun {
  Variant variant;
  std::unique_ptr<yoco::Decoder> decoder;
  std::vector<int> slot_of;  // decoder slot of each sequence (-1: not live)
  double prefill_seconds = 0.0;
  double step_seconds = 0.0;  // decoding steps after the first (warm-up)
  int steps = 0;
  std::int64_t step_tokens = 0;
  double full_batch_seconds = 0.0;  // steps of the whole batch, after the first
  int full_batch_steps = 0;
  std::vector<float> logits;       // host copy, [max_batch, vocab]
  std::vector<float> self_output;  // host copy of the self-decoder tap, [max_batch, hidden]
  yoco::KvMemory memory;           // at the largest batch
};

/// CLSA's logits against YOCO dense's: a row per sequence and decoding step, and a row per prompt
/// (the logits of its last token, from the prefill).
struct Comparison {
  std::int64_t rows = 0;
  std::int64_t top1_agree = 0;
  double relative_error_sum = 0.0;
  double relative_error_max = 0.0;
  std::int64_t rows_not_bitwise_equal = 0;
  std::int64_t prompt_rows = 0;  // the logits of the prompts' last tokens (prefill)
  std::int64_t prompt_rows_not_bitwise_equal = 0;
  double prompt_relative_error_max = 0.0;
  std::int64_t rows_above_cuda_tolerance = 0;  // decode and prompt rows above kCudaExactTolerance
};

std::int64_t argmax(const float* values, int count) {
  return std::max_element(values, values + count) - values;
}

double relative_error(const float* got, const float* expected, int count) {
  double difference = 0.0, norm = 0.0;
  for (int i = 0; i < count; ++i) {
    difference += (static_cast<double>(got[i]) - expected[i]) * (static_cast<double>(got[i]) - expected[i]);
    norm += static_cast<double>(expected[i]) * expected[i];
  }
  return std::sqrt(difference / norm);
}

yoco::ModelShape resolve_shape(const Options& options) {
  yoco::ModelShape shape = options.shape == "small" ? yoco::ModelShape::small() : yoco::ModelShape::yoco_3b();
  const yoco::ModelShape& o = options.overrides;
  auto take = [](auto& field, auto value) {
    if (value != 0) field = value;
  };
  take(shape.hidden, o.hidden);
  take(shape.q_heads, o.q_heads);
  take(shape.kv_heads, o.kv_heads);
  take(shape.head_dim, o.head_dim);
  take(shape.ffn, o.ffn);
  take(shape.layers, o.layers);
  take(shape.vocab, o.vocab);
  take(shape.window, o.window);
  take(shape.index_heads, o.index_heads);
  take(shape.index_dim, o.index_dim);
  take(shape.rope_theta, o.rope_theta);
  take(shape.topics, o.topics);
  return shape;
}

/// The device of `backend`: Error(unsupported) for cuda on a build without CUDA or a machine
/// without a GPU.
clsa::Device device_of(const std::string& backend) {
  if (backend != "cuda") return clsa::Device::cpu();
#if YOCO_WITH_CUDA
  return clsa::backend_device(clsa::resolve_backend(clsa::Backend::cuda));
#else
  throw clsa::Error(clsa::ErrorCode::unsupported, "--backend cuda: this build has no CUDA (CLSA_WITH_CUDA=OFF)");
#endif
}

std::unique_ptr<yoco::DecoderOps> make_ops(const cuda_support::OwnedStream& lane) {
  if (lane.device().is_cuda()) {
#if YOCO_WITH_CUDA
    return std::make_unique<yoco::CudaDecoderOps>(lane.stream(), lane.device().index);
#endif
  }
  return std::make_unique<yoco::CpuDecoderOps>();
}

/// The memory accounting against what the shape says it must be (check "memory"): the libclsa
/// caches' MemoryStats as the decoder reports them, for the live sequences of `live_tokens` tokens.
void check_memory(Variant variant, const yoco::KvMemory& m, const yoco::ModelShape& shape, std::size_t element,
                  std::int64_t live_tokens, int live_sequences) {
  const std::size_t kv_token = 2 * static_cast<std::size_t>(shape.kv_heads) * shape.head_dim * element;
  const std::size_t index_token = static_cast<std::size_t>(shape.index_dim) * element;
  const std::size_t window_token = static_cast<std::size_t>(shape.self_layers()) * kv_token;
  std::int64_t tokens = live_tokens;
  std::size_t per_token = kv_token, per_window_token = window_token;
  int window = shape.window;
  switch (variant) {
    case Variant::clsa:
      per_token = kv_token + index_token;  // K, V and the indexer key: once per token, for every layer
      break;
    case Variant::yoco_dense:
      break;  // K and V: once per token, for every layer
    case Variant::standard:
      tokens = live_tokens * shape.layers;  // every layer's cache keeps every token
      per_token = kv_token * static_cast<std::size_t>(shape.layers);
      per_window_token = 0;
      window = 0;
      break;
  }
  const std::size_t expected_bytes = static_cast<std::size_t>(live_tokens) * per_token;
  if (m.sequences != live_sequences || m.cached_tokens != tokens || m.bytes_per_token != per_token ||
      m.cache_bytes != expected_bytes || m.window_bytes_per_token != per_window_token || m.window != window) {
    char text[512];
    std::snprintf(text, sizeof text,
                  "memory accounting of %s: %d sequences, %lld cached tokens, %zu B/token, %zu B held, window %d "
                  "tokens of %zu B; expected %d, %lld, %zu, %zu, %d, %zu",
                  yoco::variant_name(variant), m.sequences, static_cast<long long>(m.cached_tokens), m.bytes_per_token,
                  m.cache_bytes, m.window, m.window_bytes_per_token, live_sequences, static_cast<long long>(tokens),
                  per_token, expected_bytes, window, per_window_token);
    throw CheckFailure{text};
  }
}

/// One run: the model, a decoder per variant, the schedule of joins, steps and leaves, and what
/// it measured and compared.
class Experiment {
 public:
  Experiment(Options options, const yoco::ModelShape& shape, const cuda_support::OwnedStream& lane,
             std::unique_ptr<yoco::DecoderOps> ops)
      : options_(std::move(options)),
        shape_(shape),
        lane_(lane),
        on_cuda_(lane.device().is_cuda()),
        ops_(std::move(ops)),
        step_timer_(lane, 2),
        longest_(options_.context + options_.tokens) {
    // The indexer's always-routed positions fit inside top_k (the Decoder clamps them alike).
    yoco::RoutingOptions& routing = options_.routing;
    routing.sink_tokens = std::min(routing.sink_tokens, routing.top_k / 2);
    routing.local_window = std::min(routing.local_window, routing.top_k - routing.sink_tokens);
    for (Variant v : {Variant::clsa, Variant::yoco_dense, Variant::standard}) {
      if (wants(v)) variants_.push_back(v);
    }
    compare_ = wants(Variant::clsa) && wants(Variant::yoco_dense);
    validate();
  }

  void print_setup() const;
  void build();
  void run_schedule();
  void print_report() const;
  /// Throws CheckFailure for the first asked-for check that fails; prints the others' results.
  void evaluate_checks() const;

 private:
  bool wants(Variant variant) const {
    const std::vector<std::string>& v = options_.variants;
    return std::find(v.begin(), v.end(), yoco::variant_name(variant)) != v.end();
  }
  bool checks(const char* name) const {
    const std::vector<std::string>& c = options_.checks;
    return std::find(c.begin(), c.end(), name) != c.end();
  }
  /// Each sequence's prompt is 16 tokens shorter than the one before it (lengths differ in a batch).
  std::int64_t prompt_length(int sequence) const {
    return std::max<std::int64_t>(1, options_.context - 16 * std::int64_t{sequence});
  }
  void validate() const;
  void join(int sequence);
  void step();
  /// Compares CLSA's logits rows with YOCO dense's; returns the rows' summed relative error and
  /// top-1 agreements.
  std::pair<double, int> compare_logits(int rows, bool prompt);
  void compare_self_decoder(int rows);
  void download(VariantRun& run, int rows);

  Options options_;
  const yoco::ModelShape shape_;
  const cuda_support::OwnedStream& lane_;
  const bool on_cuda_;
  std::unique_ptr<yoco::DecoderOps> ops_;
  cuda_support::StreamTimer step_timer_;  // a step's start and end: CUDA events, or the wall clock
  const std::int64_t longest_;
  std::vector<Variant> variants_;
  bool compare_ = false;

  std::unique_ptr<yoco::ModelWeights> weights_;
  std::vector<yoco::SequenceTokens> data_;
  std::vector<VariantRun> runs_;
  VariantRun* clsa_run_ = nullptr;
  VariantRun* dense_run_ = nullptr;
  VariantRun* standard_run_ = nullptr;

  // The schedule's state.
  std::vector<int> live_;  // sequences, in batch order
  std::vector<int> done_;  // decoding steps each sequence has run
  std::vector<int> slots_;
  std::vector<std::int32_t> tokens_;
  std::vector<double> step_seconds_;  // this step's, per variant
  int decode_steps_ = 0;
  int largest_batch_ = 0;

  // What was compared.
  Comparison comparison_;
  double self_decoder_error_max_ = 0.0;
  std::int64_t self_decoder_rows_ = 0;
};

void Experiment::validate() const {
  auto refuse = [](const std::string& message) { throw clsa::Error(clsa::ErrorCode::invalid_argument, message); };
  if (variants_.empty()) refuse("--variants names none of clsa, yoco_dense, standard");
  if ((checks("exact") || checks("sparse")) && !compare_) {
    refuse("--check exact or sparse compares clsa with yoco_dense: run both");
  }
  if (checks("exact") && (options_.routing.top_k < longest_ || options_.batch < 2)) {
    refuse("--check exact needs --top-k >= the longest sequence (" + std::to_string(longest_) +
           " tokens; then CLSA routes every token and must equal YOCO dense bitwise) and --batch >= 2");
  }
  if (checks("sparse") && options_.routing.top_k >= prompt_length(options_.batch - 1)) {
    refuse("--check sparse needs --top-k below the shortest prompt, so that CLSA leaves tokens out");
  }
  if (checks("self-decoder") && (!wants(Variant::standard) || variants_.size() < 2 || shape_.window < longest_)) {
    refuse(
        "--check self-decoder compares a YOCO variant's self-decoder output with the standard Transformer's first "
        "half: run both, with --window >= the longest sequence (" +
        std::to_string(longest_) + " tokens)");
  }
}

void Experiment::print_setup() const {
  const yoco::ModelShape& s = shape_;
  std::printf(
      "yoco_decoder (a program of its own, not a `clsa bench --model` mode): libclsa %s, backend %s (%s), %s%s\n",
      clsa::version(), clsa::backend_name(ops_->backend()), cuda_support::device_description(lane_.device()).c_str(),
      clsa::dtype_name(ops_->dtype()),
      on_cuda_ ? (options_.graphs ? ", decoding steps replayed as CUDA graphs" : ", eager launches") : "");
  std::printf(
      "model (shape %s, random structured weights, seed %llu): %d layers = %d self-decoder (sliding window %d) + %d "
      "cross-decoder; hidden %d, %d query / %d kv heads of %d, SwiGLU FFN %d, RMSNorm, RoPE theta %g, vocab %d; "
      "%.3f B parameters%s\n",
      options_.shape.c_str(), static_cast<unsigned long long>(options_.seed), s.layers, s.self_layers(), s.window,
      s.cross_layers(), s.hidden, s.q_heads, s.kv_heads, s.head_dim, s.ffn, static_cast<double>(s.rope_theta), s.vocab,
      static_cast<double>(s.parameters(false)) * 1e-9,
      wants(Variant::standard) ? " (+ the standard Transformer's own copies of the shared K/V projection)" : "");
  std::printf("CLSA indexer: %d heads x %d, top_k %d (%d sink tokens, local window %d), one select per step\n",
              s.index_heads, s.index_dim, options_.routing.top_k, options_.routing.sink_tokens,
              options_.routing.local_window);
  std::printf(
      "run: %d sequences, prompts of %lld..%lld tokens (prefill chunks of %d), %d decoding steps each; sequence i "
      "joins at step %d*i and leaves after its last step; every step feeds the data's next token (teacher-forced)\n",
      options_.batch, static_cast<long long>(prompt_length(options_.batch - 1)),
      static_cast<long long>(prompt_length(0)), options_.prefill_chunk, options_.tokens, options_.join_every);
  std::fflush(stdout);
}

void Experiment::build() {
  const auto start = std::chrono::steady_clock::now();
  weights_ =
      std::make_unique<yoco::ModelWeights>(yoco::make_weights(shape_, options_.seed, wants(Variant::standard), *ops_));
  for (int i = 0; i < options_.batch; ++i) {
    data_.push_back(yoco::make_sequence_tokens(shape_, prompt_length(i), options_.tokens, options_.seed, i));
  }
  yoco::DecoderLimits limits;
  limits.max_batch = options_.batch;
  limits.max_length = longest_;
  limits.prefill_chunk = options_.prefill_chunk;
  limits.graphs = on_cuda_ && options_.graphs;
  for (Variant v : variants_) {
    VariantRun r;
    r.variant = v;
    r.decoder = std::make_unique<yoco::Decoder>(v, *weights_, *ops_, limits, options_.routing);
    r.decoder->tap_self_decoder_output(checks("self-decoder"));
    r.slot_of.assign(static_cast<std::size_t>(options_.batch), -1);
    r.logits.resize(static_cast<std::size_t>(options_.batch) * shape_.vocab);
    r.self_output.resize(static_cast<std::size_t>(options_.batch) * shape_.hidden);
    runs_.push_back(std::move(r));
  }
  for (VariantRun& r : runs_) {
    if (r.variant == Variant::clsa) clsa_run_ = &r;
    if (r.variant == Variant::yoco_dense) dense_run_ = &r;
    if (r.variant == Variant::standard) standard_run_ = &r;
  }
  done_.assign(static_cast<std::size_t>(options_.batch), 0);
  slots_.reserve(static_cast<std::size_t>(options_.batch));
  tokens_.reserve(static_cast<std::size_t>(options_.batch));
  step_seconds_.assign(runs_.size(), 0.0);
  std::printf("weights and decoders built in %.1f s\n\n", seconds_since(start));
}

void Experiment::download(VariantRun& run, int rows) {
  ops_->download(run.decoder->logits(rows), run.logits.data());
  if (checks("self-decoder")) ops_->download(run.decoder->self_decoder_output(rows), run.self_output.data());
}

std::pair<double, int> Experiment::compare_logits(int rows, bool prompt) {
  std::pair<double, int> compared{0.0, 0};
  if (!compare_) return compared;
  const int vocab = shape_.vocab;
  for (int r = 0; r < rows; ++r) {
    const float* sparse = clsa_run_->logits.data() + static_cast<std::size_t>(r) * vocab;
    const float* dense = dense_run_->logits.data() + static_cast<std::size_t>(r) * vocab;
    const bool equal = std::memcmp(sparse, dense, static_cast<std::size_t>(vocab) * sizeof(float)) == 0;
    const double error = relative_error(sparse, dense, vocab);
    comparison_.rows_above_cuda_tolerance += error > kCudaExactTolerance ? 1 : 0;
    if (prompt) {
      ++comparison_.prompt_rows;
      comparison_.prompt_rows_not_bitwise_equal += equal ? 0 : 1;
      comparison_.prompt_relative_error_max = std::max(comparison_.prompt_relative_error_max, error);
      continue;
    }
    const bool agree = argmax(sparse, vocab) == argmax(dense, vocab);
    ++comparison_.rows;
    comparison_.rows_not_bitwise_equal += equal ? 0 : 1;
    comparison_.top1_agree += agree ? 1 : 0;
    comparison_.relative_error_sum += error;
    comparison_.relative_error_max = std::max(comparison_.relative_error_max, error);
    compared.first += error;
    compared.second += agree ? 1 : 0;
  }
  return compared;
}

void Experiment::compare_self_decoder(int rows) {
  if (!checks("self-decoder")) return;
  const VariantRun& yoco_run = clsa_run_ != nullptr ? *clsa_run_ : *dense_run_;
  for (int r = 0; r < rows; ++r) {
    const std::size_t at = static_cast<std::size_t>(r) * shape_.hidden;
    self_decoder_error_max_ = std::max(
        self_decoder_error_max_,
        relative_error(yoco_run.self_output.data() + at, standard_run_->self_output.data() + at, shape_.hidden));
    ++self_decoder_rows_;
  }
}

void Experiment::join(int sequence) {
  for (VariantRun& r : runs_) {
    const auto start = std::chrono::steady_clock::now();
    r.slot_of[static_cast<std::size_t>(sequence)] = r.decoder->join(data_[static_cast<std::size_t>(sequence)].prompt);
    clsa::synchronize(ops_->stream());
    r.prefill_seconds += seconds_since(start);
    download(r, 1);
  }
  compare_logits(1, true);
  compare_self_decoder(1);
  live_.push_back(sequence);
}

void Experiment::step() {
  const int batch = static_cast<int>(live_.size());
  tokens_.clear();
  for (int sequence : live_) {
    const yoco::SequenceTokens& d = data_[static_cast<std::size_t>(sequence)];
    tokens_.push_back(d.continuation[static_cast<std::size_t>(done_[static_cast<std::size_t>(sequence)])]);
  }
  for (std::size_t v = 0; v < runs_.size(); ++v) {
    VariantRun& r = runs_[v];
    slots_.clear();
    for (int sequence : live_) slots_.push_back(r.slot_of[static_cast<std::size_t>(sequence)]);
    step_timer_.mark(0);
    r.decoder->step(slots_, tokens_);
    step_timer_.mark(1);
    step_seconds_[v] = step_timer_.seconds(0, 1);
    if (decode_steps_ > 0) {  // the first step is warm-up
      r.step_seconds += step_seconds_[v];
      ++r.steps;
      r.step_tokens += batch;
      if (batch == options_.batch) {
        r.full_batch_seconds += step_seconds_[v];
        ++r.full_batch_steps;
      }
    }
    download(r, batch);
  }
  const std::pair<double, int> compared = compare_logits(batch, false);
  compare_self_decoder(batch);

  // The memory the variants hold now: kept at the largest batch, and checked every step.
  std::int64_t live_tokens = 0;
  for (int sequence : live_) {
    live_tokens += runs_.front().decoder->length(runs_.front().slot_of[static_cast<std::size_t>(sequence)]);
  }
  for (VariantRun& r : runs_) {
    const yoco::KvMemory held = r.decoder->memory();
    if (checks("memory")) check_memory(r.variant, held, shape_, clsa::dtype_size(ops_->dtype()), live_tokens, batch);
    if (batch > largest_batch_) r.memory = held;
  }
  largest_batch_ = std::max(largest_batch_, batch);

  if (options_.per_step) {
    std::printf("%5d %6d", decode_steps_, batch);
    for (double seconds : step_seconds_) std::printf(" %13.3f", seconds * 1e3);
    if (compare_) std::printf(" %13.2e %3d/%-2d", compared.first / batch, compared.second, batch);
    std::printf("%s\n", decode_steps_ == 0 ? "  (warm-up)" : "");
  }
  ++decode_steps_;
}

void Experiment::run_schedule() {
  if (options_.per_step) {
    std::printf("%5s %6s", "step", "batch");
    for (const VariantRun& r : runs_) {
      std::printf(" %13s", (std::string(yoco::variant_name(r.variant)) + " ms").c_str());
    }
    if (compare_) std::printf(" %13s %6s", "logits err", "top-1");
    std::printf("\n");
  }
  int joined = 0;
  for (int clock = 0; joined < options_.batch || !live_.empty(); ++clock) {
    while (joined < options_.batch && joined * options_.join_every <= clock) join(joined++);
    if (live_.empty()) continue;  // waiting for the next join
    step();
    // Sequences that decoded their last token leave.
    for (std::size_t i = 0; i < live_.size();) {
      const int sequence = live_[i];
      if (++done_[static_cast<std::size_t>(sequence)] < options_.tokens) {
        ++i;
        continue;
      }
      for (VariantRun& r : runs_) {
        r.decoder->leave(r.slot_of[static_cast<std::size_t>(sequence)]);
        r.slot_of[static_cast<std::size_t>(sequence)] = -1;
      }
      live_.erase(live_.begin() + static_cast<std::ptrdiff_t>(i));
    }
  }
}

void Experiment::print_report() const {
  std::printf(
      "\n%d decoding steps, batch 1..%d. Times: %s; a step is the whole model for every sequence of the batch "
      "(embedding to logits, cache appends and table refills included); the first step is warm-up.\n",
      decode_steps_, largest_batch_, on_cuda_ ? "CUDA events on the step's stream" : "wall clock");
  char full_batch_header[32];
  std::snprintf(full_batch_header, sizeof full_batch_header, "step ms B=%d", options_.batch);
  char per_sequence_header[48];
  std::snprintf(per_sequence_header, sizeof per_sequence_header, "KV/seq at %lld", static_cast<long long>(longest_));
  std::printf("%-11s %10s %10s %12s %11s %12s %15s %10s %8s\n", "variant", "prefill s", "step ms", full_batch_header,
              "decode t/s", "KV B/token", per_sequence_header, "step/clsa", "KV/clsa");
  for (const VariantRun& r : runs_) {
    const double step_ms = r.steps > 0 ? r.step_seconds * 1e3 / r.steps : 0.0;
    const double full_ms = r.full_batch_steps > 0 ? r.full_batch_seconds * 1e3 / r.full_batch_steps : 0.0;
    const double throughput = r.step_seconds > 0.0 ? static_cast<double>(r.step_tokens) / r.step_seconds : 0.0;
    const double per_sequence = static_cast<double>(r.memory.bytes_per_sequence(longest_));
    std::string step_ratio = "-", memory_ratio = "-";
    if (clsa_run_ != nullptr && clsa_run_->steps > 0 && r.steps > 0) {
      char text[32];
      std::snprintf(text, sizeof text, "%.2fx",
                    (r.step_seconds / r.steps) / (clsa_run_->step_seconds / clsa_run_->steps));
      step_ratio = text;
      std::snprintf(text, sizeof text, "%.2fx",
                    per_sequence / static_cast<double>(clsa_run_->memory.bytes_per_sequence(longest_)));
      memory_ratio = text;
    }
    std::printf("%-11s %10.3f %10.3f %12.3f %11.1f %12s %15s %10s %8s\n", yoco::variant_name(r.variant),
                r.prefill_seconds, step_ms, full_ms, throughput,
                bytes_text(static_cast<double>(r.memory.bytes_per_token)).c_str(), bytes_text(per_sequence).c_str(),
                step_ratio.c_str(), memory_ratio.c_str());
  }
  std::printf(
      "KV: the libclsa caches' MemoryStats per token (clsa: K+V+indexer key once for all %d cross-decoder layers; "
      "yoco_dense: K+V once; standard: K+V in each of its %d layers' caches) x %lld tokens, plus in the YOCO variants "
      "the self-decoder's window cache (%d layers x min(tokens, window %d)). Element type %s.\n",
      shape_.cross_layers(), shape_.layers, static_cast<long long>(longest_), shape_.self_layers(), shape_.window,
      clsa::dtype_name(ops_->dtype()));
  if (on_cuda_ && options_.graphs) {
    std::printf("CUDA graphs:");
    for (const VariantRun& r : runs_) {
      std::printf(" %s %d captured, %lld replays;", yoco::variant_name(r.variant), r.decoder->graphs_captured(),
                  static_cast<long long>(r.decoder->graph_replays()));
    }
    std::printf(" (one per batch size and section of the step)\n");
  }
  const Comparison& c = comparison_;
  if (compare_ && c.rows > 0) {
    std::printf(
        "\nCLSA vs YOCO dense over %lld decoded tokens (%d sequences x %d steps, the same inputs in both): logits "
        "relative error mean %.2e, max %.2e; top-1 agreement %lld/%lld (%.1f%%); bitwise equal logits %lld/%lld "
        "(prompts' last tokens: %lld/%lld)\n",
        static_cast<long long>(c.rows), options_.batch, options_.tokens,
        c.relative_error_sum / static_cast<double>(c.rows), c.relative_error_max, static_cast<long long>(c.top1_agree),
        static_cast<long long>(c.rows), 100.0 * static_cast<double>(c.top1_agree) / static_cast<double>(c.rows),
        static_cast<long long>(c.rows - c.rows_not_bitwise_equal), static_cast<long long>(c.rows),
        static_cast<long long>(c.prompt_rows - c.prompt_rows_not_bitwise_equal), static_cast<long long>(c.prompt_rows));
  }
}

void Experiment::evaluate_checks() const {
  const Comparison& c = comparison_;
  if (checks("exact") && on_cuda_) {
    // On CUDA the sparse and dense kernels split their sums differently: equal within bf16 rounding.
    if (c.rows_above_cuda_tolerance != 0 || c.rows == 0 || largest_batch_ < 2) {
      char text[320];
      std::snprintf(text, sizeof text,
                    "exact: with top_k >= every length CLSA's logits must equal YOCO dense's within %.0e relative on "
                    "every row (CUDA, bf16); %lld of %lld rows are further apart (max %.2e decode, %.2e prompt; "
                    "largest batch %d)",
                    kCudaExactTolerance, static_cast<long long>(c.rows_above_cuda_tolerance),
                    static_cast<long long>(c.rows + c.prompt_rows), c.relative_error_max, c.prompt_relative_error_max,
                    largest_batch_);
      throw CheckFailure{text};
    }
    std::printf(
        "check exact: passed (%lld decode rows and %lld prompt rows within %.0e relative of dense, max %.2e; batch up "
        "to %d)\n",
        static_cast<long long>(c.rows), static_cast<long long>(c.prompt_rows), kCudaExactTolerance,
        std::max(c.relative_error_max, c.prompt_relative_error_max), largest_batch_);
  } else if (checks("exact")) {
    if (c.rows_not_bitwise_equal != 0 || c.prompt_rows_not_bitwise_equal != 0 || c.rows == 0 || largest_batch_ < 2) {
      throw CheckFailure{
          "exact: with top_k >= every length CLSA's logits must equal YOCO dense's bitwise on every row "
          "of a batch of several sequences; " +
          std::to_string(c.rows_not_bitwise_equal + c.prompt_rows_not_bitwise_equal) + " of " +
          std::to_string(c.rows + c.prompt_rows) + " rows differ (largest batch " + std::to_string(largest_batch_) +
          ")"};
    }
    std::printf("check exact: passed (%lld decode rows and %lld prompt rows bitwise equal, batch up to %d)\n",
                static_cast<long long>(c.rows), static_cast<long long>(c.prompt_rows), largest_batch_);
  }
  if (checks("sparse") && on_cuda_) {
    if (c.rows_above_cuda_tolerance == 0) {
      char text[256];
      std::snprintf(text, sizeof text,
                    "sparse: with top_k below the context CLSA's logits stay within %.0e of YOCO dense's on every row "
                    "(max %.2e): the sparse path did not run, or the exact check's tolerance tells nothing",
                    kCudaExactTolerance, c.relative_error_max);
      throw CheckFailure{text};
    }
    std::printf(
        "check sparse: passed (%lld of %lld rows further than %.0e from dense: the routing leaves tokens out)\n",
        static_cast<long long>(c.rows_above_cuda_tolerance), static_cast<long long>(c.rows + c.prompt_rows),
        kCudaExactTolerance);
  } else if (checks("sparse")) {
    if (c.rows_not_bitwise_equal == 0) {
      throw CheckFailure{
          "sparse: with top_k below the context CLSA's logits equal YOCO dense's on every row: the "
          "sparse path did not run"};
    }
    std::printf("check sparse: passed (%lld of %lld rows differ from dense: the routing leaves tokens out)\n",
                static_cast<long long>(c.rows_not_bitwise_equal), static_cast<long long>(c.rows));
  }
  if (checks("memory")) {
    std::printf(
        "check memory: passed (every step, every variant: the caches' MemoryStats tokens and bytes equal the shape's "
        "count: K/V once per token in YOCO, once per token and layer in the standard Transformer)\n");
  }
  if (checks("self-decoder")) {
    const double kTolerance = on_cuda_ ? kCudaSelfDecoderTolerance : 1e-4;
    if (self_decoder_rows_ == 0 || !(self_decoder_error_max_ <= kTolerance)) {
      char text[256];
      std::snprintf(text, sizeof text,
                    "self-decoder: the YOCO self-decoder's output (window attention) differs from the standard "
                    "Transformer's first half (libclsa dense attention) by %.2e relative (tolerance %.0e)",
                    self_decoder_error_max_, kTolerance);
      throw CheckFailure{text};
    }
    std::printf("check self-decoder: passed (%lld rows, window attention = dense attention within %.2e relative)\n",
                static_cast<long long>(self_decoder_rows_), self_decoder_error_max_);
  }
}

/// --table: the model once, then the table over the variants asked for.
int run_table(const Options& options, const yoco::ModelShape& shape, const cuda_support::OwnedStream& lane) {
  const std::unique_ptr<yoco::DecoderOps> ops = make_ops(lane);
  std::vector<Variant> variants;
  for (Variant v : {Variant::clsa, Variant::yoco_dense, Variant::standard}) {
    if (std::find(options.variants.begin(), options.variants.end(), yoco::variant_name(v)) != options.variants.end()) {
      variants.push_back(v);
    }
  }
  const bool standard = std::find(variants.begin(), variants.end(), Variant::standard) != variants.end();
  std::printf("yoco_decoder --table: libclsa %s, backend %s (%s), %s; shape %s (%.3f B parameters), top_k %d\n",
              clsa::version(), clsa::backend_name(ops->backend()),
              cuda_support::device_description(lane.device()).c_str(), clsa::dtype_name(ops->dtype()),
              options.shape.c_str(), static_cast<double>(shape.parameters(standard)) * 1e-9, options.routing.top_k);
  std::fflush(stdout);
  const auto start = std::chrono::steady_clock::now();
  const yoco::ModelWeights weights = yoco::make_weights(shape, options.seed, standard, *ops);
  clsa::synchronize(ops->stream());
  std::printf("weights built in %.1f s\n", seconds_since(start));
  yoco::DeviceProbe probe;
#if YOCO_WITH_CUDA
  if (auto* cuda_ops = dynamic_cast<yoco::CudaDecoderOps*>(ops.get())) {
    probe.free_memory = [cuda_ops] {
      std::size_t free_bytes = 0, total_bytes = 0;
      cuda_ops->device_memory(free_bytes, total_bytes);
      return free_bytes;
    };
    probe.forget_failed_allocation = [cuda_ops] { cuda_ops->forget_failed_allocation(); };
  }
#endif
  yoco::RoutingOptions routing = options.routing;
  routing.sink_tokens = std::min(routing.sink_tokens, routing.top_k / 2);
  routing.local_window = std::min(routing.local_window, routing.top_k - routing.sink_tokens);
  yoco::run_table(options.table_options, weights, *ops, lane, routing, variants,
                  lane.device().is_cuda() && options.graphs, probe);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  CLI::App app{
      "yoco_decoder: a whole YOCO-style decoder on libclsa (a program of its own; there is no `clsa bench --model` "
      "mode). A YOCO-3B-like model with random weights (hidden 3072, 24 query / 8 kv heads of 128, SwiGLU FFN 8192, "
      "RMSNorm, RoPE; 26 layers: 13 self-decoder with sliding-window attention over a 1024-token window, 13 "
      "cross-decoder over one SharedKVCache) is prefilled and decoded three ways with the same weights and step code: "
      "clsa (one CrossLayerIndexer per step, its routing shared by every cross-decoder layer), yoco_dense (dense "
      "cross-attention over the shared cache) and standard (every layer its own K/V cache, dense attention). Prints "
      "step times, KV bytes per sequence, and CLSA's logits against YOCO dense's (relative error, top-1 agreement). "
      "--shape small runs a small model in seconds. See examples/yoco_decoder/README.md."};
  app.add_option("--backend", options.backend,
                 "cpu (the decoder's ops in Eigen, f32) or cuda (cuBLAS and this example's kernels, bf16; libclsa's "
                 "CUDA backend)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  app.add_option("--shape", options.shape,
                 "yoco-3b (the shape above) or small (hidden 256, 4/2 heads of 64, FFN 512, "
                 "4 layers, vocab 1024, window 64, indexer 4 x 64); the flags below override it")
      ->check(CLI::IsMember({"yoco-3b", "small"}))
      ->capture_default_str();
  yoco::ModelShape& o = options.overrides;
  app.add_option("--hidden", o.hidden, "hidden size")->check(CLI::PositiveNumber);
  app.add_option("--q-heads", o.q_heads, "query heads")->check(CLI::PositiveNumber);
  app.add_option("--kv-heads", o.kv_heads, "kv heads")->check(CLI::PositiveNumber);
  app.add_option("--head-dim", o.head_dim, "head dimension (64, 128, 256)")->check(CLI::IsMember({64, 128, 256}));
  app.add_option("--ffn", o.ffn, "SwiGLU intermediate size")->check(CLI::PositiveNumber);
  app.add_option("--layers", o.layers, "layers: the first half self-decoder, the rest cross-decoder")
      ->check(CLI::Range(2, 512));
  app.add_option("--vocab", o.vocab, "vocabulary size")->check(CLI::PositiveNumber);
  app.add_option("--window", o.window, "the self-decoder's sliding window (tokens, the query's own included)")
      ->check(CLI::PositiveNumber);
  app.add_option("--index-heads", o.index_heads, "indexer heads")->check(CLI::PositiveNumber);
  app.add_option("--index-dim", o.index_dim, "indexer key dimension (64, 128)")->check(CLI::IsMember({64, 128}));
  app.add_option("--rope-theta", o.rope_theta, "RoPE base")->check(CLI::PositiveNumber);
  app.add_option("--topics", o.topics, "topics of the structured weights and data")->check(CLI::Range(2, 1 << 20));
  app.add_option("--top-k", options.routing.top_k, "tokens the indexer routes each query to")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--sink-tokens", options.routing.sink_tokens, "first positions always routed (inside top_k)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--local-window", options.routing.local_window, "last positions always routed (inside top_k)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--context", options.context, "prompt tokens of the first sequence (each next one 16 fewer)")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 26))
      ->capture_default_str();
  app.add_option("--tokens", options.tokens, "decoding steps per sequence: the N tokens CLSA is compared over")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--batch", options.batch, "sequences, all decoded in one batch once joined")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--join-every", options.join_every,
                 "steps between two sequences' joins (0: all join before the first step, a fixed batch); each "
                 "leaves after its --tokens steps, so the batch grows, stays, and shrinks")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--prefill-chunk", options.prefill_chunk, "prompt tokens per prefill pass")
      ->check(CLI::Range(1, 1 << 16))
      ->capture_default_str();
  app.add_option("--variants", options.variants, "which of clsa, yoco_dense, standard to run")
      ->check(CLI::IsMember({"clsa", "yoco_dense", "standard"}))
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--check", options.checks,
                 "self-checks, exit 1 on failure: exact (CLSA == YOCO dense bitwise on every row, on CUDA within 5e-3 "
                 "relative; needs top_k >= the longest sequence), sparse (CLSA differs from dense, on CUDA by more "
                 "than 5e-3 on some row: needs top_k below the prompts), memory (the "
                 "caches' MemoryStats against the shape's byte count, every step), self-decoder (the self-decoder's "
                 "window attention against the standard Transformer's dense attention; needs window >= the longest "
                 "sequence)")
      ->check(CLI::IsMember({"exact", "sparse", "memory", "self-decoder"}))
      ->delimiter(',');
  app.add_flag("--per-step", options.per_step, "print every step's times and comparison");
  app.add_flag(
      "--pdl", options.routing.enable_pdl,
      "CUDA sm_90+: libclsa's kernels launch as programmatic dependents of the kernel before them (enable_pdl)");
  app.add_option("--graphs", options.graphs,
                 "CUDA: decoding steps replay CUDA graphs captured once per batch size (false: eager launches)")
      ->capture_default_str();
  app.add_option("--unavailable-exit-code", options.unavailable_exit_code,
                 "exit status when the backend is not available here (a test runner's skip code)")
      ->capture_default_str();
  yoco::TableOptions& table = options.table_options;
  app.add_flag("--table", options.table,
               "instead of the schedule: the issue's table (step time of each variant at every --table-contexts x "
               "--table-batches, the KV memory per sequence, the largest batch that fits and its throughput, the "
               "ratios); contexts are filled with synthetic K/V (no prefill)");
  app.add_option("--table-contexts", table.contexts, "the table's contexts (tokens)")
      ->delimiter(',')
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 26))
      ->capture_default_str();
  app.add_option("--table-batches", table.batches, "the table's batch sizes")
      ->delimiter(',')
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--table-warmup", table.warmup, "untimed steps before the timed ones (the first captures)")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  app.add_option("--table-steps", table.steps, "timed steps per entry (the median is reported)")
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  app.add_option("--table-max-batch", table.max_batch_cap,
                 "also time each variant at the largest batch that fits the device, up to this many (0: not; CUDA "
                 "only)")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str();
  app.add_option("--seed", options.seed, "seed of the weights and the data")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    const clsa::Device device = device_of(options.backend);
    const cuda_support::OwnedStream lane(device);
    if (options.table) return run_table(options, resolve_shape(options), lane);
    Experiment experiment(options, resolve_shape(options), lane, make_ops(lane));
    experiment.print_setup();
    experiment.build();
    experiment.run_schedule();
    experiment.print_report();
    experiment.evaluate_checks();
    return 0;
  } catch (const CheckFailure& failure) {
    std::fflush(stdout);
    std::fprintf(stderr, "yoco_decoder: check FAILED: %s\n", failure.message.c_str());
    return 1;
  } catch (const clsa::Error& error) {
    std::fflush(stdout);
    std::fprintf(stderr, "yoco_decoder: error (%s): %s\n", clsa::error_code_name(error.code()), error.what());
    return error.code() == clsa::ErrorCode::unsupported ? options.unavailable_exit_code : 1;
  }
}
