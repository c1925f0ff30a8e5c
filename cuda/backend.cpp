// The CUDA backend, host side: memory and streams on CUDA devices, the kernels' plans and
// launches (cuda/kernels.hpp), the run-status report and the staged page tables.
#include "backend.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "common/check.hpp"
#include "cuda_check.hpp"
#include "kernels.hpp"

namespace clsa {
namespace detail {

namespace {

/// A component's RunStatus in host-mapped pinned memory: kernels write it through device_view(),
/// the host reads it without a copy or a synchronisation (it sees a report once the kernel that
/// made it has finished).
class MappedStatusReport final : public StatusReport {
 public:
  MappedStatusReport() {
    void* memory = nullptr;
    cuda_check(cudaHostAlloc(&memory, sizeof(cuda_kernels::RunStatus), cudaHostAllocMapped | cudaHostAllocPortable),
               "cudaHostAlloc (run status)");
    host_ = static_cast<cuda_kernels::RunStatus*>(memory);
    *host_ = cuda_kernels::RunStatus{};
    void* device = nullptr;
    cuda_check(cudaHostGetDevicePointer(&device, memory, 0), "cudaHostGetDevicePointer (run status)");
    device_ = device;
  }
  ~MappedStatusReport() override { (void)cudaFreeHost(host_); }
  MappedStatusReport(const MappedStatusReport&) = delete;
  MappedStatusReport& operator=(const MappedStatusReport&) = delete;

  void* device_view() const override { return device_; }
  void check(const char* function, const char* consequence) override {
    volatile cuda_kernels::RunStatus* report = host_;
    if (report->code == cuda_kernels::RunStatus::fine) return;
    const int sequence = report->sequence;
    const int length = report->length;
    const int limit = report->limit;
    report->code = cuda_kernels::RunStatus::fine;
    fail(ErrorCode::capacity_exceeded,
         concat(function, ": a kernel launched earlier (a CUDA-graph replay, say) met batch sequence ", sequence,
                " holding ", length, " tokens, beyond the planned max_length ", limit, "; ", consequence,
                ". Plan larger bounds (reserve) for such contexts."));
  }

