"""Entropic optimal transport, ``dk.ot.sinkhorn``: against POT and a dense float64 reference.

Convention (POT's): min <C, P> + eps * sum P log P, P_ij = exp((f_i + g_j - C_ij) / eps).
Potentials are unique only up to the gauge (f + k, g - k), so they are compared through
f_i + g_j (and the dual value <f, a> + <g, b>). References:

- POT ``ot.sinkhorn(..., method="sinkhorn_log", stopThr=1e-13)`` / ``ot.sinkhorn2``
  (test-only dependency), POT's log-potentials being ``log_u * eps``, ``log_v * eps``;
- ``tests/reference/ot_reference.py``: log-domain Sinkhorn + dense Newton in float64 to an
  L1 marginal error of 1e-13 (used where POT is slow: small eps, zero weights).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import diffkern as dk
from tests import op_contract as contract
from tests.reference import ot_reference as R

METHODS = ["sinkhorn", "sns"]
F64 = torch.float64


def _problem(n, m, *, B=None, seed=0, device="cpu", dtype=F64, scale=1.0):
    """Squared-distance cost between random 2-D points (max about 2 * scale), random
    positive weights of unit mass. Shapes (n, m), (n,), (m,) or batched with B."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if B is None else (B,)
    x = torch.rand(*lead, n, 2, generator=gen, dtype=F64)
    y = torch.rand(*lead, m, 2, generator=gen, dtype=F64)
    C = torch.cdist(x, y) ** 2 * scale
    a = torch.rand(*lead, n, generator=gen, dtype=F64) + 0.2
    b = torch.rand(*lead, m, generator=gen, dtype=F64) + 0.2
    a = a / a.sum(-1, keepdim=True)
    b = b / b.sum(-1, keepdim=True)
    return tuple(t.to(device=device, dtype=dtype) for t in (C, a, b))


def _pot(C, a, b, eps):
    """POT log-domain Sinkhorn in float64: plan, f, g (torch, cpu), checked converged.
    POT is a test-only dependency: tests that compare with it skip where it is missing."""
    pot = pytest.importorskip("ot")
    C, a, b = (t.detach().cpu().double().numpy() for t in (C, a, b))
    P, log = pot.sinkhorn(a, b, C, eps, method="sinkhorn_log", stopThr=1e-13,
                          numItermax=200_000, log=True)
    err = np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum()
    assert err < 1e-11, f"the POT reference itself did not converge (error {err:.1e})"
    cost2 = pot.sinkhorn2(a, b, C, eps, method="sinkhorn_log", stopThr=1e-13,
                          numItermax=200_000)
    np.testing.assert_allclose(cost2, (C * P).sum(), rtol=1e-12)  # sinkhorn2 is <C, P>
    return (torch.from_numpy(P), torch.from_numpy(log["log_u"] * eps),
            torch.from_numpy(log["log_v"] * eps), float(cost2))


def _fg(f, g):
    """f_i + g_j: the gauge-invariant part of the potentials."""
    return f[..., :, None] + g[..., None, :]


def _reg_cost(C, P, eps):
    return (C * P).sum((-2, -1)) + eps * R.entropy_term(P)


def _check_marginal_error(res, a, b):
    """The reported L1 marginal error is the one of the returned plan."""
    P = res.plan.double()
    actual = R.marginal_error(P, a.double(), b.double())
    rep = res.marginal_error
    assert rep.dtype == F64
    # float32: rounding the plan's entries moves its L1 marginal error by up to
    # 2 * 2^-24 * mass ~ 1.2e-7.
    rtol, atol = (1e-6, 1e-13) if res.plan.dtype == F64 else (5e-2, 2e-7)
    assert torch.all((rep.cpu() - actual.cpu()).abs() <= rtol * actual.cpu() + atol), (
        f"reported marginal error {rep.tolist()} vs recomputed from the plan "
        f"{actual.tolist()}")
    return actual


def _solve(C, a=None, b=None, **kw):
    return dk.ot.sinkhorn(C, a, b, **kw)


# ------------------------------------------------------------------- vs POT / reference


