// What a decoding step's per-layer fixed costs are on this GPU, measured the way `clsa bench`
// measures the step: L kernels in one CUDA graph, each after a feed-forward stand-in (a copy of
// half of a 128 MiB buffer onto its other half), the stand-ins' own graph time subtracted.
//   probe_l2 [block MiB...]        (default 8 16)
// Rows: an empty kernel (launch + dependency cost), a plain read of a `block` of MiB (cold: the
// stand-in evicted it; persisting: under an L2 access-policy window with the persisting carve-out
// set to the block; warm: no stand-in), and the stand-in's own time with and without the
// carve-out. Build: nvcc -O3 -arch=sm_90 -o probe_l2 scripts/probe_l2.cu
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#define CHECK(call)                                                                                   \
  do {                                                                                                \
    cudaError_t status_ = (call);                                                                     \
    if (status_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(status_)); \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)

__global__ void empty_kernel(int* sink) {
  if (threadIdx.x == 0 && blockIdx.x == 0 && sink == nullptr) *sink = 0;
}

// Every CTA reads a contiguous slice with all of its 16-byte loads in flight (8 per thread).
__global__ void __launch_bounds__(256) read_kernel(const uint4* data, std::size_t vectors, int* sink) {
  const std::size_t per_block = (vectors + gridDim.x - 1) / gridDim.x;
  const std::size_t begin = per_block * blockIdx.x;
  const std::size_t end = begin + per_block < vectors ? begin + per_block : vectors;
  unsigned acc = 0;
  for (std::size_t i = begin + threadIdx.x; i < end; i += 8 * blockDim.x) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const std::size_t j = i + static_cast<std::size_t>(u) * blockDim.x;
      v[u] = j < end ? __ldg(data + j) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x12345678u) sink[blockIdx.x] = static_cast<int>(acc);
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int main(int argc, char** argv) {
  std::vector<int> blocks_mib;
  for (int i = 1; i < argc; ++i) blocks_mib.push_back(std::atoi(argv[i]));
  if (blocks_mib.empty()) blocks_mib = {8, 16};
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s: %d SMs, L2 %d MiB, persisting L2 max %d MiB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20, prop.persistingL2CacheMaxSize >> 20);
  const int layers = 16;
  const std::size_t stand_in_half = std::size_t{64} << 20;
  char* stand_in = nullptr;
  CHECK(cudaMalloc(&stand_in, 2 * stand_in_half));
  CHECK(cudaMemset(stand_in, 1, 2 * stand_in_half));
  const std::size_t max_block = static_cast<std::size_t>(*std::max_element(blocks_mib.begin(), blocks_mib.end())) << 20;
  char* block = nullptr;
  CHECK(cudaMalloc(&block, max_block));
  CHECK(cudaMemset(block, 3, max_block));
  int* sink = nullptr;
  CHECK(cudaMalloc(&sink, 4096 * sizeof(int)));
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));

  auto graph_us = [&](const std::function<void()>& body) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    body();
    CHECK(cudaStreamEndCapture(stream, &graph));
    CHECK(cudaGraphInstantiate(&exec, graph, 0));
    std::vector<float> samples;
    for (int i = 0; i < 25; ++i) {
      CHECK(cudaEventRecord(start, stream));
      CHECK(cudaGraphLaunch(exec, stream));
      CHECK(cudaEventRecord(stop, stream));
      CHECK(cudaEventSynchronize(stop));
      float ms = 0;
      CHECK(cudaEventElapsedTime(&ms, start, stop));
      if (i >= 5) samples.push_back(ms * 1000.0f);
    }
    CHECK(cudaGraphExecDestroy(exec));
    CHECK(cudaGraphDestroy(graph));
    return median(samples);
  };
  auto copy = [&] {
    CHECK(cudaMemcpyAsync(stand_in + stand_in_half, stand_in, stand_in_half, cudaMemcpyDeviceToDevice, stream));
  };
  auto launch_read = [&](std::size_t bytes, bool persist, std::size_t carve) {
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(prop.multiProcessorCount * 2));
    config.blockDim = dim3(256);
    config.stream = stream;
    cudaLaunchAttribute attribute{};
    if (persist) {
      attribute.id = cudaLaunchAttributeAccessPolicyWindow;
      attribute.val.accessPolicyWindow.base_ptr = block;
      attribute.val.accessPolicyWindow.num_bytes = bytes;
      attribute.val.accessPolicyWindow.hitRatio = std::min(1.0f, static_cast<float>(carve) / bytes);
      attribute.val.accessPolicyWindow.hitProp = cudaAccessPropertyPersisting;
      attribute.val.accessPolicyWindow.missProp = cudaAccessPropertyStreaming;
      config.attrs = &attribute;
      config.numAttrs = 1;
    }
    CHECK(cudaLaunchKernelEx(&config, read_kernel, reinterpret_cast<const uint4*>(block), bytes / 16, sink));
  };

  const float stand_ins = graph_us([&] {
    for (int l = 0; l < layers; ++l) copy();
  });
  const float empty = graph_us([&] {
    for (int l = 0; l < layers; ++l) {
      copy();
      empty_kernel<<<1, 32, 0, stream>>>(sink);
    }
  });
  const float empty_alone = graph_us([&] {
    for (int l = 0; l < layers; ++l) empty_kernel<<<1, 32, 0, stream>>>(sink);
  });
  std::printf("stand-in (64 MiB copy) alone: %.2f us per layer\n", stand_ins / layers);
  std::printf("empty kernel after the stand-in: %.2f us per layer; back to back: %.2f us\n",
              (empty - stand_ins) / layers, empty_alone / layers);
  std::printf("%8s %10s %12s %10s %14s\n", "block", "cold", "persisting", "warm", "stand-in +x");
  for (int mib : blocks_mib) {
    const std::size_t bytes = std::size_t{static_cast<unsigned>(mib)} << 20;
    const float cold = graph_us([&] {
      for (int l = 0; l < layers; ++l) {
        copy();
        launch_read(bytes, false, 0);
      }
    });
    const float warm = graph_us([&] {
      for (int l = 0; l < layers; ++l) launch_read(bytes, false, 0);
    });
    const std::size_t carve = std::min<std::size_t>(bytes, static_cast<std::size_t>(prop.persistingL2CacheMaxSize));
    CHECK(cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize, carve));
    const float stand_ins_carved = graph_us([&] {
      for (int l = 0; l < layers; ++l) copy();
    });
    const float persisting = graph_us([&] {
      for (int l = 0; l < layers; ++l) {
        copy();
        launch_read(bytes, true, carve);
      }
    });
    CHECK(cudaCtxResetPersistingL2Cache());
    CHECK(cudaDeviceSetLimit(cudaLimitPersistingL2CacheSize, 0));
    std::printf("%5d MiB %8.2f us %10.2f us %8.2f us %12.1f%%\n", mib, (cold - stand_ins) / layers,
                (persisting - stand_ins_carved) / layers, warm / layers,
                100.0 * (stand_ins_carved - stand_ins) / stand_ins);
  }
  CHECK(cudaDeviceSynchronize());
  return 0;
}
