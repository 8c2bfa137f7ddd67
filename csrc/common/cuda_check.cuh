// Turning CUDA runtime errors into core Status values (the core never throws). The
// status keeps the cudaError_t so the bindings can show cudaGetErrorString.
#pragma once
#include <cuda_runtime.h>

#include "common/status.h"

namespace diffkern {

inline Status cuda_status(cudaError_t e) {
  return e == cudaSuccess ? Status::ok : Status::cuda(static_cast<int>(e));
}

// Status of the last launch on this thread. cudaGetLastError also clears a non-sticky
// error, so the next entry point starts clean.
inline Status last_launch_status() { return cuda_status(cudaGetLastError()); }

}  // namespace diffkern

// Returns from the enclosing function (which returns Status) when a CUDA call fails.
#define DK_CUDA_TRY(call)                                              \
  do {                                                                 \
    const ::diffkern::Status dk_status_ = ::diffkern::cuda_status(call); \
    if (!dk_status_.is_ok()) return dk_status_;                        \
  } while (0)
