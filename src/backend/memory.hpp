// Allocation on the host or a CUDA device, and a growable buffer for workspaces.
#pragma once

#include <cstddef>

#include "clsa/types.hpp"

namespace clsa {
namespace detail {

/// Allocates `bytes` (256-byte aligned) on `device`; throws Error(cuda_error) when that fails,
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

/// A component's workspace: its own buffer, or memory the caller provided (set_workspace), which
/// never grows. A plan adopts it: the own buffer grows to the plan's size, caller memory must
/// hold it; either way it is zeroed then (the workspace invariant of cuda/kernels.hpp).
class Workspace {
 public:
  void set_device(Device device) { owned_.set_device(device); }
  Device device() const { return owned_.device(); }
  /// Caller memory (set_workspace): on device(), `bytes` long, 256-byte aligned.
  struct External {
    void* data;
    std::size_t bytes;
  };
  bool external() const { return external_; }
  /// `bytes` of zeroed workspace for a new plan: in `external` memory from now on when given
  /// (checked first: a refused one changes nothing), else the current memory. CUDA memory is
  /// zeroed on `stream` when on_stream, else synchronously (outside any capture).
  void* adopt(const char* function, std::size_t bytes, Stream stream, bool on_stream,
              const External* external = nullptr);
  void* data() const { return data_; }

 private:
  Buffer owned_;
  void* data_ = nullptr;
  std::size_t size_ = 0;
  bool external_ = false;
};

/// Makes a CUDA device current for the scope and restores the caller's device after (nothing for
/// the CPU): every entry point runs on its component's device whatever device is current.
class DeviceGuard {
 public:
  explicit DeviceGuard(Device device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  Device device_;
  int previous_ = -1;  // the caller's device, when it had to be switched
};

/// Hands out 256-byte aligned pieces of one block in order; with a null base it only counts, so
/// one function both sizes a workspace and carves it.
class Carver {
 public:
  explicit Carver(void* base = nullptr) : base_(static_cast<unsigned char*>(base)) {}
  template <class T>
  T* take(std::size_t count) {
    offset_ = (offset_ + 255) / 256 * 256;
    T* piece = base_ != nullptr ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    offset_ += count * sizeof(T);
    return piece;
  }
  std::size_t used() const { return offset_; }

 private:
  unsigned char* base_;
  std::size_t offset_ = 0;
};

}  // namespace detail
}  // namespace clsa
