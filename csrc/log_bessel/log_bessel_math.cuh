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
// (bench/NOTES-log_bessel.md). Special values follow SciPy: NaN in or x < 0 gives NaN.
#pragma once
#include <cmath>

#include "common/host_device.h"
#include "log_bessel/detail/debye.cuh"
#include "log_bessel/detail/hankel.cuh"
#include "log_bessel/detail/numeric.cuh"
#include "log_bessel/detail/result.cuh"
#include "log_bessel/detail/series.cuh"
#include "log_bessel/detail/shifted_order.cuh"
#include "log_bessel/detail/k_small_order.cuh"
#include "log_bessel/detail/trapezoid.cuh"
#include "log_bessel/log_bessel.h"

namespace diffkern {
namespace log_bessel {

template <class T>
DK_HOST_DEVICE LogBesselValue<T> filled(T value, T dx, T dv, T ratio) {
  LogBesselValue<T> r;
  r.log_value = value;
  r.dlog_dx = dx;
  r.dlog_dv = dv;
  r.ratio = ratio;
  return r;
}

// log I_v(x), and what `want` asks besides. v >= 0 real, or a negative integer
// (I_{-n} = I_n; d/dv is then NaN); other negative v give NaN.
template <class T>
DK_HOST_DEVICE LogBesselValue<T> log_iv(T v, T x, Want want) {
  const T nan = quiet_nan<T>(), inf = infinity<T>();
  bool negative_integer_order = false;
  if (std::isnan(v) || std::isnan(x) || x < T(0)) return filled(nan, nan, nan, nan);
  if (v < T(0)) {
    if (v != std::floor(v)) return filled(nan, nan, nan, nan);
    v = -v;
    negative_integer_order = true;
  }
  LogBesselValue<T> r;
  if (x == T(0)) {
    // I_0(0) = 1, I_v(0) = 0 for v > 0; ratio ~ x / (2 (v+1)) -> 0.
    r = v == T(0) ? filled(T(0), T(0), -inf, T(0)) : filled(-inf, inf, -inf, T(0));
  } else if (std::isinf(x)) {
    // I_v(x) ~ e^x / sqrt(2 pi x): log -> +inf, scaled log -> -inf; d/dx -> 1.
    r = filled(want.scaled ? -inf : inf, T(1), T(0), T(1));
  } else if (std::isinf(v)) {
    r = filled(-inf, inf, -inf, T(0));
  } else if (series_applies(v, x)) {
    r = log_iv_series(v, x, want);
  } else if (v >= T(kDebyeMinOrder)) {
    r = want.dx || want.dv ? log_bessel_debye<T, 1>(v, x, true, want).value
                           : log_bessel_debye<T, 0>(v, x, true, want).value;
  } else if (!(hankel_applies(v, x) && log_bessel_hankel(v, x, true, want, r))) {
    r = log_iv_shifted_order(v, x, want);
  }
  if (negative_integer_order) r.dlog_dv = nan;
  return r;
}

// log K_v(x) for any real v (K_{-v} = K_v, so d/dv flips sign for v < 0).
template <class T>
DK_HOST_DEVICE LogBesselValue<T> log_kv(T v, T x, Want want) {
  const T nan = quiet_nan<T>(), inf = infinity<T>();
  if (std::isnan(v) || std::isnan(x) || x < T(0)) return filled(nan, nan, nan, nan);
  const T order_sign = v < T(0) ? T(-1) : T(1);
  v = std::fabs(v);
  LogBesselValue<T> r;
  if (x == T(0)) {
    // K_v(x) ~ Gamma(v)/2 (2/x)^v (v > 0), ~ -log x (v = 0): +inf; d/dv -> +inf (0 at v = 0).
    r = filled(inf, -inf, v == T(0) ? T(0) : inf, nan);
  } else if (std::isinf(x)) {
    // K_v(x) ~ sqrt(pi / 2x) e^-x: log -> -inf; scaled log -> -inf too; d/dx -> -1.
    r = filled(-inf, T(-1), T(0), nan);
  } else if (std::isinf(v)) {
    r = filled(inf, -inf, inf, nan);
  } else if (v >= T(kDebyeMinOrder)) {
    r = want.dx || want.dv ? log_bessel_debye<T, 1>(v, x, false, want).value
                           : log_bessel_debye<T, 0>(v, x, false, want).value;
  } else if (want.dv) {
    if (!(hankel_applies(v, x) && log_bessel_hankel(v, x, false, want, r))) {
      r = log_kv_trapezoid(v, x, want);
    }
  } else if (!(hankel_applies(v, x) && log_bessel_hankel(v, x, false, want, r))) {
    r = k_small_order_applies(v, x) ? log_kv_small_order(v, x, want)
                                    : log_kv_trapezoid(v, x, want);
  }
  r.dlog_dv *= order_sign;
  return r;
}

// One output element of `op`.
template <class T>
DK_HOST_DEVICE T evaluate(LogBesselOp op, T v, T x) {
  Want want;
  switch (op) {
    case LogBesselOp::log_iv: return log_iv(v, x, want).log_value;
    case LogBesselOp::log_kv: return log_kv(v, x, want).log_value;
    case LogBesselOp::log_ive: want.scaled = true; return log_iv(v, x, want).log_value;
    case LogBesselOp::log_kve: want.scaled = true; return log_kv(v, x, want).log_value;
    case LogBesselOp::iv_ratio: want.dx = true; return log_iv(v, x, want).ratio;
    case LogBesselOp::dlog_iv_dx: want.dx = true; return log_iv(v, x, want).dlog_dx;
    case LogBesselOp::dlog_kv_dx: want.dx = true; return log_kv(v, x, want).dlog_dx;
    case LogBesselOp::dlog_iv_dv: want.dv = true; return log_iv(v, x, want).dlog_dv;
    case LogBesselOp::dlog_kv_dv: want.dv = true; return log_kv(v, x, want).dlog_dv;
  }
  return quiet_nan<T>();
}

}  // namespace log_bessel
}  // namespace diffkern
