// Allocation on the host or a CUDA device, and a growable buffer for workspaces.
#pragma once

#include <cstddef>

#include "clsa/types.hpp"

namespace clsa {
namespace detail {

/// Allocates `bytes` (64-byte aligned) on `device`; throws Error(cuda_error) when that fails,
/// e.g. during CUDA-graph capture (workspaces must be reserved before capture).
void* allocate(Device device, std::size_t bytes);
void deallocate(Device device, void* pointer) noexcept;

/// A buffer that only grows: ensure(n) reallocates (dropping the contents) when n > capacity.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(Device device) : device_(device) {}
  Buffer(Buffer&& other) noexcept;
  Buffer& operator=(Buffer&& other) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer();

  void set_device(Device device);
  /// Returns the data pointer, valid for at least `bytes`; `reallocated` (optional) tells whether
  /// this call replaced the memory (whose contents are then undefined).
  void* ensure(std::size_t bytes, bool* reallocated = nullptr);
  template <class T>
  T* ensure_as(std::size_t count) {
    return static_cast<T*>(ensure(count * sizeof(T)));
  }
  void* data() const { return data_; }
  std::size_t capacity() const { return capacity_; }
  Device device() const { return device_; }

 private:
  Device device_{};
  void* data_ = nullptr;
  std::size_t capacity_ = 0;
};

}  // namespace detail
}  // namespace clsa
