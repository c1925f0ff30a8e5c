// Error checking of CUDA runtime calls.
#pragma once

#include <cuda_runtime_api.h>

namespace clsa {
namespace detail {

/// Throws Error(cuda_error) naming `what` and the CUDA error when `status` is not cudaSuccess.
void cuda_check(cudaError_t status, const char* what);

/// cudaGetLastError after a launch, reported like cuda_check.
void cuda_check_launch(const char* kernel);

}  // namespace detail
}  // namespace clsa
