"""mpmath references for the log-Bessel second x-derivatives and for huge arguments.

Writes tests/reference/log_bessel_d2_ref.npz:
  v, x, iv_ratio_dx, d2log_iv_dx2, d2log_kv_dx2   a (v, x) grid from x = 1e-300 to 1e10
  hv, hx, h_<op> for the value and first-derivative ops at v or x past 1e154
  r2_v, r2_x, iv_ratio_dx2   d2/dx2 of I_{v+1}/I_v: a denser grid (branch limits of
                             the op) and 400 random points, v in [0, 1e5], x in
                             [1e-300, 1e10]

The huge-argument values are mp_bessel's at 400 digits. The second derivatives come from the Bessel equation written without v^2/x^2 terms
(R' = 1 - (2v+1) R/x - R^2, d2/dx2 log I = R' - v/x^2, and with P = K_{v+1}/K_v,
d2/dx2 log K = 1 - v/x^2 + (2v+1) P/x - P^2), evaluated at 60 digits from mp_bessel's
ratios, so the ~20 digits those forms cancel at x = 1e10 still leave ~40.

iv_ratio_dx2 is the same equation differentiated once more, R'' = (2v+1) (R/x - R')/x
- 2 R R', which cancels ~x^2 of its terms' size for small x (600 digits at x = 1e-300) and
~1/x^3 for large x: each point is evaluated at 50 + 3 |log10 x| + log10(v+2) digits, with
R from mpmath's besseli (a convergent series, fast here at any precision) where
x^2 < v + 1 or sqrt(v^2 + x^2) < 60, else from mp_bessel's asymptotic sums with its working
digits and tolerance raised to match. (Cross-checked while writing it against
mpmath.diff of besseli(v+1, x)/besseli(v, x) at 80 digits: agreement to 1e-40 or better
at points from x = 1e-12 to 1e3.)

Run: python tests/reference/make_second_derivative_reference.py  (a few minutes on 2 cores)
"""
from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import random
import sys

import mpmath as mp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reference import mp_bessel as mb  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "log_bessel_d2_ref.npz")
V = [0, 1e-3, 0.3, 0.5, 1, 2.5, 7.3, 19.5, 20, 25, 100, 1e3, 1e5]
X = [1e-300, 1e-160, 1e-40, 1e-12, 1e-8, 1e-3, 0.1, 0.9, 1.2, 1.7, 5, 21, 34, 36, 60, 150,
     250, 1e3, 1e5, 1e7, 1e10]
HUGE_V = [0.0, 2.5, 30.0, 1e154, 1.5e154, 1e155, 1e200, 1e300, 1e308]
HUGE_X = [5e-324, 1e-300, 1.0, 1e3, 1e154, 1e155, 1e200, 1e300, 1e308]
# iv_ratio_dx2: also the op's branch limits (order 20; x = 4, 30 and v^2/2) and both
# sides of them.
R2_V = sorted(set(V + [3.9, 6.3, 12.0, 19.99, 20.5, 1e4]))
R2_X = sorted(set(X + [2.0, 3.99, 4.01, 10.0, 20.0, 29.99, 30.01, 35.0, 72.0, 200.0, 5e2]))
R2_RANDOM = 400


def second(v, x):
    with mp.workdps(60):
        v, x = mp.mpf(v), mp.mpf(x)
        r = mb.iv_ratio(v, x)
        rp = 1 - (2 * v + 1) * r / x - r**2
        p = mp.exp(mb.log_k(v + 1, x) - mb.log_k(v, x))
        return [float(rp), float(rp - v / x**2), float(1 - v / x**2 + (2 * v + 1) * p / x - p**2)]


def _ratio_second_from(r, v, x):
    rp = 1 - (2 * v + 1) * r / x - r * r
    return (2 * v + 1) * (r / x - rp) / x - 2 * r * rp


def ratio_second(v, x):
    digits = int(50 + 3 * abs(math.log10(x)) + math.log10(v + 2))
    if x * x < v + 1 or math.hypot(v, x) < 60:
        with mp.workdps(digits):
            vm, xm = mp.mpf(v), mp.mpf(x)
            return float(_ratio_second_from(mp.besseli(vm + 1, xm) / mp.besseli(vm, xm), vm, xm))
    saved = mb.WORK_DPS, mb.TOL_DIGITS
    mb.WORK_DPS, mb.TOL_DIGITS = digits, digits - 5
    try:
        with mp.workdps(digits):
            return float(_ratio_second_from(mb.iv_ratio(v, x), mp.mpf(v), mp.mpf(x)))
    finally:
        mb.WORK_DPS, mb.TOL_DIGITS = saved


def ratio_second_points():
    pts = list(itertools.product(R2_V, R2_X))
    rng = random.Random(20261201)
    for _ in range(R2_RANDOM):
        # half with v over the whole range, half at small orders (the branches below 20)
        v = 10 ** rng.uniform(-3, 5) if rng.random() < 0.5 else rng.uniform(0, 40)
        # x over the whole range, or (more often) where the branches meet
        x = 10 ** rng.uniform(-300, 10) if rng.random() < 0.3 else 10 ** rng.uniform(-4, 4)
        pts.append((v, x))
    return pts


def huge(v, x):
    # log I - x, the ratio and d/dx subtract numbers of size up to 1e308: work at 400
    # digits (mp_bessel reads WORK_DPS at each call).
    mb.WORK_DPS = 400
    d = mb.point_values(v, x, derivs=False)
    return [d[k] for k in ("log_iv", "log_kv", "log_ive", "log_kve", "iv_ratio",
                           "dlog_iv_dx", "dlog_kv_dx")]


if __name__ == "__main__":
    grid = list(itertools.product(V, X))
    hgrid = [(v, x) for v, x in itertools.product(HUGE_V, HUGE_X) if max(v, x) >= 1e154]
    r2grid = ratio_second_points()
    with multiprocessing.get_context("fork").Pool() as pool:
        d2 = np.array(pool.starmap(second, grid))
        r2 = np.array(pool.starmap(ratio_second, r2grid, chunksize=4))
        hv = np.array(pool.starmap(huge, hgrid))
    out = dict(v=np.array([g[0] for g in grid]), x=np.array([g[1] for g in grid]),
               iv_ratio_dx=d2[:, 0], d2log_iv_dx2=d2[:, 1], d2log_kv_dx2=d2[:, 2],
               hv=np.array([g[0] for g in hgrid]), hx=np.array([g[1] for g in hgrid]),
               r2_v=np.array([g[0] for g in r2grid]), r2_x=np.array([g[1] for g in r2grid]),
               iv_ratio_dx2=r2)
    for j, k in enumerate(("log_iv", "log_kv", "log_ive", "log_kve", "iv_ratio",
                           "dlog_iv_dx", "dlog_kv_dx")):
        out["h_" + k] = hv[:, j]
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT}: {len(grid)} grid points, {len(hgrid)} huge points, "
          f"{len(r2grid)} iv_ratio_dx2 points")
