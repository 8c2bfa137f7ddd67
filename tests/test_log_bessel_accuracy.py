"""Accuracy of the log-Bessel ops against committed mpmath references.

References: tests/reference/log_bessel_ref.npz, made by tests/reference/make_reference_data.py
(mpmath, ~40 correct digits, rounded to float64; tests/test_reference.py checks them).
Points: a 61 x 71 (v, x) grid over v in {0} U [1e-3, 1e6], x in [1e-300, 1e10], transition
points x ~ v z and x ~ v^2, and 1000 random points (v in [1e-2, 1e4], x in [1e-3, 1e5]).

Metric: "mixed" error |got - ref| / max(1, |ref|) (absolute near 0, relative elsewhere).
  values (log_iv, log_kv, log_ive, log_kve)   float64 <= 4e-15
  bessel_iv_ratio (in [0, 1))                  float64 <= 1e-14 relative
  d/dx by autograd                             float64 <= 1e-13 mixed
  d/dv by autograd                             float64 <= 1e-10 mixed
  float32, every op: against the float64 op at the float32-rounded inputs, <= 2e-6 mixed
Where the reference is finite the op must be finite; where it is +-inf, equal.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import diffkern as dk

NPZ = os.path.join(os.path.dirname(__file__), "reference", "log_bessel_ref.npz")

VALUE_OPS = ("log_iv", "log_kv", "log_ive", "log_kve")
TOL_VALUE = 4e-15
TOL_RATIO = 1e-14
TOL_DX = 1e-13
TOL_DV = 1e-10
TOL_F32 = 2e-6

# d/dx of each op from the stored derivatives of log I and log K
DX_REF = {
    "log_iv": lambda d: d["dlog_iv_dx"],
    "log_kv": lambda d: d["dlog_kv_dx"],
    "log_ive": lambda d: d["dlog_iv_dx"] - 1.0,
    "log_kve": lambda d: d["dlog_kv_dx"] + 1.0,
}
DV_REF = {
    "log_iv": "dlog_iv_dv",
    "log_kv": "dlog_kv_dv",
    "log_ive": "dlog_iv_dv",
    "log_kve": "dlog_kv_dv",
}


@pytest.fixture(scope="module")
def ref():
    d = np.load(NPZ)
    return {k: d[k] for k in d.files}


def _op(name):
    return getattr(dk, name)


def _errors(got: np.ndarray, want: np.ndarray, relative: bool = False) -> np.ndarray:
    """Per-point error; inf where finiteness or the sign of an infinity disagree."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    err = np.zeros(want.shape)
    fin = np.isfinite(want)
    with np.errstate(invalid="ignore", over="ignore"):
        scale = np.abs(want[fin]) if relative else np.maximum(1.0, np.abs(want[fin]))
        err[fin] = np.abs(got[fin] - want[fin]) / np.where(scale > 0, scale, 1.0)
        err[fin & (want == 0) & relative] = np.abs(got[fin & (want == 0)]) if relative else 0
    err[fin & ~np.isfinite(got)] = np.inf
    inf = np.isinf(want)
    err[inf & (got != want)] = np.inf
    err[np.isnan(want) & ~np.isnan(got)] = np.inf
    return err


def _check(name, what, v, x, got, want, tol, relative=False, mask=None):
    err = _errors(got, want, relative)
    if mask is not None:
        err = np.where(mask, err, 0.0)
    i = int(np.argmax(err))
    bad = int(np.sum(err > tol))
    nonfinite = int(np.sum(np.isfinite(want) & ~np.isfinite(np.asarray(got, np.float64))
                           & (mask if mask is not None else True)))
    assert err[i] <= tol, (
        f"{name} {what}: max error {err[i]:.3g} > {tol:g} at v={float(v[i])!r}, x={float(x[i])!r}: "
        f"got {float(got[i])!r}, ref {float(want[i])!r}; {bad} points over tolerance, "
        f"{nonfinite} non-finite where the reference is finite")


