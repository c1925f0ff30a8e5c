#include "table.hpp"

#include <algorithm>
#include <cstdio>
#include <string>
#include <utility>

namespace yoco {

namespace {

/// One (variant, context, batch) run: the median step and the tokens per second there.
struct Measurement {
  bool ran = false;
  std::string why_not;  // when it did not run
  double step_ms = 0.0;
  double tokens_per_second = 0.0;
  std::size_t kv_per_sequence = 0;
};

struct VariantRow {
  Variant variant;
  std::size_t kv_per_sequence = 0;
  int max_batch = 0;  // 0: not determined (CPU, or --table-max-batch 0); -1: not even one fits
  std::vector<Measurement> at_batch;
  Measurement at_max;
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

std::string context_name(std::int64_t tokens) {
  return tokens % 1024 == 0 ? std::to_string(tokens / 1024) + "K" : std::to_string(tokens);
}

std::string bytes_text(std::size_t bytes) {
  char text[32];
  const double b = static_cast<double>(bytes);
  if (b >= 1024.0 * 1024.0 * 1024.0) {
    std::snprintf(text, sizeof text, "%.3f GiB", b / (1024.0 * 1024.0 * 1024.0));
  } else {
    std::snprintf(text, sizeof text, "%.2f MiB", b / (1024.0 * 1024.0));
  }
  return text;
}

class Table {
 public:
  Table(const TableOptions& options, const ModelWeights& weights, DecoderOps& ops,
        const cuda_support::OwnedStream& lane, const RoutingOptions& routing, bool graphs, const DeviceProbe& device)
      : options_(options),
        weights_(weights),
        ops_(ops),
        lane_(lane),
        routing_(routing),
        graphs_(graphs),
        device_(device) {}

  VariantRow run(Variant variant, std::int64_t context) {
    VariantRow row;
    row.variant = variant;
    row.max_batch = largest_batch(variant, context);
    for (int batch : options_.batches) {
      Measurement m;
      if (row.max_batch != 0 && batch > row.max_batch) {
        m.why_not = "does not fit";
      } else {
        m = measure(variant, context, batch);
      }
      if (m.ran) row.kv_per_sequence = m.kv_per_sequence;
      row.at_batch.push_back(m);
    }
    if (row.max_batch > 0) {
      const auto same = std::find(options_.batches.begin(), options_.batches.end(), row.max_batch);
      row.at_max = same != options_.batches.end()
                       ? row.at_batch[static_cast<std::size_t>(same - options_.batches.begin())]
                       : measure(variant, context, row.max_batch);
      if (row.at_max.ran) row.kv_per_sequence = row.at_max.kv_per_sequence;
    }
    return row;
  }

 private:
  DecoderLimits limits(std::int64_t context, int batch) const {
    DecoderLimits limits;
    limits.max_batch = batch;
    limits.max_length = context + options_.warmup + options_.steps + 1;
    limits.graphs = graphs_;
    return limits;
  }

  void forget_failure() const {
    if (device_.forget_failed_allocation) device_.forget_failed_allocation();
  }

  /// The largest batch whose decoder fits the free memory: the memory of a decoder of 1 and of 2
  /// slots gives the per-sequence and the fixed part; the estimate is then built, and shrunk by 5%
  /// until it builds. 0 where the probe or the cap says not to; -1 when one sequence does not fit.
  int largest_batch(Variant variant, std::int64_t context) {
    if (!device_.free_memory || options_.max_batch_cap <= 0) return 0;
    const std::size_t free_before = device_.free_memory();
    std::size_t one = 0, two = 0;
    try {
      Decoder decoder(variant, weights_, ops_, limits(context, 1), routing_);
      clsa::synchronize(ops_.stream());
      one = free_before - device_.free_memory();
    } catch (const clsa::Error&) {
      forget_failure();
      return -1;
    }
    try {
      Decoder decoder(variant, weights_, ops_, limits(context, 2), routing_);
      clsa::synchronize(ops_.stream());
      two = free_before - device_.free_memory();
    } catch (const clsa::Error&) {
      forget_failure();
      return 1;
    }
    if (two <= one) return 0;  // allocations too coarse to tell at this context
    const std::size_t per_sequence = two - one;
    const std::size_t fixed = one > per_sequence ? one - per_sequence : 0;
    const std::size_t room =
        free_before > fixed + options_.headroom_bytes ? free_before - fixed - options_.headroom_bytes : 0;
    int batch =
        static_cast<int>(std::min<std::size_t>(room / per_sequence, static_cast<std::size_t>(options_.max_batch_cap)));
    while (batch > 1) {
      try {
        Decoder decoder(variant, weights_, ops_, limits(context, batch), routing_);
        return batch;
      } catch (const clsa::Error&) {
        forget_failure();
        batch = std::max(1, batch * 95 / 100);
      }
    }
    return 1;
  }

