#include "cuda_check.hpp"

#include "common/check.hpp"

namespace clsa {
namespace detail {

void cuda_check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  fail(ErrorCode::cuda_error,
       concat(what, " failed: ", cudaGetErrorName(status), " (", cudaGetErrorString(status), ")"));
}

void cuda_check_launch(const char* kernel) {
  cuda_check(cudaGetLastError(), kernel);
}

}  // namespace detail
}  // namespace clsa
