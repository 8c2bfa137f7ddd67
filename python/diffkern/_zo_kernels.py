"""Private wrappers of the fused finite-difference kernels (csrc/fd_grad/), for dk.zo.

Plain functions, not custom ops: they change parameters in place (under ``torch.no_grad``)
or return a new tensor, launch on the current CUDA stream of the parameters' device and use
``torch.get_num_threads()`` CPU threads.

Directions. ``z(seed, k, t, i)`` is the value of element ``i`` (flat, row-major) of the tensor
with id ``t`` in direction ``k``: a pure function of those four numbers (exact definition in
csrc/fd_grad/directions.cuh), so it does not depend on the order of the list, on which other
tensors are in it, on chunking or on the device. A tensor's id is its index in ``params``
unless ``tensor_ids`` gives them (pass the global ids when working on part of a list).

Distributions: ``"gaussian"`` (N(0, 1) by a tabulated inverse CDF), ``"rademacher"`` (+-1) and
``"sphere"``: the Gaussian direction of the whole list divided by its norm (unit norm over
all tensors of the call; the norm comes from :func:`sum_sq` and stays on the device).

Storage: float32, float16, bfloat16 parameters (any mix), contiguous, on one device; the
math is float32 and each result is rounded once to the storage dtype.
"""
from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from typing import NamedTuple, Optional, Sequence

import torch

from . import _C
from ._ops import current_stream_handle, num_threads

_MODULE = "diffkern._zo_kernels"
_DIST_CODES = dict(_C.FD_DISTRIBUTIONS)
DISTRIBUTIONS = ("gaussian", "rademacher", "sphere")
_DTYPE_CODES = {torch.float32: _C.FD_DTYPE_CODES["float32"],
                torch.float16: _C.FD_DTYPE_CODES["float16"],
                torch.bfloat16: _C.FD_DTYPE_CODES["bfloat16"]}
MAX_UPDATE_TERMS = _C.FD_MAX_UPDATE_TERMS
_PARTIALS = _C.FD_SUM_SQ_PARTIALS
_U32 = 1 << 32
_U64 = 1 << 64

# Descriptor arrays by (device, rows): built once per list and reused, so a call after the
# first copies nothing to the GPU (and can be captured in a CUDA graph). Bounded: an
# evicted array is freed on its stream like any tensor.
# dk.zo's module hooks make one list per module (its perturbed copies, which the caching
# allocator hands the same addresses step after step): the cache holds a model's worth.
_DESC_CACHE: "OrderedDict[tuple, _RowList]" = OrderedDict()
_DESC_CACHE_SIZE = 4096
# CUDA lists of at most this many tensors stay in host memory and go to the kernel by value
# in its launch parameters (no device array, no copy): a module's handful of tensors.
# Longer lists are copied to the device once and cached. (Tests set it to 0 to compare.)
_INLINE_ROWS = _C.FD_INLINE_ROWS
# Elements per generator call (a group: directions.cuh); descriptors count groups.
_GROUP = _C.FD_GROUP_ELEMS


class _RowList(NamedTuple):
    """A launch's tensor list: ``desc`` the (rows, 5) int64 descriptor array, ``total`` the
    number of groups, ``sources`` the source pointers (``perturb_into``) or None, and
    ``cuda_device`` >= 0 when ``desc`` and ``sources`` are host arrays for a kernel on that
    GPU (rows by value), else -1 (the arrays are on the parameters' device)."""
    desc: torch.Tensor
    total: int
    sources: Optional[torch.Tensor]
    cuda_device: int


def _err(fn: str, what: str) -> str:
    return f"{_MODULE}.{fn}: {what}"


