"""Logarithms of the modified Bessel functions, to machine precision, with gradients.

All functions are elementwise over ``v`` (the order) and ``x`` (the argument), broadcast
like NumPy. They accept torch tensors (CPU or CUDA), NumPy arrays (the result is then a
NumPy array) and Python numbers. float64 and float32 are computed natively; float16 and
bfloat16 are computed in float32 and returned in their own dtype; integer inputs are
promoted to torch's default float dtype.

Domain (following SciPy's conventions for the non-log functions):

* ``log_iv``/``log_ive``/``bessel_iv_ratio``: any real ``v >= 0``, and negative integer
  ``v = -n`` through ``I_{-n} = I_n``: the logs and their x-derivatives equal those at
  ``n``, ``bessel_iv_ratio(-n, x) = I_{1-n}/I_{-n} = I_{n-1}(x)/I_n(x)`` (``+inf`` at
  ``x = 0``), and the v-derivative is that of the analytic ``log I_v`` at ``-n``,
  ``-d/dv log I_n - 2 (-1)^n K_n/I_n``. Every other negative ``v`` (and ``v = -inf``)
  gives NaN in every I op and its derivatives: ``I_v`` changes sign for some of those
  orders, and its log is not computed there (not even for ``-1 < v < 0``, where it is
  real).
* ``log_kv``/``log_kve``: any real ``v`` (``K_{-v} = K_v``).
* ``x >= 0``; at ``x = 0`` the exact limits: ``log I_0(0) = 0``, ``log I_v(0) = -inf``
  for ``v > 0``, ``log K_v(0) = +inf``. ``x < 0`` or a NaN input gives NaN.
* ``x = inf``: ``log I_v = +inf``, ``log K_v = -inf``, both scaled logs ``-inf``, the
  ratio 1. ``v = +-inf`` together with ``x = inf`` gives NaN in every op (the limit
  depends on how the two grow; SciPy's ``iv``, ``kv`` give NaN there too).

The results are finite wherever the true logarithm is finite: nothing overflows or
underflows, for orders and arguments from the smallest subnormal to the largest double
(no intermediate squares ``v`` or ``x`` or forms ``v x``).

Gradients: in ``x`` for every function, to any order. The first and second
x-derivatives of the logs and of ``bessel_iv_ratio`` are computed from each branch's own
sums (within ~1e-11 relative of mpmath from ``x = 1e-300`` to ``1e10``, with the exact
limits at ``x = 0``, e.g. ``d/dx bessel_iv_ratio(v, 0) = 1/(2(v+1))``,
``d2/dx2 bessel_iv_ratio(v, 0) = 0``); third and higher orders follow from the Bessel
differential equation, which cancels for small and large ``x`` (e.g. the third
x-derivative of ``bessel_iv_ratio`` loses ~2 log10(1/x) digits for small ``x``, all of them
below ``x ~ 1e-7``, and ~log10(x) digits for large ``x``). In ``v``: first order for
``log_iv``, ``log_ive``, ``log_kv``, ``log_kve``. The derivative in ``v`` of ``bessel_iv_ratio`` and second
derivatives involving ``v`` are not implemented: they raise ``NotImplementedError`` when
the backward pass would use them (``v`` requiring grad alone is fine: with
``torch.autograd.grad(out, x)`` only the x-gradient is computed).
"""
from __future__ import annotations

from typing import Union

import torch

from . import _C
from ._ops import (current_stream_handle, finish_output, num_threads, promote_inputs,
                   skips_dispatcher)

__all__ = ["log_iv", "log_kv", "log_ive", "log_kve", "bessel_iv_ratio"]

_OPS: dict = dict(_C.LOG_BESSEL_OPS)
# torch.Tensor, numpy.ndarray (NumPy is optional), a nested list, or a real number.
ArrayLike = Union[torch.Tensor, "numpy.ndarray", list, float, int]
_Tensor = torch.Tensor


