// The random directions of the finite-difference family: z(seed, k, t, i), the value of
// element i of tensor t in direction k, as a pure function of those four numbers. Nothing
// else enters (not the list of tensors, the chunking, the thread or block, the device),
// so a tensor's direction is the same whatever it is perturbed with, on any device, on
// any rank.
//
// Exact definition (the contract; tests/test_fd_grad.py pins it):
//  - Elements are taken in groups of 4: element i is lane l = i % 4 of group j = i / 4.
//    One Philox-4x32-10 call per group (philox.cuh) with
//      counter = (j mod 2^32, j / 2^32, t, k),  key = (seed mod 2^32, seed / 2^32)
//    gives four 32-bit words r0..r3. (One call per group, not per element: the 20 integer
//    multiplies of a call would otherwise cost more than the memory traffic of perturb.)
//  - Gaussian: element l of the group takes word r_l: its sign bit gives z's sign and
//      t = 2^31 - (r_l & 0x7fffffff) in [1, 2^31] gives |z| = sqrt(2) erfcinv((t - 1/2) / 2^31),
//    the half-normal quantile at the middle of one of 2^31 equally likely cells, evaluated
//    from the tables of gaussian_table.h (exact values for t < 64, else a cubic per cell of
//    64 cells per binade of t; f, the position in the cell, keeps 23 bits) with float32
//    additions and multiplications, each rounded
//    once (no fused multiply-add: the device code uses the _rn intrinsics, which nvcc never
//    contracts), so the bits are the same on the CPU and the GPU. Within 4.8e-7 of the
//    exact quantile (scripts/gen_gaussian_table.py checks every cell); |z| <= 6.33.
//    (Why not Box-Muller: its log, sine and cosine in single-rounded float operations made
//    the fused perturb pass compute-bound at ~2.7x the memory time; bench/NOTES-zo.md.)
//  - Rademacher: z_lane = +1 if the top bit of r_lane is 0, else -1.
//  - Uniform on the sphere over the whole parameter set is Gaussian z divided by the
//    norm over every tensor (sum_sq gives the squared norm; the kernels take it by
//    pointer so no host round trip is needed).
#pragma once
#include <cstdint>

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
// The Gaussian tables (gaussian_table.h) in the layout the map reads: the 26 x 64 cubic
// cells, then the 64 far-tail values each stored as a cell (v, 0, 0, 0). A tail word then
// takes the same lookup and cubic as any other (0 * f + 0 ... + v is v exactly, f >= 0), so
// the map has no branch: the GPU issues a select instead of a divergent branch and its
// reconvergence (~3 instructions per element of ~45). One copy for the host, one in the
// device's constant memory; kernels copy it to shared memory (random lookups from constant
// memory would serialize across a warp) and pass that.
constexpr int kGaussianCellFloats = DK_FD_GAUSSIAN_LEVELS * DK_FD_GAUSSIAN_CELLS_PER_LEVEL * 4;
constexpr int kGaussianTailValues = 64;
constexpr uint32_t kGaussianTailCell = DK_FD_GAUSSIAN_LEVELS * DK_FD_GAUSSIAN_CELLS_PER_LEVEL;
constexpr int kGaussianTableFloats = kGaussianCellFloats + 4 * kGaussianTailValues;

// 16-byte aligned: a cell's 4 coefficients are one vector load on the GPU.
struct alignas(16) GaussianTable {
  float v[kGaussianTableFloats];
};
constexpr GaussianTable make_gaussian_table() {
  constexpr float cells[kGaussianCellFloats] = {DK_FD_GAUSSIAN_CELLS};
  constexpr float tail[kGaussianTailValues] = {DK_FD_GAUSSIAN_TAIL};
  GaussianTable t{};
  for (int i = 0; i < kGaussianCellFloats; ++i) t.v[i] = cells[i];
  for (int i = 0; i < kGaussianTailValues; ++i) t.v[kGaussianCellFloats + 4 * i] = tail[i];
  return t;
}
inline constexpr GaussianTable kGaussianTableHost = make_gaussian_table();
#if defined(__CUDACC__)
static __constant__ GaussianTable kGaussianTableDevice = make_gaussian_table();
#endif