def _check_int(fn: str, name: str, value, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(_err(fn, f"{name}: expected an int, got {type(value).__name__}"))
    if not 0 <= value < limit:
        raise ValueError(_err(fn, f"{name}: expected 0 <= {name} < 2**{limit.bit_length() - 1}, "
                                  f"got {value}"))
    return value


def check_int_option(fname: str, name: str, value, minimum: int, kind: str = "an int",
                     least: str = "") -> int:
    """An optional int argument of a dk.zo entry point (batch sizes, byte budgets): a plain
    int (not a bool) >= minimum; the errors name the function and the argument. ``kind``
    says what the int is ("an int (bytes)"), ``least`` how to say the minimum (default
    ">= minimum")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fname}: {name} must be {kind}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{fname}: {name} must be {least or f'>= {minimum}'}, got {value}")
    return int(value)


def _check_float(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(_err(fn, f"{name}: expected a float, got {type(value).__name__}"))
    if not math.isfinite(value):
        raise ValueError(_err(fn, f"{name}: expected a finite number, got {value}"))
    return float(value)


def _check_distribution(fn: str, distribution) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(_err(fn, f"distribution: expected one of {DISTRIBUTIONS}, "
                                  f"got {distribution!r}"))
    return distribution


def _check_params(fn: str, params) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        raise TypeError(_err(fn, "params: expected a list of tensors, got one tensor "
                                 "(wrap it in a list)"))
    try:
        params = list(params)
    except TypeError:
        raise TypeError(_err(fn, f"params: expected a list of tensors, got "
                                 f"{type(params).__name__}")) from None
    if not params:
        raise ValueError(_err(fn, "params: expected a non-empty list of tensors, got an empty one"))
    device = None
    for n, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(_err(fn, f"params[{n}]: expected a tensor, got {type(p).__name__}"))
        if p.dtype not in _DTYPE_CODES:
            raise TypeError(_err(fn, f"params[{n}]: expected dtype float32, float16 or bfloat16, "
                                     f"got {p.dtype}"))
        if p.device.type not in ("cpu", "cuda"):
            raise ValueError(_err(fn, f"params[{n}]: expected a cpu or cuda tensor, got {p.device}"))
        if device is None:
            device = p.device
        elif p.device != device:
            raise ValueError(_err(fn, f"params[{n}]: expected device {device} (the device of "
                                      f"params[0]), got {p.device}: all parameters must be on one "
                                      f"device"))
        if not p.is_contiguous():
            raise ValueError(_err(fn, f"params[{n}]: expected a contiguous tensor, got shape "
                                      f"{tuple(p.shape)} with strides {p.stride()}: the kernels "
                                      f"address each tensor as one flat array"))
    return params


def _check_ids(fn: str, tensor_ids, count: int) -> list[int]:
    if tensor_ids is None:
        if count > _U32:
            raise ValueError(_err(fn, "params: more than 2**32 tensors"))
        return list(range(count))
    ids = list(tensor_ids)
    if len(ids) != count:
        raise ValueError(_err(fn, f"tensor_ids: expected {count} ids (one per parameter), "
                                  f"got {len(ids)}"))
    return [_check_int(fn, f"tensor_ids[{n}]", t, _U32) for n, t in enumerate(ids)]


def _descriptors(params: list[torch.Tensor], ids: list[int],
                 sources: Optional[list[torch.Tensor]] = None) -> _RowList:
    """The descriptor rows of ``params`` (and, with ``sources``, their data pointers), packed
    into one int64 array: in host memory for a short CUDA list (passed by value), else on the
    parameters' device (one copy on a cache miss)."""
    rows, first = [], 0
    for p, t in zip(params, ids):
        n = p.numel()
        rows.append((p.data_ptr(), n, _DTYPE_CODES[p.dtype], t, first))
        first += (n + _GROUP - 1) // _GROUP
    device = params[0].device
    by_value = device.type == "cuda" and len(rows) <= _INLINE_ROWS
    src = () if sources is None else tuple(s.data_ptr() for s in sources)
    key = (device, by_value, tuple(rows), src)
    hit = _DESC_CACHE.get(key)
    if hit is not None:
        _DESC_CACHE.move_to_end(key)
        return hit
    flat = [v for row in rows for v in row] + list(src)
    packed = torch.tensor(flat, dtype=torch.int64)
    if device.type == "cuda" and not by_value:
        # Stream-ordered on the current stream. (A pinned, non-blocking copy was tried for
        # dk.zo's per-module lists and measured no better on the H200: bench/NOTES-zo.md.)
        packed = packed.to(device)
    cols = _C.FD_DESCRIPTOR_COLUMNS
    desc = packed[:len(rows) * cols].view(len(rows), cols)
    cuda_device = (device.index if device.index is not None else torch.cuda.current_device()) \
        if by_value else -1
    entry = _RowList(desc, first, packed[len(rows) * cols:] if sources is not None else None,
                     cuda_device)
    _DESC_CACHE[key] = entry
    if len(_DESC_CACHE) > _DESC_CACHE_SIZE:
        _DESC_CACHE.popitem(last=False)
    return entry


# Lists already checked, by signature: a training loop calls perturb_/update_ on the same
# few hundred tensors every step, and the full checks cost ~2.5 us a tensor (~1 ms for an
# OPT-1.3B, where the GPU then waits). The signature (data pointer, dtype, size,
# contiguity, device of every tensor, and the ids) decides everything the checks and the
# descriptors depend on, so a list with a known signature skips both.
_LIST_CACHE: "OrderedDict[tuple, _RowList]" = OrderedDict()
_LIST_CACHE_SIZE = 256


def _list_signature(params, tensor_ids):
    """The cache key of a list (None when it cannot be cached or is not a list of tensors:
    the full checks then run and raise what they raise)."""
    if not isinstance(params, (list, tuple)) or not params:
        return None
    if tensor_ids is not None:
        ids = tuple(tensor_ids) if isinstance(tensor_ids, (list, tuple)) else None
        if ids is None or not all(type(t) is int for t in ids):
            return None
    else:
        ids = None
    try:
        sig = tuple((p.data_ptr(), p.dtype, p.numel(), p.is_contiguous(), p.device)
                    for p in params if type(p) is torch.Tensor or isinstance(p, torch.Tensor))
    except RuntimeError:  # e.g. a tensor without storage
        return None
    # _INLINE_ROWS too: the tests switch it to compare the by-value and device-row paths.
    return (sig, ids, _INLINE_ROWS) if len(sig) == len(params) else None


def _checked_rows(fn: str, params, tensor_ids) -> tuple[list[torch.Tensor], _RowList]:
    """(params as a list, their descriptors), checked in full unless the same signature was
    checked before (_LIST_CACHE)."""
    key = _list_signature(params, tensor_ids)
    if key is not None:
        hit = _LIST_CACHE.get(key)
        if hit is not None:
            _LIST_CACHE.move_to_end(key)
            return list(params), hit
    params = _check_params(fn, params)
    rows = _descriptors(params, _check_ids(fn, tensor_ids, len(params)))
    if key is not None:
        _LIST_CACHE[key] = rows
        if len(_LIST_CACHE) > _LIST_CACHE_SIZE:
            _LIST_CACHE.popitem(last=False)
    return params, rows


_increment_version = getattr(torch.autograd.graph, "increment_version", None)


def _bump_versions(params: list[torch.Tensor]) -> None:
    # The kernels wrote through raw pointers: bump the version counters as torch's own
    # in-place ops do, so autograd refuses to use a saved copy of a parameter made stale.
    # (One call for the list where torch takes an iterable: ~1 us a tensor saved.)
    if _increment_version is None:
        return
    try:
        _increment_version(params)
    except (TypeError, AttributeError, RuntimeError):  # an older torch: one at a time
        for p in params:
            _increment_version(p)


def _launch_args(params: list[torch.Tensor]) -> tuple[int, int]:
    return num_threads(), current_stream_handle(params[0])


def _sum_sq_buffer(rows: _RowList, seed, k, code, threads, stream, device) -> torch.Tensor:
    out = torch.empty(_PARTIALS + 1, dtype=torch.float64, device=device)
    _C.fd_sum_sq(rows.desc, rows.total, seed, k, code, out, threads, stream, rows.cuda_device)
    return out


def perturb_(params: Sequence[torch.Tensor], seed: int, k: int, scale: float,
             distribution: str = "gaussian", *,
             tensor_ids: Optional[Sequence[int]] = None) -> None:
    """``p_t[i] += scale * z(seed, k, t, i)`` for every parameter, in place, one launch.

    ``seed``: 0 <= seed < 2**64; ``k``: direction index, 0 <= k < 2**32. With
    ``distribution="sphere"`` z has unit norm over the whole list (one extra reduction
    launch, no host synchronization)."""
    fn = "perturb_"
    params, rows = _checked_rows(fn, params, tensor_ids)
    seed = _check_int(fn, "seed", seed, _U64)
    k = _check_int(fn, "k", k, _U32)
    scale = _check_float(fn, "scale", scale)
    distribution = _check_distribution(fn, distribution)
    threads, stream = _launch_args(params)
    code = _DIST_CODES["gaussian" if distribution == "sphere" else distribution]
    with torch.no_grad():
        norm = None
        if distribution == "sphere":
            norm = _sum_sq_buffer(rows, seed, k, code, threads, stream, params[0].device)
        _C.fd_perturb(rows.desc, rows.total, seed, k, scale, code, norm, None, threads, stream,
                      rows.cuda_device)
        _bump_versions(params)


def perturb_into(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], seed: int, k: int,
                 scale: float, distribution: str = "gaussian", *,
                 tensor_ids: Optional[Sequence[int]] = None,
                 norm_sq: Optional[torch.Tensor] = None) -> None:
    """``dst_t[i] = src_t[i] + scale * z(seed, k, t, i)`` (float32 math, rounded once), one
    launch: each element is read once and written once, half the traffic of a copy followed
    by :func:`perturb_`. ``dst[t]`` and ``src[t]`` have the same shape, dtype and device and
    do not overlap (``dst[t] is src[t]`` is the in-place case). With ``"sphere"``, ``norm_sq``
    (a float64 tensor whose first element is the squared norm of the whole parameter set's
    Gaussian direction, e.g. ``sum_sq(all_params, seed, k)``) normalises over more tensors
    than this call sees; without it the norm is over ``dst``'s list."""
    fn = "perturb_into"
    dst = _check_params(fn, dst)
    try:
        src = list(src)
    except TypeError:
        raise TypeError(_err(fn, f"src: expected a list of tensors, got {type(src).__name__}")) from None
    if len(src) != len(dst):
        raise ValueError(_err(fn, f"src: expected {len(dst)} tensors (one per dst tensor), "
                                  f"got {len(src)}"))
    for n, (d, s_) in enumerate(zip(dst, src)):
        if not isinstance(s_, torch.Tensor):
            raise TypeError(_err(fn, f"src[{n}]: expected a tensor, got {type(s_).__name__}"))
        if s_.shape != d.shape or s_.dtype != d.dtype or s_.device != d.device:
            raise ValueError(_err(fn, f"src[{n}]: expected shape {tuple(d.shape)}, dtype "
                                      f"{d.dtype}, device {d.device} (those of dst[{n}]), got "
                                      f"{tuple(s_.shape)}, {s_.dtype}, {s_.device}"))
        if not s_.is_contiguous():
            raise ValueError(_err(fn, f"src[{n}]: expected a contiguous tensor"))
        if s_.data_ptr() != d.data_ptr() and d.numel() > 0:
            lo, hi = d.data_ptr(), d.data_ptr() + d.numel() * d.element_size()
            slo, shi = s_.data_ptr(), s_.data_ptr() + s_.numel() * s_.element_size()
            if slo < hi and lo < shi:
                raise ValueError(_err(fn, f"src[{n}]: overlaps dst[{n}] without being the same "
                                          f"tensor"))
    seed = _check_int(fn, "seed", seed, _U64)
    k = _check_int(fn, "k", k, _U32)
    scale = _check_float(fn, "scale", scale)
    distribution = _check_distribution(fn, distribution)
    ids = _check_ids(fn, tensor_ids, len(dst))
    rows = _descriptors(dst, ids, src)
    threads, stream = _launch_args(dst)
    code = _DIST_CODES["gaussian" if distribution == "sphere" else distribution]
    with torch.no_grad():
        norm = None
        if distribution == "sphere":
            if norm_sq is None:
                norm = _sum_sq_buffer(rows, seed, k, code, threads, stream, dst[0].device)
            else:
                if (not isinstance(norm_sq, torch.Tensor) or norm_sq.dtype != torch.float64
                        or norm_sq.device != dst[0].device or norm_sq.numel() < 1):
                    raise ValueError(_err(fn, "norm_sq: expected a float64 tensor with at least "
                                              f"one element on {dst[0].device}"))
                norm = norm_sq.reshape(-1)
        _C.fd_perturb(rows.desc, rows.total, seed, k, scale, code, norm, rows.sources, threads,
                      stream, rows.cuda_device)
        _bump_versions(dst)


