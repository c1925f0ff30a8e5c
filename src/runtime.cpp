// The choice of backend at run time: the CUDA devices present, resolving Backend::automatic, the
// device a backend computes on, and waiting for a stream.
#include "backend/backend.hpp"
#include "clsa/types.hpp"
#include "common/check.hpp"

namespace clsa {

int cuda_device_count() {
  return detail::cuda_devices();
}

Backend resolve_backend(Backend requested) {
  switch (requested) {
    case Backend::cpu:
      return Backend::cpu;
    case Backend::automatic:
      return cuda_device_count() > 0 ? Backend::cuda : Backend::cpu;
    case Backend::cuda:
      if (!built_with_cuda()) {
        detail::fail(ErrorCode::unsupported,
                     "Backend::cuda requested, but this build of libclsa has no CUDA support "
                     "(configure with CLSA_WITH_CUDA=ON and a CUDA toolkit)");
      }
      if (cuda_device_count() == 0) {
        detail::fail(ErrorCode::unsupported, "Backend::cuda requested, but no CUDA device is present (or no driver)");
      }
      return Backend::cuda;
  }
  detail::fail(ErrorCode::invalid_argument, "unknown Backend value");
}

Device backend_device(Backend resolved) {
  if (resolved == Backend::automatic) return backend_device(resolve_backend(resolved));
  return detail::compute_backend(resolved).current_device();
}

void synchronize(Stream stream) {
  if (cuda_device_count() > 0) detail::compute_backend(Backend::cuda).synchronize(stream);
}

}  // namespace clsa
