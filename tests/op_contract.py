"""The op contract every family's tests check, written once (DESIGN.md, Tests).

Each ``check_*`` takes the op (a callable; for opcheck the registered op) and sample
inputs, asserts, and returns what a test may want to check further. Outputs may be a
tensor or any nesting of tuples, lists and dicts of tensors (and plain values); they are
compared leaf by leaf: same shape, dtype and device, then values (``rtol``/``atol``, NaN
equal to NaN; integer and bool tensors exactly).

What can be checked from Python, and how:
- ``check_opcheck``: ``torch.library.opcheck`` (schema, fake tensor, autograd
  registration, AOT dispatch).
- ``check_compile``: ``torch.compile(fullgraph=True)`` (a graph break fails) gives the
  eager values, and the eager gradients for inputs that require grad.
- ``check_side_stream`` (CUDA): the op follows ``torch.cuda.current_stream()``: its
  inputs are written on a side stream that first sleeps, so a launch on any other stream
  would read them unwritten.
- ``check_cuda_graph`` (CUDA): capture once, replay on new inputs copied into the static
  ones, every output equals an eager call on those inputs.
- ``check_poisoned_outputs``: every element of every buffer the op allocates
  uninitialized is written. The ops allocate their outputs themselves (``torch.empty``,
  ``new_empty``, ... inside the op), so those allocation functions are wrapped for the
  duration of the call to fill what they return with a poison; the op runs twice, with
  two different poisons, and both results must equal an unpoisoned call: an element the
  kernel skipped keeps the poison and differs. At least one output must come from a
  poisoned allocation, or the check would prove nothing.
- ``check_zero_size``: empty inputs give empty outputs (and zero gradients), or raise
  the documented error.
- ``check_noncontiguous``: transposed, strided and storage-offset views of the inputs
  give the values (and gradients) of contiguous inputs, and are not modified.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence

import pytest
import torch

import diffkern._ops

# ------------------------------------------------------------------------------ helpers


def leaves(out) -> list:
    """The leaves of a nesting of tuples / lists / dicts, in order."""
    if isinstance(out, dict):
        return [x for k in out for x in leaves(out[k])]
    if isinstance(out, (tuple, list)):
        return [x for o in out for x in leaves(o)]
    return [out]


def tensors(out) -> list:
    return [t for t in leaves(out) if isinstance(t, torch.Tensor)]


def assert_same(got, want, *, rtol: float = 0.0, atol: float = 0.0, what: str = "") -> None:
    """Leaf-by-leaf equality: structure, shape, dtype, device, then values."""
    g, w = leaves(got), leaves(want)
    assert len(g) == len(w), f"{what}: {len(g)} outputs, expected {len(w)}"
    for i, (a, b) in enumerate(zip(g, w)):
        where = f"{what} output {i}".strip()
        if not isinstance(b, torch.Tensor):
            assert a == b or (isinstance(b, float) and math.isnan(b) and math.isnan(a)), \
                f"{where}: {a!r} != {b!r}"
            continue
        assert isinstance(a, torch.Tensor), f"{where}: got {type(a).__name__}, not a tensor"
        assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.device == b.device, f"{where}: device {a.device} != {b.device}"
        if a.dtype.is_floating_point or a.dtype.is_complex:
            torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol,
                                       equal_nan=True, msg=lambda m: f"{where}: {m}")
        else:
            assert torch.equal(a, b), f"{where}: values differ"


def _grad_inputs(args) -> list:
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _grads(out, inputs) -> tuple:
    """Gradients of the sum of every differentiable output with respect to ``inputs``."""
    outs = [t for t in tensors(out) if t.requires_grad]
    assert outs, "inputs require grad but no output does"
    total = sum(t.sum() for t in outs)
    return torch.autograd.grad(total, inputs, allow_unused=True)


# ---------------------------------------------------------------------- opcheck, compile


def check_opcheck(op, args: tuple, kwargs: Optional[dict] = None) -> dict:
    """``torch.library.opcheck`` of a registered op on one sample (raises on failure)."""
    return torch.library.opcheck(op, args, kwargs)


def check_compile(fn: Callable, *args, backend: str = "aot_eager", rtol: float = 0.0,
                  atol: float = 0.0, grad: bool = True):
    """``torch.compile(fn, fullgraph=True)`` gives ``fn``'s outputs, and (``grad``) the
    same gradients for the inputs that require grad. Returns the compiled outputs."""
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    got = compiled(*args)
    want = fn(*args)
    assert_same(got, want, rtol=rtol, atol=atol, what="compiled")
    inputs = _grad_inputs(args)
    if grad and inputs:
        assert_same(_grads(got, inputs), _grads(want, inputs), rtol=rtol, atol=atol,
                    what="compiled gradient")
    return got


# ------------------------------------------------------------------------ CUDA streams


def _sleep_on_current_stream(cycles: int = 20_000_000) -> None:
    # A long kernel first on the stream: work launched on another stream overtakes it.
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None:
        sleep(cycles)


def check_side_stream(fn: Callable, *args, rtol: float = 0.0, atol: float = 0.0):
    """On a side stream that sleeps and then writes the inputs, ``fn`` gives what it gives
    on the current stream. Returns the side-stream outputs."""
    want = fn(*args)
    main = torch.cuda.current_stream()
    # Fresh input buffers, NaN (or zero) until the side stream writes them.
    fresh = [None if not isinstance(a, torch.Tensor) else
             torch.full_like(a, float("nan")) if a.dtype.is_floating_point else
             torch.zeros_like(a) for a in args]
    side = torch.cuda.Stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        _sleep_on_current_stream()
        with torch.no_grad():
            for a, f in zip(args, fresh):
                if f is not None:
                    f.copy_(a)
        ins = [a if f is None else f.requires_grad_(a.requires_grad)
               for a, f in zip(args, fresh)]
        got = fn(*ins)
    main.wait_stream(side)
    torch.cuda.synchronize()
    assert_same(got, want, rtol=rtol, atol=atol, what="side stream")
    return got


def check_cuda_graph(fn: Callable, arg_sets: Sequence[tuple], *, rtol: float = 0.0,
                     atol: float = 0.0, warmup: int = 2):
    """Capture ``fn`` on copies of ``arg_sets[0]``, then for each other set and finally
    the first again: copy it into the static inputs, replay, compare every output with
    an eager call on that set. The sets must give different outputs (else a replay that
    recomputed nothing would pass). Returns the static outputs (last replay)."""
    assert len(arg_sets) >= 2, "check_cuda_graph needs at least two input sets"
    eager = [fn(*s) for s in arg_sets]
    assert any(not torch.equal(a, b) for a, b in zip(tensors(eager[0]), tensors(eager[1]))), \
        "the input sets give identical outputs: a replay that computed nothing would pass"
    static = [a.clone() if isinstance(a, torch.Tensor) else a for a in arg_sets[0]]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):  # lazy initialization happens outside the graph
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    order = list(range(1, len(arg_sets))) + [0]
    for k in order:
        for dst, src in zip(static, arg_sets[k]):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(out, eager[k], rtol=rtol, atol=atol, what=f"graph replay on set {k}")
    return out


# ---------------------------------------------------------------------- poisoned outputs

# (owner, name) of the functions that return uninitialized memory.
_UNINITIALIZED = ((torch, "empty"), (torch, "empty_like"), (torch, "empty_strided"),
                  (torch.Tensor, "new_empty"), (torch.Tensor, "new_empty_strided"))


def _poison_value(dtype: torch.dtype, kind: int):
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan") if kind == 0 else 12345.0
    if dtype == torch.bool:
        return kind == 0
    return 90 + kind  # any integer type, uint8 included


@contextlib.contextmanager
def poisoned_allocations(kind: int):
    """While active, every tensor from torch.empty / empty_like / empty_strided /
    Tensor.new_empty / new_empty_strided is filled with poison ``kind`` (0 or 1) and kept
    alive (so its memory is not reused by another allocation). Yields the list of them."""
    made = []
    saved = []

    def wrap(orig):
        def poisoned(*a, **k):
            t = orig(*a, **k)
            with torch.no_grad():
                t.fill_(_poison_value(t.dtype, kind))
            made.append(t)
            return t
        return poisoned

    try:
        for owner, name in _UNINITIALIZED:
            own = name in vars(owner)
            saved.append((owner, name, own, vars(owner).get(name)))
            setattr(owner, name, wrap(getattr(owner, name)))
        # The C++ fast paths hold torch's allocator from registration: re-register so they
        # allocate through the poisoned one too.
        diffkern._ops.register_fast_path()
        yield made
    finally:
        for owner, name, own, orig in reversed(saved):
            if own:
                setattr(owner, name, orig)
            else:
                delattr(owner, name)  # back to the inherited method
        diffkern._ops.register_fast_path()


def check_poisoned_outputs(fn: Callable, *args, rtol: float = 0.0, atol: float = 0.0,
                           outputs_allocated: bool = True):
    """Every element of every buffer ``fn`` allocates uninitialized is written: two calls
    with its allocations poisoned differently both equal an unpoisoned call. With
    ``outputs_allocated`` at least one output must be such a buffer; a composite whose
    outputs torch computes from the ops' buffers passes False (a skipped element still
    reaches its outputs as poison), and then at least one allocation must have been
    poisoned. Returns the unpoisoned outputs."""
    want = fn(*args)
    landed = poisoned = False
    for kind in (0, 1):
        with poisoned_allocations(kind) as made:
            got = fn(*args)
        ptrs = {t.untyped_storage().data_ptr() for t in made}
        poisoned |= bool(made)
        landed |= any(t.untyped_storage().data_ptr() in ptrs for t in tensors(got) if t.numel())
        assert_same(got, want, rtol=rtol, atol=atol, what=f"poison {kind}")
        del made
    if outputs_allocated:
        assert landed, ("no output came from torch.empty/new_empty/...: the poisoned-output "
                        "check would prove nothing (does the op allocate another way?)")
    else:
        assert poisoned, "nothing was allocated with torch.empty/new_empty/...: nothing checked"
    return want


# ----------------------------------------------------------------- zero size, layouts


def check_zero_size(fn: Callable, *args, shape: Optional[tuple] = None,
                    raises: Optional[type] = None):
    """Empty inputs: ``fn`` raises ``raises`` when given; otherwise every tensor output is
    empty (of ``shape`` when given), and inputs that require grad get zero gradients of
    their own shape. Returns the outputs."""
    if raises is not None:
        with pytest.raises(raises):
            fn(*args)
        return None
    out = fn(*args)
    outs = tensors(out)
    assert outs, "no tensor output"
    for i, t in enumerate(outs):
        assert t.numel() == 0, f"output {i} has shape {tuple(t.shape)}, expected empty"
        if shape is not None:
            assert t.shape == shape, f"output {i}: shape {tuple(t.shape)} != {shape}"
    inputs = _grad_inputs(args)
    if inputs:
        for x, g in zip(inputs, _grads(out, inputs)):
            assert g is not None and g.shape == x.shape and not g.any(), \
                "gradient of an empty output must be zeros of the input's shape"
    return out


# Each layout: t -> (base, view(base)) with view(base) == t, or None when t cannot take it.
_LAYOUTS = {
    # Memory in the transposed order of the last two dimensions.
    "transposed": (lambda t: t.transpose(-1, -2).contiguous()
                   if t.dim() >= 2 and min(t.shape[-2:]) >= 2 else None,
                   lambda base, t: base.transpose(-1, -2)),
    # Every other element of a twice-as-long last dimension.
    "strided": (lambda t: t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
                if t.shape[-1] >= 2 else None,
                lambda base, t: base[..., ::2]),
    # Contiguous, but starting 3 elements into its storage.
    "offset": (lambda t: t.new_zeros(t.numel() + 3),
               lambda base, t: base[3:].view(t.shape)),
}


def _layout(t, layout: str):
    """A view equal to ``t`` in ``layout`` (of a base leaf that requires grad when ``t``
    does, so gradients flow to the view), or None when ``t`` cannot take it."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.dim() == 0:
        return None
    make, view = _LAYOUTS[layout]
    base = make(t.detach())
    if base is None:
        return None
    with torch.no_grad():
        view(base, t).copy_(t)
    if t.requires_grad:
        base.requires_grad_()
    return view(base, t)


