// The OpenMP thread count of a CPU entry point: every entry point takes `num_threads`
// (the Python side passes torch.get_num_threads(), so torch.set_num_threads applies);
// <= 0 means OpenMP's default. Builds without OpenMP run on one thread.
#pragma once

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace diffkern {

inline int resolve_num_threads(int requested) {
#if defined(_OPENMP)
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

}  // namespace diffkern
