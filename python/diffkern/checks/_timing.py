"""The one timer of the self-checks: median seconds of a call, after a warm-up.

On CUDA the call is bracketed by CUDA events on the current stream, so the time is the
GPU's (launch queue included) and not the host's; on the CPU it is ``perf_counter``.
The median, not the mean or the minimum: one preempted repeat on a shared machine must
neither inflate the figure nor let a lucky one flatter it.
"""
from __future__ import annotations

import time
from typing import Callable

import torch


def median_time(fn: Callable[[], object], device: str | torch.device, *, repeats: int = 5,
                warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls, after ``warmup`` calls.

    ``device`` says which clock: a CUDA device times with events on its current stream
    (``fn`` must launch its work there, as every diffkern op does); anything else with
    ``time.perf_counter``.
    """
    if repeats < 1:
        raise ValueError(f"median_time: repeats must be >= 1, got {repeats}")
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if dev.type == "cuda":
        stream = torch.cuda.current_stream(dev)
        stream.synchronize()  # start from an idle queue: earlier work is not ours
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)  # ms -> s
    else:
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