def perturb_into_trusted(dst: list, src: list, seed: int, k: int, scale: float, code: int,
                         ids: list, cache: Optional[dict] = None) -> None:
    """:func:`perturb_into` without the per-call argument checks, for dk.zo's module hooks
    (one call per module per forward, where the checks cost ~10 us of host time, several
    times the launch). The caller guarantees what ``perturb_into`` checks: same-shaped,
    contiguous, non-overlapping fp32/fp16/bf16 lists on one device, ``dst`` freshly
    allocated (so no version counter needs a bump: nothing can have saved it), 0 <= seed <
    2**64, 0 <= k < 2**32, a finite ``scale``, ``code`` a non-sphere entry of the
    distribution codes (:data:`KERNEL_CODES`) and valid ``ids``. Same bits as
    ``perturb_into``. ``cache``: a dict the caller keeps for this (ids, shapes, dtypes)
    list, mapping its (dst, src) pointers to descriptors (a few entries: cleared past 8)."""
    if cache is None:
        rows = _descriptors(dst, ids, src)
    else:
        key = (tuple(d.data_ptr() for d in dst), tuple(s_.data_ptr() for s_ in src),
               _INLINE_ROWS)
        rows = cache.get(key)
        if rows is None:
            if len(cache) >= 8:
                cache.clear()
            rows = cache[key] = _descriptors(dst, ids, src)
    _C.fd_perturb(rows.desc, rows.total, seed, k, scale, code, None, rows.sources,
                  num_threads(), current_stream_handle(dst[0]), rows.cuda_device)


