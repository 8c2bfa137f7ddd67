// Built instead of sinkhorn_cuda.cu without CUDA: the symbol exists so the bindings link,
// and a status (not a crash) tells Python this build cannot solve on a GPU.
#include "sinkhorn/sinkhorn.h"

namespace diffkern {

Status sinkhorn_solve_cuda(const SinkhornProblem&, const SinkhornOptions&, const SinkhornState&,
                           void*, void*) {
  return Status::unsupported;
}

}  // namespace diffkern
