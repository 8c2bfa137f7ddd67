"""The forward hooks of dk.zo's module path: which modules are hooked (the "units") and the
lean pre/post hooks that swap each unit's trainable parameters for perturbed scratch copies.

Units. By default every module that owns trainable parameters is a unit for its own
(``recurse=False``) parameters: its scratch is alive only while its own forward runs.
``hook_unit_bytes=B`` coarsens this top-down: a module whose whole subtree's trainable
parameters fit in B bytes is one unit for all of them (hooked once, one kernel call per
parameter group, instead of once per descendant); a module too large for that stays a unit
for its own parameters and its children are tried in turn (as are ``ModuleList`` /
``ModuleDict``, which are never called). A module that is never called itself but only
has its children called (a custom container) must not be a unit: its parameters would go
unperturbed (the evaluator's warning names them). ``"auto"``: B = the bytes of the
largest per-module unit, so no unit's scratch is larger than the default's largest one.
A parameter reached through several units (tied weights owned by two modules) is in each;
the evaluator's nesting counts make the first to run swap it in and the last to finish
swap it back, as for a module that is called inside itself.

Why lean: each hooked unit runs once per forward, ~200 times for an OPT-1.3B, and on a
GPU the step is bounded by this host work. Everything that does not change between calls
is computed here once per evaluator (the parameters per group, their tensor ids); the hook
allocates the scratch, makes one trusted kernel call per group (the arguments were checked
at setup) and swaps ``.data``.
"""
from __future__ import annotations

import torch

from . import _zo_kernels as K

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Views of one flat buffer shaped like a list of tensors, in one C++ call (what
# torch._utils._unflatten_dense_tensors uses); without it every scratch is its own allocation.
_UNFLATTEN = getattr(getattr(torch._C, "_nn", None), "unflatten_dense_tensors", None)
_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict)


def check_unit_bytes(fname, value):
    if value is None or value == "auto":
        return value
    return K.check_int_option(fname, "hook_unit_bytes", value, 0, "None, 'auto' or an int (bytes)")


def _nbytes(p):
    return p.numel() * p.element_size()


def plan_units(root, where, unit_bytes):
    """[(module, [params])]: the hooked units (see the module docstring). ``where`` maps
    id(param) -> (group, tensor id) for the perturbed parameters."""
    own = {}
    for m in root.modules():
        ps = [p for p in m.parameters(recurse=False) if id(p) in where]
        if ps:
            own[m] = ps
    if unit_bytes is None:
        return list(own.items())
    if unit_bytes == "auto":
        unit_bytes = max(sum(_nbytes(p) for p in ps) for ps in own.values())
    units = []

    def visit(m):
        sub = {}
        for p in m.parameters():  # subtree, each tensor once
            if id(p) in where:
                sub[id(p)] = p
        if not sub:
            return
        # Containers are never called (their forward raises), so their hooks would never
        # fire: they are split into their children like a module over budget.
        callable_unit = not isinstance(m, _CONTAINERS)
        if callable_unit and sum(_nbytes(p) for p in sub.values()) <= unit_bytes:
            units.append((m, list(sub.values())))
            return
        if m in own:
            units.append((m, own[m]))
        for child in m.children():
            visit(child)
    visit(root)
    return units


def _tree_key(root):
    """The module tree as a flat tuple: each module's id, its parameters' ids and its number
    of children, depth first (so the tuple also fixes which module is whose child). A plain
    walk of the ``_modules`` / ``_parameters`` dicts: ~4x cheaper than ``named_modules``
    (no name strings), which matters once per step."""
    out, stack, seen = [], [root], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:  # a module registered twice is visited once, as modules() does
            out.append(id(m))
            continue
        seen.add(id(m))
        children = [c for c in m._modules.values() if c is not None]
        out.append((id(m), tuple(id(p) for p in m._parameters.values() if p is not None),
                    len(children)))
        stack.extend(reversed(children))
    return tuple(out)


def cached_units(cache, root, groups, where, unit_bytes):
    """[(module, Unit)] of ``plan_units``, taken from ``cache`` (a dict the caller keeps
    across calls: an optimizer's, one entry) when nothing the plan depends on has changed:
    the module tree (its modules, who is whose child, the parameters each registers), the
    perturbed tensors in order with their dtype, contiguity and size, and ``unit_bytes``. Why: planning walks
    every module's subtree (~10 ms of host time per step on an OPT-1.3B, where the GPU then
    waits); this key costs one pass over the modules and the parameters."""
    def units():
        return [(m, Unit(owned, where)) for m, owned in plan_units(root, where, unit_bytes)]
    if cache is None:  # a one-off evaluator (dk.zo.grad): the key would be wasted work
        return units()
    key = (unit_bytes, _tree_key(root),
           tuple((id(p), p.dtype, p.is_contiguous(), p.numel())
                 for ps in groups for p in ps))
    if cache.get("key") != key:
        cache.clear()
        cache.update(key=key, units=units())
    return cache["units"]


