// Tensors and streams across the Python boundary: any object that nanobind imports as an ndarray
// (DLPack or the buffer protocol: NumPy, PyTorch, CuPy, JAX, ...) becomes a clsa::TensorView over
// the same memory (no copy; strides as they are, for the library to honour or refuse), and a
// `stream=` argument becomes a clsa::Stream.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <string>

#include "clsa/clsa.hpp"

namespace clsa_py {

namespace nb = nanobind;

/// What one call's tensors tell about it: the function (for messages), the first tensor seen
/// (its framework shapes the arrays a call returns) and the first CUDA tensor (torch or CuPy give
/// the default stream).
struct CallContext {
  explicit CallContext(const char* name) : function(name) {}
  const char* function;
  nb::handle first;
  nb::handle cuda_tensor;
  int cuda_device = 0;
  /// The call's object computes on a CUDA device (a call that may have no CUDA tensor: append of
  /// host data, a refill): without a stream, the current torch stream of that device, if torch is
  /// loaded.
  bool cuda_object = false;
  int object_device = 0;

  CallContext& on(clsa::Device device) {
    cuda_object = device.is_cuda();
    object_device = device.index;
    return *this;
  }
};

enum class Access { read, write };

/// `obj` as a view of its memory. None gives an undefined view when `optional`, an Error
/// otherwise. Refuses (clsa::Error naming the function and the argument) what is not an array,
/// element types that libclsa has no DType for, devices other than the CPU and CUDA, ranks above
/// TensorView::kMaxRank, and read-only arrays where the call writes. NumPy has no float8: e4m3 bytes
/// may come as uint8 (and float8_e4m3fn from frameworks that have it).
clsa::TensorView to_view(CallContext& call, const char* name, nb::handle obj, Access access, bool optional = false);

/// The stream of a call: None (the current torch or CuPy stream when a tensor of the call is a
/// CUDA tensor of that framework, else the default stream), an int (a cudaStream_t handle), or an
/// object with `.cuda_stream` (torch.cuda.Stream), `__cuda_stream__` (the CUDA stream protocol) or
/// `.ptr` (cupy.cuda.Stream).
clsa::Stream to_stream(const CallContext& call, nb::handle stream);

/// The element type `dtype` as DLPack describes it (e4m3: float8_e4m3fn, or uint8 `as_bytes`).
nb::dlpack::dtype dlpack_dtype(clsa::DType dtype, bool as_bytes);

/// An array over the memory of `view`, kept alive by `owner`: a torch.Tensor `as_torch`, else a
/// numpy.ndarray on the CPU (e4m3 as uint8; bf16, which NumPy lacks, as nanobind's ndarray) and
/// nanobind's ndarray (which speaks DLPack: torch.from_dlpack, cupy.from_dlpack) on a GPU.
nb::object to_array(const clsa::TensorView& view, nb::handle owner, bool as_torch);

/// True when `obj` is a torch.Tensor (without importing torch: false when it is not loaded).
bool is_torch_tensor(nb::handle obj);

/// "SharedKVCache.append: <message>" as a clsa::Error.
[[noreturn]] void fail(clsa::ErrorCode code, const CallContext& call, const std::string& message);

}  // namespace clsa_py
