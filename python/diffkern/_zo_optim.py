"""ZOSGD and replay (public as ``diffkern.zo.ZOSGD``, ``diffkern.zo.replay``)."""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .zo import (_DISTRIBUTIONS, _Evaluator, _check_choice, _check_count, _check_eps,
                 _check_group, _check_params, _check_seed, _direction, _directional,
                 _kernel_distribution, _kernels, _update_, _MASK64)


class HistoryEntry(NamedTuple):
    """One direction of one step of one parameter group: the update added
    -lr * coefficient * z(seed, k) (plus weight decay / momentum as recorded)."""
    step: int
    group: int
    seed: int
    k: int
    coefficient: float
    lr: float
    weight_decay: float
    momentum: float
    distribution: str  # of the kernel: "gaussian" or "rademacher"


def _mix(*values):
    """A 63-bit seed from integers (splitmix64 finalizer over each value): the seed of
    step s of group g, so steps and groups get unrelated directions."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = (h ^ (int(v) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h >> 1


def _buffer_dtype(p):
    return torch.float64 if p.dtype == torch.float64 else torch.float32


@torch.no_grad()
def _estimate_tensor(p, t, seed, coeffs, kdist):
    """sum_k c_k z(seed, k, t, .) for parameter t of a group alone: the gradient estimate of
    one tensor (float32; float64 for float64 parameters), so an optimizer that needs it
    explicitly (ZOAdam) holds one tensor's estimate at a time, never the whole model's."""
    buf = torch.zeros(p.shape, dtype=_buffer_dtype(p), device=p.device)
    if buf.dtype == torch.float32:
        # 0 - 1 * (sum of -c z) = sum c z, in chunks of what one launch takes.
        kernels = _kernels()
        terms = [(seed, k, -c) for k, c in enumerate(coeffs)]
        step = kernels.MAX_UPDATE_TERMS
        for start in range(0, len(terms), step):
            kernels.update_([buf], terms[start:start + step], 1.0, 0.0, kdist, tensor_ids=[t])
    else:
        for k, c in enumerate(coeffs):
            buf += c * _direction(t, p, seed, k, kdist).double()
    return buf


@torch.no_grad()
def _apply_step(ps, triples, lr, weight_decay, momentum, buffers, kdist):
    """One group's update; shared by ZOSGD.step and replay so both give the same bits.

    momentum 0: theta <- theta - lr (sum c z + wd theta), the fused kernel.
    momentum m: b <- m b + sum c z + wd theta (b starts at 0), theta <- theta - lr b.
    ``buffers``: list of the group's momentum buffers (None entries are created).
    """
    if momentum == 0.0:
        _update_(ps, triples, lr, weight_decay, kdist)
        return
    for i, p in enumerate(ps):
        if buffers[i] is None:
            buffers[i] = torch.zeros(p.shape, dtype=_buffer_dtype(p), device=p.device)
        buffers[i].mul_(momentum)
    # 1 * (sum of -c z) subtracted: b + sum c z.
    _update_(buffers, [(s, k, -c) for s, k, c in triples], 1.0, 0.0, kdist)
    for p, b in zip(ps, buffers):
        if weight_decay:
            b.add_(p.to(b.dtype), alpha=weight_decay)
        p.copy_((p.to(b.dtype) - lr * b).to(p.dtype))


def _number(fname, name, value, low=0.0, high=math.inf, high_open=False):
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fname}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (low <= value and (value < high if high_open else value <= high)):
        raise ValueError(f"{fname}: {name} must be in [{low}, {high}{')' if high_open else ']'}"
                         f", got {value}")
    return value


class _ZOOptimizer(torch.optim.Optimizer):
    """What every optimizer on the directional estimate shares (ZOSGD, ZOAdam): argument
    checks, the module / list strategies of ``_Evaluator``, the per-step seeds
    mix(seed, step, group), one estimate per step, and the ``"zo"`` entry of the state dict.
    A subclass sets ``_NAME`` and implements ``_apply(group_index, group, params, seed,
    coefficients, kernel distribution)``."""

    _NAME = "diffkern.zo._ZOOptimizer"

    def __init__(self, params, defaults, *, eps, num_directions, distribution, seed,
                 group="auto", hook_unit_bytes=None):
        fname = self._NAME
        from ._zo_hooks import check_unit_bytes
        self.hook_unit_bytes = check_unit_bytes(fname, hook_unit_bytes)
        module = None
        if isinstance(params, nn.Module):
            module = params
            params, _ = _check_params(fname, module)
        self.eps = _check_eps(fname, eps)
        self.num_directions = _check_count(fname, "num_directions", num_directions)
        _check_choice(fname, "distribution", distribution, _DISTRIBUTIONS)
        self.distribution = distribution
        if seed is None:
            raise TypeError(f"{fname}: seed must be an int (a run is repeated from it)")
        self.seed = _check_seed(fname, seed)
        _check_group(fname, group)
        self.group = group  # the directions of a step split across ranks: see zo.grad
        self._module = module
        self._step_count = 0
        self._unit_plan = {}    # the module path's hook units, kept across steps (_Evaluator)
        super().__init__(params, defaults)
        for g, group in enumerate(self.param_groups):
            _check_params(fname, group["params"], f"param_groups[{g}]['params']")

    def _groups(self):
        return [list(group["params"]) for group in self.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        fname = f"{self._NAME}.step"
        if closure is None:
            raise TypeError(f"{fname}: closure is required: a function returning the loss "
                            f"(zeroth-order steps evaluate it, no backward)")
        groups = self._groups()
        seeds = [_mix(self.seed, self._step_count, g) for g in range(len(groups))]
        with _Evaluator(groups, self._module, fname, "closure",
                        hook_unit_bytes=self.hook_unit_bytes, unit_cache=self._unit_plan) as ev:
            coeffs, losses = _directional(ev, closure, groups, seeds, self.num_directions,
                                          self.eps, self.distribution, "central",
                                          group=self.group)
        kdist = _kernel_distribution(self.distribution)
        for g, (group, ps) in enumerate(zip(self.param_groups, groups)):
            self._apply(g, group, ps, seeds[g], coeffs, kdist)
        self._step_count += 1
        return torch.tensor(sum(losses) / len(losses), dtype=torch.float64)

    def _apply(self, g, group, ps, seed, coeffs, kdist):
        raise NotImplementedError

    def _zo_state(self):
        return dict(step=self._step_count, seed=self.seed)

    def _load_zo_state(self, zo):
        self._step_count, self.seed = int(zo["step"]), int(zo["seed"])

    def state_dict(self):
        sd = super().state_dict()
        sd["zo"] = self._zo_state()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        # torch casts floating state to the parameter's dtype: keep the float32 buffers
        # of fp16/bf16 parameters in float32.
        buffers = {i: {k: v for k, v in s.items() if isinstance(v, Tensor) and v.dim() > 0}
                   for i, s in state_dict.get("state", {}).items()}
        super().load_state_dict(state_dict)
        flat = [p for group in self.param_groups for p in group["params"]]
        for i, bufs in buffers.items():
            p = flat[i]
            for name, b in bufs.items():
                self.state[p][name] = b.to(device=p.device, dtype=_buffer_dtype(p)).clone()
        if zo is not None:
            self._load_zo_state(zo)


class ZOSGD(_ZOOptimizer):
    """SGD on the SPSA (MeZO) estimate: forward passes only, no gradient tensors.

    ``params``: an ``nn.Module`` (its trainable parameters, perturbed through forward hooks:
    no copy of the weights), or parameters / param groups as for any ``torch.optim``
    optimizer (perturbed in place with a backup copy during ``step``: one copy of the
    parameters of memory). Every evaluation restores the exact bits (see ``diffkern.zo``).

    ``step(closure)``: ``closure()`` returns the loss (no ``backward``; it runs under
    ``torch.no_grad()``). With n = ``num_directions`` Gaussian or Rademacher directions z_k
    of the step's seed, c_k = (L(theta+eps z_k) - L(theta-eps z_k)) / (2 eps) / n and each
    group is updated by the fused kernel: theta <- theta - lr (sum_k c_k z_k + wd theta).
    ``distribution="sphere"``: z_k/||z_k|| over all parameters, c_k scaled by d/||z_k||
    (see ``diffkern.zo.grad``). Returns the mean of the 2n losses (a 0-d float64 tensor).

    Seeds: the directions of step s, group g come from seed mix(seed, s, g), so a run is a
    pure function of (seed, the losses). ``momentum > 0`` keeps one buffer per parameter
    (float32; float64 for float64 parameters) in ``state``: b <- m b + sum c z + wd theta,
    theta <- theta - lr b. Without momentum nothing but scalars is kept between steps.

    ``group``: as in ``diffkern.zo.grad`` ("auto": split the directions of each step across
    the ranks of torch.distributed's default group when it is initialised; None: this
    process alone; or a process group). Every rank runs the same steps on identical
    replicas; only scalars cross the network and the replicas stay bit-identical.

    ``history=True`` appends one ``HistoryEntry`` per (step, group, direction) to
    ``self.history`` (a few hundred bytes each; ``history=False`` keeps none):
    ``diffkern.zo.replay(initial params, history)`` then rebuilds the final weights bit for
    bit, rebuilding momentum buffers as it goes (so a momentum run's replay needs their
    memory too). ``state_dict`` carries the step counter, the seed and the history.
    """

    _NAME = "diffkern.zo.ZOSGD"

    def __init__(self, params, lr, *, momentum=0.0, weight_decay=0.0, eps=1e-3,
                 num_directions=1, distribution="gaussian", seed=0, history=True,
                 group="auto", hook_unit_bytes=None):
        fname = self._NAME
        lr = _number(fname, "lr", lr)
        momentum = _number(fname, "momentum", momentum, 0.0, 1.0, high_open=True)
        weight_decay = _number(fname, "weight_decay", weight_decay)
        self.history = [] if history else None
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay),
                         eps=eps, num_directions=num_directions, distribution=distribution,
                         seed=seed, group=group, hook_unit_bytes=hook_unit_bytes)

    def _apply(self, g, group, ps, seed, coeffs, kdist):
        lr, wd, m = float(group["lr"]), float(group["weight_decay"]), float(group["momentum"])
        triples = [(seed, k, c) for k, c in enumerate(coeffs)]
        buffers = [self.state[p].get("momentum_buffer") for p in ps] if m else None
        _apply_step(ps, triples, lr, wd, m, buffers, kdist)
        if m:
            for p, b in zip(ps, buffers):
                self.state[p]["momentum_buffer"] = b
        if self.history is not None:
            self.history.extend(HistoryEntry(self._step_count, g, s, k, c, lr, wd, m, kdist)
                                for s, k, c in triples)

    def _zo_state(self):
        return dict(super()._zo_state(), history=None if self.history is None
                    else [tuple(e) for e in self.history])

    def _load_zo_state(self, zo):
        super()._load_zo_state(zo)
        self.history = None if zo["history"] is None else [HistoryEntry(*e)
                                                           for e in zo["history"]]


def replay(params, history) -> None:
    """Re-applies the updates recorded by ``ZOSGD(history=True)`` to ``params`` in place.

    ``params``: the run's initial weights, grouped as the optimizer's were: an ``nn.Module``
    or a list of tensors (one group), or a list of param-group dicts / lists of tensors.
    No loss is evaluated: the recorded coefficients regenerate the same directions and the
    same kernel calls, so the final weights equal the run's bit for bit.
    """
    fname = "diffkern.zo.replay"
    if isinstance(params, nn.Module) or isinstance(params, Tensor):
        groups = [_check_params(fname, params)[0]]
    else:
        items = list(params)
        if items and all(isinstance(i, dict) for i in items):
            groups = [_check_params(fname, i["params"], f"params[{g}]['params']")[0]
                      for g, i in enumerate(items)]
        elif items and all(isinstance(i, (list, tuple)) for i in items):
            groups = [_check_params(fname, i, f"params[{g}]")[0] for g, i in enumerate(items)]
        else:
            groups = [_check_params(fname, items)[0]]
    entries = [e if isinstance(e, HistoryEntry) else HistoryEntry(*e) for e in history]
    buffers = [[None] * len(ps) for ps in groups]
    i = 0
    while i < len(entries):
        e = entries[i]
        if not 0 <= e.group < len(groups):
            raise ValueError(f"{fname}: history entry {i} is for parameter group {e.group}, "
                             f"but params has {len(groups)} group(s)")
        j = i
        while j < len(entries) and (entries[j].step, entries[j].group) == (e.step, e.group):
            j += 1
        triples = [(x.seed, x.k, x.coefficient) for x in entries[i:j]]
        _apply_step(groups[e.group], triples, e.lr, e.weight_decay, e.momentum,
                    buffers[e.group], e.distribution)
        i = j
