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
import numbers
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import _C
from ._ops import _is_functorch_wrapped, current_stream_handle, num_threads, skips_dispatcher

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
        lam_g = _solve_psd(S, rhs)
    else:
        lam_g = _dense_schur_cg(plan, c, inv_r, rhs, live)
    lam_f = inv_r * (eps * u - torch.einsum("bnm,bm->bn", plan, lam_g))
    return lam_f, lam_g, plan


# Backward: above this condition estimate (from the Cholesky factor's diagonal, a lower
# bound) a direct solve's error (~cond * 1e-16, relative) is no longer small, and the
# symmetric eigendecomposition with a cut-off takes over.
_COND_DIRECT_MAX = 1e8
_PINV_RCOND = 1e-13


def _solve_psd(S, rhs):
    """S x = rhs for symmetric positive (semi-)definite S (B, m, m), batched. Cholesky where
    S is well conditioned; where it fails or S is nearly singular (tiny eps with a
    near-permutation plan: the Schur complement couples groups of rows and columns only
    through exponentially small entries; or a plan that is not converged, with columns of
    almost no mass), the minimum-norm solution with eigenvalues below _PINV_RCOND times the
    largest dropped. The dropped directions shift whole groups' potentials against each other;
    they move the plan only through the entries that couple the groups, which are as small as
    the dropped eigenvalues, so the gradient loses at most that much."""
    L, info = torch.linalg.cholesky_ex(S)
    d = torch.diagonal(L, dim1=-2, dim2=-1)
    dmin = d.abs().amin(-1)
    dmax = d.abs().amax(-1)
    good = (info == 0) & torch.isfinite(d).all(-1) & (dmax**2 <= _COND_DIRECT_MAX * dmin**2)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    x = torch.cholesky_solve(rhs[..., None], torch.where(good[:, None, None], L, eye))[..., 0]
    # Eagerly, the eigendecomposition runs only for the elements that need it; traced
    # (torch.compile, AOT autograd, functorch) nothing may depend on the data, so it runs
    # for all and the result is selected.
    eager = not torch.compiler.is_compiling() and type(S) is torch.Tensor and not (
        _is_functorch_wrapped(S))
    if eager and bool(good.all()):
        return x
    Sb, rb = (S[~good], rhs[~good]) if eager else (S, rhs)
    Sb = torch.where(torch.isfinite(Sb), Sb, torch.zeros_like(Sb))
    w, V = torch.linalg.eigh(Sb)
    cut = _PINV_RCOND * w.abs().amax(-1, keepdim=True)
    inv_w = torch.where(w > cut, 1.0 / w, torch.zeros_like(w))
    xb = (V @ (inv_w[..., None] * (V.transpose(-2, -1) @ rb[..., None])))[..., 0]
    if not eager:
        return torch.where(good[:, None], x, xb)
    x = x.clone()
    x[~good] = xb
    return x


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
_FN = "diffkern.ot.sinkhorn"


def _real_scalar(value, name):
    """A real scalar of any kind (Python, NumPy scalar or array, tensor; one element) as a
    float; bool and complex are refused."""
    v = value
    if type(v) is float or type(v) is int:  # the common case, and all torch.compile sees
        return float(v)
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{_FN}: {name}: expected a scalar, got shape {tuple(v.shape)}")
        if v.dtype.is_complex or v.dtype == torch.bool:
            raise TypeError(f"{_FN}: {name}: expected a real number, got dtype {v.dtype}")
        if v.device.type == "meta":
            raise ValueError(f"{_FN}: {name}: expected a number, got a tensor on the meta device")
        return float(v.item())
    if type(v).__module__ == "numpy" and hasattr(v, "dtype") and hasattr(v, "item"):
        if getattr(v, "size", 1) != 1:
            raise ValueError(f"{_FN}: {name}: expected a scalar, got shape {tuple(v.shape)}")
        if v.dtype.kind not in "fiu":
            raise TypeError(f"{_FN}: {name}: expected a real number, got dtype {v.dtype}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{_FN}: {name}: expected a real number, got {type(value).__name__}")
    return float(v)