  Measurement measure(Variant variant, std::int64_t context, int batch) {
    Measurement m;
    try {
      Decoder decoder(variant, weights_, ops_, limits(context, batch), routing_);
      std::vector<int> slots;
      std::vector<std::int32_t> tokens;
      for (int b = 0; b < batch; ++b) {
        slots.push_back(decoder.join_synthetic(context));
        tokens.push_back(static_cast<std::int32_t>((7919 * std::int64_t{b + 1}) % weights_.shape.vocab));
      }
      clsa::synchronize(ops_.stream());
      m.kv_per_sequence = decoder.memory().bytes_per_sequence(context);
      for (int i = 0; i < options_.warmup; ++i) decoder.step(slots, tokens);
      // Steps back to back (the host runs ahead); a mark before and after each.
      cuda_support::StreamTimer timer(lane_, 2 * options_.steps);
      for (int i = 0; i < options_.steps; ++i) {
        timer.mark(2 * i);
        decoder.step(slots, tokens);
        timer.mark(2 * i + 1);
      }
      std::vector<double> seconds;
      for (int i = 0; i < options_.steps; ++i) seconds.push_back(timer.seconds(2 * i, 2 * i + 1));
      clsa::synchronize(ops_.stream());
      decoder.check_status();
      const double step = median(seconds);
      m.ran = true;
      m.step_ms = step * 1e3;
      m.tokens_per_second = static_cast<double>(batch) / step;
      std::printf("  %-10s context %7s batch %4d: step %9.3f ms (median of %d), %9.1f tokens/s%s\n",
                  variant_name(variant), context_name(context).c_str(), batch, m.step_ms, options_.steps,
                  m.tokens_per_second, graphs_ ? " (graph replays)" : "");
      std::fflush(stdout);
    } catch (const clsa::Error& error) {
      forget_failure();
      m.why_not = clsa::error_code_name(error.code());
      std::printf("  %-10s context %7s batch %4d: not run (%s: %s)\n", variant_name(variant),
                  context_name(context).c_str(), batch, m.why_not.c_str(), error.what());
      std::fflush(stdout);
    }
    return m;
  }

  const TableOptions& options_;
  const ModelWeights& weights_;
  DecoderOps& ops_;
  const cuda_support::OwnedStream& lane_;
  RoutingOptions routing_;
  bool graphs_;
  const DeviceProbe& device_;
};

const VariantRow* find_row(const std::vector<VariantRow>& rows, Variant variant) {
  for (const VariantRow& row : rows) {
    if (row.variant == variant) return &row;
  }
  return nullptr;
}

std::string ratio(const Measurement& over, const Measurement& under, bool throughput) {
  if (!over.ran || !under.ran) return "-";
  char text[32];
  std::snprintf(text, sizeof text, "%.2fx",
                throughput ? under.tokens_per_second / over.tokens_per_second : over.step_ms / under.step_ms);
  return text;
}

}  // namespace

void run_table(const TableOptions& options, const ModelWeights& weights, DecoderOps& ops,
               const cuda_support::OwnedStream& lane, const RoutingOptions& routing,
               const std::vector<Variant>& variants, bool graphs, const DeviceProbe& device) {
  Table table(options, weights, ops, lane, routing, graphs, device);
  std::printf(
      "table: decoding steps (T = 1, every sequence at the context; the whole model, embedding to logits) after %d "
      "warm-up steps, median of %d, timed by %s; contexts filled with synthetic K/V (no prefill)\n",
      options.warmup, options.steps, lane.stream().cuda() != nullptr ? "CUDA events" : "the wall clock");
  std::fflush(stdout);
  for (std::int64_t context : options.contexts) {
    std::vector<VariantRow> rows;
    for (Variant variant : variants) rows.push_back(table.run(variant, context));

    std::printf("\ncontext %s (%lld tokens)\n%-11s %14s %9s", context_name(context).c_str(),
                static_cast<long long>(context), "variant", "KV/sequence", "max B");
    for (int batch : options.batches)
      std::printf(" %11s %11s", ("B=" + std::to_string(batch) + " ms").c_str(), "tok/s");
    std::printf(" %11s %11s\n", "max B ms", "tok/s");
    for (const VariantRow& row : rows) {
      const std::string max_batch = row.max_batch > 0 ? std::to_string(row.max_batch) : row.max_batch < 0 ? "0" : "-";
      std::printf("%-11s %14s %9s", variant_name(row.variant),
                  row.kv_per_sequence > 0 ? bytes_text(row.kv_per_sequence).c_str() : "-", max_batch.c_str());
      for (const Measurement& m : row.at_batch) {
        if (m.ran) {
          std::printf(" %11.3f %11.1f", m.step_ms, m.tokens_per_second);
        } else {
          std::printf(" %11s %11s", m.why_not.empty() ? "-" : "n/a", "-");
        }
      }
      if (row.at_max.ran) {
        std::printf(" %11.3f %11.1f\n", row.at_max.step_ms, row.at_max.tokens_per_second);
      } else {
        std::printf(" %11s %11s\n", "-", "-");
      }
    }
    const VariantRow* clsa_row = find_row(rows, Variant::clsa);
    if (clsa_row == nullptr) continue;
    for (const VariantRow& row : rows) {
      if (row.variant == Variant::clsa) continue;
      std::printf("%s step / clsa step:", variant_name(row.variant));
      for (std::size_t i = 0; i < options.batches.size(); ++i) {
        std::printf(" B=%d %s", options.batches[i], ratio(row.at_batch[i], clsa_row->at_batch[i], false).c_str());
      }
      std::printf("; throughput at the largest batch, clsa / %s: %s\n", variant_name(row.variant),
                  ratio(row.at_max, clsa_row->at_max, true).c_str());
    }
    std::printf(
        "(the paper, at 128K: up to 7.6x faster decoding and 17.1x more throughput than the standard Transformer; "
        "here random weights, a %d-token self-decoder window, %s weights, activations and K/V, one device)\n",
        weights.shape.window, clsa::dtype_name(ops.dtype()));
    std::fflush(stdout);
  }
}

}  // namespace yoco
