"""Entropic optimal transport: log-domain Sinkhorn and Sinkhorn-Newton-Sparse (SNS).

``dk.ot.sinkhorn(cost, a, b, eps=...)`` solves, for each batch element,

    min_P  <C, P> + eps * sum_ij P_ij log P_ij    s.t.  P 1 = a,  P^T 1 = b,  P >= 0

(POT's convention), whose solution is P_ij = exp((f_i + g_j - C_ij) / eps) for dual
potentials f, g. ``method="sinkhorn"`` alternates exact row and column updates in the log
domain (never overflows); ``method="sns"`` runs a few of them, then Newton steps on the
semi-dual with a sparsified Hessian (Tang et al., ICLR 2024): machine accuracy in tens of
iterations where Sinkhorn needs thousands at small eps.

Gradients (no unrolling, no stored iterates):
- ``reg_cost`` by the envelope theorem: d/dC = P, d/da = f + eps/2, d/db = g + eps/2. The
  eps/2 comes from the convention (entropy sum P log P, not sum P (log P - 1)); as a and b
  must keep equal mass, only directions with sum(da) = sum(db) are meaningful, and along
  those any split of eps between the two gives the same number.
- ``plan``, ``cost``, ``f``, ``g`` by implicit differentiation of the optimality conditions
  P 1 = a, P^T 1 = b (one linear solve with the dense plan in the backward pass). f and g
  are defined up to (f + k, g - k); their gradient is taken in the least-squares sense
  (the right-hand side is projected on the solvable subspace).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import _C
from ._ops import current_stream_handle, num_threads, skips_dispatcher

__all__ = ["sinkhorn", "SinkhornResult"]

_METHODS = {"sinkhorn": 0, "sns": 1}
_MASS_RTOL = 1e-6
_CG_MAX_ITER = 400  # conjugate-gradient iterations per Newton step (forward solve)
_DIRECT_SOLVE_MAX = 2048  # backward: dense direct solve up to this many columns, CG beyond


def _plan(f, g, cost, eps):
    """P_ij = exp((f_i + g_j - C_ij) / eps) in float64, batched or not; -inf potentials
    (zero-mass rows or columns) give exact zeros."""
    return torch.exp((f[..., :, None] + g[..., None, :] - cost.double()) / eps)


# ----------------------------------------------------------------------------- the op
@torch.library.custom_op("diffkern::sinkhorn_solve", mutates_args=())
def _solve(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g0: torch.Tensor,
    eps: float,
    method: int,
    tol: float,
    max_iter: int,
    check_every: int,
    fixed_iterations: bool,
    newton_warmup: int,
    warm_start: bool,
    verbose: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, n, m) cost, (B, n)/(B, m) float64 weights, (B, m) float64 warm-start g ->
    f (B, n), g (B, m), marginal_error (B), iterations (B), newton_steps (B)."""
    return _run(cost, a, b, g0, eps, method, tol, max_iter, check_every, fixed_iterations,
                newton_warmup, warm_start, verbose, g_owned=False)[:5]


def _run(cost, a, b, g0, eps, method, tol, max_iter, check_every, fixed_iterations,
         newton_warmup, warm_start, verbose, g_owned):
    """The solve behind the op; also returns how many elements the solver's last check found
    above tol (-1 in fixed mode), read on the host with no extra synchronization.
    g_owned: g0 is a float64 contiguous tensor nobody else holds (solved in place)."""
    B, n, m = cost.shape
    cost = cost.detach().contiguous()
    cost_t = cost.transpose(1, 2).contiguous()
    f = torch.empty(B, n, dtype=torch.float64, device=cost.device)
    g = g0 if g_owned else g0.detach().to(torch.float64).contiguous().clone()
    err = torch.empty(B, dtype=torch.float64, device=cost.device)
    iters = torch.empty(B, dtype=torch.int64, device=cost.device)
    newton = torch.empty(B, dtype=torch.int64, device=cost.device)
    ws = torch.empty(_C.sinkhorn_workspace_bytes(B, n, m, method), dtype=torch.uint8,
                     device=cost.device)
    unconverged = _C.sinkhorn_solve(
        cost, cost_t, a.detach().contiguous(), b.detach().contiguous(), f, g, err, iters, newton,
        ws, float(eps), int(method), float(tol), int(max_iter), int(check_every),
        bool(fixed_iterations), int(newton_warmup), bool(warm_start), _CG_MAX_ITER, int(verbose),
        num_threads(), current_stream_handle(cost))
    return f, g, err, iters, newton, unconverged


