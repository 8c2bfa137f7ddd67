"""Checks of the mpmath references in tests/reference/mp_bessel.py (fast: a few points).

The reference picks one of three methods per point (mpmath's besseli/besselk, Hankel,
Debye); here every method is compared with the others where they overlap, and with
independent quadratures, to >= 40 digits (the values are used rounded to float64, so
30 would do). The committed npz is checked for internal consistency.
"""
from __future__ import annotations

import math
import os
from fractions import Fraction

import mpmath as mp
import numpy as np
import pytest

from tests.reference import mp_bessel as R

NPZ = os.path.join(os.path.dirname(__file__), "reference", "log_bessel_ref.npz")


def digits(a, b):
    """Agreement in digits, mixed: |a - b| / max(1, |a|)."""
    d = abs(a - b) / max(1, abs(a))
    return 99.0 if d == 0 else -float(mp.log10(d))


def test_debye_polynomials_exact():
    # U_1 = (3p - 5p^3)/24, U_2 = (81p^2 - 462p^4 + 385p^6)/1152 (DLMF 10.41.10)
    assert R.debye_polynomial(1) == [Fraction(3, 24), Fraction(-5, 24)]
    assert R.debye_polynomial(2) == [Fraction(81, 1152), Fraction(-462, 1152),
                                     Fraction(385, 1152)]
    assert R.debye_polynomial(3) == [Fraction(c, 414720)
                                     for c in (30375, -369603, 765765, -425425)]
    # U_k has degree 3k in p, i.e. Q_k has degree k in p^2.
    for k in (5, 20, 60):
        q = R.debye_polynomial(k)
        assert len(q) == k + 1 and q[-1] != 0


# Points where two or three methods apply; method names as in R.METHODS.
OVERLAP = [
    (0.0, 60.0, ("mp", "hankel", "debye")),
    (0.5, 70.0, ("mp", "hankel", "debye")),
    (10.0, 70.0, ("mp", "hankel", "debye")),
    (2.0, 200.0, ("mp", "hankel", "debye")),
    (1e-3, 80.0, ("mp", "hankel", "debye")),
    (20.0, 900.0, ("mp", "hankel", "debye")),
    (59.0, 20.0, ("mp", "debye")),
    (60.0, 1e-5, ("mp", "debye")),
    (50.0, 50.0, ("mp", "debye")),
    (100.0, 100.0 * 0.6627434193491816, ("mp", "debye")),
    (3.0, 1e4, ("hankel", "debye")),
    (0.25, 1e7, ("hankel", "debye")),
]


@pytest.mark.parametrize("v,x,methods", OVERLAP, ids=[f"{v:g}-{x:g}" for v, x, _ in OVERLAP])
@pytest.mark.parametrize("kind", ["i", "k"])
def test_methods_agree_in_overlap(v, x, methods, kind):
    vals = {m: R.METHODS[m](v, x, kind)[0] for m in methods}
    names = list(vals)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = digits(vals[a], vals[b])
            assert d >= 40, f"{kind} v={v} x={x}: {a} vs {b} agree to {d:.1f} digits"


def _nodes(v, x):
    # split [0, T] at a geometric sequence from the integrand's width so quad resolves it
    t_end = mp.acosh(1 + (mp.mpf(150) + v) / x) + 1
    w = min(mp.mpf(1) / mp.sqrt(x), t_end / 8)
    nodes = [mp.mpf(0)]
    while nodes[-1] * 2 + w < t_end:
        nodes.append(nodes[-1] * 2 + w)
    return nodes + [t_end]


def _k_quad(v, x):
    # K_v(x) = int_0^inf exp(-x cosh t) cosh(v t) dt
    with mp.workdps(50):
        v, x = mp.mpf(v), mp.mpf(x)
        f = lambda t: mp.exp(-x * (mp.cosh(t) - 1)) * mp.cosh(v * t)  # noqa: E731
        return mp.log(mp.quad(f, _nodes(v, x))) - x


