"""Helpers shared by every family's torch ops (kept small and torch-only).

- ``current_stream_handle`` / ``num_threads``: what a core call launches on.
- ``skips_dispatcher``: whether a call may go straight to the core (the fast path).
- ``eager_autograd``: whether a call recording autograd may skip its custom op.
- ``promote_inputs``: array-likes to tensors, promoted as their own library would.

NumPy is optional: it is never imported here. An input can only be a NumPy object if the
caller imported NumPy, so ``sys.modules`` tells whether to look for one.
"""
from __future__ import annotations

import numbers
import sys
from typing import NamedTuple, Optional, Sequence

import torch

from . import _C

_Tensor = torch.Tensor
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream_handle(tensor: torch.Tensor) -> int:
    """The cudaStream_t (as an int) that an op on ``tensor`` must launch on.

    Read at every call, never cached: users switch streams with ``torch.cuda.stream(...)``
    and CUDA-graph capture runs on a side stream. 0 for CPU tensors (ignored there).
    """
    if tensor.is_cuda:  # _raw_stream: the same value, without building a Stream object
        return _stream_of_device(tensor.get_device())
    return 0


def num_threads() -> int:
    """CPU threads for the core's OpenMP loops: follow torch.set_num_threads()."""
    return torch.get_num_threads()


_current_level = getattr(torch._C._functorch, "maybe_current_level", lambda: None)
# Whether one tensor is a functorch wrapper (vmap/grad); for code that must not read data
# under a transform (e.g. ot.py's backward).
_is_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor",
                                lambda t: False)


def _stream_of_device(index: int) -> int:
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


def register_fast_path() -> None:
    """Hands the C++ fast paths (csrc/bindings/fast_path.h) the torch callables with which
    they make skips_dispatcher's decision and allocate: the compiled module links no torch.
    They are held from here on; call again after replacing one (tests poison torch's
    allocator this way)."""
    _C.register_fast_path(_Tensor, torch.is_grad_enabled, _current_level, torch.empty_like,
                          torch.get_num_threads, _stream_of_device)


register_fast_path()


def eager_autograd(*tensors) -> bool:
    """True when a call may bypass its custom op and still record autograd through a plain
    ``torch.autograd.Function`` (same results, one dispatcher round trip less in the forward
    and in the backward): not compiling (checked first: under torch.compile nothing else
    may be traced), no functorch transform active (vmap, grad: their tensors are wrappers),
    each argument exactly torch.Tensor (no fake or subclass tensor, no array-like). The
    custom op stays the path for torch.compile, vmap and subclasses."""
    if torch.compiler.is_compiling() or _current_level() is not None:
        return False
    for t in tensors:
        if type(t) is not _Tensor:
            return False
    return True


def skips_dispatcher(*tensors) -> bool:
    """True when a call on these needs nothing from torch's dispatcher, so a family may call
    its core directly (same results, less per-call overhead): eager_autograd's conditions,
    and no autograd to record."""
    if not eager_autograd(*tensors):
        return False
    if torch.is_grad_enabled():  # (a loop, not any(): this runs on every small call)
        for t in tensors:
            if t.requires_grad:
                return False
    return True


# ------------------------------------------------------------------ input promotion


_COMPUTE = (torch.float32, torch.float64)


class Promoted(NamedTuple):
    tensors: list  # one tensor per input, all of `compute_dtype`, on one device
    result_dtype: torch.dtype  # what the caller returns (float16/bfloat16 kept)
    compute_dtype: torch.dtype  # float32 or float64: what the core computes in
    output: str  # "torch", "numpy" (an ndarray) or "numpy_scalar" (a NumPy float)


def _numpy():
    return sys.modules.get("numpy")


def _is_numpy_array(np, a) -> bool:
    return np is not None and isinstance(a, np.ndarray)


def _is_numpy_scalar(np, a) -> bool:
    return np is not None and isinstance(a, np.generic)


def _check_real(fn: str, name: str, dtype_text: str, kind: str) -> None:
    if kind not in "biuf":
        raise TypeError(f"{fn}: {name}: expected real numbers, got dtype {dtype_text}")


