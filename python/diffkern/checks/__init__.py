"""Self-checks, sanitizer workloads and GPU-check benchmark lists, one module per family.

A family plugs into ``python -m diffkern``, ``scripts/gpu_check.sh`` and
``scripts/sanitizer_smoke.py`` by adding one module here, named like its C++ folder
(``csrc/<family>/``). Nothing else keeps a list: the module is found by :func:`discover`.
Modules whose name starts with ``_`` are helpers, not families.

The contract of ``diffkern/checks/<family>.py``:

``run(device: str, quick: bool) -> list[dict]`` (required)
    Checks on ``device`` ("cpu" or "cuda"). One dict per row with the keys ``check`` (what
    was measured, in words), ``value`` (a number or a short string), ``reference`` (what it
    is compared with, or the limit), ``status`` ("ok", "fail" or "info"). ``family`` and
    ``device`` are filled in by the caller. ``quick=True`` is the default run and must take
    well under a second or two per device on a laptop CPU; ``quick=False`` (``--full``) may
    take longer. Accuracy checks compare with float64/mpmath/dense references; timings use
    :func:`diffkern.checks._timing.median_time` and are rows with status "info" or a ratio.
``sanitizer_workload(device: str) -> int`` (required for a family with CUDA kernels)
    Tiny calls of every CUDA kernel of the family (odd sizes, broadcast, non-contiguous,
    zero-size, backward, a side stream) for compute-sanitizer; returns the number of calls.
    Raises (e.g. ``AssertionError``) when a result is wrong. Runs on "cpu" too (CUDA-only
    parts such as the side stream skipped), so the CPU test suite keeps it from rotting.
``GPU_BENCHMARKS: list[dict]`` (optional)
    Python benchmarks that ``scripts/gpu_check.sh`` runs on the GPU machine, each
    ``dict(name=str, timeout_s=int, argv=[script, args...])``; ``argv`` is run from the
    repository root with the check's Python, and the placeholder ``{results}`` in an argument
    becomes the folder whose files come back (JSON, plots).
``ALIASES: tuple[str, ...]`` (optional)
    Other names the family answers to in ``--families``, ``GPU_CHECK_BENCH``,
    ``DK_SANITIZE_FAMILIES`` (e.g. "ot" for "sinkhorn").

C++ benchmarks need no entry: ``bench/cpp`` builds ``bench_<family>_cuda`` and the GPU
check runs every such binary it finds.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

__all__ = ["family_names", "load", "resolve"]


def family_names() -> list[str]:
    """Names of the family modules in this package, sorted (no import happens)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if not m.name.startswith("_") and not m.ispkg)


def load(name: str) -> ModuleType:
    """Import the check module of one family (raises what the import raises)."""
    return importlib.import_module(f"{__name__}.{name}")


def resolve(tokens: str | list[str] | None) -> list[str]:
    """Family names selected by ``tokens`` (names or aliases, comma or space separated).

    ``None``, "" or "all" select every family; "none" selects none. An unknown token raises
    ``ValueError`` naming it and the known names, so a typo never silently skips a family.
    """
    names = family_names()
    if tokens is None:
        return names
    if isinstance(tokens, str):
        tokens = tokens.replace(",", " ").split()
    tokens = [t.strip() for t in tokens if t.strip()]
    if not tokens or tokens == ["all"]:
        return names
    if tokens == ["none"]:
        return []
    by_alias = {n: n for n in names}
    for n in names:
        try:
            aliases = getattr(load(n), "ALIASES", ())
        except Exception:  # a broken module still answers to its own name
            aliases = ()
        for a in aliases:
            by_alias.setdefault(a, n)
    unknown = [t for t in tokens if t not in by_alias]
    if unknown:
        known = ", ".join(sorted(by_alias))
        raise ValueError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} "
                         f"{', '.join(unknown)} (known: {known})")
    chosen = {by_alias[t] for t in tokens}
    return [n for n in names if n in chosen]
