// Launch sizing shared by the CUDA kernels (plain host arithmetic: no CUDA needed here).
#pragma once
#include <algorithm>
#include <cstdint>

namespace diffkern {

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over `n` items, `per_block` items per block per pass:
// enough to fill every SM `waves` times, never more than the work needs, at least 1.
inline unsigned grid_stride_blocks(int64_t n, int64_t per_block, int sm_count, int waves = 32) {
  const int64_t wanted = ceil_div(n, per_block);
  const int64_t cap = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * waves;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(wanted, cap)));
}

// Blocks for one item group per block (no grid-stride loop); the caller keeps the count
// under the grid limit (2^31 - 1 in x).
inline unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(ceil_div(items, per_block));
}

}  // namespace diffkern
