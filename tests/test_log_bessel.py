"""Behaviour of the log-Bessel ops as torch ops: shapes, dtypes, devices, autograd,
torch.library registration, torch.compile, CUDA streams and graphs, errors.

Accuracy against mpmath lives in test_log_bessel_accuracy.py; here the references are
SciPy (at points where it is accurate) and the ops' own float64 results.
"""
from __future__ import annotations

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