# --------------------------------------------------------------------------- the op


@torch.library.custom_op("diffkern::log_bessel", mutates_args=())
def _log_bessel(v: torch.Tensor, x: torch.Tensor, op: int) -> torch.Tensor:
    """One elementwise log-Bessel quantity (``op`` indexes ``_C.LOG_BESSEL_OPS``)."""
    out = torch.empty(torch.broadcast_shapes(v.shape, x.shape), dtype=v.dtype, device=v.device)
    if out.numel():
        _C.log_bessel(op, v.detach(), x.detach(), out, num_threads(), current_stream_handle(out))
    return out


@_log_bessel.register_fake
def _(v, x, op):
    return v.new_empty(torch.broadcast_shapes(v.shape, x.shape))


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Undo broadcasting: sum ``grad`` down to ``shape``."""
    if grad.shape == shape:
        return grad
    return grad.sum_to_size(shape) if len(shape) else grad.sum()


def _setup_context(ctx, inputs, output):
    v, x, op = inputs
    ctx.op = op
    ctx.save_for_backward(v, x, output)


_OP_NAMES = {i: name for name, i in _OPS.items()}

# What each internal op is, in the public API's terms (for error messages).
_PUBLIC = {
    "log_iv": "log_iv", "log_kv": "log_kv", "log_ive": "log_ive", "log_kve": "log_kve",
    "iv_ratio": "bessel_iv_ratio",
    "dlog_iv_dx": "the x-derivative of log_iv/log_ive",
    "dlog_kv_dx": "the x-derivative of log_kv/log_kve",
    "dlog_iv_dv": "the v-derivative of log_iv/log_ive",
    "dlog_kv_dv": "the v-derivative of log_kv/log_kve",
    "iv_ratio_dx": "the x-derivative of bessel_iv_ratio",
    "d2log_iv_dx2": "the second x-derivative of log_iv/log_ive",
    "d2log_kv_dx2": "the second x-derivative of log_kv/log_kve",
    "iv_ratio_dx2": "the second x-derivative of bessel_iv_ratio",
}

# d/dx of each op, as another op (each computed from its branch's own sums: the forms
# that follow from the Bessel equation, e.g. R' = 1 - (2v+1) R/x - R^2 for the ratio,
# cancel for small and large x), plus the constant the scaled forms add. The second
# x-derivatives of the logs and the first two of the ratio are ops of their own; the
# derivatives of those (third order and up) follow from the Bessel equation.
_DX_OP = {
    "log_iv": ("dlog_iv_dx", 0.0), "log_ive": ("dlog_iv_dx", -1.0),
    "log_kv": ("dlog_kv_dx", 0.0), "log_kve": ("dlog_kv_dx", 1.0),
    "iv_ratio": ("iv_ratio_dx", 0.0), "iv_ratio_dx": ("iv_ratio_dx2", 0.0),
    "dlog_iv_dx": ("d2log_iv_dx2", 0.0), "dlog_kv_dx": ("d2log_kv_dx2", 0.0),
}
_BESSEL_EQUATION_DX = ("iv_ratio_dx2", "d2log_iv_dx2", "d2log_kv_dx2")
_DV_OP = {"log_iv": "dlog_iv_dv", "log_ive": "dlog_iv_dv",
          "log_kv": "dlog_kv_dv", "log_kve": "dlog_kv_dv"}


def _dlog_dx(v: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    return _log_bessel(v, x, _OPS["dlog_iv_dx" if kind == "i" else "dlog_kv_dx"])


def _third_order(name: str, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d/dx of the ops in _BESSEL_EQUATION_DX (third derivatives), by differentiating the
    Bessel equation; each factor is again an op, so any order follows."""
    if name == "iv_ratio_dx2":
        # R' = 1 - (2v+1) R/x - R^2, differentiated twice:
        # R''' = -(2v+1) (R''/x - 2 (R' - R/x)/x^2) - 2 (R'^2 + R R'')
        r = _log_bessel(v, x, _OPS["iv_ratio"])
        dr = _log_bessel(v, x, _OPS["iv_ratio_dx"])
        ddr = _log_bessel(v, x, _OPS["iv_ratio_dx2"])
        return -(2 * v + 1) * (ddr - 2 * (dr - r / x) / x) / x - 2 * (dr * dr + r * ddr)
    # D' = 1 + v^2/x^2 - D/x - D^2  =>  D'' = -2 v^2/x^3 + (D/x - D')/x - 2 D D'
    first = "dlog_iv_dx" if name == "d2log_iv_dx2" else "dlog_kv_dx"
    d = _log_bessel(v, x, _OPS[first])
    dd = _log_bessel(v, x, _OPS[name])
    return -2 * (v / x) ** 2 / x + (d / x - dd) / x - 2 * d * dd


