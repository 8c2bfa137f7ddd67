"""High-precision references for log I_v(x), log K_v(x) and their derivatives (mpmath).

Each value is computed by one of three methods, chosen per point:

``mp``      mpmath's own ``besseli`` / ``besselk`` (convergent series and mpmath's
            precision-tracking hypergeometric machinery); used where
            r = sqrt(v^2 + x^2) < DEBYE_R_MIN, i.e. on a bounded set where it is fast.
``hankel``  the large-argument (Hankel) expansion in 1/x, for x >= HANKEL_X_MIN when its
            terms fall below the tolerance before they start to grow (small v only).
``debye``   the uniform asymptotic (Debye) expansion, written in r = sqrt(v^2 + x^2) and
            p = v / r so that it is well defined for every v >= 0 (at v = 0 it reduces to
            the Hankel expansion):

                I_v(x) ~ exp(+eta) / sqrt(2 pi r) * sum_k      Q_k(p^2) / r^k
                K_v(x) ~ exp(-eta) * sqrt(pi / (2 r)) * sum_k (-1)^k Q_k(p^2) / r^k
                eta = r + v log(x / (v + r)),   U_k(p) = p^k Q_k(p^2),

            with the Debye polynomials U_k generated once in exact rational arithmetic by
            U_{k+1}(p) = p^2 (1 - p^2) U_k'(p) / 2 + (1/8) int_0^p (1 - 5 t^2) U_k(t) dt.
            For r >= 60 its terms fall below 1e-45 within 80 terms (max over s in [0, 1]
            of |Q_80(s)| is 2.3e92, and 2.3e92 / 60^80 = 1.3e-50).

All three are evaluated at WORK_DPS decimal digits; the target accuracy of every returned
value is 1e-40 relative (log values: absolute max(1, |value|) * 1e-40). tests/test_reference.py
cross-checks the methods where they overlap and against quadrature.

Inputs are Python/NumPy floats and are converted exactly (``mpmath.mpf(float)``).
Public functions return ``mpmath.mpf`` (use ``float()`` to round to float64).

Domain (as the diffkern ops): I needs v >= 0, or v a negative integer (I_{-n} = I_n); a
non-integer negative v gives NaN. K accepts any real v (K_{-v} = K_v). x < 0 or NaN gives
NaN. Limits: log I_0(0) = 0, log I_v(0) = -inf (v > 0), log K_v(0) = +inf,
log I_v(inf) = +inf, log K_v(inf) = -inf.
"""
from __future__ import annotations

import math
from fractions import Fraction

import mpmath as mp

WORK_DPS = 60          # digits for value evaluations
TOL_DIGITS = 48        # asymptotic sums stop when a term is below 10^-TOL_DIGITS
DEBYE_R_MIN = 60.0     # Debye used when sqrt(v^2 + x^2) >= this
DEBYE_MAX_TERMS = 100
HANKEL_X_MIN = 60.0    # the omitted exp(-2x) part of I is then below 1e-52
HANKEL_MAX_TERMS = 400
DERIV_H_DIGITS = 25    # central difference step 10^-25 in v for d/dv
DERIV_DPS = 100        # digits for the d/dv evaluations

# ---------------------------------------------------------------------------------------
# Debye polynomials, exact


_Q_EXACT: list[list[Fraction]] = []   # Q_k(s) coefficients in s = p^2, low to high
_Q_MPF: dict[int, list[list]] = {}    # per binary precision: mpf versions of _Q_EXACT


