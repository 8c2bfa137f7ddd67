// The per-(dtype, head dim) launchers of the CUDA kernels, defined in pa_fwd.cuh /
// pa_bwd.cuh and instantiated once each in the generated files pa_inst_*.cu (one
// translation unit per instantiation keeps compile times parallel and short).
#pragma once
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "common/half_types.h"
#include "prefix_attention/prefix_attention.h"

namespace diffkern {
namespace pa {

// Backward workspace: delta (Hq x T float32), then, for the atomic dQ path only, the
// (T, Hq, D) float32 dQ accumulator, then, when prefix key tiles are split (C > 1 chunks,
// pa_bwd_split.h), the float32 partial dK/dV of every chunk; each part 256-byte aligned.
inline int64_t align256(int64_t b) { return (b + 255) / 256 * 256; }
inline int64_t delta_bytes(const PrefixAttentionShape& s) {
  return align256(s.total_tokens * s.num_heads_q * 4);
}
inline int64_t dq_accum_bytes(const PrefixAttentionShape& s) {
  return align256(s.total_tokens * s.num_heads_q * s.head_dim * 4);
}

// dQ by the query-centric kernel (no atomics) also in the non-deterministic mode when this
// many query heads or more share a KV head: their float32 atomic adds into the same dQ rows
// then cost more than recomputing. Measured on an H200 at (4096, 512, 8), Hq = 32, D = 128
// (bench/NOTES-attention.md): 32 per KV head 11.9 ms with the kernel against 14.5 ms with
// atomics, 16 equal (7.59 / 7.62 ms), 8 atomics faster (5.57 / 6.31 ms).
constexpr int kDqKernelMinHeadsPerKv = 32;
inline bool dq_by_kernel(const PrefixAttentionShape& s, bool deterministic) {
  return deterministic || s.num_heads_q >= kDqKernelMinHeadsPerKv * s.num_heads_kv;
}

// Keys per block of the backward's KV kernel (pa_bwd_kv.cuh): 128 (8 warps, 1 block per SM)
// or 64 (4 warps, 2 blocks per SM). The warps per SM are the same, but 128 loads each Q/dO
// tile and reduces each dQ row into the workspace once per 128 keys instead of per 64; 64
// gives twice the blocks. 128 for head dim 128 while its grid, ceil(T / 128) x Hkv blocks,
// fills at least half the SMs. Measured on an H200 at (4096, 512, 8), Hq = 32, D = 128
// (bench/NOTES-attention.md, "128-key backward"), backward ms with 64 / 128 keys: Hkv = 32
// 4.88 / 4.51 (one run); forward+backward through dk.prefix_attention (one run): Hkv = 2
// (128 blocks of 128 keys) 9.22 / 8.83, Hkv = 1 (64 blocks on 132 SMs) 13.03 / 15.04. DK_PA_BWD_KEYS=64 or 128 overrides the rule (benchmarks and tests; read at every
// call by the launcher and the workspace sizing alike, so they agree). `sms` <= 0: unknown.
inline int bwd_kv_key_tile(const PrefixAttentionShape& s, int sms) {
  if (const char* e = std::getenv("DK_PA_BWD_KEYS")) {
    if (std::strcmp(e, "64") == 0) return 64;
    if (std::strcmp(e, "128") == 0) return 128;
  }
  if (s.head_dim != 128) return 64;
  const int64_t blocks = (s.total_tokens + 127) / 128 * s.num_heads_kv;
  return 2 * blocks >= sms ? 128 : 64;
}

// The kernels on Hopper's warpgroup MMA (pa_fwd_sm90.cuh, pa_bwd_kv_sm90.cuh) instead of
// mma.sync: head dim 128 on a compute capability 9.0 device, in builds that compiled
// sm_90a (DIFFKERN_PA_SM90A, set by CMake when CMAKE_CUDA_ARCHITECTURES lists 90a; wgmma
// has no sm_90 or PTX form). The switch DK_PA_FWD_SM90 / DK_PA_BWD_SM90 = 0 or 1 forces
// either path off or on (A/B benchmarks and tests); unset, the default applies. The
// backward's Hopper KV kernel also needs 128-key blocks (bwd_kv_key_tile); its other passes
// are unchanged.
//
// Defaults: both Hopper kernels are on; they passed the H200's CUDA tests, GPU harness,
// compute-sanitizer and soak (bench/NOTES-attention.md).
bool device_is_sm90();
inline bool on_sm90(const PrefixAttentionShape& s, const char* switch_name, bool by_default) {
#if defined(DIFFKERN_PA_SM90A) && DIFFKERN_PA_SM90A
  bool on = by_default;
  if (const char* e = std::getenv(switch_name)) {
    if (std::strcmp(e, "0") == 0) on = false;
    if (std::strcmp(e, "1") == 0) on = true;
  }
  return on && s.head_dim == 128 && device_is_sm90();
#else
  (void)s;
  (void)switch_name;
  (void)by_default;
  return false;
#endif
}
inline bool fwd_on_sm90(const PrefixAttentionShape& s) {
  return on_sm90(s, "DK_PA_FWD_SM90", true);
}
inline bool bwd_on_sm90(const PrefixAttentionShape& s) {
  return on_sm90(s, "DK_PA_BWD_SM90", true);
}

template <class T, int D>
Status launch_fwd(const PrefixAttentionForward& p, cudaStream_t stream);
template <class T>
Status launch_fwd_sm90(const PrefixAttentionForward& p, cudaStream_t stream);
template <class T, int D>
Status launch_bwd(const PrefixAttentionBackward& p, cudaStream_t stream);
// The current device's SM count, 0 when it cannot be queried.
int device_sm_count();
// Blocks of the backward's KV kernel with `key_tile` keys that run at once on the current
// device, of `sms` SMs (device_sm_count): SMs x blocks per SM; 0 when unknown. Feeds the
// split rule.
template <class T, int D>
int64_t bwd_kv_resident_blocks(int key_tile, int sms);

}  // namespace pa
}  // namespace diffkern
