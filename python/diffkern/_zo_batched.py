"""Batched evaluation for dk.zo.grad (private): many perturbed forwards as one vmapped call.

DeepZero's forward parallelization. The points of an estimate (theta + s eps z_k, one
coordinate moved for CGE, or theta itself) are cut into chunks of at most ``batch_size``
points (fewer if ``batch_memory`` caps the bytes of the perturbed copies). For a chunk the
perturbed parameters are built as a stack [B, *shape] per parameter: each slice is written
once as theta + s z by the fused kernel (``perturb_into`` with the parameter's id, so
z(seed, k, t, i) is the very value the sequential path adds, rounded the same way; a
non-contiguous parameter takes a copy and ``perturb_``), or is a copy of theta with one
element set for CGE. ``torch.func.vmap`` then evaluates the loss over the stack dimension:

- ``params`` a module: ``loss_fn()`` unchanged; while it runs, the module's trainable
  parameters are replaced by the stacked ones through ``torch.func.functional_call`` (every
  read of the attribute sees them, also reads outside the owning module's forward).
- ``params`` a list of tensors: a closure cannot be re-pointed at other tensors, so
  ``loss_fn(*params)`` takes the parameters as positional arguments.

The stored parameters are only read (bit-identical afterwards by construction). Memory per
chunk: B perturbed copies of the parameters that vary (all of them for directions, one
tensor for CGE) plus B forwards' activations. Random operations in the loss (dropout) draw
the same values for every point of a chunk (``vmap(randomness="same")``: common random
numbers, what a difference quotient wants).
"""
from __future__ import annotations

import inspect
import math
from typing import List, Optional

import torch
from torch import nn

from ._zo_kernels import check_int_option


class _LossCall(nn.Module):
    """Makes ``loss_fn()`` the forward of a module owning the user's module, so that
    ``functional_call`` can swap that module's parameters while loss_fn runs."""

    def __init__(self, module, loss_fn):
        super().__init__()
        self.m = module
        self.loss_fn = loss_fn

    def forward(self):
        return self.loss_fn()


def check_options(fname, batch_size, batch_memory):
    """(size, memory) or None when batching is off."""
    if batch_size is None:
        if batch_memory is not None:
            raise ValueError(f"{fname}: batch_memory is only used with batch_size (batched "
                             f"evaluation)")
        return None
    size = check_int_option(fname, "batch_size", batch_size, 1, "an int or None")
    if batch_memory is not None:
        batch_memory = check_int_option(fname, "batch_memory", batch_memory, 1,
                                        "an int (bytes) or None", "a positive number of bytes")
    return size, batch_memory


