// The attention's plans and launches: how a call splits its work, which kernel variant serves it,
// the workspace of the splits' partial results. The kernels are in attention_cuda_core.cu and
// attention_tensor_core.cu, what they share in attention_common.cuh.
#include <algorithm>
#include <climits>
#include <vector>

#include "attention_common.cuh"

namespace clsa {
namespace cuda_kernels {

namespace {

using namespace attention_kernels;

int next_power_of_two(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

/// Splits so that the grid fills the resident CTA slots (`slots` = multiprocessors x CTAs per
/// multiprocessor of the kernel variant) in whole waves, with kMinChunk..kMaxChunk tokens each:
/// the fewest waves w whose split count slots * w / units reaches ceil(span / kMaxChunk).
SplitPlan make_split_plan(int rows, int q_heads, int kv_heads, std::int64_t span, std::int64_t slots) {
  SplitPlan plan;
  plan.group = q_heads / kv_heads;
  plan.padded = next_power_of_two(std::min(plan.group, kMaxGroup));
  plan.head_chunks = static_cast<int>(ceil_div(plan.group, plan.padded));
  span = std::max<std::int64_t>(span, 1);
  const std::int64_t units = std::int64_t{rows} * kv_heads * plan.head_chunks;
  const std::int64_t most = std::max<std::int64_t>(1, ceil_div(span, kMinChunk));
  const std::int64_t wanted = std::min(most, ceil_div(span, kMaxChunk));
  std::int64_t splits = std::min(most, std::max<std::int64_t>(1, slots / units));
  if (splits < wanted) splits = std::min(most, slots * ceil_div(wanted * units, slots) / units);
  std::int64_t chunk = ceil_div(ceil_div(span, splits), 32) * 32;
  chunk = std::min<std::int64_t>(std::max<std::int64_t>(chunk, ceil_div(span, kMaxSplits)),
                                 std::max<std::int64_t>(span, 32));
  plan.chunk = static_cast<int>(chunk);
  plan.splits = static_cast<int>(ceil_div(span, chunk));
  return plan;
}

const std::vector<Variant>& variants() {
  static const std::vector<Variant> all = [] {
    std::vector<Variant> v = cuda_core_variants();
    const std::vector<Variant> tensor_core = tensor_core_variants();
    v.insert(v.end(), tensor_core.begin(), tensor_core.end());
    return v;
  }();
  return all;
}

int dtype_slot(DType dtype) {
  return dtype == DType::f32 ? 0 : dtype == DType::f16 ? 1 : 2;
}

SplitPlan split_plan(const AttentionPlan& plan, int slot, int rows) {
  return make_split_plan(rows, plan.q_heads, plan.kv_heads, plan.span, plan.slots[slot]);
}

}  // namespace

bool attention_supports(int dim) {
  for (const Variant& v : variants()) {
    if (v.dim == dim) return true;
  }
  return false;
}

AttentionPlan plan_attention(int max_rows, std::int64_t span, int q_heads, int kv_heads, int dim, bool enable_pdl) {
  const int group = q_heads / kv_heads;
  const int padded = next_power_of_two(std::min(group, kMaxGroup));
  const std::int64_t head_chunks = ceil_div(group, padded);
  if (std::int64_t{kv_heads} * head_chunks > 65535) {
    detail::fail(ErrorCode::unsupported,
                 detail::concat(kv_heads, " kv heads x ", head_chunks, " head chunks exceed a grid's 65535"));
  }
  AttentionPlan plan;
  plan.max_rows = max_rows;
  plan.span = std::max<std::int64_t>(span, 1);
  plan.q_heads = q_heads;
  plan.kv_heads = kv_heads;
  plan.dim = dim;
  plan.dependent_launch = enable_pdl;
  std::size_t partials = 0;
  const DType dtypes[3] = {DType::f32, DType::f16, DType::bf16};
  for (int slot = 0; slot < 3; ++slot) {
    for (std::size_t i = 0; i < variants().size(); ++i) {
      const Variant& v = variants()[i];
      if (v.dtype == dtypes[slot] && v.dim == dim && v.padded == padded) plan.variant[slot] = static_cast<int>(i);
    }
    if (plan.variant[slot] < 0) {
      detail::fail(ErrorCode::unsupported,
                   detail::concat("head_dim ", dim, "; the CUDA path supports 64, 128 and 256"));
    }
    const Variant& v = variants()[static_cast<std::size_t>(plan.variant[slot])];
    // Resident CTAs per multiprocessor of this variant (registers bound it; the shared memory of
    // a 1024-token split is a typical size).
    SplitPlan typical;
    typical.padded = padded;
    typical.chunk = 1024;
    const void* kernel = reinterpret_cast<const void*>(v.kernel);
    plan.dependent_launch = plan.dependent_launch && dependent_launch_ready(kernel);
    const int resident = resident_blocks(kernel, v.threads, shared_bytes(typical, v.acc_row_floats, v.groups_per_cta),
                                         "cudaOccupancyMaxActiveBlocksPerMultiprocessor (attention)");
    plan.slots[slot] = std::int64_t{resident} * multiprocessor_count();
    // Room for the partial results of the call with the most (rows x splits) of any batch size
    // within the bounds: the layout is the same for all of them.
    std::size_t shared = 0;
    for (int rows = 1; rows <= max_rows; ++rows) {
      const SplitPlan splits = split_plan(plan, slot, rows);
      shared = std::max(shared, shared_bytes(splits, v.acc_row_floats, v.groups_per_cta));
      if (splits.splits > 1) {
        partials = std::max(partials, static_cast<std::size_t>(rows) * static_cast<std::size_t>(splits.splits));
      }
    }
    allow_shared_memory(kernel, shared, "cudaFuncSetAttribute (attention)");
    if (v.block_kernel != nullptr) {
      allow_shared_memory(reinterpret_cast<const void*>(v.block_kernel), shared, "cudaFuncSetAttribute (attention)");
    }
  }
  partials *= static_cast<std::size_t>(q_heads);
  const std::size_t tickets = static_cast<std::size_t>(max_rows) * kv_heads * static_cast<std::size_t>(head_chunks);
  plan.partial_out_offset = (tickets * sizeof(unsigned) + 255) / 256 * 256;
  plan.partial_ml_offset = plan.partial_out_offset + partials * dim * sizeof(float);
  plan.bytes = plan.partial_ml_offset + partials * 2 * sizeof(float);
  return plan;
}

void attention(const AttentionArgs& args, const AttentionPlan& plan, void* workspace, cudaStream_t stream) {
  const int slot = dtype_slot(args.layout.dtype);
  const Variant& v = variants()[static_cast<std::size_t>(plan.variant[slot])];
  const int rows = args.num_sequences * args.tokens;
  Params params{};
  params.a = args;
  params.plan = split_plan(plan, slot, rows);
  const RoutingArgs& routing = args.routing;
  params.max_length =
      routing.rows.positions != nullptr ? INT_MAX : static_cast<int>(std::min<std::int64_t>(plan.span, INT_MAX));
  params.page_shift = page_shift_of(args.layout.page_size);
  auto* base = static_cast<unsigned char*>(workspace);
  params.tickets = reinterpret_cast<unsigned*>(base);
  params.partial_out = reinterpret_cast<float*>(base + plan.partial_out_offset);
  params.partial_ml = reinterpret_cast<float*>(base + plan.partial_ml_offset);
  const SplitPlan& splits = params.plan;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(args.kv_heads * splits.head_chunks),
                  static_cast<unsigned>(splits.splits));
  const std::size_t shared = shared_bytes(splits, v.acc_row_floats, v.groups_per_cta);
  if (routing.rows.kv != nullptr && routing.rows.positions != nullptr && v.block_kernel != nullptr) {
    launch_kernel(v.block_kernel, grid, dim3(static_cast<unsigned>(v.threads)), shared, stream,
                  LaunchAttributes{}
                      .dependent(plan.dependent_launch)
                      .persisting(routing.rows.kv, routing.kv_bytes, routing.kv_l2_hit_ratio),
                  "attention_kernel (block)", params);
    return;
  }
  launch_kernel(v.kernel, grid, dim3(static_cast<unsigned>(v.threads)), shared, stream,
                LaunchAttributes{}.dependent(plan.dependent_launch), "attention_kernel", params);
}

}  // namespace cuda_kernels
}  // namespace clsa
