// The vocabulary of clsa/types.hpp: element sizes and the names of element types, devices,
// backends and error codes; Error; and the library's version.
#include <cstddef>
#include <string>

#include "clsa/types.hpp"
#include "clsa/version.hpp"

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
    case DType::e4m3:
      return 1;
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
    case DType::e4m3:
      return "e4m3";
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

}  // namespace clsa
