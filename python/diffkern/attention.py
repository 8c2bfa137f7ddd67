"""Shared-prefix attention: G completions that share one prompt, the prompt encoded once.

Tokens are packed along dim 0, group after group, ``[prefix, suffix_1, ..., suffix_G]``
(:class:`PrefixLayout` describes where). A prefix token attends causally within its
prefix; a suffix token attends to its group's whole prefix and causally within its own
suffix. The output equals plain causal attention over each member's ``[prefix, suffix_i]``
(``layout.expand`` builds that repeated form), with the prefix's outputs computed once and
the prefix's dK/dV summed over the G members inside the kernels (no K/V copies).

Devices and dtypes:
- CPU: float32 and float64, exact (computed in double, the reference of the CUDA kernels);
  float16 and bfloat16 are computed in float32 and returned in their own dtype.
- CUDA: float16 and bfloat16, head dims 64 and 128 (tensor-core kernels, fp32 softmax).
The CPU results are the same bits for every run and thread count; on CUDA
``deterministic=True`` asks for that too (no floating-point atomics in the backward).

The op is ``torch.ops.diffkern.prefix_attention_fwd`` (backward:
``prefix_attention_bwd``), a custom op with a fake implementation: ``torch.compile``
(fullgraph) traces it, and the layout's index tensors are op inputs (no length is a Python
constant of the graph), so a model compiled with ``dynamic=True`` does not recompile when
the lengths, or the numbers of groups and completions, change. (With the default automatic
dynamic shapes the second layout costs one recompile, then none. Dynamo's duck sizing
also guards on sizes that happened to be equal at the first compile: the layout's two
flat index tensors never tie with each other, but one could tie with a size of q, e.g. T
tokens = 7 S + 2; mark_dynamic or a first compile without the tie avoids that recompile.)
No call synchronizes with the host; CUDA graphs can capture it.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import _C
from ._ops import current_stream_handle, eager_autograd, num_threads, skips_dispatcher
from ._prefix_layout import PrefixLayout

__all__ = ["prefix_attention", "PrefixLayout"]

_FN = "diffkern.prefix_attention"
_HALF = (torch.float16, torch.bfloat16)
_CUDA_HEAD_DIMS = (64, 128)
_CUDA_BUILT = bool(_C.build_info()["cuda"])


def _kernel_ready(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels take it: a contiguous last dimension (other strides are free), and
    on CUDA 16-byte aligned data with token/head strides multiples of 8 elements (the
    kernels copy 16-byte vectors). Anything else is copied once."""
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        return x.contiguous()
    if x.is_cuda and (x.data_ptr() % 16 or x.stride(0) % 8 or x.stride(1) % 8):
        return x.clone(memory_format=torch.contiguous_format)
    return x


def _cpu_compute(*xs):
    """CPU kernels compute float32/float64; half inputs go through float32."""
    return [x.float() if x.dtype in _HALF else x for x in xs]


# ------------------------------------------------------------------------------ the ops
def _fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_index: torch.Tensor,
              group_index: torch.Tensor, scale: float,
              deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """out (T, Hq, D) of q's dtype, lse (Hq, T) float32."""
    T, Hq, D = q.shape
    out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(-math.inf) if lse.numel() else lse
    q, k, v = (_kernel_ready(x) for x in (q, k, v))
    dst = out
    if q.device.type == "cpu" and q.dtype in _HALF:
        q, k, v = _cpu_compute(q, k, v)
        dst = torch.empty((T, Hq, D), dtype=torch.float32)
    _C.prefix_attention_forward(q, k, v, dst, lse, segment_index, group_index, float(scale),
                                num_threads(), current_stream_handle(q))
    if dst is not out:
        out.copy_(dst)
    return out, lse


