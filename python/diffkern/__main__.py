"""``python -m diffkern [--json PATH] [--quick]``: what was built, and does it work here?

Prints the build (version, CUDA, archs, OpenMP, torch threads, devices), then runs every
family's self-check and short benchmark on each available device and prints one table.

Registry: each family module listed in FAMILIES may define
``_selfcheck(device: str[, quick: bool]) -> list[dict]``; each row has the keys
family, check, device, value, reference (or baseline), status ("ok", "fail", "info",
"skip"). Exit status is 1 when any row fails or a self-check raises.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import platform
import sys
import time
import traceback

# Family modules (diffkern.<name>) in the order they are checked. A family that is not
# written yet is reported as missing, not as an error.
FAMILIES = ["special", "distributions", "ot", "attention", "zo", "fd"]

_COLUMNS = ["family", "check", "device", "value", "reference", "status"]


def _build() -> dict:
    import torch

    import diffkern

    info = diffkern.build_info()
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["torch_threads"] = torch.get_num_threads()
    info["python"] = platform.python_version()
    info["devices"] = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            info["devices"].append(f"cuda:{i} ({torch.cuda.get_device_name(i)})")
    return info


def _devices(build: dict) -> list[str]:
    import torch

    devices = ["cpu"]
    # Only check the GPU when both the kernels and a device are there.
    if build["cuda"] and torch.cuda.is_available():
        devices.append("cuda")
    return devices


def _run_family(name: str, devices: list[str], quick: bool) -> tuple[list[dict], str | None]:
    try:
        module = importlib.import_module(f"diffkern.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"diffkern.{name}":
            return [], "missing"
        raise
    check = getattr(module, "_selfcheck", None)
    if check is None:
        return [], "no _selfcheck"
    takes_quick = "quick" in inspect.signature(check).parameters
    rows: list[dict] = []
    for device in devices:
        start = time.perf_counter()
        try:
            got = check(device, quick=quick) if takes_quick else check(device)
        except Exception as e:  # one family's bug must not hide the others' results
            traceback.print_exc()
            got = [dict(family=name, check="_selfcheck raised", device=device,
                        value=f"{type(e).__name__}: {e}", reference="", status="error")]
        for row in got:
            row = dict(row)
            row.setdefault("family", name)
            row.setdefault("device", device)
            if "reference" not in row:
                row["reference"] = row.get("baseline", "")
            rows.append(row)
        family = got[0].get("family", name) if got else name
        rows.append(dict(family=family, check="self-check wall time [s]", device=device,
                         value=time.perf_counter() - start, reference="", status="info"))
    return rows, None


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_table(rows: list[dict]) -> None:
    cells = [[_fmt(r.get(c, "")) for c in _COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(_COLUMNS)]
    line = "  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths))
    print(line)
    print("-" * len(line))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffkern",
        description="Print how diffkern was built, then self-check and quickly benchmark "
                    "every kernel family on this machine (CPU, and CUDA when available).")
    parser.add_argument("--json", metavar="PATH", help="also write build info and all rows as JSON")
    parser.add_argument("--quick", action="store_true", help="smaller self-checks and benchmarks")
    args = parser.parse_args(argv)

    build = _build()
    print("diffkern build")
    for key in ["version", "cuda", "cuda_version", "cuda_archs", "openmp", "openmp_max_threads",
                "compiler", "torch", "torch_cuda", "torch_threads", "cuda_device_count", "devices"]:
        print(f"  {key:<20} {build.get(key)}")
    print()

    devices = _devices(build)
    rows: list[dict] = []
    missing: dict[str, str] = {}
    for name in FAMILIES:
        try:
            got, why = _run_family(name, devices, args.quick)
        except Exception as e:
            traceback.print_exc()
            got, why = [dict(family=name, check="import", device="-", value=f"{type(e).__name__}: {e}",
                             reference="", status="error")], None
        rows.extend(got)
        if why:
            missing[name] = why
    if rows:
        _print_table(rows)
    if missing:
        print("\nfamilies without a self-check yet: "
              + ", ".join(f"{k} ({v})" for k, v in missing.items()))

    failed = [r for r in rows if str(r.get("status", "")).lower() in ("fail", "error")]
    print(f"\n{len(rows)} rows, {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"build": build, "rows": rows, "missing": missing}, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
