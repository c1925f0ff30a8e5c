// Core vocabulary of libclsa: element types, devices, backends, streams, errors and a small span.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

struct CUstream_st;  // the CUDA runtime's stream type; cudaStream_t is CUstream_st*

namespace clsa {

/// Element type of a tensor. f32/f16/bf16 hold activations and cache entries; e4m3 (OCP float8
/// e4m3fn, one byte: CUDA's __nv_fp8_e4m3, torch.float8_e4m3fn; clsa::float8_e4m3) holds
/// quantized cache entries with their scales (CacheConfig); i32 holds positions.
enum class DType { f32, f16, bf16, i32, e4m3 };

/// Bytes of one element of `dtype`.
std::size_t dtype_size(DType dtype);
/// "f32", "f16", "bf16", "i32" or "e4m3".
const char* dtype_name(DType dtype);

/// Where memory lives: host memory or the memory of one CUDA device.
struct Device {
  enum class Kind { cpu, cuda };
  Kind kind = Kind::cpu;
  int index = 0;

  static Device cpu() { return Device{Kind::cpu, 0}; }
  static Device cuda(int index = 0) { return Device{Kind::cuda, index}; }
  bool is_cpu() const { return kind == Kind::cpu; }
  bool is_cuda() const { return kind == Kind::cuda; }
  friend bool operator==(Device a, Device b) { return a.kind == b.kind && (a.kind == Kind::cpu || a.index == b.index); }
  friend bool operator!=(Device a, Device b) { return !(a == b); }
};

/// "cpu" or "cuda:N".
std::string device_name(Device device);

/// Which implementation a component runs on. `automatic` takes CUDA when the library was built
/// with it and a CUDA device is present, the CPU otherwise.
enum class Backend { automatic, cpu, cuda };

const char* backend_name(Backend backend);

/// True when this build of libclsa contains the CUDA kernels.
bool built_with_cuda();
/// Number of usable CUDA devices (0 on a build without CUDA or a machine without a GPU/driver).
int cuda_device_count();
/// Resolves `automatic` and checks that `cuda` is available; never returns `automatic`.
/// Throws Error(unsupported) for `cuda` on a build without CUDA or a machine without a GPU.
Backend resolve_backend(Backend requested);
/// The device a resolved backend computes on (the current CUDA device for `cuda`).
Device backend_device(Backend resolved);

/// A CUDA stream, or the default stream. Implicitly constructible from a cudaStream_t, so
/// engines pass their own streams as they are; ignored by the CPU backend.
class Stream {
 public:
  Stream() = default;
  Stream(CUstream_st* cuda_stream) : handle_(cuda_stream) {}  // NOLINT(google-explicit-constructor)
  CUstream_st* cuda() const { return handle_; }

 private:
  CUstream_st* handle_ = nullptr;
};

/// Waits until the work enqueued on `stream` is done (nothing to wait for on the CPU backend,
/// whose calls return when they are done).
void synchronize(Stream stream = {});

/// What went wrong, for callers that branch on it; the message says it for humans.
enum class ErrorCode {
  invalid_argument,   // a value out of its allowed range (top_k <= 0, page_size not a power of two)
  shape_mismatch,     // a tensor's rank, extents or strides do not fit
  dtype_mismatch,     // a tensor's element type does not fit
  device_mismatch,    // a tensor lives on another device than the component computes on
  unknown_sequence,   // a SequenceId that the cache does not hold
  capacity_exceeded,  // the cache has too few free pages, or a batch table too little room
  unsupported,        // a configuration this build or machine cannot run (e.g. Backend::cuda without GPU)
  cuda_error,         // a CUDA runtime call failed
};

const char* error_code_name(ErrorCode code);

/// Every failure libclsa reports is a clsa::Error. The message names the function, the argument
/// and the shapes involved, e.g.
/// "SparseCrossAttention::forward: q has shape [2,1,32,64]; expected [2,1,32,128] (head_dim 128)".
class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message);
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

/// Minimal read-only span (C++17 has none): pointer + size, from a vector or an array.
template <class T>
class Span {
 public:
  Span() = default;
  Span(const T* data, std::size_t size) : data_(data), size_(size) {}
  Span(const std::vector<T>& v) : data_(v.data()), size_(v.size()) {}  // NOLINT
  template <std::size_t N>
  Span(const T (&array)[N]) : data_(array), size_(N) {}  // NOLINT
  const T* data() const { return data_; }
  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  const T& operator[](std::size_t i) const { return data_[i]; }
  const T* begin() const { return data_; }
  const T* end() const { return data_ + size_; }

 private:
  const T* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace clsa