# The op; _fwd_impl itself is the fast path (no autograd to record, nothing to trace).
_fwd = torch.library.custom_op("diffkern::prefix_attention_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _(q, k, v, segment_index, group_index, scale, deterministic):
    T, Hq, D = q.shape
    return q.new_empty((T, Hq, D)), q.new_empty((Hq, T), dtype=torch.float32)


def _bwd_impl(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor, segment_index: torch.Tensor,
              group_index: torch.Tensor, scale: float,
              deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (T, Hq, D), dk, dv (T, Hkv, D), dtype of q."""
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    T, Hq, D = q.shape
    if T == 0 or D == 0:
        return dq, dk, dv
    if Hq == 0:
        return dq, dk.zero_(), dv.zero_()
    xs = [_kernel_ready(x) for x in (dout, q, k, v, out)]
    dst = (dq, dk, dv)
    if q.device.type == "cpu" and q.dtype in _HALF:
        xs = _cpu_compute(*xs)
        dst = tuple(torch.empty(t.shape, dtype=torch.float32) for t in dst)
    if q.is_cuda:
        nbytes = _C.prefix_attention_backward_workspace_bytes(
            T, Hq, k.shape[1], D, str(q.dtype).removeprefix("torch."),
            (segment_index.shape[0] - 2) // 7, group_index.shape[0] // 3, bool(deterministic))
    else:
        nbytes = 0
    ws = torch.empty(nbytes, dtype=torch.uint8, device=q.device)
    _C.prefix_attention_backward(*xs, lse, segment_index, group_index, *dst, ws,
                                 float(scale), bool(deterministic), num_threads(),
                                 current_stream_handle(q))
    if dst[0] is not dq:
        for a, b in zip((dq, dk, dv), dst):
            a.copy_(b)
    return dq, dk, dv


_bwd = torch.library.custom_op("diffkern::prefix_attention_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _(dout, q, k, v, out, lse, segment_index, group_index, scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, segment_index, group_index, scale, deterministic = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.scale, ctx.deterministic = scale, deterministic
    ctx.save_for_backward(q, k, v, out, lse, segment_index, group_index)


def _grads(bwd, ctx, dout):
    """q, k, v gradients (and None for the other inputs) from the saved context, through
    ``bwd``: the backward op, or its implementation on the eager path."""
    if dout is None:  # only lse (no gradient) was used
        return (None,) * 7
    q, k, v, out, lse, segment_index, group_index = ctx.saved_tensors
    dq, dk, dv = bwd(dout, q, k, v, out, lse, segment_index, group_index, ctx.scale,
                     ctx.deterministic)
    return dq, dk, dv, None, None, None, None


def _backward(ctx, dout, dlse):
    return _grads(_bwd, ctx, dout)


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerPrefixAttention(torch.autograd.Function):
    """The op's autograd in eager mode without the dispatcher (eager_autograd): the same
    kernels, context and gradients as _fwd's registered autograd. On the GPU the host time
    from the forward's launch to the backward's is what a small shape's step waits for
    (the forward kernel of (P, S, G) = (1024, 512, 8) takes 0.25 ms on an H200); this path,
    and no zero-filled lse gradient, took 0.09 ms off its forward+backward
    (bench/NOTES-attention.md)."""

    @staticmethod
    def forward(ctx, q, k, v, segment_index, group_index, scale, deterministic):
        ctx.set_materialize_grads(False)  # no zero-filled lse gradient (it is never read)
        out, lse = _fwd_impl(q, k, v, segment_index, group_index, scale, deterministic)
        _setup_context(ctx, (q, k, v, segment_index, group_index, scale, deterministic),
                       (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        # With create_graph the backward op records itself, as on the op's path: its
        # gradients then require grad, and differentiating them raises (no formula).
        return _grads(_bwd if torch.is_grad_enabled() else _bwd_impl, ctx, dout)


# ---------------------------------------------------------------------------- public
def _check(q, k, v, layout, scale):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{_FN}: {name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            what = "(T, heads_q, head_dim)" if name == "q" else "(T, heads_kv, head_dim)"
            raise ValueError(f"{_FN}: {name}: expected shape {what}, got {tuple(x.shape)}")
    if not isinstance(layout, PrefixLayout):
        raise TypeError(f"{_FN}: layout: expected a diffkern.PrefixLayout (build one with "
                        f"PrefixLayout.from_lengths), got {type(layout).__name__}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{_FN}: q: expected float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{_FN}: {name}: expected dtype {q.dtype} (the dtype of q), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{_FN}: {name}: expected device {q.device} (the device of q), "
                             f"got {x.device}")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{_FN}: q: expected a cpu or cuda tensor, got device {q.device}")
    if layout.device != q.device:
        raise ValueError(f"{_FN}: layout: expected its index tensors on {q.device} (the device "
                         f"of q), got {layout.device} (use layout.to(q.device), once)")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{_FN}: v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    T, Hq, D = q.shape
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"{_FN}: k: expected shape ({T}, heads_kv, {D}) (tokens and head dim "
                         f"of q), got {tuple(k.shape)}")
    Hkv = k.shape[1]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"{_FN}: k: expected heads_kv >= 1 dividing heads_q = {Hq} (GQA/MQA), "
                         f"got heads_kv = {Hkv}")
    if D < 1:
        raise ValueError(f"{_FN}: q: expected head_dim >= 1, got shape {tuple(q.shape)}")
    # (Skipped while compiling: reading the layout's Python ints would guard on them and
    # recompile for every new layout; the fake implementation needs nothing from them.)
    if not torch.compiler.is_compiling() and T != layout.total_tokens:
        raise ValueError(f"{_FN}: q: expected {layout.total_tokens} tokens (the layout's total), "
                         f"got shape {tuple(q.shape)}")
    if q.is_cuda:
        if not _CUDA_BUILT:
            raise RuntimeError(f"{_FN}: q is on {q.device}, but this diffkern build has no CUDA "
                               f"kernels (rebuild with nvcc available)")
        if q.dtype not in _HALF:
            raise TypeError(f"{_FN}: q: on CUDA expected float16 or bfloat16, got {q.dtype} "
                            f"(float32/float64 run on the CPU kernel: move the tensors to the CPU)")
        if D not in _CUDA_HEAD_DIMS:
            raise ValueError(f"{_FN}: q: on CUDA expected head_dim in {_CUDA_HEAD_DIMS}, got {D}")
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{_FN}: scale: expected a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{_FN}: scale: expected a finite number, got {scale}")
    return scale


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PrefixLayout, *,
                     scale: Optional[float] = None, return_lse: bool = False,
                     deterministic: bool = False):
    """Causal attention over a packed shared-prefix batch.

    out[t] = softmax(scale * q[t] . k[keys(t)]) v[keys(t)], where keys(t) is the group's
    whole prefix plus the tokens of t's own segment up to t (a prefix token: its prefix up
    to t). Equal, up to rounding, to causal attention over each member's
    ``[prefix, suffix_i]``.

    Args:
        q: (T, Hq, D); k, v: (T, Hkv, D), Hkv dividing Hq (GQA/MQA: query head h reads KV
            head h // (Hq // Hkv)). One dtype and device; token and head strides are free
            (e.g. slices of a fused qkv projection), a non-contiguous last dimension (and on
            CUDA, data not 16-byte aligned or strides not multiples of 8) is copied once.
        layout: a :class:`PrefixLayout` on q's device with T tokens.
        scale: multiplies q . k (default 1/sqrt(D)).
        return_lse: also return lse (Hq, T) float32, the natural-log log-sum-exp of each
            query row's scaled scores (no gradient flows through it).
        deterministic: the same bits every run (CUDA backward without floating-point
            atomics; the CPU kernels always are).

    Returns:
        out (T, Hq, D) of q's dtype, or (out, lse) with ``return_lse``.

    Raises:
        TypeError / ValueError naming the argument: dtypes that differ or are not floating,
        shapes that do not fit, Hq not a multiple of Hkv, T not the layout's token count,
        tensors (or the layout) on different devices, CUDA with float32/float64 or a head
        dim other than 64 or 128.
    """
    scale = _check(q, k, v, layout, scale)
    args = (q, k, v, layout.segment_index, layout.group_index, scale, bool(deterministic))
    if skips_dispatcher(q, k, v):
        out, lse = _fwd_impl(*args)
    elif eager_autograd(q, k, v):
        out, lse = _EagerPrefixAttention.apply(*args)
    else:
        out, lse = _fwd(*args)
    return (out, lse) if return_lse else out
