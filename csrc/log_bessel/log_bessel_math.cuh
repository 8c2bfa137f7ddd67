// The math of the log-Bessel family, shared by the CPU and CUDA kernels.
//
// Branches (each documented in its own file under detail/):
//   log I_v(x):  power series     v < 20 and x <= 35, or x^2 <= 0.2 (v+1)   (series.cuh)
//                Debye expansion  v >= 20                                    (debye.cuh)
//                Hankel expansion x >= 20 and x >= v^2/2, if it converges    (hankel.cuh)
//                else Debye at v + n, then the backward recurrence down to v (shifted_order.cuh)
//   log K_v(x):  Debye expansion  |v| >= 20
//                Hankel expansion x >= 20 and x >= v^2/2, if it converges
//                K_mu, |mu| <= 1/2, by Temme's series (x <= 1) or the U-function
//                recurrence (x >= 1.5, double), then forward recurrence to v
//                (k_small_order.cuh; value and d/dx)
//                else (and for d/dv) the trapezoid rule on
//                int exp(-x cosh t) cosh(v t) dt                            (trapezoid.cuh)
// The branch limits were chosen by measuring the error against mpmath references
// (bench/NOTES-log_bessel.md). Special values follow SciPy: NaN in or x < 0 gives NaN,
// and so does v = +-inf with x = inf (the limit depends on the path: SciPy's iv, kv
// give NaN there too).
//
// Second derivatives in x (d/dx and d2/dx2 of the ratio, d2/dx2 of the logs) come from
// each branch's own sums (d2/dx2 of the ratio: detail/ratio_dx2.cuh), never from the
// Bessel equation's 1 + v^2/x^2 - D/x - D^2, which cancels for small x (~v^2/x^2 against
// D^2), for large x (~1 against D^2) and is NaN below x ~ 1e-154.
// They are computed in double also for float inputs (they serve autograd's double
// backward, where the small-order K branches would lose ~x^2 ulps of float).
#pragma once
#include <cmath>

#include "common/host_device.h"
#include "log_bessel/detail/debye.cuh"
#include "log_bessel/detail/hankel.cuh"
#include "log_bessel/detail/numeric.cuh"
#include "log_bessel/detail/ratio_dx2.cuh"
#include "log_bessel/detail/result.cuh"
#include "log_bessel/detail/series.cuh"
#include "log_bessel/detail/shifted_order.cuh"
#include "log_bessel/detail/k_small_order.cuh"
#include "log_bessel/detail/trapezoid.cuh"
#include "log_bessel/log_bessel.h"