@_solve.register_fake
def _(cost, a, b, g0, eps, method, tol, max_iter, check_every, fixed_iterations, newton_warmup,
      warm_start, verbose):
    B, n, m = cost.shape
    f64, i64 = torch.float64, torch.int64
    return (cost.new_empty((B, n), dtype=f64), cost.new_empty((B, m), dtype=f64),
            cost.new_empty((B,), dtype=f64), cost.new_empty((B,), dtype=i64),
            cost.new_empty((B,), dtype=i64))


def _setup_context(ctx, inputs, output):
    cost, a, b = inputs[0], inputs[1], inputs[2]
    f, g = output[0], output[1]
    ctx.mark_non_differentiable(*output[2:])
    ctx.n_settings = len(inputs) - 3  # g0 and the solver settings get no gradient
    ctx.eps = inputs[4]
    ctx.save_for_backward(cost, a, b, f, g)


def _backward(ctx, grad_f, grad_g, *unused):
    cost, a, b, f, g = ctx.saved_tensors
    nones = [None] * ctx.n_settings
    if grad_f is None and grad_g is None:
        return None, None, None, *nones
    B, n, m = cost.shape
    if grad_f is None:
        grad_f = torch.zeros(B, n, dtype=torch.float64, device=f.device)
    if grad_g is None:
        grad_g = torch.zeros(B, m, dtype=torch.float64, device=f.device)
    lam_f, lam_g, plan = _implicit_adjoint(cost, f, g, ctx.eps, grad_f.double(), grad_g.double())
    grad_cost = (plan * (lam_f[:, :, None] + lam_g[:, None, :]) / ctx.eps).to(cost.dtype)
    return grad_cost, lam_f.to(a.dtype), lam_g.to(b.dtype), *nones


_solve.register_autograd(_backward, setup_context=_setup_context)


def _implicit_adjoint(cost, f, g, eps, u, w):
    """Solves H (lam_f, lam_g) = (u, w) with H = (1/eps) [[D_r, P], [P^T, D_c]], the Jacobian of
    the marginals (P 1, P^T 1) in (f, g), in the least-squares sense (H is singular along
    (1, -1)). Returns lam_f (B, n), lam_g (B, m) and the plan, all float64.

    Eliminating lam_f leaves the Schur complement S = D_c - P^T D_r^-1 P (m x m, positive
    semi-definite, kernel = constants on the columns with mass), solved directly for
    m <= 2048 and by preconditioned CG on the dense plan beyond. The dense plan, not the
    forward pass's sparsified one, so the gradient is exact, not a Newton approximation.
    """
    C = cost.double()
    plan = _plan(f, g, C, eps)
    r, c = plan.sum(2), plan.sum(1)
    inv_r = torch.where(r > 0, 1.0 / r, torch.zeros_like(r))
    live = c > 0
    rhs = eps * w - eps * torch.einsum("bnm,bn->bm", plan, inv_r * u)
    rhs = torch.where(live, rhs, torch.zeros_like(rhs))
    # Project out the kernel direction (constants on live columns): the solvable part.
    n_live = live.sum(1, keepdim=True).clamp_min(1)
    rhs = rhs - live * (rhs.sum(1, keepdim=True) / n_live)
    if c.shape[1] <= _DIRECT_SOLVE_MAX:
        S = torch.diag_embed(c) - torch.einsum("bnm,bn,bnk->bmk", plan, inv_r, plan)
        # A rank-one term fixes the gauge (sum of lam_g over live columns = 0, as the rhs);
        # dead columns get an identity row, so S is invertible and their lam_g is 0.
        ones = live.double()
        scale = (c.sum(1, keepdim=True) / n_live**2)[:, :, None]
        S = S + scale * ones[:, :, None] * ones[:, None, :]
        S = S + torch.diag_embed((~live).double())
        lam_g = torch.linalg.solve(S, rhs)
    else:
        lam_g = _dense_schur_cg(plan, c, inv_r, rhs, live)
    lam_f = inv_r * (eps * u - torch.einsum("bnm,bm->bn", plan, lam_g))
    return lam_f, lam_g, plan


def _dense_schur_cg(plan, c, inv_r, rhs, live, rtol=1e-12, max_iter=5000):
    def schur(x):
        return c * x - torch.einsum("bnm,bn->bm", plan, inv_r * torch.einsum("bnm,bm->bn", plan, x))

    prec = torch.where(live, 1.0 / c.clamp_min(1e-300), torch.zeros_like(c))
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = prec * r
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    stop = rtol**2 * rz
    for _ in range(max_iter):
        Sp = schur(p)
        alpha = rz / (p * Sp).sum(1, keepdim=True).clamp_min(1e-300)
        x = x + alpha * p
        r = r - alpha * Sp
        z = prec * r
        rz_new = (r * z).sum(1, keepdim=True)
        if bool((rz_new <= stop).all()):
            break
        p = z + (rz_new / rz.clamp_min(1e-300)) * p
        rz = rz_new
    return x