class Batched:
    """The evaluator of dk.zo.grad with batch_size: same protocol as zo._Evaluator
    (a context manager with ``evaluate_many(loss_fn, perturbations)``)."""

    def __init__(self, fname, loss_fn, groups, module, size, memory, fn="loss_fn"):
        self.fname, self.fn, self.size, self.memory = fname, fn, size, memory
        self.groups = groups
        self.flat = [p for ps in groups for p in ps]
        self.offsets = []
        start = 0
        for ps in groups:
            self.offsets.append(start)
            start += len(ps)
        self.count = 0
        if module is not None:
            names = {id(p): n for n, p in module.named_parameters()}
            missing = [i for i, p in enumerate(self.flat) if id(p) not in names]
            if missing:
                raise ValueError(f"{fname}: params[{missing[0]}] is not a parameter of the "
                                 f"module")
            self.names = ["m." + names[id(p)] for p in self.flat]
            self.call = _LossCall(module, loss_fn)
        else:
            self.names, self.call = None, None
            try:
                inspect.signature(loss_fn).bind(*self.flat)
            except TypeError:
                raise TypeError(
                    f"{fname}: with batch_size and a list of tensors, {fn} must take the "
                    f"parameters as positional arguments ({fn}(p0, ..., p{len(self.flat) - 1})"
                    f"); it is evaluated under torch.func.vmap with the perturbed "
                    f"parameters") from None
            except ValueError:  # no signature (a builtin): let the call itself decide
                pass
            self.loss_fn = loss_fn

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    # ---------------------------------------------------------------- chunks

    def _chunk(self, indices):
        per_point = sum(self.flat[i].numel() * self.flat[i].element_size() for i in indices)
        size = self.size
        if self.memory is not None and per_point:
            fit = self.memory // per_point
            if fit < 1:
                raise ValueError(f"{self.fname}: batch_memory={self.memory} bytes is less "
                                 f"than one perturbed copy of the parameters that vary "
                                 f"({per_point} bytes)")
            size = min(size, fit)
        return size

    def evaluate_many(self, loss_fn, perts) -> List[float]:
        """Losses at ``perts`` (None: theta; zo._Direction; zo._Coordinate), in order."""
        out, i = [], 0
        while i < len(perts):
            key = _key(perts[i])
            j = i
            while j < len(perts) and _key(perts[j]) == key:
                j += 1
            run = perts[i:j]
            if key is None:  # theta alone: no copy, no vmap
                for _ in run:
                    out.append(self._plain())
            else:
                indices = (range(len(self.flat)) if key == "direction"
                           else [self.offsets[key[0]] + key[1]])
                step = self._chunk(indices)
                for c in range(0, len(run), step):
                    out.extend(self._batch(list(indices), run[c:c + step]))
            i = j
        return out

    @torch.no_grad()
    def _plain(self):
        self.count += 1
        out = self.call() if self.call is not None else self.loss_fn(*self.flat)
        from .zo import _loss_value
        return _loss_value(self.fname, out, f"evaluation {self.count} (unperturbed theta)",
                           self.fn)

    @torch.no_grad()
    def _batch(self, indices, perts):
        B = len(perts)
        # Directions: each slice written once, theta + s z by the fused kernel (one read of
        # theta, one write); coordinates: a copy of theta with one element set.
        one_pass = (all(hasattr(p, "apply_into") for p in perts)
                    and all(self.flat[i].is_contiguous() for i in indices))
        stacks = {}
        for i in indices:
            p = self.flat[i].detach()
            s = torch.empty((B,) + tuple(p.shape), dtype=p.dtype, device=p.device)
            if not one_pass:
                s.copy_(p.unsqueeze(0).expand_as(s))
            stacks[i] = s
        for b, pert in enumerate(perts):
            if pert is None:
                continue
            if hasattr(pert, "apply_inplace"):  # a direction: the fused kernel on slices
                slices = [[stacks[self.offsets[g] + t][b] for t in range(len(ps))]
                          for g, ps in enumerate(self.groups)]
                if one_pass:
                    pert.apply_into(slices, self.groups)
                else:
                    pert.apply_inplace(slices)
            else:  # a coordinate
                stacks[self.offsets[pert.g] + pert.t][b][pert.index] = pert.value
        order = sorted(stacks)
        if self.call is not None:
            names = [self.names[i] for i in order]
            call = self.call

            def fn(*tensors):
                return torch.func.functional_call(call, dict(zip(names, tensors)), ())
            args, in_dims = [stacks[i] for i in order], 0
        else:
            loss_fn = self.loss_fn

            def fn(*tensors):
                return loss_fn(*tensors)
            args = [stacks[i] if i in stacks else p.detach() for i, p in enumerate(self.flat)]
            in_dims = tuple(0 if i in stacks else None for i in range(len(self.flat)))
        try:
            out = torch.func.vmap(fn, in_dims=in_dims, randomness="same")(*args)
        except Exception as e:
            if hasattr(e, "add_note"):
                e.add_note(f"{self.fname}: raised while evaluating {self.fn} under "
                           f"torch.func.vmap (batch_size={self.size}); batched evaluation "
                           f"needs a loss without .item(), data-dependent Python control flow "
                           f"or in-place writes to captured tensors (BatchNorm in training "
                           f"mode updates its running statistics in place): use "
                           f"batch_size=None for such a loss")
            raise
        first = self.count + 1
        self.count += B
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"{self.fname}: {self.fn} must return a scalar tensor under "
                             f"batched evaluation, but evaluation {first} returned "
                             f"{type(out).__name__}")
        if out.shape[:1] != (B,) or out[0].numel() != 1:
            shape = tuple(out.shape[1:]) if out.dim() else ()
            raise ValueError(f"{self.fname}: {self.fn} must return a scalar, but evaluation "
                             f"{first} returned a tensor of shape {shape}")
        if out.is_complex():
            raise ValueError(f"{self.fname}: {self.fn} must return a real scalar, but "
                             f"evaluation {first} returned a complex tensor")
        values = out.detach().reshape(B).double().tolist()
        for b, v in enumerate(values):
            if not math.isfinite(v):
                raise ValueError(f"{self.fname}: {self.fn} returned {v} at evaluation "
                                 f"{first + b} ({perts[b].text if perts[b] else 'theta'}); "
                                 f"the parameters are unchanged (batched evaluation "
                                 f"only reads them)")
        return values


def _key(pert) -> Optional[object]:
    """Points that share a chunk: all directions (and theta among them) vary every
    parameter; coordinates vary one tensor, so a chunk stays within one tensor."""
    if pert is None:
        return None
    if hasattr(pert, "apply_inplace"):
        return "direction"
    return (pert.g, pert.t)
