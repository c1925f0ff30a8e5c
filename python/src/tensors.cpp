#include "tensors.hpp"

#include <Python.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace clsa_py {

namespace {

using nb::dlpack::dtype_code;

// DLPack device types (dlpack.h's DLDeviceType).
constexpr int kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13;

std::string dtype_text(nb::dlpack::dtype dtype) {
  const char* kind = nullptr;
  switch (static_cast<dtype_code>(dtype.code)) {
    case dtype_code::Int:
      kind = "int";
      break;
    case dtype_code::UInt:
      kind = "uint";
      break;
    case dtype_code::Float:
      kind = "float";
      break;
    case dtype_code::Bfloat:
      kind = "bfloat";
      break;
    case dtype_code::Complex:
      kind = "complex";
      break;
    case dtype_code::Bool:
      kind = "bool";
      break;
    default:
      return "DLPack dtype code " + std::to_string(dtype.code) + " (" + std::to_string(dtype.bits) + " bits)";
  }
  std::string text = kind + std::to_string(dtype.bits);
  if (dtype.lanes != 1) text += "x" + std::to_string(dtype.lanes);
  return text;
}

bool dtype_of(nb::dlpack::dtype dtype, clsa::DType& out) {
  if (dtype.lanes != 1) return false;
  switch (static_cast<dtype_code>(dtype.code)) {
    case dtype_code::Float:
      if (dtype.bits == 32) out = clsa::DType::f32;
      if (dtype.bits == 16) out = clsa::DType::f16;
      return dtype.bits == 32 || dtype.bits == 16;
    case dtype_code::Bfloat:
      out = clsa::DType::bf16;
      return dtype.bits == 16;
    case dtype_code::Int:
      out = clsa::DType::i32;
      return dtype.bits == 32;
    case dtype_code::UInt:  // e4m3 bytes (NumPy has no float8)
    case dtype_code::Float8_E4M3FN:
      out = clsa::DType::e4m3;
      return dtype.bits == 8;
    default:
      return false;
  }
}

std::string type_name_of(nb::handle obj) {
  return nb::type_name(obj.type()).c_str();
}

/// sys.modules[name] if it is loaded, else an empty handle (never imports).
nb::object loaded_module(const char* name) {
  PyObject* module = PyImport_GetModule(nb::str(name).ptr());
  if (module == nullptr) {
    PyErr_Clear();
    return {};
  }
  return nb::steal(module);
}

bool is_instance_of(nb::handle obj, const char* module_name, const char* attribute) {
  const nb::object module = loaded_module(module_name);
  if (!module.is_valid()) return false;
  const nb::object type = module.attr(attribute);
  return PyObject_IsInstance(obj.ptr(), type.ptr()) == 1;
}

std::uintptr_t stream_handle(const CallContext& call, nb::handle value, const char* what) {
  std::uintptr_t handle = 0;
  if (!nb::try_cast(value, handle, /*convert=*/false)) {
    fail(clsa::ErrorCode::invalid_argument, call,
         std::string(what) + " is a " + type_name_of(value) + "; expected a non-negative int (a cudaStream_t)");
  }
  return handle;
}

}  // namespace

void fail(clsa::ErrorCode code, const CallContext& call, const std::string& message) {
  throw clsa::Error(code, std::string(call.function) + ": " + message);
}

bool is_torch_tensor(nb::handle obj) {
  return is_instance_of(obj, "torch", "Tensor");
}

clsa::TensorView to_view(CallContext& call, const char* name, nb::handle obj, Access access, bool optional) {
  if (obj.is_none()) {
    if (optional) return {};
    fail(clsa::ErrorCode::invalid_argument, call, std::string(name) + " is None; it must be an array");
  }
  nb::ndarray<nb::ro> array;
  if (!nb::try_cast(obj, array, /*convert=*/false)) {
    fail(clsa::ErrorCode::invalid_argument, call,
         std::string(name) + " is a " + type_name_of(obj) +
             "; expected an array (NumPy, PyTorch, CuPy, ... through DLPack or the buffer protocol)");
  }
  if (access == Access::write) {
    nb::ndarray<> writable;
    if (!nb::try_cast(obj, writable, /*convert=*/false)) {
      fail(clsa::ErrorCode::invalid_argument, call, std::string(name) + " is read-only; this call writes it");
    }
  }
  clsa::DType dtype{};
  if (!dtype_of(array.dtype(), dtype)) {
    fail(clsa::ErrorCode::dtype_mismatch, call,
         std::string(name) + " has dtype " + dtype_text(array.dtype()) +
             "; libclsa takes float32, float16, bfloat16, int32 and float8_e4m3fn (or its bytes as uint8)");
  }
  clsa::Device device;
  switch (array.device_type()) {
    case kDLCPU:
    case kDLCUDAHost:
      device = clsa::Device::cpu();
      break;
    case kDLCUDA:
    case kDLCUDAManaged:
      device = clsa::Device::cuda(array.device_id());
      break;
    default:
      fail(clsa::ErrorCode::device_mismatch, call,
           std::string(name) + " lives on DLPack device type " + std::to_string(array.device_type()) +
               "; libclsa takes CPU and CUDA memory");
  }
  const int rank = static_cast<int>(array.ndim());
  if (rank > clsa::TensorView::kMaxRank) {
    fail(clsa::ErrorCode::shape_mismatch, call,
         std::string(name) + " has rank " + std::to_string(rank) + "; libclsa takes at most " +
             std::to_string(clsa::TensorView::kMaxRank));
  }
  std::array<std::int64_t, clsa::TensorView::kMaxRank> shape{}, strides{};
  for (int d = 0; d < rank; ++d) {
    shape[static_cast<std::size_t>(d)] = array.shape_ptr()[d];
    strides[static_cast<std::size_t>(d)] = array.stride_ptr()[d];
  }
  if (!call.first.is_valid()) call.first = obj;
  if (device.is_cuda() && !call.cuda_tensor.is_valid()) {
    call.cuda_tensor = obj;
    call.cuda_device = device.index;
  }
  // The view does not own the memory: the caller's argument keeps it alive for the call, and
  // objects that keep views beyond a call keep the argument too.
  return clsa::TensorView(const_cast<void*>(array.data()), dtype, rank, shape.data(), strides.data(), device);
}