@pytest.mark.parametrize("method", METHODS)
def test_matches_pot(method, device, dtype):
    n, m, eps = 24, 31, 0.05
    C64, a64, b64 = _problem(n, m, seed=1)
    C, a, b = (t.to(device=device, dtype=dtype) for t in (C64, a64, b64))
    tol = 1e-12 if dtype == F64 else 1e-5
    res = _solve(C, a, b, eps=eps, method=method, tol=tol, max_iter=100_000)

    # Shapes, dtypes, devices of everything returned.
    assert res.f.shape == (n,) and res.g.shape == (m,) and res.plan.shape == (n, m)
    for t in (res.f, res.g, res.plan, res.cost, res.reg_cost):
        assert t.dtype == dtype and t.device.type == device
    for t in (res.cost, res.reg_cost, res.iterations, res.newton_steps,
              res.marginal_error, res.converged):
        assert t.shape == ()
    assert res.iterations.dtype == torch.int64 and res.newton_steps.dtype == torch.int64
    assert res.converged.dtype == torch.bool and bool(res.converged)
    assert res.marginal_error.dtype == F64
    assert 0 < res.iterations.item() <= 100_000
    assert 0 <= res.newton_steps.item() <= res.iterations.item()
    if method == "sinkhorn":
        assert res.newton_steps.item() == 0
    assert _check_marginal_error(res, a, b).item() <= tol * (1 + 1e-6) + 1e-14

    P_ref, f_ref, g_ref, cost_ref = _pot(C64, a64, b64, eps)
    P = res.plan.double().cpu()
    assert torch.isfinite(P).all() and (P >= 0).all()
    l1 = (P - P_ref).abs().sum().item()
    fg_err = (_fg(res.f, res.g).double().cpu() - _fg(f_ref, g_ref)).abs().max().item()
    if dtype == F64:
        assert l1 < 1e-8, f"plan L1 distance to POT {l1:.2e}"
        assert fg_err < 1e-9, f"f_i + g_j vs POT: {fg_err:.2e}"
        rt = 1e-9
    else:
        assert l1 < 1e-3, f"plan L1 distance to POT {l1:.2e}"
        assert fg_err < 1e-4, f"f_i + g_j vs POT: {fg_err:.2e}"
        rt = 1e-5
    torch.testing.assert_close(res.cost.double().cpu(), torch.tensor(cost_ref, dtype=F64),
                               rtol=rt, atol=0)
    torch.testing.assert_close(res.reg_cost.double().cpu(), _reg_cost(C64, P_ref, eps),
                               rtol=rt, atol=0)
    # The potentials are those of the plan: P == exp((f + g - C) / eps) (POT convention)
    # and the dual value <f, a> + <g, b> equals the primal reg_cost at the optimum.
    torch.testing.assert_close(res.plan, R.plan_from_potentials(res.f, res.g, C, eps),
                               rtol=1e-12 if dtype == F64 else 1e-5, atol=0)
    dual = (res.f.double() * a.double()).sum() + (res.g.double() * b.double()).sum()
    torch.testing.assert_close(dual.cpu(), res.reg_cost.double().cpu(), rtol=rt, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_matches_pot_n200(method):
    C, a, b = _problem(200, 150, seed=2)
    eps = 0.05
    res = _solve(C, a, b, eps=eps, method=method, tol=1e-10, max_iter=100_000)
    P_ref, f_ref, g_ref, cost_ref = _pot(C, a, b, eps)
    assert bool(res.converged)
    assert (res.plan - P_ref).abs().sum().item() < 1e-8
    assert (_fg(res.f, res.g) - _fg(f_ref, g_ref)).abs().max().item() < 1e-9
    assert abs(res.cost.item() - cost_ref) < 1e-9 * cost_ref
    assert abs(res.reg_cost.item() - _reg_cost(C, P_ref, eps).item()) < 1e-9 * abs(
        res.reg_cost.item())


def test_methods_agree():
    C, a, b = _problem(40, 33, seed=3)
    eps = 0.02
    r1 = _solve(C, a, b, eps=eps, method="sinkhorn", tol=1e-11, max_iter=100_000)
    r2 = _solve(C, a, b, eps=eps, method="sns", tol=1e-11, max_iter=100_000)
    assert bool(r1.converged) and bool(r2.converged)
    assert (r1.plan - r2.plan).abs().sum().item() < 1e-9
    assert (_fg(r1.f, r1.g) - _fg(r2.f, r2.g)).abs().max().item() < 1e-9
    torch.testing.assert_close(r1.cost, r2.cost, rtol=1e-10, atol=0)
    torch.testing.assert_close(r1.reg_cost, r2.reg_cost, rtol=1e-10, atol=0)
    # The point of sns: far fewer iterations than plain Sinkhorn at this eps and tol.
    assert r2.newton_steps.item() > 0
    assert r2.iterations.item() < r1.iterations.item()


@pytest.mark.parametrize("method", METHODS)
def test_default_weights_are_uniform(method):
    C, _, _ = _problem(17, 9, seed=4)
    kw = dict(eps=0.1, method=method, tol=1e-11, max_iter=100_000)
    r0 = _solve(C, **kw)
    r1 = _solve(C, torch.full((17,), 1 / 17, dtype=F64), torch.full((9,), 1 / 9, dtype=F64),
                **kw)
    assert (r0.plan - r1.plan).abs().sum().item() < 1e-10
    torch.testing.assert_close(r0.plan.sum(1), torch.full((17,), 1 / 17, dtype=F64),
                               rtol=0, atol=1e-11)
    torch.testing.assert_close(r0.plan.sum(0), torch.full((9,), 1 / 9, dtype=F64),
                               rtol=0, atol=1e-11)


@pytest.mark.parametrize("method", METHODS)
def test_invariances(method):
    """Constant shift of C, joint scaling of (C, eps), transposition, total mass."""
    C, a, b = _problem(20, 13, seed=5)
    eps = 0.05
    kw = dict(method=method, tol=1e-12, max_iter=100_000)
    base = _solve(C, a, b, eps=eps, **kw)
    # C + k: same plan, cost and reg_cost shift by k (unit mass).
    sh = _solve(C + 7.0, a, b, eps=eps, **kw)
    assert (sh.plan - base.plan).abs().sum().item() < 1e-10
    assert abs(sh.cost.item() - base.cost.item() - 7.0) < 1e-10
    assert abs(sh.reg_cost.item() - base.reg_cost.item() - 7.0) < 1e-10
    # (s C, s eps): same plan, costs scale by s.
    sc = _solve(C * 30.0, a, b, eps=eps * 30.0, **kw)
    assert (sc.plan - base.plan).abs().sum().item() < 1e-10
    assert abs(sc.reg_cost.item() - 30.0 * base.reg_cost.item()) < 1e-9
    # Transposed problem (also a non-contiguous cost): transposed plan.
    tr = _solve(C.t(), b, a, eps=eps, **kw)
    assert not C.t().is_contiguous()
    assert (tr.plan - base.plan.t()).abs().sum().item() < 1e-10
    tr2 = _solve(C.t().contiguous(), b, a, eps=eps, **kw)
    torch.testing.assert_close(tr.plan, tr2.plan, rtol=0, atol=1e-14)
    # Mass lam: plan lam * P, reg_cost lam * reg + eps * lam * log(lam).
    lam = 2.5
    ms = _solve(C, lam * a, lam * b, eps=eps, **kw)
    assert (ms.plan - lam * base.plan).abs().sum().item() < 1e-9
    expected = lam * base.reg_cost.item() + eps * lam * np.log(lam)
    assert abs(ms.reg_cost.item() - expected) < 1e-9
    assert abs(ms.cost.item() - lam * base.cost.item()) < 1e-9


@pytest.mark.parametrize("method", METHODS)
def test_small_eps_float64(method):
    C, a, b = _problem(30, 40, seed=6)
    eps = 1e-3 * C.max().item()
    res = _solve(C, a, b, eps=eps, method=method, tol=1e-9, max_iter=1_000_000)
    ref = R.solve(C, a, b, eps=eps)
    assert ref.marginal_error < 1e-12
    assert bool(res.converged)
    assert torch.isfinite(res.f).all() and torch.isfinite(res.g).all()
    assert torch.isfinite(res.plan).all()
    assert _check_marginal_error(res, a, b).item() <= 1e-9 + 1e-14
    assert (res.plan - ref.plan).abs().sum().item() < 1e-6
    assert (_fg(res.f, res.g) - _fg(ref.f, ref.g)).abs().max().item() < 1e-7
    assert abs(res.cost.item() - ref.cost.item()) < 1e-8
    assert abs(res.reg_cost.item() - ref.reg_cost.item()) < 1e-8


@pytest.mark.parametrize("method", METHODS)
def test_float32_small_eps_is_stable(method, device):
    # C up to ~100 and eps = 1e-2 max C: exp(-C / eps) reaches e^-100, so anything not in
    # the log domain underflows in float32.
    C, a, b = _problem(48, 40, seed=7, scale=50.0)
    eps = 1e-2 * C.max().item()
    ref = R.solve(C, a, b, eps=eps)
    C32, a32, b32 = (t.to(device=device, dtype=torch.float32) for t in (C, a, b))
    res = _solve(C32, a32, b32, eps=eps, method=method, tol=1e-4, max_iter=100_000)
    for t in (res.f, res.g, res.plan, res.cost, res.reg_cost):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    assert bool(res.converged)
    assert _check_marginal_error(res, a32, b32).item() <= 1e-4
    P = res.plan.double().cpu()
    assert (P - ref.plan).abs().sum().item() < 2e-3
    assert abs(res.cost.item() - ref.cost.item()) < 1e-3 * abs(ref.cost.item())


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("method", METHODS)
def test_zero_weights(method, device):
    n, m, eps = 12, 9, 0.05
    C, a, b = _problem(n, m, seed=8, device=device)
    zi, zj = [0, 5, 11], [3]
    a[zi] = 0
    b[zj] = 0
    a, b = a / a.sum(), b / b.sum()
    res = _solve(C, a, b, eps=eps, method=method, tol=1e-11, max_iter=100_000)
    P = res.plan
    assert not torch.isnan(P).any() and torch.isfinite(P).all()
    assert (P[zi] == 0).all() and (P[:, zj] == 0).all()  # exactly zero, not tiny
    assert (res.f[zi] == float("-inf")).all() and (res.g[zj] == float("-inf")).all()
    I = [i for i in range(n) if i not in zi]
    J = [j for j in range(m) if j not in zj]
    assert torch.isfinite(res.f[I]).all() and torch.isfinite(res.g[J]).all()
    for t in (res.cost, res.reg_cost, res.marginal_error):
        assert torch.isfinite(t).all()
    assert bool(res.converged)
    _check_marginal_error(res, a, b)
    # Same as the problem restricted to the support (POT) and as the dense reference.
    Cs = C[I][:, J]
    P_ref, f_ref, g_ref, cost_ref = _pot(Cs, a[I], b[J], eps)
    assert (P[I][:, J].cpu() - P_ref).abs().sum().item() < 1e-9
    fg = _fg(res.f[I], res.g[J]).cpu()
    assert (fg - _fg(f_ref, g_ref)).abs().max().item() < 1e-9
    assert abs(res.cost.item() - cost_ref) < 1e-9
    assert abs(res.reg_cost.item() - _reg_cost(Cs.cpu(), P_ref, eps).item()) < 1e-9
    ref = R.solve(C.cpu(), a.cpu(), b.cpu(), eps=eps)
    assert (P.cpu() - ref.plan).abs().sum().item() < 1e-9


@pytest.mark.parametrize("method", METHODS)
def test_zero_weights_gradients(method):
    n, m, eps = 8, 7, 0.1
    C, a, b = _problem(n, m, seed=9)
    zi, zj = [2, 6], [0]
    a[zi] = 0
    b[zj] = 0
    a, b = a / a.sum(), b / b.sum()
    I = [i for i in range(n) if i not in zi]
    J = [j for j in range(m) if j not in zj]
    W = torch.randn(n, m, dtype=F64, generator=torch.Generator().manual_seed(0))
    kw = dict(eps=eps, method=method, tol=1e-12, max_iter=100_000)
    for name in ("reg_cost", "cost", "plan"):
        Cg = C.clone().requires_grad_()
        res = _solve(Cg, a, b, **kw)
        out = res.plan * W if name == "plan" else getattr(res, name)
        (grad,) = torch.autograd.grad(out.sum(), Cg)
        assert torch.isfinite(grad).all(), name
        assert (grad[zi] == 0).all() and (grad[:, zj] == 0).all(), name
        # On the support: the gradient of the restricted problem.
        Cs = C[I][:, J].clone().requires_grad_()
        rs = _solve(Cs, a[I], b[J], **kw)
        outs = rs.plan * W[I][:, J] if name == "plan" else getattr(rs, name)
        (gs,) = torch.autograd.grad(outs.sum(), Cs)
        torch.testing.assert_close(grad[I][:, J], gs, rtol=1e-7, atol=1e-9, msg=name)
        if name == "reg_cost":
            torch.testing.assert_close(grad, res.plan.detach(), rtol=0, atol=1e-11)


@pytest.mark.parametrize("method", METHODS)
def test_batched_matches_loop(method, device):
    B, n, m, eps = 3, 15, 22, 0.05
    C, a, b = _problem(n, m, B=B, seed=10, device=device)
    tol = 1e-11
    res = _solve(C, a, b, eps=eps, method=method, tol=tol, max_iter=100_000)
    assert res.f.shape == (B, n) and res.g.shape == (B, m) and res.plan.shape == (B, n, m)
    for t in (res.cost, res.reg_cost, res.iterations, res.newton_steps,
              res.marginal_error, res.converged):
        assert t.shape == (B,)
    assert res.converged.all()
    assert (_check_marginal_error(res, a, b) <= tol * (1 + 1e-6) + 1e-14).all()
    for k in range(B):
        one = _solve(C[k], a[k], b[k], eps=eps, method=method, tol=tol, max_iter=100_000)
        assert (res.plan[k] - one.plan).abs().sum().item() < 1e-9
        assert (_fg(res.f[k], res.g[k]) - _fg(one.f, one.g)).abs().max().item() < 1e-9
        torch.testing.assert_close(res.cost[k], one.cost, rtol=1e-10, atol=0)
        torch.testing.assert_close(res.reg_cost[k], one.reg_cost, rtol=1e-10, atol=0)
    # The batch elements are really different problems.
    assert (res.plan[0] - res.plan[1]).abs().sum().item() > 1e-2


@pytest.mark.parametrize("method", METHODS)
def test_unbatched_weights_broadcast_over_batched_cost(method):
    B, n, m, eps = 3, 11, 14, 0.05
    C, _, _ = _problem(n, m, B=B, seed=11)
    _, a, b = _problem(n, m, seed=12)
    kw = dict(eps=eps, method=method, tol=1e-11, max_iter=100_000)
    full = _solve(C, a.expand(B, n).contiguous(), b.expand(B, m).contiguous(), **kw)
    for aa, bb in ((a, b), (a, b.expand(B, m).contiguous()), (a.expand(B, n), b)):
        res = _solve(C, aa, bb, **kw)
        assert res.plan.shape == (B, n, m) and res.cost.shape == (B,)
        assert (res.plan - full.plan).abs().sum().item() < 1e-9
        torch.testing.assert_close(res.reg_cost, full.reg_cost, rtol=1e-10, atol=0)
    # None (uniform) with a batched cost.
    res = _solve(C, None, None, **kw)
    torch.testing.assert_close(res.plan.sum(-1), torch.full((B, n), 1 / n, dtype=F64),
                               rtol=0, atol=1e-10)
    # Gradient with respect to broadcast weights: summed over the batch.
    th = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(1))
    th.requires_grad_()
    res = _solve(C, torch.softmax(th, 0), b, **kw)
    (gb,) = torch.autograd.grad(res.reg_cost.sum(), th)
    gl = torch.zeros(n, dtype=F64)
    for k in range(B):
        t = th.detach().clone().requires_grad_()
        (gk,) = torch.autograd.grad(_solve(C[k], torch.softmax(t, 0), b, **kw).reg_cost, t)
        gl += gk
    torch.testing.assert_close(gb, gl, rtol=1e-7, atol=1e-10)


