"""Zeroth-order gradient estimates and optimizers: forward passes only.

- ``grad(loss_fn, params, ...)``: SPSA (MeZO), RGE (forward or central, Gaussian,
  Rademacher or uniform-on-sphere directions) and CGE (coordinate-wise, DeepZero).
- ``ZOSGD``: a ``torch.optim`` optimizer on the SPSA estimate, keeping only seeds and
  scalars between steps; ``replay`` rebuilds a run's weights from its history.

Directions come from ``_zo_kernels``: the value z of element i of parameter t in direction
k is a pure function of (seed, k, t, i), so a direction is regenerated, never stored.

Exact restore. After ``grad`` or a ``ZOSGD`` evaluation every parameter holds the bits it
held before, in every dtype (adding then subtracting eps*z in fp16/bf16 does not give the
weights back). How:

- ``params`` is an ``nn.Module``: its trainable parameters (``requires_grad``) are perturbed
  through forward hooks. Before a submodule that owns parameters runs, its parameters'
  ``.data`` is swapped for a scratch tensor round(theta + s*z); after it ran (also when it
  raises) the original storage is swapped back. The stored weights are never written, and
  only the scratch of the modules running at that moment is alive: peak memory is inference
  plus one module's parameters. A parameter is perturbed only while its own module's
  ``forward`` runs; one that is read elsewhere (e.g. ``F.linear(x, self.head.weight)``
  outside ``head``'s forward) is not, and a warning names it: pass a list of tensors then.
  Parameters with ``requires_grad=False`` (frozen weights of a PEFT/LoRA model) are never
  touched. Buffers (BatchNorm running statistics) change as the forward changes them.
- ``params`` is a list of tensors: they are perturbed in place, so a full copy of them is
  kept for the duration of the call (memory: one copy of the parameters) and written back
  with ``copy_`` (bit-exact). CGE needs no copy: it saves and restores one element.

Either way ``loss_fn`` runs under ``torch.no_grad()`` and the parameters are restored before
any error (from ``loss_fn`` or about its value) propagates.

Scaling out (both described in ``grad``'s docstring):

- ``batch_size`` (``_zo_batched``): the perturbed points are built as stacks by the same
  kernel and evaluated by ``torch.func.vmap`` (``functional_call`` for a module, or a loss
  taking the parameters as arguments), chunked; the stored weights are only read.
- ``group`` (``_zo_distributed``): with torch.distributed initialised, each rank evaluates a
  block of the points and one all_gather of scalars completes the losses everywhere, so the
  estimate, the update and the replicas are the same bits on every rank and in one process.

Every estimator is written as a list of evaluation points in a fixed order, the losses at
them (evaluated one by one, batched, or split across ranks: the same floats either way
when the forward is deterministic), then pure Python float arithmetic on those losses.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["grad", "GradEstimate", "ZOSGD", "HistoryEntry", "replay", "ZOAdam", "CBO",
           "consensus_weights", "module_loss", "ModuleLoss", "blackbox", "BlackBox"]

_ESTIMATORS = ("spsa", "rge", "cge")
_DISTRIBUTIONS = ("gaussian", "rademacher", "sphere")
_MODES = ("central", "forward")
# Storage dtypes of the fused kernels; other float dtypes (float64) take a per-tensor path.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MASK64 = (1 << 64) - 1


def _kernels():
    # Imported on first use: importing diffkern must not depend on this family's build.
    from . import _zo_kernels
    return _zo_kernels


def _direction(t, p, seed, k, distribution):
    """z(seed, k, t, .) as float32 shaped like p; ``like`` is only read for its shape and
    device, so parameters of dtypes the kernels do not store pass a float32 stand-in."""
    like = p if p.dtype in _KERNEL_DTYPES else torch.empty(p.shape, device=p.device)
    return _kernels().direction(t, like, seed, k, distribution)


class GradEstimate(NamedTuple):
    """``grads``: one estimate per parameter, shaped like it, float32 (float64 for float64
    parameters): never rounded to fp16/bf16. ``losses``: float64, 1-D, every loss value in
    evaluation order (see ``grad``)."""
    grads: List[Tensor]
    losses: Tensor


# ------------------------------------------------------------------ argument checks

def _check_choice(fname, name, value, choices):
    if value not in choices:
        raise ValueError(f"{fname}: {name} must be one of {', '.join(map(repr, choices))}, "
                         f"got {value!r}")


def _check_eps(fname, eps):
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{fname}: eps must be a real number, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{fname}: eps must be positive and finite, got {eps!r}")
    return float(eps)


def _check_count(fname, name, n):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{fname}: {name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{fname}: {name} must be >= 1, got {n}")
    return int(n)


def _check_seed(fname, seed):
    if seed is None:  # from torch's default generator, so torch.manual_seed repeats a run
        return int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{fname}: seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"{fname}: seed must be in [0, 2**63), got {seed}")
    return int(seed)


def _check_params(fname, params, name="params"):
    """(list of tensors, module or None): a module gives its trainable parameters."""
    module = None
    if isinstance(params, nn.Module):
        module = params
        flat = [p for p in module.parameters() if p.requires_grad]
        if not flat:
            raise ValueError(f"{fname}: {name} is a module without trainable parameters "
                             f"(none has requires_grad=True)")
    else:
        if isinstance(params, Tensor):
            params = [params]
        try:
            flat = list(params)
        except TypeError:
            raise TypeError(f"{fname}: {name} must be an nn.Module or an iterable of "
                            f"tensors, got {type(params).__name__}") from None
        if not flat:
            raise ValueError(f"{fname}: {name} is empty: there is nothing to perturb")
    seen = set()
    for i, p in enumerate(flat):
        if not isinstance(p, Tensor):
            raise TypeError(f"{fname}: {name}[{i}] must be a tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise TypeError(f"{fname}: {name}[{i}] has dtype {p.dtype}; zeroth-order "
                            f"estimates need floating-point parameters")
        if id(p) in seen:
            raise ValueError(f"{fname}: {name}[{i}] appears twice; each tensor is "
                             f"perturbed once")
        seen.add(id(p))
    return flat, module


def _loss_pending(fname, out, label, fn="loss_fn"):
    """A loss_fn result checked for its kind and shape (no device sync): a float, or a 0-d
    float64 copy of the scalar tensor (a copy: a loss_fn may return a buffer it later
    overwrites), to be read by ``_loss_read``."""
    if isinstance(out, Tensor):
        if out.numel() != 1:
            raise ValueError(f"{fname}: {fn} must return a scalar, but {label} returned a "
                             f"tensor of shape {tuple(out.shape)}")
        if out.is_complex():
            raise ValueError(f"{fname}: {fn} must return a real scalar, but {label} "
                             f"returned a complex tensor")
        return out.detach().reshape(()).to(torch.float64, copy=True)
    if isinstance(out, numbers.Real) and not isinstance(out, bool):
        return float(out)
    raise ValueError(f"{fname}: {fn} must return a scalar tensor or a real number, "
                     f"but {label} returned {type(out).__name__}")


def _loss_read(fname, pending, label, fn="loss_fn"):
    """The float of a ``_loss_pending`` result (a host sync for a tensor); a non-finite one
    raises, naming its evaluation."""
    value = float(pending.item()) if isinstance(pending, Tensor) else pending
    if not math.isfinite(value):
        raise ValueError(f"{fname}: {fn} returned {value} at {label}; the parameters "
                         f"were restored")
    return value


def _loss_value(fname, out, label, fn="loss_fn"):
    return _loss_read(fname, _loss_pending(fname, out, label, fn), label, fn)


# ------------------------------------------------------------------ perturbations

def _scratch_direction(p, z, scale):
    """round(theta + scale*z) in p's dtype (math in fp32, or fp64 for fp64 parameters)."""
    if p.dtype == torch.float64:
        return p.detach() + scale * z.double()
    z.mul_(scale).add_(p.detach())
    return z if p.dtype == torch.float32 else z.to(p.dtype)