clsa::Stream to_stream(const CallContext& call, nb::handle stream) {
  std::uintptr_t handle = 0;
  if (stream.is_none() && call.cuda_tensor.is_valid()) {
    if (is_instance_of(call.cuda_tensor, "torch", "Tensor")) {
      const nb::object cuda = loaded_module("torch").attr("cuda");
      handle = stream_handle(call, cuda.attr("current_stream")(call.cuda_device).attr("cuda_stream"),
                             "torch.cuda.current_stream().cuda_stream");
    } else if (is_instance_of(call.cuda_tensor, "cupy", "ndarray")) {
      const nb::object cuda = loaded_module("cupy").attr("cuda");
      handle = stream_handle(call, cuda.attr("get_current_stream")().attr("ptr"), "cupy's current stream");
    }
  } else if (stream.is_none()) {
    if (!call.cuda_object) return {};
    const nb::object torch = loaded_module("torch");
    if (!torch.is_valid()) return {};
    handle = stream_handle(call, torch.attr("cuda").attr("current_stream")(call.object_device).attr("cuda_stream"),
                           "torch.cuda.current_stream().cuda_stream");
  } else if (PyLong_Check(stream.ptr())) {
    handle = stream_handle(call, stream, "stream");
  } else if (nb::hasattr(stream, "cuda_stream")) {
    handle = stream_handle(call, stream.attr("cuda_stream"), "stream.cuda_stream");
  } else if (nb::hasattr(stream, "__cuda_stream__")) {
    const nb::object pair = stream.attr("__cuda_stream__")();
    handle = stream_handle(call, pair[1], "stream.__cuda_stream__()[1]");
  } else if (nb::hasattr(stream, "ptr")) {
    handle = stream_handle(call, stream.attr("ptr"), "stream.ptr");
  } else {
    fail(clsa::ErrorCode::invalid_argument, call,
         "stream is a " + type_name_of(stream) +
             "; expected None, an int (a cudaStream_t) or a stream object (.cuda_stream, __cuda_stream__ or .ptr)");
  }
  return clsa::Stream(reinterpret_cast<CUstream_st*>(handle));
}

nb::dlpack::dtype dlpack_dtype(clsa::DType dtype, bool as_bytes) {
  switch (dtype) {
    case clsa::DType::f32:
      return nb::dtype<float>();
    case clsa::DType::f16:
      return nb::dlpack::dtype{static_cast<std::uint8_t>(dtype_code::Float), 16, 1};
    case clsa::DType::bf16:
      return nb::dlpack::dtype{static_cast<std::uint8_t>(dtype_code::Bfloat), 16, 1};
    case clsa::DType::i32:
      return nb::dtype<std::int32_t>();
    case clsa::DType::e4m3:
      return nb::dlpack::dtype{static_cast<std::uint8_t>(as_bytes ? dtype_code::UInt : dtype_code::Float8_E4M3FN), 8,
                               1};
  }
  return nb::dtype<float>();
}

nb::object to_array(const clsa::TensorView& view, nb::handle owner, bool as_torch) {
  std::array<std::size_t, clsa::TensorView::kMaxRank> shape{};
  std::array<std::int64_t, clsa::TensorView::kMaxRank> strides{};
  for (int d = 0; d < view.rank(); ++d) {
    shape[static_cast<std::size_t>(d)] = static_cast<std::size_t>(view.size(d));
    strides[static_cast<std::size_t>(d)] = view.stride(d);
  }
  const auto rank = static_cast<std::size_t>(view.rank());
  const int device_type = view.device().is_cuda() ? kDLCUDA : kDLCPU;
  const int device_id = view.device().is_cuda() ? view.device().index : 0;
  if (as_torch) {
    return nb::cast(nb::ndarray<nb::pytorch>(view.data(), rank, shape.data(), owner, strides.data(),
                                             dlpack_dtype(view.dtype(), false), device_type, device_id));
  }
  if (view.device().is_cpu() && view.dtype() != clsa::DType::bf16) {
    return nb::cast(nb::ndarray<nb::numpy>(view.data(), rank, shape.data(), owner, strides.data(),
                                           dlpack_dtype(view.dtype(), true), device_type, device_id));
  }
  return nb::cast(nb::ndarray<>(view.data(), rank, shape.data(), owner, strides.data(),
                                dlpack_dtype(view.dtype(), true), device_type, device_id));
}

}  // namespace clsa_py
