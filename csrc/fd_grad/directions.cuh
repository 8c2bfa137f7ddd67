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
//  - Gaussian: Box-Muller on the pairs (r0, r1) and (r2, r3):
//      u = (2 (r_a >> 9) + 1) * 2^-24  in (0, 1),   v = (r_b >> 8) * 2^-24  in [0, 1),
//      R = sqrt(-2 log u),  z_lane(a) = R cos(2 pi v),  z_lane(b) = R sin(2 pi v).
//    log, cos and sin are evaluated here with float32 additions, multiplications, one
//    division and one square root, each rounded once (no fused multiply-add: the device
//    code uses the _rn intrinsics, which nvcc never contracts), so the bits of z are the
//    same on the CPU and the GPU, independent of either libm. (u >= 2^-24 bounds |z| by
//    sqrt(48 ln 2) = 5.77: the tail beyond has probability 8e-9.)
//  - Rademacher: z_lane = +1 if the top bit of r_lane is 0, else -1.
//  - Uniform on the sphere over the whole parameter set is Gaussian z divided by the
//    norm over every tensor (sum_sq gives the squared norm; the kernels take it by
//    pointer so no host round trip is needed).
#pragma once
#include <cstdint>

#include "common/half_types.h"
#include "common/host_device.h"
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
DK_HOST_DEVICE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
DK_HOST_DEVICE float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);  // IEEE correctly rounded (sqrtss)
#endif
}

// Natural log of u in [2^-25, 1): u = 2^e * f with f in [sqrt(1/2), sqrt(2)), then
// log f = 2 atanh(s), s = (f - 1) / (f + 1), |s| <= 0.172, by its odd series up to s^9
// (truncation ~2e-9 relative). About 1 ulp; what matters here is that it is deterministic.
DK_HOST_DEVICE float log_unit(float u) {
  const uint32_t bits = half_detail::float_bits(u);
  int e = static_cast<int>(bits >> 23) - 127;
  uint32_t mant = (bits & 0x7fffffu) | 0x3f800000u;  // f in [1, 2)
  if (mant > 0x3fb504f3u) {                         // f > sqrt(2): use f / 2, e + 1
    mant -= 0x00800000u;
    ++e;
  }
  const float f = half_detail::bits_float(mant);
  const float s = div_rn(sub_rn(f, 1.0f), add_rn(f, 1.0f));
  const float s2 = mul_rn(s, s);
  float p = 1.0f / 9.0f;
  p = add_rn(mul_rn(p, s2), 1.0f / 7.0f);
  p = add_rn(mul_rn(p, s2), 1.0f / 5.0f);
  p = add_rn(mul_rn(p, s2), 1.0f / 3.0f);
  const float log_f = add_rn(mul_rn(mul_rn(2.0f, s), mul_rn(p, s2)), mul_rn(2.0f, s));
  // ln 2 as a high part with few bits (e * hi exact for |e| <= 2^8) plus the rest.
  const float fe = static_cast<float>(e);
  return add_rn(mul_rn(fe, 0.693145751953125f), add_rn(mul_rn(fe, 1.4286068203094172e-06f), log_f));
}

// cos and sin of 2 pi v for v = m * 2^-24, m a 24-bit integer: the quadrant is taken from
// m's bits exactly, the remaining |x| <= pi/4 by Taylor polynomials (degree 10 / 9,
// truncation < 2e-9).
DK_HOST_DEVICE void cos_sin_turns(uint32_t m, float& c_out, float& s_out) {
  const uint32_t a = m + (1u << 21);        // shift by 1/8 turn: nearest quarter
  const uint32_t q = (a >> 22) & 3u;        // quadrant
  const int32_t rem = static_cast<int32_t>(a & 0x3fffffu) - (1 << 21);  // in [-2^21, 2^21)
  const float x = mul_rn(static_cast<float>(rem), 6.2831853071795865f / 16777216.0f);  // 2 pi / 2^24
  const float x2 = mul_rn(x, x);
  float sp = 1.0f / 362880.0f;
  sp = add_rn(mul_rn(sp, x2), -1.0f / 5040.0f);
  sp = add_rn(mul_rn(sp, x2), 1.0f / 120.0f);
  sp = add_rn(mul_rn(sp, x2), -1.0f / 6.0f);
  const float s = add_rn(mul_rn(mul_rn(sp, x2), x), x);
  float cp = -1.0f / 3628800.0f;
  cp = add_rn(mul_rn(cp, x2), 1.0f / 40320.0f);
  cp = add_rn(mul_rn(cp, x2), -1.0f / 720.0f);
  cp = add_rn(mul_rn(cp, x2), 1.0f / 24.0f);
  cp = add_rn(mul_rn(cp, x2), -0.5f);
  const float c = add_rn(mul_rn(cp, x2), 1.0f);
  switch (q) {
    case 0: c_out = c; s_out = s; break;
    case 1: c_out = -s; s_out = c; break;
    case 2: c_out = -c; s_out = -s; break;
    default: c_out = s; s_out = -c; break;
  }
}

// The Philox words of group j of tensor t in direction k.
DK_HOST_DEVICE philox::U32x4 group_bits(uint64_t seed, uint32_t k, uint32_t t, uint64_t j) {
  const philox::U32x4 counter{{static_cast<uint32_t>(j), static_cast<uint32_t>(j >> 32), t, k}};
  return philox::philox4x32_10(counter, static_cast<uint32_t>(seed),
                               static_cast<uint32_t>(seed >> 32));
}

// The four values z of group j (elements 4j .. 4j + 3) of tensor t in direction k.
struct Float4 {
  float v[4];
};
DK_HOST_DEVICE Float4 group_directions(Distribution dist, uint64_t seed, uint32_t k, uint32_t t,
                                       uint64_t j) {
  const philox::U32x4 r = group_bits(seed, k, t, j);
  Float4 z;
  if (dist == Distribution::rademacher) {
    for (int l = 0; l < 4; ++l) z.v[l] = (r.v[l] >> 31) ? -1.0f : 1.0f;
    return z;
  }
  for (int p = 0; p < 2; ++p) {
    // (2m + 1) * 2^-24 with m = r >> 9: exact, in [2^-24, 1 - 2^-24], never 0 or 1.
    const float u = static_cast<float>(((r.v[2 * p] >> 9) << 1) | 1u) * 5.9604644775390625e-08f;
    const float radius = sqrt_rn(mul_rn(-2.0f, log_unit(u)));
    float c, s;
    cos_sin_turns(r.v[2 * p + 1] >> 8, c, s);
    z.v[2 * p] = mul_rn(radius, c);
    z.v[2 * p + 1] = mul_rn(radius, s);
  }
  return z;
}

}  // namespace fd
}  // namespace diffkern