class _Direction:
    """theta_t + scale * z(seeds[g], k, t, .) for parameter t of group g."""

    def __init__(self, seeds, k, scale, distribution, sign_text):
        self.seeds, self.k, self.scale, self.dist = seeds, k, scale, distribution
        # The module hooks' trusted kernel call takes these (sphere is already folded into
        # scale by the caller; a non-finite scale goes the checked way and raises there).
        self.fused_ok = distribution in ("gaussian", "rademacher") and math.isfinite(scale)
        self.text = f"theta {sign_text} eps*z (direction k={k})"

    def scratch(self, g, t, p):
        return self.scratch_many([(g, t, p)])[0]

    def scratch_many(self, items):
        """Scratch copies for [(g, t, p), ...]: the fused kernel writes theta + scale*z
        straight into each copy in p's dtype (one launch per group, each element read and
        written once: no float32 temporary, which would cost twice an fp16 module's bytes);
        other parameters (float64, non-contiguous) take the per-tensor path. The bits are
        those of _scratch_direction: float32 product and sum, one rounding to storage."""
        out = [None] * len(items)
        fused = {}
        for i, (g, t, p) in enumerate(items):
            if p.dtype in _KERNEL_DTYPES and p.is_contiguous():
                fused.setdefault(g, []).append(i)
            else:
                z = _direction(t, p, self.seeds[g], self.k, self.dist)
                out[i] = _scratch_direction(p, z, self.scale)
        for g, idx in fused.items():
            src = [items[i][2].detach() for i in idx]
            dst = [torch.empty_like(x) for x in src]
            _kernels().perturb_into(dst, src, self.seeds[g], self.k, self.scale, self.dist,
                                    tensor_ids=[items[i][1] for i in idx])
            for i, d in zip(idx, dst):
                out[i] = d
        return out

    def apply_inplace(self, groups):
        """theta += scale * z in place: one fused launch per group over its contiguous
        kernel-dtype tensors (tensor ids = their positions, so z is the same as in
        scratch()); the others (float64, non-contiguous views, whose flat storage order is
        not their element order) through scratch() and copy_."""
        K = _kernels()
        for g, ps in enumerate(groups):
            fused = [t for t, p in enumerate(ps)
                     if p.dtype in _KERNEL_DTYPES and p.is_contiguous() and p.numel()]
            if fused:
                K.perturb_([ps[t] for t in fused], self.seeds[g], self.k, self.scale,
                           self.dist, tensor_ids=fused)
            done = set(fused)
            for t, p in enumerate(ps):
                if t not in done and p.numel():
                    p.copy_(self.scratch(g, t, p))

    def apply_into(self, dst_groups, src_groups):
        """dst = src + scale * z in one pass per group (the batched evaluator's stacks),
        the same bits as ``apply_inplace`` on a copy of src."""
        K = _kernels()
        for g, (ds, ss) in enumerate(zip(dst_groups, src_groups)):
            if all(p.dtype in _KERNEL_DTYPES for p in ss):
                K.perturb_into(ds, [p.detach() for p in ss], self.seeds[g], self.k,
                               self.scale, self.dist)
            else:
                for t, (d, p) in enumerate(zip(ds, ss)):
                    d.copy_(self.scratch(g, t, p))

    def perturbs(self, g, t):
        return True


