// Built instead of fd_grad_cuda.cu when the library is compiled without CUDA: the symbols
// must exist so the bindings link, and a status (not a crash) says this build has no GPU.
#include "fd_grad/fd_grad.h"

namespace diffkern {

Status fd_perturb_cuda(const int64_t*, const int64_t*, int64_t, int64_t, uint64_t, uint32_t, float,
                       fd::Distribution, const double*, void*, FdRowsIn) {
  return Status::unsupported;
}
Status fd_update_cuda(const int64_t*, int64_t, int64_t, const FdTerm*, int, float, float,
                      fd::Distribution, const double*, int64_t, void*, FdRowsIn) {
  return Status::unsupported;
}
Status fd_directions_cuda(uint64_t, uint32_t, uint32_t, int64_t, fd::Distribution, float*,
                          void*) {
  return Status::unsupported;
}
Status fd_sum_sq_cuda(const int64_t*, int64_t, int64_t, uint64_t, uint32_t, fd::Distribution,
                      double*, void*, FdRowsIn) {
  return Status::unsupported;
}

}  // namespace diffkern
