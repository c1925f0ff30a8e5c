#include "clsa/tensor.hpp"

#include <algorithm>
#include <cstring>

#include "backend/backend.hpp"
#include "backend/memory.hpp"
#include "common/check.hpp"

namespace clsa {

namespace {

void fill_contiguous_strides(int rank, const std::int64_t* shape, std::int64_t* strides) {
  std::int64_t stride = 1;
  for (int d = rank - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= shape[d];
  }
}

void check_rank(std::size_t rank) {
  if (rank > static_cast<std::size_t>(TensorView::kMaxRank)) {
    detail::fail(ErrorCode::shape_mismatch,
                 detail::concat("TensorView: rank ", rank, " exceeds the maximum of ", TensorView::kMaxRank));
  }
}

}  // namespace

TensorView::TensorView(void* data, DType dtype, std::initializer_list<std::int64_t> shape, Device device)
    : data_(data), dtype_(dtype), device_(device), rank_(static_cast<int>(shape.size())) {
  check_rank(shape.size());
  std::copy(shape.begin(), shape.end(), shape_.begin());
  fill_contiguous_strides(rank_, shape_.data(), strides_.data());
}

TensorView::TensorView(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
                       std::initializer_list<std::int64_t> strides, Device device)
    : data_(data), dtype_(dtype), device_(device), rank_(static_cast<int>(shape.size())) {
  check_rank(shape.size());
  if (strides.size() != shape.size()) {
    detail::fail(ErrorCode::shape_mismatch,
                 detail::concat("TensorView: ", shape.size(), " extents but ", strides.size(), " strides"));
  }
  std::copy(shape.begin(), shape.end(), shape_.begin());
  std::copy(strides.begin(), strides.end(), strides_.begin());
}

TensorView::TensorView(void* data, DType dtype, int rank, const std::int64_t* shape, const std::int64_t* strides,
                       Device device)
    : data_(data), dtype_(dtype), device_(device), rank_(rank) {
  if (rank < 0) detail::fail(ErrorCode::shape_mismatch, "TensorView: negative rank");
  check_rank(static_cast<std::size_t>(rank));
  std::copy(shape, shape + rank, shape_.begin());
  if (strides != nullptr) {
    std::copy(strides, strides + rank, strides_.begin());
  } else {
    fill_contiguous_strides(rank_, shape_.data(), strides_.data());
  }
}

std::int64_t TensorView::numel() const {
  std::int64_t count = 1;
  for (int d = 0; d < rank_; ++d) count *= shape_[static_cast<std::size_t>(d)];
  return count;
}

bool TensorView::is_contiguous() const {
  std::int64_t expected = 1;
  for (int d = rank_ - 1; d >= 0; --d) {
    const auto i = static_cast<std::size_t>(d);
    if (shape_[i] != 1 && strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

std::string TensorView::describe() const {
  std::string text = "[";
  for (int d = 0; d < rank_; ++d) text += (d ? "," : "") + std::to_string(size(d));
  text += "]";
  if (!is_contiguous()) {
    text += " strides [";
    for (int d = 0; d < rank_; ++d) text += (d ? "," : "") + std::to_string(stride(d));
    text += "]";
  }
  return text + " " + dtype_name(dtype_) + " " + device_name(device_);
}

Tensor Tensor::empty(std::initializer_list<std::int64_t> shape, DType dtype, Device device) {
  check_rank(shape.size());
  return empty(static_cast<int>(shape.size()), shape.begin(), dtype, device);
}

Tensor Tensor::empty(int rank, const std::int64_t* shape, DType dtype, Device device) {
  std::int64_t count = 1;
  for (int d = 0; d < rank; ++d) {
    if (shape[d] < 0) detail::fail(ErrorCode::shape_mismatch, "Tensor::empty: negative extent");
    count *= shape[d];
  }
  Tensor tensor;
  void* data = detail::allocate(device, static_cast<std::size_t>(count) * dtype_size(dtype));
  tensor.storage_ = std::shared_ptr<void>(data, [device](void* p) { detail::deallocate(device, p); });
  tensor.view_ = TensorView(data, dtype, rank, shape, nullptr, device);
  return tensor;
}

Tensor Tensor::to(Device device) const {
  std::int64_t shape[TensorView::kMaxRank];
  for (int d = 0; d < view_.rank(); ++d) shape[d] = view_.size(d);
  Tensor copy = empty(view_.rank(), shape, view_.dtype(), device);
  copy.copy_from(view_);
  return copy;
}

void Tensor::copy_from(const TensorView& src) {
  if (src.numel() != numel() || src.dtype() != view_.dtype() || !src.is_contiguous()) {
    detail::fail(ErrorCode::shape_mismatch, "Tensor::copy_from: source " + src.describe() +
                                                " does not match destination " + view_.describe() +
                                                " (same dtype and count, contiguous)");
  }
  copy_bytes(view_.data(), view_.device(), src.data(), src.device(), bytes());
}

void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, std::size_t bytes) {
  if (bytes == 0) return;
  if (dst_device.is_cpu() && src_device.is_cpu()) {
    std::memcpy(dst, src, bytes);
    return;
  }
  detail::backend_of(dst_device.is_cuda() ? dst_device : src_device).copy(dst, src, bytes);
}

}  // namespace clsa
