// Built instead of log_bessel_cuda.cu when the library is compiled without CUDA
// (DIFFKERN_CUDA=OFF or no nvcc): the symbol must exist so the bindings link, and a
// status (not a crash) tells Python that this build cannot run on a GPU.
#include "log_bessel/log_bessel.h"

namespace diffkern {

Status log_bessel_cuda(LogBesselOp, DType, const void*, const void*, void*,
                       const BinaryBroadcast&, void*) {
  return Status::unsupported;
}

}  // namespace diffkern