def promote_inputs(fn: str, names: Sequence[str], values: Sequence[object],
                   device: Optional[torch.device] = None) -> Promoted:
    """Tensors for array-like inputs, promoted as their own library would promote them.

    - No torch tensor among the inputs: NumPy's rules. Python numbers, NumPy scalars and
      arrays and lists combine as ``numpy.result_type`` says (NEP 50: a Python float is
      weak against a NumPy float32); integers and booleans compute in float64, as NumPy's
      ufuncs do. The result is an ndarray when an input was one, a NumPy scalar when the
      inputs were NumPy scalars, else a 0-dim torch tensor.
    - With a torch tensor: torch's rules. Python numbers and NumPy scalars are weak
      scalars (a float32 tensor stays float32); NumPy arrays and lists count as tensors of
      their dtype (lists: float64, as NumPy would make them). Integer results compute in
      torch's default dtype, as torch's float ops do.
    float16 / bfloat16 results compute in float32 and are returned in their own dtype.
    A 0-dim CPU tensor (or scalar) joins the other inputs' device, as in torch's own ops.
    """
    first = values[0]
    # (Under torch.compile nothing sparse can reach here, and reading .layout inside an
    # autograd.Function's backward is refused by dynamo's strict mode: skip it there.)
    compiling = torch.compiler.is_compiling()
    if type(first) is _Tensor and first.dtype in _COMPUTE and all(
            type(a) is _Tensor and a.dtype is first.dtype and a.device == first.device
            and (compiling or a.layout is torch.strided)
            for a in values):  # the common case: nothing to convert
        if first.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{fn}: {names[0]}: expected a cpu or cuda tensor, got device "
                             f"{first.device}")
        return Promoted(list(values), first.dtype, first.dtype, "torch")
    np = _numpy()
    tensors: list = [None] * len(values)
    any_torch = any(isinstance(v, _Tensor) for v in values)
    any_array = False
    any_np_scalar = False
    for i, (name, a) in enumerate(zip(names, values)):
        if isinstance(a, _Tensor):
            if a.is_complex() or a.dtype is torch.bool:
                raise TypeError(f"{fn}: {name}: expected a real floating or integer tensor, "
                                f"got dtype {a.dtype}")
            if a.device.type not in ("cpu", "cuda"):
                raise ValueError(f"{fn}: {name}: expected a cpu or cuda tensor, got device "
                                 f"{a.device}")
            if not compiling and a.layout is not torch.strided:
                raise TypeError(f"{fn}: {name}: expected a dense (strided) tensor, got layout "
                                f"{a.layout}")
            if a.dtype.is_floating_point and a.dtype.itemsize == 1:
                raise TypeError(f"{fn}: {name}: expected float16, bfloat16, float32 or float64, "
                                f"got {a.dtype} (convert it first)")
            tensors[i] = a
        elif _is_numpy_array(np, a):
            _check_real(fn, name, str(a.dtype), a.dtype.kind)
            any_array = True
            # torch.from_numpy shares memory; negative strides need a copy first.
            tensors[i] = torch.from_numpy(
                np.ascontiguousarray(a) if any(s < 0 for s in a.strides) else a)
        elif isinstance(a, (list, tuple)):
            any_array = True
            # Read straight into float64 (as NumPy would): via float32 first, 1e300 or 0.1
            # would be rounded before the conversion.
            if any(isinstance(e, complex) for e in _flatten(a)):
                raise TypeError(f"{fn}: {name}: expected real numbers, got a complex number in "
                                f"the {type(a).__name__}")
            try:
                tensors[i] = torch.tensor(a, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"{fn}: {name}: expected a tensor, array or nested list of real "
                                f"numbers, got a {type(a).__name__} that torch cannot read: {e}"
                                ) from None
        elif _is_numpy_scalar(np, a):
            _check_real(fn, name, str(a.dtype), a.dtype.kind)
            any_np_scalar = True
        elif isinstance(a, numbers.Real):
            pass
        else:
            raise TypeError(f"{fn}: {name}: expected a torch.Tensor, numpy array or real number, "
                            f"got {type(a).__name__}")

    if any_torch:
        # torch's rules: scalars are weak, tensors (and arrays/lists turned tensors) are not.
        operands = [t if t is not None else _as_python_scalar(a) for t, a in zip(tensors, values)]
        result = operands[0] if len(operands) == 1 else _torch_result_type(operands)
        if not result.is_floating_point:
            result = torch.get_default_dtype()
        output = "torch"
    else:
        if np is not None and (any_array or any_np_scalar):
            result = _torch_dtype(np.result_type(*[
                t.numpy() if t is not None and not isinstance(a, (list, tuple)) else
                (np.float64(0) if isinstance(a, (list, tuple)) else a)
                for t, a in zip(tensors, values)]))
        else:  # Python numbers (and lists) alone: NumPy would give float64
            result = torch.float64
        if not result.is_floating_point:
            result = torch.float64
        output = "numpy" if any_array and np is not None and any(
            _is_numpy_array(np, a) for a in values) else (
            "numpy_scalar" if any_np_scalar and not any_array else "torch")

    compute = result if result in (torch.float32, torch.float64) else torch.float32
    # One device: the first non-0-dim tensor's, else the first tensor's, else `device`.
    target = device
    for t in tensors:
        if t is not None and t.dim() > 0:
            target = t.device
            break
    else:
        for t in tensors:
            if t is not None:
                target = t.device
                break
    if target is None:
        target = torch.device("cpu")
    out = []
    for name, t, a in zip(names, tensors, values):
        if t is None:
            t = torch.tensor(_as_python_scalar(a), dtype=compute, device=target)
        elif t.device != target:
            if t.dim() == 0 and t.device.type == "cpu":
                t = t.to(target)
            else:
                raise ValueError(f"{fn}: {name}: expected the same device as the other inputs "
                                 f"({target}), got {t.device}")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{fn}: {name}: expected a cpu or cuda tensor, got device "
                             f"{t.device}")
        out.append(t.to(compute))
    return Promoted(out, result, compute, output)


