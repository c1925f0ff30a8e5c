// Attention on the CPU: one work item per (query row, kv head); the GQA group's query heads
// share every gathered K/V chunk (include/clsa/cpu/attention.hpp).
#include <algorithm>
#include <type_traits>
#include <utility>

#include "backend/memory.hpp"
#include "clsa/cpu/attention.hpp"
#include "clsa/paged_view.hpp"
#include "cpu/backend.hpp"
#include "cpu/cpu_util.hpp"
#include "cpu/thread_pool.hpp"

namespace clsa {
namespace detail {

namespace {

/// Calls body(TypeTag<Out>{}) with Out the storage type of the output: the cache's (Elem) for
/// f32, f16 and bf16 caches, q's for e4m3 K/V (dispatched here, once per call).
template <class Elem, class Body>
void with_output_type(DType out_dtype, Body&& body) {
  if constexpr (std::is_same<Elem, float8_e4m3>::value) {
    dispatch_activation(out_dtype, body);
  } else {
    (void)out_dtype;
    body(TypeTag<Elem>{});
  }
}

/// The CPU attention's scratch for its bounds: the queries widened to f32, then each worker's
/// scratch (rounded up so that every worker's is aligned alike: Eigen's kernels, and so the
/// rounding, may depend on alignment, and results must not depend on which worker ran an item).
struct AttentionPlanCpu final : Plan {
  std::size_t rows = 0;
  std::size_t scratch_floats = 0;
  std::pair<float*, float*> carve(Carver& carver, const AttentionConfig& c) const {
    float* queries = carver.take<float>(rows * static_cast<std::size_t>(c.num_q_heads * c.head_dim));
    float* scratch = carver.take<float>(static_cast<std::size_t>(ThreadPool::instance().size()) * scratch_floats);
    return {queries, scratch};
  }
};

}  // namespace

std::unique_ptr<Plan> plan_attention_cpu(const AttentionConfig& config, const Bounds& bounds) {
  auto plan = std::make_unique<AttentionPlanCpu>();
  plan->rows = static_cast<std::size_t>(bounds.sequences) * static_cast<std::size_t>(bounds.tokens);
  const int group = config.num_q_heads / config.num_kv_heads;
  const std::size_t floats =
      cpu::attention_scratch(config.head_dim, group) + static_cast<std::size_t>(2 * group * config.head_dim);
  plan->scratch_floats = (floats + 63) / 64 * 64;
  Carver counter;
  plan->carve(counter, config);
  plan->workspace_bytes = counter.used();
  return plan;
}

void attend_cpu(const AttentionConfig& c, const AttendCall& call, const Plan& base_plan, void* scratch_base) {
  const auto& plan = static_cast<const AttentionPlanCpu&>(base_plan);
  const BatchTables& batch = call.batch;
  const PagedCacheLayout& layout = batch.layout;
  const RoutingRows routing = call.routing != nullptr ? RoutingRows::of(*call.routing) : RoutingRows{};
  const TensorView& out = call.out;
  const TensorView& lse = call.lse;
  const int tokens = call.tokens;
  const int group = c.num_q_heads / c.num_kv_heads;
  const int dim = c.head_dim;
  const std::size_t rows = static_cast<std::size_t>(batch.num_sequences) * static_cast<std::size_t>(tokens);
  Carver carver(scratch_base);
  const std::pair<float*, float*> pieces = plan.carve(carver, c);
  float* const queries = pieces.first;
  float* const scratch = pieces.second;
  widen_to_f32(call.q, queries);
  ThreadPool& pool = ThreadPool::instance();
  const std::int32_t* indptr = batch.page_indptr;
  const std::int32_t* indices = batch.page_indices;

  dispatch_float(layout.dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;  // of K and V
    constexpr bool fp8 = std::is_same<Elem, float8_e4m3>::value;
    // out has the cache's dtype, or with e4m3 K/V that of q (f32, f16 or bf16).
    with_output_type<Elem>(out.dtype(), [&](auto out_tag) {
      using Out = typename decltype(out_tag)::type;
      pool.parallel_for(static_cast<std::int64_t>(rows) * c.num_kv_heads, [&](std::int64_t item, int worker) {
        const std::int64_t row = item / c.num_kv_heads;
        const int kv_head = static_cast<int>(item % c.num_kv_heads);
        const int b = static_cast<int>(row / tokens);
        const int t = static_cast<int>(row % tokens);
        float* result = scratch + static_cast<std::size_t>(worker) * plan.scratch_floats;
        float* lse_values = result + group * dim;
        float* attend_scratch = lse_values + group;
        const cpu::PagedSequence<Elem> paged(layout, indices + indptr[b]);
        const float* query =
            queries + (static_cast<std::size_t>(row) * c.num_q_heads + static_cast<std::size_t>(kv_head) * group) * dim;
        // e4m3 K/V are their values times the kv head's scales, constant over the item: the K
        // scale folds into the softmax scale (scale * q.(s_k k) = (scale * s_k) * q.k, the lse
        // included) and the V scale into the output (sum p (s_v v) = s_v * sum p v).
        float scale = call.scale;
        float value_scale = 1.0f;
        if constexpr (fp8) {
          scale *= layout.k_scales[kv_head * layout.k_scale_stride];
          value_scale = layout.v_scales[kv_head * layout.v_scale_stride];
        }
        if (routing.positions != nullptr) {
          const std::int32_t* routed = routing.row_positions(b, t);
          const int count = routing.count(b, t);
          cpu::attend(
              paged, kv_head, dim, count, [routed](int i) { return routed[i]; }, query, group, scale, result,
              lse_values, attend_scratch);
        } else {
          const int visible = visible_length(batch.host_lengths[b], tokens, t);
          cpu::attend(
              paged, kv_head, dim, visible, [](int i) { return i; }, query, group, scale, result, lse_values,
              attend_scratch);
        }
        Out* destination = out.data_as<Out>() + b * out.stride(0) + t * out.stride(1);
        for (int g = 0; g < group; ++g) {
          const int head = kv_head * group + g;
          Out* head_out = destination + head * out.stride(2);
          if constexpr (fp8) {
            for (int d = 0; d < dim; ++d) head_out[d] = from_float<Out>(result[g * dim + d] * value_scale);
          } else {
            for (int d = 0; d < dim; ++d) head_out[d] = from_float<Out>(result[g * dim + d]);
          }
          if (lse.defined())
            lse.data_as<float>()[b * lse.stride(0) + t * lse.stride(1) + head * lse.stride(2)] = lse_values[g];
        }
      });
    });
  });
}

}  // namespace detail
}  // namespace clsa
