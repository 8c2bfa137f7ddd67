"""Behaviour of the log-Bessel ops as torch ops: shapes, dtypes, devices, autograd,
torch.library registration, torch.compile, CUDA streams and graphs, errors.

Accuracy against mpmath lives in test_log_bessel_accuracy.py; here the references are
SciPy (at points where it is accurate) and the ops' own float64 results.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import scipy.special as sps
import torch

import diffkern as dk
from diffkern.special import _log_bessel, _OPS
from tests import op_contract as contract

FUNCS = {
    "log_iv": dk.log_iv,
    "log_kv": dk.log_kv,
    "log_ive": dk.log_ive,
    "log_kve": dk.log_kve,
    "bessel_iv_ratio": dk.bessel_iv_ratio,
}


def _scipy(name, v, x):
    if name == "log_iv":
        return np.log(sps.iv(v, x))
    if name == "log_kv":
        return np.log(sps.kv(v, x))
    if name == "log_ive":
        return np.log(sps.ive(v, x))
    if name == "log_kve":
        return np.log(sps.kve(v, x))
    return sps.ive(v + 1, x) / sps.ive(v, x)


def _random_points(n, device, dtype, seed=0, vmax=50.0, xlo=1e-2, xhi=1e2):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(n, generator=g, dtype=torch.float64) * vmax
    x = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(np.log(xlo), np.log(xhi),
                                                                generator=g))
    return v.to(device=device, dtype=dtype), x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("name", list(FUNCS))
def test_matches_scipy_where_scipy_is_accurate(name, device, dtype):
    v, x = _random_points(2000, device, dtype)
    got = FUNCS[name](v, x)
    assert got.dtype == dtype and got.device.type == device and got.shape == v.shape
    ref = _scipy(name, v.double().cpu().numpy(), x.double().cpu().numpy())
    ok = np.isfinite(ref)
    assert ok.mean() > 0.95  # the comparison must cover most points
    err = np.abs(got.double().cpu().numpy()[ok] - ref[ok]) / np.maximum(1, np.abs(ref[ok]))
    tol = 1e-12 if dtype == torch.float64 else 5e-6
    assert err.max() < tol, f"{name}: max error {err.max():.2e}"


@pytest.mark.parametrize("name", list(FUNCS))
def test_broadcasting_and_noncontiguous(name, device, dtype):
    v = torch.linspace(0, 30, 7, dtype=dtype, device=device).reshape(7, 1)
    x = torch.logspace(-3, 3, 10, dtype=dtype, device=device).reshape(1, 10)
    got = FUNCS[name](v, x)
    assert got.shape == (7, 10)
    vd, xd = v.expand(7, 10).contiguous(), x.expand(7, 10).contiguous()
    dense = FUNCS[name](vd, xd)
    torch.testing.assert_close(got, dense, rtol=0, atol=0)
    # Transposed, strided and offset views, dense and broadcast against each other.
    contract.check_noncontiguous(FUNCS[name], vd, xd)
    contract.check_noncontiguous(FUNCS[name], v, x.reshape(10))


@pytest.mark.parametrize("name", list(FUNCS))
def test_scalars_and_zero_size(name, device):
    x = torch.tensor([0.5, 2.0], dtype=torch.float64, device=device)
    torch.testing.assert_close(FUNCS[name](1.5, x),
                               FUNCS[name](torch.full_like(x, 1.5), x), rtol=0, atol=0)
    empty = torch.empty(0, 3, dtype=torch.float64, device=device)
    contract.check_zero_size(FUNCS[name], empty, 1.0, shape=(0, 3))
    contract.check_zero_size(FUNCS[name], empty, x[:1].expand(3), shape=(0, 3))
    if name != "bessel_iv_ratio":  # no derivative in v
        contract.check_zero_size(FUNCS[name], empty.clone().requires_grad_(),
                                 x[:1].expand(3).clone().requires_grad_(), shape=(0, 3))


@pytest.mark.parametrize("op", list(_OPS.values()))
def test_every_output_element_is_written(op, device):
    v, x = _random_points(4096, device, torch.float64, seed=3)
    out = contract.check_poisoned_outputs(_log_bessel, v, x, op)
    assert torch.isfinite(out).all(), f"op {op} gave non-finite values"


@pytest.mark.parametrize("name", list(FUNCS))
def test_every_output_element_is_written_direct_call(name, device, dtype):
    # The public functions on plain tensors skip the dispatcher: a path of their own.
    v, x = _random_points(4096, device, dtype, seed=4)
    out = contract.check_poisoned_outputs(FUNCS[name], v, x)
    assert torch.isfinite(out).all()


def test_numpy_in_numpy_out():
    v = np.array([0.0, 1.0, 2.5])
    x = np.array([1.0, 2.0, 30.0])
    got = dk.log_iv(v, x)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    np.testing.assert_allclose(got, np.log(sps.iv(v, x)), rtol=1e-14)
    got32 = dk.log_kv(v.astype(np.float32), x.astype(np.float32))
    assert got32.dtype == np.float32


def test_dtype_promotion(device):
    x = torch.tensor([1.0, 2.0], device=device)
    assert dk.log_iv(torch.tensor([1, 2], device=device), x).dtype == torch.float32
    for low in (torch.float16, torch.bfloat16):
        got = dk.log_ive(torch.tensor([1.0], dtype=low, device=device),
                         torch.tensor([3.0], dtype=low, device=device))
        assert got.dtype == low
        assert abs(got.item() - np.log(sps.ive(1.0, 3.0))) < 1e-2


def test_special_values():
    inf, nan = float("inf"), float("nan")
    v = torch.tensor([0.0, 1.0, 2.0, 1.0, -2.0, -1.5, nan, 1.0, 1.0], dtype=torch.float64)
    x = torch.tensor([0.0, 0.0, 3.0, -1.0, 3.0, 3.0, 1.0, nan, inf], dtype=torch.float64)
    i = dk.log_iv(v, x)
    assert i[0] == 0 and i[1] == -inf
    assert torch.isclose(i[4], i[2])  # I_{-2} = I_2
    assert torch.isnan(i[3]) and torch.isnan(i[5]) and torch.isnan(i[6]) and torch.isnan(i[7])
    assert i[8] == inf
    k = dk.log_kv(v, x)
    assert k[0] == inf and k[1] == inf
    assert torch.isnan(k[3]) and torch.isnan(k[6]) and torch.isnan(k[7])
    assert k[8] == -inf
    torch.testing.assert_close(dk.log_kv(-v[2:3], x[2:3]), k[2:3])  # K_{-v} = K_v
    assert dk.bessel_iv_ratio(torch.tensor([3.0], dtype=torch.float64),
                              torch.tensor([0.0], dtype=torch.float64)).item() == 0.0


def test_extreme_arguments_are_finite():
    v = torch.tensor([0.0, 1e-3, 1.0, 19.99, 20.0, 1e3, 1e6], dtype=torch.float64)
    x = torch.tensor([5e-324, 1e-300, 1e-20, 1.0, 1e5, 1e10], dtype=torch.float64)
    vv, xx = torch.meshgrid(v, x, indexing="ij")
    for name, fn in FUNCS.items():
        out = fn(vv, xx)
        assert torch.isfinite(out).all(), f"{name} non-finite at {vv[~torch.isfinite(out)]}"


# ------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("name", ["log_iv", "log_kv", "log_ive", "log_kve"])
def test_gradcheck_in_v_and_x(name, device):
    v = torch.tensor([0.3, 2.0, 7.5, 25.0, 60.0], dtype=torch.float64, device=device,
                     requires_grad=True)
    x = torch.tensor([0.2, 3.0, 12.0, 40.0, 50.0], dtype=torch.float64, device=device,
                     requires_grad=True)
    torch.autograd.gradcheck(FUNCS[name], (v, x), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", ["log_iv", "log_kv", "log_ive", "log_kve", "bessel_iv_ratio"])
def test_gradgradcheck_in_x(name, device):
    v = torch.tensor([0.0, 1.5, 10.0, 30.0], dtype=torch.float64, device=device)
    x = torch.tensor([0.5, 4.0, 9.0, 35.0], dtype=torch.float64, device=device,
                     requires_grad=True)
    fn = lambda xx: FUNCS[name](v, xx)  # noqa: E731
    torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
    torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradient_broadcasts_back_to_input_shapes(device):
    v = torch.tensor(2.5, dtype=torch.float64, device=device, requires_grad=True)
    x = torch.linspace(0.5, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    dk.log_iv(v, x).sum().backward()
    assert v.grad.shape == () and x.grad.shape == (6,)
    # d/dv summed over x equals the sum of the elementwise derivatives.
    expected = _log_bessel(v.detach().expand(6), x.detach(), _OPS["dlog_iv_dv"]).sum()
    torch.testing.assert_close(v.grad, expected)


def test_ratio_derivative_in_v_raises():
    v = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="order v"):
        dk.bessel_iv_ratio(v, torch.tensor([2.0], dtype=torch.float64)).sum().backward()


def test_v_requiring_grad_raises_only_when_its_gradient_is_used():
    # Issue 9 item 9: v and x both require grad, only the x-gradient is asked for: no
    # error, and the same x-gradient as with v detached. Asking for v's gradient (or a
    # backward() that would fill v.grad) raises, naming the public function and v.
    v = torch.tensor([1.0, 2.5], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0.5, 3.0], dtype=torch.float64, requires_grad=True)
    for fn in (dk.bessel_iv_ratio, lambda a, b: dk.bessel_iv_ratio(a * 2, b)):
        (gx,) = torch.autograd.grad(fn(v, x).sum(), x)
        (want,) = torch.autograd.grad(fn(v.detach(), x).sum(), x)
        torch.testing.assert_close(gx, want, rtol=0, atol=0)
        with pytest.raises(NotImplementedError, match=r"diffkern\.bessel_iv_ratio.*\bv\b"):
            torch.autograd.grad(fn(v, x).sum(), v)
        with pytest.raises(NotImplementedError, match="v.detach"):
            fn(v, x).sum().backward()
    # Second derivatives: d/dx of the x-gradient works with v requiring grad; the
    # mixed derivative (d/dv of the x-gradient) raises.
    (gx,) = torch.autograd.grad(dk.log_iv(v, x).sum(), x, create_graph=True)
    (gxx,) = torch.autograd.grad(gx.sum(), x, retain_graph=True)
    assert torch.isfinite(gxx).all()
    with pytest.raises(NotImplementedError, match="log_iv/log_ive"):
        torch.autograd.grad(gx.sum(), v)


# ----------------------------------------------------------- torch.library / compile


@pytest.mark.parametrize("op", list(_OPS.values()))
def test_opcheck(op, device):
    v = torch.tensor([0.5, 3.0, 25.0], dtype=torch.float64, device=device)
    x = torch.tensor([[0.7], [8.0]], dtype=torch.float64, device=device)
    differentiable = op in (_OPS["log_iv"], _OPS["log_kv"], _OPS["log_ive"], _OPS["log_kve"])
    if differentiable:
        v = v.requires_grad_()
        x = x.requires_grad_()
    contract.check_opcheck(torch.ops.diffkern.log_bessel.default, (v, x, op))


def test_torch_compile_fullgraph(device):
    def f(v, x):
        return dk.log_ive(v, x).sum() + dk.bessel_iv_ratio(v, x).mean()

    v = torch.tensor([0.5, 3.0, 25.0], dtype=torch.float64, device=device)
    x = torch.tensor([0.7, 8.0, 30.0], dtype=torch.float64, device=device, requires_grad=True)
    contract.check_compile(f, v, x)


def test_vmap(device):
    v = torch.tensor([0.5, 3.0, 25.0], dtype=torch.float64, device=device)
    x = torch.rand(4, 3, dtype=torch.float64, device=device) * 30 + 0.1
    got = torch.func.vmap(dk.log_kv, in_dims=(None, 0))(v, x)
    torch.testing.assert_close(got, dk.log_kv(v, x), rtol=0, atol=0)
    got = torch.func.vmap(dk.log_iv, in_dims=(0, 1))(x.t().contiguous(), x)
    torch.testing.assert_close(got, dk.log_iv(x.t(), x.t()), rtol=0, atol=0)


# ---------------------------------------------------------------------- bad input


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="cannot be broadcast"):
        dk.log_iv(torch.ones(3), torch.ones(4))
    with pytest.raises(TypeError, match="x"):
        dk.log_kv(1.0, "abc")
    with pytest.raises(TypeError, match="v"):
        dk.log_kv(torch.ones(2, dtype=torch.complex64), torch.ones(2))


@pytest.mark.cuda
def test_mismatched_devices(cuda_device):
    with pytest.raises(ValueError, match="same device"):
        dk.log_iv(torch.ones(3), torch.ones(3, device=cuda_device))


# ------------------------------------------------------------------- CUDA specifics


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(FUNCS))
def test_cuda_matches_cpu(name, dtype, cuda_device):
    v, x = _random_points(100_000, "cpu", dtype, seed=5, vmax=200.0, xlo=1e-4, xhi=1e4)
    cpu = FUNCS[name](v, x)
    gpu = FUNCS[name](v.to(cuda_device), x.to(cuda_device)).cpu()
    tol = 4e-15 if dtype == torch.float64 else 2e-6
    err = (gpu.double() - cpu.double()).abs() / cpu.double().abs().clamp_min(1)
    assert err.max().item() < tol


@pytest.mark.cuda
def test_side_stream_and_graph_capture(cuda_device):
    v, x = _random_points(10_000, cuda_device, torch.float64, seed=7)
    contract.check_side_stream(dk.log_ive, v, x)
    contract.check_cuda_graph(dk.log_ive, [(v, x), _random_points(10_000, cuda_device,
                                                                   torch.float64, seed=8)])


# ------------------------------ second x-derivative of bessel_iv_ratio (issue 9, item 6)
#
# The op iv_ratio_dx2 (d2/dx2 of R = I_{v+1}/I_v) serves autograd's double backward of
# bessel_iv_ratio. Reference: tests/reference/log_bessel_d2_ref.npz (r2_v, r2_x,
# iv_ratio_dx2; mpmath at 50 + 3 |log10 x| digits, see make_second_derivative_reference.py),
# v in [0, 1e5], x in [1e-300, 1e10], with the op's branch limits on both sides.

NPZ_D2 = os.path.join(os.path.dirname(__file__), "reference", "log_bessel_d2_ref.npz")
TOL_R2 = 1e-10


@pytest.fixture(scope="module")
def ratio_second_ref():
    d = np.load(NPZ_D2)
    return d["r2_v"], d["r2_x"], d["iv_ratio_dx2"]


def _assert_second_derivative_close(got, v, x, want, what):
    """Relative error <= TOL_R2 where the reference is a normal number (R'' reaches
    1e-316 at x = 1e-300, v = 1e5: there subnormal, and the mixed error
    |got - want| / max(1, |want|) <= TOL_R2 is asserted instead)."""
    got = np.asarray(got, dtype=np.float64)
    assert np.isfinite(got).all(), f"{what}: non-finite at (v, x) = " \
        f"{list(zip(v[~np.isfinite(got)], x[~np.isfinite(got)]))[:5]}"
    normal = np.abs(want) >= np.finfo(np.float64).tiny
    rel = np.abs(got - want) / np.where(normal, np.abs(want), 1.0)
    mixed = np.abs(got - want) / np.maximum(1.0, np.abs(want))
    err = np.where(normal, rel, mixed)
    i = int(np.argmax(err))
    assert err[i] <= TOL_R2, (f"{what}: error {err[i]:.3g} at v={v[i]!r}, x={x[i]!r}: "
                              f"got {got[i]!r}, want {want[i]!r}")


def test_iv_ratio_dx2_op_matches_mpmath(ratio_second_ref, device):
    v, x, want = ratio_second_ref
    vt = torch.tensor(v, dtype=torch.float64, device=device)
    xt = torch.tensor(x, dtype=torch.float64, device=device)
    got = _log_bessel(vt, xt, _OPS["iv_ratio_dx2"]).cpu().numpy()
    _assert_second_derivative_close(got, v, x, want, "iv_ratio_dx2 (float64)")


def test_bessel_iv_ratio_second_derivative_by_autograd(ratio_second_ref, device):
    v, x, want = ratio_second_ref
    vt = torch.tensor(v, dtype=torch.float64, device=device)
    xt = torch.tensor(x, dtype=torch.float64, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(dk.bessel_iv_ratio(vt, xt).sum(), xt, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), xt)
    _assert_second_derivative_close(h.cpu().numpy(), v, x, want,
                                    "d2/dx2 bessel_iv_ratio by autograd (float64)")


def test_bessel_iv_ratio_second_derivative_issue_points(device):
    # The issue's reproducer: bessel_iv_ratio(0.5, x) at x = 1e-8 gave -2.22e-9 (true
    # -1.33e-9). At v = 1/2 the ratio is elementary, R = coth x - 1/x, so
    # R'' = 2 coth(x) / sinh(x)^2 - 2/x^3 (evaluated in mpmath at 700 digits: it cancels).
    import mpmath as mp
    xs = [1e-300, 1e-160, 1e-12, 1e-8, 1e-4, 0.3, 3.9, 4.1, 25.0, 31.0, 200.0, 1e5, 1e10]
    with mp.workdps(700):
        want = [float(2 * mp.coth(t) / mp.sinh(t) ** 2 - 2 / t ** 3)
                for t in (mp.mpf(a) for a in xs)]
    x = torch.tensor(xs, dtype=torch.float64, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(dk.bessel_iv_ratio(torch.full_like(x, 0.5), x).sum(), x,
                               create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    _assert_second_derivative_close(h.cpu().numpy(), np.full(len(xs), 0.5), np.array(xs),
                                    np.array(want), "d2/dx2 bessel_iv_ratio(0.5, x)")
    assert h[3].item() == pytest.approx(-4.0 / 3.0 * 1e-9, rel=1e-14)


def test_iv_ratio_dx2_limits(device, dtype):
    # R is odd in x (R = x/(2(v+1)) - x^3/(8 (v+1)^2 (v+2)) + ...): R''(0) = 0, and
    # below x ~ 1e-154 (where x^2 underflows) R'' = -3x / (4 (v+1)^2 (v+2)) to rounding.
    # R -> 1 as x -> inf and R -> 0 as v -> inf: R'' -> 0 at both.
    inf = float("inf")
    op = _OPS["iv_ratio_dx2"]
    v = torch.tensor([0.0, 0.5, 1.0, 3.0, 25.0, 1e6], dtype=dtype, device=device)
    assert _log_bessel(v, torch.zeros_like(v), op).tolist() == [0.0] * 6
    assert _log_bessel(v, torch.full_like(v, inf), op).tolist() == [0.0] * 6
    x = torch.tensor([1e-30, 1.0, 30.0, 1e30], dtype=dtype, device=device)
    assert _log_bessel(torch.full_like(x, inf), x, op).tolist() == [0.0] * 4
    # through autograd, at 0 (issue item 7's class of case: no NaN)
    xr = torch.zeros(6, dtype=dtype, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(dk.bessel_iv_ratio(v, xr).sum(), xr, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), xr)
    assert h.tolist() == [0.0] * 6


def test_iv_ratio_dx2_below_1e154(device):
    op = _OPS["iv_ratio_dx2"]
    v = torch.tensor([0.0, 1e-3, 0.5, 7.0, 19.5, 25.0, 1e5], dtype=torch.float64,
                     device=device).reshape(-1, 1)
    x = torch.tensor([5e-324, 1e-310, 1e-200, 1e-160], dtype=torch.float64,
                     device=device).reshape(1, -1)
    got = _log_bessel(v, x, op)
    want = -3 * x / (4 * (v + 1) ** 2 * (v + 2))
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got[:, 2:], want[:, 2:], rtol=1e-14, atol=0)
    # subnormal results: within a few subnormal steps of the formula
    assert ((got[:, :2] - want[:, :2]).abs() <= 1e-320).all()
    assert (got <= 0).all()


def test_iv_ratio_dx2_negative_integer_orders(device):
    # R at v = -n is I_{1-n}/I_{-n} = I_{n-1}/I_n = 2n/x + I_{n+1}/I_n: its second
    # derivative is 4n/x^3 + R_n'' (+inf at x = 0); other negative orders give NaN.
    import mpmath as mp
    n = [1, 1, 2, 3, 7, 20, 25, 3]
    xs = [3.0, 1e-5, 0.5, 40.0, 12.0, 30.0, 1e3, 1e-3]
    with mp.workdps(60):
        want = [float(mp.diff(lambda t: mp.besseli(k - 1, t) / mp.besseli(k, t), mp.mpf(a), 2))
                for k, a in zip(n, xs)]
    v = torch.tensor([-float(k) for k in n], dtype=torch.float64, device=device)
    x = torch.tensor(xs, dtype=torch.float64, device=device, requires_grad=True)
    got = _log_bessel(v, x.detach(), _OPS["iv_ratio_dx2"])
    _assert_second_derivative_close(got.cpu().numpy(), v.cpu().numpy(), np.array(xs),
                                    np.array(want), "iv_ratio_dx2 at negative integer v")
    (g,) = torch.autograd.grad(dk.bessel_iv_ratio(v, x).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(h, got, rtol=0, atol=0)
    z = torch.zeros(2, dtype=torch.float64, device=device)
    assert _log_bessel(v[:2], z, _OPS["iv_ratio_dx2"]).tolist() == [float("inf")] * 2
    bad = torch.tensor([-0.5, -2.5, -float("inf")], dtype=torch.float64, device=device)
    assert torch.isnan(_log_bessel(bad, torch.full_like(bad, 2.0), _OPS["iv_ratio_dx2"])).all()


def test_iv_ratio_dx2_float32_is_the_float64_op_rounded(device):
    # Computed in double for float inputs too (as the other second-derivative ops).
    v, x = _random_points(2000, device, torch.float32, seed=11, vmax=60.0, xlo=1e-6, xhi=1e6)
    got = _log_bessel(v, x, _OPS["iv_ratio_dx2"])
    assert got.dtype == torch.float32
    want = _log_bessel(v.double(), x.double(), _OPS["iv_ratio_dx2"]).float()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bessel_iv_ratio_third_derivative(device):
    # Third and higher orders come from the Bessel equation (R''' from R, R', R''): exact
    # in form, accurate where it does not cancel (moderate x), checked here against
    # mpmath's numerical derivative at 50 digits.
    import mpmath as mp
    vs = [0.0, 1.5, 10.0, 30.0, 0.5]
    xs = [0.5, 4.0, 9.0, 35.0, 150.0]
    with mp.workdps(50):
        want = [float(mp.diff(lambda t: mp.besseli(a + 1, t) / mp.besseli(a, t), mp.mpf(b), 3))
                for a, b in zip(vs, xs)]
    v = torch.tensor(vs, dtype=torch.float64, device=device)
    x = torch.tensor(xs, dtype=torch.float64, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(dk.bessel_iv_ratio(v, x).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x, create_graph=True)
    (t,) = torch.autograd.grad(h.sum(), x)
    torch.testing.assert_close(t.cpu(), torch.tensor(want, dtype=torch.float64), rtol=1e-9,
                               atol=0)


def test_ratio_dx_and_d2log_iv_below_order_20_at_moderate_x(device):
    # d/dx R and d2/dx2 log I: for v < 20 and 4 < x <= 35 the series' derivative sums
    # cancel (1.8e-12 and 5.7e-12 relative at x = 34); the shifted-order recurrence serves
    # there. Against the mpmath grid of test_log_bessel_accuracy (finite references).
    d = np.load(NPZ_D2)
    for op in ("iv_ratio_dx", "d2log_iv_dx2"):
        want = d[op]
        keep = np.isfinite(want)
        v, x, want = d["v"][keep], d["x"][keep], want[keep]
        got = _log_bessel(torch.tensor(v, device=device), torch.tensor(x, device=device),
                          _OPS[op]).cpu().numpy()
        err = np.abs(got - want) / np.abs(want)
        i = int(np.argmax(err))
        assert err[i] <= 1e-13, f"{op}: {err[i]:.3g} at v={v[i]!r}, x={x[i]!r}"


@pytest.mark.cuda
def test_iv_ratio_dx2_cuda_matches_cpu(ratio_second_ref, cuda_device):
    v, x, _ = ratio_second_ref
    for dtype in (torch.float64, torch.float32):
        vt, xt = torch.tensor(v, dtype=dtype), torch.tensor(x, dtype=dtype)
        cpu = _log_bessel(vt, xt, _OPS["iv_ratio_dx2"])
        gpu = _log_bessel(vt.to(cuda_device), xt.to(cuda_device), _OPS["iv_ratio_dx2"]).cpu()
        # relative, and in units of the smallest normal number where subnormal
        tiny = torch.finfo(dtype).tiny
        err = (gpu.double() - cpu.double()).abs() / cpu.double().abs().clamp_min(tiny)
        assert err.max().item() < (1e-13 if dtype == torch.float64 else 1e-6)


# ----------------------------------------- defects found by the property tests (issue 9)


def test_float32_subnormal_order_is_not_lost():
    """A float32 order below FLT_MIN is evaluated in double: log I_v(3) at v = 1e-40 is
    log I_0(3) to float32 precision (it was -inf)."""
    v = torch.tensor([1e-40, 1e-42, -0.0], dtype=torch.float32)
    x = torch.tensor([3.0, 30.0, 3.0], dtype=torch.float32)
    for fn in (dk.log_iv, dk.log_ive, dk.log_kv, dk.log_kve, dk.bessel_iv_ratio):
        got = fn(v, x)
        want = fn(torch.zeros(3, dtype=torch.float32), x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_ratio_at_negative_integer_order_and_minus_zero():
    """x = -0.0 is the point 0: I_{n-1}/I_n -> +inf there (was -inf)."""
    for dtype in (torch.float32, torch.float64):
        v = torch.tensor([-1.0, -3.0], dtype=dtype)
        got = dk.bessel_iv_ratio(v, torch.tensor([-0.0, -0.0], dtype=dtype))
        assert torch.equal(got, torch.full_like(got, math.inf)), got


def test_float32_ratio_at_huge_negative_integer_order():
    """2n/x fits float32 at n = 1.7e38, x = 2.5 although 2n does not (was inf)."""
    got = dk.bessel_iv_ratio(torch.tensor(-1.7014118346046923e38), torch.tensor(2.5))
    want = 2 * 1.7014118346046923e38 / 2.5  # + I_{n+1}/I_n < 1, below float32's resolution
    assert math.isfinite(got.item()) and abs(got.item() - want) / want < 1e-6


@pytest.mark.cuda
def test_cuda_subnormal_float64_orders_match_the_cpu(cuda_device):
    """Subnormal float64 orders: the device series branch took Gamma(v) = 1/v, which
    overflows, and returned -inf (found by scripts/soak.py on CUDA)."""
    v = torch.tensor([5e-324, 1e-310, 2.2e-311, 3.8e-310, 1e-300, 0.0], dtype=torch.float64)
    x = torch.tensor([27.0, 3.0, 11.0, 1e-5, 23.8, 14.0], dtype=torch.float64)
    for fn in (dk.log_iv, dk.log_ive, dk.log_kv, dk.log_kve, dk.bessel_iv_ratio):
        cpu = fn(v, x)
        gpu = fn(v.to(cuda_device), x.to(cuda_device)).cpu()
        assert torch.isfinite(gpu).all(), (fn.__name__, gpu)
        torch.testing.assert_close(gpu, cpu, rtol=1e-14, atol=0)
