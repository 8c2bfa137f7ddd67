"""blackbox (public as ``diffkern.zo.blackbox``): a non-differentiable function as an
autograd function whose backward is a zeroth-order estimate of the vector-Jacobian product."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .zo import (_DISTRIBUTIONS, _MODES, _check_choice, _check_count, _check_eps,
                 _check_seed, _direction, _shifted)
from ._zo_optim import _mix

_BB_ESTIMATORS = ("spsa", "rge", "cge")


def _call(box, x, label, shape=None):
    """fn(x) with x detached and grad mode off, checked: a float tensor; in the backward
    (``shape`` given: the output gradient's) also of that shape and finite."""
    with torch.no_grad():
        y = box.fn(x.detach())
    if not isinstance(y, Tensor):
        raise TypeError(f"{box.fname}: fn must return a tensor, but {label} returned "
                        f"{type(y).__name__}")
    if not y.is_floating_point():
        raise TypeError(f"{box.fname}: fn must return a floating-point tensor (its output "
                        f"is differentiated), but {label} returned dtype {y.dtype}")
    if shape is None:
        return y.detach()
    if y.shape != shape:
        raise ValueError(f"{box.fname}: fn returned shape {tuple(y.shape)} at {label}, but "
                         f"{tuple(shape)} in the forward pass")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{box.fname}: fn returned non-finite values at {label}; the "
                         f"zeroth-order estimate needs finite outputs")
    return y.detach()


def _shifted_all(v, step):
    """v + step rounded to v's dtype, elementwise, at least one unit in the last place away
    from v: the vectorized common case, and ``zo._shifted`` for the entries where adding
    step rounds back to v."""
    w = (v.double() + step).to(v.dtype)
    stuck = torch.nonzero(w == v).reshape(-1)
    for i in stuck.tolist():
        w[i] = _shifted(v[i].cpu(), step).to(v.device)
    return w