class _RegCost(torch.autograd.Function):
    """reg_cost = <C, P> + eps sum P log P = sum_ij P_ij (f_i + g_j), with the envelope
    gradient: d/dC = P, d/da = f + eps/2, d/db = g + eps/2 (no solve)."""

    @staticmethod
    def forward(ctx, cost, a, b, f, g, eps):
        plan = _plan(f, g, cost, eps)
        fa = torch.where(torch.isfinite(f), f, torch.zeros_like(f))  # zero-mass rows: P row = 0
        gb = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
        value = (plan * (fa[..., :, None] + gb[..., None, :])).sum((-2, -1))
        ctx.save_for_backward(plan, f, g)
        ctx.eps = eps
        ctx.dtypes = (cost.dtype, a.dtype, b.dtype)
        return value.to(cost.dtype)

    @staticmethod
    def backward(ctx, grad):
        plan, f, g = ctx.saved_tensors
        grad = grad.double()
        dC = (grad[..., None, None] * plan).to(ctx.dtypes[0])
        da = (grad[..., None] * (f + ctx.eps / 2)).to(ctx.dtypes[1])
        db = (grad[..., None] * (g + ctx.eps / 2)).to(ctx.dtypes[2])
        return dC, da, db, None, None, None


# ------------------------------------------------------------------------- the result
@dataclass
class SinkhornResult:
    """What ``sinkhorn`` returns; batched like the input (no batch dim for a 2-D cost).

    f (..., n), g (..., m): dual potentials, dtype of the cost (f_i = -inf where a_i = 0).
    iterations, newton_steps: int64 (...,). marginal_error: float64 (...,), the L1 error
    sum|P 1 - a| + sum|P^T 1 - b| of the returned potentials. converged: bool (...,).
    ``plan``, ``cost``, ``reg_cost`` are computed from the potentials on access.
    """

    f: torch.Tensor
    g: torch.Tensor
    iterations: torch.Tensor
    newton_steps: torch.Tensor
    marginal_error: torch.Tensor
    converged: torch.Tensor
    eps: float
    method: str
    _cost: torch.Tensor
    _a: torch.Tensor
    _b: torch.Tensor
    _f64: torch.Tensor
    _g64: torch.Tensor

    def _plan64(self) -> torch.Tensor:
        return _plan(self._f64, self._g64, self._cost, self.eps)

    @property
    def plan(self) -> torch.Tensor:
        """Dense P (..., n, m) = exp((f_i + g_j - C_ij)/eps), dtype of the cost."""
        return self._plan64().to(self._cost.dtype)

    @property
    def cost(self) -> torch.Tensor:
        """Transport cost <C, P> (...,) (without the entropy term)."""
        return (self._plan64() * self._cost.double()).sum((-2, -1)).to(self._cost.dtype)

    @property
    def reg_cost(self) -> torch.Tensor:
        """Entropic objective <C, P> + eps sum P log P (...,), envelope-theorem gradient."""
        return _RegCost.apply(self._cost, self._a, self._b, self._f64.detach(),
                              self._g64.detach(), self.eps)


# --------------------------------------------------------------------------- checking
def _as_weights(w, name, length, batch, like):
    """Shape/dtype/device checks only (no data read); values are checked in _check_values."""
    if w is None:
        return None
    if not isinstance(w, torch.Tensor):
        w = torch.as_tensor(w, device=like.device)
    if not w.dtype.is_floating_point:
        raise TypeError(f"sinkhorn: {name}: expected a floating-point tensor, got {w.dtype}")
    if w.device != like.device:
        raise ValueError(f"sinkhorn: {name}: expected device {like.device} (the device of cost), "
                         f"got {w.device}")
    if w.dim() == 1 and w.shape[0] == length:
        w = w.expand(batch, length)
    elif not (w.dim() == 2 and tuple(w.shape) == (batch, length)):
        want = f"({length},) or ({batch}, {length})" if batch > 1 else f"({length},)"
        raise ValueError(f"sinkhorn: {name}: expected shape {want} to match cost, "
                         f"got {tuple(w.shape)}")
    return w