def _int_scalar(value, name, minimum):
    v = _real_scalar(value, name)
    if not (math.isfinite(v) and v == int(v)):
        raise ValueError(f"{_FN}: {name}: expected an integer, got {value!r}")
    if v < minimum:
        raise ValueError(f"{_FN}: {name}: expected >= {minimum}, got {int(v)}")
    return int(v)


def _check_tensor_kind(t, name, like=None):
    """Layout and device of an optional tensor argument, before anything reads it."""
    if not isinstance(t, torch.Tensor):
        return
    if t.layout != torch.strided:
        raise TypeError(f"{_FN}: {name}: expected a dense (strided) tensor, got layout "
                        f"{t.layout}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{_FN}: {name}: expected device {like.device} (the device of cost), "
                         f"got {t.device}")


def _as_weights(w, name, length, batch, like):
    """Shape/dtype/device checks only (no data read); values are checked in _check_values."""
    if w is None:
        return None
    _check_tensor_kind(w, name, like)
    if not isinstance(w, torch.Tensor):
        w = torch.as_tensor(w, device=like.device)
        if w.dtype == torch.float32 or not (w.dtype.is_floating_point or w.dtype.is_complex):
            w = w.to(torch.float64)  # lists and NumPy: float64, as NumPy would
    if not w.dtype.is_floating_point:
        raise TypeError(f"{_FN}: {name}: expected a floating-point tensor, got {w.dtype}")
    if w.dim() == 1 and w.shape[0] == length:
        w = w.expand(batch, length)
    elif not (w.dim() == 2 and tuple(w.shape) == (batch, length)):
        want = f"({length},) or ({batch}, {length})" if batch > 1 else f"({length},)"
        raise ValueError(f"{_FN}: {name}: expected shape {want} to match cost, "
                         f"got {tuple(w.shape)}")
    return w


def _check_values(C, a, b):
    """Every value check in one device round trip (each separate .item() on CUDA is a sync)."""
    if a is None and b is None:  # uniform weights: only the cost can be bad
        if not bool(torch.isfinite(C.detach()).all()):
            raise ValueError(f"{_FN}: cost: contains NaN or inf")
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
            raise ValueError(f"{_FN}: {msg}")
    if values[-1] > _MASS_RTOL:  # NaN-safe: NaN weights were reported above
        raise ValueError(f"{_FN}: b: expected the same total mass as a (relative 1e-6), "
                         f"got sums differing by a relative {values[-1]:.3g}")


def _check_cost(cost):
    if not isinstance(cost, torch.Tensor):
        raise TypeError(f"{_FN}: cost: expected a torch.Tensor, got {type(cost).__name__}")
    if cost.layout != torch.strided:
        raise TypeError(f"{_FN}: cost: expected a dense (strided) tensor, got layout "
                        f"{cost.layout}")
    if cost.dim() not in (2, 3):
        raise ValueError(f"{_FN}: cost: expected shape (n, m) or (B, n, m), "
                         f"got {tuple(cost.shape)}")
    if cost.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{_FN}: cost: expected dtype float32 or float64 (float16 and "
                        f"bfloat16 are computed in float32), got {cost.dtype}")
    if cost.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{_FN}: cost: expected a cpu or cuda tensor, got {cost.device}")
    if cost.dtype in (torch.float16, torch.bfloat16):
        cost = cost.float()
    if any(s == 0 for s in cost.shape):
        raise ValueError(f"{_FN}: cost: expected non-empty dimensions, "
                         f"got {tuple(cost.shape)}")
    return cost