def _tensors(ref, device, dtype=torch.float64, requires_grad=False):
    v = torch.tensor(ref["v"], dtype=dtype, device=device, requires_grad=requires_grad)
    x = torch.tensor(ref["x"], dtype=dtype, device=device, requires_grad=requires_grad)
    return v, x


@pytest.mark.parametrize("name", VALUE_OPS)
def test_values_float64(ref, device, name):
    v, x = _tensors(ref, device)
    got = _op(name)(v, x).cpu().numpy()
    _check(name, "value (float64)", ref["v"], ref["x"], got, ref[name], TOL_VALUE)


def test_ratio_float64(ref, device):
    v, x = _tensors(ref, device)
    got = dk.bessel_iv_ratio(v, x).cpu().numpy()
    _check("bessel_iv_ratio", "value (float64, relative)", ref["v"], ref["x"], got,
           ref["iv_ratio"], TOL_RATIO, relative=True)


@pytest.mark.parametrize("name", VALUE_OPS)
def test_grad_x_float64(ref, device, name):
    v, x = _tensors(ref, device, requires_grad=True)
    (gx,) = torch.autograd.grad(_op(name)(v, x).sum(), (x,))
    want = DX_REF[name](ref)
    _check(name, "d/dx (float64)", ref["v"], ref["x"], gx.cpu().numpy(), want, TOL_DX)


@pytest.mark.parametrize("name", VALUE_OPS)
def test_grad_v_float64(ref, device, name):
    m = ref["has_dv"]
    vv, xx = ref["v"][m], ref["x"][m]
    v = torch.tensor(vv, dtype=torch.float64, device=device, requires_grad=True)
    x = torch.tensor(xx, dtype=torch.float64, device=device)
    (gv,) = torch.autograd.grad(_op(name)(v, x).sum(), (v,))
    _check(name, "d/dv (float64)", vv, xx, gv.cpu().numpy(), ref[DV_REF[name]][m], TOL_DV)


@pytest.mark.parametrize("name", VALUE_OPS + ("bessel_iv_ratio",))
def test_float32_matches_float64_at_rounded_inputs(ref, device, name):
    # Inputs outside the float32 range (x = 1e-300) round to 0 and are compared with the
    # float64 op at x = 0 (the limits, e.g. -inf): the float32 op must agree there too.
    v32 = torch.tensor(ref["v"], dtype=torch.float32, device=device)
    x32 = torch.tensor(ref["x"], dtype=torch.float32, device=device)
    got = _op(name)(v32, x32)
    assert got.dtype == torch.float32
    want = _op(name)(v32.double(), x32.double())
    _check(name, "float32 vs float64 op at rounded inputs", v32.cpu().numpy(),
           x32.cpu().numpy(), got.double().cpu().numpy(), want.cpu().numpy(), TOL_F32)


# ------------------------------------------------------------------------------------
# special values


def _f64(vals, device):
    return torch.tensor(vals, dtype=torch.float64, device=device)


def test_limits_at_zero(device, dtype):
    v = torch.tensor([0.0, 0.5, 1.0, 3.7, 1e6], dtype=dtype, device=device)
    x = torch.zeros_like(v)
    ninf, inf = -math.inf, math.inf
    want_i = [0.0, ninf, ninf, ninf, ninf]
    assert dk.log_iv(v, x).tolist() == want_i
    assert dk.log_ive(v, x).tolist() == want_i
    assert dk.log_kv(v, x).tolist() == [inf] * 5
    assert dk.log_kve(v, x).tolist() == [inf] * 5
    assert dk.bessel_iv_ratio(v, x).tolist() == [0.0] * 5
    # negative orders for K at 0 as well
    assert dk.log_kv(-v, x).tolist() == [inf] * 5


@pytest.mark.parametrize("name", VALUE_OPS + ("bessel_iv_ratio",))
def test_nan_domain(device, dtype, name):
    f = _op(name)
    v = torch.tensor([1.0, 2.5, math.nan, 0.0, 7.0], dtype=dtype, device=device)
    x = torch.tensor([-1.0, -1e-30, 1.0, math.nan, -math.inf], dtype=dtype, device=device)
    assert torch.isnan(f(v, x)).all(), f"{name}: x < 0 or NaN input must give NaN"


