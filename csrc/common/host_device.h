// Marks functions usable from both the CPU build (g++) and CUDA kernels (nvcc).
#pragma once

#if defined(__CUDACC__)
#define DK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DK_HOST_DEVICE inline
#endif