def _check_values(C, a, b):
    """Every value check in one device round trip (each separate .item() on CUDA is a sync)."""
    if a is None and b is None:  # uniform weights: only the cost can be bad
        if not bool(torch.isfinite(C.detach()).all()):
            raise ValueError("sinkhorn: cost: contains NaN or inf")
        return
    flags = [~torch.isfinite(C.detach()).all()]
    names = ["cost: contains NaN or inf"]
    sums = []
    for w, name in ((a, "a"), (b, "b")):
        if w is None:
            sums.append(None)
            continue
        wd = w.detach().double()
        flags += [torch.isnan(wd).any(), torch.isinf(wd).any(), (wd < 0).any(),
                  (wd.sum(-1) <= 0).any()]
        names += [f"{name}: contains NaN", f"{name}: contains inf",
                  f"{name}: expected non-negative weights, got a negative entry",
                  f"{name}: expected a positive total mass in every batch element"]
        sums.append(wd.sum(-1))
    if sums[0] is not None or sums[1] is not None:
        sa = sums[0] if sums[0] is not None else torch.ones_like(sums[1])
        sb = sums[1] if sums[1] is not None else torch.ones_like(sums[0])
        rel = ((sa - sb).abs() / torch.maximum(sa, sb)).max()
    else:
        rel = torch.zeros((), dtype=torch.float64, device=C.device)
    values = torch.stack([f.double() for f in flags] + [rel.double()]).tolist()
    for bad, msg in zip(values[:-1], names):
        if bad:
            raise ValueError(f"sinkhorn: {msg}")
    if values[-1] > _MASS_RTOL:  # NaN-safe: NaN weights were reported above
        raise ValueError(f"sinkhorn: b: expected the same total mass as a (relative 1e-6), "
                         f"got sums differing by a relative {values[-1]:.3g}")


def _check_cost(cost):
    if not isinstance(cost, torch.Tensor):
        raise TypeError(f"sinkhorn: cost: expected a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() not in (2, 3):
        raise ValueError(f"sinkhorn: cost: expected shape (n, m) or (B, n, m), "
                         f"got {tuple(cost.shape)}")
    if cost.dtype in (torch.float16, torch.bfloat16):
        cost = cost.float()
    if cost.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"sinkhorn: cost: expected dtype float32 or float64, got {cost.dtype}")
    if cost.device.type not in ("cpu", "cuda"):
        raise ValueError(f"sinkhorn: cost: expected a cpu or cuda tensor, got {cost.device}")
    if any(s == 0 for s in cost.shape):
        raise ValueError(f"sinkhorn: cost: expected non-empty dimensions, "
                         f"got {tuple(cost.shape)}")
    return cost


