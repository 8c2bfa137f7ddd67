// The only CUDA runtime calls the bindings make: count devices and select the arrays'
// device around a core call. Without CUDA in the build they compile to no-ops, and with it
// they never fail hard on a machine without a driver (importing must always work).
#pragma once

#if DIFFKERN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include "common/status.h"

namespace diffkern {
namespace bindings {

// Number of visible CUDA devices; 0 without CUDA support, driver or GPU.
inline int cuda_device_count() {
#if DIFFKERN_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the (non-sticky) error so later calls start clean
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

// Makes `device` current for the scope and restores the caller's device afterwards, so a
// call on cuda:1 does not silently move later work of the thread off cuda:0.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device) {
#if DIFFKERN_WITH_CUDA
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device) {
      const cudaError_t e = cudaSetDevice(device);
      if (e != cudaSuccess) status_ = Status::cuda(static_cast<int>(e));
    }
#else
    (void)device;
    status_ = Status::unsupported;
#endif
  }
  ~CudaDeviceGuard() {
#if DIFFKERN_WITH_CUDA
    int current = -1;
    if (previous_ >= 0 && cudaGetDevice(&current) == cudaSuccess && current != previous_) {
      (void)cudaSetDevice(previous_);
    }
#endif
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;
  bool ok() const { return status_.is_ok(); }
  Status status() const { return status_; }

 private:
  int previous_ = -1;
  Status status_ = Status::ok;
};

}  // namespace bindings
}  // namespace diffkern