namespace diffkern {
namespace log_bessel {

template <class T>
DK_HOST_DEVICE LogBesselValue<T> filled(T value, T dx, T dv, T ratio, T dx2 = quiet_nan<T>(),
                                        T ratio_dx = quiet_nan<T>()) {
  LogBesselValue<T> r;
  r.log_value = value;
  r.dlog_dx = dx;
  r.dlog_dv = dv;
  r.ratio = ratio;
  r.d2log_dx2 = dx2;
  r.ratio_dx = ratio_dx;
  return r;
}

template <class T>
DK_HOST_DEVICE LogBesselValue<T> debye_for(T v, T x, bool is_i, Want want) {
  if (want.dx2) return log_bessel_debye<T, 2>(v, x, is_i, want).value;
  return want.dx || want.dv ? log_bessel_debye<T, 1>(v, x, is_i, want).value
                            : log_bessel_debye<T, 0>(v, x, is_i, want).value;
}

// log I_v(x), and what `want` asks besides, for v >= 0 (callers map negative integer
// orders to -v: I_{-n} = I_n; see evaluate). Negative v give NaN.
template <class T>
DK_HOST_DEVICE LogBesselValue<T> log_iv(T v, T x, Want want) {
  const T nan = quiet_nan<T>(), inf = infinity<T>();
  if (std::isnan(v) || std::isnan(x) || x < T(0) || v < T(0) ||
      (std::isinf(v) && std::isinf(x))) {
    return filled(nan, nan, nan, nan);
  }
  LogBesselValue<T> r;
  if (x == T(0)) {
    // I_0(0) = 1, I_v(0) = 0 for v > 0; ratio ~ x / (2 (v+1)) -> 0, its derivative
    // -> 1 / (2 (v+1)); d2/dx2 log I -> 1/2 (v = 0), -v/x^2 -> -inf (v > 0).
    r = v == T(0) ? filled(T(0), T(0), -inf, T(0), T(0.5), T(0.5))
                  : filled(-inf, inf, -inf, T(0), -inf, T(0.5) / (v + T(1)));
  } else if (std::isinf(x)) {
    // I_v(x) ~ e^x / sqrt(2 pi x): log -> +inf, scaled log -> -inf; d/dx -> 1.
    r = filled(want.scaled ? -inf : inf, T(1), T(0), T(1), T(0), T(0));
  } else if (std::isinf(v)) {
    r = filled(-inf, inf, -inf, T(0), -inf, T(0));
  } else if (series_applies(v, x)) {
    r = log_iv_series(v, x, want);
  } else if (v >= T(kDebyeMinOrder)) {
    r = debye_for(v, x, true, want);
  } else if (!(hankel_applies(v, x) && log_bessel_hankel(v, x, true, want, r))) {
    r = log_iv_shifted_order(v, x, want);
  }
  return r;
}

// log K_v(x) for any real v (K_{-v} = K_v, so d/dv flips sign for v < 0).
template <class T>
DK_HOST_DEVICE LogBesselValue<T> log_kv(T v, T x, Want want) {
  const T nan = quiet_nan<T>(), inf = infinity<T>();
  if (std::isnan(v) || std::isnan(x) || x < T(0) || (std::isinf(v) && std::isinf(x))) {
    return filled(nan, nan, nan, nan);
  }
  const T order_sign = v < T(0) ? T(-1) : T(1);
  v = std::fabs(v);
  LogBesselValue<T> r;
  if (x == T(0)) {
    // K_v(x) ~ Gamma(v)/2 (2/x)^v (v > 0), ~ -log x (v = 0): +inf; d/dv -> +inf (0 at v = 0);
    // d2/dx2 log K ~ v / x^2 (v > 0), -1 / (x^2 log x) (v = 0): +inf.
    r = filled(inf, -inf, v == T(0) ? T(0) : inf, nan, inf);
  } else if (std::isinf(x)) {
    // K_v(x) ~ sqrt(pi / 2x) e^-x: log -> -inf; scaled log -> -inf too; d/dx -> -1.
    r = filled(-inf, T(-1), T(0), nan, T(0));
  } else if (std::isinf(v)) {
    r = filled(inf, -inf, inf, nan, inf);
  } else if (v >= T(kDebyeMinOrder)) {
    r = debye_for(v, x, false, want);
  } else if (want.dv) {
    if (!(hankel_applies(v, x) && log_bessel_hankel(v, x, false, want, r))) {
      r = log_kv_trapezoid(v, x, want);
    }
  } else if (!(hankel_applies(v, x) && log_bessel_hankel(v, x, false, want, r))) {
    if (k_small_order_applies(v, x)) {
      r = log_kv_small_order(v, x, want);
    } else {
      r = log_kv_trapezoid(v, x, want);
      // (1 < x < 1.5 here for second derivatives, always in double: the equation's form
      // has nothing to cancel at these x.)
      if (want.dx2) {
        const T d = r.dlog_dx;
        r.d2log_dx2 = T(1) + (v / x) * (v / x) - d / x - d * d;
      }
    }
  }
  r.dlog_dv *= order_sign;
  return r;
}

// Orders below 0 of I: the negative integers, through I_{-n} = I_n (other negative orders
// give NaN: I_v changes sign for some of them, and its log is not computed there).
template <class T>
DK_HOST_DEVICE bool negative_integer(T v) {
  return v < T(0) && v == std::floor(v) && !std::isinf(v);
}

// d/dv log I_v(x) at v = -n: I_{-v} = I_v + (2/pi) sin(v pi) K_v gives
// -d/dv log I_n(x) - 2 (-1)^n K_n(x) / I_n(x) (I_v > 0 near -n for x > 0, so the log is
// real there and has this derivative).
template <class T>
DK_HOST_DEVICE_LARGE T dlog_iv_dv_negative_integer(T n, T x) {
  Want want;
  want.dv = true;
  const LogBesselValue<T> i = log_iv(n, x, want);
  if (x == T(0)) {
    // -d/dv log I_n -> +inf; 2 K_n / I_n ~ (x/2)^-2n -> inf wins with the sign of -(-1)^n.
    return std::fmod(n, T(2)) == T(0) ? -infinity<T>() : infinity<T>();
  }
  const T k_over_i = std::exp(log_kv(n, x, Want()).log_value - i.log_value);
  const T odd = std::fmod(n, T(2)) == T(0) ? T(-1) : T(1);
  return -i.dlog_dv + T(2) * odd * k_over_i;
}

constexpr bool is_second_derivative_op(LogBesselOp op) {
  return op == LogBesselOp::iv_ratio_dx || op == LogBesselOp::d2log_iv_dx2 ||
         op == LogBesselOp::d2log_kv_dx2 || op == LogBesselOp::iv_ratio_dx2;
}

// log_iv for the second-derivative ops: below order 20 and for kSecondSeriesMaxX < x <= 35
// the shifted-order branch instead of the series, whose second-derivative sums cancel
// there (measured against mpmath: d/dx R 1.8e-12 -> 1.0e-14, d2/dx2 log I 1.2e-11 ->
// 3.0e-13 relative; ratio_dx2.cuh says why).
DK_HOST_DEVICE_LARGE LogBesselValue<double> log_iv_for_second(double v, double x, Want want) {
  if (v >= 0.0 && v < kDebyeMinOrder && x > kSecondSeriesMaxX && x <= kSeriesMaxXSmallOrder) {
    return log_iv_shifted_order(v, x, want);
  }
  return log_iv(v, x, want);
}

// The second-derivative ops (in double for every T). The CUDA kernels run them in a kernel
// of their own, so that the value kernels' code does not grow.
DK_HOST_DEVICE_LARGE double evaluate_second(LogBesselOp op, double v, double x) {
  Want want;
  want.dx = true;
  want.dx2 = true;
  const bool neg_int = negative_integer(v);
  if (x == 0.0) x = 0.0;  // -0 is the point 0 (the 1/x terms below must be +inf there)
  switch (op) {
    case LogBesselOp::iv_ratio_dx:
      // I_{1-n} / I_{-n} = I_{n-1} / I_n = 2n/x + I_{n+1} / I_n (no cancellation).
      return neg_int ? log_iv_for_second(-v, x, want).ratio_dx + 2.0 * (v / x / x)
                     : log_iv_for_second(v, x, want).ratio_dx;
    case LogBesselOp::d2log_iv_dx2:
      return log_iv_for_second(neg_int ? -v : v, x, want).d2log_dx2;
    case LogBesselOp::d2log_kv_dx2: return log_kv(v, x, want).d2log_dx2;
    case LogBesselOp::iv_ratio_dx2:
      // d2/dx2 (2n/x + I_{n+1} / I_n) = 4n/x^3 + ...: -4v/x^3 at v = -n (+inf at x = 0);
      // other negative v give NaN there.
      return neg_int ? iv_ratio_dx2(-v, x) - 4.0 * (v / x / x / x) : iv_ratio_dx2(v, x);
    default: break;
  }
  return quiet_nan<double>();
}

// Out of line, so that this rare path (a float32 order below FLT_MIN, evaluated in double)
// does not grow the float kernels. Defined after evaluate.
#if defined(__CUDACC__)
__host__ __device__ __noinline__
#else
__attribute__((noinline))
#endif
inline float evaluate_subnormal_order(LogBesselOp op, float v, float x);

// One output element of `op`.
template <class T>
DK_HOST_DEVICE T evaluate(LogBesselOp op, T v, T x) {
  if constexpr (sizeof(T) == 4) {
    // A subnormal float32 order: the float branches lose it (terms in v underflow to 0
    // where their log is taken: log I_v(3) came out -inf at v = 1e-40); double holds it.
    if (v != T(0) && fabs(v) < T(1.17549435e-38f)) return evaluate_subnormal_order(op, v, x);
  }
  if (x == T(0)) x = T(0);  // -0 is the point 0 (the 1/x terms below must be +inf there)
  Want want;
  // The I ops at negative integer orders go through I_{-n} = I_n; log_iv gives NaN for
  // the other negative orders.
  const bool neg_int = negative_integer(v);
  const T v_i = neg_int ? -v : v;
  switch (op) {
    case LogBesselOp::log_iv: return log_iv(v_i, x, want).log_value;
    case LogBesselOp::log_kv: return log_kv(v, x, want).log_value;
    case LogBesselOp::log_ive: want.scaled = true; return log_iv(v_i, x, want).log_value;
    case LogBesselOp::log_kve: want.scaled = true; return log_kv(v, x, want).log_value;
    case LogBesselOp::iv_ratio:
      want.dx = true;
      // I_{1-n} / I_{-n} = I_{n-1} / I_n = 2n/x + I_{n+1} / I_n (+inf at x = 0).
      // (2 (v / x), not 2 v / x: 2 v overflows float32 at |v| > 1.7e38 where 2n/x fits.)
      return neg_int ? log_iv(v_i, x, want).ratio - T(2) * (v / x) : log_iv(v, x, want).ratio;
    case LogBesselOp::dlog_iv_dx: want.dx = true; return log_iv(v_i, x, want).dlog_dx;
    case LogBesselOp::dlog_kv_dx: want.dx = true; return log_kv(v, x, want).dlog_dx;
    case LogBesselOp::dlog_iv_dv:
      want.dv = true;
      return neg_int ? dlog_iv_dv_negative_integer(v_i, x) : log_iv(v, x, want).dlog_dv;
    case LogBesselOp::dlog_kv_dv: want.dv = true; return log_kv(v, x, want).dlog_dv;
    case LogBesselOp::iv_ratio_dx:
    case LogBesselOp::d2log_iv_dx2:
    case LogBesselOp::d2log_kv_dx2:
    case LogBesselOp::iv_ratio_dx2:
#if !defined(__CUDA_ARCH__)
      return T(evaluate_second(op, double(v), double(x)));
#else
      break;  // (log_bessel_cuda.cu calls evaluate_second)
#endif
  }
  return quiet_nan<T>();
}

#if defined(__CUDACC__)
__host__ __device__ __noinline__
#else
__attribute__((noinline))
#endif
inline float evaluate_subnormal_order(LogBesselOp op, float v, float x) {
  return static_cast<float>(evaluate<double>(op, v, x));
}

}  // namespace log_bessel
}  // namespace diffkern
