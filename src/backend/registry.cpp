// Which backends this build has: the one place that knows whether CUDA was built.
#include "backend/backend.hpp"
#include "common/check.hpp"
#include "cpu/backend.hpp"

#if CLSA_WITH_CUDA
#include "../cuda/backend.hpp"
#endif

namespace clsa {

bool built_with_cuda() {
#if CLSA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

namespace detail {

const ComputeBackend& compute_backend(Backend backend) {
  if (backend == Backend::cpu) return cpu_backend();
  if (backend == Backend::cuda) {
#if CLSA_WITH_CUDA
    return cuda_backend();
#else
    fail(ErrorCode::unsupported, "Backend::cuda in a build of libclsa without CUDA");
#endif
  }
  fail(ErrorCode::invalid_argument, "compute_backend: Backend::automatic must be resolved first (internal)");
}

const ComputeBackend& backend_of(Device device) {
  return compute_backend(device.is_cuda() ? Backend::cuda : Backend::cpu);
}

int cuda_devices() {
#if CLSA_WITH_CUDA
  return cuda_device_total();
#else
  return 0;
#endif
}

}  // namespace detail
}  // namespace clsa
