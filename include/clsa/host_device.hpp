// CLSA_HOST_DEVICE: the qualifier of the header-only helpers that host code and the CUDA kernels
// share (numeric.hpp, paged_view.hpp): __host__ __device__ under nvcc, plain inline elsewhere.
#pragma once

#if defined(__CUDACC__)
#define CLSA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CLSA_HOST_DEVICE inline
#endif