class _Coordinate:
    """One element of one parameter set to ``value`` (a 0-d tensor of its dtype)."""

    def __init__(self, g, t, index, value, text):
        self.g, self.t, self.index, self.value, self.text = g, t, index, value, text

    def scratch(self, g, t, p):
        if (g, t) != (self.g, self.t):
            return None
        s = p.detach().clone()
        s[self.index] = self.value
        return s

    def perturbs(self, g, t):
        return (g, t) == (self.g, self.t)


class _Evaluator:
    """Evaluates loss_fn at perturbed parameters and always restores them exactly
    (see the module docstring for the two strategies)."""

    def __init__(self, groups, module, fname, fn="loss_fn", hook_unit_bytes=None,
                 unit_cache=None):
        self.groups, self.module, self.fname, self.fn = groups, module, fname, fn
        self.unit_bytes = hook_unit_bytes  # see _zo_hooks.plan_units
        self.unit_cache = unit_cache  # a dict kept across evaluators (_zo_hooks.cached_units)
        self.n_params = sum(len(ps) for ps in groups)
        self.where = {id(p): (g, t) for g, ps in enumerate(groups) for t, p in enumerate(ps)}
        self.current = None
        self.active = {}  # id(param) -> [param, original data, nesting depth]
        self.seen = set()
        self.unseen = set()  # perturbed parameters that no module's forward ever read
        self.handles = []
        self.backup = None
        self.count = 0

    # hook strategy (python/diffkern/_zo_hooks.py: the units and the hooks themselves)
    def __enter__(self):
        if self.module is not None:
            from . import _zo_hooks
            for m, unit in _zo_hooks.cached_units(self.unit_cache, self.module, self.groups,
                                                  self.where, self.unit_bytes):
                pre, post = _zo_hooks.make_hooks(self, unit)
                self.handles.append(m.register_forward_pre_hook(pre))
                self.handles.append(m.register_forward_hook(post, always_call=True))
        return self

    def _restore_swapped(self):
        for p, data, _ in self.active.values():
            p.data = data
        self.active.clear()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._restore_swapped()
        self.backup = None
        if self.unseen and exc[0] is None:
            names = {id(p): n for n, p in self.module.named_parameters()} if self.module else {}
            listed = sorted(names.get(i, "?") for i in self.unseen)
            warnings.warn(
                f"{self.fname}: {len(listed)} trainable parameter(s) were never read inside "
                f"their own module's forward and so were not perturbed ({', '.join(listed[:5])}"
                f"{', ...' if len(listed) > 5 else ''}); their estimate is not a gradient "
                f"estimate if the loss reads them elsewhere: pass a list of tensors instead",
                RuntimeWarning, stacklevel=3)
        return False

    def evaluate_many(self, loss_fn, perts):
        """Losses at each of ``perts`` in order (the protocol the batched evaluator of
        ``_zo_batched`` shares). Each loss is read from the device once the next evaluation
        has been issued, so the GPU never waits for the host between two forwards (a
        non-finite loss is then reported one evaluation late, the parameters restored)."""
        values, prev = [], None
        for pert in perts:
            cur = self._evaluate(loss_fn, pert)
            if prev is not None:
                values.append(_loss_read(self.fname, *prev, self.fn))
            prev = cur
        if prev is not None:
            values.append(_loss_read(self.fname, *prev, self.fn))
        return values

    def evaluate(self, loss_fn, pert):
        """The loss at the perturbation ``pert`` (None: unperturbed), parameters restored."""
        return _loss_read(self.fname, *self._evaluate(loss_fn, pert), self.fn)

    def _evaluate(self, loss_fn, pert):
        """(the pending loss, its label): see ``evaluate``."""
        self.count += 1
        label = f"evaluation {self.count} ({pert.text if pert else 'unperturbed theta'})"
        with torch.no_grad():
            if self.module is not None:
                self.current, self.seen = pert, set()
                try:
                    out = loss_fn()
                    if isinstance(out, Tensor):
                        out = out.detach()
                finally:
                    self.current = None
                    self._restore_swapped()
                if pert is not None and len(self.seen) < self.n_params:
                    self.unseen |= {id(p) for ps in self.groups for p in ps
                                    if pert.perturbs(*self.where[id(p)])
                                    and id(p) not in self.seen}
            elif isinstance(pert, _Coordinate):
                p = self.groups[pert.g][pert.t]
                old = p[pert.index].clone()
                try:
                    p[pert.index] = pert.value
                    out = loss_fn()
                finally:
                    p[pert.index] = old
            elif pert is not None:
                if self.backup is None:
                    self.backup = [[p.detach().clone() for p in ps] for ps in self.groups]
                try:
                    pert.apply_inplace(self.groups)
                    out = loss_fn()
                finally:
                    for ps, bs in zip(self.groups, self.backup):
                        torch._foreach_copy_(ps, bs)  # one call for the list (torch >= 2.1)
            else:
                out = loss_fn()
        return _loss_pending(self.fname, out, label, self.fn), label


