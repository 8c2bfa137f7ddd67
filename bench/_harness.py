"""The one timing / table / JSON / plot harness of the Python benchmarks (bench/*.py).

The scripts run as ``python bench/<name>.py``, so their folder is first on sys.path and
``import _harness`` finds this file.

- Timers: :func:`measure` (median of repeated calls after warm-up, up to a time budget,
  rotating over input sets; CUDA events on the current stream for ``clock="cuda"``,
  ``time.perf_counter`` for ``clock="wall"``), :func:`time_call` (one call), and
  :func:`per_call` (the cost of one call of a tiny op: batches of back-to-back calls timed
  by the wall clock, one synchronization per batch). Each returns a :class:`Timing`.
- Tables: :class:`Column` and :func:`table` print rows (plain dicts, JSON-ready as they are).
- JSON: :func:`write_json` records :func:`environment` (diffkern build info, torch and
  Python versions, the CPU and GPU names) in every file.
- Plots: :func:`pyplot` imports matplotlib with the Agg backend, or says how to install it.
- Arguments: :func:`parser` gives the common --device, --json, --plot, --repeats;
  :func:`devices` turns --device into the devices to run on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

# ------------------------------------------------------------------------------ timing


@dataclass
class Timing:
    """Seconds per call: median and minimum over ``runs`` timed calls (``times``, in call
    order). ``out`` is the last call's result, for checks done outside the timing."""

    median: float
    min: float
    runs: int
    clock: str
    times: list = field(default_factory=list, repr=False)
    out: Any = field(default=None, repr=False)

    def rate(self, items: float) -> float:
        """Items per second at the median time."""
        return items / self.median

    def scaled(self, factor: float) -> "Timing":
        """The same timing with every time multiplied by ``factor`` (e.g. 1 / calls for a
        timed loop of calls)."""
        return Timing(self.median * factor, self.min * factor, self.runs, self.clock,
                      [t * factor for t in self.times], self.out)

    def row(self, prefix: str = "") -> dict:
        """JSON fields: median/min seconds and runs."""
        return {f"{prefix}time_s": self.median, f"{prefix}min_s": self.min,
                f"{prefix}runs": self.runs}


def clock_for(device) -> str:
    """"cuda" (events) for a CUDA device, else "wall" (perf_counter)."""
    return "cuda" if torch.device(device).type == "cuda" else "wall"


def time_call(fn: Callable[[], Any], clock: str = "wall"):
    """(fn(), seconds) of one call. "cuda": CUDA events around the call on the current
    stream, after a synchronize (so earlier work is not counted); "wall": perf_counter (fn
    must block until its work is done)."""
    if clock == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        stop.record()
        stop.synchronize()
        return out, start.elapsed_time(stop) * 1e-3
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measure(fn: Callable, inputs: Optional[Sequence[tuple]] = None, *, clock: str = "wall",
            warmup: int = 1, repeats: int = 5, budget_s: Optional[float] = None) -> Timing:
    """Median seconds per call of ``fn`` after ``warmup`` untimed calls.

    ``inputs``: argument tuples; call i gets ``inputs[i % len(inputs)]`` (the timed calls
    continue the rotation of the warm-up, so no timed call re-reads the previous call's
    data while it is still in cache). None: ``fn()`` without arguments.
    Up to ``repeats`` timed calls; with ``budget_s``, stop early once the timed calls add
    up to that many seconds (at least one call is timed)."""
    sets = list(inputs) if inputs is not None else [()]
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    times, out = [], None
    for r in range(max(1, repeats)):
        args = sets[(warmup + r) % len(sets)]
        out, sec = time_call(lambda: fn(*args), clock)
        times.append(sec)
        if budget_s is not None and sum(times) >= budget_s:
            break
    return Timing(statistics.median(times), min(times), len(times), clock, times, out)


