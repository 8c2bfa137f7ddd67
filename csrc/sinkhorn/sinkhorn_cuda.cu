// CUDA entry point of the Sinkhorn family. The control flow is the shared driver
// (sinkhorn_driver.h); the kernels are in cuda_sweep.cuh and cuda_cg.cuh, the backend
// that launches them in cuda_backend.cuh. Each primitive is a kernel. Rows (of C or of C^T) are handled by
// one warp each: lanes read consecutive entries (coalesced), then merge by shuffles.
// Per-batch sums are block reductions in a fixed order, so results are deterministic.
#include <cuda_runtime.h>

#include <cstdint>

#include "sinkhorn/cuda_backend.cuh"
#include "sinkhorn/sinkhorn.h"
#include "sinkhorn/sinkhorn_driver.h"
#include "sinkhorn/workspace.h"

namespace diffkern {

Status sinkhorn_solve_cuda(const SinkhornProblem& p, const SinkhornOptions& o,
                           const SinkhornState& s, void* workspace, void* stream) {
  using namespace sinkhorn_detail;
  if (p.batch < 1 || p.n < 1 || p.m < 1 || !(p.eps > 0) || !p.cost || !p.cost_t || !p.a ||
      !p.b || !s.f || !s.g || !workspace)
    return Status::invalid_argument;
  if (p.n > INT32_MAX || p.m > INT32_MAX || p.batch > INT32_MAX) return Status::invalid_argument;
  Workspace w;
  layout_workspace(p, o, workspace, &w);
  CudaBackend bk(p.batch, p.n, p.m, p.eps, static_cast<cudaStream_t>(stream));
  return dispatch_float(p.cost_dtype, [&](auto t) {
    using T = decltype(t);
    Driver<CudaBackend, T> driver(bk, p, o, s, w);
    return driver.run();
  });
}

}  // namespace diffkern
