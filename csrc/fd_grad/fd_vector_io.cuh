// 16-byte loads and stores of storage elements as float, for the CUDA kernels' aligned
// fast path (fd_grad_cuda.cu). Device code only.
//
// Why: the element-exact conversions of half_types.h check every element for NaN (the
// float16 load keeps NaN payloads, the 16-bit stores write one canonical NaN), ~6 issued
// instructions per element each way on the GPU, as much as a fifth of the perturb kernel.
// Here a 16-byte unit is converted with the hardware's conversions, 2 elements per
// instruction where there is one, and a single check per unit (one FSETP per 2 floats)
// sends a unit holding a NaN to the exact element-wise conversions. Bits: the same as
// half_types.h's for every input, since the two agree on everything but NaN:
//  - float16 -> float: the hardware conversion is exact for every non-NaN value, and a
//    NaN in converts to a NaN (IEEE), which the check catches before any use.
//  - float -> float16 / bfloat16: cvt.rn.f16x2.f32 / cvt.rn.bf16x2.f32 round each lane as
//    the scalar cvt.rn that half_types.h uses for non-NaN values.
//  - bfloat16 -> float is a shift (exact for NaN too), float32 no conversion at all.
// Loads and stores are in the global state space (ld.global / st.global, default cache
// policy): the data pointers come from descriptors, so without the assumption the
// compiler cannot tell, and issues generic accesses.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/half_types.h"
#include "fd_grad/directions.cuh"

namespace diffkern {
namespace fd {

// Elements of storage type T in one 16-byte unit, and units in one group of kGroupElems
// (8) elements: 1 of 16-bit elements, 2 of float32.
template <class T>
constexpr int kUnitElems = 16 / static_cast<int>(sizeof(T));
template <class T>
constexpr int kGroupUnits = kGroupElems / kUnitElems<T>;

// (Not __ldca / __stwb: their volatile asm comes out as LDG.E.128.STRONG.SM.)
__device__ __forceinline__ uint4 load_unit(const uint4* p) {
  __builtin_assume(__isGlobal(p));
  return *p;
}
__device__ __forceinline__ void store_unit(uint4* p, uint4 v) {
  __builtin_assume(__isGlobal(p));
  *p = v;
}

__device__ __forceinline__ uint32_t unit_word(const uint4& u, int i) {
  return i == 0 ? u.x : i == 1 ? u.y : i == 2 ? u.z : u.w;  // i is a constant after unrolling
}
__device__ __forceinline__ void set_unit_word(uint4& u, int i, uint32_t w) {
  if (i == 0) u.x = w;
  else if (i == 1) u.y = w;
  else if (i == 2) u.z = w;
  else u.w = w;
}

template <int N>
__device__ __forceinline__ bool any_nan(const float (&x)[N]) {
  bool nan = false;
#pragma unroll
  for (int l = 0; l < N; l += 2) nan |= (x[l] != x[l]) | (x[l + 1] != x[l + 1]);
  return nan;
}

// The unit's elements as float, x[l] for element l (memory order).
template <class T>
__device__ __forceinline__ void unpack_unit(const uint4& u, float (&x)[kUnitElems<T>]) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = __uint_as_float(unit_word(u, i));
  } else if constexpr (std::is_same_v<T, BFloat16>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = unit_word(u, i);
      x[2 * i] = __uint_as_float(w << 16);
      x[2 * i + 1] = __uint_as_float(w & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = unit_word(u, i);
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
    if (any_nan(x)) {  // rare: redo the unit with the NaN-exact conversion
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t w = unit_word(u, i);
        x[2 * i] = Float16{static_cast<uint16_t>(w)}.to_float();
        x[2 * i + 1] = Float16{static_cast<uint16_t>(w >> 16)}.to_float();
      }
    }
  }
}

// x rounded once to T and packed into a unit (the inverse of unpack_unit's order).
template <class T>
__device__ __forceinline__ uint4 pack_unit(const float (&x)[kUnitElems<T>]) {
  uint4 u;
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) set_unit_word(u, i, __float_as_uint(x[i]));
  } else {
    if (any_nan(x)) {  // rare: the element-exact conversion writes half_types.h's NaN
#pragma unroll
      for (int i = 0; i < 4; ++i)
        set_unit_word(u, i, uint32_t(from_compute<T>(x[2 * i]).bits) |
                                (uint32_t(from_compute<T>(x[2 * i + 1]).bits) << 16));
      return u;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t w;
      if constexpr (std::is_same_v<T, BFloat16>) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(x[2 * i], x[2 * i + 1]);
        w = *reinterpret_cast<const uint32_t*>(&h);
      } else {
        const __half2 h = __floats2half2_rn(x[2 * i], x[2 * i + 1]);
        w = *reinterpret_cast<const uint32_t*>(&h);
      }
      set_unit_word(u, i, w);
    }
  }
  return u;
}

}  // namespace fd
}  // namespace diffkern
