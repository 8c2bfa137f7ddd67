"""Dense float64 reference for entropic optimal transport (tests of ``dk.ot.sinkhorn``).

Problem (same convention as POT and diffkern):

    min_P <C, P> + eps * sum_ij P_ij log P_ij   s.t.  P 1 = a,  P^T 1 = b,  P >= 0,

whose solution is P_ij = exp((f_i + g_j - C_ij) / eps) for dual potentials (f, g), unique up
to the gauge (f + k, g - k).

``solve`` works on the support of a and b only (rows / columns with zero weight are
removed, then put back with f = -inf / g = -inf and an exactly zero plan), runs log-domain
Sinkhorn, then polishes with damped Newton on the dual (dense (n + m - 1)-square system, one
potential pinned to fix the gauge) until the L1 marginal error is below ``tol`` (1e-13 by
default). Newton makes small eps (1e-3 of max C) cheap at the sizes used in the tests
(n, m <= a few hundred). Everything is plain torch, so the solve can be differentiated by
unrolling (the tests do not rely on that).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Solution:
    f: torch.Tensor  # (n,), -inf where a == 0
    g: torch.Tensor  # (m,), -inf where b == 0
    plan: torch.Tensor  # (n, m)
    cost: torch.Tensor  # <C, P>
    reg_cost: torch.Tensor  # <C, P> + eps * sum P log P
    marginal_error: float  # L1, sum |P1 - a| + sum |P^T 1 - b|
    sinkhorn_iterations: int
    newton_steps: int


def marginal_error(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 marginal error of a plan (..., n, m) against weights (..., n), (..., m)."""
    return ((plan.sum(-1) - a).abs().sum(-1) + (plan.sum(-2) - b).abs().sum(-1))


def entropy_term(plan: torch.Tensor) -> torch.Tensor:
    """sum P log P over the last two dims, with 0 log 0 = 0."""
    safe = torch.where(plan > 0, plan, torch.ones_like(plan))
    return (plan * torch.log(safe)).sum((-2, -1))


def plan_from_potentials(f, g, C, eps):
    """exp((f_i + g_j - C_ij) / eps); -inf potentials give exact zeros."""
    return torch.exp((f[..., :, None] + g[..., None, :] - C) / eps)


def _sinkhorn(C, la, lb, eps, f, g, tol, max_iter, check_every=10):
    """Log-domain Sinkhorn on a problem with all-positive weights. Returns f, g, iters."""
    it = 0
    while it < max_iter:
        g = eps * (lb - torch.logsumexp((f[:, None] - C) / eps, dim=0))
        f = eps * (la - torch.logsumexp((g[None, :] - C) / eps, dim=1))
        it += 1
        if it % check_every == 0:
            # Rows are exact after the f update; the error is in the columns.
            P = plan_from_potentials(f, g, C, eps)
            if (P.sum(0) - lb.exp()).abs().sum() <= tol:
                break
    return f, g, it


def _newton(C, a, b, eps, f, g, tol, max_steps=100):
    """Damped Newton on the concave dual D = <f,a> + <g,b> - eps sum P, g[-1] pinned."""
    n, m = C.shape

    def dual(f, g):
        return (f * a).sum() + (g * b).sum() - eps * plan_from_potentials(f, g, C, eps).sum()

    steps = 0
    # Pin the gauge at g[-1] = 0 (shift f and g, which leaves P unchanged).
    shift = g[-1]
    f, g = f + shift, g - shift
    for steps in range(max_steps + 1):
        P = plan_from_potentials(f, g, C, eps)
        r, c = P.sum(1), P.sum(0)
        err = (r - a).abs().sum() + (c - b).abs().sum()
        if err <= tol or steps == max_steps:
            break
        grad = torch.cat([a - r, (b - c)[:-1]])
        H = torch.zeros(n + m - 1, n + m - 1, dtype=C.dtype, device=C.device)
        H[:n, :n] = torch.diag(r)
        H[n:, n:] = torch.diag(c[:-1])
        H[:n, n:] = P[:, :-1]
        H[n:, :n] = P[:, :-1].T
        H = H / eps
        # Tiny Tikhonov term: blocks of P can underflow at small eps.
        H = H + torch.eye(n + m - 1, dtype=C.dtype, device=C.device) * (
            1e-13 * H.diagonal().abs().max())
        d = torch.linalg.solve(H, grad)
        df, dg = d[:n], torch.cat([d[n:], d.new_zeros(1)])
        d0 = dual(f, g)
        slope = (grad * d).sum()
        t = 1.0
        while t > 1e-20:
            if dual(f + t * df, g + t * dg) >= d0 + 1e-4 * t * slope:
                break
            t *= 0.5
        f, g = f + t * df, g + t * dg
    return f, g, steps


def solve(C, a=None, b=None, *, eps, tol=1e-13, max_sinkhorn=20000, newton=True,
          newton_switch=1e-4):
    """Reference solve of one (n, m) problem in float64. See the module docstring."""
    C = torch.as_tensor(C).to(torch.float64)
    n, m = C.shape
    a = torch.full((n,), 1.0 / n, dtype=C.dtype) if a is None else torch.as_tensor(a).to(C)
    b = torch.full((m,), 1.0 / m, dtype=C.dtype) if b is None else torch.as_tensor(b).to(C)
    I, J = a > 0, b > 0
    Cs, as_, bs = C[I][:, J], a[I], b[J]
    # Start from the c-transform-like guess f = 0, g = 0 (shifted for the log weights).
    f = torch.zeros(int(I.sum()), dtype=C.dtype)
    g = torch.zeros(int(J.sum()), dtype=C.dtype)
    f, g, iters = _sinkhorn(Cs, as_.log(), bs.log(), eps, f, g,
                            newton_switch if newton else tol, max_sinkhorn)
    steps = 0
    if newton:
        f, g, steps = _newton(Cs, as_, bs, eps, f, g, tol)
    F = torch.full((n,), float("-inf"), dtype=C.dtype)
    G = torch.full((m,), float("-inf"), dtype=C.dtype)
    F[I], G[J] = f, g
    P = plan_from_potentials(F, G, C, eps)
    err = float(marginal_error(P, a, b))
    return Solution(f=F, g=G, plan=P, cost=(C * P).sum(),
                    reg_cost=(C * P).sum() + eps * entropy_term(P),
                    marginal_error=err, sinkhorn_iterations=iters, newton_steps=steps)
