// Properties of the current device that the kernels' plans need, cached per device.
#include <atomic>
#include <map>
#include <mutex>
#include <utility>

#include "common.cuh"

namespace clsa {
namespace cuda_kernels {

int current_device() {
  int device = 0;
  detail::cuda_check(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

int multiprocessor_count() {
  static std::atomic<int> counts[kMaxCachedDevices] = {};
  const int device = current_device();
  if (device < kMaxCachedDevices) {
    const int known = counts[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int value = 0;
  detail::cuda_check(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device),
                     "cudaDeviceGetAttribute (multiprocessors)");
  if (device < kMaxCachedDevices) counts[device].store(value, std::memory_order_relaxed);
  return value;
}

bool dependent_launch_ready(const void* kernel) {
  int major = 0;
  detail::cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, current_device()),
                     "cudaDeviceGetAttribute (compute capability)");
  if (major < 9) return false;
  cudaFuncAttributes attributes{};
  detail::cuda_check(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes");
  return attributes.ptxVersion >= 90;
}

void allow_shared_memory(const void* kernel, std::size_t bytes, const char* what) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, std::size_t> allowed;
  const std::lock_guard<std::mutex> lock(mutex);
  const int device = current_device();
  std::size_t& limit = allowed[{kernel, device}];
  if (bytes <= limit) return;
  // A plan that needs more than the device offers is refused when it is made, not at a launch.
  int most = 0;
  detail::cuda_check(cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                     "cudaDeviceGetAttribute (shared memory per block)");
  if (bytes > static_cast<std::size_t>(most)) {
    detail::fail(ErrorCode::unsupported,
                 detail::concat(what, ": this plan needs ", bytes, " bytes of shared memory per block; cuda:", device,
                                " allows ", most, " (fewer query tokens or heads per call)"));
  }
  detail::cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
                     what);
  limit = bytes;
}

int resident_blocks(const void* kernel, int threads, std::size_t shared, const char* what) {
  allow_shared_memory(kernel, shared, what);
  int blocks = 0;
  detail::cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, shared), what);
  return blocks > 0 ? blocks : 1;
}

}  // namespace cuda_kernels
}  // namespace clsa