def per_call(fn: Callable, args: tuple = (), *, device="cpu", calls: int = 2000,
             repeats: int = 7, warmup: int = 50) -> Timing:
    """Seconds per call of a cheap ``fn(*args)``: ``repeats`` batches of ``calls``
    back-to-back calls, each batch timed by perf_counter and ended by one synchronize on
    CUDA (what a training loop pays: launches queue while the host moves on). Median over
    the batches of (batch time / calls)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn(*args)
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / calls)
    return Timing(statistics.median(times), min(times), len(times), "wall/batch", times)


# ------------------------------------------------------------------------------- tables

Cell = Union[str, Callable[[dict], Any]]


@dataclass
class Column:
    """One table column: ``header``, ``width``; the value is ``row[key]`` (``key`` a str,
    default the header) or ``key(row)``; ``fmt`` a format spec for it (or a callable
    value -> str); a missing or None value prints blank. ``left`` aligns left."""

    header: str
    width: int
    fmt: Union[str, Callable[[Any], str]] = ""
    key: Optional[Cell] = None
    left: bool = False

    def cell(self, row: dict) -> str:
        k = self.header if self.key is None else self.key
        v = k(row) if callable(k) else row.get(k)
        if v is None:
            s = ""
        elif callable(self.fmt):
            s = self.fmt(v)
        else:
            s = format(v, self.fmt)
        return f"{s:<{self.width}}" if self.left else f"{s:>{self.width}}"

    def head(self) -> str:
        return f"{self.header:<{self.width}}" if self.left else f"{self.header:>{self.width}}"


def table(columns: Sequence[Column], rows: Sequence[dict], *, title: Optional[str] = None,
          error_key: str = "error", lead: int = 1) -> list:
    """Lines of a fixed-width table. A row holding ``error_key`` prints its first ``lead``
    cells and then "ERROR: <message>" instead of the other cells."""
    lines = [title] if title else []
    lines.append("".join(c.head() for c in columns).rstrip())
    for r in rows:
        if error_key in r:
            cells = "".join(c.cell(r) for c in columns[:lead])
            lines.append(f"{cells}  ERROR: {str(r[error_key])[:90]}")
        else:
            lines.append("".join(c.cell(r) for c in columns).rstrip())
    return lines


def rate(r: float) -> str:
    """Items/s as "12.34 M/s"."""
    return f"{r / 1e6:.2f} M/s"


# -------------------------------------------------------------------- environment, JSON


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> Optional[str]:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def build_info() -> dict:
    """diffkern's build info (JSON-safe values), or the reason it cannot be read."""
    try:
        import diffkern as dk
        return {k: v for k, v in dk.build_info().items()
                if isinstance(v, (str, int, float, bool, list, type(None)))}
    except Exception as e:  # an unbuilt or broken install: say so in the JSON
        return {"error": f"{type(e).__name__}: {e}"}


def environment() -> dict:
    """What every benchmark JSON records about the run."""
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu_name": cpu_name(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "gpu_name": gpu_name(),
           "build": build_info()}
    try:
        import diffkern as dk
        env["diffkern"] = getattr(dk, "__version__", "?")
    except Exception:
        env["diffkern"] = None
    try:
        import numpy as np
        env["numpy"] = np.__version__
    except ImportError:
        pass
    return env


def write_json(path: Optional[str], results: dict) -> None:
    """Write ``results`` to ``path`` (nothing when None), filling in any key of
    :func:`environment` the script did not set itself."""
    if not path:
        return
    payload = dict(results)
    for k, v in environment().items():
        payload.setdefault(k, v)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)
    print(f"wrote {path}", file=sys.stderr)


# -------------------------------------------------------------------------------- plots


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None after saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib, or the project's 'bench' "
              "extra); no plot written", file=sys.stderr)
        return None
    return plt


def save(fig, path: str) -> None:
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


# ---------------------------------------------------------------------------- arguments


def parser(doc: Optional[str], *, devices=("cpu", "cuda", "all"), device_default="all",
           repeats: Optional[int] = 5, plot: bool = True) -> argparse.ArgumentParser:
    """An ArgumentParser with the options every benchmark shares: --device, --json PATH,
    --plot PATH (when the script draws one), --repeats (when it repeats timings;
    default ``repeats``, None: no such option)."""
    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=devices, default=device_default,
                    help=f"where to run (default {device_default})")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    if plot:
        ap.add_argument("--plot", default=None, metavar="PATH",
                        help="draw a PNG here (needs matplotlib)")
    if repeats is not None:
        ap.add_argument("--repeats", type=int, default=repeats,
                        help=f"timed calls per measurement (default {repeats})")
    return ap


def cuda_usable() -> bool:
    """A GPU torch can use and a diffkern built with CUDA kernels."""
    if not torch.cuda.is_available():
        return False
    try:
        import diffkern as dk
        return bool(dk.build_info()["cuda"])
    except Exception:
        return False


def devices(choice: str) -> list:
    """--device cpu|cuda|all|auto -> the device names to run on. "cuda" without a usable
    GPU exits with the reason; "all" quietly drops it; "auto" is cuda when usable else cpu."""
    ok = cuda_usable()
    if choice == "auto":
        return ["cuda" if ok else "cpu"]
    out = ["cpu"] if choice in ("cpu", "all") else []
    if choice in ("cuda", "all"):
        if ok:
            out.append("cuda")
        elif choice == "cuda":
            sys.exit("no usable CUDA device (torch.cuda.is_available() or the diffkern build)")
    return out