class Unit:
    """One hooked unit: its parameters, and per group the fused-kernel ones (kernel dtype,
    contiguous, non-empty) with their tensor ids, fixed at setup; ``rows`` keeps each
    group's kernel descriptors by (scratch, parameter) pointers (the caching allocator
    hands a unit the same scratch blocks forward after forward, so they are built once);
    ``flat`` per group: its total element count when the group's scratch can be one
    allocation cut into views (one dtype, every tensor a multiple of 16 bytes, so each view
    stays 16-byte aligned for the kernel's vector path), else None (one allocation per
    tensor). One allocation and one C++ call for the views cost ~1/3 of 16 allocations."""

    __slots__ = ("params", "fused", "simple", "rows", "flat")

    def __init__(self, params, where):
        self.params = params
        fused = {}
        for p in params:
            if p.dtype in _KERNEL_DTYPES and p.is_contiguous() and p.numel():
                g, t = where[id(p)]
                fused.setdefault(g, ([], []))
                fused[g][0].append(p)
                fused[g][1].append(t)
        self.fused = list(fused.items())
        # The fast path covers units whose every parameter the fused kernel takes.
        self.simple = sum(len(ps) for _, (ps, _) in self.fused) == len(params)
        self.rows = [{} for _ in self.fused]
        self.flat = []
        for _, (ps, _) in self.fused:
            uniform = all(p.dtype == ps[0].dtype for p in ps)
            aligned = all(p.numel() * p.element_size() % 16 == 0 for p in ps)
            self.flat.append(sum(p.numel() for p in ps)
                             if uniform and aligned and len(ps) > 1 and _UNFLATTEN else None)


def make_hooks(ev, unit):
    """(pre, post) forward hooks of ``unit`` for the evaluator ``ev`` (its ``current``
    perturbation, ``active`` swaps, ``seen`` set and ``where`` map)."""
    codes = K.KERNEL_CODES
    trusted = K.perturb_into_trusted
    unflatten = _UNFLATTEN
    params = unit.params
    active = ev.active

    def pre(module, args):
        pert = ev.current
        if pert is None:
            return None
        fast = (unit.simple and getattr(pert, "fused_ok", False)
                and not any(id(p) in active for p in params))
        if fast:
            # Every parameter fresh, every one through the fused kernel: one call per group.
            seen = ev.seen
            for (g, (ps, ids)), rows, flat in zip(unit.fused, unit.rows, unit.flat):
                src = [p.data for p in ps]
                if flat is None:
                    dst = [torch.empty_like(x) for x in src]
                else:
                    dst = unflatten(torch.empty(flat, dtype=src[0].dtype, device=src[0].device),
                                    src)
                trusted(dst, src, pert.seeds[g], pert.k, pert.scale, codes[pert.dist], ids, rows)
                for p, d, s in zip(ps, dst, src):
                    active[id(p)] = [p, s, 1]
                    p.data = d
                    seen.add(id(p))
            return None
        slow_pre(ev, params, pert)
        return None

    def post(module, args, output):
        for p in params:
            entry = active.get(id(p))
            if entry is not None:
                entry[2] -= 1
                if entry[2] == 0:
                    p.data = entry[1]
                    del active[id(p)]
        return None
    return pre, post


def slow_pre(ev, params, pert):
    """The general pre-hook: re-entered parameters (tied owners, a module called inside
    itself) only count one more nesting level; the others get their scratch from the
    perturbation (``scratch_many`` for directions: float64 and non-contiguous tensors
    per tensor; ``scratch`` for a coordinate, None for the parameters it leaves alone)."""
    with torch.no_grad():
        todo = []
        for p in params:
            entry = ev.active.get(id(p))
            if entry is not None:
                entry[2] += 1
                continue
            todo.append((*ev.where[id(p)], p))
        many = getattr(pert, "scratch_many", None)
        scratches = (many(todo) if many is not None
                     else [pert.scratch(g, t, p) for g, t, p in todo])
        for (_, _, p), s in zip(todo, scratches):
            if s is None:
                continue
            ev.active[id(p)] = [p, p.data, 1]
            p.data = s
            ev.seen.add(id(p))