# ------------------------------------------------------------ control of the iteration


@pytest.mark.parametrize("method", METHODS)
def test_tol_is_respected_and_error_is_reported(method):
    C, a, b = _problem(25, 19, seed=13)
    for tol in (1e-2, 1e-5, 1e-9, 1e-12):
        res = _solve(C, a, b, eps=0.03, method=method, tol=tol, max_iter=100_000)
        assert bool(res.converged), tol
        actual = _check_marginal_error(res, a, b).item()
        assert actual <= tol * (1 + 1e-6) + 1e-14, f"tol {tol}: error {actual:.2e}"
        assert res.marginal_error.item() <= tol


@pytest.mark.parametrize("method", METHODS)
def test_warm_start(method):
    C, a, b = _problem(30, 26, seed=14)
    kw = dict(eps=0.01, method=method, tol=1e-9, max_iter=100_000, check_every=10)
    cold = _solve(C, a, b, **kw)
    assert bool(cold.converged)
    assert cold.iterations.item() > 20  # a problem where a warm start can matter
    for k in (0.0, 3.0):  # the gauge of the initial potentials must not matter
        warm = _solve(C, a, b, f_init=cold.f + k, g_init=cold.g - k, **kw)
        assert bool(warm.converged)
        assert warm.iterations.item() <= 10, f"warm start took {warm.iterations.item()}"
        assert (warm.plan - cold.plan).abs().sum().item() < 1e-8
        assert _check_marginal_error(warm, a, b).item() <= 1e-9 + 1e-14
    # Batched warm start from a batched solution.
    Cb, ab, bb = _problem(30, 26, B=2, seed=15)
    coldb = _solve(Cb, ab, bb, **kw)
    warmb = _solve(Cb, ab, bb, f_init=coldb.f, g_init=coldb.g, **kw)
    assert warmb.converged.all() and (warmb.iterations <= 10).all()
    assert (coldb.iterations > 20).all()


@pytest.mark.parametrize("method", METHODS)
def test_fixed_iterations(method):
    C, a, b = _problem(20, 16, B=2, seed=16)
    for max_iter in (3, 37):
        with warnings.catch_warnings():
            # Nothing is checked on the host, so nothing to warn about.
            warnings.filterwarnings("error", message=".*did not converge")
            res = _solve(C, a, b, eps=0.02, method=method, tol=1e-9, max_iter=max_iter,
                         fixed_iterations=True)
        assert (res.iterations == max_iter).all(), res.iterations.tolist()
        if method == "sinkhorn":
            assert (res.newton_steps == 0).all()
        err = _check_marginal_error(res, a, b)
        assert torch.equal(res.converged, res.marginal_error <= 1e-9)
        if max_iter == 3:
            assert not res.converged.any() and (err > 1e-9).all()
    # Enough fixed iterations (40 more than plain Sinkhorn needs, whatever the method): the
    # converged solution, and iterating past convergence must not undo it.
    ref = _solve(C, a, b, eps=0.1, method="sinkhorn", tol=1e-12, max_iter=100_000)
    n_fixed = int(ref.iterations.max()) + 40
    res = _solve(C, a, b, eps=0.1, method=method, tol=1e-12, max_iter=n_fixed,
                 fixed_iterations=True)
    assert (res.iterations == n_fixed).all()
    assert res.converged.all(), (
        f"{n_fixed} fixed iterations: marginal errors {res.marginal_error.tolist()}")
    assert (res.plan - ref.plan).abs().sum().item() < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_max_iter_too_small_warns(method):
    C, a, b = _problem(25, 20, seed=17)
    with pytest.warns(UserWarning, match="did not converge"):
        res = _solve(C, a, b, eps=0.01, method=method, tol=1e-10, max_iter=5)
    assert not bool(res.converged)
    assert res.iterations.item() == 5
    err = _check_marginal_error(res, a, b)
    assert err.item() > 1e-10 and res.marginal_error.item() > 1e-10
    assert torch.isfinite(res.plan).all()
    # Per batch element: an easy problem (C = 0: plan a b^T) next to a hard one.
    Cb = torch.stack([torch.zeros_like(C), C])
    with pytest.warns(UserWarning, match="did not converge"):
        res = _solve(Cb, a, b, eps=0.01, method=method, tol=1e-10, max_iter=20)
    assert res.converged.tolist() == [True, False]
    _check_marginal_error(res, a, b)
    torch.testing.assert_close(res.plan[0], a[:, None] * b[None, :], rtol=1e-9, atol=0)