def _grad_used(ctx, i: int) -> bool:
    """Whether this backward pass will use the gradient of input ``i``.

    ``ctx.needs_input_grad[i]`` only says that the input requires grad: with ``v`` and
    ``x`` both requiring grad, ``torch.autograd.grad(out, x)`` still sets it for ``v``,
    though the engine then drops that gradient without running anything behind it. The
    engine knows which nodes it will run; ask it about the node the gradient goes to.
    Where it cannot be asked (outside an eager backward pass, e.g. while torch.compile
    traces the backward), assume the gradient is used.
    """
    if not ctx.needs_input_grad[i]:
        return False
    try:
        node = ctx.next_functions[i][0]
        return node is None or bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, IndexError, RuntimeError):
        return True


def _not_implemented(name: str, what: str, arg: str) -> NotImplementedError:
    return NotImplementedError(
        f"diffkern.{_PUBLIC[name]}: {what} is not implemented, and the gradient of {arg} "
        f"was asked for ({arg} requires grad). Pass {arg}.detach() if its gradient is not "
        f"needed, or ask for the others only (torch.autograd.grad(out, inputs)). "
        "Available: all x-derivatives, and first derivatives in v of "
        "log_iv/log_kv/log_ive/log_kve.")


def _backward(ctx, grad):
    v, x, out = ctx.saved_tensors
    name = _OP_NAMES[ctx.op]
    use_v, use_x = _grad_used(ctx, 0), _grad_used(ctx, 1)
    grad_v = grad_x = None
    if use_x:
        if name in _DX_OP:
            dx_name, shift = _DX_OP[name]
            d = _log_bessel(v, x, _OPS[dx_name])
            grad_x = grad * (d + shift if shift else d)
        elif name in _BESSEL_EQUATION_DX:
            grad_x = grad * _third_order(name, v, x)
        else:  # d/dv ops
            raise _not_implemented(name, "its derivative in x (a mixed second derivative "
                                   "in v and x)", "x")
    if use_v:
        if name in _DV_OP:
            grad_v = grad * _log_bessel(v, x, _OPS[_DV_OP[name]])
        elif name == "iv_ratio":
            raise _not_implemented(name, "the derivative in the order v", "v")
        else:
            raise _not_implemented(name, "its derivative in the order v (a second "
                                   "derivative involving v)", "v")
    if grad_v is not None:
        grad_v = _sum_to(grad_v, v.shape)
    if grad_x is not None:
        grad_x = _sum_to(grad_x, x.shape)
    return grad_v, grad_x, None


_log_bessel.register_autograd(_backward, setup_context=_setup_context)