@pytest.mark.parametrize("name", ("log_iv", "log_ive", "bessel_iv_ratio"))
def test_noninteger_negative_order_of_i_is_nan(device, dtype, name):
    v = torch.tensor([-0.5, -1.25, -1e-3, -10.5], dtype=dtype, device=device)
    x = torch.full_like(v, 2.0)
    got = _op(name)(v, x)
    assert torch.isnan(got).all(), f"{name}: non-integer v < 0 must give NaN, got {got.tolist()}"


@pytest.mark.parametrize("name", ("log_iv", "log_ive"))
def test_integer_negative_order_of_i(device, name):
    v = _f64([1.0, 2.0, 3.0, 17.0], device)
    x = _f64([0.3, 2.0, 40.0, 5.0], device)
    got, want = _op(name)(-v, x), _op(name)(v, x)
    assert torch.equal(got, want), f"{name}: I_(-n) = I_n: got {got.tolist()}, want {want.tolist()}"
    z = torch.zeros_like(v)
    got, want = _op(name)(-v, z), _op(name)(v, z)
    assert torch.equal(got, want), f"{name} at x = 0: got {got.tolist()}, want {want.tolist()}"


@pytest.mark.parametrize("name", ("log_kv", "log_kve"))
def test_negative_order_of_k(device, name):
    v = _f64([0.25, 1.0, 2.3, 50.5, 1e4], device)
    x = _f64([0.3, 2.0, 40.0, 5.0, 1e3], device)
    got, want = _op(name)(-v, x), _op(name)(v, x)
    assert torch.equal(got, want), f"{name}: K_(-v) = K_v: got {got.tolist()}, want {want.tolist()}"


def test_infinite_x(device, dtype):
    v = torch.tensor([0.0, 0.5, 3.0, 1e3], dtype=dtype, device=device)
    x = torch.full_like(v, math.inf)
    assert dk.log_iv(v, x).tolist() == [math.inf] * 4
    assert dk.log_kv(v, x).tolist() == [-math.inf] * 4


def test_infinite_x_scaled_and_ratio(device, dtype):
    # log I_v(x) - x ~ -log(2 pi x)/2 and log K_v(x) + x ~ log(pi/(2x))/2 both -> -inf;
    # I_{v+1}/I_v -> 1.
    v = torch.tensor([0.0, 0.5, 3.0, 1e3], dtype=dtype, device=device)
    x = torch.full_like(v, math.inf)
    assert dk.log_ive(v, x).tolist() == [-math.inf] * 4
    assert dk.log_kve(v, x).tolist() == [-math.inf] * 4
    assert dk.bessel_iv_ratio(v, x).tolist() == [1.0] * 4


# ------------------------------------------------------------------------------------
# second derivatives, huge arguments, negative integer orders (issue 9, items 3, 4, 6, 7)

NPZ_D2 = os.path.join(os.path.dirname(__file__), "reference", "log_bessel_d2_ref.npz")
SECOND_OPS = ("iv_ratio_dx", "d2log_iv_dx2", "d2log_kv_dx2")
TOL_D2 = 1e-10  # relative (the values reach 1e-20 at x = 1e10: mixed would say nothing)


@pytest.fixture(scope="module")
def ref2():
    d = np.load(NPZ_D2)
    return {k: d[k] for k in d.files}


@pytest.mark.parametrize("op", SECOND_OPS)
def test_second_derivative_ops_float64(ref2, device, op):
    from diffkern.special import _OPS, _log_bessel
    v, x = _f64(ref2["v"], device), _f64(ref2["x"], device)
    got = _log_bessel(v, x, _OPS[op]).cpu().numpy()
    _check(op, "(float64, relative)", ref2["v"], ref2["x"], got, ref2[op], TOL_D2,
           relative=True)