def _initial_g(g_init, B, m, batched, C, b64, check):
    """The warm start for g, float64 (B, m): re-centred, since the dual is invariant under
    (f + k, g - k) and a large shift k would cost |k| * 1e-16 / eps of plan accuracy (a start
    g_init = 1e6 never reached tol 1e-10); -inf at zero-weight columns, where the solution
    has it anyway. With `check` (tolerance mode) NaN, +inf and -inf at a column with weight
    are refused; in fixed mode nothing is read on the host and a NaN start gives NaN
    results (marginal_error NaN, converged False)."""
    _check_tensor_kind(g_init, "g_init", C)
    g0 = torch.as_tensor(g_init, device=C.device)
    if not (g0.dtype.is_floating_point or g0.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{_FN}: g_init: expected a real floating-point tensor, got {g0.dtype}")
    if g0.dim() == 1 and g0.shape[0] == m:
        g0 = g0.expand(B, m)
    if tuple(g0.shape) != (B, m):
        raise ValueError(f"{_FN}: g_init: expected shape {(B, m) if batched else (m,)}, "
                         f"got {tuple(g0.shape)}")
    g0 = g0.detach().to(torch.float64)
    live = b64 > 0
    if check:
        bad = torch.stack([torch.isnan(g0).any(), (g0 == math.inf).any(),
                           ((g0 == -math.inf) & live).any()]).tolist()
        for flag, what in zip(bad, ("contains NaN", "contains +inf",
                                    "contains -inf at a column of positive weight b_j (-inf "
                                    "is the potential of zero-weight columns only)")):
            if flag:
                raise ValueError(f"{_FN}: g_init: {what}")
    # The shift: the b-weighted mean over finite entries at live columns (a NaN start stays
    # NaN where it is NaN; an all-infinite start is shifted by nothing).
    use = live & torch.isfinite(g0)
    w = torch.where(use, b64, torch.zeros_like(b64))
    shift = (torch.where(use, g0, torch.zeros_like(g0)) * w).sum(1, keepdim=True) / w.sum(
        1, keepdim=True).clamp_min(1e-300)
    return torch.where(live, g0 - shift, torch.full_like(g0, -math.inf)).contiguous()


def _warn_unconverged(err, converged, tol, max_iter, method, a64, b64, B, rounding):
    """One warning that says why each unconverged problem stopped and what would help.
    rounding: 2^-52 max|C| / eps, the relative error of exp((f + g - C) / eps) from the
    rounding of its argument alone (L1 errors a few times that are what it allows)."""
    bad = ~converged
    nan = torch.isnan(err)
    floor = (a64.sum(1) - b64.sum(1)).abs()
    at_floor = bad & ~nan & (err <= 2 * floor)  # the solver's own stop (kFloorRatio)
    capped = bad & ~nan & ~at_floor
    n_nan, n_floor, n_cap = (int(t.sum()) for t in (nan, at_floor, capped))
    parts = []
    if n_cap:
        hint = "raise max_iter or eps" + (", or use method='sns'" if method == "sinkhorn" else "")
        if tol < 1e3 * rounding:
            hint += (f"; tol may also be below what float64 potentials resolve here (the "
                     f"plan's entries carry a relative rounding error of about {rounding:.1g} "
                     f"= 2^-52 max|C| / eps, and SNS's Newton steps stop helping at errors "
                     f"about 100-1000 times that): raise tol")
        parts.append(f"{n_cap} of {B} problem(s) still have an L1 marginal error above "
                     f"tol={tol:g} after max_iter={max_iter} iterations (worst "
                     f"{err[capped].max().item():.3g}); {hint}")
    if n_floor:
        parts.append(f"{n_floor} of {B} problem(s) stopped at the L1 error floor "
                     f"{floor[at_floor].max().item():.3g} set by the mass mismatch "
                     f"|sum(a) - sum(b)| (no plan has a smaller error), which is above "
                     f"tol={tol:g}; give a and b equal sums or raise tol")
    if n_nan:
        parts.append(f"{n_nan} of {B} problem(s) have a NaN marginal error (NaN or inf in the "
                     f"inputs)")
    warnings.warn(f"{_FN} did not converge: " + "; ".join(parts), UserWarning, stacklevel=3)


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
        eps: entropic regularization, > 0 (in the units of the cost): any real scalar
            (Python, NumPy, a one-element tensor).
        method: ``"sns"`` (Sinkhorn, then sparse Newton steps where they beat Sinkhorn
            iterations; Sinkhorn iterations otherwise, so it converges wherever Sinkhorn
            does) or ``"sinkhorn"`` (log domain).
        tol: stop when the L1 marginal error sum|P1 - a| + sum|P^T 1 - b| <= tol. No plan
            does better than |sum(a) - sum(b)|; a problem stops at twice that if tol is
            below it (reported ``converged=False``, with a warning that says so).
        max_iter: cap on Sinkhorn iterations + Newton steps (default 10000). A run that
            reaches it warns and reports ``converged=False``.
        check_every: Sinkhorn iterations between two marginal-error checks (each check costs
            one extra pass and, on CUDA, one host synchronization).
        f_init, g_init: warm start. The solver iterates on g (f is always g's exact row
            update), so g_init is what matters; f_init is only shape-checked. g_init is
            re-centred (the solution is defined up to (f + k, g - k)); it must be finite
            except -inf at zero-weight columns (what the solver returns there).
        fixed_iterations: run exactly ``max_iter`` iterations (SNS: ``newton_warmup``
            Sinkhorn iterations, then per round one Newton step, or one Sinkhorn iteration
            where the step failed) with no host synchronization and no input-value
            checks: CUDA-graph capturable, for training loops. NaN or inf inputs then give
            a NaN marginal_error and converged=False.
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
        differing by more than a relative 1e-6, eps <= 0, non-finite cost or g_init, a
        tensor argument on another device than cost, unknown method.
        TypeError: non-float cost or weights, a sparse tensor, a non-real scalar.
    """
    cost = _check_cost(cost)
    if not (isinstance(method, str) and method in _METHODS):
        raise ValueError(f"{_FN}: method: expected one of {sorted(_METHODS)}, got {method!r}")
    eps = _real_scalar(eps, "eps")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{_FN}: eps: expected a finite number > 0, got {eps!r}")
    tol = _real_scalar(tol, "tol")
    if not (tol >= 0):
        raise ValueError(f"{_FN}: tol: expected >= 0, got {tol!r}")
    max_iter = 10000 if max_iter is None else _int_scalar(max_iter, "max_iter", 0)
    check_every = _int_scalar(check_every, "check_every", 1)
    newton_warmup = _int_scalar(newton_warmup, "newton_warmup", 0)
    batched = cost.dim() == 3
    C = cost if batched else cost.unsqueeze(0)
    B, n, m = C.shape
    fixed = bool(fixed_iterations)
    a_ = _as_weights(a, "a", n, B, C)
    b_ = _as_weights(b, "b", m, B, C)
    _check_tensor_kind(f_init, "f_init", C)
    if not fixed:
        _check_values(C, a_, b_)
    if a_ is None:
        a_ = torch.full((B, n), 1.0 / n, dtype=torch.float64, device=C.device)
    if b_ is None:
        b_ = torch.full((B, m), 1.0 / m, dtype=torch.float64, device=C.device)
    if f_init is not None:
        f0 = torch.as_tensor(f_init)
        if tuple(f0.shape) not in ((n,), (B, n)):
            raise ValueError(f"{_FN}: f_init: expected shape {(B, n) if batched else (n,)}, "
                             f"got {tuple(f0.shape)}")
    if g_init is not None:
        g0 = _initial_g(g_init, B, m, batched, C, b_.to(torch.float64), not fixed)
    else:
        g0 = torch.zeros(B, m, dtype=torch.float64, device=C.device)

    a64 = a_.to(torch.float64)
    b64 = b_.to(torch.float64)
    settings = (float(eps), _METHODS[method], float(tol), int(max_iter), int(check_every), fixed,
                int(newton_warmup), g_init is not None, int(verbose))
    if skips_dispatcher(C, a64, b64, g0):
        # Nothing for the dispatcher to do (no autograd, not compiling, no functorch): call
        # the solve directly. Same results; on small CUDA problems the op's dispatch and the
        # extra synchronization for the convergence test are a fifth of the wall clock.
        f, g, err, iters, newton, unconverged = _run(C, a64, b64, g0, *settings, g_owned=True)
    else:
        f, g, err, iters, newton = _solve(C, a64, b64, g0, *settings)
        unconverged = None
    converged = err <= tol
    if not fixed:
        bad = int((~converged).sum()) if unconverged is None else unconverged
        if bad:
            rounding = 2.0**-52 * C.detach().abs().max().item() / eps
            _warn_unconverged(err, converged, tol, max_iter, method, a64, b64, B, rounding)
    squeeze = (lambda t: t) if batched else (lambda t: t[0])
    return SinkhornResult(
        f=squeeze(f).to(cost.dtype), g=squeeze(g).to(cost.dtype), iterations=squeeze(iters),
        newton_steps=squeeze(newton), marginal_error=squeeze(err),
        converged=squeeze(converged), eps=float(eps), method=method, _cost=squeeze(C),
        _a=squeeze(a64), _b=squeeze(b64), _f64=squeeze(f), _g64=squeeze(g))
