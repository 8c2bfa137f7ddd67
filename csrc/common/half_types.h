// 16-bit floating-point storage types for the core: float16 (IEEE binary16) and bfloat16.
// The core stores them and computes in float (math in fp32), so all it needs are exact
// conversions, written once here for the CPU and CUDA builds alike. On the device the
// bits are those of __half / __nv_bfloat16, so a kernel may reinterpret them.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/host_device.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace diffkern {

namespace half_detail {
DK_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
DK_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
}  // namespace half_detail

// bfloat16: the top 16 bits of a float; rounding to nearest, ties to even; NaN stays NaN.
struct BFloat16 {
  uint16_t bits;

  static DK_HOST_DEVICE BFloat16 from_float(float f) {
    const uint32_t u = half_detail::float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // One cvt.rn.bf16.f32 (round to nearest even, as below); NaN kept above so the bits
    // match the host's.
    return BFloat16{__bfloat16_as_ushort(__float2bfloat16_rn(f))};
#else
    const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
    return BFloat16{static_cast<uint16_t>((u + rounding) >> 16)};
#endif
  }
  DK_HOST_DEVICE float to_float() const { return half_detail::bits_float(uint32_t(bits) << 16); }
};

// float16 (1 sign, 5 exponent, 10 mantissa bits): round to nearest even, overflow to inf,
// subnormals kept, NaN stays NaN.
struct Float16 {
  uint16_t bits;

  static DK_HOST_DEVICE Float16 from_float(float f) {
    const uint32_t u = half_detail::float_bits(f);
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return Float16{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
#if defined(__CUDA_ARCH__)
    // One cvt.rn.f16.f32: IEEE round to nearest even with overflow to inf and subnormals,
    // the same bits as the integer path below (which costs ~20 instructions per element
    // and made the fused perturb kernels compute-bound).
    return Float16{__half_as_ushort(__float2half_rn(f))};
#else
    if (a >= 0x477ff000u) return Float16{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520: inf
    if (a >= 0x38800000u) {  // normal float16 (|f| >= 2^-14)
      const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
      return Float16{static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
    }
    if (a < 0x33000000u) return Float16{sign};  // below half the smallest subnormal: +-0
    // Subnormal: shift the mantissa (with its implicit bit) right, rounding to nearest even.
    const uint32_t exponent = a >> 23;
    const uint32_t mantissa = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // 14..24
    const uint32_t half_ulp = 1u << (shift - 1);
    uint32_t m = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u);
    if (rest > half_ulp || (rest == half_ulp && (m & 1u))) ++m;
    return Float16{static_cast<uint16_t>(sign | m)};
#endif
  }
  DK_HOST_DEVICE float to_float() const {
    const uint32_t sign = uint32_t(bits & 0x8000u) << 16;
    const uint32_t exponent = (bits >> 10) & 0x1fu;
    const uint32_t mantissa = bits & 0x3ffu;
    if (exponent == 0x1fu) return half_detail::bits_float(sign | 0x7f800000u | (mantissa << 13));
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(bits));  // exact, subnormals included
#else
    if (exponent != 0) return half_detail::bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    // Zero or subnormal: mantissa * 2^-24, exact in float.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
#endif
  }
};

static_assert(sizeof(BFloat16) == 2 && sizeof(Float16) == 2, "16-bit storage types");

// Load/store of any storage type as float math: float and double pass through.
DK_HOST_DEVICE float to_compute(Float16 h) { return h.to_float(); }
DK_HOST_DEVICE float to_compute(BFloat16 h) { return h.to_float(); }
DK_HOST_DEVICE float to_compute(float f) { return f; }
DK_HOST_DEVICE double to_compute(double d) { return d; }
template <class T>
DK_HOST_DEVICE T from_compute(float f) {
  if constexpr (sizeof(T) == 2) return T::from_float(f);
  else return static_cast<T>(f);
}

}  // namespace diffkern
