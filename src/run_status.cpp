#include "run_status.hpp"

#if CLSA_WITH_CUDA
#include <utility>

#include "check.hpp"
#include "cuda_check.hpp"

namespace clsa {
namespace detail {

RunStatusReport::~RunStatusReport() {
  if (host_ != nullptr) (void)cudaFreeHost(host_);
}

RunStatusReport::RunStatusReport(RunStatusReport&& other) noexcept
    : host_(std::exchange(other.host_, nullptr)), device_(std::exchange(other.device_, nullptr)) {}

RunStatusReport& RunStatusReport::operator=(RunStatusReport&& other) noexcept {
  if (this != &other) {
    if (host_ != nullptr) (void)cudaFreeHost(host_);
    host_ = std::exchange(other.host_, nullptr);
    device_ = std::exchange(other.device_, nullptr);
  }
  return *this;
}

void RunStatusReport::allocate() {
  if (host_ != nullptr) return;
  void* memory = nullptr;
  cuda_check(cudaHostAlloc(&memory, sizeof(cuda_kernels::RunStatus), cudaHostAllocMapped | cudaHostAllocPortable),
             "cudaHostAlloc (run status)");
  host_ = static_cast<cuda_kernels::RunStatus*>(memory);
  *host_ = cuda_kernels::RunStatus{};
  void* device = nullptr;
  cuda_check(cudaHostGetDevicePointer(&device, memory, 0), "cudaHostGetDevicePointer (run status)");
  device_ = static_cast<cuda_kernels::RunStatus*>(device);
}

void RunStatusReport::check(const char* function, const char* consequence) {
  if (host_ == nullptr) return;
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

}  // namespace detail
}  // namespace clsa
#endif
