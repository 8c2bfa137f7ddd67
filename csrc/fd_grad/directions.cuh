// The random directions of the finite-difference family: z(seed, k, t, i), the value of
// element i of tensor t in direction k, as a pure function of those four numbers. Nothing
// else enters (not the list of tensors, the chunking, the thread or block, the device),
// so a tensor's direction is the same whatever it is perturbed with, on any device, on
// any rank.
//
// Exact definition (the contract; tests/test_fd_grad.py pins it):
//  - Elements are taken in groups of 8: element i is lane l = i % 8 of group j = i / 8.
//    One Philox-4x32-10 call per group (philox.cuh) with
//      counter = (j mod 2^32, j / 2^32, t, k),  key = (seed mod 2^32, seed / 2^32)
//    gives four 32-bit words r0..r3; lane l takes the 16 bits
//      h_l = (r_{l / 2} >> (16 (l % 2))) & 0xffff
//    (the low half of r0 for lane 0, its high half for lane 1, ...). Why 16 bits, 8 lanes a
//    call: the generator's 20 integer multiplies per call, not the memory traffic, bounded
//    the fused passes; halving the calls per element and the map below took an fp16
//    perturb pass on an H200 from 52% to 86% of the copy bandwidth (bench/NOTES-zo.md).
//  - Gaussian: bit 15 of h is z's sign (set: negative) and the 15 bits m = h & 0x7fff give
//    |z| = v_m, the float16 entry m of gaussian_table.h: the root mean square of N(0, 1)'s
//    |Z| over the m-th of 2^15 cells of equal probability (scripts/gen_gaussian_table.py).
//    So z takes 2^16 equally likely values, E[z^2] = 1 up to the float16 rounding of the
//    entries (1 + 5.7e-7), E[z^4] = 2.9999, |z| <= 4.39: a 16-bit quantization of N(0, 1)
//    whose second moment is exact, which is what SPSA / RGE / CGE estimates need
//    (E[z z^T] = I). The float16 value converts to float32 exactly, so the CPU and the GPU
//    give the same bits by construction.
//  - Rademacher: z = +1 if bit 15 of h is 0, else -1.
//  - Uniform on the sphere over the whole parameter set is Gaussian z divided by the
//    norm over every tensor (sum_sq gives the squared norm; the kernels take it by
//    pointer so no host round trip is needed).
// (Until 2026-12 the contract was 4 elements per call, 32 bits each, and an exact-quantile
// map of 2^31 cells: directions from before then are not reproduced.)
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

#include "common/half_types.h"
#include "common/host_device.h"
#include "fd_grad/gaussian_table.h"
#include "fd_grad/philox.cuh"

namespace diffkern {
namespace fd {

enum class Distribution : int { gaussian = 0, rademacher = 1 };
constexpr int kNumDistributions = 2;

// Float arithmetic rounded once per operation, never contracted into an FMA. The host
// side relies on the C++ build not contracting either: CMake compiles ISO C++17
// (-std=c++17, where GCC's default is -ffp-contract=off) and x86-64's baseline has no FMA.
DK_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
DK_HOST_DEVICE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
DK_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// Elements per Philox call (one 16-byte unit of 16-bit storage, two of float32).
constexpr int kGroupElems = 8;
constexpr int kGaussianCells = DK_FD_GAUSSIAN_CELLS;

// The table, as float16 bit patterns: 64 KB. One copy for the host and one in device global
// memory; the CUDA kernels copy it to shared memory (per-lane random lookups: constant
// memory would serialize them, and 64 KB is all of it), as it is or signed (below), and
// pass that.
struct alignas(16) GaussianTable {
  uint16_t bits[kGaussianCells];
};
inline constexpr GaussianTable kGaussianTableHost = {{DK_FD_GAUSSIAN_HALF_BITS}};
#if defined(__CUDACC__)
static __device__ const GaussianTable kGaussianTableDevice = {{DK_FD_GAUSSIAN_HALF_BITS}};
#endif

// The table where the calling code runs: the host copy, or the device's global copy.
DK_HOST_DEVICE const uint16_t* gaussian_table() {
#if defined(__CUDA_ARCH__)
  return kGaussianTableDevice.bits;
#else
  return kGaussianTableHost.bits;
#endif
}

// The 16 bits of lane l (0..7) of a group's Philox words.
DK_HOST_DEVICE uint32_t lane_bits(const philox::U32x4& r, int l) {
  return (r.v[l >> 1] >> (16 * (l & 1))) & 0xffffu;
}

// z of one lane's 16 bits h (the map of the header comment); `table`: gaussian_table() or a
// copy of it. The float16 -> float32 conversion is exact (no NaN in the table).
DK_HOST_DEVICE float gaussian_from_bits(uint32_t h, const uint16_t* table) {
  const uint16_t magnitude = table[h & 0x7fffu];
#if defined(__CUDA_ARCH__)
  const float a = __half2float(__ushort_as_half(magnitude));
#else
  const float a = Float16{magnitude}.to_float();
#endif
  return half_detail::bits_float(half_detail::float_bits(a) | ((h & 0x8000u) << 16));
}

// The table with the sign folded in: 2^16 float16 entries (128 KB), entry h = v_{h & 0x7fff}
// with bit 15 of h as its sign bit, so z of a lane's 16 bits is one lookup and one
// conversion (no mask, no OR). The same z as gaussian_from_bits by construction: float16's
// sign bit is bit 15 and both conversions are exact. Built from gaussian_table() by the
// CUDA kernels in shared memory (fd_grad_cuda.cu), where the device has room for it.
struct SignedGaussianTable {
  const uint16_t* bits;  // 2^16 entries
};
constexpr int kSignedGaussianCells = 2 * kGaussianCells;

DK_HOST_DEVICE float gaussian_from_bits(uint32_t h, SignedGaussianTable table) {
  const uint16_t z = table.bits[h];
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(z));
#else
  return Float16{z}.to_float();
#endif
}

DK_HOST_DEVICE float rademacher_from_bits(uint32_t h) { return (h & 0x8000u) ? -1.0f : 1.0f; }

// The Philox words of group j of tensor t in direction k.
DK_HOST_DEVICE philox::U32x4 group_bits(uint64_t seed, uint32_t k, uint32_t t, uint64_t j) {
  const philox::U32x4 counter{{static_cast<uint32_t>(j), static_cast<uint32_t>(j >> 32), t, k}};
  return philox::philox4x32_10(counter, static_cast<uint32_t>(seed),
                               static_cast<uint32_t>(seed >> 32));
}

// The 8 values z of group j (elements 8j .. 8j + 7) of tensor t in direction k;
// `table`: gaussian_table() or a copy of it, or a SignedGaussianTable (read for the
// Gaussian only).
struct Float8 {
  float v[kGroupElems];
};
template <class Table>
DK_HOST_DEVICE Float8 group_directions(Distribution dist, uint64_t seed, uint32_t k, uint32_t t,
                                       uint64_t j, const Table& table) {
  const philox::U32x4 r = group_bits(seed, k, t, j);
  Float8 z;
  if (dist == Distribution::rademacher) {
    for (int l = 0; l < kGroupElems; ++l) z.v[l] = rademacher_from_bits(lane_bits(r, l));
    return z;
  }
  for (int l = 0; l < kGroupElems; ++l) z.v[l] = gaussian_from_bits(lane_bits(r, l), table);
  return z;
}

}  // namespace fd
}  // namespace diffkern
