// What the examples and the tests need of the CUDA runtime beyond libclsa: a stream they own (and
// the copies they make in its order), a captured CUDA graph, timing between marks on a stream, and
// the check of CUDA return codes.
//
// A target that links the CUDA runtime gets CLSA_WITH_CUDA_RUNTIME=1 (cuda_support.cmake); without
// it the same types serve the CPU backend: a stream on the CPU is none and its copies are memcpy,
// marks read the wall clock, and a CUDA stream or graph is refused (Error(unsupported)). The one
// #if is the runtime layer below; everything after it is written once.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "clsa/types.hpp"

#if CLSA_WITH_CUDA_RUNTIME
#include <cuda_runtime_api.h>
#endif

namespace cuda_support {

namespace runtime {
/// Which way a copy goes.
enum class CopyKind { host_to_device, device_to_host, device_to_device };
}  // namespace runtime

#if CLSA_WITH_CUDA_RUNTIME

/// Throws Error(cuda_error) naming `call` when `status` is not cudaSuccess.
inline void check_cuda(cudaError_t status, const char* call) {
  if (status != cudaSuccess) {
    throw clsa::Error(clsa::ErrorCode::cuda_error, std::string(call) + ": " + cudaGetErrorString(status));
  }
}

/// The runtime calls the types below are made of.
namespace runtime {

using Event = cudaEvent_t;
using GraphExec = cudaGraphExec_t;

/// A new non-blocking stream on `device` (the current device is kept).
inline cudaStream_t create_stream(int device) {
  int current = 0;
  check_cuda(cudaGetDevice(&current), "cudaGetDevice");
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  cudaStream_t stream = nullptr;
  const cudaError_t status = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  (void)cudaSetDevice(current);
  check_cuda(status, "cudaStreamCreateWithFlags");
  return stream;
}
inline void destroy_stream(cudaStream_t stream) {
  (void)cudaStreamSynchronize(stream);
  (void)cudaStreamDestroy(stream);
}
inline void wait(cudaStream_t stream) {
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}
inline void copy(void* target, const void* source, std::size_t bytes, CopyKind kind, cudaStream_t stream) {
  switch (kind) {
    case CopyKind::host_to_device:
      check_cuda(cudaMemcpyAsync(target, source, bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync (upload)");
      break;
    case CopyKind::device_to_host:
      check_cuda(cudaMemcpyAsync(target, source, bytes, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync (download)");
      break;
    case CopyKind::device_to_device:
      check_cuda(cudaMemcpyAsync(target, source, bytes, cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync");
      break;
  }
}
inline void fill(void* target, int value, std::size_t bytes, cudaStream_t stream) {
  check_cuda(cudaMemsetAsync(target, value, bytes, stream), "cudaMemsetAsync");
}

inline Event create_event() {
  Event event = nullptr;
  check_cuda(cudaEventCreate(&event), "cudaEventCreate");
  return event;
}
inline void destroy_event(Event event) {
  (void)cudaEventDestroy(event);
}
inline void record(Event event, cudaStream_t stream) {
  check_cuda(cudaEventRecord(event, stream), "cudaEventRecord");
}
/// Seconds of device time from `from` to `to`, once `to` has happened.
inline double seconds_between(Event from, Event to) {
  check_cuda(cudaEventSynchronize(to), "cudaEventSynchronize");
  float ms = 0.0f;
  check_cuda(cudaEventElapsedTime(&ms, from, to), "cudaEventElapsedTime");
  return static_cast<double>(ms) * 1e-3;
}

/// Records what `enqueue` puts on `stream` (nothing runs) and instantiates it. If `enqueue` throws,
/// the stream leaves capture mode before the error goes on.
template <class Enqueue>
GraphExec capture(cudaStream_t stream, Enqueue& enqueue) {
  check_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
  cudaGraph_t graph = nullptr;
  try {
    enqueue();
  } catch (...) {
    (void)cudaStreamEndCapture(stream, &graph);
    if (graph != nullptr) (void)cudaGraphDestroy(graph);
    throw;
  }
  check_cuda(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
  GraphExec exec = nullptr;
  const cudaError_t status = cudaGraphInstantiate(&exec, graph, 0);
  (void)cudaGraphDestroy(graph);
  check_cuda(status, "cudaGraphInstantiate");
  return exec;
}
inline void launch(GraphExec exec, cudaStream_t stream) {
  check_cuda(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
}
inline void destroy_graph(GraphExec exec) {
  (void)cudaGraphExecDestroy(exec);
}

/// The device's product name, e.g. "NVIDIA H100 80GB HBM3".
inline std::string device_product_name(int device) {
  cudaDeviceProp properties{};
  check_cuda(cudaGetDeviceProperties(&properties, device), "cudaGetDeviceProperties");
  return properties.name;
}

}  // namespace runtime

#else  // no CUDA runtime: no stream, event or graph ever exists, so only their creation is reached

namespace runtime {

using Event = void*;
using GraphExec = void*;

[[noreturn]] inline void unavailable(const char* what) {
  throw clsa::Error(clsa::ErrorCode::unsupported, std::string(what) + ": built without the CUDA runtime");
}
inline CUstream_st* create_stream(int) {
  unavailable("a CUDA stream");
}
inline void destroy_stream(CUstream_st*) {}
inline void wait(CUstream_st*) {}
inline void copy(void*, const void*, std::size_t, CopyKind, CUstream_st*) {}
inline void fill(void*, int, std::size_t, CUstream_st*) {}
inline Event create_event() {
  unavailable("a CUDA event");
}
inline void destroy_event(Event) {}
inline void record(Event, CUstream_st*) {}
inline double seconds_between(Event, Event) {
  return 0.0;
}
template <class Enqueue>
GraphExec capture(CUstream_st*, Enqueue&) {
  unavailable("a CUDA graph");
}
inline void launch(GraphExec, CUstream_st*) {}
inline void destroy_graph(GraphExec) {}
inline std::string device_product_name(int) {
  unavailable("a CUDA device's name");
}

}  // namespace runtime

#endif

/// The stream a program's device work goes on, in order: on a CUDA device a non-blocking stream
/// this object creates and destroys (after waiting for it); on the CPU none, where the backend's
/// calls return when they are done and copies are memcpy.
class OwnedStream {
 public:
  explicit OwnedStream(clsa::Device device)
      : device_(device), handle_(device.is_cuda() ? runtime::create_stream(device.index) : nullptr) {}
  ~OwnedStream() {
    if (handle_ != nullptr) runtime::destroy_stream(handle_);
  }
  OwnedStream(const OwnedStream&) = delete;
  OwnedStream& operator=(const OwnedStream&) = delete;

  clsa::Device device() const { return device_; }
  /// What libclsa's calls take (the default stream {} on the CPU).
  clsa::Stream stream() const { return clsa::Stream(handle_); }

  /// Host -> device memory, in stream order. The host buffer may be reused on return
  /// (cudaMemcpyAsync stages pageable host memory before it returns).
  void upload(void* target, const void* source, std::size_t bytes) const {
    copy(target, source, bytes, runtime::CopyKind::host_to_device);
  }
  /// Device memory -> host, after everything enqueued before it; returns once it is there.
  void download(void* target, const void* source, std::size_t bytes) const {
    copy(target, source, bytes, runtime::CopyKind::device_to_host);
    wait();
  }
  /// Device memory -> device memory, in stream order.
  void copy_on_device(void* target, const void* source, std::size_t bytes) const {
    copy(target, source, bytes, runtime::CopyKind::device_to_device);
  }
  /// Sets `bytes` of device memory to `value`, in stream order.
  void fill(void* target, int value, std::size_t bytes) const {
    if (handle_ != nullptr) {
      runtime::fill(target, value, bytes, handle_);
    } else {
      std::memset(target, value, bytes);
    }
  }
  /// Waits for everything enqueued so far.
  void wait() const {
    if (handle_ != nullptr) runtime::wait(handle_);
  }

 private:
  void copy(void* target, const void* source, std::size_t bytes, runtime::CopyKind kind) const {
    if (bytes == 0) return;
    if (handle_ != nullptr) {
      runtime::copy(target, source, bytes, kind, handle_);
    } else {
      std::memcpy(target, source, bytes);
    }
  }

  clsa::Device device_;
  CUstream_st* handle_;
};

/// Times the work on an OwnedStream between numbered marks: on CUDA by events recorded on the
/// stream (device time), on the CPU by the wall clock.
class StreamTimer {
 public:
  StreamTimer(const OwnedStream& stream, int marks)
      : stream_(stream), times_(static_cast<std::size_t>(marks)), events_(static_cast<std::size_t>(marks), nullptr) {
    if (stream_.stream().cuda() == nullptr) return;
    for (runtime::Event& event : events_) event = runtime::create_event();
  }
  ~StreamTimer() {
    for (runtime::Event event : events_) {
      if (event != nullptr) runtime::destroy_event(event);
    }
  }
  StreamTimer(const StreamTimer&) = delete;
  StreamTimer& operator=(const StreamTimer&) = delete;

  /// Marks point `i`: an event recorded on the stream (CUDA) or the wall clock now (CPU).
  void mark(int i) {
    const std::size_t at = static_cast<std::size_t>(i);
    if (events_[at] != nullptr) {
      runtime::record(events_[at], stream_.stream().cuda());
    } else {
      times_[at] = std::chrono::steady_clock::now();
    }
  }
  /// Seconds from mark `from` to mark `to` (on CUDA, waits for `to`).
  double seconds(int from, int to) const {
    const std::size_t a = static_cast<std::size_t>(from), b = static_cast<std::size_t>(to);
    if (events_[b] != nullptr) return runtime::seconds_between(events_[a], events_[b]);
    return std::chrono::duration<double>(times_[b] - times_[a]).count();
  }

 private:
  const OwnedStream& stream_;
  std::vector<std::chrono::steady_clock::time_point> times_;
  std::vector<runtime::Event> events_;
};

/// A CUDA graph captured from a stream, instantiated, replayed at will and destroyed with this
/// object (move-only). Default-constructed it holds none.
class CapturedGraph {
 public:
  CapturedGraph() = default;
  /// Records what `enqueue()` puts on `stream` (nothing runs then) as a graph. Refused with
  /// Error(unsupported) without the CUDA runtime.
  template <class Enqueue>
  static CapturedGraph capture(clsa::Stream stream, Enqueue&& enqueue) {
    return CapturedGraph(runtime::capture(stream.cuda(), enqueue));
  }
  ~CapturedGraph() { reset(); }
  CapturedGraph(CapturedGraph&& other) noexcept : exec_(std::exchange(other.exec_, nullptr)) {}
  CapturedGraph& operator=(CapturedGraph&& other) noexcept {
    if (this != &other) {
      reset();
      exec_ = std::exchange(other.exec_, nullptr);
    }
    return *this;
  }
  CapturedGraph(const CapturedGraph&) = delete;
  CapturedGraph& operator=(const CapturedGraph&) = delete;

  bool captured() const { return exec_ != nullptr; }
  /// Enqueues the captured work on `stream`.
  void replay(clsa::Stream stream) const { runtime::launch(exec_, stream.cuda()); }

 private:
  explicit CapturedGraph(runtime::GraphExec exec) : exec_(exec) {}
  void reset() {
    if (exec_ != nullptr) runtime::destroy_graph(std::exchange(exec_, nullptr));
  }

  runtime::GraphExec exec_ = nullptr;
};

/// "NVIDIA H100 80GB HBM3" for a CUDA device, clsa::device_name ("cpu") otherwise.
inline std::string device_description(clsa::Device device) {
  return device.is_cuda() ? runtime::device_product_name(device.index) : clsa::device_name(device);
}

}  // namespace cuda_support