# Distribution codes for perturb_into_trusted (sphere needs a norm: not on that path).
KERNEL_CODES = {"gaussian": _DIST_CODES["gaussian"], "rademacher": _DIST_CODES["rademacher"]}


def update_(params: Sequence[torch.Tensor], seeds_ks_coeffs: Sequence[tuple[int, int, float]],
            lr: float, weight_decay: float = 0.0, distribution: str = "gaussian", *,
            tensor_ids: Optional[Sequence[int]] = None) -> None:
    """``p <- p - lr * (sum_j c_j z(seed_j, k_j, t, i) + weight_decay * p)``, in place, one
    launch; z is regenerated, never stored. The sum runs in float32 in the order of
    ``seeds_ks_coeffs`` (at most ``MAX_UPDATE_TERMS`` triples (seed, k, c))."""
    fn = "update_"
    params, rows = _checked_rows(fn, params, tensor_ids)
    checked = _check_terms(fn, seeds_ks_coeffs)
    lr = _check_float(fn, "lr", lr)
    weight_decay = _check_float(fn, "weight_decay", weight_decay)
    distribution = _check_distribution(fn, distribution)
    _launch_update(params, rows, checked, lr, weight_decay, distribution)


def _check_terms(fn: str, seeds_ks_coeffs) -> list[tuple[int, int, float]]:
    try:
        terms = [tuple(t) for t in seeds_ks_coeffs]
    except TypeError:
        raise TypeError(_err(fn, "seeds_ks_coeffs: expected a list of (seed, k, coeff) "
                                 "triples")) from None
    if not terms or len(terms) > MAX_UPDATE_TERMS:
        raise ValueError(_err(fn, f"seeds_ks_coeffs: expected 1 to {MAX_UPDATE_TERMS} "
                                  f"(seed, k, coeff) triples, got {len(terms)}"))
    checked = []
    for n, t in enumerate(terms):
        if len(t) != 3:
            raise ValueError(_err(fn, f"seeds_ks_coeffs[{n}]: expected (seed, k, coeff), got {t!r}"))
        checked.append((_check_int(fn, f"seeds_ks_coeffs[{n}] seed", t[0], _U64),
                        _check_int(fn, f"seeds_ks_coeffs[{n}] k", t[1], _U32),
                        _check_float(fn, f"seeds_ks_coeffs[{n}] coeff", t[2])))
    return checked