def _vmap(info, in_dims, v, x, op):
    """torch.func.vmap: move each batch dimension to the front, pad the logical shapes so
    they broadcast as before, and run the op once on the whole batch."""
    v_bdim, x_bdim, _ = in_dims
    v_logical = v.dim() - (v_bdim is not None)
    x_logical = x.dim() - (x_bdim is not None)
    ndim = max(v_logical, x_logical)

    def batch_first(t, bdim, logical):
        if bdim is None:
            return t  # broadcasts against the batched one from the right
        t = t.movedim(bdim, 0)
        return t.reshape(t.shape[:1] + (1,) * (ndim - logical) + t.shape[1:])

    return _log_bessel(batch_first(v, v_bdim, v_logical), batch_first(x, x_bdim, x_logical),
                       op), 0


_log_bessel.register_vmap(_vmap)


# ------------------------------------------------------------------ input handling

# The core handles up to this many (broadcast) dimensions; more are flattened first.
_MAX_DIMS = 8
_f32, _f64 = torch.float32, torch.float64
_NATIVE = (_f32, _f64)
_strided = torch.strided
_SCALARS = (float, int)
_empty_like = torch.empty_like
_is_compiling = torch.compiler.is_compiling
_fast = _C.log_bessel_fast
_OP_LOG_IV, _OP_LOG_IVE, _OP_LOG_KV, _OP_LOG_KVE, _OP_IV_RATIO = (
    _OPS[k] for k in ("log_iv", "log_ive", "log_kv", "log_kve", "iv_ratio"))
_contiguous = torch.contiguous_format


def _apply(public: str, op: str, v: ArrayLike, x: ArrayLike):
    """``public``'s value: the core called directly when nothing needs the dispatcher
    (bit-identical results, a fraction of the per-call cost), else the registered op.
    The public functions try the C++ fast path (plain same-shape tensors) first; this one
    covers broadcasting tensors, then everything else."""
    # A Python number beside a float32/float64 tensor is a weak scalar (torch's rule): it
    # takes the tensor's dtype, and the call stays on the fast path (e.g. vMF's order).
    # (torch.tensor, not torch.full: a float beyond float32's range rounds to inf as in
    # torch's own arithmetic instead of raising.)
    if type(x) is _Tensor and type(v) in _SCALARS and x.dtype in _NATIVE and (
            x.is_cpu or x.is_cuda):
        v = torch.tensor(v, dtype=x.dtype, device=x.device)
    elif type(v) is _Tensor and type(x) in _SCALARS and v.dtype in _NATIVE and (
            v.is_cpu or v.is_cuda):
        x = torch.tensor(x, dtype=v.dtype, device=v.device)
    if type(v) is _Tensor and type(x) is _Tensor:
        dtype = v.dtype
        # (skips_dispatcher first: under torch.compile .layout must not be read.)
        if (dtype is x.dtype and (dtype is _f64 or dtype is _f32) and skips_dispatcher(v, x)
                and v.layout is _strided and x.layout is _strided):
            if v.shape == x.shape:
                out = _empty_like(v) if v.is_contiguous() else \
                    _empty_like(v, memory_format=_contiguous)
            else:
                out = _broadcast_output(v, x)
            if out is not None:
                try:
                    if out.numel():
                        _C.log_bessel(_OPS[op], v, x, out, num_threads(),
                                      current_stream_handle(v))
                    return out
                except (TypeError, ValueError):
                    pass  # the general path below gives the error in the user's terms
    return _apply_general(public, op, v, x)


def _broadcast_output(v: torch.Tensor, x: torch.Tensor):
    """The contiguous output for v, x of different shapes; None when the general path must
    handle them (no broadcast, too many dimensions, different devices)."""
    if v.device != x.device:
        return None
    if v.dim() == 0 or x.dim() == 0:  # a scalar beside a tensor: the tensor's shape
        return _empty_like(x if v.dim() == 0 else v, memory_format=_contiguous)
    try:
        shape = torch.broadcast_shapes(v.shape, x.shape)
    except RuntimeError:
        return None
    if len(shape) > _MAX_DIMS:
        return None
    return torch.empty(shape, dtype=v.dtype, device=v.device)