# ------------------------------------------------------------------------- gradients


def _gc_problem(seed=20):
    C, a, b = _problem(5, 4, seed=seed)
    return C, a, b


def _out(res, name):
    if name == "fg":
        return _fg(res.f, res.g)  # gauge-invariant, differentiable by the spec
    return getattr(res, name)


GC = dict(eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["reg_cost", "cost", "plan", "fg"])
@pytest.mark.parametrize("eps", [0.5, 0.1])
def test_gradcheck_wrt_cost(method, name, eps):
    C, a, b = _gc_problem()
    fn = lambda c: _out(_solve(c, a, b, eps=eps, method=method, tol=1e-12,  # noqa: E731
                                max_iter=100_000), name)
    torch.autograd.gradcheck(fn, (C.requires_grad_(),), **GC)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["reg_cost", "cost", "plan", "fg"])
def test_gradcheck_wrt_weights(method, name):
    C, _, _ = _gc_problem(seed=21)
    gen = torch.Generator().manual_seed(2)
    ta = torch.randn(5, dtype=F64, generator=gen).requires_grad_()
    tb = torch.randn(4, dtype=F64, generator=gen).requires_grad_()

    def fn(ta, tb):
        res = _solve(C, torch.softmax(ta, 0), torch.softmax(tb, 0), eps=0.2, method=method,
                     tol=1e-12, max_iter=100_000)
        return _out(res, name)

    torch.autograd.gradcheck(fn, (ta, tb), **GC)


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_batched(method):
    C, a, b = _problem(5, 4, B=2, seed=22)
    fn = lambda c: _solve(c, a, b, eps=0.3, method=method, tol=1e-12,  # noqa: E731
                          max_iter=100_000).plan
    torch.autograd.gradcheck(fn, (C.requires_grad_(),), **GC)


@pytest.mark.parametrize("method", METHODS)
def test_envelope_identity(method, device):
    C, a, b = _problem(13, 10, B=2, seed=23, device=device)
    C.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    res = _solve(C, a, b, eps=0.05, method=method, tol=1e-12, max_iter=100_000)
    gC, ga, gb = torch.autograd.grad(res.reg_cost.sum(), (C, a, b))
    torch.testing.assert_close(gC, res.plan.detach(), rtol=0, atol=1e-11)
    # d reg_cost / d(a, b) = (f, g) up to constants (only mass-preserving directions are
    # meaningful); the constant differs per batch element at most.
    da, db = ga - res.f.detach(), gb - res.g.detach()
    assert (da.max(-1).values - da.min(-1).values).max().item() < 1e-9
    assert (db.max(-1).values - db.min(-1).values).max().item() < 1e-9
    # And a mass-preserving directional derivative agrees with a finite difference.
    v = torch.zeros_like(a)
    v[..., 0], v[..., 1] = 1.0, -1.0
    h = 1e-6
    with torch.no_grad():
        rp = _solve(C, a + h * v, b, eps=0.05, method=method, tol=1e-13, max_iter=100_000)
        rm = _solve(C, a - h * v, b, eps=0.05, method=method, tol=1e-13, max_iter=100_000)
    fd = (rp.reg_cost - rm.reg_cost) / (2 * h)
    torch.testing.assert_close((ga * v).sum(-1), fd, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------- bad input


def _args(n=4, m=3, B=None):
    C, a, b = _problem(n, m, B=B, seed=30)
    return C, a, b


def _raises(name):
    return pytest.raises(ValueError, match=rf"\b{name}\b")


def test_bad_weights():
    C, a, b = _args()
    neg = a.clone()
    neg[0], neg[1] = -0.1, neg[1] + 0.1
    with _raises("a"):
        _solve(C, neg, b, eps=0.1)
    negb = b.clone()
    negb[0], negb[1] = -0.1, negb[1] + 0.1
    with _raises("b"):
        _solve(C, a, negb, eps=0.1)
    nan = a.clone()
    nan[2] = float("nan")
    with _raises("a"):
        _solve(C, nan, b, eps=0.1)
    nanb = b.clone()
    nanb[0] = float("nan")
    with _raises("b"):
        _solve(C, a, nanb, eps=0.1)
    with pytest.raises(ValueError, match=r"\b(a|b)\b"):
        _solve(C, a, 2 * b, eps=0.1)
    with pytest.raises(ValueError, match=r"\b(a|b)\b"):
        _solve(C, a * (1 + 1e-4), b, eps=0.1)
    # Batched: one element with mismatched mass.
    Cb, ab, bb = _args(B=3)
    bb[1] *= 1.5
    with pytest.raises(ValueError, match=r"\b(a|b)\b"):
        _solve(Cb, ab, bb, eps=0.1)
    # Sums equal to well within 1e-6 relative are accepted.
    res = _solve(C, a * (1 + 1e-9), b, eps=0.1, tol=1e-6)
    assert torch.isfinite(res.plan).all()


def test_bad_eps():
    C, a, b = _args()
    for eps in (0.0, -1.0):
        with _raises("eps"):
            _solve(C, a, b, eps=eps)


def test_bad_shapes():
    C, a, b = _args(4, 3)
    with _raises("a"):
        _solve(C, torch.full((5,), 0.2, dtype=F64), b, eps=0.1)
    with _raises("b"):
        _solve(C, a, torch.full((4,), 0.25, dtype=F64), eps=0.1)
    Cb, ab, bb = _args(4, 3, B=3)
    with _raises("a"):
        _solve(Cb, ab[:2], bb, eps=0.1)  # batch 2 vs 3
    with _raises("b"):
        _solve(Cb, ab, bb[:2], eps=0.1)
    with _raises("a"):
        _solve(C, ab, b, eps=0.1)  # batched weights, unbatched cost
    with _raises("f_init"):
        _solve(C, a, b, eps=0.1, f_init=torch.zeros(5, dtype=F64))
    with _raises("g_init"):
        _solve(C, a, b, eps=0.1, g_init=torch.zeros(4, dtype=F64))
    for bad in (torch.rand(4, dtype=F64), torch.rand(2, 3, 4, 3, dtype=F64),
                torch.tensor(1.0, dtype=F64)):
        with _raises("cost"):
            _solve(bad, eps=0.1)


def test_bad_cost_values_and_dtype():
    C, a, b = _args()
    for v in (float("nan"), float("inf")):
        bad = C.clone()
        bad[1, 2] = v
        with _raises("cost"):
            _solve(bad, a, b, eps=0.1)
    with pytest.raises((TypeError, ValueError), match="cost"):
        _solve(torch.ones(4, 3, dtype=torch.int64), eps=0.1)


def test_bad_method():
    C, a, b = _args()
    with _raises("method"):
        _solve(C, a, b, eps=0.1, method="newton")


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0), (2, 0, 3)])
def test_zero_size_raises_value_error(shape):
    contract.check_zero_size(lambda c: _solve(c, eps=0.1), torch.zeros(shape, dtype=F64),
                             raises=ValueError)


