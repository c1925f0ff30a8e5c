// Non-owning tensor views (what every API call takes) and a small owning buffer for programs
// that have no tensor library of their own.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>

#include "clsa/types.hpp"

namespace clsa {

/// Non-owning view of a strided tensor: data pointer, element type, device, up to kMaxRank
/// extents and strides (strides count elements, not bytes). The innermost dimension of every
/// tensor libclsa reads must have stride 1; outer strides are free (slices of a fused QKV output
/// work as they are).
class TensorView {
 public:
  static constexpr int kMaxRank = 6;
  using Extents = std::array<std::int64_t, kMaxRank>;

  TensorView() = default;
  /// Contiguous (row-major) view.
  TensorView(void* data, DType dtype, std::initializer_list<std::int64_t> shape, Device device = Device::cpu());
  /// Strided view; `strides` has as many entries as `shape`.
  TensorView(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
             std::initializer_list<std::int64_t> strides, Device device = Device::cpu());
  /// Strided view from arrays of `rank` entries.
  TensorView(void* data, DType dtype, int rank, const std::int64_t* shape, const std::int64_t* strides, Device device);

  bool defined() const { return data_ != nullptr; }
  void* data() const { return data_; }
  template <class T>
  T* data_as() const {
    return static_cast<T*>(data_);
  }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  int rank() const { return rank_; }
  std::int64_t size(int dim) const { return shape_[static_cast<std::size_t>(dim)]; }
  std::int64_t stride(int dim) const { return strides_[static_cast<std::size_t>(dim)]; }
  std::int64_t numel() const;
  bool is_contiguous() const;
  /// "[2,1,32,128] bf16 cuda:0" (strides appended when not contiguous).
  std::string describe() const;

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::f32;
  Device device_{};
  int rank_ = 0;
  Extents shape_{};
  Extents strides_{};
};

/// Owning, contiguous buffer on the host or a CUDA device. For examples, tests and benchmarks;
/// engines keep their own tensors and hand libclsa TensorViews.
class Tensor {
 public:
  Tensor() = default;
  /// Uninitialised contiguous tensor. Throws Error on a bad shape or a failed allocation.
  static Tensor empty(std::initializer_list<std::int64_t> shape, DType dtype, Device device = Device::cpu());
  static Tensor empty(int rank, const std::int64_t* shape, DType dtype, Device device);
  /// Same shape and dtype, on `device`, with the contents copied (host<->device as needed).
  Tensor to(Device device) const;

  TensorView view() const { return view_; }
  operator TensorView() const { return view_; }  // NOLINT(google-explicit-constructor)
  template <class T>
  T* data_as() const {
    return view_.data_as<T>();
  }
  std::int64_t numel() const { return view_.numel(); }
  std::size_t bytes() const { return static_cast<std::size_t>(numel()) * dtype_size(view_.dtype()); }
  Device device() const { return view_.device(); }
  /// Copies `bytes()` from `src` (same dtype and element count; any devices; contiguous).
  void copy_from(const TensorView& src);

 private:
  std::shared_ptr<void> storage_;
  TensorView view_;
};

/// Copies `bytes` between any two devices (host, CUDA) and waits for it to finish.
void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, std::size_t bytes);

}  // namespace clsa
