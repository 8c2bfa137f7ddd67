"""The documented contract of the log-Bessel ops as a float64 oracle, shared by the
property tests (tests/test_properties.py) and the soak script (scripts/soak.py).

- ``reference(name, v, x) -> (ref, known)``: the true value where the module docstring
  fixes it (NaN, the exact limits at 0 and infinity) and, at regular points, SciPy's
  exponentially scaled functions where they are normal numbers.
- ``mp_converged(value)``: an mpmath value trusted only once two working precisions agree.
"""
from __future__ import annotations

import mpmath as mp
import numpy as np
import scipy.special as sps

I_FAMILY = ("log_iv", "log_ive", "bessel_iv_ratio")


def _is_int(v):
    return np.isfinite(v) & (v == np.floor(v))


def reference(name: str, v: np.ndarray, x: np.ndarray):
    """(ref, known): the true value in float64 (NaN where the docstring says NaN, the
    exact limits at 0 and infinity) and where it is known. Regular points use SciPy's
    exponentially scaled functions where they are normal numbers."""
    ref = np.full(v.shape, np.nan)
    known = np.zeros(v.shape, bool)
    i_fam = name in I_FAMILY
    with np.errstate(all="ignore"):
        nan = np.isnan(v) | np.isnan(x) | (x < 0)
        if i_fam:  # every negative non-integer order, -inf included
            nan |= (v < 0) & ~_is_int(v)
        nan |= np.isinf(v) & (x == np.inf)  # the limit depends on how the two grow
        known |= nan
        ok = ~nan
        # x = 0 (v = +inf included; -inf only for K, the I ops give NaN there)
        z = ok & (x == 0)
        if name in ("log_iv", "log_ive"):
            ref[z] = np.where(v[z] == 0, 0.0, -np.inf)
        elif name == "bessel_iv_ratio":
            ref[z] = np.where(v[z] >= 0, 0.0, np.inf)  # I_{n-1}(0)/I_n(0) for v = -n
        else:
            ref[z] = np.inf
        known |= z
        # x = inf (finite v)
        xi = ok & (x == np.inf) & np.isfinite(v)
        ref[xi] = {"log_iv": np.inf, "log_ive": -np.inf, "log_kv": -np.inf,
                   "log_kve": -np.inf, "bessel_iv_ratio": 1.0}[name]
        known |= xi
        # |v| = inf (finite x > 0)
        vi = ok & np.isinf(v) & (x > 0) & np.isfinite(x)
        ref[vi] = {"log_iv": -np.inf, "log_ive": -np.inf, "log_kv": np.inf,
                   "log_kve": np.inf, "bessel_iv_ratio": 0.0}[name]
        known |= vi
        # regular points from SciPy, where its scaled values are normal numbers
        reg = ok & np.isfinite(v) & (x > 0) & np.isfinite(x) & (np.abs(v) <= 1e4)
        if name == "bessel_iv_ratio":
            a, b = sps.ive(v + 1, x), sps.ive(v, x)
            good = reg & (a > 1e-290) & (b > 1e-290) & (a < 1e290) & (b < 1e290)
            ref[good] = (a / b)[good]
        else:
            f = sps.ive(v, x) if i_fam else sps.kve(v, x)
            good = reg & (f > 1e-290) & (f < 1e290)
            lg = np.log(f)
            ref[good] = {"log_iv": lg + x, "log_ive": lg, "log_kv": lg - x,
                         "log_kve": lg}[name][good]
        known |= good
    return ref, known


def mp_converged(value, dps=30, max_dps=960):
    """float(value()) once two working precisions (d, 2d) agree to 1e-20 relative, else
    None: mpmath's besselk at a non-integer order is I_-v - I_v over a sine, and at a fixed
    precision can lose every digit (log K_233.67(166.17) at 30 digits: 183.0, not 143.59)."""
    with mp.workdps(dps):
        prev = value()
    while dps < max_dps:
        dps *= 2
        with mp.workdps(dps):
            cur = value()
            if abs(cur - prev) <= 1e-20 * abs(cur):
                return float(cur)
        prev = cur
    return None
