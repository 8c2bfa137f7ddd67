"""Directions split across the ranks of a ``torch.distributed`` group (private, for dk.zo).

Every rank holds the same parameters and calls the estimator with the same arguments. The
evaluations of a step (the points theta + s eps z_k, and L(theta) for forward differences)
are numbered in evaluation order and cut into ``world`` contiguous blocks; rank r evaluates
block r. Then one ``all_gather`` of a small float64 vector per rank carries, per evaluated
point, its loss and one auxiliary scalar (the norm of the direction for the sphere
distribution), plus a header: a status flag (did loss_fn fail here), a 64-bit checksum of
this rank's parameters and a 64-bit fingerprint of the call's arguments (seeds, number of
directions, eps, ...), each split into two exactly representable 32-bit halves. No tensor
of parameter size crosses the network.

Every rank then holds every loss, computes the same coefficients with the same Python float
arithmetic and applies the same fused update, so replicas stay bit-identical, and equal to
one process evaluating all points itself (a loss is a pure function of its point). The
header turns the usual ways of breaking that into errors raised on every rank together (no
rank is left waiting in a collective): a rank whose loss_fn raised, parameters that differ
across ranks (checked at every step, before evaluating: the cost is one integer reduction
over the parameters), arguments that differ (e.g. ``seed=None`` drawn differently).
Not caught: arguments that change the number of evaluations (num_directions, mode,
coordinates) make the ranks' vectors differ in length, which the all_gather itself
rejects (gloo) or may wait on (NCCL); and an invalid argument raises on its rank before
the collective while the others wait. Every rank must make the same call.
"""
from __future__ import annotations

import hashlib
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

_HEADER = 5  # status, checksum hi, checksum lo, fingerprint hi, fingerprint lo
_U32 = 1 << 32
_MASK64 = (1 << 64) - 1
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _dist():
    import torch.distributed as dist  # the attribute is looked up per call (tests wrap it)
    return dist