def check_noncontiguous(fn: Callable, *args, rtol: float = 0.0, atol: float = 0.0,
                        layouts: Sequence[str] = ("transposed", "strided", "offset")) -> None:
    """For each layout, every tensor input that can take it is replaced by an equal view
    in that layout (transposed memory; every other element; a storage offset): outputs
    (and gradients of inputs that require grad) equal those of the contiguous inputs, and
    the inputs are unchanged. At least one input must take some layout."""
    want = fn(*args)
    inputs = _grad_inputs(args)
    want_g = _grads(want, inputs) if inputs else None
    tried = 0
    for layout in layouts:
        views = [_layout(a, layout) for a in args]
        if all(v is None for v in views):
            continue
        tried += 1
        new = [a if v is None else v for a, v in zip(args, views)]
        if layout != "offset":
            assert any(v is not None and not v.is_contiguous() for v in views), layout
        else:
            assert all(v is None or v.storage_offset() > 0 for v in views)
        before = [v.detach().clone() for v in views if v is not None]
        got = fn(*new)
        assert_same(got, want, rtol=rtol, atol=atol, what=f"{layout} inputs")
        after = [v.detach() for v in views if v is not None]
        for b, a in zip(before, after):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True,
                                       msg=f"{layout}: the op modified an input")
        if inputs:
            new_inputs = _grad_inputs(new)
            assert_same(_grads(got, new_inputs), want_g, rtol=rtol, atol=atol,
                        what=f"{layout} inputs, gradient")
    assert tried, "no input could be made non-contiguous: give larger sample inputs"
