// The adapter every family's bindings use to call the core once its arrays are checked:
//  - refuses CUDA arrays when this build has no CUDA kernels (with how to rebuild);
//  - releases the GIL for the call (other Python threads run meanwhile);
//  - makes the arrays' CUDA device current for the call, and restores the caller's;
//  - passes the caller's stream (cudaStream_t as an integer; 0 = legacy default stream)
//    or the CPU thread count;
//  - turns a bad Status into a Python exception naming the call, the device and, for
//    CUDA failures, the CUDA runtime's own error name and text.
#pragma once
#include <nanobind/nanobind.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings/array_checks.h"
#include "bindings/cuda_device.h"
#include "common/status.h"

#if DIFFKERN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace diffkern {
namespace bindings {

inline std::string describe_status(Status s) {
  std::string text = status_message(s);
#if DIFFKERN_WITH_CUDA
  if (s.code() == Status::Code::cuda_error && s.cuda_error() != 0) {
    const auto e = static_cast<cudaError_t>(s.cuda_error());
    text += std::string(" ") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e);
  }
#endif
  return text;
}

[[noreturn]] inline void throw_status(Status s, const std::string& what, const ArrayInfo& where) {
  const std::string msg = what + " on " + describe_device(where) + " failed: " + describe_status(s);
  // The bindings check every argument before the call, so a core refusal is our bug.
  if (s.code() == Status::Code::invalid_argument)
    throw std::runtime_error(msg + " (the core refused arguments the bindings accepted: "
                                   "please report this)");
  throw std::runtime_error(msg);
}

// Work below which a CPU call keeps the GIL: releasing and re-taking it costs ~0.2 us,
// more than a few hundred elementwise evaluations (the per-call overhead of small calls
// is a target). `cpu_work` is the caller's estimate in elements.
constexpr int64_t kReleaseGilWork = 4096;

// cpu(int num_threads) -> Status and cuda(void* stream) -> Status run the core; `where` is
// an array whose device decides which one (every array was checked to be on its device).
// what(): the call's name for messages, built only when something fails.
template <class What, class Cpu, class Cuda>
void call_core(What&& what, const ArrayInfo& where, int num_threads, uintptr_t stream,
               int64_t cpu_work, Cpu&& cpu, Cuda&& cuda) {
  Status status = Status::ok;
  if (where.device_type == kDeviceCuda) {
    if (!DIFFKERN_WITH_CUDA) {
      throw std::runtime_error(std::string(what()) + ": got " + describe_device(where) +
                               " arrays, but this diffkern build has no CUDA kernels (rebuild "
                               "with nvcc available or -Ccmake.define.DIFFKERN_CUDA=ON)");
    }
    // Released: a launch can block while the GPU's launch queue is full.
    nb::gil_scoped_release release;
    CudaDeviceGuard guard(where.device_id);
    status = guard.ok() ? cuda(reinterpret_cast<void*>(stream)) : guard.status();
  } else if (cpu_work >= kReleaseGilWork) {
    nb::gil_scoped_release release;
    status = cpu(num_threads);
  } else {
    status = cpu(num_threads);
  }
  if (!status.is_ok()) throw_status(status, what(), where);
}

}  // namespace bindings
}  // namespace diffkern