# -------------------------------------------------------------------- CUDA specifics


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu_batched(method, dtype, cuda_device):
    C, a, b = _problem(50, 37, B=3, seed=40, dtype=dtype)
    tol = 1e-11 if dtype == F64 else 1e-5
    kw = dict(eps=0.03, method=method, tol=tol, max_iter=100_000)
    cpu = _solve(C, a, b, **kw)
    gpu = _solve(C.to(cuda_device), a.to(cuda_device), b.to(cuda_device), **kw)
    assert gpu.converged.all() and gpu.plan.device.type == "cuda"
    _check_marginal_error(gpu, a.to(cuda_device), b.to(cuda_device))
    l1 = (gpu.plan.double().cpu() - cpu.plan.double()).abs().sum((-2, -1)).max().item()
    assert l1 < (1e-9 if dtype == F64 else 1e-3), l1
    # Gradients on the GPU too.
    Cg = C.to(cuda_device).requires_grad_()
    (g,) = torch.autograd.grad(_solve(Cg, a.to(cuda_device), b.to(cuda_device),
                                      **kw).cost.sum(), Cg)
    Cc = C.clone().requires_grad_()
    (gc,) = torch.autograd.grad(_solve(Cc, a, b, **kw).cost.sum(), Cc)
    err = (g.double().cpu() - gc.double()).abs().max().item()
    assert err < (1e-7 if dtype == F64 else 1e-2) * gc.abs().max().item()


# The CUDA solver picks its kernels by size: conjugate gradients by one block per element
# (up to 2^17 dense entries, two vector entries per thread above m = 1024) or grid-wide
# (cooperative, tolerance mode); Sinkhorn iterations fused in one cooperative launch
# (tolerance mode) or one launch per sweep (fixed mode). Every path must give the CPU's answer.
@pytest.mark.cuda
@pytest.mark.parametrize("B,n,m", [(2, 60, 1500), (1, 420, 400), (5, 33, 47)])
@pytest.mark.parametrize("fixed", [False, True])
def test_cuda_kernel_paths_match_cpu(B, n, m, fixed, cuda_device):
    C, a, b = _problem(n, m, B=B, seed=43)
    kw = dict(eps=0.02, method="sns", tol=1e-11, max_iter=60 if fixed else 100_000,
              fixed_iterations=fixed)
    cpu = _solve(C, a, b, **kw)
    gpu = _solve(C.to(cuda_device), a.to(cuda_device), b.to(cuda_device), **kw)
    if not fixed:
        assert gpu.converged.all() and cpu.converged.all()
    assert (gpu.newton_steps.cpu() > 0).all()  # the Newton phase (and its CG) did run
    l1 = (gpu.plan.double().cpu() - cpu.plan.double()).abs().sum((-2, -1)).max().item()
    assert l1 < 1e-9, l1
    torch.testing.assert_close(gpu.marginal_error.cpu(), cpu.marginal_error, rtol=0, atol=1e-10)


def _fields(res):
    """Every output of a SinkhornResult, by name (the computed ones included)."""
    return dict(f=res.f, g=res.g, plan=res.plan, cost=res.cost, reg_cost=res.reg_cost,
                iterations=res.iterations, newton_steps=res.newton_steps,
                marginal_error=res.marginal_error, converged=res.converged)


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_graph_capture_fixed_iterations(method, cuda_device):
    sets = [_problem(40, 30, B=2, seed=s, device=cuda_device) for s in (41, 42)]
    kw = dict(eps=0.05, method=method, tol=1e-9, max_iter=60, fixed_iterations=True)
    static = contract.check_cuda_graph(lambda C, a, b: _fields(_solve(C, a, b, **kw)), sets,
                                       rtol=1e-12, atol=1e-15)
    assert (static["iterations"] == 60).all()
    eager1, eager2 = (_solve(*s, **kw) for s in sets)
    assert (eager1.plan - eager2.plan).abs().sum().item() > 1e-2  # replay recomputed


@pytest.mark.cuda
@pytest.mark.parametrize("fixed", [False, True])
def test_cuda_side_stream(fixed, cuda_device):
    C, a, b = _problem(40, 30, B=2, seed=44, device=cuda_device)
    kw = dict(eps=0.05, method="sns", tol=1e-9, max_iter=60 if fixed else 100_000,
              fixed_iterations=fixed)
    contract.check_side_stream(lambda C, a, b: _fields(_solve(C, a, b, **kw)), C, a, b)


@pytest.mark.parametrize("method", ["sinkhorn", "sns"])
def test_iterations_never_exceed_max_iter(method):
    """A hard problem (eps = 1e-4 of the cost range) that cannot converge within the cap:
    SNS falls back to Sinkhorn rounds of several iterations; no element may exceed max_iter."""
    gen = torch.Generator().manual_seed(5)
    x, y = torch.rand(3, 40, 2, generator=gen, dtype=F64), torch.rand(3, 30, 2, generator=gen,
                                                                          dtype=F64)
    C = torch.cdist(x, y) ** 2
    for max_iter in (23, 57):
        with pytest.warns(UserWarning, match="did not converge"):
            res = dk.ot.sinkhorn(C, eps=1e-4 * C.max().item(), tol=1e-15, method=method,
                                 max_iter=max_iter)
        assert (res.iterations <= max_iter).all(), res.iterations.tolist()
        assert (res.iterations >= max_iter - 10).all(), res.iterations.tolist()
        assert not res.converged.any()
        assert torch.isfinite(res.plan).all()


@pytest.mark.parametrize("method", METHODS)
def test_every_output_element_is_written(method, device):
    C, a, b = _problem(13, 10, B=2, seed=45, device=device)
    kw = dict(eps=0.05, method=method, tol=1e-10, max_iter=100_000)
    out = contract.check_poisoned_outputs(lambda C, a, b: _fields(_solve(C, a, b, **kw)),
                                          C, a, b)
    assert out["converged"].all() and torch.isfinite(out["plan"]).all()


@pytest.mark.parametrize("method", METHODS)
def test_noncontiguous_inputs(method, device):
    kw = dict(eps=0.05, method=method, tol=1e-10, max_iter=100_000)
    C, a, b = _problem(13, 10, seed=46, device=device)
    # The backward's dense solves are torch ops: on the GPU their reduction order follows
    # the layout, so the gradients agree to rounding, not bit for bit.
    tol = dict(rtol=1e-12, atol=1e-15) if device == "cuda" else {}
    contract.check_noncontiguous(lambda C, a, b: _fields(_solve(C, a, b, **kw)),
                                 C.requires_grad_(), a, b, **tol)
    Cb, ab, bb = _problem(13, 10, B=3, seed=47, device=device)
    contract.check_noncontiguous(lambda C, a, b: _fields(_solve(C, a, b, **kw)), Cb, ab, bb)


def test_custom_op_opcheck():
    """The registered op (schema, fake tensor, autograd registration, AOT dispatch)."""
    from diffkern import ot as ot_module

    gen = torch.Generator().manual_seed(3)
    C = torch.rand(2, 6, 5, generator=gen, dtype=F64, requires_grad=True)
    a = torch.full((2, 6), 1 / 6, dtype=F64)
    b = torch.full((2, 5), 1 / 5, dtype=F64)
    g0 = torch.zeros(2, 5, dtype=F64)
    for method in (0, 1):
        args = (C, a, b, g0, 0.1, method, 1e-10, 200, 10, False, 20, False, 0)
        contract.check_opcheck(ot_module._solve, args)


def test_compile_fullgraph_fixed_iterations():
    """fixed_iterations=True has no host synchronization, so it compiles as one graph."""
    gen = torch.Generator().manual_seed(4)
    C = torch.rand(7, 5, generator=gen, dtype=F64)

    def f(cost):
        res = dk.ot.sinkhorn(cost, eps=0.1, max_iter=40, fixed_iterations=True)
        return res.cost, res.plan

    contract.check_compile(f, C, backend="inductor", rtol=0, atol=1e-15)

# ------------------------------------------- reliability (issue 9: items 2, 8, 11, 12, 14)