def _launch_update(params, rows, checked, lr, weight_decay, distribution) -> None:
    threads, stream = _launch_args(params)
    code = _DIST_CODES["gaussian" if distribution == "sphere" else distribution]
    with torch.no_grad():
        norm, stride = None, 0
        if distribution == "sphere":
            norm = torch.stack([_sum_sq_buffer(rows, s, kk, code, threads, stream,
                                               params[0].device) for s, kk, _ in checked])
            stride = _PARTIALS + 1
        _C.fd_update(rows.desc, rows.total, checked, lr, weight_decay, code, norm, stride, threads,
                     stream, rows.cuda_device)
        _bump_versions(params)


def direction(param_index: int, like: torch.Tensor, seed: int, k: int,
              distribution: str = "gaussian") -> torch.Tensor:
    """z(seed, k, param_index, .) as a new float32 tensor shaped like ``like`` (on its
    device): what :func:`perturb_` adds (times scale) to the parameter with that id.
    ``"sphere"`` needs the whole list's norm: take the Gaussian direction and divide by
    ``sum_sq(params, seed, k).sqrt()``."""
    fn = "direction"
    param_index = _check_int(fn, "param_index", param_index, _U32)
    if not isinstance(like, torch.Tensor):
        raise TypeError(_err(fn, f"like: expected a tensor, got {type(like).__name__}"))
    if like.device.type not in ("cpu", "cuda"):
        raise ValueError(_err(fn, f"like: expected a cpu or cuda tensor, got {like.device}"))
    seed = _check_int(fn, "seed", seed, _U64)
    k = _check_int(fn, "k", k, _U32)
    distribution = _check_distribution(fn, distribution)
    if distribution == "sphere":
        raise ValueError(_err(fn, "distribution: 'sphere' is normalised over the whole "
                                  "parameter list, which direction() does not see: use "
                                  "'gaussian' and divide by sum_sq(params, seed, k).sqrt()"))
    out = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    _C.fd_directions(seed, k, param_index, _DIST_CODES[distribution], out, num_threads(),
                     current_stream_handle(out))
    return out


def sum_sq(params: Sequence[torch.Tensor], seed: int, k: int, distribution: str = "gaussian",
           *, tensor_ids: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Sum of z^2 over every element of every parameter (0-dim float64 tensor on their
    device; no host synchronization). The order of the sum is fixed, so the bits repeat run
    to run. ``"sphere"`` gives the squared norm of its underlying Gaussian direction."""
    fn = "sum_sq"
    params, rows = _checked_rows(fn, params, tensor_ids)
    seed = _check_int(fn, "seed", seed, _U64)
    k = _check_int(fn, "k", k, _U32)
    distribution = _check_distribution(fn, distribution)
    threads, stream = _launch_args(params)
    code = _DIST_CODES["gaussian" if distribution == "sphere" else distribution]
    return _sum_sq_buffer(rows, seed, k, code, threads, stream, params[0].device)[0]