class Split:
    """This process's share of the evaluations and the one exchange of a step."""

    def __init__(self, group, rank: int, world: int, device: torch.device):
        self.group, self.rank, self.world, self.device = group, rank, world, device

    def block(self, count: int) -> Tuple[int, int]:
        """[lo, hi) of the ``count`` evaluations done here: sizes differ by at most one, so
        any world size works (ranks past the last evaluation get an empty block)."""
        return self.rank * count // self.world, (self.rank + 1) * count // self.world

    def exchange(self, fname: str, count: int, values: Sequence[Tuple[float, float]],
                 fingerprint: int, checksum: int,
                 error: Optional[BaseException]) -> Tuple[List[float], List[float]]:
        """(losses, aux) of all ``count`` evaluations, in order, from every rank's block.
        Raises on every rank if a rank failed or the ranks disagree."""
        slots = -(-count // self.world)  # the largest block
        vec = torch.full((_HEADER + 2 * slots,), math.nan, dtype=torch.float64)
        vec[0] = 1.0 if error is not None else 0.0
        vec[1:5] = torch.tensor(_halves(checksum) + _halves(fingerprint), dtype=torch.float64)
        if error is None:
            for j, (loss, aux) in enumerate(values):
                vec[_HEADER + 2 * j] = loss
                vec[_HEADER + 2 * j + 1] = aux
        vec = vec.to(self.device)
        out = [torch.empty_like(vec) for _ in range(self.world)]
        _dist().all_gather(out, vec, group=self.group)
        rows = torch.stack(out).cpu().tolist()
        failed = [r for r, row in enumerate(rows) if row[0] != 0.0]
        if failed:
            if error is not None:
                _note(error, f"{fname}: raised on rank {self.rank} of {self.world} while "
                             f"evaluating its share of the directions")
                raise error
            raise RuntimeError(f"{fname}: loss_fn failed on rank(s) {failed} of {self.world} "
                               f"(see the error printed by that rank); every rank stops")
        fps = [_join(row[3], row[4]) for row in rows]
        if len(set(fps)) != 1:
            raise ValueError(
                f"{fname}: the ranks called with different arguments (seed, num_directions, "
                f"eps, distribution, mode, estimator, coordinates or parameter shapes differ "
                f"between rank 0 and rank {next(r for r, f in enumerate(fps) if f != fps[0])}"
                f"); every rank must pass the same ones (with seed=None each rank draws its "
                f"own seed: pass seed=)")
        sums = [_join(row[1], row[2]) for row in rows]
        if len(set(sums)) != 1:
            bad = [r for r, s in enumerate(sums) if s != sums[0]]
            raise RuntimeError(
                f"{fname}: the parameters differ between rank 0 and rank(s) {bad} of "
                f"{self.world}: the replicas must start identical (broadcast them once "
                f"before training) for the directions to be split across ranks")
        losses, aux = [], []
        for r, row in enumerate(rows):
            lo, hi = (r * count // self.world, (r + 1) * count // self.world)
            for j in range(hi - lo):
                losses.append(row[_HEADER + 2 * j])
                aux.append(row[_HEADER + 2 * j + 1])
        return losses, aux


def _halves(v: int) -> List[float]:
    v &= _MASK64
    return [float(v >> 32), float(v & (_U32 - 1))]


def _join(hi: float, lo: float) -> int:
    return (int(hi) << 32) | int(lo)


def _note(error: BaseException, text: str) -> None:
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(text)


def check_group(fname: str, group) -> None:
    """The type of ``group`` ('auto', None or a ProcessGroup), checked without needing
    torch.distributed to be initialised yet (an optimizer is built before that, maybe)."""
    if group is None or (isinstance(group, str) and group == "auto"):
        return
    dist = _dist()
    if isinstance(group, str) or not (dist.is_available() and
                                      isinstance(group, dist.ProcessGroup)):
        raise (ValueError if isinstance(group, str) else TypeError)(
            f"{fname}: group must be 'auto', None or a torch.distributed process group, "
            f"got {group!r}")


def resolve(fname: str, group) -> Optional[Split]:
    """The Split for ``group`` or None (evaluate everything here).

    ``"auto"``: torch.distributed's default group when it is initialised with more than one
    process, else None. ``None``: None. A ProcessGroup: that group (this process must be a
    member). A group of one process is None: nothing to split."""
    if group is None:
        return None
    dist = _dist()
    if isinstance(group, str):
        if group != "auto":
            raise ValueError(f"{fname}: group must be 'auto', None or a torch.distributed "
                             f"process group, got {group!r}")
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    else:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(f"{fname}: group is a process group but torch.distributed is "
                             f"not initialised (call init_process_group first, or pass "
                             f"group=None)")
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"{fname}: group must be 'auto', None or a torch.distributed "
                            f"process group, got {type(group).__name__}")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{fname}: this process is not a member of group")
    if world == 1:
        return None
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:  # NCCL moves CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return Split(group, rank, world, device)


def fingerprint(*values) -> int:
    """A 64-bit digest of the call's arguments, the same in every process (repr-based:
    ints, floats by their exact repr, strings, tuples)."""
    return int.from_bytes(hashlib.blake2b(repr(values).encode(), digest_size=8).digest(),
                          "little")


@torch.no_grad()
def checksum(params: Sequence[Tensor]) -> int:
    """A 64-bit checksum of the bits of ``params``: per tensor the wrapping int64 sum of its
    elements' bit patterns (integer addition, so the same whatever the reduction order or
    device), mixed with the tensor's position. One host synchronisation."""
    sums = [p.detach().reshape(-1).view(_INT_VIEW[p.element_size()]).sum(dtype=torch.int64)
            for p in params]
    if len({s.device for s in sums}) == 1:
        values = torch.stack(sums).tolist()
    else:
        values = [int(s) for s in sums]
    h = 0
    for t, s in enumerate(values):
        h = (h * 0x100000001B3 + (s & _MASK64) + t) & _MASK64
    return h