def _project(g, y, rows):
    """<g, y> in float64: one number, or one per row (shape (rows,)) when ``rows``."""
    p = g.double() * y.double()
    return p.reshape(p.shape[0], -1).sum(dim=1) if rows else p.sum()


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, box):
        ctx.box = box
        y = _call(box, x, "fn(x)")
        # Forward differences reuse fn(x) rather than calling fn at x again.
        ctx.save_for_backward(x, y if box.mode == "forward" else None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return ctx.box.vjp(x, g, y), None


class BlackBox(nn.Module):
    """See ``diffkern.zo.blackbox``."""

    def __init__(self, fn, *, estimator, num_directions, eps, seed, distribution, mode,
                 batched, max_rows):
        super().__init__()
        self.fname = "diffkern.zo.blackbox"
        if not callable(fn):
            raise TypeError(f"{self.fname}: fn must be callable, got {type(fn).__name__}")
        _check_choice(self.fname, "estimator", estimator, _BB_ESTIMATORS)
        _check_choice(self.fname, "distribution", distribution, _DISTRIBUTIONS)
        _check_choice(self.fname, "mode", mode, _MODES)
        if estimator == "spsa" and mode != "central":
            raise ValueError(f"{self.fname}: mode must be 'central' for estimator='spsa' "
                             f"(use estimator='rge' for forward differences)")
        self.fn, self.estimator, self.distribution, self.mode = fn, estimator, distribution, mode
        self.num_directions = _check_count(self.fname, "num_directions", num_directions)
        self.eps = _check_eps(self.fname, eps)
        self.seed = None if seed is None else _check_seed(self.fname, seed)
        self.batched = bool(batched)
        if max_rows is not None:
            if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
                raise ValueError(f"{self.fname}: max_rows must be None or an int >= 1, got "
                                 f"{max_rows!r}")
            if not self.batched:
                raise ValueError(f"{self.fname}: max_rows stacks perturbed copies of x along "
                                 f"its rows, which needs batched=True (fn row by row)")
        self.max_rows = max_rows
        self.calls = 0  # backward calls so far: call c uses seed mix(seed, c)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.fname}: x must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{self.fname}: x must be floating point, got {x.dtype}")
        if self.batched and x.dim() < 1:
            raise ValueError(f"{self.fname}: batched=True needs x with a leading batch "
                             f"dimension, got a 0-d tensor")
        return _Function.apply(x, self)

    def extra_repr(self):
        return (f"estimator={self.estimator!r}, num_directions={self.num_directions}, "
                f"eps={self.eps}, distribution={self.distribution!r}, batched={self.batched}, "
                f"max_rows={self.max_rows}")

    # ------------------------------------------------------------------ estimates
    def vjp(self, x: Tensor, g: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """The estimate of d<g, fn(x)>/dx, shaped and typed like x (math in float64);
        ``y``: fn(x) if known (forward differences use it instead of calling fn at x)."""
        if self.batched and g.shape[:1] != x.shape[:1]:
            raise ValueError(f"{self.fname}: batched=True needs fn's output to keep x's "
                             f"leading (batch) dimension {x.shape[0]}, got output shape "
                             f"{tuple(g.shape)}")
        base = None
        if self.mode == "forward":
            if y is None:
                y = _call(self, x, "fn(x)")
            if y.shape != g.shape or not bool(torch.isfinite(y).all()):
                raise ValueError(f"{self.fname}: fn(x) must be finite and shaped like its "
                                 f"output gradient for forward differences")
            base = _project(g, y, self.batched)
        if self.estimator == "cge":
            out = self._cge(x, g, base)
        else:
            out = self._directional(x, g, base)
        return out.to(x.dtype)

    def _phi(self, x, g, label):
        return _project(g, _call(self, x, label, g.shape), self.batched)

    def _unit(self, x, seed, k, rows):
        """(z_k in float64 shaped like x, factor): the direction and the scale of its term."""
        dist = "gaussian" if self.distribution == "sphere" else self.distribution
        z = _direction(0, x, seed, k, dist).double()
        if self.distribution != "sphere":
            return z, 1.0
        # u = z / ||z|| (per row when batched); the estimate is d * mean_k D_k u_k.
        zr = z.reshape(rows, -1)
        norm = torch.linalg.vector_norm(zr, dim=1, keepdim=True)
        return (zr / norm).reshape(x.shape), float(zr.shape[1])

    def _stacked(self, points, labels, g):
        """<g, fn(.)> per row for each point (a perturbed copy of x), whole copies stacked
        along dim 0 into calls of at most ``max_rows`` rows (at least one copy a call)."""
        rows = points[0].shape[0]
        per = max(1, self.max_rows // max(rows, 1))
        out = []
        for s in range(0, len(points), per):
            chunk = points[s:s + per]
            label = f"{labels[s]} .. {labels[s + len(chunk) - 1]} (stacked)"
            y = _call(self, torch.cat(chunk), label, (len(chunk) * rows,) + tuple(g.shape[1:]))
            out.extend(_project(g, part, True) for part in y.split(rows))
        return out

    def _directional(self, x, g, base):
        c = self.calls
        self.calls += 1
        seed = _check_seed(self.fname, None) if self.seed is None else _mix(self.seed, c)
        rows = x.shape[0] if self.batched else 1
        x64 = x.detach().double()
        grad = torch.zeros_like(x64)
        central = self.mode == "central"
        shape = (rows,) + (1,) * (x.dim() - 1) if self.batched else ()
        stack = self.batched and self.max_rows is not None
        if stack:  # every perturbed copy first, then few large calls of fn
            units = [self._unit(x, seed, k, rows) for k in range(self.num_directions)]
            points, labels = [], []
            for k, (z, _) in enumerate(units):
                points.append((x64 + self.eps * z).to(x.dtype))
                labels.append(f"x + eps*z (direction {k})")
                if central:
                    points.append((x64 - self.eps * z).to(x.dtype))
                    labels.append(f"x - eps*z (direction {k})")
            values = self._stacked(points, labels, g)
            for k, (z, factor) in enumerate(units):
                if central:
                    diff = (values[2 * k] - values[2 * k + 1]) / (2.0 * self.eps)
                else:
                    diff = (values[k] - base) / self.eps
                grad += diff.reshape(shape) * factor * z
            return grad / self.num_directions
        # One call per perturbed copy, one direction alive at a time.
        for k in range(self.num_directions):
            z, factor = self._unit(x, seed, k, rows)
            step = self.eps * z
            plus = self._phi((x64 + step).to(x.dtype), g, f"x + eps*z (direction {k})")
            if central:
                minus = self._phi((x64 - step).to(x.dtype), g, f"x - eps*z (direction {k})")
                diff = (plus - minus) / (2.0 * self.eps)
            else:
                diff = (plus - base) / self.eps
            grad += diff.reshape(shape) * factor * z
        return grad / self.num_directions

    def _cge(self, x, g, base):
        """Per coordinate (per coordinate of every row at once when batched): central or
        forward differences with the steps rounding to x's dtype actually leaves."""
        x0 = x.detach()
        grad = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        flat_g = grad.view(x.shape[0], -1) if self.batched else grad.view(1, -1)
        width = flat_g.shape[1]
        for j in range(width):
            cols = x0.reshape(flat_g.shape[0], width)[:, j]
            up = _shifted_all(cols, self.eps)
            xp = x0.clone(memory_format=torch.contiguous_format)
            xp.view(flat_g.shape)[:, j] = up
            plus = self._phi(xp, g, f"x + eps at coordinate {j}")
            if self.mode == "central":
                down = _shifted_all(cols, -self.eps)
                xm = x0.clone(memory_format=torch.contiguous_format)
                xm.view(flat_g.shape)[:, j] = down
                minus = self._phi(xm, g, f"x - eps at coordinate {j}")
                flat_g[:, j] = (plus - minus) / (up.double() - down.double())
            else:
                flat_g[:, j] = (plus - base) / (up.double() - cols.double())
        return grad


def blackbox(fn: Callable[[Tensor], Tensor], *, estimator: str = "spsa",
             num_directions: int = 16, eps: float = 1e-3, seed: Optional[int] = 0,
             distribution: str = "gaussian", mode: str = "central",
             batched: bool = False, max_rows: Optional[int] = None) -> BlackBox:
    """Wraps ``y = fn(x)`` (tensor in, tensor out; a simulator, a quantized or remote model,
    anything without a gradient) as a module whose backward is a zeroth-order estimate of
    the vector-Jacobian product, so it composes with differentiable parts (ZO-AE-DS:
    encoder -> blackbox -> decoder/loss; autograd handles the rest).

    Backward, for the output gradient G: grad_x <G, fn(x)> ~= (1/n) sum_k D_k z_k with
    D_k = (<G, fn(x + eps z_k)> - <G, fn(x - eps z_k)>) / (2 eps)  (SPSA / central RGE).

    - ``estimator``: "spsa" (central), "rge" (``mode="forward"``: D_k = (<G, fn(x+eps z_k)>
      - <G, fn(x)>)/eps, one extra call shared by the directions) or "cge": coordinate-wise
      differences, 2 calls per coordinate of x (exact up to finite-difference error; for
      small x). ``num_directions`` n, ``distribution`` ("gaussian", "rademacher", "sphere":
      z/||z|| with the estimate scaled by the dimension, as ``diffkern.zo.grad``).
    - ``batched=True``: fn works row by row (output row i depends only on input row i, as a
      classifier on a batch): every row gets its own direction from the same calls and D_k
      is taken per row, so the variance scales with one row's size, not the whole batch's;
      "cge" then needs 2 calls per coordinate of one row.
    - ``max_rows`` (``batched=True``): stack the perturbed copies of x along dim 0 and call
      fn on up to ``max_rows`` rows at once (at least one copy a call), e.g. all 2n copies
      in one call: fewer, larger calls for a batched simulator or model. The n directions
      are then held at once (n copies of x in float64). Same estimate as one call a copy.
      Used by "spsa" and "rge"; "cge" calls fn once per perturbed coordinate.
    - ``seed``: backward call c uses the directions of seed mix(seed, c) (deterministic, new
      each call); None draws one from torch's default generator each call.

    fn is called with detached inputs under ``torch.no_grad()`` (never with
    ``requires_grad`` tensors) in x's dtype and device; it must return a floating-point
    tensor of a fixed shape, finite (else ``TypeError`` / ``ValueError`` naming fn). The
    backward runs 2n (central), n (forward: fn(x) is kept from the forward pass) or
    2 * coordinates (forward: 1 per coordinate) calls of fn; its math is
    float64, its result is cast to x's dtype. Not twice differentiable. fp16/bf16 inputs:
    x + eps z is rounded to x's dtype before fn sees it, so take eps well above the
    resolution of x (CGE divides by the step rounding actually left, at least one ulp).
    """
    return BlackBox(fn, estimator=estimator, num_directions=num_directions, eps=eps,
                    seed=seed, distribution=distribution, mode=mode, batched=batched,
                    max_rows=max_rows)