def _plan_error(res, a, b, cost_over_eps=0.0):
    """The L1 marginal error of the returned plan, recomputed in float64; the reported one
    must agree to rounding: 1e-12 for the sums, plus the plan entries' own rounding, a
    relative ~4 ulp of (|f| + |g| + |C|) / eps each (the solver and torch evaluate
    exp((f + g - C) / eps) in different orders)."""
    actual = R.marginal_error(res.plan.double(), a.double(), b.double())
    rep = res.marginal_error
    atol = 1e-12 + 2 * 4 * 2.0**-52 * 3 * cost_over_eps
    assert torch.all((rep - actual).abs() <= 1e-6 * actual + atol), (rep.tolist(),
                                                                     actual.tolist())
    return actual


def _issue_random(seed):
    """The issue's sweep: n, m in [1, 8], C ~ U[0, 1) (seeds that stalled SNS before)."""
    gen = torch.Generator().manual_seed(seed)
    n, m = torch.randint(1, 9, (2,), generator=gen).tolist()
    return torch.rand(n, m, generator=gen, dtype=F64), None, None


def _hard(kind, seed):
    """Small problems of the classes where SNS stalled or converged slowly: near-permutation
    plans at tiny eps, degenerate costs (ties, constant, duplicated rows/columns, many
    decades), n or m = 1, Dirichlet or skewed weights, a mass mismatch within the accepted
    1e-6. Returns C, a, b (None: uniform), eps."""
    rng = np.random.default_rng(seed)
    t = torch.from_numpy
    if kind == "issue":
        C = torch.rand(5, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
        return C, None, None, 1e-3
    if kind == "random":
        C, a, b = _issue_random(seed)
        return C, a, b, 1e-3
    if kind == "column":  # m = 1 (and n = 1 below): the Schur complement is 0 x 0 / singular
        return t(rng.random((7, 1))), None, None, 1e-4
    if kind == "row":
        return t(rng.random((1, 9))), None, None, 1e-4
    if kind == "constant":
        return torch.full((6, 5), 2.5, dtype=F64), None, None, 1e-4
    if kind == "duplicated":
        base = rng.random((3, 4))
        C = base[[0, 0, 1, 2, 2, 1]][:, [0, 1, 1, 3, 3, 2, 0]]
        return t(np.ascontiguousarray(C)), None, None, 1e-3
    if kind == "decades":
        C = 10.0 ** rng.uniform(-8, 8, (9, 7))
        return t(C), None, None, 1e-3 * C.max()
    if kind == "permutation":  # near-permutation plan, random masses: groups coupled by e^-50
        n, m = 22, 28
        C = 1.0 + 0.01 * rng.random((n, m))
        C[rng.permutation(n), rng.permutation(m)[:n]] = 0.01 * rng.random(n)
        a, b = rng.dirichlet(np.full(n, 0.5)), rng.dirichlet(np.full(m, 0.5))
        return t(C), t(np.maximum(a, 1e-300)), t(np.maximum(b, 1e-300)), 2e-4
    if kind == "ties":  # integer costs: many optimal plans, plateaus in Sinkhorn
        C = rng.integers(0, 4, (40, 12)).astype(np.float64)
        a = rng.random(40)
        a[rng.random(40) < 0.3] = 0.0
        b = rng.random(12)
        b[rng.random(12) < 0.3] = 0.0
        b[0] += 0.1
        return t(C), t(a / a.sum()), t(b / b.sum()), 3e-3
    if kind == "mismatch":  # sum(b) = sum(a) (1 - 4e-7): Newton's rhs must be projected
        C = rng.random((30, 50))
        b = np.full(50, 1 / 50) * (1 - 4e-7)
        return t(C), None, t(b), 0.16
    raise ValueError(kind)


HARD = ([("issue", 0)] + [("random", s) for s in (1, 4, 7, 16, 34, 44, 94)]
        + [(k, s) for k in ("column", "row", "constant", "duplicated", "decades", "permutation",
                            "ties", "mismatch") for s in (0, 1)])


@pytest.mark.parametrize("kind,seed", HARD)
def test_sns_converges_on_small_hard_problems(kind, seed):
    """SNS used to take null Newton steps forever on these (the sparsified Hessian had lost
    the coupling the step needs); it must converge, checked from the returned plan, on every
    problem and within the same iteration cap as Sinkhorn."""
    C, a, b, eps = _hard(kind, seed)
    n, m = C.shape
    a_ = a if a is not None else torch.full((n,), 1 / n, dtype=F64)
    b_ = b if b is not None else torch.full((m,), 1 / m, dtype=F64)
    tol = 1e-6
    floor = abs(a_.sum().item() - b_.sum().item())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "did not converge" warning either
        res = dk.ot.sinkhorn(C, a, b, eps=eps, tol=tol, max_iter=10_000)
    err = _plan_error(res, a_, b_, C.abs().max().item() / eps).item()
    assert err <= max(tol, 2 * floor), (kind, seed, err, int(res.iterations))
    assert bool(res.converged)
    assert torch.isfinite(res.plan).all()


def test_sns_issue_sweep_all_converge():
    """The issue's 144 random small problems at eps = 1e-3 (14 failed): all converge."""
    bad = []
    for seed in range(144):
        C, _, _ = _issue_random(seed)
        res = dk.ot.sinkhorn(C, eps=1e-3, tol=1e-6)
        n, m = C.shape
        a, b = torch.full((n,), 1 / n, dtype=F64), torch.full((m,), 1 / m, dtype=F64)
        if not (bool(res.converged) and R.marginal_error(res.plan, a, b).item() <= 1e-6):
            bad.append(seed)
    assert not bad, f"not converged: seeds {bad}"


def _rigid_block_problems():
    """Small integer costs (ties) with Dirichlet weights at eps ~1e-4..3e-3 of max C: the
    eps-scaled warm-up can leave a block of rows and columns coupled to the rest only through
    entries below exp(-70), which must shift as a whole by tens of eps. The first one is the
    soak sweep's problem #3091 (seed 0): 662 iterations where Sinkhorn takes 170, a plateau."""
    C = torch.tensor([[0.0, 0.0, 3.0], [0.0, 2.0, 2.0], [1.0, 1.0, 1.0]], dtype=F64)
    a = torch.tensor([0.4304359234416165, 0.004804110051520272, 0.5647599665068632], dtype=F64)
    b = torch.tensor([0.26675682273339874, 0.1840392015606319, 0.5492039757059693], dtype=F64)
    yield C, a, b, 0.0009008571614945256
    for seed in range(150):
        rng = np.random.default_rng([9, seed])
        n, m = (int(v) for v in rng.integers(2, 6, 2))
        C = rng.integers(0, 4, (n, m)).astype(np.float64)
        a = np.maximum(rng.dirichlet(np.full(n, 0.5)), 1e-300)
        b = np.maximum(rng.dirichlet(np.full(m, 0.5)), 1e-300)
        yield (torch.from_numpy(C), torch.from_numpy(a), torch.from_numpy(b),
               10 ** rng.uniform(-4, -2.5) * max(C.max(), 1.0))


def test_sns_no_plateau_on_rigid_blocks():
    """Where the sparsified Schur complement is singular beyond the constants, CG's direction
    can point downhill; SNS then steps along the scaled gradient (SetSlope) instead of falling
    back to Sinkhorn, which crawls along such a block. Iteration counts, not time: SNS takes
    at most max(2 x Sinkhorn's iterations, 40) and converges (checked from the plan)."""
    slow = []
    for k, (C, a, b, eps) in enumerate(_rigid_block_problems()):
        sk = dk.ot.sinkhorn(C, a, b, eps=eps, method="sinkhorn", tol=1e-6, max_iter=100_000)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sn = dk.ot.sinkhorn(C, a, b, eps=eps, tol=1e-6, max_iter=100_000)
        assert R.marginal_error(sn.plan, a, b).item() <= 1e-6, k
        if int(sn.iterations) > max(2 * int(sk.iterations), 40):
            slow.append((k, int(sn.iterations), int(sk.iterations)))
    assert not slow, f"(problem, SNS iterations, Sinkhorn iterations): {slow}"


def _sinkhorn_easy_problems():
    """Problems that Sinkhorn solves within its first check: eps of the order of the cost's
    spread, costs that are ~0 or far above eps, duplicated rows, ties (the half of the
    sweep's small problems where SNS's warm-up alone used to double the time)."""
    rng = np.random.default_rng(11)
    for k in range(60):
        n, m = (int(v) for v in rng.integers(1, 40, 2))
        kind = k % 4
        if kind == 0:  # eps ~ the spread
            C = rng.random((n, m))
            eps = float(rng.uniform(0.3, 1.0))
        elif kind == 1:  # entries ~0 or forbidden at eps
            C = np.where(rng.random((n, m)) < 0.5, 1e-9, 1e3)
            C[:, 0] = 1e-9
            eps = 1e-2
        elif kind == 2:  # duplicated rows, large eps
            C = np.repeat(rng.random((1, m)), n, axis=0)
            eps = 0.5
        else:  # integer ties at eps = max C
            C = rng.integers(0, 3, (n, m)).astype(np.float64)
            eps = max(float(C.max()), 1.0)
        yield torch.from_numpy(C), eps


def test_sns_leaves_easy_problems_to_sinkhorn():
    """ProbeSinkhorn: where the second Sinkhorn iteration shows that Sinkhorn will be done in
    a few more, SNS takes no warm-up and no Newton step: at most Sinkhorn's iterations plus
    the two probe iterations (iteration counts, not time), converged."""
    worse = []
    for k, (C, eps) in enumerate(_sinkhorn_easy_problems()):
        sk = dk.ot.sinkhorn(C, eps=eps, method="sinkhorn", tol=1e-6)
        sn = dk.ot.sinkhorn(C, eps=eps, tol=1e-6)
        assert bool(sk.converged) and bool(sn.converged), k
        if int(sk.iterations) <= 10 and (int(sn.newton_steps) > 0 or
                                          int(sn.iterations) > int(sk.iterations) + 2):
            worse.append((k, int(sn.iterations), int(sn.newton_steps), int(sk.iterations)))
    assert not worse, f"(problem, SNS iterations, Newton steps, Sinkhorn iterations): {worse}"


@pytest.mark.cuda
def test_cuda_small_problems_follow_sinkhorn_through_its_early_checks():
    """On a GPU a small problem's Newton round costs ~16 Sinkhorn iterations, so SNS probes at
    every check up to iteration 30 (plain Sinkhorn iterations, the same kernels): a problem
    that Sinkhorn finishes by then is finished by SNS at the same check (or the one two
    iterations later), with no Newton step."""
    checked = 0
    for k, (C, eps) in enumerate(_sinkhorn_easy_problems()):
        C = C.float().cuda()
        sk = dk.ot.sinkhorn(C, eps=eps, method="sinkhorn", tol=1e-5)
        sn = dk.ot.sinkhorn(C, eps=eps, tol=1e-5)
        assert bool(sn.converged), k
        if int(sk.iterations) <= 30:
            checked += 1
            # <= +2: an element left to Sinkhorn at the first probe checks at 12, not 10
            assert int(sn.newton_steps) == 0 and int(sn.iterations) <= int(sk.iterations) + 2, (
                k, int(sn.iterations), int(sn.newton_steps), int(sk.iterations))
    assert checked >= 50


def test_sns_probe_keeps_newton_for_hard_problems():
    """The probe must not hand a problem that Sinkhorn needs thousands of iterations for to
    Sinkhorn: a point cloud at eps = 1e-3 still converges in a few Newton steps."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(300, 2, generator=g, dtype=F64), torch.rand(300, 2, generator=g, dtype=F64)
    C = torch.cdist(x, y) ** 2
    C = C / C.max()
    sk = dk.ot.sinkhorn(C, eps=1e-3, method="sinkhorn", tol=1e-6, max_iter=100_000)
    sn = dk.ot.sinkhorn(C, eps=1e-3, tol=1e-6)
    assert bool(sn.converged)
    assert int(sk.iterations) > 500  # the problem is hard for Sinkhorn
    assert 1 <= int(sn.newton_steps) and int(sn.iterations) <= 40, (int(sn.iterations),
                                                                      int(sn.newton_steps))


def test_fixed_iterations_rounds_with_failed_newton_steps():
    """Fixed mode on a problem where Newton steps fail: still exactly max_iter iterations per
    element, and enough of them converge (SNS's Sinkhorn phases are Sinkhorn iterations)."""
    C, _, _, eps = _hard("issue", 0)
    for max_iter in (25, 60, 2000):
        res = dk.ot.sinkhorn(torch.stack([C, C.flip(0)]), eps=eps, max_iter=max_iter,
                             fixed_iterations=True)
        assert (res.iterations == max_iter).all(), res.iterations.tolist()
    assert res.converged.all(), res.marginal_error.tolist()


def _fd_grad_cost(C, eps, h=1e-5, reference=True):
    """Central finite differences of <C, P(C)>, entry by entry, of a float64 solve: the
    reference (Sinkhorn, then dense Newton to an L1 marginal error of 1e-13) or dk's SNS
    (to 1e-13, where it gets there)."""
    def cost(c):
        if reference:
            sol = R.solve(c, eps=eps)
            assert sol.marginal_error <= 1e-11
            return sol.cost
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return dk.ot.sinkhorn(c, eps=eps, tol=1e-13).cost

    g = torch.zeros_like(C)
    for i in range(C.shape[0]):
        for j in range(C.shape[1]):
            E = torch.zeros_like(C)
            E[i, j] = h
            g[i, j] = (cost(C + E) - cost(C - E)) / (2 * h)
    return g


@pytest.mark.parametrize("eps", [0.05, 0.02, 1e-3])
def test_backward_near_singular_matches_finite_differences(eps):
    """A near-permutation plan: the groups (one row, one column each) are coupled only through
    entries ~exp(-1/eps), so the adjoint system is singular to double precision (eps = 0.02:
    smallest eigenvalue ~1e-22 of the largest). The backward used to raise
    torch._LinAlgError or return garbage there; it must match finite differences."""
    gen = torch.Generator().manual_seed(7)
    C = 1.0 - torch.eye(4, dtype=F64) + 0.05 * torch.rand(4, 4, generator=gen, dtype=F64)
    Cg = C.clone().requires_grad_(True)
    # What SNS reaches here: below ~1e-10 the Newton system (whose sparse plan is stored in
    # float32) cannot resolve a Schur complement this close to singular, and Sinkhorn's rate
    # is 1 - O(exp(-1/eps)): neither method gets further in 10,000 iterations.
    tol = 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = dk.ot.sinkhorn(Cg, eps=eps, tol=tol)
    res.cost.backward()
    ref = _fd_grad_cost(C, eps)
    assert torch.isfinite(Cg.grad).all()
    torch.testing.assert_close(Cg.grad, ref, rtol=0, atol=1e-6 * (1 + ref.abs().max().item()))


def test_backward_issue_reproducer_and_unconverged_plan():
    """The issue's reproducer (its backward raised torch._LinAlgError) against finite
    differences; and a far-from-converged plan (columns with almost no mass: a singular
    system) must still give a finite gradient, not an exception."""
    C, _, _, eps = _hard("issue", 0)
    eps = 0.02  # finite differences need a smooth enough problem; same singular structure
    Cg = C.clone().requires_grad_(True)
    dk.ot.sinkhorn(Cg, eps=eps, tol=1e-13).cost.backward()
    ref = _fd_grad_cost(C, eps, reference=False)
    torch.testing.assert_close(Cg.grad, ref, rtol=0, atol=1e-6 * (1 + ref.abs().max().item()))
    Cg.grad = None
    res = dk.ot.sinkhorn(Cg, eps=1e-3, max_iter=21, fixed_iterations=True)
    assert not bool(res.converged)
    res.cost.backward()
    assert torch.isfinite(Cg.grad).all()


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -float("inf")])
def test_g_init_non_finite_is_refused_or_nan(value):
    """Tolerance mode: a clear error naming g_init. Fixed mode (no host checks): NaN comes out
    as a NaN marginal error, never as a finite error next to a NaN plan (it was 1.0)."""
    C, a, b = _problem(5, 4, seed=40)
    g0 = torch.zeros(4, dtype=F64)
    g0[1] = value
    with pytest.raises(ValueError, match=r"diffkern\.ot\.sinkhorn: g_init"):
        dk.ot.sinkhorn(C, a, b, eps=0.1, g_init=g0)
    res = dk.ot.sinkhorn(C, a, b, eps=0.1, g_init=g0, max_iter=30, fixed_iterations=True)
    plan = res.plan
    if torch.isnan(plan).any() or not torch.isfinite(res.marginal_error):
        assert torch.isnan(res.marginal_error).all() and not res.converged.any()
    else:  # -inf at one column is repaired by the first column update
        _plan_error(res, a, b)


