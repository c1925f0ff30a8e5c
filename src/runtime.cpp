// Element types, devices, backend selection, errors, allocation and copies.
#include <cstdint>
#include <cstring>
#include <new>
#include <string>

#include "check.hpp"
#include "clsa/tensor.hpp"
#include "clsa/types.hpp"
#include "clsa/version.hpp"
#include "cuda_check.hpp"
#include "memory.hpp"

namespace clsa {

const char* version() {
  return "0.1.0";
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

bool built_with_cuda() {
  return CLSA_WITH_CUDA != 0;
}

int cuda_device_count() {
#if CLSA_WITH_CUDA
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
#else
  return 0;
#endif
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
#if CLSA_WITH_CUDA
  if (resolved == Backend::cuda) {
    int index = 0;
    detail::cuda_check(cudaGetDevice(&index), "cudaGetDevice");
    return Device::cuda(index);
  }
#endif
  if (resolved == Backend::automatic) return backend_device(resolve_backend(resolved));
  return Device::cpu();
}

void synchronize(Stream stream) {
#if CLSA_WITH_CUDA
  if (cuda_device_count() > 0) detail::cuda_check(cudaStreamSynchronize(stream.cuda()), "cudaStreamSynchronize");
#endif
  (void)stream;
}

namespace detail {

#if CLSA_WITH_CUDA
void cuda_check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  fail(ErrorCode::cuda_error,
       concat(what, " failed: ", cudaGetErrorName(status), " (", cudaGetErrorString(status), ")"));
}

void cuda_check_launch(const char* kernel) {
  cuda_check(cudaGetLastError(), kernel);
}
#endif

void* allocate(Device device, std::size_t bytes) {
  if (bytes == 0) bytes = 64;
  if (device.is_cpu()) {
    try {
      return ::operator new(bytes, std::align_val_t(256));
    } catch (const std::bad_alloc&) {
      fail(ErrorCode::capacity_exceeded, concat("host allocation of ", bytes, " bytes failed"));
    }
  }
#if CLSA_WITH_CUDA
  const DeviceGuard guard(device);
  void* pointer = nullptr;
  const cudaError_t status = cudaMalloc(&pointer, bytes);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    fail(ErrorCode::cuda_error,
         concat("cudaMalloc of ", bytes, " bytes on ", device_name(device), " failed: ", cudaGetErrorName(status),
                " (during CUDA-graph capture, reserve() every component before capturing)"));
  }
  return pointer;
#else
  fail(ErrorCode::unsupported, "allocation on " + device_name(device) + " in a build without CUDA");
#endif
}

void deallocate(Device device, void* pointer) noexcept {
  if (pointer == nullptr) return;
  if (device.is_cpu()) {
    ::operator delete(pointer, std::align_val_t(256));
    return;
  }
#if CLSA_WITH_CUDA
  try {
    const DeviceGuard guard(device);
    (void)cudaFree(pointer);
  } catch (const Error&) {
    // No device to switch to (a dying process): nothing can be freed there anyway.
  }
#endif
}

Buffer::Buffer(Buffer&& other) noexcept : device_(other.device_), data_(other.data_), capacity_(other.capacity_) {
  other.data_ = nullptr;
  other.capacity_ = 0;
}

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    deallocate(device_, data_);
    device_ = other.device_;
    data_ = other.data_;
    capacity_ = other.capacity_;
    other.data_ = nullptr;
    other.capacity_ = 0;
  }
  return *this;
}

Buffer::~Buffer() {
  deallocate(device_, data_);
}

void Buffer::set_device(Device device) {
  if (device == device_) return;
  deallocate(device_, data_);
  data_ = nullptr;
  capacity_ = 0;
  device_ = device;
}

void* Buffer::ensure(std::size_t bytes, bool* reallocated) {
  if (reallocated != nullptr) *reallocated = false;
  if (bytes <= capacity_ && data_ != nullptr) return data_;
  if (reallocated != nullptr) *reallocated = true;
  void* fresh = allocate(device_, bytes);
  deallocate(device_, data_);
  data_ = fresh;
  capacity_ = bytes;
  return data_;
}

void* Workspace::adopt(const char* function, std::size_t bytes, Stream stream, bool on_stream,
                       const External* external) {
  if (external != nullptr) {
    if (external->data == nullptr || external->bytes == 0) {
      fail(ErrorCode::invalid_argument,
           concat(function, ": workspace is empty (data ", external->data, ", ", external->bytes, " bytes)"));
    }
    if (reinterpret_cast<std::uintptr_t>(external->data) % 256 != 0) {
      fail(ErrorCode::invalid_argument, concat(function, ": workspace must be 256-byte aligned"));
    }
  }
  const std::size_t available = external != nullptr ? external->bytes : size_;
  if ((external != nullptr || external_) && bytes > available) {
    fail(ErrorCode::capacity_exceeded,
         concat(function, ": the plan needs ", bytes, " bytes of workspace; the one provided with set_workspace holds ",
                available, " (size it with workspace_bytes() for the same bounds)"));
  }
  if (external != nullptr) {
    data_ = external->data;
    size_ = external->bytes;
    external_ = true;
  } else if (!external_) {
    data_ = owned_.ensure(bytes);
    size_ = owned_.capacity();
  }
  if (device().is_cpu()) {
    std::memset(data_, 0, bytes);
  } else {
#if CLSA_WITH_CUDA
    if (on_stream) {
      cuda_check(cudaMemsetAsync(data_, 0, bytes, stream.cuda()), "cudaMemsetAsync (workspace)");
    } else {
      // Set-up time (reserve, set_workspace): done before any stream of the caller uses it.
      cuda_check(cudaMemsetAsync(data_, 0, bytes, nullptr), "cudaMemsetAsync (workspace)");
      cuda_check(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize (workspace)");
    }
#endif
  }
  (void)stream;
  (void)on_stream;
  return data_;
}

DeviceGuard::DeviceGuard(Device device) {
#if CLSA_WITH_CUDA
  if (!device.is_cuda()) return;
  int current = 0;
  cuda_check(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device.index) {
    cuda_check(cudaSetDevice(device.index), "cudaSetDevice");
    previous_ = current;
  }
#else
  (void)device;
#endif
}

DeviceGuard::~DeviceGuard() {
#if CLSA_WITH_CUDA
  if (previous_ >= 0) (void)cudaSetDevice(previous_);
#endif
}

}  // namespace detail
}  // namespace clsa