@pytest.mark.parametrize("name", VALUE_OPS + ("dlog_iv_dx",))
def test_second_x_derivative_by_autograd(ref2, device, name):
    # create_graph=True twice through the public ops: the second derivative of
    # log_iv/log_ive is d2/dx2 log I (the scaling is linear in x), of log_kv/log_kve
    # d2/dx2 log K; the first derivative of the ratio is its own op.
    fn = dk.bessel_iv_ratio if name == "dlog_iv_dx" else _op(name)
    v = _f64(ref2["v"], device)
    x = _f64(ref2["x"], device).requires_grad_()
    (g,) = torch.autograd.grad(fn(v, x).sum(), x, create_graph=True)
    if name == "dlog_iv_dx":
        got, want = g, ref2["iv_ratio_dx"]
    else:
        (got,) = torch.autograd.grad(g.sum(), x)
        want = ref2["d2log_iv_dx2" if name.startswith("log_i") else "d2log_kv_dx2"]
    _check(name, "d2/dx2 by autograd (float64, relative)", ref2["v"], ref2["x"],
           got.detach().cpu().numpy(), want, TOL_D2, relative=True)


def test_second_derivative_limits_at_zero(device, dtype):
    from diffkern.special import _OPS, _log_bessel
    v = torch.tensor([0.0, 0.5, 1.0, 3.0, 1e6], dtype=dtype, device=device)
    x = torch.zeros_like(v)
    # R ~ x / (2 (v+1)): R'(0) = 1 / (2 (v+1)); d2/dx2 log I_0 -> 1/2, else -v/x^2 -> -inf;
    # d2/dx2 log K -> +inf.
    want = (0.5 / (v.double() + 1)).to(dtype)
    torch.testing.assert_close(_log_bessel(v, x, _OPS["iv_ratio_dx"]), want, rtol=1e-6, atol=0)
    assert _log_bessel(v, x, _OPS["d2log_iv_dx2"]).tolist() == [0.5] + [-math.inf] * 4
    assert _log_bessel(v, x, _OPS["d2log_kv_dx2"]).tolist() == [math.inf] * 5
    # the cases, through autograd
    xr = torch.zeros(1, dtype=dtype, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(dk.bessel_iv_ratio(torch.ones_like(xr), xr).sum(), xr)
    assert g.item() == 0.25
    (g,) = torch.autograd.grad(dk.log_iv(torch.zeros_like(xr), xr).sum(), xr,
                               create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), xr)
    assert h.item() == 0.5


def test_second_derivatives_below_1e154_are_not_nan(device):
    # x^2 underflows there; the true values overflow to +-inf or are finite limits.
    from diffkern.special import _OPS, _log_bessel
    v = _f64([0.0, 1e-3, 0.5, 1.0, 7.0, 25.0, 1e5], device).reshape(-1, 1)
    x = _f64([5e-324, 1e-310, 1e-200, 1e-160], device).reshape(1, -1)
    for op in SECOND_OPS:
        got = _log_bessel(v, x, _OPS[op])
        assert not torch.isnan(got).any(), f"{op}: NaN at {got}"
    r = _log_bessel(v, x, _OPS["iv_ratio_dx"])
    torch.testing.assert_close(r, (0.5 / (v + 1)).expand_as(r), rtol=1e-14, atol=0)
    assert (_log_bessel(v[1:], x, _OPS["d2log_iv_dx2"]) == -math.inf).all()
    assert (_log_bessel(v, x, _OPS["d2log_kv_dx2"]) == math.inf).all()
    assert (_log_bessel(v[:1], x, _OPS["d2log_iv_dx2"]) == 0.5).all()


def test_huge_arguments_float64(ref2, device):
    # v or x past ~1.3e154, where v^2, x^2 or v x overflow (mpmath at 400 digits).
    v, x = _f64(ref2["hv"], device), _f64(ref2["hx"], device)
    from diffkern.special import _OPS, _log_bessel
    for name in VALUE_OPS + ("iv_ratio", "dlog_iv_dx", "dlog_kv_dx"):
        fn = getattr(dk, name, None) if name in VALUE_OPS else None
        got = fn(v, x) if fn is not None else _log_bessel(v, x, _OPS[name])
        _check(name, "huge v or x (float64)", ref2["hv"], ref2["hx"], got.cpu().numpy(),
               ref2["h_" + name], TOL_VALUE)
    for name in ("dlog_iv_dv", "dlog_kv_dv") + SECOND_OPS:
        got = _log_bessel(v, x, _OPS[name])
        assert not torch.isnan(got).any(), f"{name}: NaN at huge arguments: {got.tolist()}"


