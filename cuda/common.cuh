// Device-side helpers shared by libclsa's kernels: element types, 16-byte vector loads with
// widening, launch checks (paged addressing: clsa/paged_view.hpp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "clsa/cache.hpp"
#include "clsa/numeric.hpp"
#include "clsa/paged_view.hpp"
#include "common/check.hpp"
#include "cuda_check.hpp"
#include "kernels.hpp"

namespace clsa {
namespace cuda_kernels {

constexpr unsigned kFullMask = 0xffffffffu;

template <class Elem>
struct ElemTraits;
template <>
struct ElemTraits<float> {
  static constexpr int kPerVector = 4;  // elements per 16 bytes
};
template <>
struct ElemTraits<__half> {
  static constexpr int kPerVector = 8;
};
template <>
struct ElemTraits<__nv_bfloat16> {
  static constexpr int kPerVector = 8;
};

__device__ __forceinline__ float widen(float x) {
  return x;
}
__device__ __forceinline__ float widen(__half x) {
  return __half2float(x);
}
__device__ __forceinline__ float widen(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <class Elem>
__device__ __forceinline__ Elem narrow(float x);
template <>
__device__ __forceinline__ float narrow<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half narrow<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

/// Widens the 16 bytes in `raw` (kPerVector elements of Elem) into out[0..kPerVector).
template <class Elem>
__device__ __forceinline__ void widen_vector(const uint4& raw, float* out);
template <>
__device__ __forceinline__ void widen_vector<float>(const uint4& raw, float* out) {
  out[0] = __uint_as_float(raw.x);
  out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z);
  out[3] = __uint_as_float(raw.w);
}
template <>
__device__ __forceinline__ void widen_vector<__nv_bfloat16>(const uint4& raw, float* out) {
  const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}
template <>
__device__ __forceinline__ void widen_vector<__half>(const uint4& raw, float* out) {
  const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
    out[2 * i] = pair.x;
    out[2 * i + 1] = pair.y;
  }
}

/// D += A.B on tensor cores, m16n8k16 with f32 accumulators (sm_80+): A's four and B's two
/// registers in the PTX fragment layout of `mma.sync.aligned.m16n8k16.row.col`.
template <class Elem>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  static_assert(std::is_same<Elem, __nv_bfloat16>::value || std::is_same<Elem, __half>::value,
                "mma_16816 takes 16-bit elements");
  if constexpr (std::is_same<Elem, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

/// Two floats rounded to one register of two 16-bit elements (`low` in the low half).
template <class Elem>
__device__ __forceinline__ unsigned pack_pair(float low, float high);
template <>
__device__ __forceinline__ unsigned pack_pair<__nv_bfloat16>(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<const unsigned*>(&pair);
}
template <>
__device__ __forceinline__ unsigned pack_pair<__half>(float low, float high) {
  const __half2 pair = __floats2half2_rn(low, high);
  return *reinterpret_cast<const unsigned*>(&pair);
}

/// `low` and `high` as a rounded 16-bit pair `head` plus the rounded remainder `tail`: two
/// tensor-core products with head and tail carry the f32 values to about 16 mantissa bits (the
/// attention's softmax weights, which one 16-bit rounding would perturb by up to 2^-9).
template <class Elem>
__device__ __forceinline__ void split_pair(float low, float high, unsigned& head, unsigned& tail) {
  head = pack_pair<Elem>(low, high);
  float2 rounded;
  if constexpr (std::is_same<Elem, __nv_bfloat16>::value) {
    rounded = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&head));
  } else {
    rounded = __half22float2(*reinterpret_cast<const __half2*>(&head));
  }
  tail = pack_pair<Elem>(low - rounded.x, high - rounded.y);
}

/// Streaming 16-byte load through the read-only path (the cache is read once per call).
__device__ __forceinline__ uint4 load_vector(const void* address) {
  return __ldg(reinterpret_cast<const uint4*>(address));
}

__host__ __device__ __forceinline__ std::int64_t ceil_div(std::int64_t a, std::int64_t b) {
  return (a + b - 1) / b;
}

/// Devices the per-device caches below hold (a device with a higher index is queried each time).
constexpr int kMaxCachedDevices = 64;

/// The current CUDA device (each entry point has made its component's device current).
int current_device();
/// Number of multiprocessors of the current device (cached per device).
int multiprocessor_count();

/// Raises `kernel`'s dynamic shared-memory limit on the current device to at least `bytes`. The
/// limit is per device and only ever raised, so components sharing a device never lower it under
/// each other. Called when a plan is made, never in a call's hot path.
void allow_shared_memory(const void* kernel, std::size_t bytes, const char* what);

