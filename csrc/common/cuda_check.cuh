// Turning CUDA runtime errors into core Status codes (the core never throws).
#pragma once
#include <cuda_runtime.h>

#include "common/status.h"

namespace diffkern {

// Status of the last launch on this thread (clears the sticky-free error state).
inline Status last_launch_status() {
  return cudaGetLastError() == cudaSuccess ? Status::ok : Status::cuda_error;
}

}  // namespace diffkern
