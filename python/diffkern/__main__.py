"""``python -m diffkern``: what was built, what this machine has, and does it work here?

The first lines say what was found (build, torch, devices, threads) and what will be
checked; then one progress line per family and device; then a table of every row. The
default run takes seconds; ``--full`` runs larger problems and more timings.

Families are discovered, not listed: every module in ``diffkern/checks/`` (see its
``__init__`` for the contract). ``--list-families`` prints them (with ``--json -`` as
JSON, for ``scripts/gpu_check.sh`` and ``scripts/sanitizer_smoke.py``).

Exit status: 0 all rows passed, 1 a row failed or a check raised, 2 bad arguments (a
``--json`` path that cannot be written, an unknown family, a device that is not there);
usage errors are one line on stderr, found before anything runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

_PROG = "python -m diffkern"
_COLUMNS = ["family", "device", "check", "value", "reference", "status"]
_PASSING = {"ok", "info", "skip"}  # every other status (fail, error, anything odd) fails


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2."""


def _check_writable(path: str) -> None:
    """Raise UsageError unless ``path`` can be written now (before minutes of checks run).

    Opening for append is the only test that also catches read-only mounts and ACLs; a
    file that did not exist is removed again so a failed run leaves nothing behind.
    """
    if os.path.isdir(path):
        raise UsageError(f"--json {path}: is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"--json {path}: directory {parent} does not exist")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise UsageError(f"--json {path}: cannot write ({e.strerror})") from None
    if not existed:
        os.remove(path)


def _environment() -> dict:
    import torch

    import diffkern

    info = diffkern.build_info()
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["torch_threads"] = torch.get_num_threads()
    info["python"] = platform.python_version()
    # Name and compute capability: the archs line above says whether kernels exist for it.
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    info["gpus"] = [torch.cuda.get_device_name(i) + ", sm_%d%d"
                    % torch.cuda.get_device_capability(i) for i in range(count)]
    return info


def _plan(env: dict, wanted: str) -> tuple[list[str], str]:
    """Devices to check and a sentence on why (the GPU is used only with kernels and torch CUDA)."""
    gpus, kernels = env["gpus"], env["cuda"]
    if gpus and kernels:
        why = f"cuda:0 ({gpus[0]})" + (f"; {len(gpus) - 1} more GPU(s) not checked"
                                       if len(gpus) > 1 else "")
        devices = ["cpu", "cuda"]
    elif gpus:
        why = f"GPU visible ({gpus[0]}) but this build has no CUDA kernels: cpu only"
        devices = ["cpu"]
    elif kernels and env["cuda_device_count"]:
        why = (f"{env['cuda_device_count']} GPU(s) seen by the driver but torch "
               f"{env['torch']} has no CUDA: cpu only")
        devices = ["cpu"]
    else:
        why = "no CUDA device: cpu only"
        devices = ["cpu"]
    if wanted == "cuda":
        if "cuda" not in devices:
            raise UsageError(f"--device cuda: {why.rsplit(': cpu only', 1)[0]}")
        devices = ["cuda"]
    elif wanted == "cpu":
        devices = ["cpu"]
    return devices, why


def _header(env: dict) -> list[str]:
    threads = (f"OpenMP up to {env['openmp_max_threads']} threads"
               if env.get("openmp") else "no OpenMP")
    kernels = (f"CUDA kernels for sm {', '.join(map(str, env['cuda_archs']))} "
               f"(CUDA {env['cuda_version']})" if env["cuda"] else "no CUDA kernels")
    gpus = ", ".join(f"cuda:{i} {n}" for i, n in enumerate(env["gpus"])) or "none"
    return [
        f"diffkern {env['version']} ({env['compiler']}): CPU kernels ({threads}), {kernels}",
        f"torch {env['torch']} (CUDA {env['torch_cuda'] or 'none'}), "
        f"{env['torch_threads']} torch threads, python {env['python']}",
        f"GPUs seen by torch: {gpus}",
    ] + _load_note()


def _load_note() -> list[str]:
    """A warning when other processes hold the CPUs: timings are then not the machine's."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):  # no load average on Windows
        return []
    if load <= 0.75 * cores:
        return []
    return [f"note: load average {load:.1f} on {cores} cores: CPU timings below are not "
            "this machine's best"]


def _listing(names: list[str]) -> list[dict]:
    from diffkern import checks

    out = []
    for name in names:
        module = checks.load(name)
        doc = (module.__doc__ or "").strip().split("\n\n")[0]
        doc = doc.removeprefix(f"{name} family: ")
        out.append(dict(
            name=name, module=module.__name__, aliases=list(getattr(module, "ALIASES", ())),
            summary=" ".join(doc.split()),
            sanitizer_workload=callable(getattr(module, "sanitizer_workload", None)),
            gpu_benchmarks=[dict(b) for b in getattr(module, "GPU_BENCHMARKS", [])],
            cpp_benchmarks=[f"bench_{name}_cpu", f"bench_{name}_cuda"]))
    return out


def _run_family(name: str, device: str, quick: bool) -> list[dict]:
    """Rows of one family on one device; an exception becomes a failing row, not a crash."""
    from diffkern import checks

    try:
        got = checks.load(name).run(device, quick)
        if not got:
            got = [dict(check="run() returned no rows", value="", reference="", status="fail")]
    except Exception as e:  # one family's bug must not hide the others' results
        traceback.print_exc()
        got = [dict(check="run() raised", value=f"{type(e).__name__}: {e}", reference="",
                    status="error")]
    rows = []
    for row in got:
        row = dict(row)
        row["family"], row["device"] = name, device
        row.setdefault("check", "?")
        row.setdefault("value", "")
        row.setdefault("reference", "")
        row["status"] = str(row.get("status", "")).lower() or "missing"
        rows.append(row)
    return rows


def _unchecked(names: list[str]) -> list[dict]:
    """A failing row per compiled family (``_C.FAMILIES``) that has no check module: its
    kernels would otherwise pass unnoticed as "all rows ok"."""
    from diffkern import _C

    return [dict(family=f, device="-", check=f"no check module diffkern/checks/{f}.py",
                 value="", reference="every compiled family has one", status="fail")
            for f in getattr(_C, "FAMILIES", ()) if f not in names]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _table(rows: list[dict]) -> list[str]:
    cells = [[_fmt(r.get(c, "")) for c in _COLUMNS] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(_COLUMNS)]
    line = "  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths)).rstrip()
    return [line, "-" * len(line)] + [
        "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Print how diffkern was built and what this machine has, then check "
                    "every kernel family (accuracy against references, quick timings) on "
                    "the CPU and, when this build has CUDA kernels and a GPU is visible, "
                    "on cuda:0.")
    parser.add_argument("--json", metavar="PATH",
                        help="also write everything as JSON to PATH ('-': stdout, and the "
                             "human-readable lines go to stderr); checked before anything runs")
    parser.add_argument("--full", action="store_true",
                        help="larger problems and more timings (tens of seconds on a CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="the default; kept so older scripts still run")
    parser.add_argument("--families", metavar="NAMES",
                        help="only these families (names or aliases, comma or space separated)")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="where to check (default: cpu, and cuda when usable)")
    parser.add_argument("--list-families", action="store_true",
                        help="print the families (with --json: their GPU benchmarks, sanitizer "
                             "workloads, C++ benchmark names) and exit")
    args = parser.parse_args(argv)
    to_stdout = args.json == "-"
    say_to = sys.stderr if to_stdout else sys.stdout

    def say(*lines: str, end: str = "\n") -> None:
        for line in lines:
            print(line, file=say_to, end=end, flush=True)

    try:
        if args.json and not to_stdout:
            _check_writable(args.json)
        from diffkern import checks

        try:
            names = checks.resolve(args.families)
        except ValueError as e:
            raise UsageError(f"--families: {e}") from None
        if args.list_families:
            listing = _listing(names)
            if args.json:
                _write_json(args.json, {"families": listing})
            else:
                for f in listing:
                    aka = f" (also: {', '.join(f['aliases'])})" if f["aliases"] else ""
                    print(f"{f['name']}{aka}: {f['summary']}")
            return 0
        env = _environment()
        devices, why = _plan(env, args.device)
    except UsageError as e:
        print(f"{_PROG}: error: {e}", file=sys.stderr)
        return 2

    quick = not args.full
    say(*_header(env))
    say(f"checking famil{'y' if len(names) == 1 else 'ies'} {', '.join(names) or '(none)'} "
        f"on {', '.join(devices)}; {why}; {'quick' if quick else 'full'} run")
    say("")
    t_all = time.perf_counter()
    rows: list[dict] = _unchecked(names) if args.families is None else []
    timing: dict = {}
    width = max([len(n) for n in names] + [6])
    for name in names:
        for device in devices:
            say(f"  {name:<{width}} on {device:<4} ... ", end="")
            t = time.perf_counter()
            got = _run_family(name, device, quick)
            seconds = time.perf_counter() - t
            bad = [r for r in got if r["status"] not in _PASSING]
            say(f"{len(got)} rows, {f'{len(bad)} FAILED' if bad else 'ok'}, {seconds:.2f} s")
            timing[f"{name}/{device}"] = seconds
            rows.extend(got)
    total = time.perf_counter() - t_all
    say("")
    if rows:
        say(*_table(rows))
    failed = [r for r in rows if r["status"] not in _PASSING]
    say(f"\n{len(rows)} rows, {len(failed)} failed, {total:.1f} s")
    if args.json:
        _write_json(args.json, dict(
            version=env["version"], environment=env, families=names, devices=devices,
            quick=quick, plan=why, seconds=dict(timing, total=total), rows=rows,
            failed=len(failed)))
        if not to_stdout:
            say(f"wrote {args.json}")
    return 1 if failed else 0


def _finite(obj):
    """NaN and inf as strings: strict JSON has no literal for them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_json(path: str, obj: dict) -> None:
    text = json.dumps(_finite(obj), indent=2, default=str, allow_nan=False)
    if path == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(path, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. `| head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