def _apply_general(public: str, op: str, v: ArrayLike, x: ArrayLike):
    fn = f"diffkern.{public}"
    p = promote_inputs(fn, ("v", "x"), (v, x))
    vt, xt = p.tensors
    try:
        shape = torch.broadcast_shapes(vt.shape, xt.shape)
    except RuntimeError:
        raise ValueError(f"{fn}: v and x cannot be broadcast together: v has shape "
                         f"{tuple(vt.shape)}, x has shape {tuple(xt.shape)}") from None
    if len(shape) > _MAX_DIMS:
        # NumPy broadcasting has no such limit: compute on the flattened broadcast.
        vt, xt = (t.expand(shape).reshape(-1) for t in (vt, xt))
        out = _log_bessel(vt, xt, _OPS[op]).reshape(shape)
    else:
        out = _log_bessel(vt, xt, _OPS[op])
    return finish_output(out, p)


# ------------------------------------------------------------------- public functions


def log_iv(v: ArrayLike, x: ArrayLike):
    r"""Logarithm of the modified Bessel function of the first kind, :math:`\log I_v(x)`.

    Args:
        v: order, ``v >= 0`` (or a negative integer). Any shape broadcastable with ``x``.
        x: argument, ``x >= 0``.

    Returns:
        Tensor (or ndarray) of the broadcast shape and the promoted float dtype.

    Differentiable in ``x`` (to any order) and in ``v`` (first order):
    :math:`\partial_x \log I_v = I_{v+1}/I_v + v/x`.
    """
    if not _is_compiling() and (out := _fast(_OP_LOG_IV, v, x)) is not None:
        return out  # the C++ fast path (see _apply)
    return _apply("log_iv", "log_iv", v, x)


def log_ive(v: ArrayLike, x: ArrayLike):
    r"""Exponentially scaled :math:`\log I_v(x) - x`, computed without subtracting.

    Same arguments and gradients as :func:`log_iv`; stays accurate for huge ``x``
    (e.g. ``log_ive(0, 1e10) = -12.43...``) where ``log_iv(v, x) - x`` would not.
    """
    if not _is_compiling() and (out := _fast(_OP_LOG_IVE, v, x)) is not None:
        return out  # the C++ fast path (see _apply)
    return _apply("log_ive", "log_ive", v, x)


def log_kv(v: ArrayLike, x: ArrayLike):
    r"""Logarithm of the modified Bessel function of the second kind, :math:`\log K_v(x)`.

    Args:
        v: order, any real (``K_{-v} = K_v``). Any shape broadcastable with ``x``.
        x: argument, ``x >= 0``.

    Differentiable in ``x`` (to any order) and in ``v`` (first order).
    """
    if not _is_compiling() and (out := _fast(_OP_LOG_KV, v, x)) is not None:
        return out  # the C++ fast path (see _apply)
    return _apply("log_kv", "log_kv", v, x)


def log_kve(v: ArrayLike, x: ArrayLike):
    r"""Exponentially scaled :math:`\log K_v(x) + x`, computed without adding.

    Same arguments and gradients as :func:`log_kv`.
    """
    if not _is_compiling() and (out := _fast(_OP_LOG_KVE, v, x)) is not None:
        return out  # the C++ fast path (see _apply)
    return _apply("log_kve", "log_kve", v, x)


def bessel_iv_ratio(v: ArrayLike, x: ArrayLike):
    r"""The ratio :math:`I_{v+1}(x) / I_v(x)`, in [0, 1), computed without forming either.

    This is the mean resultant length of the von Mises-Fisher distribution
    (``v = p/2 - 1``, ``x`` = concentration). Differentiable in ``x`` to any order
    (:math:`R' = 1 - (2v+1)R/x - R^2`); not in ``v``.
    """
    if not _is_compiling() and (out := _fast(_OP_IV_RATIO, v, x)) is not None:
        return out  # the C++ fast path (see _apply)
    return _apply("bessel_iv_ratio", "iv_ratio", v, x)
