// Properties of the current device that the kernels' plans need, cached per device.
#include <algorithm>
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

std::size_t max_access_policy_window() {
  static std::atomic<int> sizes[kMaxCachedDevices] = {};
  const int device = current_device();
  if (device < kMaxCachedDevices) {
    const int known = sizes[device].load(std::memory_order_relaxed);
    if (known > 0) return static_cast<std::size_t>(known);
  }
  int value = 0;
  detail::cuda_check(cudaDeviceGetAttribute(&value, cudaDevAttrMaxAccessPolicyWindowSize, device),
                     "cudaDeviceGetAttribute (access-policy window)");
  if (device < kMaxCachedDevices && value > 0) sizes[device].store(value, std::memory_order_relaxed);
  return static_cast<std::size_t>(value);
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

int largest_cluster(const void* kernel, int threads, std::size_t shared, int most) {
  int cluster = 1;
  while (cluster * 2 <= std::min(most, 16)) cluster *= 2;
  if (cluster == 1 || !dependent_launch_ready(kernel)) return 1;
  if (cluster > 8) {
    detail::cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
                       "cudaFuncSetAttribute (non-portable clusters)");
  }
  for (; cluster > 1; cluster /= 2) {
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(cluster));
    config.blockDim = dim3(static_cast<unsigned>(threads));
    config.dynamicSmemBytes = shared;
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = static_cast<unsigned>(cluster);
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters > 0) break;
    (void)cudaGetLastError();  // a size the device cannot place: try the next smaller one
  }
  return cluster;
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

namespace {
std::atomic<std::size_t> routed_kv_l2_bytes[kMaxCachedDevices] = {};
}  // namespace

std::size_t keep_routed_kv_in_l2(std::size_t bytes) {
  const int device = current_device();
  if (device >= kMaxCachedDevices) return 0;
  int most = 0;
  detail::cuda_check(cudaDeviceGetAttribute(&most, cudaDevAttrMaxPersistingL2CacheSize, device),
                     "cudaDeviceGetAttribute (persisting L2)");
  const std::size_t granted = std::min(bytes, static_cast<std::size_t>(std::max(most, 0)));
  detail::cuda_check(cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize, granted), "cudaDeviceSetLimit (persisting L2)");
  if (granted == 0) detail::cuda_check(cudaCtxResetPersistingL2Cache(), "cudaCtxResetPersistingL2Cache");
  routed_kv_l2_bytes[device].store(granted, std::memory_order_relaxed);
  return granted;
}

float routed_kv_hit_ratio(std::size_t bytes) {
  const int device = current_device();
  if (device >= kMaxCachedDevices || bytes == 0) return 0.0f;
  const std::size_t granted = routed_kv_l2_bytes[device].load(std::memory_order_relaxed);
  if (granted == 0) return 0.0f;
  const std::size_t window = std::min(bytes, max_access_policy_window());
  return window == 0 ? 0.0f : std::min(1.0f, static_cast<float>(granted) / static_cast<float>(window));
}

}  // namespace cuda_kernels
}  // namespace clsa
