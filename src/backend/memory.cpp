// Buffers, workspaces and the device guard, on whichever backend owns the device.
#include "backend/memory.hpp"

#include <cstdint>

#include "backend/backend.hpp"
#include "common/check.hpp"

namespace clsa {
namespace detail {

void* allocate(Device device, std::size_t bytes) {
  return backend_of(device).allocate(device, bytes == 0 ? 64 : bytes);
}

void deallocate(Device device, void* pointer) noexcept {
  if (pointer == nullptr) return;
  if (device.is_cuda() && cuda_devices() == 0) return;  // no backend left to free it (a dying process)
  backend_of(device).deallocate(device, pointer);
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
  // The workspace invariant (cuda/kernels.hpp): a plan starts on zeroed memory. Set-up calls
  // (reserve, set_workspace) zero it before returning; automatic plans on the call's stream.
  backend_of(device()).zero(device(), data_, bytes, stream, on_stream);
  return data_;
}

DeviceGuard::DeviceGuard(Device device) : device_(device) {
  if (device.is_cuda()) previous_ = backend_of(device).make_current(device);
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) backend_of(device_).restore_current(previous_);
}

}  // namespace detail
}  // namespace clsa
