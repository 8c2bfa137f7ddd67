"""Batched finite-difference Jacobians, with column colouring for known sparsity.

- ``jacobian(fn, x, ...)``: central differences, every perturbed input evaluated through
  batched calls of ``fn``; with a sparsity pattern, columns that share no row are perturbed
  together (Curtis-Powell-Reid), so a banded Jacobian costs a few evaluations, not 2n.
- ``gradcheck(fn, inputs, ...)``: that Jacobian against autograd's, naming the worst entry.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["jacobian", "gradcheck", "color_columns"]

_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)
# Default cap of the perturbed inputs per call: about 2^24 input elements per batch.
_DEFAULT_BATCH_ELEMENTS = 1 << 24


def _pattern_indices(fname, sparsity, n):
    """(rows, cols, m, layout) of a boolean (m, n) pattern, dense or torch sparse."""
    if not isinstance(sparsity, Tensor):
        raise TypeError(f"{fname}: sparsity must be a boolean (m, n) tensor (dense or torch "
                        f"sparse), got {type(sparsity).__name__}")
    if sparsity.dim() != 2 or sparsity.shape[1] != n:
        raise ValueError(f"{fname}: sparsity must have shape (m, n) with n = x.numel() = {n}, "
                         f"got {tuple(sparsity.shape)}")
    layout = sparsity.layout
    if layout in _SPARSE_LAYOUTS:
        coo = sparsity.to_sparse_coo().coalesce()
        idx, vals = coo.indices(), coo.values()
        keep = vals.bool() if vals.dtype != torch.bool else vals
        rows, cols = idx[0][keep], idx[1][keep]
    elif layout == torch.strided:
        rows, cols = torch.nonzero(sparsity.bool(), as_tuple=True)
    else:
        raise TypeError(f"{fname}: sparsity has unsupported layout {layout}")
    return rows.cpu(), cols.cpu(), int(sparsity.shape[0]), layout


def color_columns(rows: Tensor, cols: Tensor, n: int) -> Tuple[Tensor, int]:
    """Greedy colouring of the column-intersection graph of the pattern (rows, cols): two
    columns get different colours when some row has entries in both. Columns in natural
    order, each the smallest colour no already-coloured neighbour has (a banded pattern of
    w diagonals gets w colours). Returns (colour of each column as int64, number of colours).

    Each row keeps the set of colours used in it as a Python int bit set, so the cost is one
    pass over the nonzeros."""
    order = torch.sort(cols, stable=True).indices
    rows_sorted = rows[order].tolist()
    counts = torch.bincount(cols, minlength=n).tolist()
    row_colours = {}
    colours = [0] * n
    ncolours = 0
    pos = 0
    for j in range(n):
        rj = rows_sorted[pos:pos + counts[j]]
        pos += counts[j]
        used = 0
        for i in rj:
            used |= row_colours.get(i, 0)
        c = (~used & (used + 1)).bit_length() - 1  # lowest colour not used
        colours[j] = c
        bit = 1 << c
        for i in rj:
            row_colours[i] = row_colours.get(i, 0) | bit
        ncolours = max(ncolours, c + 1)
    return torch.tensor(colours, dtype=torch.int64), ncolours


def jacobian(fn: Callable[[Tensor], Tensor], x: Tensor, *, eps: Optional[float] = None,
             chunk: Optional[int] = None, sparsity: Optional[Tensor] = None) -> Tensor:
    """The (m, n) Jacobian of ``fn`` at ``x`` by central differences, in x's dtype.

    ``fn`` must accept a leading batch dimension: called with a (B, *x.shape) tensor it
    returns (B, *out_shape) (m = prod(out_shape), n = x.numel()); rows are ``fn``'s flattened
    output, columns x's flattened elements. The perturbed inputs (2 per column, or 2 per
    colour with ``sparsity``) go through ``fn`` in batches of at most ``chunk`` (default:
    about 2^24 input elements per batch), so there are ceil(2 * columns / chunk) calls.

    Step: h_i = eps * max(1, |x_i|) with eps = cbrt(machine epsilon of x's dtype) by default
    (the central-difference optimum); the quotient divides by the difference of the rounded
    perturbed values, the step actually taken.

    ``sparsity``: a known boolean (m, n) pattern (dense, or torch sparse COO/CSR/CSC) of the
    entries that may be nonzero. Columns are greedily coloured (``color_columns``) so that
    columns of one colour share no row, perturbed together, and each entry is read from its
    colour's difference. The result is then dense for a dense pattern and sparse COO/CSR/CSC
    like the pattern otherwise. Entries outside the pattern must be zero: they would be
    attributed to the wrong column.
    """
    fname = "diffkern.fd.jacobian"
    if not callable(fn):
        raise TypeError(f"{fname}: fn must be callable, got {type(fn).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{fname}: x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if eps is None:
        eps = torch.finfo(x.dtype).eps ** (1.0 / 3.0)
    elif isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (
            math.isfinite(eps) and eps > 0):
        raise ValueError(f"{fname}: eps must be a positive finite number or None, got {eps!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral)
                              or chunk < 1):
        raise ValueError(f"{fname}: chunk must be a positive int or None, got {chunk!r}")
    x = x.detach()
    n = x.numel()
    flat = x.reshape(-1)
    h = float(eps) * flat.abs().clamp(min=1.0)
    plus, minus = flat + h, flat - h
    step = plus.double() - minus.double()  # exact: the step the rounding actually left

    if sparsity is None:
        colours, ncolours, pattern = torch.arange(n), n, None
    else:
        rows, cols, m_pattern, layout = _pattern_indices(fname, sparsity, n)
        colours, ncolours = color_columns(rows, cols, n)
        pattern = (rows, cols, m_pattern, layout)
    colours = colours.to(x.device)

    batch = chunk or max(2, _DEFAULT_BATCH_ELEMENTS // max(n, 1))
    f_plus = f_minus = None
    total = 2 * ncolours
    for start in range(0, total, batch):
        q = torch.arange(start, min(start + batch, total), device=x.device)
        colour, negative = q // 2, (q % 2).bool()
        hit = colours.unsqueeze(0) == colour.unsqueeze(1)  # (B, n): columns moved
        moved = torch.where(negative.unsqueeze(1), minus.unsqueeze(0), plus.unsqueeze(0))
        inputs = torch.where(hit, moved, flat.unsqueeze(0)).reshape(len(q), *x.shape)
        out = fn(inputs)
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != len(q):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{fname}: fn must accept a leading batch dimension: called "
                             f"with shape {tuple(inputs.shape)} it returned {got}")
        out = out.detach().reshape(len(q), -1)
        if f_plus is None:
            m = out.shape[1]
            if pattern is not None and pattern[2] != m:
                raise ValueError(f"{fname}: sparsity has {pattern[2]} rows, but fn has "
                                 f"{m} outputs")
            dtype = torch.promote_types(out.dtype, x.dtype)
            f_plus = torch.empty(ncolours, m, dtype=dtype, device=x.device)
            f_minus = torch.empty_like(f_plus)
        f_plus[colour[~negative]] = out[~negative].to(f_plus.dtype)
        f_minus[colour[negative]] = out[negative].to(f_plus.dtype)

    if f_plus is None:  # n == 0: no column to evaluate; m is unknown without a call
        out = fn(x.unsqueeze(0)).detach().reshape(1, -1)
        return torch.zeros(out.shape[1], 0, dtype=x.dtype, device=x.device)
    diff = f_plus - f_minus  # (colours, m)
    step = step.to(device=x.device, dtype=torch.float64)
    if pattern is None:
        return (diff.double() / step.unsqueeze(1)).t().to(x.dtype).contiguous()
    rows, cols, m, layout = pattern
    rows_d, cols_d = rows.to(x.device), cols.to(x.device)
    values = (diff.double()[colours[cols_d], rows_d] / step[cols_d]).to(x.dtype)
    if layout == torch.strided:
        out = torch.zeros(m, n, dtype=x.dtype, device=x.device)
        out[rows_d, cols_d] = values
        return out
    coo = torch.sparse_coo_tensor(torch.stack([rows_d, cols_d]), values, (m, n),
                                  check_invariants=False).coalesce()  # indices from the pattern
    if layout == torch.sparse_csr:
        return coo.to_sparse_csr()
    if layout == torch.sparse_csc:
        return coo.to_sparse_csc()
    return coo


def _batched(fn, inputs, k):
    """fn of a batch of input k (the others fixed): vmap, or a loop where vmap cannot run
    fn (e.g. an autograd.Function without a vmap rule)."""
    def call(xk):
        args = list(inputs)
        args[k] = xk
        return fn(*args)

    state = {"vmap": True}

    def batched(xs):
        if state["vmap"]:
            try:
                return torch.vmap(call)(xs)
            except Exception:
                state["vmap"] = False
        return torch.stack([call(xi) for xi in xs])
    return batched, call


def _index(i, shape):
    if not shape:
        return "()"
    return str(tuple(int(v) for v in torch.unravel_index(torch.tensor(i), shape)))


def gradcheck(fn: Callable[..., Tensor], inputs, *, atol: float = 1e-5, rtol: float = 1e-3,
              eps: Optional[float] = None) -> bool:
    """Compares ``jacobian`` (finite differences) with autograd's Jacobian of ``fn(*inputs)``.

    ``inputs``: a tensor or a sequence; the floating tensors with ``requires_grad=True`` are
    checked (all floating tensors when none requires grad). ``fn`` returns one tensor; it need
    not accept a batch dimension (it is vmapped, or looped where vmap cannot run it).
    An entry passes when |fd - autograd| <= atol + rtol * |autograd|. Returns True, or raises
    AssertionError naming the worst entry (input, output index, input index, both values).
    Use float64 inputs: finite differences in float32 carry errors near 1e-5 relative.
    """
    fname = "diffkern.fd.gradcheck"
    inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    floats = [k for k, v in enumerate(inputs) if isinstance(v, Tensor) and v.is_floating_point()]
    checked = [k for k in floats if inputs[k].requires_grad] or floats
    if not checked:
        raise ValueError(f"{fname}: inputs has no floating-point tensor to check")
    plain = [v.detach() if isinstance(v, Tensor) else v for v in inputs]
    for k in checked:
        batched, call = _batched(fn, plain, k)
        x = plain[k]
        out = call(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"{fname}: fn must return one tensor, got {type(out).__name__}")
        with torch.enable_grad():
            ad = torch.autograd.functional.jacobian(call, x)
        ad = ad.reshape(out.numel(), x.numel())
        fd = jacobian(batched, x, eps=eps)
        tol = atol + rtol * ad.abs()
        err = (fd - ad).abs()
        ratio = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err / tol)
        worst = int(torch.argmax(ratio))
        if float(ratio.reshape(-1)[worst]) > 1.0:
            i, j = divmod(worst, x.numel())
            bad = int((ratio > 1.0).sum())
            raise AssertionError(
                f"{fname}: Jacobian mismatch for input {k}: output index "
                f"{_index(i, tuple(out.shape))}, input index {_index(j, tuple(x.shape))}: "
                f"finite differences {float(fd[i, j])!r}, autograd {float(ad[i, j])!r} "
                f"(|difference| {float(err[i, j]):.3g} > atol + rtol*|autograd| = "
                f"{float(tol[i, j]):.3g}; {bad} of {err.numel()} entries out of tolerance)")
    return True