# ---------------------------------------------------------------------------- public
def sinkhorn(
    cost: torch.Tensor,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    *,
    eps: float,
    method: str = "sns",
    tol: float = 1e-6,
    max_iter: Optional[int] = None,
    check_every: int = 10,
    f_init: Optional[torch.Tensor] = None,
    g_init: Optional[torch.Tensor] = None,
    fixed_iterations: bool = False,
    newton_warmup: int = 20,
    verbose: int = 0,
) -> SinkhornResult:
    """Entropic optimal transport between weights ``a`` and ``b`` for ``cost``.

    Solves min <C, P> + eps sum P log P subject to P 1 = a, P^T 1 = b; the solution is
    P_ij = exp((f_i + g_j - C_ij) / eps).

    Args:
        cost: (n, m) or batched (B, n, m), float32 or float64 (float16/bfloat16 are computed
            in float32), CPU or CUDA. Potentials are computed in float64 internally.
        a, b: weights (n,)/(m,) (shared by the batch) or (B, n)/(B, m); default uniform.
            Non-negative, zero entries allowed; the sums of a and b must agree to 1e-6.
        eps: entropic regularization, > 0 (in the units of the cost).
        method: ``"sns"`` (Sinkhorn, then sparse Newton) or ``"sinkhorn"`` (log domain).
        tol: stop when the L1 marginal error sum|P1 - a| + sum|P^T 1 - b| <= tol.
        max_iter: cap on Sinkhorn iterations + Newton steps (default 10000). A run that
            reaches it warns and reports ``converged=False``.
        check_every: Sinkhorn iterations between two marginal-error checks (each check costs
            one extra pass and, on CUDA, one host synchronization).
        f_init, g_init: warm start. The solver iterates on g (f is always g's exact row
            update), so g_init is what matters; f_init is only shape-checked.
        fixed_iterations: run exactly ``max_iter`` iterations (SNS: ``newton_warmup``
            Sinkhorn iterations, then per round one Newton step, or one Sinkhorn iteration
            where the step is rejected) with no host synchronization and no input-value
            checks: CUDA-graph capturable, for training loops.
        newton_warmup: SNS only: Sinkhorn iterations before the first Newton step (the
            first three quarters with eps-scaling: 27, 9, 3 times eps). With ``g_init``: 2
            plain iterations, after a check that returns at once if g_init already meets tol.
        verbose: 1 (or True): a progress line on stderr at every check / Newton step;
            2: also the conjugate-gradient iterations of each Newton step.

    Returns:
        SinkhornResult with f, g, plan, cost, reg_cost, iterations, newton_steps,
        marginal_error, converged.

    Raises:
        ValueError naming the argument: bad shapes, negative/NaN weights, sums of a and b
        differing by more than a relative 1e-6, eps <= 0, non-finite cost, unknown method.
        TypeError: non-float cost or weights.
    """
    cost = _check_cost(cost)
    if method not in _METHODS:
        raise ValueError(f"sinkhorn: method: expected one of {sorted(_METHODS)}, got {method!r}")
    if isinstance(eps, torch.Tensor):
        eps = float(eps)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"sinkhorn: eps: expected a finite number > 0, got {eps!r}")
    if not (tol >= 0):
        raise ValueError(f"sinkhorn: tol: expected >= 0, got {tol!r}")
    if max_iter is None:
        max_iter = 10000
    if int(max_iter) < 0:
        raise ValueError(f"sinkhorn: max_iter: expected >= 0, got {max_iter}")
    if int(check_every) < 1:
        raise ValueError(f"sinkhorn: check_every: expected >= 1, got {check_every}")
    batched = cost.dim() == 3
    C = cost if batched else cost.unsqueeze(0)
    B, n, m = C.shape
    fixed = bool(fixed_iterations)
    a_ = _as_weights(a, "a", n, B, C)
    b_ = _as_weights(b, "b", m, B, C)
    if not fixed:
        _check_values(C, a_, b_)
    if a_ is None:
        a_ = torch.full((B, n), 1.0 / n, dtype=torch.float64, device=C.device)
    if b_ is None:
        b_ = torch.full((B, m), 1.0 / m, dtype=torch.float64, device=C.device)
    if g_init is not None:
        g0 = torch.as_tensor(g_init, device=C.device)
        if g0.dim() == 1 and g0.shape[0] == m:
            g0 = g0.expand(B, m)
        if tuple(g0.shape) != (B, m):
            raise ValueError(f"sinkhorn: g_init: expected shape {(B, m) if batched else (m,)}, "
                             f"got {tuple(g0.shape)}")
        g0 = torch.nan_to_num(g0.detach().double(), neginf=0.0)  # zero-mass columns restart
    else:
        g0 = torch.zeros(B, m, dtype=torch.float64, device=C.device)
    if f_init is not None:
        f0 = torch.as_tensor(f_init)
        if tuple(f0.shape) not in ((n,), (B, n)):
            raise ValueError(f"sinkhorn: f_init: expected shape {(B, n) if batched else (n,)}, "
                             f"got {tuple(f0.shape)}")

    a64 = a_.to(torch.float64)
    b64 = b_.to(torch.float64)
    settings = (float(eps), _METHODS[method], float(tol), int(max_iter), int(check_every), fixed,
                int(newton_warmup), g_init is not None, int(verbose))
    if skips_dispatcher(C, a64, b64, g0):
        # Nothing for the dispatcher to do (no autograd, not compiling, no functorch): call
        # the solve directly. Same results; on small CUDA problems the op's dispatch and the
        # extra synchronization for the convergence test are a fifth of the wall clock.
        f, g, err, iters, newton, unconverged = _run(C, a64, b64, g0, *settings,
                                                     g_owned=g_init is None)
    else:
        f, g, err, iters, newton = _solve(C, a64, b64, g0, *settings)
        unconverged = None
    converged = err <= tol
    if not fixed:
        bad = int((~converged).sum()) if unconverged is None else unconverged
        if bad:
            warnings.warn(
                f"diffkern.ot.sinkhorn did not converge: {bad} of {B} problem(s) still have an "
                f"L1 marginal error above tol={tol:g} after max_iter={max_iter} iterations "
                f"(worst {err.max().item():.3g}); raise max_iter or eps, or use method='sns'",
                UserWarning, stacklevel=2)
    squeeze = (lambda t: t) if batched else (lambda t: t[0])
    return SinkhornResult(
        f=squeeze(f).to(cost.dtype), g=squeeze(g).to(cost.dtype), iterations=squeeze(iters),
        newton_steps=squeeze(newton), marginal_error=squeeze(err),
        converged=squeeze(converged), eps=float(eps), method=method, _cost=squeeze(C),
        _a=squeeze(a64), _b=squeeze(b64), _f64=squeeze(f), _g64=squeeze(g))