def test_infinite_order_and_argument_is_nan(device, dtype):
    from diffkern.special import _OPS, _log_bessel
    v = torch.tensor([math.inf, -math.inf], dtype=dtype, device=device)
    x = torch.full_like(v, math.inf)
    for op in _OPS.values():
        assert torch.isnan(_log_bessel(v, x, op)).all(), f"op {op} at (+-inf, inf)"


def test_negative_integer_orders_every_op(device):
    # I_{-n} = I_n: the logs and their x-derivatives equal those at n; the ratio is
    # I_{1-n} / I_{-n} = I_{n-1} / I_n = 2n/x + I_{n+1}/I_n; d/dv log I at -n is
    # -d/dv log I_n - 2 (-1)^n K_n / I_n (I_{-v} = I_v + (2/pi) sin(v pi) K_v).
    import mpmath as mp
    from diffkern.special import _OPS, _log_bessel
    n = _f64([1.0, 1.0, 2.0, 3.0, 7.0, 20.0, 25.0, 3.0], device)
    x = _f64([3.0, 1e-5, 0.5, 40.0, 12.0, 30.0, 1e3, 1e-200], device)
    for op in ("log_iv", "log_ive", "dlog_iv_dx", "d2log_iv_dx2"):
        torch.testing.assert_close(_log_bessel(-n, x, _OPS[op]), _log_bessel(n, x, _OPS[op]),
                                   rtol=0, atol=0)
    ratio = dk.bessel_iv_ratio(-n, x)
    want = [float(mp.besseli(int(a) - 1, b) / mp.besseli(int(a), b))
            for a, b in zip(n.tolist()[:-1], x.tolist()[:-1])]
    torch.testing.assert_close(ratio[:-1].cpu(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-14, atol=0)
    assert ratio[-1].item() == 2 * 3.0 / 1e-200
    assert dk.bessel_iv_ratio(_f64([-1.0], device), _f64([3.0], device)).item() == \
        pytest.approx(1.2345903159739333, rel=1e-15)
    xr = x[:-1].clone().requires_grad_()
    (g,) = torch.autograd.grad(dk.bessel_iv_ratio(-n[:-1], xr).sum(), xr)
    with mp.workdps(40):
        want = [float(mp.diff(lambda t: mp.besseli(int(a) - 1, t) / mp.besseli(int(a), t), b))
                for a, b in zip(n.tolist()[:-1], x.tolist()[:-1])]
    torch.testing.assert_close(g.cpu(), torch.tensor(want, dtype=torch.float64), rtol=1e-12,
                               atol=0)
    got = _log_bessel(-n[:5], x[:5], _OPS["dlog_iv_dv"]).cpu()
    with mp.workdps(40):
        want = [float(mp.diff(lambda t: mp.log(mp.besseli(t, b)), -a))
                for a, b in zip(n.tolist()[:5], x.tolist()[:5])]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    # at x = 0: the ratio -> +inf, its derivative -> -inf
    z = torch.zeros(2, dtype=torch.float64, device=device)
    assert dk.bessel_iv_ratio(-n[:2], z).tolist() == [math.inf, math.inf]
    assert _log_bessel(-n[:2], z, _OPS["iv_ratio_dx"]).tolist() == [-math.inf, -math.inf]


@pytest.mark.parametrize("op", ("log_iv", "log_ive", "iv_ratio", "dlog_iv_dx", "dlog_iv_dv",
                                "iv_ratio_dx", "d2log_iv_dx2"))
def test_noninteger_negative_order_every_i_op_is_nan(device, dtype, op):
    from diffkern.special import _OPS, _log_bessel
    v = torch.tensor([-0.5, -1.25, -1e-3, -10.5, -2.5, -math.inf], dtype=dtype,
                     device=device)
    x = torch.full_like(v, 2.0)
    assert torch.isnan(_log_bessel(v, x, _OPS[op])).all()