# ------------------------------------------------------------------ directional estimates

def _kernel_distribution(distribution):
    return "gaussian" if distribution == "sphere" else distribution


def _sum_sq(ps, seed, k):
    """||z||^2 over a group: the fused reduction over its contiguous kernel-dtype tensors
    (tensor ids = positions), the rest (float64, non-contiguous views) tensor by tensor."""
    fused = [t for t, p in enumerate(ps)
             if p.dtype in _KERNEL_DTYPES and p.is_contiguous() and p.numel()]
    total = (float(_kernels().sum_sq([ps[t] for t in fused], seed, k, "gaussian",
                                     tensor_ids=fused)) if fused else 0.0)
    done = set(fused)
    return total + sum(float(_direction(t, p, seed, k, "gaussian").double().square().sum())
                       for t, p in enumerate(ps) if t not in done)


def _shapes(groups):
    return tuple((tuple(p.shape), str(p.dtype)) for ps in groups for p in ps)


def _exchange(ev, split, groups, count, local, fingerprint):
    """(losses, aux) of all ``count`` evaluations: ``local()`` gives this process's
    [(loss, aux)] for its block; with a split, one all_gather brings the others' blocks.
    ``fingerprint()``: the digest of the call's arguments (only computed with a split)."""
    if split is None:
        values = local()
        return [v[0] for v in values], [v[1] for v in values]
    from . import _zo_distributed
    checksum = _zo_distributed.checksum([p for ps in groups for p in ps])
    try:
        values, error = local(), None
    except Exception as e:  # still join the all_gather, so no rank waits forever
        values, error = [], e
    return split.exchange(ev.fname, count, values, fingerprint(), checksum, error)