// The table where the calling code runs: the host copy, or the device's constant copy.
DK_HOST_DEVICE const float* gaussian_table() {
#if defined(__CUDA_ARCH__)
  return kGaussianTableDevice.v;
#else
  return kGaussianTableHost.v;
#endif
}

DK_HOST_DEVICE int leading_zeros(uint32_t x) {  // x != 0
#if defined(__CUDA_ARCH__)
  return __clz(x);
#else
  return __builtin_clz(x);
#endif
}

// z of one 32-bit word (the map of the header comment), `table` a 16-byte aligned copy of
// gaussian_table(). Integer and bit operations except the cubic (no int-to-float
// conversion: it and the leading-zero count are the slow instructions here).
DK_HOST_DEVICE float gaussian_from_word(uint32_t w, const float* table) {
  const uint32_t t = 0x80000000u - (w & 0x7fffffffu);  // in [1, 2^31]
  // t's leading one moved to bit 31: the 6 cell bits are then bits 30..25 and the position
  // in the cell is bits 24..0, of which the top 23 become f's mantissa:
  // f = floor(position * 2^-2) * 2^-23 in [0, 1), exact (for levels up to e = 29 the dropped
  // bits are zero; at e = 30 one bit is dropped). For t < 64 (the far tail) the level is
  // meaningless and the cell is the tail value's (v, 0, 0, 0), whatever f is.
  const int lz = leading_zeros(t);
  const uint32_t n = t << lz;
  const uint32_t level = 25u - static_cast<uint32_t>(lz);  // e - 6, 0..25 when t >= 64
  const uint32_t cell = (n >> 25) & 63u;
  const uint32_t index = t < 64u ? kGaussianTailCell + t : 64u * level + cell;
  const float f = sub_rn(half_detail::bits_float(0x3f800000u | ((n >> 2) & 0x7fffffu)), 1.0f);
#if defined(__CUDA_ARCH__)
  const float4 c4 = reinterpret_cast<const float4*>(table)[index];
  const float c[4] = {c4.x, c4.y, c4.z, c4.w};
#else
  const float* c = table + 4 * index;
#endif
  const float a = add_rn(mul_rn(add_rn(mul_rn(add_rn(mul_rn(c[3], f), c[2]), f), c[1]), f), c[0]);
  // The sign bit of w becomes z's (a > 0 always).
  return half_detail::bits_float(half_detail::float_bits(a) | (w & 0x80000000u));
}

// The Philox words of group j of tensor t in direction k.
DK_HOST_DEVICE philox::U32x4 group_bits(uint64_t seed, uint32_t k, uint32_t t, uint64_t j) {
  const philox::U32x4 counter{{static_cast<uint32_t>(j), static_cast<uint32_t>(j >> 32), t, k}};
  return philox::philox4x32_10(counter, static_cast<uint32_t>(seed),
                               static_cast<uint32_t>(seed >> 32));
}

// The four values z of group j (elements 4j .. 4j + 3) of tensor t in direction k;
// `table`: gaussian_table() or a copy of it (read for the Gaussian only).
struct Float4 {
  float v[4];
};
DK_HOST_DEVICE Float4 group_directions(Distribution dist, uint64_t seed, uint32_t k, uint32_t t,
                                       uint64_t j, const float* table) {
  const philox::U32x4 r = group_bits(seed, k, t, j);
  Float4 z;
  if (dist == Distribution::rademacher) {
    for (int l = 0; l < 4; ++l) z.v[l] = (r.v[l] >> 31) ? -1.0f : 1.0f;
    return z;
  }
  for (int l = 0; l < 4; ++l) z.v[l] = gaussian_from_word(r.v[l], table);
  return z;
}

}  // namespace fd
}  // namespace diffkern
