// Names of element types, devices, backends and errors; the version; the choice of backend.
#include <cstdint>
#include <cstring>
#include <new>
#include <string>

#include "backend/backend.hpp"
#include "clsa/tensor.hpp"
#include "clsa/types.hpp"
#include "clsa/version.hpp"
#include "common/check.hpp"

namespace clsa {

const char* version() {
  return CLSA_VERSION_STRING;  // generated from project(VERSION) (cmake/version.hpp.in)
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32:
    case DType::i32:
      return 4;
    case DType::f16:
    case DType::bf16:
      return 2;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return "f32";
    case DType::f16:
      return "f16";
    case DType::bf16:
      return "bf16";
    case DType::i32:
      return "i32";
  }
  return "?";
}

std::string device_name(Device device) {
  return device.is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(device.index);
}

const char* backend_name(Backend backend) {
  switch (backend) {
    case Backend::automatic:
      return "automatic";
    case Backend::cpu:
      return "cpu";
    case Backend::cuda:
      return "cuda";
  }
  return "?";
}

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::invalid_argument:
      return "invalid_argument";
    case ErrorCode::shape_mismatch:
      return "shape_mismatch";
    case ErrorCode::dtype_mismatch:
      return "dtype_mismatch";
    case ErrorCode::device_mismatch:
      return "device_mismatch";
    case ErrorCode::unknown_sequence:
      return "unknown_sequence";
    case ErrorCode::capacity_exceeded:
      return "capacity_exceeded";
    case ErrorCode::unsupported:
      return "unsupported";
    case ErrorCode::cuda_error:
      return "cuda_error";
  }
  return "?";
}

Error::Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}

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