def test_g_init_minus_inf_at_zero_weight_column_is_a_valid_warm_start():
    C, a, b = _problem(6, 5, seed=41)
    b = b.clone()
    b[2] = 0.0
    b = b / b.sum()
    cold = dk.ot.sinkhorn(C, a, b, eps=0.05, tol=1e-10)
    assert cold.g[2].item() == -float("inf")
    warm = dk.ot.sinkhorn(C, a, b, eps=0.05, tol=1e-10, g_init=cold.g)
    assert bool(warm.converged) and warm.iterations.item() <= 3
    torch.testing.assert_close(warm.plan, cold.plan, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shift", [1e6, -1e9, 1e12])
def test_g_init_constant_shift_is_removed(method, shift):
    """(f + k, g - k) is the same solution: a warm start shifted by a large constant must
    converge like an unshifted one (it never reached tol 1e-10 at k = 1e6: the shift ate
    the potentials' precision)."""
    C, a, b = _problem(8, 6, seed=42)
    cold = dk.ot.sinkhorn(C, a, b, eps=0.05, tol=1e-10, method=method)
    zero = dk.ot.sinkhorn(C, a, b, eps=0.05, tol=1e-10, method=method,
                          g_init=torch.zeros(6, dtype=F64))
    res = dk.ot.sinkhorn(C, a, b, eps=0.05, tol=1e-10, method=method,
                         g_init=torch.full((6,), shift, dtype=F64))
    assert bool(res.converged)
    assert res.iterations.item() <= zero.iterations.item() + 2
    _plan_error(res, a, b)
    torch.testing.assert_close(res.plan, cold.plan, rtol=0, atol=1e-9)
    assert res.f.abs().max().item() < 10 and res.g.abs().max().item() < 10


@pytest.mark.parametrize("method", METHODS)
def test_nan_cost_fixed_iterations_reports_nan(method):
    C, a, b = _problem(5, 4, B=2, seed=43)
    C = C.clone()
    C[1, 2, 3] = float("nan")
    res = dk.ot.sinkhorn(C, a, b, eps=0.1, max_iter=30, fixed_iterations=True, method=method)
    assert torch.isnan(res.marginal_error[1]) and not bool(res.converged[1])
    assert torch.isfinite(res.marginal_error[0]) and bool(res.converged[0])
    _plan_error(res[0] if hasattr(res, "__getitem__") else
                          dk.ot.sinkhorn(C[0], a[0], b[0], eps=0.1, max_iter=30,
                                         fixed_iterations=True, method=method), a[0], b[0])


def test_unconverged_warnings_suggest_the_right_fix():
    C, _, _, eps = _hard("issue", 0)
    with pytest.warns(UserWarning, match="did not converge") as rec:
        dk.ot.sinkhorn(C, eps=eps, max_iter=30)
    msg = str(rec[0].message)
    assert "max_iter" in msg and "method='sns'" not in msg, msg
    with pytest.warns(UserWarning, match="did not converge") as rec:
        dk.ot.sinkhorn(C, eps=eps, max_iter=30, method="sinkhorn")
    assert "method='sns'" in str(rec[0].message)
    # tol below the floor |sum a - sum b| (accepted up to a relative 1e-6): no plan meets it.
    # The solver stops at the floor instead of running max_iter, and says so.
    a = torch.full((5,), 0.2, dtype=F64)
    b = torch.full((4,), 0.25, dtype=F64) * (1 + 5e-7)
    for method in METHODS:
        with pytest.warns(UserWarning, match="mass mismatch") as rec:
            res = dk.ot.sinkhorn(C, a, b, eps=0.05, tol=1e-10, method=method)
        msg = str(rec[0].message)
        assert "max_iter" not in msg, msg
        assert not bool(res.converged)
        assert res.iterations.item() < 1000
        assert 5e-7 * (1 - 1e-6) <= res.marginal_error.item() <= 1e-6


@pytest.mark.parametrize("eps", [np.float32(0.05), np.float64(0.05), np.array(0.05),
                                 torch.tensor(0.05), torch.tensor(0.05, dtype=F64),
                                 torch.tensor([0.05]), 0.05, 1])
def test_eps_accepts_any_real_scalar(eps):
    C, a, b = _problem(5, 4, seed=44)
    res = dk.ot.sinkhorn(C, a, b, eps=eps, tol=1e-10)
    ref = dk.ot.sinkhorn(C, a, b, eps=float(eps), tol=1e-10)
    assert res.eps == float(eps) and bool(res.converged)
    torch.testing.assert_close(res.plan, ref.plan, rtol=0, atol=0)
    res = dk.ot.sinkhorn(C, a, b, eps=0.05, tol=np.float32(1e-8), max_iter=np.int64(500))
    assert bool(res.converged)


def test_bad_scalars_name_the_argument():
    C, a, b = _problem(5, 4, seed=45)
    for bad, exc in ((True, TypeError), (1j, TypeError), ("0.1", TypeError),
                     (torch.ones(2), ValueError), (np.ones(3), ValueError),
                     (float("nan"), ValueError), (float("inf"), ValueError)):
        with pytest.raises(exc, match=r"diffkern\.ot\.sinkhorn: eps"):
            dk.ot.sinkhorn(C, a, b, eps=bad)
    with pytest.raises(ValueError, match=r"diffkern\.ot\.sinkhorn: max_iter"):
        dk.ot.sinkhorn(C, a, b, eps=0.1, max_iter=2.5)


def test_bad_layouts_devices_and_dtypes_name_the_argument():
    C, a, b = _problem(5, 4, seed=46)
    with pytest.raises(ValueError, match=r"diffkern\.ot\.sinkhorn: g_init.*meta"):
        dk.ot.sinkhorn(C, a, b, eps=0.1, g_init=torch.zeros(4, device="meta"))
    with pytest.raises(ValueError, match=r"diffkern\.ot\.sinkhorn: f_init.*meta"):
        dk.ot.sinkhorn(C, a, b, eps=0.1, f_init=torch.zeros(5, device="meta"))
    with pytest.raises(TypeError, match=r"diffkern\.ot\.sinkhorn: cost: .*dense"):
        dk.ot.sinkhorn(C.to_sparse(), eps=0.1)
    with pytest.raises(TypeError, match=r"diffkern\.ot\.sinkhorn: a: .*dense"):
        dk.ot.sinkhorn(C, a.to_sparse(), b, eps=0.1)
    with pytest.raises(TypeError, match=r"diffkern\.ot\.sinkhorn: g_init: .*dense"):
        dk.ot.sinkhorn(C, a, b, eps=0.1, g_init=torch.zeros(4, dtype=F64).to_sparse())
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):
            with pytest.raises(TypeError, match=r"diffkern\.ot\.sinkhorn: cost: .*float8"):
                dk.ot.sinkhorn(C.to(getattr(torch, name)), eps=0.1)
    with pytest.raises(ValueError, match=r"diffkern\.ot\.sinkhorn: cost: .*meta"):
        dk.ot.sinkhorn(torch.zeros(5, 4, device="meta"), eps=0.1)