def _i_quad(v, x):
    # I_v(x) = (1/pi) int_0^pi e^{x cos th} cos(v th) dth
    #          - sin(v pi)/pi int_0^inf e^{-x cosh t - v t} dt
    # (the first integrand reaches e^x while the result can be far smaller: extra digits)
    with mp.workdps(50 + int(x / 2)):
        v, x = mp.mpf(v), mp.mpf(x)
        a = mp.quad(lambda th: mp.exp(x * mp.cos(th)) * mp.cos(v * th), [0, mp.pi / 2, mp.pi])
        b = mp.quad(lambda t: mp.exp(-x * mp.cosh(t) - v * t), _nodes(v, x))
        return mp.log(a / mp.pi - mp.sin(v * mp.pi) / mp.pi * b)


@pytest.mark.parametrize("v,x", [(0.0, 1.0), (0.3, 0.01), (2.5, 7.0), (13.7, 42.0),
                                 (40.0, 30.0), (75.0, 60.0), (3.0, 300.0)])
def test_against_quadrature(v, x):
    assert digits(R.log_k(v, x), _k_quad(v, x)) >= 40
    assert digits(R.log_i(v, x), _i_quad(v, x)) >= 40


def _dlog_i_dv_series(v, x):
    # d/dv log I_v(x) = log(x/2) - sum t_k psi(v+k+1) / sum t_k, t_k = (x^2/4)^k/(k! G(v+k+1))
    with mp.workdps(80):
        v, x = mp.mpf(v), mp.mpf(x)
        q = x * x / 4
        t, s, w, k = 1 / mp.gamma(v + 1), 0, 0, 0
        while True:
            s += t
            w += t * mp.digamma(v + k + 1)
            if k > 5 and t < s * mp.mpf(10) ** -70:
                break
            k += 1
            t = t * q / (k * (v + k))
        return mp.log(x / 2) - w / s


def _dlog_k_dv_quad(v, x):
    with mp.workdps(60):
        v, x = mp.mpf(v), mp.mpf(x)
        nodes = _nodes(v, x)
        e = lambda t: mp.exp(-x * mp.cosh(t))  # noqa: E731
        return (mp.quad(lambda t: e(t) * t * mp.sinh(v * t), nodes)
                / mp.quad(lambda t: e(t) * mp.cosh(v * t), nodes))


@pytest.mark.parametrize("v,x", [(0.0, 1.0), (0.0, 30.0), (1.0, 1e-300), (2.5, 3.0),
                                 (1e-3, 1e-300), (30.0, 40.0), (3.0, 1e-5), (70.0, 50.0)])
def test_dv_central_difference(v, x):
    assert digits(R.dlog_i_dv(v, x), _dlog_i_dv_series(v, x)) >= 40
    if x > 1e-30:
        assert digits(R.dlog_k_dv(v, x), _dlog_k_dv_quad(v, x)) >= 40


def test_dv_in_asymptotic_regions_consistent_with_value_differences():
    # Debye/Hankel regions: derivative vs a symmetric difference of values with h = 1e-6
    # (error ~ h^2 f''' / 6, far below the 1e-9 asked here).
    for v, x in [(1e3, 2e3), (1e6, 1e-300), (5.0, 1e8), (300.0, 300.0 * 0.6627434193491816)]:
        h = mp.mpf("1e-6")
        for f, d in ((R.log_i, R.dlog_i_dv), (R.log_k, R.dlog_k_dv)):
            with mp.workdps(60):
                fd = (f(mp.mpf(v) + h, x) - f(mp.mpf(v) - h, x)) / (2 * h)
            assert digits(d(v, x), fd) >= 9


def test_against_scipy_where_scipy_is_accurate():
    sps = pytest.importorskip("scipy.special")
    for v, x in [(0.0, 0.5), (1.0, 3.0), (2.5, 10.0), (7.3, 4.2), (0.7, 25.0)]:
        assert abs(float(R.log_ie(v, x)) - math.log(sps.ive(v, x))) < 1e-14
        assert abs(float(R.log_ke(v, x)) - math.log(sps.kve(v, x))) < 1e-14