 private:
  cuda_kernels::RunStatus* host_ = nullptr;
  void* device_ = nullptr;
};

/// Device tables filled from two pinned staging copies in turn: a refill waits at most for the
/// copy two refills back, and the device tables never move.
class StagedTables final : public TableUpload {
 public:
  explicit StagedTables(std::size_t entries) {
    const std::size_t bytes = entries * sizeof(std::int32_t);
    try {
      for (int i = 0; i < 2; ++i) {
        void* memory = nullptr;
        cuda_check(cudaMallocHost(&memory, bytes), "cudaMallocHost (batch tables)");
        staging_[i] = static_cast<std::int32_t*>(memory);
        std::memset(memory, 0, bytes);
        cuda_check(cudaEventCreateWithFlags(&copied_[i], cudaEventDisableTiming), "cudaEventCreate (batch tables)");
      }
      cuda_check(cudaMalloc(&tables_, bytes), "cudaMalloc (batch tables)");
      // Zeroed before any stream of the caller's can read them.
      cuda_check(cudaMemset(tables_, 0, bytes), "cudaMemset (batch tables)");
      cuda_check(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize (batch tables)");
    } catch (...) {
      release();
      throw;
    }
  }
  ~StagedTables() override { release(); }
  StagedTables(const StagedTables&) = delete;
  StagedTables& operator=(const StagedTables&) = delete;

  std::int32_t* next() override {
    cuda_check(cudaEventSynchronize(copied_[next_]), "cudaEventSynchronize (batch tables)");
    return staging_[next_];
  }
  const std::int32_t* publish(std::size_t used, Stream stream) override {
    cuda_check(
        cudaMemcpyAsync(tables_, staging_[next_], used * sizeof(std::int32_t), cudaMemcpyHostToDevice, stream.cuda()),
        "cudaMemcpyAsync (batch tables)");
    cuda_check(cudaEventRecord(copied_[next_], stream.cuda()), "cudaEventRecord (batch tables)");
    next_ = 1 - next_;
    return static_cast<const std::int32_t*>(tables_);
  }

 private:
  void release() noexcept {
    for (int i = 0; i < 2; ++i) {
      if (copied_[i] != nullptr) {
        (void)cudaEventSynchronize(copied_[i]);  // a copy out of the staging may be in flight
        (void)cudaEventDestroy(copied_[i]);
      }
      if (staging_[i] != nullptr) (void)cudaFreeHost(staging_[i]);
      copied_[i] = nullptr;
      staging_[i] = nullptr;
    }
    if (tables_ != nullptr) (void)cudaFree(tables_);
    tables_ = nullptr;
  }

  std::int32_t* staging_[2] = {nullptr, nullptr};
  cudaEvent_t copied_[2] = {nullptr, nullptr};  // the last copy out of each staging buffer
  int next_ = 0;
  void* tables_ = nullptr;
};

struct IndexerPlanCuda final : Plan {
  cuda_kernels::IndexerPlan kernels;
};

struct AttentionPlanCuda final : Plan {
  cuda_kernels::AttentionPlan kernels;
};

/// Makes `device` current; returns the caller's device when it had to switch, else -1.
int switch_device(Device device) {
  int current = 0;
  cuda_check(cudaGetDevice(&current), "cudaGetDevice");
  if (current == device.index) return -1;
  cuda_check(cudaSetDevice(device.index), "cudaSetDevice");
  return current;
}

/// switch_device for a scope (exceptions included): the caller's device is restored after.
class ScopedDevice {
 public:
  explicit ScopedDevice(Device device) : previous_(switch_device(device)) {}
  ~ScopedDevice() {
    if (previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

 private:
  int previous_;
};

/// A tensor as the kernels' argument structs hold it: its data, and its strides (elements) from
/// dimension 0 on, one for each field given.
template <class Pointer, class... Strides>
void set_strided(const TensorView& view, Pointer& data, Strides&... strides) {
  data = static_cast<Pointer>(view.data());
  int dim = 0;
  ((strides = view.stride(dim++)), ...);
}

/// What the kernels' argument structs (IndexerArgs, AttentionArgs) take alike of a call: the batch's
/// page tables, its T query tokens, their queries q [B, T, H, D] and the component's run-status
/// report.
template <class Args>
void set_call(Args& args, const BatchTables& batch, int tokens, const TensorView& q, StatusReport* status) {
  args.layout = batch.layout;
  args.last_page_lengths = batch.last_page_lengths;
  args.page_indptr = batch.page_indptr;
  args.page_indices = batch.page_indices;
  args.num_sequences = batch.num_sequences;
  args.tokens = tokens;
  set_strided(q, args.q, args.q_stride_b, args.q_stride_t, args.q_stride_h);
  args.status = static_cast<cuda_kernels::RunStatus*>(status->device_view());
}

/// A routing index as the kernels' argument structs (IndexerArgs, AttentionArgs) hold it: its rows,
/// and its routed K/V block's size and the hit ratio of its persisting-L2 window (zero without kv).
cuda_kernels::RoutingArgs routing_args(const RoutingIndex& index) {
  cuda_kernels::RoutingArgs routing{};
  routing.rows = RoutingRows::of(index);
  if (index.kv.defined()) {
    routing.kv_bytes = static_cast<std::size_t>(index.kv.numel()) * dtype_size(index.kv.dtype());
    routing.kv_l2_hit_ratio = cuda_kernels::routed_kv_hit_ratio(routing.kv_bytes);
  }
  return routing;
}

class CudaBackend final : public ComputeBackend {
 public:
  Backend kind() const override { return Backend::cuda; }

  Device current_device() const override {
    int index = 0;
    cuda_check(cudaGetDevice(&index), "cudaGetDevice");
    return Device::cuda(index);
  }
  int make_current(Device device) const override { return switch_device(device); }
  void restore_current(int previous) const noexcept override {
    if (previous >= 0) (void)cudaSetDevice(previous);
  }
  void* allocate(Device device, std::size_t bytes) const override {
    void* pointer = nullptr;
    cudaError_t status = cudaSuccess;
    {
      const ScopedDevice scope(device);
      status = cudaMalloc(&pointer, bytes);
    }
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      fail(ErrorCode::cuda_error,
           concat("cudaMalloc of ", bytes, " bytes on ", device_name(device), " failed: ", cudaGetErrorName(status),
                  " (during CUDA-graph capture, reserve() every component before capturing)"));
    }
    return pointer;
  }
  void deallocate(Device device, void* pointer) const noexcept override {
    try {
      const ScopedDevice scope(device);
      (void)cudaFree(pointer);
    } catch (const Error&) {
      // No device to switch to (a dying process): nothing can be freed there anyway.
    }
  }
  void zero(Device device, void* data, std::size_t bytes, Stream stream, bool on_stream) const override {
    const ScopedDevice scope(device);
    if (on_stream) {
      cuda_check(cudaMemsetAsync(data, 0, bytes, stream.cuda()), "cudaMemsetAsync (workspace)");
    } else {
      // Set-up time (reserve, set_workspace): done before any stream of the caller uses it.
      cuda_check(cudaMemsetAsync(data, 0, bytes, nullptr), "cudaMemsetAsync (workspace)");
      cuda_check(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize (workspace)");
    }
  }
  void copy(void* dst, const void* src, std::size_t bytes) const override {
    cuda_check(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault), "cudaMemcpy");
  }
  void synchronize(Stream stream) const override {
    cuda_check(cudaStreamSynchronize(stream.cuda()), "cudaStreamSynchronize");
  }
  bool capturing(Stream stream) const override {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    const cudaError_t status = cudaStreamIsCapturing(stream.cuda(), &capture);
    // E.g. the legacy stream while another stream captures: not sticky, so keep it from being
    // reported again by the next launch's check.
    if (status != cudaSuccess) (void)cudaGetLastError();
    cuda_check(status, "cudaStreamIsCapturing");
    return capture == cudaStreamCaptureStatusActive;
  }
  std::unique_ptr<TableUpload> make_table_upload(Device device, std::size_t entries) const override {
    const ScopedDevice scope(device);
    return std::make_unique<StagedTables>(entries);
  }
  std::unique_ptr<StatusReport> make_status_report() const override { return std::make_unique<MappedStatusReport>(); }

  std::string cache_unsupported(DType kv_dtype, DType index_dtype) const override {
    if (kv_dtype == DType::e4m3 || index_dtype == DType::e4m3) {
      return concat(kv_dtype == DType::e4m3 ? "e4m3 K/V" : "e4m3 indexer keys",
                    ": the CUDA backend has no fp8 kernels yet (quantizing append, fp8 scores and attention; issue "
                    "18); Backend::cpu runs fp8 caches");
    }
    if (kv_dtype != index_dtype) {
      return concat("indexer keys of ", dtype_name(index_dtype), " beside K/V of ", dtype_name(kv_dtype),
                    ": the CUDA kernels read both in one dtype; Backend::cpu runs mixed dtypes");
    }
    return {};
  }

  void append(const AppendCall& call, Stream stream) const override {
    using cuda_kernels::AppendArgs;
    // append_tokens copies every row in the pool's one dtype (cache_unsupported refuses the rest).
    const std::string unsupported = cache_unsupported(call.layout.dtype, call.layout.index_key_dtype());
    if (!unsupported.empty()) fail(ErrorCode::unsupported, concat("SharedKVCache::append: ", unsupported));
    const std::int64_t tokens = call.k.size(0);
    const std::size_t element = dtype_size(call.layout.dtype);
    std::int64_t done = 0;
    while (done < tokens) {
      // One launch per run of up to kMaxPages pages (page indices travel as kernel parameters).
      const std::int64_t position = call.first_position + done;
      const std::int64_t first_page = position >> call.page_shift;
      const std::int64_t end_of_run = (first_page + AppendArgs::kMaxPages) << call.page_shift;
      const std::int64_t count = std::min(tokens - done, end_of_run - position);
      AppendArgs args{};
      args.layout = call.layout;
      args.k = static_cast<const char*>(call.k.data()) + done * call.k.stride(0) * element;
      args.k_token_stride = call.k.stride(0);
      args.k_head_stride = call.k.stride(1);
      args.v = static_cast<const char*>(call.v.data()) + done * call.v.stride(0) * element;
      args.v_token_stride = call.v.stride(0);
      args.v_head_stride = call.v.stride(1);
      args.index_keys = static_cast<const char*>(call.index_keys.data()) + done * call.index_keys.stride(0) * element;
      args.index_token_stride = call.index_keys.stride(0);
      args.first_position = position;
      args.tokens = static_cast<int>(count);
      args.first_page = static_cast<int>(first_page);
      const std::int64_t last_page = (position + count - 1) >> call.page_shift;
      for (std::int64_t p = first_page; p <= last_page; ++p) args.pages[p - first_page] = call.pages[p];
      cuda_kernels::append_tokens(args, stream.cuda());
      done += count;
    }
  }

  std::string indexer_unsupported(const IndexerConfig& config, DType dtype) const override {
    if (dtype == DType::e4m3) {
      return "e4m3 indexer keys: the CUDA indexer has no fp8 score kernel yet (issue 18); Backend::cpu scores them";
    }
    if (cuda_kernels::indexer_supports(dtype, config.index_dim)) return {};
    return concat("index_dim ", config.index_dim, " with ", dtype_name(dtype),
                  " keys; the CUDA path supports 64 and 128 (f16/bf16) or multiples of 4 (f32)");
  }
  std::unique_ptr<Plan> plan_indexer(const IndexerConfig& config, const Bounds& bounds) const override {
    auto plan = std::make_unique<IndexerPlanCuda>();
    plan->kernels = cuda_kernels::plan_indexer(bounds.sequences, bounds.tokens, bounds.span, config.num_heads,
                                               config.index_dim, config.enable_pdl);
    plan->workspace_bytes = plan->kernels.bytes;
    return plan;
  }
  void select(const IndexerConfig& c, const SelectCall& call, const Plan& plan, void* scratch, StatusReport* status,
              Stream stream) const override {
    const cuda_kernels::IndexerPlan& kernels = static_cast<const IndexerPlanCuda&>(plan).kernels;
    cuda_kernels::IndexerArgs args{};
    set_call(args, call.batch, call.tokens, call.q_idx, status);
    args.max_length = kernels.max_length;
    args.weights_dtype = call.head_weights.dtype();
    set_strided(call.head_weights, args.weights, args.w_stride_b, args.w_stride_t);
    args.heads = c.num_heads;
    args.dim = c.index_dim;
    args.sinks = c.sink_tokens;
    args.window = c.local_window;
    args.scale = c.scale;
    args.routing = routing_args(call.out);
    cuda_kernels::index_select(args, kernels, scratch, stream.cuda());
  }
  std::string routed_kv_unsupported(DType dtype, int head_dim) const override {
    if (dtype == DType::e4m3) {
      return "routed K/V rows of e4m3: the CUDA backend has no fp8 attention to read them yet (issue 18)";
    }
    if (cuda_kernels::routed_kv_supported(dtype, head_dim)) return {};
    return concat("routed K/V rows of head_dim ", head_dim, " x ", dtype_name(dtype),
                  " (the CUDA gather copies rows of 128 to 1024 bytes in 16-byte vectors)");
  }
  std::size_t keep_routed_kv_in_l2(Device device, std::size_t bytes) const override {
    const ScopedDevice scope(device);
    return cuda_kernels::keep_routed_kv_in_l2(bytes);
  }

  std::string attention_unsupported(const AttentionConfig& config) const override {
    if (cuda_kernels::attention_supports(config.head_dim)) return {};
    return concat("config.head_dim = ", config.head_dim, "; the CUDA path supports 64, 128 and 256");
  }
  std::string attention_kv_unsupported(const AttentionConfig& /*config*/, DType kv_dtype) const override {
    if (kv_dtype == DType::e4m3) {
      return "e4m3 K/V: the CUDA attention kernels have no fp8 variant yet (issue 18); Backend::cpu dequantizes them";
    }
    return {};
  }
  std::unique_ptr<Plan> plan_attention(const AttentionConfig& config, const Bounds& bounds) const override {
    auto plan = std::make_unique<AttentionPlanCuda>();
    plan->kernels = cuda_kernels::plan_attention(bounds.sequences * bounds.tokens, bounds.span, config.num_q_heads,
                                                 config.num_kv_heads, config.head_dim, config.enable_pdl);
    plan->workspace_bytes = plan->kernels.bytes;
    return plan;
  }
  void attend(const AttentionConfig& c, const AttendCall& call, const Plan& plan, void* scratch, StatusReport* status,
              Stream stream) const override {
    cuda_kernels::AttentionArgs args{};
    set_call(args, call.batch, call.tokens, call.q, status);
    set_strided(call.out, args.out, args.out_stride_b, args.out_stride_t, args.out_stride_h);
    if (call.lse.defined()) set_strided(call.lse, args.lse, args.lse_stride_b, args.lse_stride_t);
    args.q_heads = c.num_q_heads;
    args.kv_heads = c.num_kv_heads;
    args.dim = c.head_dim;
    args.scale = call.scale;
    if (call.routing != nullptr) args.routing = routing_args(*call.routing);
    cuda_kernels::attention(args, static_cast<const AttentionPlanCuda&>(plan).kernels, scratch, stream.cuda());
  }
};

}  // namespace

const ComputeBackend& cuda_backend() {
  static const CudaBackend backend;
  return backend;
}

int cuda_device_total() {
  static const int count = [] {
    int n = 0;
    // No driver or no device is not an error here: the answer is simply 0.
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return n;
  }();
  return count;
}

}  // namespace detail
}  // namespace clsa
