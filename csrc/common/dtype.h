// Element types the core accepts, and the dispatch that turns the run-time tag into a
// compile-time type. A kernel family states which types it supports; anything else is
// refused with Status::invalid_argument (never silently read as another type).
#pragma once
#include <type_traits>

#include "common/half_types.h"
#include "common/status.h"

namespace diffkern {

enum class DType : int { float32 = 0, float64 = 1, float16 = 2, bfloat16 = 3 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::float32: return "float32";
    case DType::float64: return "float64";
    case DType::float16: return "float16";
    case DType::bfloat16: return "bfloat16";
  }
  return "unknown dtype";
}

template <class T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::float32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::float64; };
template <> struct dtype_of<Float16> { static constexpr DType value = DType::float16; };
template <> struct dtype_of<BFloat16> { static constexpr DType value = DType::bfloat16; };

// Calls f(T{}) for the T in Ts whose tag is `dtype` and returns its Status;
// Status::invalid_argument when `dtype` is not one of Ts.
template <class... Ts, class F>
Status dispatch_dtype(DType dtype, F&& f) {
  Status result = Status::invalid_argument;
  const bool found = ((dtype == dtype_of<Ts>::value ? (result = f(Ts{}), true) : false) || ...);
  (void)found;
  return result;
}

// The common cases: float/double kernels, and kernels that also store 16-bit floats.
template <class F>
Status dispatch_float(DType dtype, F&& f) {
  return dispatch_dtype<float, double>(dtype, static_cast<F&&>(f));
}
template <class F>
Status dispatch_float_and_half(DType dtype, F&& f) {
  return dispatch_dtype<float, double, Float16, BFloat16>(dtype, static_cast<F&&>(f));
}

}  // namespace diffkern