/// The largest L2 access-policy window of the current device, in bytes (cached per device).
std::size_t max_access_policy_window();

/// Resident CTAs per multiprocessor of `kernel` with `threads` threads and `shared` bytes of
/// dynamic shared memory on the current device (at least 1).
int resident_blocks(const void* kernel, int threads, std::size_t shared, const char* what);

/// Programmatic dependent launch (sm_90+). A kernel launched by launch_after() may be scheduled
/// while the kernel before it on the stream still runs: it must call wait_for_predecessor()
/// before it reads anything that kernel writes (everything enqueued before that kernel is
/// complete already). allow_dependents() lets the next such kernel be scheduled early. Below
/// sm_90 all three are plain stream order.
__device__ __forceinline__ void wait_for_predecessor() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
/// Whether `kernel` can run as a programmatic dependent on the current device: compute capability
/// >= 9.0 and code built for sm_90 or later (a kernel JIT-compiled from older PTX has no
/// griddepcontrol instructions, so it must not be launched early). Asked when a plan is made.
bool dependent_launch_ready(const void* kernel);
/// The largest power-of-two thread-block cluster, at most `most` CTAs (<= 16), that the current
/// device can place for `kernel` with `threads` threads and `shared` bytes of dynamic shared
/// memory; 1 where clusters are unavailable (below sm_90, or code JIT-compiled from sm_80 PTX).
/// Sizes above 8 (non-portable) are enabled on the kernel when they fit. Asked when a plan is made.
int largest_cluster(const void* kernel, int threads, std::size_t shared, int most);
/// Attributes of one launch: programmatic serialization (a dependent of the kernel before it), a
/// thread-block cluster shape, an L2 access-policy window that keeps a range as persisting lines.
struct LaunchAttributes {
  cudaLaunchAttribute list[3];
  unsigned count = 0;

  LaunchAttributes& dependent(bool on) {
    if (!on) return *this;
    list[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    list[count].val.programmaticStreamSerializationAllowed = 1;
    ++count;
    return *this;
  }
  LaunchAttributes& cluster(int x) {
    if (x <= 1) return *this;
    list[count].id = cudaLaunchAttributeClusterDimension;
    list[count].val.clusterDim.x = static_cast<unsigned>(x);
    list[count].val.clusterDim.y = 1;
    list[count].val.clusterDim.z = 1;
    ++count;
    return *this;
  }
  /// Accesses to [base, base + bytes) hit as persisting lines with probability hit_ratio (none
  /// when hit_ratio <= 0), the rest stream.
  LaunchAttributes& persisting(const void* base, std::size_t bytes, float hit_ratio) {
    if (!(hit_ratio > 0.0f) || base == nullptr || bytes == 0) return *this;
    list[count].id = cudaLaunchAttributeAccessPolicyWindow;
    list[count].val.accessPolicyWindow.base_ptr = const_cast<void*>(base);
    list[count].val.accessPolicyWindow.num_bytes = std::min(bytes, max_access_policy_window());
    list[count].val.accessPolicyWindow.hitRatio = hit_ratio > 1.0f ? 1.0f : hit_ratio;
    list[count].val.accessPolicyWindow.hitProp = cudaAccessPropertyPersisting;
    list[count].val.accessPolicyWindow.missProp = cudaAccessPropertyStreaming;
    ++count;
    return *this;
  }
};

/// Launches `kernel` on `stream` with `attributes`; a launch error raises Error(cuda_error).
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared, cudaStream_t stream,
                   const LaunchAttributes& attributes, const char* what, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  config.attrs = const_cast<cudaLaunchAttribute*>(attributes.list);
  config.numAttrs = attributes.count;
  detail::cuda_check(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), what);
}

/// Launches `kernel` on `stream`, as a programmatic dependent of the kernel before it when
/// `dependent` (from dependent_launch_ready), else as an ordinary launch.
template <class... Params, class... Args>
void launch_after(bool dependent, void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared,
                  cudaStream_t stream, const char* what, Args&&... args) {
  launch_kernel(kernel, grid, block, shared, stream, LaunchAttributes{}.dependent(dependent), what,
                std::forward<Args>(args)...);
}

/// Reports a run-time violation to the host (first report wins).
__device__ __forceinline__ void report(RunStatus* status, unsigned code, int sequence, int length, int limit) {
  if (status == nullptr) return;
  if (atomicCAS(&status->code, 0u, code) == 0u) {
    status->sequence = sequence;
    status->length = length;
    status->limit = limit;
    __threadfence_system();
  }
}

}  // namespace cuda_kernels
}  // namespace clsa