def test_exact_float_inputs_and_special_values():
    # 0.1 is used as the double 0.1000000000000000055511151231257827...
    a = R.log_i(2.0, 0.1)
    with mp.workdps(60):
        b = mp.log(mp.besseli(2, mp.mpf(0.1)))
        c = mp.log(mp.besseli(2, mp.mpf("0.1")))
    assert digits(a, b) >= 45 and digits(a, c) < 20
    assert R.log_i(0.0, 0.0) == 0 and R.log_i(1.5, 0.0) == -mp.inf
    assert R.log_k(0.0, 0.0) == mp.inf and R.log_k(-2.5, 0.0) == mp.inf
    assert mp.isnan(R.log_i(1.0, -1.0)) and mp.isnan(R.log_k(1.0, -1.0))
    assert mp.isnan(R.log_i(-0.5, 1.0)) and mp.isnan(R.log_i(float("nan"), 1.0))
    assert R.log_i(-3.0, 2.0) == R.log_i(3.0, 2.0)
    assert R.log_k(-2.3, 2.0) == R.log_k(2.3, 2.0)
    assert R.log_i(1.0, math.inf) == mp.inf and R.log_k(1.0, math.inf) == -mp.inf
    assert R.iv_ratio(2.0, 0.0) == 0


def test_committed_npz_is_consistent():
    if not os.path.exists(NPZ):
        pytest.skip("reference data not generated")
    d = np.load(NPZ)
    n = d["v"].size
    assert n >= 4000 and int(d["has_dv"].sum()) >= 800
    assert tuple(d["grid_shape"]) == (d["grid_v"].size, d["grid_x"].size)
    for q in R.QUANTITIES:
        assert d[q].shape == (n,)
    fin = np.isfinite(d["log_iv"]) & np.isfinite(d["log_kv"])
    assert fin.all()
    # log_ive = log_iv - x up to the float64 roundings of each
    x = d["x"]
    scale = np.maximum(1, np.maximum(np.abs(d["log_iv"]), x))
    assert np.all(np.abs(d["log_ive"] - (d["log_iv"] - x)) <= 4.5e-16 * scale)
    r = d["iv_ratio"]
    assert np.all((r >= 0) & (r < 1))
    # spot-recompute a few stored points
    for i in np.linspace(0, n - 1, 5).astype(int):
        assert float(R.log_k(d["v"][i], x[i])) == d["log_kv"][i]
        assert float(R.log_i(d["v"][i], x[i])) == d["log_iv"][i]


@pytest.mark.parametrize("v,x", [(61.0, 1e-300), (61.0, 40.4273), (1e3, 662.743), (1e6, 1e-5),
                                 (1e6, 662743.0), (1e6, 1e10), (12345.5, 1.52411e8),
                                 (1.5, 0.3)])
def test_wronskian_and_recurrences(v, x):
    # Where only the Debye expansion applies (large v): I_v K_{v+1} + I_{v+1} K_v = 1/x,
    # I_{v-1} = I_{v+1} + (2v/x) I_v and K_{v+1} = K_{v-1} + (2v/x) K_v (all terms positive).
    with mp.workdps(60):
        vm, xm = mp.mpf(v), mp.mpf(x)
        li = {n: R.log_i(vm + n, xm) for n in (-1, 0, 1)}
        lk = {n: R.log_k(vm + n, xm) for n in (-1, 0, 1)}
        w = mp.log(mp.exp(li[0] + lk[1]) + mp.exp(li[1] + lk[0]))
        assert digits(w, -mp.log(xm)) >= 45
        assert digits(li[-1], mp.log(mp.exp(li[1]) + 2 * vm / xm * mp.exp(li[0]))) >= 45
        assert digits(lk[1], mp.log(mp.exp(lk[-1]) + 2 * vm / xm * mp.exp(lk[0]))) >= 45