def _flatten(a):
    for e in a:
        if isinstance(e, (list, tuple)):
            yield from _flatten(e)
        else:
            yield e


def _as_python_scalar(a):
    if isinstance(a, (bool, int, float)):
        return a
    item = getattr(a, "item", None)  # NumPy scalars
    return item() if item is not None else float(a)


def _category(dtype: torch.dtype) -> int:
    if dtype is torch.bool:
        return 0
    if dtype.is_complex:
        return 3
    return 2 if dtype.is_floating_point else 1


def _torch_result_type(operands) -> torch.dtype:
    """torch's type promotion of tensors and Python scalars (the rules of
    torch.result_type, which takes only two operands and which torch.compile cannot
    trace): dimensioned tensors decide, unless a 0-dim tensor or a scalar is of a higher
    category (bool < integer < floating < complex); a higher-category scalar gives that
    category's default dtype."""
    dims, zero_dims, scalars = [], [], []
    for op in operands:
        if isinstance(op, _Tensor):
            (dims if op.dim() else zero_dims).append(op.dtype)
        elif isinstance(op, bool):
            scalars.append(torch.bool)
        elif isinstance(op, int):
            scalars.append(torch.int64)
        else:
            scalars.append(torch.get_default_dtype())
    result = None
    for group in (dims, zero_dims, scalars):
        if not group:
            continue
        d = group[0]
        for other in group[1:]:
            d = torch.promote_types(d, other)
        if result is None or _category(d) > _category(result):
            result = d
    return result


def _torch_dtype(np_dtype) -> torch.dtype:
    name = str(np_dtype)
    return getattr(torch, name) if hasattr(torch, name) else torch.float64


def finish_output(out: torch.Tensor, promoted: Promoted):
    """The result in the form promote_inputs decided (dtype, torch/NumPy)."""
    if out.dtype is not promoted.result_dtype:
        out = out.to(promoted.result_dtype)
    if promoted.output == "numpy":
        return out.cpu().numpy()
    if promoted.output == "numpy_scalar":
        return out.cpu().numpy()[()]
    return out