def _evaluate_points(ev, loss_fn, perturbation, points):
    """Losses at ``points`` in order; their perturbation objects are made a slice at a time
    (a full CGE has millions of points). Slices are a multiple of a batched evaluator's
    batch_size, so chunks stay full; a loss does not depend on which chunk it was in
    except through the forward's own rounding."""
    step = 4096
    size = getattr(ev, "size", None)
    if size:
        step = -(-step // size) * size
    out = []
    for i in range(0, len(points), step):
        out.extend(ev.evaluate_many(loss_fn, [perturbation(p) for p in points[i:i + step]]))
    return out


def _batch_options(fname, batch_size, batch_memory):
    from ._zo_batched import check_options
    return check_options(fname, batch_size, batch_memory)


def _check_group(fname, group):
    from ._zo_distributed import check_group
    check_group(fname, group)


def _split(fname, group):
    from . import _zo_distributed
    return _zo_distributed.resolve(fname, group)


def _directional(ev, loss_fn, groups, seeds, n, eps, distribution, mode, *, group="auto"):
    """(coefficients c_k, losses): the estimate is sum_k c_k z_k (z_k regenerated).

    Gaussian/Rademacher z: c_k = D_k / n, D_k = (L(theta+eps z) - L(theta-eps z)) / (2 eps)
    (central) or (L(theta+eps z) - L(theta)) / eps (forward).
    Sphere: u = z/||z|| over all parameters (d elements), theta is moved by eps*u and
    c_k = d * D_k / (n ||z_k||), i.e. the estimate (d/n) sum_k D_k u_k of RGE.

    The evaluations, in order ([theta,] +0, [-0,] +1, ...), go through ``ev.evaluate_many``
    (one at a time, or batched). ``group`` (see ``grad``): with a split, this process
    evaluates its block of them and one all_gather of scalars brings the rest; the
    coefficients are then computed from the same floats in the same order everywhere.
    """
    kdist = _kernel_distribution(distribution)
    sphere = distribution == "sphere"
    d = sum(p.numel() for ps in groups for p in ps)
    signs = (1, -1) if mode == "central" else (1,)
    points = ([None] if mode == "forward" else []) + [(k, s) for k in range(n) for s in signs]
    split = _split(ev.fname, group)
    lo, hi = split.block(len(points)) if split is not None else (0, len(points))
    norms = {}

    def norm(k):
        if k not in norms:
            norms[k] = math.sqrt(sum(_sum_sq(ps, seeds[g], k) for g, ps in enumerate(groups)))
            if norms[k] == 0.0:
                raise ValueError("diffkern.zo: distribution='sphere' needs parameters with at "
                                 "least one element (the direction is normalised over all of "
                                 "them); these have none")
        return norms[k]

    def perturbation(point):
        if point is None:
            return None
        k, sign = point
        scale = eps / norm(k) if sphere else eps
        return _Direction(seeds, k, sign * scale, kdist, "+" if sign > 0 else "-")

    def local():
        mine = points[lo:hi]
        losses = _evaluate_points(ev, loss_fn, perturbation, mine)
        # aux: the norm of the direction, sent with its "+" evaluation (sphere only).
        return [(loss, norm(p[0]) if sphere and p is not None and p[1] > 0 else 0.0)
                for loss, p in zip(losses, mine)]

    losses, aux = _exchange(ev, split, groups, len(points), local,
                            lambda: _fingerprint("directional", seeds, n, eps, distribution,
                                                 mode, _shapes(groups)))
    coeffs = []
    first = 1 if mode == "forward" else 0
    base = losses[0] if mode == "forward" else None
    for k in range(n):
        at = first + len(signs) * k
        plus = losses[at]
        factor = 1.0
        if sphere:
            factor = d / aux[at]
        if mode == "central":
            projected = (plus - losses[at + 1]) / (2.0 * eps)
        else:
            projected = (plus - base) / eps
        coeffs.append(projected * factor / n)
    return coeffs, losses


def _fingerprint(*values):
    from . import _zo_distributed
    return _zo_distributed.fingerprint(*values)


def _update_(ps, triples, lr, weight_decay, kdist):
    """theta <- theta - lr * (sum c z + wd * theta): the fused kernel, or per tensor for
    dtypes it does not store (float64)."""
    if all(p.dtype in _KERNEL_DTYPES for p in ps):
        # The kernel takes at most MAX_UPDATE_TERMS terms a launch: more directions are
        # applied in chunks, in order (the weight decay with the first), so a replay that
        # runs this same code reproduces the bits.
        kernels = _kernels()
        step = kernels.MAX_UPDATE_TERMS
        for start in range(0, len(triples), step):
            kernels.update_(ps, triples[start:start + step], lr,
                            weight_decay if start == 0 else 0.0, kdist)
        return
    for t, p in enumerate(ps):
        acc = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
        for seed, k, c in triples:
            acc += c * _direction(t, p, seed, k, kdist).double()
        acc += weight_decay * p.double()
        p.copy_((p.double() - lr * acc).to(p.dtype))


def _assemble(groups, seeds, coeffs, kdist):
    """sum_k c_k z_k per parameter, in float32 (float64 for float64 parameters)."""
    out = []
    for g, ps in enumerate(groups):
        bufs = [torch.zeros(p.shape, device=p.device,
                            dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
                for p in ps]
        # update_ with lr=1 and negated coefficients: 0 - (sum -c z) = sum c z.
        _update_(bufs, [(seeds[g], k, -c) for k, c in enumerate(coeffs)], 1.0, 0.0, kdist)
        out.extend(bufs)
    return out


# ------------------------------------------------------------------ coordinate estimates

def _coordinates(fname, coordinates, flat):
    """Per parameter, the flat indices to estimate (python ints, sorted)."""
    if coordinates is None:
        return [range(p.numel()) for p in flat]
    if isinstance(coordinates, Tensor) or len(coordinates) != len(flat):
        raise ValueError(f"{fname}: coordinates must be a list with one entry per parameter "
                         f"({len(flat)}), each None, a boolean mask shaped like it or a "
                         f"1-D tensor of flat indices")
    out = []
    for i, (c, p) in enumerate(zip(coordinates, flat)):
        if c is None:
            out.append(range(p.numel()))
            continue
        c = torch.as_tensor(c)
        if c.dtype == torch.bool:
            if c.shape != p.shape:
                raise ValueError(f"{fname}: coordinates[{i}] is a mask of shape "
                                 f"{tuple(c.shape)}, but the parameter has shape "
                                 f"{tuple(p.shape)}")
            out.append(torch.nonzero(c.reshape(-1).cpu()).reshape(-1).tolist())
        elif not c.is_floating_point() and not c.is_complex() and c.dim() <= 1:
            idx = c.reshape(-1).cpu()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
                raise ValueError(f"{fname}: coordinates[{i}] has indices outside "
                                 f"[0, {p.numel()}) (the parameter's flat size)")
            out.append(sorted(set(idx.tolist())))
        else:
            raise TypeError(f"{fname}: coordinates[{i}] must be None, a boolean mask or a "
                            f"1-D integer tensor of flat indices, got dtype {c.dtype} "
                            f"with shape {tuple(c.shape)}")
    return out


def _ulp_step(v, up):
    """The neighbour of the 0-d tensor v towards +inf (up) or -inf, in v's dtype."""
    if v.dtype in (torch.float32, torch.float64):
        return torch.nextafter(v, torch.tensor(math.inf if up else -math.inf, dtype=v.dtype))
    bits = v.view(torch.int16)
    if float(v) == 0.0:  # +-0: the smallest subnormal of the right sign
        one = torch.tensor(1, dtype=torch.int16).view(v.dtype)
        return one if up else -one
    return (bits + (1 if (float(v) > 0) == up else -1)).view(v.dtype)


def _shifted(v, step):
    """v + step rounded to v's dtype, at least one unit in the last place away from v."""
    w = torch.tensor(float(v) + step, dtype=v.dtype)
    if float(w) == float(v):
        w = _ulp_step(v, step > 0)
    return w


def _unravel(j, shape):
    """The index tuple of flat (row-major) index j."""
    index = []
    for size in reversed(shape):
        j, i = divmod(j, size)
        index.append(i)
    return tuple(reversed(index))


def _cge(ev, loss_fn, flat, coords, eps, mode, *, group="auto"):
    """Coordinate-wise differences; the step actually taken is the rounded difference of
    the stored values, so fp16/bf16 coordinates divide by what was really added.
    Evaluations in order: [theta,] then per coordinate +[, -]; split across ranks like
    ``_directional``'s."""
    central = mode == "central"
    # Per coordinate: (t, flat index j, value, up, down) as Python floats (exact for every
    # float dtype, turned back into the parameter's dtype when evaluated); the values come
    # from one host copy per parameter.
    entries = []
    for t, (p, idxs) in enumerate(zip(flat, coords)):
        if not len(idxs):
            continue
        host = p.detach().reshape(-1).cpu()
        for j in idxs:
            v = host[j]
            entries.append((t, j, float(v), float(_shifted(v, eps)),
                            float(_shifted(v, -eps)) if central else None))
    signs = (1, -1) if central else (1,)
    points = ([None] if mode == "forward" else []) + [(e, s) for e in range(len(entries))
                                                      for s in signs]
    split = _split(ev.fname, group)
    lo, hi = split.block(len(points)) if split is not None else (0, len(points))

    def perturbation(point):
        if point is None:
            return None
        t, j, _, up, down = entries[point[0]]
        value, text = (up, "+") if point[1] > 0 else (down, "-")
        p = flat[t]
        return _Coordinate(0, t, _unravel(j, p.shape), torch.tensor(value, dtype=p.dtype),
                           f"parameter {t}[{j}] {text} eps")

    def local():
        losses = _evaluate_points(ev, loss_fn, perturbation, points[lo:hi])
        return [(loss, 0.0) for loss in losses]

    losses, _ = _exchange(ev, split, [flat], len(points), local,
                          lambda: _fingerprint("cge", eps, mode, _shapes([flat]),
                                               tuple(tuple(c) if not isinstance(c, range)
                                                     else c for c in coords)))
    grads = [torch.zeros(p.shape, device=p.device,
                         dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
             for p in flat]
    first = 1 if mode == "forward" else 0
    values = [{} for _ in flat]
    for e, (t, j, v, up, down) in enumerate(entries):
        plus = losses[first + len(signs) * e]
        if central:
            values[t][j] = (plus - losses[first + 2 * e + 1]) / (up - down)
        else:
            values[t][j] = (plus - losses[0]) / (up - v)
    for t, vals in enumerate(values):
        if vals:
            flat_grad = grads[t].view(-1)
            flat_grad[torch.tensor(list(vals.keys()), device=flat[t].device)] = torch.tensor(
                list(vals.values()), dtype=grads[t].dtype, device=flat[t].device)
    return grads, losses


# ------------------------------------------------------------------ grad

def grad(loss_fn: Callable[[], object], params, *, estimator: str = "spsa",
         num_directions: int = 1, eps: float = 1e-3, seed: Optional[int] = None,
         distribution: str = "gaussian", mode: str = "central",
         coordinates: Optional[Sequence] = None, batch_size: Optional[int] = None,
         batch_memory: Optional[int] = None, group="auto",
         hook_unit_bytes=None, cuda_graph: bool = False) -> GradEstimate:
    """Zeroth-order gradient estimate of ``loss_fn()`` with respect to ``params``.

    ``loss_fn()`` takes no argument and evaluates the model as it currently is (it runs under
    ``torch.no_grad()``); it returns a scalar (tensor with one element, or a real number).
    ``params``: an ``nn.Module`` (its parameters with ``requires_grad=True``, perturbed through
    forward hooks, no copy) or an iterable of float tensors (perturbed in place, with a full
    backup copy for the call). Every parameter is bit-identical to before afterwards, also
    when ``loss_fn`` raises. See the module docstring for how and what it costs.

    Estimators (z_k: direction k of ``seed``, ``num_directions`` = n, ``eps`` = e):

    - ``"spsa"`` (MeZO, central only): g = (1/n) sum_k (L(theta+e z_k) - L(theta-e z_k))/(2e) z_k.
    - ``"rge"``: the same with ``mode="forward"`` allowed: (L(theta+e z_k) - L(theta))/e, one
      unperturbed evaluation shared by all directions. With ``distribution="sphere"`` the
      direction is u_k = z_k/||z_k|| (z_k Gaussian, norm over all parameters, d elements in
      all), theta moves by e u_k and g = (d/n) sum_k D_k u_k, D_k the difference quotient.
    - ``"cge"`` (DeepZero): per coordinate j, (L(theta + h e_j) - L(theta - h' e_j))/(h + h')
      (or forward), where h, h' are the steps that rounding to the parameter's dtype actually
      leaves of ``eps`` (at least one unit in the last place). ``coordinates``: a list with
      one entry per parameter, None (all), a boolean mask shaped like it or a 1-D tensor of
      flat indices; other coordinates' estimates are 0. ``num_directions``, ``seed`` and
      ``distribution`` are not used.

    ``distribution``: "gaussian", "rademacher" (+-1) or "sphere". The Gaussian is a 16-bit
    quantization of N(0, 1) (2^16 equally likely values, E[z^2] = 1 to 6e-7, |z| <= 4.39;
    csrc/fd_grad/directions.cuh), which is what the estimates' unbiasedness needs
    (E[z z^T] = I). ``seed``: None draws one from torch's default generator
    (``torch.manual_seed`` makes a run repeatable).

    Returns ``GradEstimate(grads, losses)``: ``grads`` float32 (float64 for float64
    parameters), shaped like the parameters; ``losses`` float64 in evaluation order:
    central [L+_0, L-_0, L+_1, L-_1, ...], forward [L(theta), L+_0, L+_1, ...], cge per
    coordinate (parameter order, then flat index order) in the same pattern.

    Batched evaluation (DeepZero's forward parallelization), ``batch_size=B``: up to B of the
    perturbed points are evaluated as one call of ``torch.func.vmap`` over a stack of
    perturbed parameters (built by the same fused kernel from the same z(seed, k, t, i), so
    the points are bit-identical to the sequential path's; only the forward's own rounding
    may differ in a batched call). The loss must then be a function of the parameters:

    - ``params`` an ``nn.Module``: ``loss_fn()`` as above; the module's trainable parameters
      are replaced through ``torch.func.functional_call`` while it runs.
    - ``params`` a list of tensors: ``loss_fn(*params)`` receives them as arguments.

    and vmap-compatible (no ``.item()``, no data-dependent Python branches, no in-place
    writes to captured tensors: put BatchNorm in eval mode). ``batch_memory`` (bytes) caps
    the perturbed copies of a chunk: B is lowered to fit (activations are not counted).
    Parameters are only read. For CGE a chunk holds coordinates of one tensor and only that
    tensor is stacked.

    Distributed, ``group``: ``"auto"`` (default) uses torch.distributed's default group when
    it is initialised with more than one process; a process group uses that group; ``None``
    evaluates everything here. With a group, every rank must call with the same arguments
    and hold the same parameters (checked, an error on every rank otherwise): the
    evaluations are split into contiguous blocks, one per rank (any world size), each rank
    evaluates its block (batched if ``batch_size``), one ``all_gather`` of scalars (losses,
    sphere norms, a status flag and checksums of the parameters and arguments) gives every
    rank all the losses, and every rank returns the same estimate, bit for bit the one a
    single process computes from the same losses. ``seed=None`` draws a seed per rank: pass
    ``seed=`` (a mismatch is reported).

    ``hook_unit_bytes`` (module ``params`` only): None (default) hooks every module that owns
    trainable parameters. An int B hooks coarser units instead: the largest modules whose
    whole subtree's trainable parameters fit in B bytes, each swapping in all of them at
    once (fewer hook calls per forward: the host cost of the module path is per hook); the
    parameters of a module too large for that keep a hook on that module. ``"auto"``: B =
    the largest module's own trainable bytes, so no scratch copy is larger than with the
    default (peak memory: inference + one unit's parameters). The losses and the estimate
    are bit-identical to the default's when every parameter is read inside its own
    module's forward (the case the default does not warn about).

    ``cuda_graph=True`` (CUDA parameters; ``_zo_graphed``): for estimates with many points
    on a model whose forward is bound by host time. The parameters (a module's trainable
    ones, or the list) are perturbed in place and restored from one backup copy (memory:
    inference + one copy of them), and ``loss_fn`` is called eagerly once, captured in a
    CUDA graph once and replayed at every other point. ``loss_fn`` must then be
    capturable: it returns a one-element CUDA tensor, reads nothing back to the host, keeps
    its shapes, and its Python side effects run only at the first two calls (a loss_fn
    that draws a new batch per call is replayed on the captured one). The points are the
    eager path's, bit for bit; a loss can differ only where the captured kernels round
    differently from the eager ones. Not with ``batch_size`` or ``hook_unit_bytes``.
    """
    fname = "diffkern.zo.grad"
    if not callable(loss_fn):
        raise TypeError(f"{fname}: loss_fn must be callable, got {type(loss_fn).__name__}")
    _check_choice(fname, "estimator", estimator, _ESTIMATORS)
    _check_choice(fname, "distribution", distribution, _DISTRIBUTIONS)
    _check_choice(fname, "mode", mode, _MODES)
    eps = _check_eps(fname, eps)
    n = _check_count(fname, "num_directions", num_directions)
    if estimator == "spsa" and mode != "central":
        raise ValueError(f"{fname}: mode must be 'central' for estimator='spsa' "
                         f"(use estimator='rge' for forward differences)")
    if estimator != "cge" and coordinates is not None:
        raise ValueError(f"{fname}: coordinates is only used by estimator='cge'")
    flat, module = _check_params(fname, params)
    coords = _coordinates(fname, coordinates, flat) if estimator == "cge" else None
    batch = _batch_options(fname, batch_size, batch_memory)
    _check_group(fname, group)
    seed = _check_seed(fname, seed)
    from ._zo_hooks import check_unit_bytes
    hook_unit_bytes = check_unit_bytes(fname, hook_unit_bytes)
    graphed = None
    if cuda_graph not in (True, False):
        raise TypeError(f"{fname}: cuda_graph must be True or False, got {cuda_graph!r}")
    if cuda_graph:
        if batch is not None:
            raise ValueError(f"{fname}: cuda_graph=True and batch_size are exclusive (the "
                             f"graph replays one forward per point)")
        if hook_unit_bytes is not None:
            raise ValueError(f"{fname}: hook_unit_bytes is not used with cuda_graph=True "
                             f"(the parameters are perturbed in place, not through hooks)")
        from ._zo_graphed import GraphedLoss, check_params
        graphed = GraphedLoss(fname, loss_fn, check_params(fname, flat))
        loss_fn = graphed
        # In place with a backup copy: the captured forward reads the same addresses at
        # every point (the hooks' scratch copies would be new allocations each time).
        ev = _Evaluator([flat], None, fname)
    elif batch is None:
        ev = _Evaluator([flat], module, fname, hook_unit_bytes=hook_unit_bytes)
    else:
        from ._zo_batched import Batched
        ev = Batched(fname, loss_fn, [flat], module, *batch)
    try:
        with ev:
            if estimator == "cge":
                grads, losses = _cge(ev, loss_fn, flat, coords, eps, mode, group=group)
            else:
                coeffs, losses = _directional(ev, loss_fn, [flat], [seed], n, eps,
                                              distribution, mode, group=group)
    finally:
        if graphed is not None:
            graphed.close()
    if estimator != "cge":
        with torch.no_grad():
            grads = _assemble([flat], [seed], coeffs, _kernel_distribution(distribution))
    return GradEstimate(grads, torch.tensor(losses, dtype=torch.float64))


from ._zo_optim import ZOSGD, HistoryEntry, replay  # noqa: E402
from ._zo_adam import ZOAdam  # noqa: E402
from ._zo_cbo import CBO, ModuleLoss, consensus_weights, module_loss  # noqa: E402
from ._zo_blackbox import blackbox, BlackBox  # noqa: E402
