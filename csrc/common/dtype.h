// Floating-point element types the core kernels accept, and a dispatch helper
// that turns the run-time tag into a compile-time type.
#pragma once

namespace diffkern {

enum class DType : int { float32 = 0, float64 = 1 };

// Calls f(T{}) with T = float or double. Returns whatever f returns.
template <class F>
auto dispatch_float(DType dtype, F&& f) {
  if (dtype == DType::float64) return f(double{});
  return f(float{});
}

}  // namespace diffkern