def _extend_q(n: int) -> None:
    """Make sure _Q_EXACT holds Q_0 .. Q_n."""
    if not _Q_EXACT:
        _Q_EXACT.append([Fraction(1)])
    while len(_Q_EXACT) <= n:
        k = len(_Q_EXACT) - 1
        # U_k(p) = sum_j q[j] p^(k + 2j); build U_{k+1} as a dict power -> coefficient.
        u = {k + 2 * j: c for j, c in enumerate(_Q_EXACT[k])}
        new: dict[int, Fraction] = {}
        for e, c in u.items():
            if e:
                d = c * e / 2                       # p^2 (1 - p^2) U' / 2
                new[e + 1] = new.get(e + 1, 0) + d
                new[e + 3] = new.get(e + 3, 0) - d
            new[e + 1] = new.get(e + 1, 0) + c / (8 * (e + 1))        # (1/8) int t^e
            new[e + 3] = new.get(e + 3, 0) - 5 * c / (8 * (e + 3))    # -(5/8) int t^(e+2)
        k1 = k + 1
        q = [Fraction(0)] * (k1 + 1)
        for e, c in new.items():
            assert (e - k1) % 2 == 0 and 0 <= (e - k1) // 2 <= k1
            q[(e - k1) // 2] += c
        _Q_EXACT.append(q)


def debye_polynomial(k: int) -> list[Fraction]:
    """Exact coefficients of Q_k(s), U_k(p) = p^k Q_k(p^2), lowest power first."""
    _extend_q(k)
    return list(_Q_EXACT[k])


def _q_mpf(n: int) -> list[list]:
    prec = mp.mp.prec
    tab = _Q_MPF.setdefault(prec, [])
    if len(tab) <= n:
        _extend_q(n)
        for k in range(len(tab), n + 1):
            tab.append([mp.mpf(c.numerator) / c.denominator for c in _Q_EXACT[k]])
    return tab


def _horner(coeffs, s):
    acc = mp.mpf(0)
    for c in reversed(coeffs):
        acc = acc * s + c
    return acc


# ---------------------------------------------------------------------------------------
# the three methods; each returns (log value, number of terms) or raises _NoConvergence


class NoConvergence(ArithmeticError):
    pass


def _debye(v, x, kind: str, nterms: int | None = None):
    """log I_v(x) (kind 'i') or log K_v(x) (kind 'k') by Debye's expansion in 1/r."""
    with mp.workdps(WORK_DPS + 15):
        v = mp.mpf(v)
        x = mp.mpf(x)
        r = mp.sqrt(v * v + x * x)
        s = (v / r) ** 2
        w = 1 / r
        eta = r + v * mp.log(x / (v + r))
        sign = -1 if kind == "k" else 1
        tol = mp.mpf(10) ** (-TOL_DIGITS)
        total = mp.mpf(1)
        wk = mp.mpf(1)
        small = False
        kmax = nterms if nterms is not None else DEBYE_MAX_TERMS
        k = 0
        while k < kmax:
            k += 1
            tab = _q_mpf(k)
            wk *= w * sign
            term = _horner(tab[k], s) * wk
            total += term
            a = abs(term)
            # Terms need not decrease monotonically (Q_k(s) has zeros in s), so the sum
            # runs until one falls below the tolerance; not reaching it within kmax
            # terms means r is too small for this method.
            # Two consecutive small terms, so an accidental near-zero of one Q_k(s)
            # cannot stop the sum early.
            if nterms is None and a < tol and small:
                break
            small = a < tol
        else:
            if nterms is None:
                raise NoConvergence(f"debye v={v} x={x}: {kmax} terms not enough")
        if kind == "i":
            val = eta - mp.log(2 * mp.pi * r) / 2 + mp.log(total)
        else:
            val = -eta + mp.log(mp.pi / (2 * r)) / 2 + mp.log(total)
    return val, k


def _hankel(v, x, kind: str, nterms: int | None = None):
    """log I_v(x) or log K_v(x) by the Hankel expansion in 1/x (x large, v small)."""
    with mp.workdps(WORK_DPS + 15):
        v = mp.mpf(v)
        x = mp.mpf(x)
        mu = 4 * v * v
        sign = 1 if kind == "k" else -1
        tol = mp.mpf(10) ** (-TOL_DIGITS)
        total = mp.mpf(1)
        term = mp.mpf(1)
        last = None
        kmax = nterms if nterms is not None else HANKEL_MAX_TERMS
        k = 0
        while k < kmax:
            k += 1
            term = term * (mu - (2 * k - 1) ** 2) / (8 * k * x) * sign
            total += term
            a = abs(term)
            if nterms is None:
                if a == 0 or (a < tol and k > 2 * v):
                    break
                if last is not None and a > last and k > 2 * v + 1:
                    raise NoConvergence(f"hankel v={v} x={x} k={k}")
            last = a
        else:
            if nterms is None:
                raise NoConvergence(f"hankel v={v} x={x}: {kmax} terms not enough")
        if kind == "i":
            val = x - mp.log(2 * mp.pi * x) / 2 + mp.log(total)
        else:
            val = -x + mp.log(mp.pi / (2 * x)) / 2 + mp.log(total)
    return val, k


def _mpmath(v, x, kind: str, nterms=None):
    with mp.workdps(WORK_DPS + 10):
        f = mp.besseli if kind == "i" else mp.besselk
        val = mp.log(f(mp.mpf(v), mp.mpf(x)))
    return val, 0


METHODS = {"mp": _mpmath, "hankel": _hankel, "debye": _debye}


def choose_method(v: float, x: float, kind: str) -> str:
    """The method used at (v, x) for v >= 0, x > 0 finite."""
    v = abs(float(v))
    x = float(x)
    r = math.hypot(v, x)
    if v <= 50.0 and x >= HANKEL_X_MIN and x >= 2.0 * v * v + 40.0:
        return "hankel"
    if r >= DEBYE_R_MIN:
        return "debye"
    return "mp"


def _eval(v, x, kind: str, method: str | None = None, nterms: int | None = None):
    """(log value, method, terms) at finite v >= 0, finite x > 0, with fallbacks."""
    if method is None:
        method = choose_method(v, x, kind)
    try:
        val, k = METHODS[method](v, x, kind, nterms)
    except NoConvergence:
        if method == "hankel":
            method = "debye" if math.hypot(float(v), float(x)) >= DEBYE_R_MIN else "mp"
        else:
            method = "mp"
        val, k = METHODS[method](v, x, kind, None)
    return val, method, k


# ---------------------------------------------------------------------------------------
# public API


def _to_mpf(a):
    return a if isinstance(a, mp.mpf) else mp.mpf(float(a))


def _domain(v, x, kind: str):
    """Returns (special value or None, |v| to use)."""
    v = _to_mpf(v)
    x = _to_mpf(x)
    if mp.isnan(v) or mp.isnan(x) or x < 0:
        return mp.nan, v
    if kind == "i" and v < 0:
        if not mp.isint(v):
            return mp.nan, v
    v = abs(v)
    if mp.isinf(v):
        return mp.nan, v
    if x == 0:
        if kind == "i":
            return (mp.mpf(0) if v == 0 else mp.ninf), v
        return mp.inf, v
    if mp.isinf(x):
        return (mp.inf if kind == "i" else mp.ninf), v
    return None, v


def log_i(v, x, method: str | None = None):
    """log I_v(x)."""
    sp, va = _domain(v, x, "i")
    if sp is not None:
        return sp
    return _eval(va, _to_mpf(x), "i", method)[0]


def log_k(v, x, method: str | None = None):
    """log K_v(x)."""
    sp, va = _domain(v, x, "k")
    if sp is not None:
        return sp
    return _eval(va, _to_mpf(x), "k", method)[0]


def log_ie(v, x, method: str | None = None):
    """log I_v(x) - x  (log of the exponentially scaled I)."""
    val = log_i(v, x, method)
    x = _to_mpf(x)
    if mp.isinf(x) and not mp.isnan(val):
        return mp.nan if mp.isnan(val) else -mp.log(2 * mp.pi * x) / 2  # -> -inf
    with mp.workdps(WORK_DPS):
        return val - x


def log_ke(v, x, method: str | None = None):
    """log K_v(x) + x."""
    val = log_k(v, x, method)
    x = _to_mpf(x)
    if mp.isinf(x) and not mp.isnan(val):
        return mp.ninf
    with mp.workdps(WORK_DPS):
        return val + x


def iv_ratio(v, x):
    """I_{v+1}(x) / I_v(x)."""
    sp, va = _domain(v, x, "i")
    x = _to_mpf(x)
    if sp is not None:
        if mp.isnan(sp):
            return mp.nan
        return mp.mpf(0) if x == 0 else mp.mpf(1)
    with mp.workdps(WORK_DPS):
        return mp.exp(_eval(va + 1, x, "i")[0] - _eval(va, x, "i")[0])


def dlog_i_dx(v, x):
    """d/dx log I_v(x) = I_{v+1}/I_v + v/x."""
    sp, va = _domain(v, x, "i")
    x = _to_mpf(x)
    if sp is not None:
        if mp.isnan(sp):
            return mp.nan
        if x == 0:
            return mp.mpf(0) if va == 0 else mp.inf
        return mp.mpf(1)
    with mp.workdps(WORK_DPS):
        return iv_ratio(va, x) + va / x


def dlog_k_dx(v, x):
    """d/dx log K_v(x) = v/x - K_{v+1}/K_v."""
    sp, va = _domain(v, x, "k")
    x = _to_mpf(x)
    if sp is not None:
        if mp.isnan(sp):
            return mp.nan
        return mp.ninf if x == 0 else mp.mpf(-1)
    with mp.workdps(WORK_DPS):
        rk = mp.exp(_eval(va + 1, x, "k")[0] - _eval(va, x, "k")[0])
        return va / x - rk


def _dlog_dv(v, x, kind: str):
    """Central difference in v of the analytic log function, step 10^-DERIV_H_DIGITS.

    The method and its number of terms are fixed from the centre point, so both sides
    evaluate the same analytic function (a change in truncation would be a jump that the
    division by 2h magnifies). Step error ~ (h / rho)^2 with rho the distance to the
    nearest complex zero of the Bessel function in v (>= ~2e-3 on the whole domain); the
    rounding error ~ 10^(-DERIV_DPS + DERIV_H_DIGITS) * |log value|.
    """
    global WORK_DPS
    _, method, k = _eval(v, x, kind)
    h = mp.mpf(10) ** (-DERIV_H_DIGITS)
    saved = WORK_DPS
    WORK_DPS = DERIV_DPS
    try:
        with mp.workdps(DERIV_DPS):
            vv = mp.mpf(v)
            if method == "hankel":
                # At half-odd-integer v the centre's series terminates exactly (a factor
                # 4v^2 - (2k-1)^2 vanishes), while at v +- h it does not: the truncation
                # must be the one the neighbours need, or d/dv loses every later term.
                k = max(METHODS[method](vv + h, x, kind, None)[1],
                        METHODS[method](vv - h, x, kind, None)[1])
            fp = METHODS[method](vv + h, x, kind, k or None)[0]
            fm = METHODS[method](vv - h, x, kind, k or None)[0]
            d = (fp - fm) / (2 * h)
    finally:
        WORK_DPS = saved
    return d


def dlog_i_dv(v, x):
    """d/dv log I_v(x) (the analytic continuation in v; at v = 0: -K_0(x)/I_0(x))."""
    sp, va = _domain(v, x, "i")
    x = _to_mpf(x)
    if sp is not None:
        if mp.isnan(sp):
            return mp.nan
        return mp.ninf if x == 0 else mp.mpf(0)
    d = _dlog_dv(va, x, "i")
    if _to_mpf(v) < 0:
        # I_{-n} = I_n for integer n; the derivative of the op's definition in v is then
        # that of |v| with a sign flip (d/dv f(|v|) = -f'(|v|) for v < 0).
        d = -d
    return d


def dlog_k_dv(v, x):
    """d/dv log K_v(x) (odd in v since K_{-v} = K_v)."""
    sp, va = _domain(v, x, "k")
    x = _to_mpf(x)
    if sp is not None:
        if mp.isnan(sp):
            return mp.nan
        if x == 0:
            return mp.mpf(0) if va == 0 else (mp.inf if _to_mpf(v) > 0 else mp.ninf)
        return mp.mpf(0)
    if va == 0:
        return mp.mpf(0)
    d = _dlog_dv(va, x, "k")
    return -d if _to_mpf(v) < 0 else d


# ---------------------------------------------------------------------------------------
# batch evaluation (multiprocessing)

QUANTITIES = ("log_iv", "log_kv", "log_ive", "log_kve", "iv_ratio",
              "dlog_iv_dx", "dlog_kv_dx", "dlog_iv_dv", "dlog_kv_dv")


def point_values(v: float, x: float, derivs: bool = True) -> dict:
    """All reference quantities at one (v, x) as float64 (derivatives in v only if asked),
    plus the method codes used for I and K."""
    v = float(v)
    x = float(x)
    li = log_i(v, x)
    lk = log_k(v, x)
    with mp.workdps(WORK_DPS):
        out = {
            "log_iv": float(li),
            "log_kv": float(lk),
            "log_ive": float(log_ie(v, x)),
            "log_kve": float(log_ke(v, x)),
            "iv_ratio": float(iv_ratio(v, x)),
            "dlog_iv_dx": float(dlog_i_dx(v, x)),
            "dlog_kv_dx": float(dlog_k_dx(v, x)),
        }
    if derivs:
        out["dlog_iv_dv"] = float(dlog_i_dv(v, x))
        out["dlog_kv_dv"] = float(dlog_k_dv(v, x))
    else:
        out["dlog_iv_dv"] = math.nan
        out["dlog_kv_dv"] = math.nan
    ok = v >= 0 and 0 < x < math.inf
    out["method_i"] = choose_method(v, x, "i") if ok else "special"
    out["method_k"] = choose_method(v, x, "k") if ok else "special"
    return out


def _worker(args):
    v, x, derivs = args
    return point_values(v, x, derivs)


def evaluate_many(v, x, derivs=None, processes: int | None = None, chunksize: int = 4,
                  progress: bool = False) -> dict:
    """point_values over arrays (multiprocessing); returns dict of lists."""
    import multiprocessing as mproc
    import os
    import sys
    n = len(v)
    if derivs is None:
        derivs = [True] * n
    tasks = [(float(a), float(b), bool(d)) for a, b, d in zip(v, x, derivs)]
    processes = processes or os.cpu_count() or 1
    results = []
    ctx = mproc.get_context("fork") if hasattr(os, "fork") else mproc.get_context()
    with ctx.Pool(processes) as pool:
        for i, res in enumerate(pool.imap(_worker, tasks, chunksize=chunksize)):
            results.append(res)
            if progress and (i + 1) % 200 == 0:
                print(f"  {i + 1}/{n}", file=sys.stderr, flush=True)
    return {key: [r[key] for r in results] for key in results[0]}
