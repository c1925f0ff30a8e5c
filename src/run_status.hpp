// Where a CUDA component's kernels report what the host could not check before launching them.
#pragma once

#if CLSA_WITH_CUDA
#include "../cuda/kernels.hpp"

namespace clsa {
namespace detail {

/// A component's RunStatus in host-mapped pinned memory: kernels write it through device_view(),
/// the host reads it without a copy or a synchronisation (it sees a report once the kernel that
/// made it has finished).
class RunStatusReport {
 public:
  RunStatusReport() = default;
  ~RunStatusReport();
  RunStatusReport(RunStatusReport&& other) noexcept;
  RunStatusReport& operator=(RunStatusReport&& other) noexcept;
  RunStatusReport(const RunStatusReport&) = delete;
  RunStatusReport& operator=(const RunStatusReport&) = delete;

  /// Allocates the report (once); on the current device's context.
  void allocate();
  cuda_kernels::RunStatus* device_view() const { return device_; }
  /// Throws Error(capacity_exceeded) describing the first report since the last check (naming
  /// `function`; `consequence` says what the kernels did instead), and clears it.
  void check(const char* function, const char* consequence);

 private:
  cuda_kernels::RunStatus* host_ = nullptr;
  cuda_kernels::RunStatus* device_ = nullptr;
};

}  // namespace detail
}  // namespace clsa
#endif
