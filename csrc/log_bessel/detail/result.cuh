// What one evaluation of a log-Bessel branch returns, and what it was asked for.
#pragma once

namespace diffkern {
namespace log_bessel {

// Each branch computes the log value and, when asked, its derivatives. Derivatives are
// computed from the same sums as the value (no finite differences).
struct Want {
  bool scaled = false;  // I: log I_v(x) - x;  K: log K_v(x) + x
  bool dx = false;      // d/dx of log I_v(x) or log K_v(x) (unscaled), and for I the ratio
  bool dv = false;      // d/dv of the same
  bool dx2 = false;     // d2/dx2 of the same (and for I d/dx of the ratio); implies dx
};

template <class T>
struct LogBesselValue {
  T log_value;  // log I_v(x) or log K_v(x), scaled when asked
  T dlog_dx;    // d/dx of the unscaled log
  T dlog_dv;    // d/dv of the log (scaling does not depend on v)
  T ratio;      // I only: I_{v+1}(x) / I_v(x)
  T d2log_dx2;  // d2/dx2 of the unscaled log, when asked
  T ratio_dx;   // I only, when d2/dx2 was asked: d/dx (I_{v+1}(x) / I_v(x))
};

}  // namespace log_bessel
}  // namespace diffkern
